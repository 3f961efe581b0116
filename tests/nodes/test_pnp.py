"""PnP refinement node: convergence, derivatives, gradcheck, batch independence, degeneracy."""

import pytest
import torch

from bpnp.nodes.pnp import PnPRefine, _derivatives, so3_exp
from bpnp.nodes.robust import KERNELS, RobustKernel
from bpnp.nodes.status import Status
from bpnp.so3 import geodesic_angle
from tests.nodes.pnp_problems import assert_derivatives_match_autograd, make_problem, perturb, rotation_error
from tests.tolerances import pnp_rotation_bound


def test_so3_exp_is_rotation_and_second_order_at_zero():
    w = torch.randn(5, 3, dtype=torch.float64)
    R = so3_exp(w)
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    # Second derivative at 0 must match Exp(w) ~ I + [w] + [w]^2 / 2.
    x = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda w: (so3_exp(w[None])[0] @ x)[0], torch.zeros(3, dtype=torch.float64))
    # d2/dw2 of (1/2 [w]^2 x)_0 = 1/2 (w (w.x) - x |w|^2)_0 -> 1/2 (e0 x^T + x e0^T) - x0 I
    e0 = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    expected = 0.5 * (torch.outer(e0, x) + torch.outer(x, e0)) - x[0] * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(H, expected)


@pytest.mark.parametrize("robust", KERNELS)
def test_analytic_derivatives_match_autograd(robust):
    W, b, p, R, t = make_problem(B=2, n=10, seed=3, noise=0.05)
    W = W + 0.01 * torch.rand(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(0))
    R0, t0 = perturb(R, t, 10.0, 0.2)
    kernel = RobustKernel(robust, 0.005)
    F, g, H = assert_derivatives_match_autograd(W, b, p, R0, t0, kernel)
    if robust == "none":
        # The O(n) path with a = W^T B precomputed gives the same numbers.
        x = p @ R0.transpose(1, 2) + t0[:, None]
        lin = _derivatives(W, b, x, kernel, (W.transpose(1, 2) @ b, W.sum(1), W.sum((1, 2))))
        for u, v in zip(lin, (F, g, H)):
            torch.testing.assert_close(u, v)


@pytest.mark.parametrize("angle", [20.0, 45.0])
def test_recovers_true_pose_float64(angle):
    W, b, p, R, t = make_problem(B=3, n=15, seed=1)
    R0, t0 = perturb(R, t, angle, 0.5)
    out = PnPRefine()(W, b, p, R0, t0)
    assert (out.status == Status.OK).all()
    assert rotation_error(out.R, R).max() < 1e-6
    assert (out.t - t).norm(dim=1).max() < 1e-6
    assert rotation_error(R0, R).min() > 0.3  # the start really was >= 20 deg away


@pytest.mark.parametrize("robust", ["huber", "geman_mcclure", "tanh"])
def test_robust_kernels_converge_and_ignore_outliers(robust):
    W, b, p, R, t = make_problem(B=2, n=20, seed=2, noise=1e-3)
    # Replace 6 of 20 correspondences with wrong pairs of equal weight.
    W[:, :6, :6] = 0
    idx = torch.arange(6)
    W[:, idx, (idx + 3) % 6] = 1 / 20
    R0, t0 = perturb(R, t, 5.0, 0.1)
    plain = PnPRefine()(W, b, p, R0, t0)
    robust_out = PnPRefine(robust=robust, robust_scale=1e-4, max_iter=100)(W, b, p, R0, t0)
    assert (robust_out.status == Status.OK).all()
    assert rotation_error(robust_out.R, R).max() < rotation_error(plain.R, R).min()


