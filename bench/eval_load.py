"""Memory and time of ``evaluate.py`` under load: single instances of growing size, and a scene
set of many small files.

    python bench/eval_load.py                                 # sizes 500 1000 2000 5000 + 1000 files
    python bench/eval_load.py --sizes 500 1000 --files 0      # quick
    python bench/eval_load.py --net tiny                      # the tests' tiny network

Each measurement is one fresh ``python evaluate.py`` process (random-weights checkpoint built
here, ``baselines=[ransac] sweep.enabled=false warmup=0``), so its peak resident memory is that
run's alone: ``ru_maxrss`` of the child from ``os.wait4`` (the kernel's VmHWM of that process).
For single instances of m = n points it prints the peak RSS, the peak above an idle baseline (a
5-point instance), that excess per m*n entry, and the seconds per instance (the model's forward,
``mean_time_s`` of metrics.json, and the process wall time). Memory is O(m n): the dense
(m, n) cost, plan and refinement weights dominate, so the bytes per m*n entry stay flat as the
size grows. For the file set it prints the wall time per instance and the peak RSS, which must
not grow with the number of files (instances are loaded one at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NETS = {
    "default": {},  # configs/model/bpnp.yaml widths: feature 128, depth 12, STN
    "tiny": dict(feature_dim=8, depth=1, ransac={"num_hypotheses": 64}),
}


def make_checkpoint(path: Path, net: str) -> Path:
    import torch

    from bpnp.runtime.checkpoint import save_weights_only
    from bpnp.models.network import BlindPnPNet

    torch.manual_seed(0)
    cfg = dict(NETS[net])
    return save_weights_only(path, BlindPnPNet(**cfg), cfg)


def write_scenes(folder: Path, count: int, points: int | tuple[int, int], seed: int = 0) -> Path:
    """``count`` synthetic scene files, ``points`` 2D points each (20 % 2D and 3D outliers, so
    that n = m)."""
    from bpnp.data.scenes import save_scene
    from bpnp.data.synthetic import SyntheticConfig, make_instance

    cfg = SyntheticConfig(num_points_2d=points, outlier_frac_2d=0.2, outlier_frac_3d=0.2)
    for i in range(count):
        save_scene(folder / f"{i:05d}.npz", make_instance(cfg, seed, i))
    return folder


def run_evaluate(ckpt: Path, scenes: Path, out: Path, *extra: str, threads: int | None = None) -> dict:
    """One ``evaluate.py`` process; returns its peak RSS (bytes), wall time and metrics.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={ckpt}", "data=scenes", f"data.path={scenes}",
           f"hydra.run.dir={out}", "baselines=[ransac]", "sweep.enabled=false", "warmup=0", "progress_every=0",
           "plots.num_overlays=1", *extra]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"evaluate.py failed ({code}); see {out.parent / (out.name + '.log')}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"peak_rss": usage.ru_maxrss * 1024, "wall_s": wall, "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[500, 1000, 2000, 5000])
    ap.add_argument("--files", type=int, default=1000, help="scene files of 50-100 points (0 = skip)")
    ap.add_argument("--net", choices=sorted(NETS), default="default")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the evaluate processes")
    args = ap.parse_args()

    gib = 2.0**30
    with tempfile.TemporaryDirectory(prefix="bpnp_eval_load_") as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(tmp / "random.pt", args.net)
        print(f"network: {args.net} (random weights); one fresh evaluate.py process per row; "
              f"baselines=[ransac], sweep off, warmup 0")
        base = run_evaluate(ckpt, write_scenes(tmp / "s5", 1, 5), tmp / "r5", threads=args.threads)
        print(f"idle baseline (5 points): peak RSS {base['peak_rss'] / gib:.2f} GiB")
        print(f"{'m = n':>7} {'m*n':>11} {'peak RSS':>10} {'excess':>9} {'B/(m*n)':>8} {'forward s':>10} {'process s':>10}")
        for size in args.sizes:
            scenes = write_scenes(tmp / f"s{size}", 1, size)
            r = run_evaluate(ckpt, scenes, tmp / f"r{size}", threads=args.threads)
            m = r["metrics"]["meta"]
            assert m["num_instances"] == 1
            mn = size * size
            excess = r["peak_rss"] - base["peak_rss"]
            print(f"{size:>7} {mn:>11,} {r['peak_rss'] / gib:>8.2f}Gi {excess / gib:>7.2f}Gi {excess / mn:>8.1f} "
                  f"{r['metrics']['mean_time_s']:>10.2f} {r['wall_s']:>10.1f}", flush=True)
        if args.files:
            scenes = write_scenes(tmp / "many", args.files, (50, 100))
            r = run_evaluate(ckpt, scenes, tmp / "rmany", threads=args.threads)
            n = r["metrics"]["n"]
            print(f"{n} scene files of 50-100 points: peak RSS {r['peak_rss'] / gib:.2f} GiB "
                  f"(baseline {base['peak_rss'] / gib:.2f}), forward {r['metrics']['mean_time_s'] * 1e3:.1f} ms per "
                  f"instance, {r['wall_s']:.0f} s wall ({r['wall_s'] / n * 1e3:.0f} ms per instance incl. loading, "
                  f"metrics, CSV, start-up)")


if __name__ == "__main__":
    main()
