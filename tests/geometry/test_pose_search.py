"""Pose search (bpnp.geometry.pose_search): re-matching from a pose recovers the true matches
and the pose where the soft matches carry no information; the best hypothesis is kept; padding
and inputs; RANSAC's top hypotheses."""

import math

import pytest
import torch

from bpnp.geometry.pose_search import pose_search, rematch
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
