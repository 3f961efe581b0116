"""RANSAC's cost by the number of hypotheses: this tree's code against an earlier revision's, side
by side in one run.

    python bench/ransac.py --scenes scenes/timing_1000 --threads 1 --against 337b103

For each ``num_hypotheses`` the shipped checkpoint's RANSAC (its own settings: guided sampling on
a quarter of the hypotheses, relative gates, the 256 best poses returned for the search) runs on
the network's ``P`` of the first scene of ``--scenes``, twice per repeat: with
:func:`bpnp.geometry.ransac.ransac_pnp` of this tree and with the same function of revision
``--against`` (its ``bpnp/geometry/ransac.py`` and ``p3p.py`` read with ``git show``, so the
earlier code is timed as it was, not a copy of it). Both must give the same poses and ranking
(``R_top`` to 1e-6, the same inlier counts). Medians of ``--repeats``, contenders alternating.
Nothing here is a test; the numbers go to docs/benchmarks.md with this command. Needs the git
history (a clone has it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bpnp.geometry.ransac as rs  # noqa: E402


def module_at(rev: str, path: str, name: str, **overrides) -> types.ModuleType:
    """The module ``path`` of revision ``rev`` (``git show``), executed under ``name``, with
    ``overrides`` replacing names it imported (e.g. an earlier revision's P3P)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    mod = types.ModuleType(name)
    mod.__file__ = f"{rev}:{path}"
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    mod.__dict__.update(overrides)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=Path, default=Path("scenes/timing_1000"))
    ap.add_argument("--ckpt", default="checkpoints/bpnp_synthetic.pt")
    ap.add_argument("--hypotheses", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--against", default="337b103", help="the earlier revision (session 14's last commit)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bpnp.data.collate import collate_scenes
    from bpnp.data.scenes import SceneDirectory
    from bpnp.models.network import _geometric_inputs
    from bpnp.runtime.checkpoint import load_network

    old_p3p = module_at(args.against, "bpnp/geometry/p3p.py", "p3p_before")
    old = module_at(args.against, "bpnp/geometry/ransac.py", "ransac_before", p3p=old_p3p.p3p)
    net = load_network(args.ckpt).eval()
    batch = collate_scenes([SceneDirectory(args.scenes)[0]])
    with torch.no_grad():
        out = net(batch, generator=rs.seeded_generator(0, 0))
        bearings, points = _geometric_inputs(batch["p2d"], batch["p3d"], batch["mask2d"], batch["mask3d"])
        kw = net._ransac_call_kwargs(net._gate_factor(bearings, batch["mask2d"]))
        m = int(batch["mask2d"].sum())
        print(f"# RANSAC at m = {m}: torch {torch.__version__}, {args.threads} thread(s), b = 1, guided {kw['guided']}, "
              f"256 poses returned, median of {args.repeats}")
        print(f"| hypotheses | {args.against} s | this tree s | {args.against} / this tree | same poses and ranking |")
        print("|---|---|---|---|---|")
        for H in args.hypotheses:
            kw["num_hypotheses"] = H
            times: dict[str, list[float]] = {"before": [], "now": []}
            results = {}
            for _ in range(args.repeats):
                for name, fn in (("before", old.ransac_pnp), ("now", rs.ransac_pnp)):
                    t0 = time.perf_counter()
                    results[name] = fn(out.P, bearings, points, batch["mask2d"], batch["mask3d"],
                                       generator=rs.seeded_generator(0, 0), top_hypotheses=256, **kw)
                    times[name].append(time.perf_counter() - t0)
            a, b = results["before"], results["now"]
            same = (torch.equal(a.num_inliers, b.num_inliers) and torch.equal(a.num_valid_hypotheses, b.num_valid_hypotheses)
                    and torch.allclose(a.R_top, b.R_top, atol=1e-6))
            d, s = statistics.median(times["before"]), statistics.median(times["now"])
            print(f"| {H} | {d:.3f} | {s:.3f} | **{d / s:.2f}x** | {same} |")


if __name__ == "__main__":
    main()
