"""Over-relaxed Sinkhorn (implicit-mode forward): same plan, fewer iterations, safeguard, options."""

import math

import pytest
import torch

from bpnp.nodes import SinkhornOTWithBins, sinkhorn_with_bins
from bpnp.nodes.sinkhorn import SinkhornOT, _augmented_cost, _relaxed_scaling, bin_marginals, sinkhorn, uniform_marginals
from bpnp.nodes.status import Status
from tests.tolerances import marginal_rounding, plan_gap, sinkhorn_plan_bound

F64 = torch.float64
WS = [1.3, 1.5, 1.8]
# tol per dtype (the solver's stopping tolerance, an input): well above float32 rounding (the
# node's floor, 10 eps = 1.2e-6), tight in float64.
TOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cost(B, m, n, seed=0, dtype=F64):
    return 2 * torch.rand(B, m, n, generator=_gen(seed), dtype=dtype)


def _masks(B, m, n, padded=False):
    """All real, or (padded) item 1 with rows 3..6 and item 2 with its last 4 columns padded."""
    rows, cols = torch.ones(B, m, dtype=torch.bool), torch.ones(B, n, dtype=torch.bool)
    if padded:
        rows[1, 3:7] = False
        cols[2, -4:] = False
    return rows, cols


def _plan_gap(P, Q):
    """(B,) L1 distance of two plans relative to the mass of the second."""
    return plan_gap(P, Q)


def _check_same_solution(P1, info1, Pw, infow, tol, M, lam, r, c):
    """Both solves meet tol and their plans agree to within the sum of their a-posteriori error
    bounds against the exact plan (tests/tolerances.py: entry rounding plus the condition of the
    marginal map times each plan's own residual, so the bound follows tol and eps, not a seen gap).

    An item stops on its iteration estimate of the error, and the returned plan's own sums are a
    second evaluation of the same sums: each is within marginal_rounding (gamma_(k+2), k = m or n
    terms) of the exact error, so the reported error may exceed tol by twice that (then the item
    is MAX_ITER)."""
    m, n = P1.shape[1:]
    slack = 2 * marginal_rounding(m, n, P1.dtype)
    for info in (info1, infow):
        assert (info.marginal_error <= tol + slack).all(), info.marginal_error
        assert ((info.status == Status.OK) | (info.marginal_error > tol)).all(), info.status
    if Pw.dtype == torch.float64:
        assert (infow.status == Status.OK).all()
    bound = sinkhorn_plan_bound(P1, M, lam, r, c, P1.dtype) + sinkhorn_plan_bound(Pw, M, lam, r, c, Pw.dtype)
    assert (_plan_gap(P1, Pw) <= bound).all(), (_plan_gap(P1, Pw), bound)


# ------------------------------------------------------------------------------------------
# w = 1 is the plain iteration
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_default_is_plain_sinkhorn_exactly(dtype):
    M = _cost(3, 20, 15, seed=1, dtype=dtype)
    rows, cols = _masks(3, 20, 15, padded=True)
    r, c = uniform_marginals(rows, cols, dtype)
    P0, i0 = sinkhorn(M, r, c, lam=10.0, max_iter=500, tol=1e-6)
    P1, i1 = sinkhorn(M, r, c, lam=10.0, max_iter=500, tol=1e-6, overrelax=1.0)
    assert torch.equal(P0, P1) and torch.equal(i0.iterations, i1.iterations)
    assert torch.equal(i0.marginal_error, i1.marginal_error) and torch.equal(i0.status, i1.status)
    B0, j0 = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=500, tol=1e-6)
    B1, j1 = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=500, tol=1e-6, overrelax=1)
    assert torch.equal(B0, B1) and torch.equal(j0.iterations, j1.iterations)
    assert torch.equal(j0.marginal_error, j1.marginal_error)


