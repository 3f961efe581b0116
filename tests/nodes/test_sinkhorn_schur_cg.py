"""The OT backward's Schur solve by preconditioned conjugate gradients (``schur="cg"``, the
default) against the dense Cholesky reference: same gradients within the solve's tolerance,
gradcheck in float64, per-item dense fallback and status."""

import importlib

import pytest
import torch

from bpnp.nodes import sinkhorn_with_bins
from bpnp.nodes.sinkhorn import sinkhorn, uniform_marginals
from bpnp.nodes.status import Status

F64 = torch.float64
sinkhorn_mod = importlib.import_module("bpnp.nodes.sinkhorn")  # the module (bpnp.nodes.sinkhorn is also a function)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(B, m, n, seed, padded=True):
    M = 2 * torch.rand(B, m, n, generator=_gen(seed), dtype=F64)
    rows, cols = torch.ones(B, m, dtype=torch.bool), torch.ones(B, n, dtype=torch.bool)
    if padded and B > 1:
        rows[1, m // 2:] = False
        cols[B - 1, : n // 3] = False
    return M, rows, cols


def _grads(fn, M, G):
    M = M.clone().requires_grad_(True)
    P, info = fn(M)
    (P * G).sum().backward()
    return M.grad, info


@pytest.mark.parametrize("shape", [(5, 40, 30), (4, 30, 45)])  # m > n eliminates the other side
@pytest.mark.parametrize("bins", [False, True])
def test_cg_gradient_equals_the_dense_one(shape, bins):
    """Both solve the same SPD system; CG stops at the relative residual tol, so the gradients
    differ by about cond(S) tol relative to their size. cond(S) of these plans (lam = 10, costs
    U[0, 2], padded items included) is at most 105 (torch.linalg.cond of the dense S), so
    1e3 tol is 10 cond(S) tol; tol = 1e-12 keeps that far above float64 rounding
    (eps cond(S) ~ 2e-14)."""
    B, m, n = shape
    M, rows, cols = _problem(B, m, n, seed=1)
    tol = 1e-12
    G = torch.randn((B, m + bins, n + bins), generator=_gen(2), dtype=F64)
    if bins:
        fn = lambda schur: (lambda X: sinkhorn_with_bins(X, rows, cols, 1.0, lam=10.0, max_iter=10000, tol=tol,  # noqa: E731
                                                          schur=schur))
    else:
        r, c = uniform_marginals(rows, cols, F64)
        fn = lambda schur: (lambda X: sinkhorn(X, r, c, 10.0, 10000, tol, schur=schur))  # noqa: E731
    g_cg, i_cg = _grads(fn("cg"), M, G)
    g_ch, i_ch = _grads(fn("cholesky"), M, G)
    assert (i_cg.backward_status == Status.OK).all() and (i_ch.backward_status == Status.OK).all()
    gap = (g_cg - g_ch).flatten(1).norm(dim=1) / g_ch.flatten(1).norm(dim=1)
    assert (gap <= 1e3 * tol).all(), gap


def test_gradcheck_with_cg():
    B, m, n = 2, 5, 4
    M, rows, cols = _problem(B, m, n, seed=3)
    g = torch.tensor(0.9, dtype=F64, requires_grad=True)

    def f(X, gam):
        return sinkhorn_with_bins(X, rows, cols, gam, lam=5.0, max_iter=10000, tol=1e-13, schur="cg")[0]

    assert torch.autograd.gradcheck(f, (M.clone().requires_grad_(True), g), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_items_cg_cannot_certify_are_solved_densely(monkeypatch):
    """With an iteration limit too small for any item to converge, every item goes to the dense
    solve: the same gradient (up to the rounding of a different batch size in the dense kernels:
    a few eps times cond(S) <= 105, relative to the gradient's size) and status as
    schur="cholesky"."""
    M, rows, cols = _problem(3, 20, 16, seed=4)
    G = torch.randn((3, 21, 17), generator=_gen(5), dtype=F64)
    fn = lambda schur: (lambda X: sinkhorn_with_bins(X, rows, cols, 1.0, lam=10.0, max_iter=5000, tol=1e-10,  # noqa: E731
                                                      schur=schur))
    g_ch, i_ch = _grads(fn("cholesky"), M, G)
    monkeypatch.setattr(sinkhorn_mod, "CG_MAX_ITER", 1)
    g_cg, i_cg = _grads(fn("cg"), M, G)
    scale = g_ch.abs().amax()
    assert (g_cg - g_ch).abs().amax() <= 10 * 105 * torch.finfo(F64).eps * scale
    assert torch.equal(i_cg.backward_status, i_ch.backward_status)


def test_a_nonfinite_item_keeps_its_status_and_spares_the_others():
    M, rows, cols = _problem(3, 12, 10, seed=6)
    G = torch.randn((3, 13, 11), generator=_gen(7), dtype=F64)
    G[1, 0, 0] = float("nan")
    Mg = M.clone().requires_grad_(True)
    P, info = sinkhorn_with_bins(Mg, rows, cols, 1.0, lam=10.0, max_iter=5000, tol=1e-10)
    (P * G).sum().backward()
    assert info.backward_status.tolist() == [Status.OK, Status.NONFINITE, Status.OK]
    assert torch.isfinite(Mg.grad).all() and (Mg.grad[1] == 0).all()


def test_bad_schur_name():
    M, rows, cols = _problem(1, 3, 3, seed=8)
    with pytest.raises(ValueError, match="schur must be one of"):
        sinkhorn_with_bins(M, rows, cols, 1.0, schur="lu")
