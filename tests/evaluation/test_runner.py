"""The per-instance runner, the outlier sweep and the plots, with a stand-in model."""

from __future__ import annotations

import numpy as np
import pytest

from bpnp.evaluation import plots
from bpnp.evaluation.report import CSV_COLUMNS, summarize_methods
from bpnp.evaluation.runner import EvalSettings, evaluate_instances
from bpnp.evaluation.sweep import OutlierDataset, parse_fractions, run_sweep

from tests.evaluation.conftest import names_of

SETTINGS = EvalSettings(warmup=0, num_overlays=1, progress_every=0)


def _by(records, method):
    return [r for r in records if r["method"] == method]


def test_model_and_baselines_on_noise_free_scenes(gt_model, scenes):
    records, overlays = evaluate_instances(gt_model, scenes, names_of(scenes), SETTINGS, log=None)
    assert len(records) == 4 * len(scenes)
    assert {r["method"] for r in records} == {"model", "ransac", "oracle", "hungarian"}
    for r in records:
        assert set(CSV_COLUMNS) <= set(r)
        assert r["time_s"] >= 0
    for r, s in zip(_by(records, "model"), scenes):
        assert (r["m"], r["n"], r["num_true_inliers"]) == (len(s["p2d"]), len(s["p3d"]), int(np.sum(s["match"] >= 0)))
        assert r["pair_precision"] == 1.0 and r["match_acc"] == 1.0 and r["success"], r
    for r in _by(records, "oracle"):
        assert r["rot_err_deg"] < 1e-4 and r["center_err_rel"] < 1e-6, r
    summary = summarize_methods(records)
    assert summary["success_rate"] == 1.0 and summary["baselines"]["oracle"]["success_rate"] == 1.0
    assert summary["match_acc"] == 1.0 and "match_acc" not in summary["baselines"]["oracle"]
    assert len(overlays) == 1 and overlays[0].name == "s0"


def test_an_instance_does_not_depend_on_the_others(gt_model, scenes):
    """Batch 1, no padding and a per-instance RANSAC seed: the same numbers alone or in a set."""
    settings = EvalSettings(warmup=0, num_overlays=0, progress_every=0, baselines=("oracle",))
    all_recs, _ = evaluate_instances(gt_model, scenes, names_of(scenes), settings, log=None)
    one, _ = evaluate_instances(gt_model, scenes, names_of(scenes), settings, indices=[2], log=None)
    keys = ("rot_err_deg", "t_err", "center_err_rel", "ransac_inliers", "m", "n")
    assert [[r[k] for k in keys] for r in all_recs if r["index"] == 2] == [[r[k] for k in keys] for r in one]


def test_baseline_subset_and_bad_name(gt_model, scenes):
    settings = EvalSettings(warmup=0, num_overlays=0, progress_every=0, baselines=("ransac",))
    records, _ = evaluate_instances(gt_model, scenes[:1], ["a"], settings, log=None)
    assert [r["method"] for r in records] == ["model", "ransac"] and records[1]["pnp_status"] == -1
    with pytest.raises(ValueError, match="unknown baselines"):
        EvalSettings(baselines=("oracle", "magic"))


def test_sweep_adds_outliers_deterministically(gt_model, scenes):
    assert parse_fractions([0, 0.25, [0.1, 0.5]]) == [(0.0, 0.0), (0.25, 0.25), (0.1, 0.5)]
    with pytest.raises(ValueError, match="sweep.fractions"):
        parse_fractions([1.0])
    ds = OutlierDataset(scenes, 0.5, 0.25, seed=3)
    a, b = ds[1], ds[1]
    np.testing.assert_array_equal(a["p2d"], b["p2d"])
    m0, n0 = len(scenes[1]["p2d"]), len(scenes[1]["p3d"])
    assert len(a["p2d"]) == m0 + round(m0) and len(a["p3d"]) == n0 + round(n0 / 3)

    settings = EvalSettings(warmup=0, num_overlays=0, progress_every=0, baselines=("oracle",))
    base, _ = evaluate_instances(gt_model, scenes, names_of(scenes), settings, log=None)
    sweep, recs = run_sweep(gt_model, scenes, names_of(scenes), settings, [0.0, 0.5], seed=0, reuse=base, log=None)
    assert sweep["fractions"] == [[0.0, 0.0], [0.5, 0.5]]
    assert [r["frac_2d"] for r in sweep["results"]] == [0.0, 0.5]
    assert sweep["results"][0]["n"] == len(scenes) and "oracle" in sweep["results"][1]["baselines"]
    assert sweep["results"][1]["baselines"]["oracle"]["success_rate"] == 1.0
    high = [r for r in recs if r["frac_2d"] == 0.5]
    assert len(high) == 2 * len(scenes) and all(r["m"] > r["num_true_inliers"] for r in high)


def test_plots_are_written(gt_model, scenes, tmp_path):
    records, overlays = evaluate_instances(gt_model, scenes, names_of(scenes), SETTINGS, log=None)
    sweep, _ = run_sweep(gt_model, scenes[:1], ["a"], EvalSettings(warmup=0, progress_every=0, baselines=()),
                         [0.0, [0.2, 0.4]], log=None)
    paths = [plots.plot_error_cdfs(records, tmp_path / "cdf.png", title="t"),
             plots.plot_sweep(sweep, tmp_path / "sweep.png"),
             plots.plot_overlay(overlays[0], tmp_path / "overlay.png")]
    overlays[0].K = None  # normalised coordinates when the scene has no intrinsics
    paths.append(plots.plot_overlay(overlays[0], tmp_path / "overlay_norm.png"))
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"


def test_nosearch_baseline_is_the_refinement_from_ransacs_pose(gt_model, scenes):
    """With the pose search on, ``nosearch`` is the same forward refined from RANSAC's own pose:
    equal to a run with the search off; without the search the baseline is skipped."""
    settings = EvalSettings(warmup=0, num_overlays=0, progress_every=0, baselines=("ransac", "nosearch"))
    plain, _ = evaluate_instances(gt_model, scenes, names_of(scenes), settings, log=None)
    assert {r["method"] for r in plain} == {"model", "ransac"}
    gt_model.configure(search={"enabled": True})
    try:
        searched, _ = evaluate_instances(gt_model, scenes, names_of(scenes), settings, log=None)
    finally:
        gt_model.configure(search={"enabled": False})
    assert {r["method"] for r in searched} == {"model", "ransac", "nosearch"}
    for a, b in zip(_by(plain, "model"), _by(searched, "nosearch")):
        assert b["rot_err_deg"] == pytest.approx(a["rot_err_deg"], abs=1e-9) and b["success"] == a["success"]
    for a, b in zip(_by(plain, "ransac"), _by(searched, "ransac")):
        assert b["rot_err_deg"] == a["rot_err_deg"]  # RANSAC's own pose, before the search
    assert all(r["success"] for r in _by(searched, "model"))
