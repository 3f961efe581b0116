"""The markdown summary of evaluate.py runs."""

from __future__ import annotations

import json

from bpnp.evaluation.summary import HEADER, main, summary_table


def _write(run, success, oracle=1.0):
    run.mkdir(parents=True)
    metrics = {"n": 40, "success_rate": success, "median_rot_err_deg": 0.5, "match_acc": 0.25,
               "baselines": {"ransac": {"success_rate": 0.5, "median_rot_err_deg": 3.0}, "oracle": {"success_rate": oracle}},
               "meta": {"data": {"path": "scenes/unseen_meshes_out0.25"}}}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_rows_name_the_set_and_carry_the_three_methods(tmp_path, capsys):
    _write(tmp_path / "a" / "runs" / "2026-01-01_00-00-00", 0.9)
    _write(tmp_path / "a" / "runs" / "2026-01-02_00-00-00", 0.8)
    table = summary_table([tmp_path / "a" / "runs" / "2026-01-01_00-00-00"])
    assert table.startswith(HEADER)
    assert table.splitlines()[-1] == ("| a | 40 | 90.0 % | 0.50 deg | 25.0 % | 50.0 % | 3.00 deg | "
                                      "100.0 % | n/a | n/a |")
    searched = tmp_path / "s" / "runs" / "2026-01-01_00-00-00"
    _write(searched, 0.9)
    m = json.loads((searched / "metrics.json").read_text())
    m["baselines"]["nosearch"] = {"success_rate": 0.7, "median_rot_err_deg": 1.0}
    m["mean_time_s"] = 0.25
    (searched / "metrics.json").write_text(json.dumps(m))
    assert summary_table([searched]).splitlines()[-1].endswith("| 100.0 % | 70.0 %, 1.00 deg | 0.250 s |")
    assert main(["--latest", str(tmp_path / "a")]) == 0
    assert "| 80.0 % |" in capsys.readouterr().out  # the newest run
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "metrics.json").write_text((tmp_path / "a" / "runs" / "2026-01-01_00-00-00" / "metrics.json").read_text())
    assert summary_table([tmp_path / "loose"]).splitlines()[-1].startswith("| unseen_meshes_out0.25 | 40 |")
    assert main([str(tmp_path / "missing")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
