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
