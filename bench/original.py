"""The ORIGINAL BPnPNet, timed through its harness ../shared/tools/refbench/refbench.py, for the
side-by-side benchmarks (bench/train_step.py, bench/nodes.py).

The harness imports the original (../shared/reference/bpnpnet, MIT, unedited) and times one
component (``full`` training step, ``sinkhorn`` or ``pnp`` layer) in a child process; its last
stdout line is a JSON record, and ``--save-inputs`` writes the exact inputs so that bpnp can be
timed on the same ones. :func:`run` calls it with one warm-up and one timed repetition, so that a
caller can alternate original and bpnp repetitions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The harness, in ../shared relative to the repository.
REFBENCH = ROOT.parent / "shared" / "tools" / "refbench" / "refbench.py"


def available() -> bool:
    return REFBENCH.is_file()


def missing_message() -> str:
    return (f"NOTE: the original BPnPNet is not timed: {REFBENCH} not found (the reference and its harness live "
            f"in ../shared, absent here); only bpnp is timed.")


def run(component: str, b: int, m: int, n: int, threads: int, seed: int = 0, save_inputs: str | None = None,
        count: bool = False, warmup: int = 1) -> dict:
    """One timed repetition of the original's ``component`` after ``warmup`` untimed ones, in a
    child process with ``threads`` threads; the harness's JSON record (times in seconds).
    ``count``: also the harness's untimed pass that counts Sinkhorn iterations / L-BFGS
    evaluations (``checks``)."""
    cmd = [sys.executable, str(REFBENCH), "--component", component, "--b", str(b), "--m", str(m), "--n", str(n),
           "--threads", str(threads), "--repeats", "1", "--warmup", str(warmup), "--seed", str(seed)]
    if not count:
        cmd.append("--no-count")
    if save_inputs:
        cmd += ["--save-inputs", save_inputs]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"refbench {component} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
