"""Sinkhorn OT node: marginals, padding, float32 stability, implicit vs unrolled, gradcheck."""

import pytest
import torch

from bpnp.nodes.sinkhorn import SinkhornOT, sinkhorn, uniform_marginals
from bpnp.nodes.status import Status
from tests.tolerances import marginal_rounding, plan_gap, sinkhorn_plan_bound


def _masks(B, m, n):
    return torch.ones(B, m, dtype=torch.bool), torch.ones(B, n, dtype=torch.bool)


def _cost(B, m, n, seed=0, dtype=torch.float64):
    return 2 * torch.rand(B, m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_marginals_met_and_mass_one():
    M = _cost(3, 5, 8)
    r, c = uniform_marginals(*_masks(3, 5, 8), dtype=torch.float64)
    P, info = sinkhorn(M, r, c, lam=10.0, max_iter=1000, tol=1e-10)
    torch.testing.assert_close(P.sum(2), r, atol=1e-9, rtol=0)
    torch.testing.assert_close(P.sum(1), c, atol=1e-12, rtol=0)
    assert info.converged.all() and (info.status == Status.OK).all()
    assert (info.marginal_error <= 1e-10).all()


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_float32_stable_large_lambda(backward):
    M = _cost(2, 30, 40, dtype=torch.float32)
    r, c = uniform_marginals(*_masks(2, 30, 40))
    tol = 1e-4
    P, info = sinkhorn(M, r, c, lam=100.0, max_iter=2000, tol=tol, backward=backward)
    assert torch.isfinite(P).all()
    assert info.converged.all()
    # Converged: the node's measured error is <= tol; this second float32 evaluation of the same
    # sums differs from it by at most twice their rounding (each within gamma_(n+2) of exact).
    assert ((P.sum(2) - r).abs().sum(1) <= tol + 2 * marginal_rounding(30, 40, torch.float32)).all()
    P64, _ = sinkhorn(M.double(), r.double(), c.double(), lam=100.0, max_iter=2000, tol=tol)
    # Both plans are within their a-posteriori bounds (entry rounding + condition of the marginal
    # map x residual, tests/tolerances.py) of the exact plan of these inputs, hence of each other.
    bound = sinkhorn_plan_bound(P, M, 100.0, r, c, torch.float32) + sinkhorn_plan_bound(P64, M, 100.0, r, c, torch.float64)
    assert (plan_gap(P, P64) <= bound).all(), (plan_gap(P, P64), bound)
    Mg = M.clone().requires_grad_(True)
    P2, _ = sinkhorn(Mg, r, c, lam=100.0, max_iter=2000, tol=1e-4, backward=backward)
    (g,) = torch.autograd.grad((P2 * torch.randn_like(P2)).sum(), Mg)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("where", ["rows", "cols"])
def test_padding_in_the_middle_changes_nothing(where):
    m, n = 5, 6
    M = _cost(1, m, n, seed=1)
    r, c = uniform_marginals(*_masks(1, m, n), dtype=torch.float64)
    G = torch.randn(1, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Mr = M.clone().requires_grad_(True)
    P_ref, _ = sinkhorn(Mr, r, c, tol=1e-12, max_iter=2000)
    (g_ref,) = torch.autograd.grad((P_ref * G).sum(), Mr)

    # Insert a padded row/column at index 2 with garbage cost.
    if where == "rows":
        Mp = torch.cat([M[:, :2], torch.full((1, 1, n), 7.0, dtype=M.dtype), M[:, 2:]], 1)
        rp = torch.cat([r[:, :2], torch.zeros(1, 1, dtype=r.dtype), r[:, 2:]], 1)
        cp = c
        Gp = torch.cat([G[:, :2], torch.ones(1, 1, n, dtype=G.dtype), G[:, 2:]], 1)
        keep = (slice(None), [0, 1, 3, 4, 5], slice(None))
    else:
        Mp = torch.cat([M[:, :, :2], torch.full((1, m, 1), 7.0, dtype=M.dtype), M[:, :, 2:]], 2)
        rp = r
        cp = torch.cat([c[:, :2], torch.zeros(1, 1, dtype=c.dtype), c[:, 2:]], 1)
        Gp = torch.cat([G[:, :, :2], torch.ones(1, m, 1, dtype=G.dtype), G[:, :, 2:]], 2)
        keep = (slice(None), slice(None), [0, 1, 3, 4, 5, 6])
    Mp.requires_grad_(True)
    P_pad, _ = sinkhorn(Mp, rp, cp, tol=1e-12, max_iter=2000)
    (g_pad,) = torch.autograd.grad((P_pad * Gp).sum(), Mp)
    torch.testing.assert_close(P_pad[keep], P_ref, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(g_pad[keep], g_ref, atol=1e-10, rtol=1e-7)
    pad = (slice(None), 2, slice(None)) if where == "rows" else (slice(None), slice(None), 2)
    assert (P_pad[pad] == 0).all() and (g_pad[pad] == 0).all()


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_gradcheck_cost(shape):
    m, n = shape
    M = _cost(2, m, n, seed=3).requires_grad_(True)
    r, c = uniform_marginals(*_masks(2, m, n), dtype=torch.float64)

    def f(M):
        return sinkhorn(M, r, c, lam=5.0, max_iter=10000, tol=1e-13)[0]

    assert torch.autograd.gradcheck(f, (M,), eps=1e-6, atol=1e-7)


def test_gradcheck_marginals():
    M = _cost(2, 4, 5, seed=4)
    g = torch.Generator().manual_seed(5)
    r_raw = (torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    c_raw = (torch.rand(2, 5, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)

    def f(r_raw, c_raw):
        # Normalising keeps every perturbation feasible (equal mass); the gauge freedom of the
        # marginal gradients cancels through the normalisation.
        r = r_raw / r_raw.sum(1, keepdim=True)
        c = c_raw / c_raw.sum(1, keepdim=True)
        return sinkhorn(M, r, c, lam=5.0, max_iter=10000, tol=1e-13)[0]

    assert torch.autograd.gradcheck(f, (r_raw, c_raw), eps=1e-6, atol=1e-7)


def test_implicit_equals_unrolled_at_convergence():
    M = _cost(3, 7, 9, seed=6).requires_grad_(True)
    r, c = uniform_marginals(*_masks(3, 7, 9), dtype=torch.float64)
    G = torch.randn(3, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    Pi, _ = sinkhorn(M, r, c, lam=10.0, max_iter=5000, tol=1e-14, backward="implicit")
    Pu, _ = sinkhorn(M, r, c, lam=10.0, max_iter=5000, tol=1e-14, backward="unrolled")
    torch.testing.assert_close(Pi, Pu)
    (gi,) = torch.autograd.grad((Pi * G).sum(), M)
    (gu,) = torch.autograd.grad((Pu * G).sum(), M)
    torch.testing.assert_close(gi, gu, atol=1e-9, rtol=1e-6)


def test_items_independent_and_per_item_iterations():
    M = _cost(2, 6, 6, seed=8)
    r, c = uniform_marginals(*_masks(2, 6, 6), dtype=torch.float64)
    M2 = M.clone()
    M2[1] = 0.5 * M2[1] ** 3  # change item 1 only
    P1, i1 = sinkhorn(M, r, c, tol=1e-9, max_iter=1000)
    P2, i2 = sinkhorn(M2, r, c, tol=1e-9, max_iter=1000)
    assert torch.equal(P1[0], P2[0]) and i1.iterations[0] == i2.iterations[0]


def test_all_padding_item_and_nonfinite_cost():
    M = _cost(3, 4, 4, seed=9)
    rm, cm = _masks(3, 4, 4)
    rm[1] = False
    cm[1] = False
    M[2, 0, 0] = float("nan")
    r, c = uniform_marginals(rm, cm, dtype=torch.float64)
    Mg = M.clone().requires_grad_(True)
    P, info = sinkhorn(Mg, r, c)
    assert (P[1] == 0).all() and (P[2] == 0).all()
    assert info.status.tolist()[2] == Status.NONFINITE
    (g,) = torch.autograd.grad(P.sum() + (P * P).sum(), Mg)
    assert torch.isfinite(g).all() and (g[1] == 0).all()


def test_max_iter_status_and_module():
    M = _cost(1, 20, 20, seed=10)
    r, c = uniform_marginals(*_masks(1, 20, 20), dtype=torch.float64)
    layer = SinkhornOT(lam=50.0, max_iter=2, tol=1e-12)
    P = layer(M, r, c)
    assert layer.last_info.status.tolist() == [Status.MAX_ITER] and torch.isfinite(P).all()


def test_bad_input():
    M = _cost(1, 3, 3)
    r, c = uniform_marginals(*_masks(1, 3, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match="equal mass"):
        sinkhorn(M, r, 2 * c)
    with pytest.raises(ValueError, match=r"shape \(B, m, n\)"):
        sinkhorn(M[0], r, c)
    with pytest.raises(ValueError, match="non-negative"):
        sinkhorn(M, -r, -c)