@pytest.mark.parametrize("robust", ["none", "geman_mcclure"])
def test_gradcheck_all_inputs(robust):
    W, b, p, R, t = make_problem(B=2, n=6, seed=4, noise=0.01)
    W = W + 0.02 * torch.rand(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(1))
    R0, t0 = perturb(R, t, 3.0, 0.05)
    node = PnPRefine(robust=robust, robust_scale=0.01, max_iter=100)
    W.requires_grad_(True)
    b.requires_grad_(True)
    p.requires_grad_(True)

    def f(W, b, p):
        out = node(W, b, p, R0, t0)
        return out.R, out.t

    assert torch.autograd.gradcheck(f, (W, b, p), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert (node.last_backward_status == Status.OK).all()


def test_implicit_equals_unrolled():
    W, b, p, R, t = make_problem(B=2, n=8, seed=5, noise=0.01)
    W = W + 0.02 * torch.rand(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(2))
    R0, t0 = perturb(R, t, 10.0, 0.1)
    gR = torch.randn(2, 3, 3, dtype=torch.float64)
    gt = torch.randn(2, 3, dtype=torch.float64)
    grads = []
    for mode in ("implicit", "unrolled"):
        Wg = W.clone().requires_grad_(True)
        out = PnPRefine(backward=mode, max_iter=100)(Wg, b, p, R0, t0)
        grads.append(torch.autograd.grad((out.R * gR).sum() + (out.t * gt).sum(), Wg)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-8, rtol=1e-5)


def test_items_are_independent():
    W, b, p, R, t = make_problem(B=3, n=10, seed=6, noise=0.01)
    R0, t0 = perturb(R, t, 15.0, 0.2)
    W2, p2 = W.clone(), p.clone()
    W2[2] = W2[2].roll(1, dims=1)  # change item 2 only (wrong correspondences, more iterations)
    p2[2] = 3 * p2[2]
    outs, grads = [], []
    for Wi, pi in ((W, p), (W2, p2)):
        Wg = Wi.clone().requires_grad_(True)
        out = PnPRefine()(Wg, b, pi, R0, t0)
        outs.append(out)
        grads.append(torch.autograd.grad(out.R.sum() + out.t.sum(), Wg)[0])
    assert torch.equal(outs[0].R[:2], outs[1].R[:2]) and torch.equal(outs[0].t[:2], outs[1].t[:2])
    assert torch.equal(grads[0][:2], grads[1][:2])


@pytest.mark.parametrize("mode,code", [("damp", Status.DAMPED), ("zero", Status.ZEROED), ("min_norm", Status.MIN_NORM)])
def test_singular_item_all_weight_on_two_points(mode, code):
    W, b, p, R, t = make_problem(B=2, n=8, seed=7)
    W[1] = 0
    W[1, 0, 0] = W[1, 1, 1] = 0.5
    R0, t0 = perturb(R, t, 10.0, 0.2)
    Wg = W.clone().requires_grad_(True)
    node = PnPRefine(singular=mode)
    out = node(Wg, b, p, R0, t0)
    assert out.status.tolist() == [Status.OK, Status.DEGENERATE]
    assert torch.isfinite(out.R).all() and torch.isfinite(out.t).all()
    (g,) = torch.autograd.grad(out.R.sum() + out.t.sum(), Wg)
    assert torch.isfinite(g).all()
    assert node.last_backward_status.tolist() == [Status.OK, code]


def test_masks_and_nonfinite_item():
    W, b, p, R, t = make_problem(B=2, n=8, seed=8)
    R0, t0 = perturb(R, t, 10.0, 0.2)
    mask3d = torch.ones(2, 8, dtype=torch.bool)
    mask3d[0, -1] = False
    p_bad = p.clone()
    p_bad[1, 0, 0] = float("nan")
    p_bad[0, -1] = 1e9  # garbage in a masked (padded) point changes nothing
    out = PnPRefine()(W, b, p_bad, R0, t0, mask3d=mask3d)
    assert out.status.tolist() == [Status.OK, Status.NONFINITE]
    assert rotation_error(out.R[:1], R[:1]) < 1e-6
    torch.testing.assert_close(out.R[1], R0[1])


def test_float32_converges():
    W, b, p, R, t = make_problem(B=4, n=30, seed=9, dtype=torch.float32, noise=1e-3)
    R0, t0 = perturb(R, t, 20.0, 0.3)
    out = PnPRefine()(W, b, p, R0, t0)
    assert (out.status == Status.OK).all()
    assert rotation_error(out.R.double(), R.double()).max() < 5e-3  # the noise's effect (1e-3), not rounding
    # Against the float64 optimum of the same inputs: the float32 stopping and rounding bound
    # (the angle from atan2, bpnp.so3.geodesic_angle: acos of the trace of a float32 rotation,
    # rotation_error, resolves only sqrt(eps32) ~ 5e-4 rad).
    ref = PnPRefine(max_iter=300, xtol=1e-15, gtol=1e-16)(*(x.double() for x in (W, b, p, R0, t0)))
    err = geodesic_angle(out.R.double(), ref.R)
    assert (err <= pnp_rotation_bound(W, b, p, ref.R, ref.t, torch.float32)).all(), err


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_work_dtype_solves_float32_inputs_in_float64(backward):
    """work_dtype=float64 on float32 inputs: the float64 solution, returned in float32, and the
    gradient of the float64 node cast to float32 (the casts are differentiable)."""
    W, b, p, R, t = make_problem(B=3, n=20, seed=4, noise=1e-3)
    R0, t0 = perturb(R, t, 10.0, 0.2)
    W, b, p, R0, t0 = (x.float().double() for x in (W, b, p, R0, t0))  # float32-representable inputs
    node64 = PnPRefine(robust="geman_mcclure", robust_scale=5e-5, backward=backward)
    W64 = W.clone().requires_grad_(True)
    ref = node64(W64, b, p, R0, t0)
    (g_ref,) = torch.autograd.grad(ref.R.sum() + ref.t.sum(), W64)
    node = PnPRefine(robust="geman_mcclure", robust_scale=5e-5, backward=backward, work_dtype=torch.float64)
    W32 = W.float().requires_grad_(True)
    out = node(W32, b.float(), p.float(), R0.float(), t0.float())
    assert out.R.dtype == out.t.dtype == out.objective.dtype == torch.float32
    torch.testing.assert_close(out.R, ref.R.float(), rtol=0, atol=0)  # the float64 pose, rounded once
    assert out.iterations.tolist() == ref.iterations.tolist()
    (g,) = torch.autograd.grad(out.R.sum() + out.t.sum(), W32)
    assert g.dtype == torch.float32
    # The float64 gradient rounded once to float32: within half an ulp, eps32 / 2 relative (rtol
    # eps32 leaves the float64 computation's own rounding, ~1e-16, room), or float32's smallest
    # normal number absolutely for a gradient entry below it.
    f32 = torch.finfo(torch.float32)
    torch.testing.assert_close(g.double(), g_ref, rtol=f32.eps, atol=f32.tiny)
    with pytest.raises(ValueError, match="work_dtype"):
        PnPRefine(work_dtype=torch.int32)


def test_bad_shapes():
    W, b, p, R, t = make_problem(B=2, n=8)
    with pytest.raises(ValueError, match="bearings must have shape"):
        PnPRefine()(W, b[:, :5], p, R, t)
    with pytest.raises(ValueError, match="robust kernel"):
        PnPRefine(robust="cauchy")


def test_uniform_weights_stop_early_as_degenerate():
    """A near-uniform W (an untrained network's plan) has no finite optimum: LM would walk towards
    infinity for max_iter iterations. The periodic degeneracy test stops such an item early with
    the status it gets at the end anyway, and leaves a well-posed item of the batch unchanged."""
    W, b, p, R, t = make_problem(B=2, n=30, seed=10, noise=1e-3, dtype=torch.float32)
    g = torch.Generator().manual_seed(10)
    W[1] = (1 + 0.1 * torch.rand(30, 30, generator=g)) / (30 * 30)
    R0, t0 = perturb(R, t, 10.0, 0.2)
    late = PnPRefine(max_iter=50, degenerate_check_every=0)(W, b, p, R0, t0)
    early = PnPRefine(max_iter=50, degenerate_check_every=5)(W, b, p, R0, t0)
    assert late.status.tolist() == early.status.tolist() == [Status.OK, Status.DEGENERATE]
    assert late.iterations[1] == 50 and early.iterations[1] <= 10
    assert torch.equal(late.R[0], early.R[0]) and torch.equal(late.t[0], early.t[0])
