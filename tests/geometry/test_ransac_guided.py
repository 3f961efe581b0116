"""Guided hypothesis sampling of :func:`bpnp.geometry.ransac_pnp` (``guided`` > 0): a P-drawn
pair and three of its consistent neighbours (nearest in 2D and in 3D)."""

import pytest
import torch

from bpnp.geometry.ransac import _consistent_neighbours, _guided_samples, _nearest, _neighbour_distances, ransac_pnp
from bpnp.geometry.rotations import geodesic_angle
from tests.geometry.test_ransac import make_scene


def consistent_relation(bearings, points, mask2d, mask3d, ci, cj, cvalid, k):
    """The definition, densely: (b, K, K) bool, ``C[c, c']`` iff the 2D point of ``c'`` is among
    the ``k`` nearest of ``c``'s and its 3D point among the ``k`` nearest of ``c``'s, both valid."""
    d2, d3 = _neighbour_distances(bearings, points, mask2d, mask3d)
    A2, A3 = (torch.zeros(d.shape, dtype=torch.bool).scatter_(2, *_nearest(d, k)) for d in (d2, d3))
    bidx = torch.arange(ci.shape[0])[:, None, None]
    C = A2[bidx, ci[:, :, None], ci[:, None, :]] & A3[bidx, cj[:, :, None], cj[:, None, :]]
    return C & cvalid[:, :, None] & cvalid[:, None, :]


def lists_to_relation(nbr, ok, K):
    """(b, K, K) bool from neighbour lists; asserts that no neighbour is listed twice."""
    counts = torch.zeros(*nbr.shape[:2], K, dtype=torch.long).scatter_add_(2, nbr, ok.long())
    assert counts.max() <= 1
    return counts > 0


def relation_to_lists(C):
    """Neighbour lists (b, K, L) of a dense relation, its True entries first."""
    L = max(3, int(C.sum(-1).max()))
    nbr = C.to(torch.uint8).topk(min(L, C.shape[2]), dim=2).indices
    return nbr, torch.gather(C, 2, nbr)


def _candidates(s, wrong_per_point, seed):
    """P with, per 2D point, its true pair and ``wrong_per_point`` random wrong pairs, all of equal
    weight: only 1 / (1 + wrong_per_point) of the candidates are true."""
    b, m = s["match"].shape
    n = s["X"].shape[1]
    g = torch.Generator().manual_seed(seed)
    P = torch.zeros(b, m, n)
    P[:, torch.arange(m), torch.arange(m)] = 1.0
    wrong = (torch.arange(m)[None, :, None] + torch.randint(1, n, (b, m, wrong_per_point), generator=g)) % n
    P.scatter_(2, wrong, 1.0)
    return P / P.sum((1, 2), keepdim=True)


def test_consistent_neighbours_of_true_pairs_are_mostly_true():
    s = make_scene(2, 120, seed=3)
    b, m = s["match"].shape
    n = s["X"].shape[1]
    P = _candidates(s, 4, seed=1)
    flat = P.flatten(1).topk(m * 5, dim=1).indices
    ci, cj = flat // n, flat % n
    valid = torch.ones_like(ci, dtype=torch.bool)
    args = (s["bearings"], s["X"], s["mask2d"], s["mask3d"], ci, cj)
    C = lists_to_relation(*_consistent_neighbours(*args, valid, 16), ci.shape[1])
    true = ci == cj
    # Never itself, nor a pair sharing its 2D or 3D point.
    assert not (C & ((ci[:, :, None] == ci[:, None, :]) | (cj[:, :, None] == cj[:, None, :]))).any()
    base = true.float().mean()  # 1 in 5 candidates is true
    frac_true = (C & true[:, :, None] & true[:, None, :]).sum() / C[true].sum()
    # A true pair's consistent neighbours: its neighbours' true pairs (all of them, on this
    # smooth scene) plus the wrong pairs whose random 3D point happens to be near (about
    # 16 / 120 of them), so well over twice the base rate are true.
    assert frac_true > 2.5 * base
    # A wrong pair's are random pairs: about the base rate are true.
    frac_true_of_wrong = (C & ~true[:, :, None] & true[:, None, :]).sum() / C[~true].sum()
    assert frac_true_of_wrong < 1.5 * base
    # An invalid candidate has no consistent neighbours and is nobody's.
    valid[:, 0] = False
    C2 = lists_to_relation(*_consistent_neighbours(*args, valid, 16), ci.shape[1])
    assert not C2[:, 0].any() and not C2[:, :, 0].any()


