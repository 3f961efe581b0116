"""Tempered hypothesis sampling of :func:`bpnp.geometry.ransac_pnp` (``sample_power`` = gamma):
samples drawn with probability proportional to ``P^gamma``, scored by ``P``."""

import pytest
import torch

from bpnp.geometry.ransac import ransac_pnp
from bpnp.geometry.rotations import geodesic_angle
from tests.geometry.test_ransac import make_scene
from tests.geometry.test_ransac_guided import assert_padding_invariant


def _confident_truth(s, wrong_per_point, wrong_weight, seed):
    """P with, per 2D point, its true pair at weight 1 and ``wrong_per_point`` random wrong pairs
    at ``wrong_weight`` < 1 each: the true pairs are the most probable entries but hold only
    1 / (1 + wrong_per_point * wrong_weight) of the mass."""
    b, m = s["match"].shape
    n = s["X"].shape[1]
    g = torch.Generator().manual_seed(seed)
    P = torch.zeros(b, m, n, dtype=torch.float64)
    wrong = (torch.arange(m)[None, :, None] + torch.randint(1, n, (b, m, wrong_per_point), generator=g)) % n
    P.scatter_(2, wrong, wrong_weight)
    P[:, torch.arange(m), torch.arange(m)] = 1.0
    return P / P.sum((1, 2), keepdim=True)


def _solved(res, s):
    return int((geodesic_angle(res.R.double(), s["R"]) < 1e-3).sum())


def test_tempered_sampling_finds_poses_that_p_weighted_sampling_misses():
    """6 wrong pairs at half the true pair's weight per point: a P-weighted draw is true with
    probability 1 / 4, an all-true triple 1 / 64 per hypothesis, so 16 hypotheses find one in about
    a fifth of the items. With gamma = 4 a wrong pair weighs 1 / 16 and a draw is true with
    probability 8 / 11: an all-true triple in about 0.38 of the hypotheses, in nearly every item."""
    b = 12
    s = make_scene(b, 150, seed=5)
    P = _confident_truth(s, 6, 0.5, seed=2)
    solved = {}
    for gamma in (1.0, 4.0):
        res = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], num_hypotheses=16, top_k=150 * 7,
                         sample_power=gamma, generator=torch.Generator().manual_seed(0))
        solved[gamma] = _solved(res, s)
    assert solved[4.0] >= b - 1
    assert solved[1.0] <= b // 2


def test_power_one_is_the_p_weighted_sampler():
    s = make_scene(3, 40, seed=1)
    P = _confident_truth(s, 2, 0.5, seed=0)
    args = (P, s["bearings"], s["X"], s["mask2d"], s["mask3d"])
    a = ransac_pnp(*args, num_hypotheses=32, generator=torch.Generator().manual_seed(4))
    c = ransac_pnp(*args, num_hypotheses=32, sample_power=1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.R, c.R) and torch.equal(a.t, c.t) and torch.equal(a.score, c.score)


def test_tempered_draws_do_not_underflow():
    """P ~ 1e-3 per entry to the power 150 is below float64's smallest number unless the weights
    are taken relative to the item's largest first. With that, the draws are the most probable
    (true) pairs, and they do not depend on P's scale (local optimisation off, whose damping
    has an absolute floor, so that the poses are those of the samples)."""
    b = 2
    s = make_scene(b, 60, seed=3)
    P = _confident_truth(s, 3, 0.5, seed=1)
    geo = (s["bearings"], s["X"], s["mask2d"], s["mask3d"])
    kw = dict(num_hypotheses=24, sample_power=150.0, guided=0.5, guided_neighbours=8, refine_steps=0)
    ref = ransac_pnp(P, *geo, generator=torch.Generator().manual_seed(2), **kw)
    small = ransac_pnp(P * 1e-3, *geo, generator=torch.Generator().manual_seed(2), **kw)
    assert int(ref.num_valid_hypotheses.min()) > 0 and _solved(ref, s) == b
    assert torch.equal(ref.num_valid_hypotheses, small.num_valid_hypotheses)
    assert torch.equal(ref.num_inliers, small.num_inliers)
    assert torch.equal(ref.R, small.R)


def test_tempered_result_does_not_depend_on_padding():
    s = make_scene(3, 60, n_extra3d=20, seed=7)
    assert_padding_invariant(_confident_truth(s, 3, 0.5, seed=4).float(), s, num_hypotheses=48, sample_power=3.0,
                             guided=0.5, guided_neighbours=8)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_sample_power_is_checked(value):
    s = make_scene(1, 10)
    with pytest.raises(ValueError, match="sample_power must be a finite number > 0"):
        ransac_pnp(torch.ones(1, 10, 10) / 100, s["bearings"], s["X"], s["mask2d"], s["mask3d"], sample_power=value)