# ------------------------------------------------------------------------------------------
# Same fixed point, within tol
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("w", WS)
def test_uniform_marginals_same_plan(w, dtype):
    tol = TOL[dtype]
    M = _cost(3, 40, 30, seed=2, dtype=dtype)
    r, c = uniform_marginals(*_masks(3, 40, 30), dtype)
    P1, i1 = sinkhorn(M, r, c, lam=10.0, max_iter=5000, tol=tol)
    Pw, iw = sinkhorn(M, r, c, lam=10.0, max_iter=5000, tol=tol, overrelax=w)
    _check_same_solution(P1, i1, Pw, iw, tol, M, 10.0, r, c)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("w", WS)
def test_bins_same_plan(w, padded, dtype):
    tol = TOL[dtype]
    M = _cost(3, 40, 30, seed=3, dtype=dtype)
    rows, cols = _masks(3, 40, 30, padded)
    P1, i1 = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=5000, tol=tol)
    Pw, iw = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=5000, tol=tol, overrelax=w)
    _check_same_solution(P1, i1, Pw, iw, tol, _augmented_cost(M, 1.0), 10.0, *bin_marginals(rows, cols, dtype))
    if padded:  # padding stays exactly zero
        assert (Pw[1, 3:7] == 0).all() and (Pw[2, :, -5:-1] == 0).all()


@pytest.mark.parametrize("lam", [50.0, 100.0])
@pytest.mark.parametrize("w", WS)
def test_large_lambda_with_absorption(w, lam):
    """Column offsets up to 5 leave the plan unchanged but need potentials up to lam * 5 > the
    float64 absorption threshold (0.25 log(max) = 177), so the kernel absorbs them."""
    tol = 1e-9
    B, m, n = 3, 40, 30
    M = _cost(B, m, n, seed=4)
    offset = 5 * torch.rand(B, 1, n, generator=_gen(5), dtype=F64)
    assert lam * float(offset.max() - offset.min()) > 0.25 * math.log(torch.finfo(F64).max)
    rows, cols = _masks(B, m, n, padded=True)
    r, c = uniform_marginals(rows, cols, F64)
    P1, i1 = sinkhorn(M + offset, r, c, lam=lam, max_iter=5000, tol=tol)
    Pw, iw = sinkhorn(M + offset, r, c, lam=lam, max_iter=5000, tol=tol, overrelax=w)
    _check_same_solution(P1, i1, Pw, iw, tol, M + offset, lam, r, c)
    P0, _ = sinkhorn(M, r, c, lam=lam, max_iter=5000, tol=tol, overrelax=w)
    # The same plan (the offsets are column constants): within both plans' error bounds.
    bound = sinkhorn_plan_bound(P0, M, lam, r, c, F64) + sinkhorn_plan_bound(Pw, M + offset, lam, r, c, F64)
    assert (_plan_gap(P0, Pw) <= bound).all()


@pytest.mark.parametrize("w", [1.5, 1.9])
def test_extreme_marginals_converge(w):
    """Marginals spread over four orders of magnitude: far-off starts where a relaxed step
    would overshoot, so the safeguard takes plain steps; the result is still the plain one."""
    B, m, n = 2, 30, 25
    r = torch.exp(3 * torch.randn(B, m, generator=_gen(6), dtype=F64))
    c = torch.exp(3 * torch.randn(B, n, generator=_gen(7), dtype=F64))
    r, c = r / r.sum(1, keepdim=True), c / c.sum(1, keepdim=True)
    M = _cost(B, m, n, seed=8)
    P1, i1 = sinkhorn(M, r, c, lam=20.0, max_iter=20000, tol=1e-9)
    Pw, iw = sinkhorn(M, r, c, lam=20.0, max_iter=20000, tol=1e-9, overrelax=w)
    _check_same_solution(P1, i1, Pw, iw, 1e-9, M, 20.0, r, c)


# ------------------------------------------------------------------------------------------
# Fewer iterations
# ------------------------------------------------------------------------------------------
def test_bins_need_fewer_iterations():
    # Over-relaxation of the plain bins iteration (balance=False; the bins' balance step removes
    # the slow mode itself, tests/nodes/test_sinkhorn_bins.py). Measured: 83 (w = 1) vs 18
    # (w = 1.5) for this item; at least halved is a safe margin.
    M = _cost(1, 100, 100, seed=0)
    rows, cols = _masks(1, 100, 100)
    _, i1 = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=2000, tol=1e-6, balance=False)
    _, iw = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=2000, tol=1e-6, overrelax=1.5, balance=False)
    assert int(iw.iterations) * 2 <= int(i1.iterations), (iw.iterations, i1.iterations)


