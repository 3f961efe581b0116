"""Sinkhorn OT with outlier bins: marginals, padding, gradients, inlier probabilities, status."""

import pytest
import torch

from bpnp.nodes import BinSplit, SinkhornOTWithBins, bin_marginals, sinkhorn_with_bins, split_bins
from bpnp.nodes.status import Status

F64 = torch.float64
# Tight solves so that the implicit gradient (exact at the fixed point) matches finite
# differences and the unrolled gradient; lam = 5 keeps the small problems well conditioned.
TIGHT = dict(lam=5.0, max_iter=10000, tol=1e-13)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cost(B, m, n, seed=0, dtype=F64):
    return 2 * torch.rand(B, m, n, generator=_gen(seed), dtype=dtype)


def _masks(B, m, n):
    return torch.ones(B, m, dtype=torch.bool), torch.ones(B, n, dtype=torch.bool)


def _padded_masks(B, m, n):
    """All real except item 1 (if any): row 1 and the last column padded."""
    rows, cols = _masks(B, m, n)
    if B > 1:
        rows[1, 1] = False
        cols[1, -1] = False
    return rows, cols


def test_marginals_of_the_plan():
    B, m, n = 3, 5, 7
    rows, cols = _masks(B, m, n)
    rows[1, [0, 3]] = False  # m' = 3, n' = 7
    cols[2, 2:5] = False  # m' = 5, n' = 4
    g = torch.tensor(1.0, dtype=F64)
    P, info = sinkhorn_with_bins(_cost(B, m, n), rows, cols, g, lam=10.0, max_iter=5000, tol=1e-13)
    assert (info.status == Status.OK).all()
    for b in range(B):
        mr, nr = int(rows[b].sum()), int(cols[b].sum())
        r = torch.cat([rows[b].to(F64), torch.tensor([nr], dtype=F64)]) / (mr + nr)
        c = torch.cat([cols[b].to(F64), torch.tensor([mr], dtype=F64)]) / (mr + nr)
        torch.testing.assert_close(P[b].sum(1), r, atol=1e-12, rtol=0)
        torch.testing.assert_close(P[b].sum(0), c, atol=1e-12, rtol=0)
        torch.testing.assert_close(P[b].sum(), torch.tensor(1.0, dtype=F64), atol=1e-12, rtol=0)
    assert (P[1, [0, 3]] == 0).all() and (P[2, :, 2:5] == 0).all()
    r, c = bin_marginals(rows, cols, F64)
    assert r.shape == (B, m + 1) and c.shape == (B, n + 1)


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
@pytest.mark.parametrize("shape", [(), (2,)])
def test_padded_item_equals_unpadded(backward, shape):
    m0, n0 = 4, 5
    M0 = _cost(1, m0, n0, seed=1)
    G0 = torch.randn(1, m0 + 1, n0 + 1, dtype=F64, generator=_gen(2))
    g0 = torch.tensor([0.9, 1.2], dtype=F64)[: 1 if shape == () else 2].reshape(shape)

    def solve(M, rows, cols, G):
        Mg, gg = M.clone().requires_grad_(True), g0.clone().requires_grad_(True)
        P, _ = sinkhorn_with_bins(Mg, rows, cols, gg, lam=10.0, max_iter=5000, tol=1e-13, backward=backward)
        return (P.detach(), *torch.autograd.grad((P * G).sum(), (Mg, gg)))

    P_ref, gM_ref, gb_ref = solve(M0, *_masks(1, m0, n0), G0)

    # Item 0: the same problem with padded rows 1 and 5, padded columns 2 and 6, NaN cost there
    # and a non-zero incoming gradient there; item 1: a real problem whose loss is zero.
    m, n = 6, 7
    ri, ci = torch.tensor([0, 2, 3, 4]), torch.tensor([0, 1, 3, 4, 5])
    rows, cols = _masks(2, m, n)
    rows[0] = False
    rows[0, ri] = True
    cols[0] = False
    cols[0, ci] = True
    M = torch.cat([torch.full((1, m, n), float("nan"), dtype=F64), _cost(1, m, n, seed=3)])
    M[0, ri[:, None], ci[None, :]] = M0[0]
    G = torch.zeros(2, m + 1, n + 1, dtype=F64)
    G[0] = 1.0
    ai, aj = torch.cat([ri, torch.tensor([m])]), torch.cat([ci, torch.tensor([n])])  # bins last
    G[0, ai[:, None], aj[None, :]] = G0[0]
    P, gM, gb = solve(M, rows, cols, G)

    torch.testing.assert_close(P[0, ai[:, None], aj[None, :]], P_ref[0], atol=1e-14, rtol=1e-10)
    torch.testing.assert_close(gM[0, ri[:, None], ci[None, :]], gM_ref[0], atol=1e-12, rtol=1e-8)
    torch.testing.assert_close(gb, gb_ref, atol=1e-12, rtol=1e-8)
    assert (P[0, [1, 5]] == 0).all() and (P[0, :, [2, 6]] == 0).all()
    assert (gM[0, [1, 5]] == 0).all() and (gM[0, :, [2, 6]] == 0).all()
    assert (gM[1] == 0).all()


