"""``evaluate.py`` under load: 1,000 scene files (in-process, ``evaluate.run``) complete with a
flat memory footprint, and one 5,000 x 5,000 instance (a fresh ``evaluate.py`` process, so its
peak RSS is its own) completes within an O(m n) memory bound. Random-weights checkpoints built
here; ``bench/eval_load.py`` prints the full size sweep (numbers in the README)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.eval_load import make_checkpoint, write_scenes
from tests.reliability.helpers import ROOT, composing, load_cli

GIB = 2**30
#: Measured (bench/eval_load.py): the peak above the idle process is 40-47 bytes per m*n entry
#: (about eleven float32 (m, n) arrays: cost, plan, robust-kernel terms, candidate selection).
BYTES_PER_MN = 64
#: The idle evaluate.py process (torch, Lightning, W&B, matplotlib imported): ~0.95 GiB.
IDLE = 1.5 * GIB


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
def test_one_thousand_scene_files(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure the peak RSS of this run")
    ckpt = make_checkpoint(tmp_path / "tiny.pt", "tiny")
    scenes = write_scenes(tmp_path / "scenes", 1000, (50, 100))
    cli = load_cli("evaluate")
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={ckpt}", f"data.path={scenes}", "baselines=[ransac]", "sweep.enabled=false",
                      "progress_every=0", "plots.num_overlays=1")
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (VmHWM)
    assert cli.run(cfg, tmp_path / "run") == 0
    peak, after = _status_kib("VmHWM"), _status_kib("VmRSS")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 1000 and metrics["meta"]["num_instances"] == 1000
    with (tmp_path / "run" / "instances.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2000 and len({r["scene"] for r in rows}) == 1000
    # Instances are loaded and evaluated one at a time: nothing accumulates per file.
    assert (peak - before) * 1024 < 300 * 2**20, f"peak grew by {(peak - before) / 1024:.0f} MiB"
    assert (after - before) * 1024 < 150 * 2**20, f"RSS grew by {(after - before) / 1024:.0f} MiB"


@pytest.mark.slow
def test_a_5000_by_5000_instance_in_bounded_memory(tmp_path):
    size = 5000
    ckpt = make_checkpoint(tmp_path / "tiny.pt", "tiny")
    scenes = write_scenes(tmp_path / "big", 1, size)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={ckpt}", "data=scenes", f"data.path={scenes}",
           f"hydra.run.dir={tmp_path / 'run'}", "baselines=[ransac]", "sweep.enabled=false", "warmup=0",
           "progress_every=0", "plots.num_overlays=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    log = proc.stdout.read().decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, log[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 1
    with (tmp_path / "run" / "instances.csv").open() as f:
        row = next(csv.DictReader(f))
    assert int(row["m"]) == int(row["n"]) == size
    peak = usage.ru_maxrss * 1024
    bound = IDLE + BYTES_PER_MN * size * size
    print(f"{size} x {size}: peak RSS {peak / GIB:.2f} GiB (bound {bound / GIB:.2f} GiB), "
          f"forward {metrics['mean_time_s']:.1f} s")
    assert peak < bound, f"peak RSS {peak / GIB:.2f} GiB > {bound / GIB:.2f} GiB"
    assert peak < 24 * GIB
