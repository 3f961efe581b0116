"""Pose search (bpnp.geometry.pose_search): re-matching from a pose recovers the true matches
and the pose where the soft matches carry no information; the best hypothesis is kept; padding
and inputs; RANSAC's top hypotheses; re-ranking the starts by row support."""

import math

import pytest
import torch

from bpnp.geometry.pose_search import pose_search, rematch, rerank_by_row_support, row_support
from bpnp.geometry.ransac import ransac_pnp
from bpnp.geometry.rotations import geodesic_angle, so3_exp
from tests.geometry.test_ransac import make_scene, one_hot_P

F64 = torch.float64


def _perturbed(s, deg, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(s["R"].shape[0], 3, generator=g, dtype=F64)
    w = w / w.norm(dim=-1, keepdim=True) * math.radians(deg)
    return so3_exp(w) @ s["R"], s["t"].clone()


def _uniform_P(s):
    b, m, n = s["bearings"].shape[0], s["bearings"].shape[1], s["X"].shape[1]
    return torch.full((b, m, n), 1.0 / (m * n), dtype=F64)


def test_rematch_from_the_true_pose_finds_the_true_pairs():
    s = make_scene(2, 60, n_extra3d=30, seed=1)
    b, X = s["bearings"].double(), s["X"].double()
    matches, prior = rematch(_uniform_P(s), b, X, s["mask2d"], s["mask3d"], s["R"], s["t"], 0.002, 0.0)
    assert (matches == s["match"]).float().mean() > 0.95  # float32 points: a few near-ties
    assert (prior[matches >= 0] > 0).all()


def test_rematch_of_k_poses_per_item_equals_one_call_per_pose():
    """The (b, k) form pose_search uses (k poses against one P, with w log P formed once) gives
    exactly the per-pose calls' matches and priors."""
    s = make_scene(2, 50, n_extra3d=20, seed=5)
    b, X = s["bearings"].double(), s["X"].double()
    P = torch.rand(2, 50, 70, generator=torch.Generator().manual_seed(6), dtype=F64) + 1e-3
    poses = [_perturbed(s, deg, seed) for deg, seed in ((0.0, 7), (0.5, 8), (2.0, 9))]
    R = torch.stack([p[0] for p in poses], 1)
    t = torch.stack([p[1] for p in poses], 1)
    lp = 0.7 * torch.log(P)
    mk, pk = rematch(P, b, X, s["mask2d"], s["mask3d"], R, t, 0.02, 0.7, log_prior=lp)
    assert mk.shape == (2, 3, 50) and pk.shape == (2, 3, 50)
    for i, (Ri, ti) in enumerate(poses):
        m1, p1 = rematch(P, b, X, s["mask2d"], s["mask3d"], Ri, ti, 0.02, 0.7)
        assert torch.equal(mk[:, i], m1)
        torch.testing.assert_close(pk[:, i], p1, rtol=0, atol=0)


def test_rematch_refuses_a_gate_outside_zero_to_a_right_angle():
    s = make_scene(1, 10, seed=10)
    for gate in (0.0, math.pi / 2, 2.0):
        with pytest.raises(ValueError, match="gate must lie in"):
            rematch(_uniform_P(s), s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"],
                    s["R"], s["t"], gate, 0.0)


def test_search_recovers_the_pose_without_learned_matches():
    """From 2 degrees off, with a P that says nothing, the geometry alone finds the pose."""
    s = make_scene(3, 80, n_extra3d=40, noise=1e-4, seed=2)
    R0, t0 = _perturbed(s, 2.0, seed=3)
    res = pose_search(_uniform_P(s), s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"],
                      R0[:, None], t0[:, None], iterations=4, threshold=0.002, start_threshold=0.06)
    err = torch.rad2deg(geodesic_angle(res.R, s["R"]))
    assert (err < 0.05).all(), err
    assert (res.consensus >= 70).all() and (res.hypothesis == 0).all()
    assert ((res.matches == s["match"]) | (res.matches < 0)).float().mean() > 0.95


def test_the_hypothesis_with_the_largest_consensus_wins():
    s = make_scene(2, 60, seed=4)
    Rg, tg = _perturbed(s, 1.0, seed=5)
    Rb, tb = _perturbed(s, 60.0, seed=6)
    R_init = torch.stack([Rb, Rg], 1)  # the good one second
    t_init = torch.stack([tb, tg], 1)
    res = pose_search(_uniform_P(s), s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"],
                      R_init, t_init, threshold=0.002, start_threshold=0.04)
    assert res.hypothesis.tolist() == [1, 1]
    assert (torch.rad2deg(geodesic_angle(res.R, s["R"])) < 0.05).all()


def test_prior_weight_breaks_geometric_ties_towards_P():
    """Two 3D points on the same ray: geometry cannot choose, P can."""
    s = make_scene(1, 20, seed=7)
    X = s["X"].double()
    c = -(s["R"][0].T @ s["t"][0])
    twin = c + 1.3 * (X[0, 0] - c)  # same ray as point 0, farther away
    X2 = torch.cat([X, twin[None, None]], 1)
    P = one_hot_P(1, 20, 21).double()
    m3 = torch.ones(1, 21, dtype=torch.bool)
    geo, _ = rematch(torch.full_like(P, 1 / 420), s["bearings"].double(), X2, s["mask2d"], m3, s["R"], s["t"], 0.01, 0.0)
    learned, _ = rematch(P + 1e-6, s["bearings"].double(), X2, s["mask2d"], m3, s["R"], s["t"], 0.01, 1.0)
    assert learned[0, 0] == 0 and geo[0, 0] in (0, 20)
    assert (learned == s["match"]).all()


def test_padding_does_not_change_the_result():
    s = make_scene(1, 40, n_extra3d=10, seed=8)
    R0, t0 = _perturbed(s, 1.5, seed=9)
    P = _uniform_P(s)
    a = pose_search(P, s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"], R0[:, None], t0[:, None],
                    threshold=0.002)
    pad2, pad3 = 7, 5
    bp = torch.cat([s["bearings"].double(), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=F64).expand(1, pad2, 3)], 1)
    Xp = torch.cat([s["X"].double(), torch.zeros(1, pad3, 3, dtype=F64)], 1)
    Pp = torch.nn.functional.pad(P, (0, pad3, 0, pad2), value=1.0)
    m2 = torch.cat([s["mask2d"], torch.zeros(1, pad2, dtype=torch.bool)], 1)
    m3 = torch.cat([s["mask3d"], torch.zeros(1, pad3, dtype=torch.bool)], 1)
    b = pose_search(Pp, bp, Xp, m2, m3, R0[:, None], t0[:, None], threshold=0.002)
    torch.testing.assert_close(a.R, b.R, rtol=0, atol=1e-12)
    assert torch.equal(a.matches, b.matches[:, :40]) and (b.matches[:, 40:] == -1).all()
    assert torch.equal(a.consensus, b.consensus)