# ------------------------------------------------------------------------------------------
# Gradients: the implicit backward sees the same plan
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [1.5, 1.8])
def test_gradients_equal_plain(w):
    B, m, n = 2, 8, 6
    M = _cost(B, m, n, seed=9)
    rows, cols = _masks(B, m, n)
    rows[1, 2] = False
    r, c = uniform_marginals(rows, cols, F64)
    G = torch.randn(B, m, n, generator=_gen(10), dtype=F64)

    def grads(overrelax):
        Mg, rg, cg = (x.clone().requires_grad_(True) for x in (M, r, c))
        P, info = sinkhorn(Mg, rg, cg, lam=5.0, max_iter=20000, tol=1e-12, overrelax=overrelax)
        assert (info.status == Status.OK).all()
        return torch.autograd.grad((P * G).sum(), (Mg, rg, cg))

    for g1, gw in zip(grads(1.0), grads(w)):
        torch.testing.assert_close(gw, g1, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("w", [1.5, 1.8])
def test_bin_gradients_equal_plain(w):
    B, m, n = 2, 7, 6
    M = _cost(B, m, n, seed=11)
    rows, cols = _masks(B, m, n)
    cols[0, 1] = False
    G = torch.randn(B, m + 1, n + 1, generator=_gen(12), dtype=F64)

    def grads(overrelax):
        Mg = M.clone().requires_grad_(True)
        g = torch.tensor([0.8, 1.1], dtype=F64, requires_grad=True)
        P, info = sinkhorn_with_bins(Mg, rows, cols, g, lam=5.0, max_iter=20000, tol=1e-12, overrelax=overrelax)
        assert (info.status == Status.OK).all()
        return torch.autograd.grad((P * G).sum(), (Mg, g))

    for g1, gw in zip(grads(1.0), grads(w)):
        torch.testing.assert_close(gw, g1, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Safeguard, per-item behaviour, statuses
# ------------------------------------------------------------------------------------------
def test_relaxed_scaling_safeguard():
    """Near the solution the relaxed scaling is taken; a step that would overshoot (a marginal
    1e6 times below its target) falls back to the plain scaling, per item."""
    w, tiny = 1.5, torch.finfo(F64).tiny
    kappa = 1.0 - 0.5 * w * (2.0 - w)
    r = torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]], dtype=F64)
    Ku = torch.ones(2, 3, dtype=F64)
    u = torch.tensor([[0.2 * (1 + 1e-3), 0.3 * (1 - 2e-3), 0.5], [0.2 * 1e-6, 0.3, 0.5]], dtype=F64)
    real = torch.ones(2, 3, dtype=torch.bool)
    out = _relaxed_scaling(u, Ku, r, real, w, kappa, tiny)
    plain = r / Ku
    torch.testing.assert_close(out[0], plain[0] * (u[0] * Ku[0] / r[0]) ** (1 - w), rtol=1e-15, atol=0)
    assert torch.equal(out[1], plain[1])
    # Exactly at the solution the step is the identity.
    out = _relaxed_scaling(r.clone(), Ku, r, real, w, kappa, tiny)
    torch.testing.assert_close(out, r, rtol=1e-15, atol=0)


def test_items_stop_individually():
    M = _cost(3, 30, 25, seed=13)
    rows, cols = _masks(3, 30, 25, padded=False)
    rows[1, :10] = False
    Pb, ib = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=2000, tol=1e-9, overrelax=1.5)
    assert len(set(ib.iterations.tolist())) > 1  # they do stop at different iterations
    for k in range(3):
        one = slice(k, k + 1)
        Pk, ik = sinkhorn_with_bins(M[one], rows[one], cols[one], 1.0, lam=10.0, max_iter=2000, tol=1e-9, overrelax=1.5)
        assert int(ik.iterations) == int(ib.iterations[k])
        torch.testing.assert_close(Pk[0], Pb[k], rtol=1e-12, atol=1e-15)


