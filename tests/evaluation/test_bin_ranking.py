"""bpnp.evaluation.bin_ranking: the bins' ranking statistics of the second pass's kept points."""

from __future__ import annotations

import math

import pytest
import torch

from bpnp.data.synthetic import SyntheticConfig, make_instance
from bpnp.evaluation.bin_ranking import main, ranking_stats
from bpnp.models import BlindPnPNet


def _net(**kw):
    torch.manual_seed(0)
    return BlindPnPNet(feature_dim=16, depth=1, knn=4, **kw)


def _scenes(n=3):
    cfg = SyntheticConfig(num_points_2d=(30, 40), outlier_frac_2d=0.4, outlier_frac_3d=0.3, noise_px=1.0)
    return [make_instance(cfg, 7, i) for i in range(n)]


def test_keeping_every_point_has_the_base_share_and_full_recall():
    scenes = _scenes()
    s = ranking_stats(_net(), scenes, 1.0, 1.0)
    assert s["n"] == 3
    for side in ("2d", "3d"):
        assert s[f"{side}_recall"] == 1.0
        assert math.isclose(s[f"{side}_precision"], s[f"{side}_base"], rel_tol=0, abs_tol=1e-12)
    # the generator's outlier shares: 2D inliers 0.6 of the points, 3D about 0.7
    assert abs(s["2d_base"] - 0.6) < 0.05 and abs(s["3d_base"] - 0.7) < 0.05
    half = ranking_stats(_net(), scenes, 0.5, 0.5)
    for side in ("2d", "3d"):
        assert 0.0 <= half[f"{side}_precision"] <= 1.0 and 0.0 < half[f"{side}_recall"] < 1.0


def test_a_network_without_bins_and_bad_shares_are_refused(capsys):
    with pytest.raises(ValueError, match="no outlier bins"):
        ranking_stats(_net(sinkhorn={"bins": "none"}), _scenes(1), 0.5, 0.5)
    assert main(["--ckpt", "x.pt", "--scenes", "y", "--keep", "0", "0.5"]) == 2
    assert "--keep: shares must lie in (0, 1]" in capsys.readouterr().err