@pytest.mark.parametrize("shape", [(), (2,)])
def test_gradcheck_cost_and_bin_cost(shape):
    M = _cost(2, 4, 5, seed=4).requires_grad_(True)
    rows, cols = _padded_masks(2, 4, 5)
    g = torch.tensor([0.8, 1.3], dtype=F64)[: 1 if shape == () else 2].reshape(shape).requires_grad_(True)

    def f(M, g):
        return sinkhorn_with_bins(M, rows, cols, g, backward="implicit", **TIGHT)[0]

    assert torch.autograd.gradcheck(f, (M, g), eps=1e-6, atol=1e-7)


def test_implicit_equals_unrolled():
    B, m, n = 3, 7, 9
    M = _cost(B, m, n, seed=5).requires_grad_(True)
    g = torch.tensor([0.7, 1.1], dtype=F64, requires_grad=True)
    rows, cols = _padded_masks(B, m, n)
    G = torch.randn(B, m + 1, n + 1, dtype=F64, generator=_gen(6))
    out = {}
    for mode in ("implicit", "unrolled"):
        P, info = sinkhorn_with_bins(M, rows, cols, g, lam=10.0, max_iter=5000, tol=1e-14, backward=mode)
        assert (info.status == Status.OK).all()
        out[mode] = (P, *torch.autograd.grad((P * G).sum(), (M, g)))
    for a, b in zip(out["implicit"], out["unrolled"]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_inlier_probabilities_follow_the_costs():
    # Rows 0-3 match columns 0-3 at cost 0; row 4 and columns 4, 5 cost 2 to everything.
    m, n = 5, 6
    M = torch.full((1, m, n), 2.0, dtype=F64)
    M[0, range(4), range(4)] = 0.0
    rows, cols = _masks(1, m, n)
    P, info = sinkhorn_with_bins(M, rows, cols, torch.tensor(1.0, dtype=F64), lam=10.0, max_iter=5000, tol=1e-9)
    assert info.status.tolist() == [Status.OK]
    s = split_bins(P, rows, cols)
    # Entropic blur at lam = 10: e^-10 per unit of cost gap, times the number of competitors.
    assert (s.row_inlier[0, :4] > 0.98).all() and s.row_inlier[0, 4] < 1e-4
    assert (s.col_inlier[0, :4] > 0.98).all() and (s.col_inlier[0, 4:] < 1e-4).all()
    torch.testing.assert_close(torch.diagonal(s.P[0])[:4], torch.full((4,), 0.25, dtype=F64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bin_cost, matched", [((0.5, 1.5), True), ((1.5, 0.5), True), ((0.7, 0.7), False)])
def test_pair_matched_iff_cheaper_than_mean_bin_cost(bin_cost, matched):
    # One pair at cost 0.8: matched iff 0.8 < (gamma_r + gamma_c) / 2 (the corner is the mean).
    M = torch.full((1, 1, 1), 0.8, dtype=F64)
    g = torch.tensor(bin_cost, dtype=F64)
    P, _ = sinkhorn_with_bins(M, *_masks(1, 1, 1), g, lam=100.0, max_iter=10000, tol=1e-12)
    p = float(split_bins(P, *_masks(1, 1, 1)).row_inlier)
    assert (p > 0.99) if matched else (p < 0.01)


def test_nonfinite_item_leaves_the_other_alone():
    M = _cost(2, 5, 6, seed=7)
    rows, cols = _masks(2, 5, 6)
    G = torch.randn(2, 6, 7, dtype=F64, generator=_gen(8))
    g = torch.tensor(1.0, dtype=F64)

    def solve(M, rows, cols, G):
        Mg, gg = M.clone().requires_grad_(True), g.clone().requires_grad_(True)
        P, info = sinkhorn_with_bins(Mg, rows, cols, gg, lam=10.0, max_iter=5000, tol=1e-12)
        return P.detach(), info, *torch.autograd.grad((P * G).sum(), (Mg, gg))

    P_solo, _, gM_solo, gb_solo = solve(M[:1], rows[:1], cols[:1], G[:1])
    M[1, 2, 3] = float("nan")
    P, info, gM, gb = solve(M, rows, cols, G)
    assert info.status.tolist() == [Status.OK, Status.NONFINITE]
    assert (P[1] == 0).all() and (gM[1] == 0).all()
    torch.testing.assert_close(P[:1], P_solo, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(gM[:1], gM_solo, atol=1e-13, rtol=1e-10)
    torch.testing.assert_close(gb, gb_solo, atol=1e-13, rtol=1e-10)


def test_degenerate_items_give_zero_plans():
    B, m, n = 3, 3, 4
    M = _cost(B, m, n, seed=9).requires_grad_(True)
    rows, cols = _masks(B, m, n)
    rows[1] = False  # no real row
    cols[2] = False  # no real column
    g = torch.tensor(1.0, dtype=F64, requires_grad=True)
    P, info = sinkhorn_with_bins(M, rows, cols, g)
    assert info.status.tolist() == [Status.OK, Status.DEGENERATE, Status.DEGENERATE]
    assert (P[1:] == 0).all()
    s = split_bins(P, rows, cols)
    assert (s.P[1:] == 0).all() and (s.row_inlier[1:] == 0).all() and (s.col_inlier[1:] == 0).all()
    loss = (P * P).sum() + s.P.sum() + s.row_inlier.sum() + s.col_inlier.sum()
    gM, gb = torch.autograd.grad(loss, (M, g))
    assert torch.isfinite(gM).all() and torch.isfinite(gb) and (gM[1:] == 0).all()


@pytest.mark.parametrize("max_iter", [3, 5000])
def test_split_bins(max_iter):
    B, m, n = 3, 6, 8
    rows, cols = _padded_masks(B, m, n)
    g = torch.tensor([0.6, 1.4], dtype=F64)
    P_aug, _ = sinkhorn_with_bins(_cost(B, m, n, seed=10), rows, cols, g, max_iter=max_iter, tol=1e-13)
    s = split_bins(P_aug, rows, cols)
    assert isinstance(s, BinSplit) and s.P_aug is P_aug
    assert s.P.shape == (B, m, n) and s.row_inlier.shape == (B, m) and s.col_inlier.shape == (B, n)
    torch.testing.assert_close(s.P.sum((1, 2)), torch.ones(B, dtype=F64), atol=1e-14, rtol=0)
    for x in (s.row_inlier, s.col_inlier):
        assert ((x >= 0) & (x <= 1)).all()
    assert s.row_inlier[1, 1] == 0 and (s.col_inlier[1, -1] == 0).all()
    if max_iter > 3:  # converged: row_inlier = 1 - (mass sent to the bin) / (row marginal)
        r, _ = bin_marginals(rows, cols, F64)
        expect = torch.where(rows, 1 - P_aug[:, :m, n] / r[:, :m].clamp_min(1e-300), torch.zeros_like(r[:, :m]))
        torch.testing.assert_close(s.row_inlier, expect, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bins, shape", [("shared", ()), ("per_side", (2,))])
def test_module(bins, shape):
    layer = SinkhornOTWithBins(lam=10.0, max_iter=500, bins=bins, bin_init=0.9).double()
    assert layer.bin_cost.shape == shape and (layer.bin_cost == torch.tensor(0.9).double()).all()
    assert f"bins={bins!r}" in repr(layer) and "lam=10.0" in repr(layer)
    M = _cost(2, 4, 5, seed=11)
    rows, cols = _padded_masks(2, 4, 5)
    P_aug = layer(M, rows, cols)
    assert P_aug.shape == (2, 5, 6) and layer.last_info.status.shape == (2,)
    split_bins(P_aug, rows, cols).row_inlier.sum().backward()
    assert layer.bin_cost.grad is not None and torch.isfinite(layer.bin_cost.grad).all()
    assert (layer.bin_cost.grad != 0).all()


def test_bad_input():
    M = _cost(2, 3, 4)
    rows, cols = _masks(2, 3, 4)
    g = torch.tensor(1.0, dtype=F64)
    with pytest.raises(ValueError, match="bin_cost"):
        sinkhorn_with_bins(M, rows, cols, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="mask_rows"):
        sinkhorn_with_bins(M, rows[:, :2], cols, g)
    with pytest.raises(ValueError, match="mask_cols"):
        sinkhorn_with_bins(M, rows, cols[:1], g)
    with pytest.raises(TypeError, match="mask_rows"):
        sinkhorn_with_bins(M, rows.double(), cols, g)
    with pytest.raises(ValueError, match=r"M must have shape"):
        sinkhorn_with_bins(M[0], rows, cols, g)
    with pytest.raises(ValueError, match="P_aug"):
        split_bins(M[0], rows, cols)
    with pytest.raises(ValueError, match=r"mask_rows must have shape \(2, 2\)"):
        split_bins(M, rows, cols)  # M is (2, 3, 4): a plan for m = 2, n = 3
    with pytest.raises(ValueError, match="bins"):
        SinkhornOTWithBins(bins="both")
    with pytest.raises(ValueError, match="backward"):
        SinkhornOTWithBins(backward="exact")


# --- the bins' balance step (sinkhorn_with_bins(balance=True), the default) -------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-10)])
@pytest.mark.parametrize("shape", [(), (2,)])
def test_balance_gives_the_plain_iterations_plan(dtype, tol, shape):
    """Same fixed point: with and without the balance step, both plans meet tol and agree
    within the sum of their a-posteriori bounds (tests/tolerances.py), padding included."""
    from tests.tolerances import marginal_rounding, plan_gap, sinkhorn_plan_bound

    from bpnp.nodes.sinkhorn import _augmented_cost

    B, m, n = 3, 40, 30
    M = _cost(B, m, n, seed=11, dtype=dtype)
    rows, cols = _padded_masks(B, m, n)
    rows[2, 25:] = False  # m' = 25 < n' = 30: the balance step's linear term is non-zero
    g = torch.tensor(1.0 if shape == () else [0.8, 1.2], dtype=dtype)
    P0, i0 = sinkhorn_with_bins(M, rows, cols, g, lam=10.0, max_iter=20000, tol=tol, balance=False)
    P1, i1 = sinkhorn_with_bins(M, rows, cols, g, lam=10.0, max_iter=20000, tol=tol, balance=True)
    slack = 2 * marginal_rounding(m + 1, n + 1, dtype)
    for info in (i0, i1):
        assert (info.marginal_error <= tol + slack).all(), info.marginal_error
    assert (i1.status == Status.OK).all(), i1.status
    A = _augmented_cost(M, g)
    r, c = bin_marginals(rows, cols, dtype)
    bound = sinkhorn_plan_bound(P0, A, 10.0, r, c, dtype) + sinkhorn_plan_bound(P1, A, 10.0, r, c, dtype)
    assert (plan_gap(P0, P1) <= bound).all(), (plan_gap(P0, P1), bound)
    assert (P1[1, 1] == 0).all() and (P1[1, :, n - 1] == 0).all() and (P1[2, 25:m] == 0).all()


def test_balance_removes_the_slow_mode():
    """The slow mode of the bins problem is the exchange of mass between the rows' and the
    columns' bin entries; with the exact step along it the bins problem converges in about as
    many iterations as the plain one. Measured here (float64, 200 x 200 U[0, 2], lam 10, tol
    1e-6): 87 plain, 5-6 with the step; 'at least 5x fewer' leaves room for rounding."""
    M = _cost(2, 200, 200, seed=12)
    rows, cols = _masks(2, 200, 200)
    _, i0 = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=2000, tol=1e-6, balance=False)
    _, i1 = sinkhorn_with_bins(M, rows, cols, 1.0, lam=10.0, max_iter=2000, tol=1e-6)
    assert (i1.status == Status.OK).all()
    assert (5 * i1.iterations <= i0.iterations).all(), (i0.iterations, i1.iterations)


def test_balance_step_maximises_the_dual_along_its_direction():
    """_balance_bins returns the maximiser of the concave dual along (bin column x, bin row
    1/x): moving the factor either way from it lowers the dual."""
    from bpnp.nodes.sinkhorn import _augmented_cost, _balance_bins

    B, m, n = 2, 12, 9
    M = _cost(B, m, n, seed=13)
    rows, cols = _masks(B, m, n)
    cols[1, 6:] = False
    r, c = bin_marginals(rows, cols, F64)
    K = torch.exp(-5.0 * _augmented_cost(M, torch.tensor(1.0, dtype=F64)))
    K = torch.where((r > 0)[:, :, None] & (c > 0)[:, None, :], K, torch.zeros_like(K))
    u = torch.rand(B, m + 1, generator=_gen(14), dtype=F64) * (r > 0) + 0.1 * (r > 0)
    v = torch.rand(B, n + 1, generator=_gen(15), dtype=F64) * (c > 0) + 0.1 * (c > 0)

    def dual(u, v):
        lu = torch.where(r > 0, torch.log(u.clamp_min(1e-300)), torch.zeros_like(u))
        lv = torch.where(c > 0, torch.log(v.clamp_min(1e-300)), torch.zeros_like(v))
        return (r * lu).sum(1) + (c * lv).sum(1) - (u[:, :, None] * K * v[:, None, :]).sum((1, 2))

    ub, vb = _balance_bins(u, v, K, r, c, torch.finfo(F64).tiny)
    torch.testing.assert_close(ub[:, :-1], u[:, :-1], rtol=0, atol=0)  # only the bins move
    torch.testing.assert_close(vb[:, :-1], v[:, :-1], rtol=0, atol=0)
    best = dual(ub, vb)
    assert (best >= dual(u, v)).all()
    for f in (0.9, 1.1):
        moved_u = torch.cat([ub[:, :-1], ub[:, -1:] / f], 1)
        moved_v = torch.cat([vb[:, :-1], vb[:, -1:] * f], 1)
        assert (dual(moved_u, moved_v) < best).all()
