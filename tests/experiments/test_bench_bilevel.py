"""bench/bilevel.py at a tiny size, so that the profiling script does not rot: the saved-tensor
accounting, one fresh-process peak-RSS run, the CSV, the table and the plot."""

import csv
import math

import torch

from bench import bilevel


def test_saved_tensor_accounting_counts_distinct_storages():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    with bilevel.SavedTensors() as saved:
        y = (x * x).sum()  # mul saves x twice: one storage
    assert saved.nbytes == 8000
    with bilevel.SavedTensors() as saved2:
        z = torch.exp(x).sum()  # exp saves its result
    assert saved2.nbytes == 8000
    with bilevel.SavedTensors(enabled=False) as off:
        x.exp()
    assert off.nbytes == 0
    del y, z


def test_profile_rows_csv_table_plot(tmp_path):
    rows = bilevel.profile("ot", [6], repeats=1, threads=1, rss=False)
    assert [r["method"] for r in rows] == list(bilevel.bot.METHODS)
    by = {r["method"]: r for r in rows}
    assert by["implicit"]["solver_iterations"] == bilevel.OT_ITERS
    assert by["unrolled_log"]["saved_mib"] > 10 * by["implicit"]["saved_mib"]  # 100 iterations of (6, 6) tensors
    assert max(r["grad_rel_diff"] for r in rows) < 1e-8
    assert math.isnan(by["implicit"]["peak_rss_above_base_mib"])
    bilevel.write_csv(rows, tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    bilevel.plot(rows, "ot", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    table = bilevel.markdown(rows, "ot")
    assert "| 6 | unrolled_log | 100 |" in table and "at size 6" in table


def test_least_squares_rows_and_memory_beyond_inputs():
    """The matrix-free node keeps only vectors beyond its inputs; the unrolled CGLS keeps every
    iteration's (and QR's node keeps R), which is what the column compares."""
    rows = bilevel.profile("ls", [12], repeats=1, threads=1, rss=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == list(bilevel.bls.METHODS)
    assert by["node_cg"]["solver_iterations"] == by["unrolled"]["solver_iterations"] > 0
    beyond = {k: r["saved_beyond_inputs_mib"] * 2**20 for k, r in by.items()}
    assert beyond["node_cg"] == 8 * (12 + 12 + 12 + 1)  # x, column scale, the loss's x - x_target (n each), ridge
    assert beyond["unrolled"] > 10 * beyond["node_cg"] and beyond["node"] > beyond["node_cg"]
    assert all(r["saved_beyond_inputs_mib"] <= r["saved_mib"] for r in rows)
    assert max(r["grad_rel_diff"] for r in rows) < 1e-8
    assert "unrolled / node_cg" in bilevel.markdown(rows, "ls")


def test_fresh_process_peak_rss():
    peaks = bilevel.measure_rss("ls", "node", [8, 64], threads=1)
    assert set(peaks) == {8, 64}
    assert all(v >= 0 for v in peaks.values())
