"""The paired (sparse) form of the PnP node: W (B, K) over gathered pairs, O(K) per iteration.

Checked in float64: with all m n pairs it is the dense node (forward and every gradient); its
analytic derivatives match autograd; gradcheck of the implicit backward; implicit = unrolled;
:func:`gather_pairs` keeps the top-k of each row and sends the gradient to exactly those entries.
"""

import pytest
import torch

from bpnp.nodes.pnp import PnPRefine, _derivatives, _paired_derivatives_rank_one, gather_pairs
from bpnp.nodes.robust import KERNELS, RobustKernel
from bpnp.nodes.status import Status
from tests.nodes.pnp_problems import assert_derivatives_match_autograd, make_problem, perturb, rotation_error


def _problem(B=2, n=8, seed=0, noise=0.01, spread=0.02):
    W, b, p, R, t = make_problem(B=B, n=n, seed=seed, noise=noise)
    W = W + spread * torch.rand(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(seed + 100))
    return W, b, p, R, t


def _all_pairs(W, b, p):
    """Every (i, j) as a pair, in row-major order."""
    B, m, n = W.shape
    return (W.reshape(B, m * n), b[:, :, None, :].expand(B, m, n, 3).reshape(B, m * n, 3),
            p[:, None, :, :].expand(B, m, n, 3).reshape(B, m * n, 3))


@pytest.mark.parametrize("robust", KERNELS)
def test_all_pairs_equal_dense_forward_and_gradients(robust):
    W, b, p, R, t = _problem(seed=1)
    R0, t0 = perturb(R, t, 10.0, 0.1)
    node = PnPRefine(robust=robust, robust_scale=0.01, max_iter=100)
    gR = torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gt = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for paired in (False, True):
        xs = [x.clone().requires_grad_(True) for x in (W, b, p)]
        args = _all_pairs(*xs) if paired else xs
        out = node(*args, R0, t0)
        grads = torch.autograd.grad((out.R * gR).sum() + (out.t * gt).sum(), xs)
        results.append((out, grads))
    (dense, gd), (pairs, gp) = results
    assert (dense.status == Status.OK).all() and (pairs.status == Status.OK).all()
    torch.testing.assert_close(pairs.R, dense.R, atol=1e-12, rtol=0)
    torch.testing.assert_close(pairs.t, dense.t, atol=1e-12, rtol=0)
    torch.testing.assert_close(pairs.objective, dense.objective, atol=1e-14, rtol=1e-12)
    for a, c in zip(gp, gd):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("robust", KERNELS)
def test_paired_derivatives_equal_dense_with_all_pairs(robust):
    """Objective, gradient, exact and Gauss-Newton Hessians of the O(K) rank-one formulas."""
    W, b, p, R, t = _problem(B=2, n=7, seed=2, noise=0.05)
    R0, t0 = perturb(R, t, 10.0, 0.2)
    kernel = RobustKernel(robust, 0.005)
    Wk, bk, pk = _all_pairs(W, b, p)
    dense = _derivatives(W, b, p @ R0.transpose(1, 2) + t0[:, None], kernel)
    paired = _derivatives(Wk, bk, pk @ R0.transpose(1, 2) + t0[:, None], kernel)
    for a, c in zip(paired, dense):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("robust", KERNELS)
def test_moment_derivatives_equal_rank_one_reference(robust):
    """The one-product moment formulas against the general chart path, on pairs at very
    different depths and angles (near, far, off-axis, zero weight), float64."""
    g = torch.Generator().manual_seed(11)
    B, K = 3, 257
    W = torch.rand(B, K, dtype=torch.float64, generator=g)
    W[:, ::7] = 0.0
    b = torch.nn.functional.normalize(torch.randn(B, K, 3, dtype=torch.float64, generator=g), dim=-1)
    depth = torch.exp(torch.empty(B, K, 1, dtype=torch.float64).uniform_(-2, 4, generator=g))  # 0.14 to 55
    x = torch.nn.functional.normalize(b + 0.3 * torch.randn(B, K, 3, dtype=torch.float64, generator=g), dim=-1) * depth
    kernel = RobustKernel(robust, 0.01)
    fast = _derivatives(W, b, x, kernel)
    ref = _paired_derivatives_rank_one(W, b, x, kernel)
    for a, c in zip(fast, ref):
        # Sums of K terms of mixed sign: agreement to a few hundred eps of the largest term.
        scale = c.abs().amax(dim=tuple(range(1, c.ndim)), keepdim=True).clamp_min(1e-300)
        assert ((a - c).abs() / scale).max() <= 1e3 * torch.finfo(torch.float64).eps