def test_degenerate_and_nonfinite_items():
    M = _cost(3, 6, 5, seed=14)
    M[2, 1, 1] = float("nan")
    rows, cols = _masks(3, 6, 5)
    rows[1] = False  # no real row: degenerate
    r, c = uniform_marginals(rows, cols, F64)
    P, info = sinkhorn(M, r, c, lam=10.0, max_iter=1000, tol=1e-10, overrelax=1.5)
    assert info.status.tolist() == [int(Status.OK), int(Status.DEGENERATE), int(Status.NONFINITE)]
    assert (P[1:] == 0).all() and torch.isfinite(P).all()
    P0, _ = sinkhorn(M[:1], r[:1], c[:1], lam=10.0, max_iter=1000, tol=1e-10, overrelax=1.5)
    torch.testing.assert_close(P[:1], P0, rtol=1e-12, atol=1e-15)


def test_max_iter_status_and_counts():
    M = _cost(2, 30, 30, seed=15)
    rows, cols = _masks(2, 30, 30)
    _, info = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=3, tol=1e-9, overrelax=1.5)
    assert (info.status == Status.MAX_ITER).all() and (info.iterations == 3).all()
    assert (info.marginal_error > 1e-9).all()


# ------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------
def test_unrolled_ignores_overrelax():
    M = _cost(2, 10, 8, seed=16)
    r, c = uniform_marginals(*_masks(2, 10, 8), F64)
    P0, i0 = sinkhorn(M, r, c, lam=10.0, max_iter=500, tol=1e-9, backward="unrolled")
    P1, i1 = sinkhorn(M, r, c, lam=10.0, max_iter=500, tol=1e-9, backward="unrolled", overrelax=1.5)
    assert torch.equal(P0, P1) and torch.equal(i0.iterations, i1.iterations)


@pytest.mark.parametrize("bad", [2.0, 0.99, 0.0, float("nan"), float("inf"), "1.5", True, None])
def test_bad_overrelax(bad):
    M = _cost(1, 3, 4)
    r, c = uniform_marginals(*_masks(1, 3, 4), F64)
    rows, cols = _masks(1, 3, 4)
    with pytest.raises(ValueError, match="overrelax"):
        sinkhorn(M, r, c, overrelax=bad)
    with pytest.raises(ValueError, match="overrelax"):
        sinkhorn(M, r, c, backward="unrolled", overrelax=bad)
    with pytest.raises(ValueError, match="overrelax"):
        sinkhorn_with_bins(M, rows, cols, 1.0, overrelax=bad)
    with pytest.raises(ValueError, match="overrelax"):
        SinkhornOT(overrelax=bad)
    with pytest.raises(ValueError, match="overrelax"):
        SinkhornOTWithBins(overrelax=bad)


def test_modules_pass_overrelax():
    M = _cost(2, 12, 10, seed=17)
    rows, cols = _masks(2, 12, 10)
    r, c = uniform_marginals(rows, cols, F64)
    layer = SinkhornOT(lam=10.0, max_iter=500, tol=1e-8, overrelax=1.5)
    assert "overrelax=1.5" in repr(layer) and "overrelax" not in repr(SinkhornOT())
    P, info = sinkhorn(M, r, c, lam=10.0, max_iter=500, tol=1e-8, overrelax=1.5)
    assert torch.equal(layer(M, r, c), P) and torch.equal(layer.last_info.iterations, info.iterations)
    layer = SinkhornOTWithBins(10.0, 500, 1e-8, bins="per_side", bin_init=1.0, overrelax=1.5).double()
    assert "overrelax=1.5" in repr(layer) and "overrelax" not in repr(SinkhornOTWithBins())
    P, info = sinkhorn_with_bins(M, rows, cols, layer.bin_cost.detach(), lam=10.0, max_iter=500, tol=1e-8, overrelax=1.5)
    assert torch.equal(layer(M, rows, cols), P) and torch.equal(layer.last_info.iterations, info.iterations)
