"""Summary metrics, metrics.json and the per-instance CSV (bpnp.evaluation.report)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from bpnp.evaluation.report import (CSV_COLUMNS, summarize, summarize_methods, threshold_key, to_jsonable,
                                    write_metrics_json, write_records_csv)

CONTRACT = ("n", "success_rate", "median_rot_err_deg", "median_t_err", "median_center_err_rel", "mean_time_s")


def _rec(rot, cen, method="model", t_err=0.1, time_s=0.5, ransac_status=0, pnp_status=0):
    return {"scene": "x", "index": 0, "method": method, "rot_err_deg": rot, "t_err": t_err,
            "center_err_rel": cen, "success": rot < 5 and cen < 0.05, "time_s": time_s,
            "ransac_status": ransac_status, "pnp_status": pnp_status}


def test_threshold_key():
    assert threshold_key(5, 0.05) == "5deg_5pct"
    assert threshold_key(1, 0.01) == "1deg_1pct"
    assert threshold_key(2.5, 0.025) == "2.5deg_2.5pct"


def test_summarize_known_values():
    recs = [_rec(0.5, 0.005, t_err=1.0, time_s=1.0), _rec(3.0, 0.03, t_err=2.0, time_s=2.0),
            _rec(8.0, 0.2, t_err=3.0, time_s=3.0, ransac_status=2),
            _rec(180.0, math.inf, t_err=math.inf, time_s=6.0, pnp_status=-1)]
    s = summarize(recs)
    for k in CONTRACT:
        assert k in s
    assert s["n"] == 4
    assert s["success_rate"] == 0.5
    assert s["median_rot_err_deg"] == pytest.approx(5.5)
    assert s["median_t_err"] == pytest.approx(2.5)
    assert s["median_center_err_rel"] == pytest.approx(0.115)
    assert s["mean_time_s"] == pytest.approx(3.0)
    assert s["success_rate_at"] == {"1deg_1pct": 0.25, "2deg_2pct": 0.25, "5deg_5pct": 0.5, "10deg_10pct": 0.5}
    assert s["ransac_failure_rate"] == 0.25
    assert s["pnp_status_counts"] == {"-1": 1, "0": 3}
    for T in (5, 10, 20):
        assert 0.0 <= s[f"auc_rot_{T}deg"] <= 1.0


def test_auc_values_by_hand():
    # Recall 1/2 at 0 and 1 at 5 degrees: trapezoids give 0.5 (T=5), 0.875 (T=10), 0.9375 (T=20).
    s = summarize([_rec(0.0, 0.0), _rec(5.0, 0.05)])
    assert s["auc_rot_5deg"] == pytest.approx(0.5)
    assert s["auc_rot_10deg"] == pytest.approx(0.875)
    assert s["auc_rot_20deg"] == pytest.approx(0.9375)
    # The centre AUC reads its limits in percent: 0.05 = 5 % plays the part of 5 degrees.
    assert s["auc_center_10pct"] == pytest.approx(0.875)


def test_custom_thresholds_and_empty():
    s = summarize([_rec(0.5, 0.001)], success_thresholds=[(0.1, 0.1)], auc_thresholds_deg=[30])
    assert s["success_rate_at"] == {"0.1deg_10pct": 0.0}
    assert "auc_rot_30deg" in s and "auc_rot_5deg" not in s
    assert summarize([]) == {"n": 0}


def test_summarize_methods_layout():
    recs = [_rec(1, 0.01), _rec(2, 0.01, method="oracle"), _rec(50, 1.0, method="hungarian"), _rec(3, 0.01)]
    out = summarize_methods(recs)
    assert out["n"] == 2 and list(out["baselines"]) == ["oracle", "hungarian"]
    assert out["baselines"]["oracle"]["n"] == 1 and out["baselines"]["hungarian"]["success_rate"] == 0.0


def test_metrics_json_is_strict(tmp_path):
    import numpy as np
    import torch

    path = write_metrics_json(tmp_path / "m" / "metrics.json",
                              {"a": math.inf, "b": float("nan"), "c": np.float32(1.5), "d": torch.tensor([1, 2]),
                               "e": {"f": np.int64(3), "g": (np.bool_(True),)}})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"a": None, "b": None, "c": 1.5, "d": [1, 2], "e": {"f": 3, "g": [True]}}
    assert to_jsonable({1: 2}) == {"1": 2}


def test_records_csv(tmp_path):
    recs = [{**_rec(1.25, 0.01), "m": 30, "n": 40, "num_true_inliers": 20}, _rec(180.0, math.inf)]
    path = write_records_csv(tmp_path / "instances.csv", recs)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert float(rows[0]["rot_err_deg"]) == 1.25 and rows[0]["success"] == "1" and rows[0]["m"] == "30"
    assert float(rows[1]["center_err_rel"]) == math.inf and rows[1]["success"] == "0"
    assert rows[1]["m"] == ""  # missing keys stay empty
