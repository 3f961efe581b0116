"""Gates relative to the keypoints' angular spread (bpnp.geometry.angular_scale) and the per-item
gates of the layers that take them: the spread follows a zoom and ignores padding; a batch with
per-item gates equals one call per item with that item's gate (RANSAC, re-matching, the pose
search, the refinement node's kernel scale, forward and gradient, checked in float64)."""

import math

import pytest
import torch

from bpnp.geometry.angular_scale import gate_factor, keypoint_spread
from bpnp.geometry.bearings import to_bearings
from bpnp.geometry.pose_search import pose_search, rematch
from bpnp.geometry.ransac import ransac_pnp
from bpnp.nodes.pnp import PnPRefine, gather_pairs
from bpnp.nodes.robust import KERNELS
from tests.geometry.test_pose_search import _perturbed, _uniform_P
from tests.geometry.test_ransac import make_scene, one_hot_P
from tests.nodes.pnp_problems import make_problem, perturb

F64 = torch.float64


def _points(b=2, m=50, seed=0, half_width=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, m, 2, generator=g, dtype=F64) * 2 - 1) * half_width


def test_spread_is_the_rms_distance_of_the_bearings_from_their_centroid():
    p = _points()
    b = to_bearings(p)
    expected = (b - b.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt()
    torch.testing.assert_close(keypoint_spread(b, torch.ones(2, 50, dtype=torch.bool)), expected, rtol=0, atol=1e-15)


def test_spread_follows_a_zoom_and_ignores_padding():
    p = _points(half_width=0.02)  # small angles: a zoom by c scales the spread by c (to O(angle^2))
    mask = torch.ones(2, 50, dtype=torch.bool)
    s1, s3 = keypoint_spread(to_bearings(p), mask), keypoint_spread(to_bearings(3 * p), mask)
    torch.testing.assert_close(s3 / s1, torch.full_like(s1, 3.0), rtol=1e-2, atol=0)
    padded = torch.cat([to_bearings(p), torch.full((2, 7, 3), float("nan"), dtype=F64)], 1)
    mask_p = torch.cat([mask, torch.zeros(2, 7, dtype=torch.bool)], 1)
    assert torch.equal(keypoint_spread(padded, mask_p), s1)


def test_gate_factor_is_the_clamped_ratio_to_the_reference():
    b = to_bearings(torch.stack([_points(1, half_width=w)[0] for w in (0.01, 0.3, 3.0)]))
    mask = torch.ones(3, 50, dtype=torch.bool)
    s = keypoint_spread(b, mask)
    f = gate_factor(b, mask, reference=float(s[1]), low=0.25, high=2.0)
    assert f.dtype == F64
    torch.testing.assert_close(f, torch.tensor([0.25, 1.0, 2.0], dtype=F64).clamp(min=float(s[0] / s[1])), rtol=1e-12,
                               atol=0)
    assert float(f[0]) == 0.25 and float(f[2]) == 2.0


def test_ransac_with_per_item_thresholds_equals_one_call_per_item():
    s = make_scene(3, 40, n_extra3d=10, noise=0.003, seed=2)
    P = one_hot_P(3, 40, 50) * 0.7 + 0.3 / (40 * 50)
    thr = torch.tensor([0.004, 0.01, 0.03], dtype=F64)
    kw = dict(num_hypotheses=64, top_hypotheses=2)
    batched = ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], threshold=thr,
                         generator=torch.Generator().manual_seed(0), **kw)
    # The same random numbers per item: RANSAC draws (b, H, 4) uniforms, so item i's draws are
    # row i of the batch's; one call per item reuses them through a batch of the item repeated.
    for i in range(3):
        rep = [s[k][[i] * 3] for k in ("bearings", "X", "mask2d", "mask3d")]
        one = ransac_pnp(P[[i] * 3], *rep, threshold=float(thr[i]), generator=torch.Generator().manual_seed(0), **kw)
        for got, want in ((batched.R, one.R), (batched.t, one.t), (batched.num_inliers, one.num_inliers),
                          (batched.R_top, one.R_top)):
            assert torch.equal(got[i], want[i])


def test_ransac_refuses_a_per_item_threshold_of_the_wrong_shape_or_range():
    s = make_scene(2, 20, seed=3)
    P = one_hot_P(2, 20, 20)
    for bad in (torch.tensor([0.01]), torch.tensor([0.01, 2.0]), torch.tensor([0.01, -0.1])):
        with pytest.raises(ValueError, match="threshold"):
            ransac_pnp(P, s["bearings"], s["X"], s["mask2d"], s["mask3d"], threshold=bad)


def test_rematch_with_per_item_gates_equals_one_call_per_item():
    s = make_scene(2, 60, n_extra3d=30, noise=0.002, seed=4)
    b, X = s["bearings"].double(), s["X"].double()
    R, t = _perturbed(s, 0.3, seed=5)
    P = _uniform_P(s) + 1e-4 * torch.rand(_uniform_P(s).shape, dtype=F64, generator=torch.Generator().manual_seed(6))
    gates = torch.tensor([0.003, 0.02], dtype=F64)
    mb, pb = rematch(P, b, X, s["mask2d"], s["mask3d"], R, t, gates, 0.5)
    for i in range(2):
        mi, pi = rematch(P[i:i + 1], b[i:i + 1], X[i:i + 1], s["mask2d"][i:i + 1], s["mask3d"][i:i + 1],
                         R[i:i + 1], t[i:i + 1], float(gates[i]), 0.5)
        assert torch.equal(mb[i], mi[0]) and torch.equal(pb[i], pi[0])


