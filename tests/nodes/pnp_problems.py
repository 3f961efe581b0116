"""Small fixed-seed blind-PnP problems for node tests (exact or noisy correspondences)."""

import math

import torch

from bpnp.nodes.implicit import dense_hessian
from bpnp.nodes.pnp import _derivatives, _retract, pnp_objective, so3_exp


def random_rotation(B, g, dtype):
    q = torch.randn(B, 4, generator=g, dtype=dtype)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=1,
    ).reshape(B, 3, 3)


def make_problem(B=2, n=12, seed=0, dtype=torch.float64, noise=0.0):
    """Exact correspondences: W = I / n (m = n, 2D point i observes 3D point i)."""
    g = torch.Generator().manual_seed(seed)
    R = random_rotation(B, g, dtype)
    t = torch.randn(B, 3, generator=g, dtype=dtype) * 0.3 + torch.tensor([0.0, 0.0, 5.0], dtype=dtype)
    x_cam = torch.randn(B, n, 3, generator=g, dtype=dtype) * torch.tensor([1.5, 1.5, 1.0], dtype=dtype)
    x_cam[..., 2] += 5.0
    points = (x_cam - t[:, None, :]) @ R  # world points with R p + t = x_cam
    bearings = x_cam / x_cam.norm(dim=-1, keepdim=True)
    if noise > 0:
        bearings = bearings + noise * torch.randn(B, n, 3, generator=g, dtype=dtype)
        bearings = bearings / bearings.norm(dim=-1, keepdim=True)
    W = torch.eye(n, dtype=dtype).expand(B, n, n) / n
    return W.clone(), bearings, points, R, t


def distant_scene(ratio, seed=0, n=20, width=1.0, noise_w=1e-3):
    """Object ``width`` wide at depth ``ratio * width``, exact bearings, W = I/n plus a little
    uniform weight everywhere; a start 10 deg off; a random loss on (R, t). All float64."""
    g = torch.Generator().manual_seed(seed)
    depth = ratio * width
    R = random_rotation(1, g, torch.float64)
    t = torch.tensor([[0.1, -0.1, depth]], dtype=torch.float64)
    xc = (torch.rand(1, n, 3, generator=g, dtype=torch.float64) - 0.5) * width
    xc[..., 2] += depth
    points = (xc - t[:, None]) @ R
    bearings = xc / xc.norm(dim=-1, keepdim=True)
    W = torch.eye(n, dtype=torch.float64)[None] / n + noise_w * torch.rand(1, n, n, generator=g, dtype=torch.float64)
    axis = torch.randn(1, 3, generator=g, dtype=torch.float64)
    R0 = so3_exp(axis / axis.norm() * math.radians(10)) @ R
    t0 = t + 0.05 * width * torch.randn(1, 3, generator=g, dtype=torch.float64)
    GR = torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    gt = torch.randn(1, 3, generator=g, dtype=torch.float64)
    return W, bearings, points, R0, t0, GR, gt


def perturb(R, t, angle_deg, shift, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = R.shape[0]
    axis = torch.randn(B, 3, generator=g, dtype=R.dtype)
    axis = axis / axis.norm(dim=1, keepdim=True)
    R0 = so3_exp(axis * math.radians(angle_deg)) @ R
    t0 = t + shift * torch.randn(B, 3, generator=g, dtype=R.dtype)
    return R0, t0


def rotation_error(R1, R2):
    c = ((R1.transpose(1, 2) @ R2).diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2
    return torch.arccos(c.clamp(-1, 1))


def assert_derivatives_match_autograd(W, b, p, R0, t0, kernel):
    """The node's analytic objective, gradient and Hessian in the local chart at (R0, t0) against
    autograd through ``pnp_objective`` (dense W (B, m, n) or paired W (B, K)). Returns them."""
    F, g, H, _ = _derivatives(W, b, p @ R0.transpose(1, 2) + t0[:, None], kernel)

    def local(xi):
        Rx, tx = _retract(R0, t0, xi)
        return pnp_objective(W, b, p, Rx, tx, kernel)

    xi0 = torch.zeros(W.shape[0], 6, dtype=W.dtype, requires_grad=True)
    torch.testing.assert_close(F, local(xi0).detach())
    torch.testing.assert_close(g, torch.autograd.grad(local(xi0).sum(), xi0)[0])
    torch.testing.assert_close(H, dense_hessian(local, xi0.detach()))
    return F, g, H


def float32_default_cases():
    """Six ordinary scenes (40 exact points, starts 10-30 deg off) and a distant one (depth/extent
    6, dense W), float32: the cases of the float32 defaults tests."""
    cases = []
    for seed in range(6):
        W, b, p, R, t = make_problem(B=1, n=40, seed=seed, dtype=torch.float32)
        cases.append((W, b, p, *perturb(R, t, (10.0, 20.0, 30.0)[seed % 3], 0.3, seed=seed + 7)))
    W, b, p, R0, t0, _, _ = distant_scene(6.0, seed=0)
    cases.append(tuple(x.float() for x in (W, b, p, R0, t0)))
    return cases
