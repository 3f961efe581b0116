import math

import numpy as np
import pytest
import torch

from bpnp.geometry.metrics import auc, error_auc, median_matched_depth, pose_errors, success_rate_at
from bpnp.geometry.rotations import so3_exp

F64 = torch.float64


def _rz(deg: float) -> torch.Tensor:
    return so3_exp(torch.tensor([0.0, 0.0, math.radians(deg)]))


def _scene():
    """One instance: true pose identity, 3D points at depths 1, 2, 3, 10 and an unmatched 100."""
    p3d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 10.0], [0.0, 0.0, 100.0]]])
    match = torch.tensor([[0, 1, 2, 3, -1]])
    mask2d = torch.ones(1, 5, dtype=torch.bool)
    return torch.eye(3)[None], torch.zeros(1, 3), p3d, match, mask2d


def test_rotation_error_hand_computed():
    R_gt, t_gt, p3d, match, mask2d = _scene()
    R = torch.stack([_rz(10.0) @ R_gt[0], _rz(-3.0), _rz(179.0)])
    out = pose_errors(R, t_gt.expand(3, 3), R_gt.expand(3, 3, 3), t_gt.expand(3, 3), p3d.expand(3, 5, 3),
                      match.expand(3, 5), mask2d.expand(3, 5))
    assert out["rot_err_deg"].dtype == F64
    assert torch.allclose(out["rot_err_deg"], torch.tensor([10.0, 3.0, 179.0], dtype=F64), atol=1e-3)
    assert out["success"].tolist() == [False, True, False]


def test_center_error_uses_median_matched_depth():
    R_gt, t_gt, p3d, match, mask2d = _scene()
    t = torch.tensor([[0.1, 0.0, 0.0]])  # c = -t, c_gt = 0: ||c - c_gt|| = 0.1
    out = pose_errors(torch.eye(3)[None], t, R_gt, t_gt, p3d, match, mask2d)
    # Matched depths 1, 2, 3, 10 (the 100 is unmatched): median (2 + 3) / 2 = 2.5.
    assert out["depth_ref"].item() == pytest.approx(2.5)
    assert out["center_err_rel"].item() == pytest.approx(0.1 / 2.5)
    assert out["t_err"].item() == pytest.approx(0.1)
    assert out["success"].item() is True  # 0.04 < 0.05 and 0 deg < 5
    # A padded 2D point is not a match; a 2D point matched to a padded 3D point neither.
    mask2d_pad = mask2d.clone()
    mask2d_pad[0, 0] = False  # drop depth 1 -> median of 2, 3, 10 = 3
    assert median_matched_depth(R_gt, t_gt, p3d, match, mask2d_pad).item() == pytest.approx(3.0)
    mask3d = torch.ones(1, 5, dtype=torch.bool)
    mask3d[0, 3] = False  # drop depth 10 -> median of 1, 2, 3 = 2
    out = pose_errors(torch.eye(3)[None], t, R_gt, t_gt, p3d, match, mask2d, mask3d)
    assert out["depth_ref"].item() == pytest.approx(2.0)


def test_center_error_with_nontrivial_true_pose():
    R_gt = _rz(30.0)[None]
    t_gt = torch.tensor([[0.0, 0.0, 4.0]])
    p3d = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, -1.0]]])
    match, mask2d = torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)
    # Depths in the true camera: 4, 6, 3 -> median 4. Centre c_gt = -R_gt^T t_gt = (0, 0, -4).
    R = R_gt.clone()
    t = t_gt + torch.tensor([[0.0, 0.3, 0.0]])
    out = pose_errors(R, t, R_gt, t_gt, p3d, match, mask2d)
    assert out["depth_ref"].item() == pytest.approx(4.0)
    assert out["center_err_rel"].item() == pytest.approx(0.3 / 4.0, rel=1e-6)
    assert out["success"].item() is False  # 0.075 >= 0.05


def test_fallback_to_all_real_points_when_nothing_matched():
    R_gt, t_gt, p3d, match, mask2d = _scene()
    none = torch.full_like(match, -1)
    mask3d = torch.tensor([[True, True, True, True, False]])
    out = pose_errors(torch.eye(3)[None], torch.tensor([[0.0, 0.25, 0.0]]), R_gt, t_gt, p3d, none, mask2d, mask3d)
    assert out["depth_ref"].item() == pytest.approx(2.5)  # real points 1, 2, 3, 10
    assert out["center_err_rel"].item() == pytest.approx(0.1)
    # Without mask3d every 3D point is real: median of 1, 2, 3, 10, 100 = 3.
    assert median_matched_depth(R_gt, t_gt, p3d, none, mask2d).item() == pytest.approx(3.0)