@pytest.mark.parametrize("robust", KERNELS)
def test_paired_derivatives_match_autograd(robust):
    W, b, p, R, t = _problem(B=2, n=6, seed=3, noise=0.05)
    Wk, bk, pk = gather_pairs(W, b, p, 3)
    R0, t0 = perturb(R, t, 10.0, 0.2)
    kernel = RobustKernel(robust, 0.005)
    assert_derivatives_match_autograd(Wk, bk, pk, R0, t0, kernel)


@pytest.mark.parametrize("robust", ["none", "geman_mcclure"])
def test_gradcheck_paired(robust):
    W, b, p, R, t = _problem(B=2, n=6, seed=4)
    Wk, bk, pk = gather_pairs(W, b, p, 2)
    R0, t0 = perturb(R, t, 3.0, 0.05)
    node = PnPRefine(robust=robust, robust_scale=0.01, max_iter=100)
    xs = tuple(x.detach().clone().requires_grad_(True) for x in (Wk, bk, pk))

    def f(W, b, p):
        out = node(W, b, p, R0, t0)
        return out.R, out.t

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert (node.last_backward_status == Status.OK).all()


def test_gradcheck_through_gather():
    """Through the top-k gather, into the dense W, bearings and points (the selection is fixed
    under gradcheck's small perturbations: no ties among the top entries)."""
    W, b, p, R, t = _problem(B=2, n=6, seed=6)
    R0, t0 = perturb(R, t, 3.0, 0.05)
    node = PnPRefine(robust="geman_mcclure", robust_scale=0.01, max_iter=100)
    xs = tuple(x.detach().clone().requires_grad_(True) for x in (W, b, p))

    def f(W, b, p):
        out = node(*gather_pairs(W, b, p, 2), R0, t0)
        return out.R, out.t

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_paired_implicit_equals_unrolled():
    W, b, p, R, t = _problem(B=2, n=8, seed=5)
    R0, t0 = perturb(R, t, 10.0, 0.1)
    gR = torch.randn(2, 3, 3, dtype=torch.float64)
    gt = torch.randn(2, 3, dtype=torch.float64)
    grads = []
    for mode in ("implicit", "unrolled"):
        Wg = W.clone().requires_grad_(True)
        out = PnPRefine(robust="geman_mcclure", robust_scale=0.01, backward=mode, max_iter=100)(
            *gather_pairs(Wg, b, p, 3), R0, t0)
        grads.append(torch.autograd.grad((out.R * gR).sum() + (out.t * gt).sum(), Wg)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-8, rtol=1e-5)


def test_gather_pairs_keeps_row_top_k_and_gradient_only_there():
    W, b, p, _, _ = _problem(B=2, n=7, seed=7)
    Wg = W.clone().requires_grad_(True)
    Wk, bk, pk = gather_pairs(Wg, b, p, 3)
    assert Wk.shape == (2, 21) and bk.shape == (2, 21, 3) and pk.shape == (2, 21, 3)
    kept = torch.zeros_like(W, dtype=torch.bool).scatter_(2, W.topk(3, dim=2).indices, True)
    torch.testing.assert_close(Wk.reshape(2, 7, 3).sort(-1).values, W[kept].reshape(2, 7, 3).sort(-1).values)
    # each pair's point is the column its weight came from
    for bi in range(2):
        for q in range(21):
            j = int((W[bi, q // 3] == Wk[bi, q]).nonzero()[0])
            torch.testing.assert_close(pk[bi, q], p[bi, j])
            torch.testing.assert_close(bk[bi, q], b[bi, q // 3])
    (g,) = torch.autograd.grad((Wk * torch.arange(1, 22, dtype=W.dtype)).sum(), Wg)
    assert (g[~kept] == 0).all() and (g[kept] != 0).all()
    # k >= n keeps every entry
    assert gather_pairs(W, b, p, 50)[0].shape == (2, 49)


def test_paired_recovers_pose_and_rejects_masks():
    W, b, p, R, t = make_problem(B=3, n=15, seed=1)
    R0, t0 = perturb(R, t, 20.0, 0.5)
    node = PnPRefine(robust="geman_mcclure", robust_scale=0.01)
    out = node(*gather_pairs(W, b, p, 1), R0, t0)
    assert (out.status == Status.OK).all()
    assert rotation_error(out.R, R).max() < 1e-6
    mask = torch.ones(3, 15, dtype=torch.bool)
    with pytest.raises(ValueError, match="paired form"):
        node(*gather_pairs(W, b, p, 1), R0, t0, mask2d=mask)
    with pytest.raises(ValueError, match="k must be"):
        gather_pairs(W, b, p, 0)