def _reference_rematch(P, bearings, points, R, t, gate, w):
    """Mutual best matches by the module docstring's definition, pair by pair in plain float64."""
    x = points @ R.transpose(-1, -2) + t[:, None, :]
    r = 1 - bearings @ torch.nn.functional.normalize(x, dim=-1).transpose(-1, -2)
    inside = (r < 1 - math.cos(gate)) & (x[..., 2] > 0)[:, None, :]
    score = torch.where(inside, w * torch.log(P) - r / (1 - math.cos(gate)), torch.full_like(r, -math.inf))
    out = torch.full(P.shape[:2], -1, dtype=torch.long)
    for bi in range(P.shape[0]):
        for i in range(P.shape[1]):
            if not bool(inside[bi, i].any()):
                continue
            j = int(score[bi, i].argmax())
            if int(score[bi, :, j].argmax()) == i:
                out[bi, i] = j
    return out


def test_rematch_equals_the_pairwise_definition():
    s = make_scene(2, 40, n_extra3d=20, noise=0.004, seed=7)
    b, X = s["bearings"].double(), s["X"].double()
    R, t = _perturbed(s, 0.5, seed=8)
    P = torch.rand(2, 40, 60, dtype=F64, generator=torch.Generator().manual_seed(9)) + 0.01
    got, _ = rematch(P, b, X, s["mask2d"], s["mask3d"], R, t, 0.02, 0.8)
    assert torch.equal(got, _reference_rematch(P, b, X, R, t, 0.02, 0.8))
    assert int((got >= 0).sum()) > 20  # not a vacuous comparison


def test_pose_search_with_a_gate_factor_equals_scaled_thresholds_per_item():
    s = make_scene(2, 60, n_extra3d=30, noise=0.002, seed=10)
    b, X = s["bearings"].double(), s["X"].double()
    R0, t0 = _perturbed(s, 1.0, seed=11)
    factor = torch.tensor([0.5, 2.0], dtype=F64)
    kw = dict(iterations=3, threshold=0.01, start_threshold=0.04, prior_weight=0.0)
    res = pose_search(_uniform_P(s), b, X, s["mask2d"], s["mask3d"], R0[:, None], t0[:, None], gate_factor=factor, **kw)
    for i in range(2):
        one = pose_search(_uniform_P(s)[i:i + 1], b[i:i + 1], X[i:i + 1], s["mask2d"][i:i + 1], s["mask3d"][i:i + 1],
                          R0[i:i + 1, None], t0[i:i + 1, None], **{**kw, "threshold": 0.01 * float(factor[i]),
                                                                  "start_threshold": 0.04 * float(factor[i])})
        torch.testing.assert_close(res.R[i], one.R[0], rtol=0, atol=1e-12)
        assert torch.equal(res.matches[i], one.matches[0])
    with pytest.raises(ValueError, match="gate_factor"):
        pose_search(_uniform_P(s), b, X, s["mask2d"], s["mask3d"], R0[:, None], t0[:, None],
                    gate_factor=torch.tensor([1.0, -1.0], dtype=F64), **kw)


@pytest.mark.parametrize("robust", [k for k in KERNELS if k != "none"])
@pytest.mark.parametrize("paired", [False, True])
def test_refinement_with_per_item_kernel_scales_equals_one_node_per_item(robust, paired):
    """Forward and the implicit gradient to W, bearings and points: item b solved with
    robust_scale * factor[b] in one batch equals a node built with that scale."""
    W, b, p, R, t = make_problem(B=2, n=10, seed=12, noise=0.01)
    W = W + 0.02 * torch.rand(W.shape, dtype=F64, generator=torch.Generator().manual_seed(13))
    R0, t0 = perturb(R, t, 5.0, 0.05)
    factor = torch.tensor([0.3, 4.0], dtype=F64)
    gR = torch.randn(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(14))
    gt = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(15))

    def run(node, idx, scale_factor=None):
        xs = [x[idx].clone().requires_grad_(True) for x in (W, b, p)]
        args = gather_pairs(*xs, 3) if paired else xs
        out = node(*args, R0[idx], t0[idx], scale_factor=scale_factor)
        grads = torch.autograd.grad((out.R * gR[idx]).sum() + (out.t * gt[idx]).sum(), xs)
        return out, grads

    batched, gb = run(PnPRefine(robust=robust, robust_scale=0.01, max_iter=100), [0, 1], factor)
    for i in range(2):
        one, gi = run(PnPRefine(robust=robust, robust_scale=0.01 * float(factor[i]), max_iter=100), [i])
        torch.testing.assert_close(batched.R[i], one.R[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(batched.t[i], one.t[0], rtol=0, atol=1e-12)
        for g_b, g_1 in zip(gb, gi):
            torch.testing.assert_close(g_b[i], g_1[0], rtol=1e-9, atol=1e-12)


def test_gradcheck_with_per_item_kernel_scales():
    W, b, p, R, t = make_problem(B=2, n=6, seed=16, noise=0.01)
    R0, t0 = perturb(R, t, 3.0, 0.05)
    node = PnPRefine(robust="geman_mcclure", robust_scale=0.01, max_iter=100)
    factor = torch.tensor([0.5, 3.0], dtype=F64)
    xs = tuple(x.detach().clone().requires_grad_(True) for x in (W, b, p))

    def f(W, b, p):
        out = node(W, b, p, R0, t0, scale_factor=factor)
        return out.R, out.t

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_refinement_refuses_a_bad_scale_factor():
    W, b, p, R, t = make_problem(B=2, n=6, seed=17)
    node = PnPRefine(robust="geman_mcclure")
    for bad in (torch.tensor([1.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="scale_factor"):
            node(W, b, p, R, t, scale_factor=bad)