def test_ransac_returns_its_best_hypotheses_first():
    s = make_scene(2, 50, seed=10)
    P = one_hot_P(2, 50, 50)
    res = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], num_hypotheses=32, top_hypotheses=4,
                     generator=torch.Generator().manual_seed(0))
    assert res.R_top.shape == (2, 4, 3, 3) and res.t_top.shape == (2, 4, 3)
    assert torch.equal(res.R_top[:, 0], res.R) and torch.equal(res.t_top[:, 0], res.t)
    one = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], num_hypotheses=32,
                     generator=torch.Generator().manual_seed(0))
    assert one.R_top is None and torch.equal(one.R, res.R)
    with pytest.raises(ValueError, match="top_hypotheses"):
        ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], top_hypotheses=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"iterations": 0}, "iterations"),
    ({"threshold": 0.05, "start_threshold": 0.01}, "start_threshold"),
    ({"prior_weight": -1.0}, "prior_weight"),
])
def test_bad_options_are_named(kwargs, match):
    s = make_scene(1, 10, seed=0)
    with pytest.raises(ValueError, match=match):
        pose_search(_uniform_P(s), s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"],
                    s["R"][:, None], s["t"][:, None], **kwargs)
    with pytest.raises(ValueError, match="R_init"):
        pose_search(_uniform_P(s), s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"], s["R"], s["t"])


def test_rematch_stays_one_to_one_when_rows_tie():
    """A duplicated keypoint (same bearing, same row of P) ties for its 3D partner: the lower
    index keeps it, the copy gets none."""
    s = make_scene(1, 30, seed=21)
    b, X = s["bearings"].double().clone(), s["X"].double()
    b[0, 7] = b[0, 3]
    P = _uniform_P(s)
    P[0, 7] = P[0, 3]
    matches, _ = rematch(P, b, X, s["mask2d"], s["mask3d"], s["R"], s["t"], 0.01, 1.0)
    assert int(matches[0, 3]) == 3 and int(matches[0, 7]) == -1
    real = matches[matches >= 0]
    assert real.unique().numel() == real.numel()


def _row_support_by_loops(P, bearings, X, mask2d, mask3d, R, t, partners, threshold):
    """Row support from its definition, one pose and one 2D point at a time (float64)."""
    b, k = R.shape[:2]
    out = torch.zeros(b, k, dtype=torch.long)
    for i in range(b):
        thr = float(threshold[i]) if isinstance(threshold, torch.Tensor) else threshold
        rows = mask2d[i].nonzero()[:, 0].tolist()
        cols = mask3d[i].nonzero()[:, 0]
        for h in range(k):
            x = X[i, cols].double() @ R[i, h].double().T + t[i, h].double()
            for r in rows:
                p = P[i, r, cols]
                top = p.topk(min(partners, len(cols))).indices
                top = top[p[top] > 0]
                cos = (torch.nn.functional.normalize(x[top], dim=-1) @ bearings[i, r].double())
                out[i, h] += bool(((cos > math.cos(thr)) & (x[top, 2] > 0)).any())
    return out


def test_row_support_counts_the_rows_with_a_likely_partner_within_the_gate():
    """Against the definition by loops: random P with padding, poses 0-3 degrees off, one gate per
    item, the chunked evaluation equal to the whole."""
    s = make_scene(2, 30, n_extra3d=15, noise=1e-3, seed=11)
    b, X = s["bearings"].double(), s["X"].double()
    P = torch.rand(2, 30, 45, generator=torch.Generator().manual_seed(12), dtype=F64)
    m2, m3 = s["mask2d"].clone(), s["mask3d"].clone()
    m2[1, 25:] = False
    m3[0, 40:] = False
    poses = [_perturbed(s, deg, seed) for deg, seed in ((0.0, 1), (0.5, 2), (1.0, 3), (3.0, 4))]
    R = torch.stack([p[0] for p in poses], 1)
    t = torch.stack([p[1] for p in poses], 1)
    gate = torch.tensor([0.01, 0.03], dtype=F64)
    for partners in (1, 4):
        got = row_support(P, b, X, m2, m3, R, t, partners=partners, threshold=gate)
        assert torch.equal(got, _row_support_by_loops(P, b, X, m2, m3, R, t, partners, gate))
        chunked = row_support(P, b, X, m2, m3, R, t, partners=partners, threshold=gate, chunk=1)
        assert torch.equal(got, chunked)
    # With the true matches most probable, the true pose is supported by every real row.
    exact = one_hot_P(2, 30, 45).double()
    at_truth = row_support(exact, b, X, s["mask2d"], s["mask3d"], s["R"][:, None], s["t"][:, None],
                           partners=1, threshold=0.01)
    assert at_truth.tolist() == [[30], [30]]


def test_row_support_marks_a_non_finite_pose_and_refuses_bad_options():
    s = make_scene(1, 20, seed=13)
    R = torch.stack([s["R"], torch.full_like(s["R"], float("nan"))], 1)
    t = torch.stack([s["t"], s["t"]], 1)
    P = one_hot_P(1, 20, 20).double()
    got = row_support(P, s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"], R, t,
                      partners=2, threshold=0.01)
    assert got.tolist() == [[20, -1]]
    with pytest.raises(ValueError, match="partners"):
        row_support(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], R, t, partners=0, threshold=0.01)
    with pytest.raises(ValueError, match="threshold"):
        row_support(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], R, t, partners=2, threshold=2.0)