def test_success_thresholds_strict_and_configurable():
    R_gt, t_gt, p3d, match, mask2d = _scene()
    R = torch.stack([_rz(4.99), _rz(5.01), _rz(0.0), _rz(0.0)])
    t = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.1249, 0.0, 0.0], [0.1251, 0.0, 0.0]])
    args = (R_gt.expand(4, 3, 3), t_gt.expand(4, 3), p3d.expand(4, 5, 3), match.expand(4, 5), mask2d.expand(4, 5))
    assert pose_errors(R, t, *args)["success"].tolist() == [True, False, True, False]
    out = pose_errors(R, t, *args, rot_threshold_deg=5.02, center_threshold_rel=0.01)
    assert out["success"].tolist() == [True, True, False, False]


def test_nonfinite_estimate_is_a_failure_not_a_crash():
    R_gt, t_gt, p3d, match, mask2d = _scene()
    R = torch.stack([torch.full((3, 3), math.nan), torch.eye(3), torch.eye(3)])
    t = torch.tensor([[0.0, 0.0, 0.0], [math.inf, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = pose_errors(R, t, R_gt.expand(3, 3, 3), t_gt.expand(3, 3), p3d.expand(3, 5, 3), match.expand(3, 5),
                      mask2d.expand(3, 5))
    assert out["rot_err_deg"].tolist() == [180.0, 180.0, 0.0]
    assert math.isinf(out["t_err"][0]) and math.isinf(out["center_err_rel"][1])
    assert out["success"].tolist() == [False, False, True]
    assert out["finite"].tolist() == [False, False, True]


def test_no_real_points_gives_infinite_relative_error():
    R_gt, t_gt, p3d, match, mask2d = _scene()
    out = pose_errors(torch.eye(3)[None], t_gt, R_gt, t_gt, p3d, torch.full_like(match, -1), mask2d,
                      torch.zeros(1, 5, dtype=torch.bool))
    assert math.isinf(out["center_err_rel"].item()) and out["success"].item() is False


def _pose_auc_reference(errors, thresholds):
    """The usual numpy implementation (SuperGlue / LoFTR `pose_auc`)."""
    sort_idx = np.argsort(errors)
    errors = np.array(errors.copy())[sort_idx]
    recall = (np.arange(len(errors)) + 1) / len(errors)
    errors = np.r_[0.0, errors]
    recall = np.r_[0.0, recall]
    aucs = []
    for t in thresholds:
        last_index = np.searchsorted(errors, t)
        r = np.r_[recall[:last_index], recall[last_index - 1]]
        e = np.r_[errors[:last_index], t]
        aucs.append(np.trapezoid(r, x=e) / t)
    return aucs


def test_auc_hand_computed_and_against_reference():
    # Points (0,0), (1,.25), (2,.5), (3,.75), closed at (5,.75): area 2.625, / 5.
    assert error_auc(torch.tensor([1.0, 2.0, 3.0, 30.0]), 5.0).item() == pytest.approx(0.525)
    assert error_auc(torch.zeros(3), 5.0).item() == pytest.approx(1.0)
    assert error_auc(torch.full((3,), 50.0), 5.0).item() == 0.0
    g = torch.Generator().manual_seed(0)
    errs = torch.rand(200, generator=g, dtype=F64) * 25
    got = auc(errs, [5, 10, 20])
    assert got.shape == (3,)
    assert np.allclose(got.numpy(), _pose_auc_reference(errs.numpy(), [5, 10, 20]), atol=1e-12)


def test_auc_counts_nonfinite_as_failures():
    a = error_auc(torch.tensor([1.0, math.nan, math.inf, 2.0]), 10.0)
    b = error_auc(torch.tensor([1.0, 1e9, 1e9, 2.0]), 10.0)
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item())


def test_success_rate_at():
    rot = torch.tensor([1.0, 4.0, 9.0, math.nan])
    cen = torch.tensor([0.01, 0.2, 0.01, 0.0])
    got = success_rate_at(rot, cen, [(5, 0.05), (10, 0.05), (10, 0.5)])
    assert got.tolist() == [0.25, 0.5, 0.75]


def test_metric_input_validation():
    R_gt, t_gt, p3d, match, mask2d = _scene()
    with pytest.raises(ValueError, match=r"R must have shape \(B, 3, 3\), got \(3, 3\)"):
        pose_errors(torch.eye(3), t_gt, R_gt, t_gt, p3d, match, mask2d)
    with pytest.raises(ValueError, match=r"match entries must lie in \[-1, 4\]"):
        pose_errors(R_gt, t_gt, R_gt, t_gt, p3d, match + 5, mask2d)
    with pytest.raises(ValueError, match="mask2d must be a bool tensor"):
        pose_errors(R_gt, t_gt, R_gt, t_gt, p3d, match, mask2d.float())
    with pytest.raises(ValueError, match=r"errors_deg must have shape \(N,\)"):
        error_auc(torch.zeros(2, 2), 5.0)
    with pytest.raises(ValueError, match="> 0"):
        error_auc(torch.zeros(2), 0.0)