@pytest.mark.parametrize("crowded", ["2d", "3d"])
def test_neighbour_lists_are_the_dense_relation(crowded):
    """The lists hold exactly the consistent neighbours of the definition, when several
    candidates share a 2D point (grouped by 3D points then) or a 3D point, with invalid
    candidates and padded points."""
    s = make_scene(3, 50, n_extra3d=10, seed=11)
    b, m = s["match"].shape
    n = s["X"].shape[1]
    g = torch.Generator().manual_seed(2)
    K = 150
    # Few distinct points on the crowded side: up to about 10 candidates each.
    few = torch.randint(0, 15, (b, K), generator=g)
    many_2d, many_3d = torch.randint(0, m, (b, K), generator=g), torch.randint(0, n, (b, K), generator=g)
    ci, cj = (few, many_3d) if crowded == "2d" else (many_2d, few)
    valid = torch.rand(b, K, generator=g) > 0.1
    mask2d, mask3d = s["mask2d"].clone(), s["mask3d"].clone()
    mask2d[0, -5:] = False  # padding: never a neighbour
    mask3d[1, -7:] = False
    for k in (3, 8):
        args = (s["bearings"], s["X"], mask2d, mask3d, ci, cj, valid, k)
        nbr, ok = _consistent_neighbours(*args)
        assert ok.shape[2] == max(3, int(ok.sum(-1).max()))
        assert torch.equal(lists_to_relation(nbr, ok, K), consistent_relation(*args))


def test_guided_samples_stay_among_the_seeds_consistent_neighbours():
    g = torch.Generator().manual_seed(0)
    b, K, Hg = 2, 30, 50
    C = torch.rand(b, K, K, generator=g) < 0.3
    C &= ~torch.eye(K, dtype=torch.bool)
    C[:, 5] = False  # a candidate with no consistent neighbours
    w = torch.rand(b, K, generator=g, dtype=torch.float64)
    w[:, 7] = 0.0  # weight 0: never drawn
    idx, ok = _guided_samples(w, *relation_to_lists(C), torch.rand(b, Hg, generator=g, dtype=torch.float64),
                              torch.rand(b, Hg, K, generator=g, dtype=torch.float64))
    seed, rest = idx[..., 0], idx[..., 1:]
    member = torch.gather(C, 1, seed[..., None].expand(b, Hg, K)).gather(2, rest)
    assert member[ok].all()
    assert (rest[ok] != 7).all()
    assert not ok[seed == 5].any()  # fewer than three neighbours: no valid guided sample
    # Distinct draws within a sample.
    assert (rest[..., 0] != rest[..., 1]).all() and (rest[..., 1] != rest[..., 2]).all() and (rest[..., 0] != rest[..., 2]).all()


def test_guided_sampling_finds_poses_that_p_weighted_sampling_misses():
    """85 % of the candidates wrong and 64 hypotheses: an all-true triple by P-weighted sampling
    has probability ~0.15^3 per hypothesis (about 1 in 5 items find one); a true seed's
    consistent neighbours are mostly true, so guided sampling finds one in almost every item."""
    b = 12
    s = make_scene(b, 150, seed=5)
    P = _candidates(s, 5, seed=2)
    solved = {}
    for guided in (0.0, 1.0):
        res = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], num_hypotheses=64, top_k=900,
                         guided=guided, generator=torch.Generator().manual_seed(0))
        err = geodesic_angle(res.R.double(), s["R"])
        solved[guided] = int((err < 1e-3).sum())
    assert solved[1.0] >= b - 2
    assert solved[0.0] <= b // 2