def test_rerank_keeps_the_best_supported_poses_in_order_and_ties_in_pool_order():
    s = make_scene(1, 40, seed=14)
    bad1, bad2 = _perturbed(s, 40.0, 15), _perturbed(s, 70.0, 16)
    near = _perturbed(s, 0.2, 17)
    pool = [bad1, near, bad2, bad2]  # the two last tie exactly
    R = torch.stack([p[0] for p in pool], 1)
    t = torch.stack([p[1] for p in pool], 1)
    args = (one_hot_P(1, 40, 40).double(), s["bearings"].double(), s["X"].double(), s["mask2d"], s["mask3d"])
    support = row_support(*args, R, t, partners=1, threshold=0.01)
    R2, t2 = rerank_by_row_support(*args, R, t, 4, partners=1, threshold=0.01)
    order = sorted(range(4), key=lambda h: (-int(support[0, h]), h))
    assert order[0] == 1
    assert torch.equal(R2[0], R[0, order]) and torch.equal(t2[0], t[0, order])
    with pytest.raises(ValueError, match="keep"):
        rerank_by_row_support(*args, R, t, 5, partners=1, threshold=0.01)


@pytest.mark.parametrize("per_item_gate", [False, True])
def test_rematch_in_row_blocks_is_the_whole_matrix(per_item_gate):
    """Scoring the rows in blocks (``chunk``: one row, a partial last block, all rows at once)
    gives the same matches and priors: each block's row maxima and the running column maxima
    are those of the whole (b, k, m, n) score."""
    s = make_scene(2, 37, n_extra3d=11, seed=6)
    b, X = s["bearings"].double(), s["X"].double()
    g = torch.Generator().manual_seed(3)
    P = torch.rand(2, 37, 48, generator=g, dtype=torch.float64)
    k = 3
    R = s["R"][:, None].expand(2, k, 3, 3).clone()
    t = s["t"][:, None].expand(2, k, 3) + 0.01 * torch.randn(2, k, 3, generator=g, dtype=torch.float64)
    gate = torch.tensor([0.03, 0.05], dtype=torch.float64) if per_item_gate else 0.04
    whole = rematch(P, b, X, s["mask2d"], s["mask3d"], R, t, gate, 0.6, chunk=k * 37 * 48)
    assert (whole[0] >= 0).sum() > 20  # not a vacuous comparison
    for chunk in (1, k * 48, 5 * k * 48):
        got = rematch(P, b, X, s["mask2d"], s["mask3d"], R, t, gate, 0.6, chunk=chunk)
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])


def test_select_by_consensus_keeps_the_pose_with_most_mutual_matches_and_never_a_non_finite_one():
    """Of a pose 30 degrees off, the true pose and a NaN pose, the true one is selected; its
    consensus is the count of :func:`rematch`'s matches there; an item whose only other candidate
    is NaN keeps the finite one."""
    from bpnp.geometry.pose_search import select_by_consensus

    g = torch.Generator().manual_seed(3)
    b, n = 2, 60
    X = torch.randn(b, n, 3, generator=g, dtype=torch.float64) + torch.tensor([0.0, 0.0, 6.0])
    bearings = torch.nn.functional.normalize(X, dim=-1)           # true pose: identity
    P = torch.full((b, n, n), 1.0 / n ** 2, dtype=torch.float64)
    mask = torch.ones(b, n, dtype=torch.bool)
    eye = torch.eye(3, dtype=torch.float64)
    a = math.radians(30.0)
    off = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]],
                       dtype=torch.float64)
    nan = torch.full((3, 3), float("nan"), dtype=torch.float64)
    R = torch.stack([torch.stack([off, eye, nan]), torch.stack([nan, off, eye])])
    t = torch.zeros(b, 3, 3, dtype=torch.float64)
    res = select_by_consensus(P, bearings, X, mask, mask, R, t, threshold=0.01)
    assert res.hypothesis.tolist() == [1, 2]
    torch.testing.assert_close(res.R, torch.stack([eye, eye]), rtol=0, atol=0)
    matches, _ = rematch(P, bearings, X, mask, mask, torch.stack([eye, eye]), t[:, 0], 0.01, 1.0)
    assert res.consensus.tolist() == (matches >= 0).sum(1).tolist() == [n, n]
    assert torch.equal(res.matches, matches)
    with pytest.raises(ValueError, match="R must have shape"):
        select_by_consensus(P, bearings, X, mask, mask, R[:, 0], t, threshold=0.01)