def test_guided_zero_is_the_p_weighted_sampler():
    s = make_scene(3, 40, seed=1)
    P = _candidates(s, 2, seed=0)
    a = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], num_hypotheses=32,
                   generator=torch.Generator().manual_seed(4))
    c = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], num_hypotheses=32, guided=0.0,
                   guided_neighbours=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.R, c.R) and torch.equal(a.t, c.t)


def assert_padding_invariant(P, s, **kw):
    """RANSAC with ``kw`` on ``P`` / scene ``s`` and on the same inputs padded by 9 2D and 5 3D
    points (random values, masked out) draws the same samples and picks the same winner."""
    b, m, n = P.shape
    ref = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], generator=torch.Generator().manual_seed(1), **kw)
    g = torch.Generator().manual_seed(9)
    Pp = torch.cat([torch.cat([P, torch.rand(b, m, 5, generator=g)], 2), torch.rand(b, 9, n + 5, generator=g)], 1)
    bp = torch.cat([s["bearings"], torch.nn.functional.normalize(torch.rand(b, 9, 3, generator=g), dim=-1)], 1)
    Xp = torch.cat([s["X"], 1e3 * torch.randn(b, 5, 3, generator=g)], 1)
    m2 = torch.cat([s["mask2d"], torch.zeros(b, 9, dtype=torch.bool)], 1)
    m3 = torch.cat([s["mask3d"], torch.zeros(b, 5, dtype=torch.bool)], 1)
    pad = ransac_pnp(Pp, bp, Xp, m2, m3, generator=torch.Generator().manual_seed(1), **kw)
    # The same samples: the same count of valid hypotheses, the same winner.
    assert torch.equal(ref.num_valid_hypotheses, pad.num_valid_hypotheses)
    assert torch.equal(ref.num_inliers, pad.num_inliers)
    assert torch.allclose(ref.R, pad.R, atol=1e-6) and torch.allclose(ref.t, pad.t, atol=1e-5)


def test_guided_result_does_not_depend_on_padding():
    s = make_scene(3, 60, n_extra3d=20, seed=7)
    assert_padding_invariant(_candidates(s, 3, seed=4), s, num_hypotheses=48, guided=0.5, guided_neighbours=8)


@pytest.mark.parametrize("kw, msg", [({"guided": 1.5}, "guided must be a fraction"), ({"guided": True}, "guided must be"),
                                     ({"guided_neighbours": 2}, "guided_neighbours must be an int >= 3")])
def test_guided_options_are_checked(kw, msg):
    s = make_scene(1, 10)
    with pytest.raises(ValueError, match=msg):
        ransac_pnp(one := torch.ones(1, 10, 10) / 100, s["bearings"], s["X"], s["mask2d"], s["mask3d"], **kw)
    del one


def test_guided_samples_are_the_gumbel_top3_over_all_columns():
    """The neighbour-list form draws what the definition does: per hypothesis, the three
    allowed columns with the largest ``log w - log(-log u)`` over all K columns (a loop here)."""
    import math

    g = torch.Generator().manual_seed(3)
    b, K, Hg = 2, 80, 40
    C = torch.rand(b, K, K, generator=g) < 0.1
    C &= ~torch.eye(K, dtype=torch.bool)
    C[:, 4] = False
    w = torch.rand(b, K, generator=g, dtype=torch.float64)
    w[:, 9] = 0.0
    u_seed = torch.rand(b, Hg, generator=g, dtype=torch.float64)
    gumbel_u = torch.rand(b, Hg, K, generator=g, dtype=torch.float64)
    idx, ok = _guided_samples(w, *relation_to_lists(C), u_seed, gumbel_u)
    for i in range(b):
        for h in range(Hg):
            seed = int(idx[i, h, 0])
            cols = [j for j in range(K) if C[i, seed, j] and w[i, j] > 0]
            keys = {j: math.log(w[i, j]) - math.log(-math.log(gumbel_u[i, h, j])) for j in cols}
            best = sorted(cols, key=lambda j: -keys[j])[:3]
            assert bool(ok[i, h]) == (len(cols) >= 3)
            if ok[i, h]:
                assert idx[i, h, 1:].tolist() == best
