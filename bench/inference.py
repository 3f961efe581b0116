"""Inference time per instance, by stage, for several inference settings of one checkpoint.

    python bench/inference.py --scenes scenes/timing_1000
    python bench/inference.py --scenes scenes/timing_1000 --variant refine.top_k=null --variant refine.top_k=4 \
        --variant refine.top_k=4,ransac.num_hypotheses=512

What ``evaluate.py``'s ``mean_time_s`` measures (forward only, b = 1, eval mode, no grad, RANSAC
seeded per instance as evaluate.py seeds it), split by the network's stage timer (encoders,
Sinkhorn, RANSAC, the pose search, its second pass, refinement), with the success rate and median rotation error of each variant.
A variant is a comma-separated list of ``group.key=value`` settings over the checkpoint's
(``ransac.*``, ``refine.*``, ``search.*``, ``gates.*``; YAML values, ``null`` = None). Variants alternate per instance (one
untimed warm-up forward first), so that machine load hits them alike; the means are over the
instances of ``--scenes`` after ``--warmup-passes`` untimed passes over all of them. One thread
unless ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpnp.evaluation.ablate import INFERENCE_GROUPS  # noqa: E402

STAGES = ("encoders", "sinkhorn", "ransac", "search", "second_pass", "refinement")


def parse_variant(text: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        group, _, name = key.partition(".")
        if group not in INFERENCE_GROUPS or not name or not _:
            raise SystemExit(f"--variant: expected GROUP.KEY=VALUE items with GROUP one of {', '.join(INFERENCE_GROUPS)}, "
                             f"got {item!r}")
        out.setdefault(group, {})[name] = yaml.safe_load(value)
    return out


def main() -> None:
    from bpnp.data.collate import collate_scenes
    from bpnp.geometry.metrics import pose_errors
    from bpnp.geometry.ransac import seeded_generator
    from bpnp.runtime.checkpoint import load_network

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="checkpoints/bpnp_synthetic.pt")
    ap.add_argument("--scenes", default="scenes/timing_1000", help="a directory of scene .npz files")
    ap.add_argument("--variant", action="append", default=None,
                    help="settings over the checkpoint's (default: refine.top_k=null and the checkpoint's own)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="RANSAC seed (evaluate.py's seed)")
    ap.add_argument("--warmup-passes", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(Path(args.scenes).glob("*.npz"))
    if not files:
        raise SystemExit(f"no .npz scenes in {args.scenes}")
    scenes = [dict(np.load(f)) for f in files]
    net = load_network(args.ckpt)
    net.profile = True
    base = net.settings()
    texts = args.variant or ["refine.top_k=null", ""]
    variants = [(t or "checkpoint's settings", parse_variant(t)) for t in texts]
    rec = {name: {"total": [], **{s: [] for s in STAGES}, "success": [], "rot": []} for name, _ in variants}
    with torch.no_grad():
        for p in range(args.warmup_passes + 1):
            for i, scene in enumerate(scenes):
                batch = collate_scenes([scene])
                for name, v in variants:
                    net.configure(**{g: {**base[g], **v.get(g, {})} for g in INFERENCE_GROUPS})
                    t0 = time.perf_counter()
                    out = net(batch, generator=seeded_generator(args.seed, i, "cpu"))
                    dt = time.perf_counter() - t0
                    if p < args.warmup_passes:
                        continue
                    r = rec[name]
                    r["total"].append(dt)
                    for s in STAGES:
                        r[s].append(net.last_timings.get(s, 0.0))  # no "search" / "second_pass" lap when off
                    e = pose_errors(out.R, out.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"],
                                    batch["mask3d"])
                    r["success"].append(float(e["success"][0]))
                    r["rot"].append(float(e["rot_err_deg"][0]))
    m = {len(s["p2d"]) for s in scenes}
    print(f"{args.ckpt} on {args.scenes} ({len(scenes)} instances, m = {sorted(m)}), {torch.get_num_threads()} thread(s), "
          f"forward only, b = 1; checkpoint settings " + ", ".join(f"{g} {base[g]}" for g in INFERENCE_GROUPS))
    print("| variant | mean time per instance s | " + " | ".join(STAGES) + " | success | median rot err deg |")
    print("|---" * (4 + len(STAGES)) + "|")
    for name, _ in variants:
        r = rec[name]
        print(f"| {name} | **{statistics.mean(r['total']):.3f}** | "
              + " | ".join(f"{statistics.mean(r[s]):.3f}" for s in STAGES)
              + f" | {statistics.mean(r['success']):.2f} | {statistics.median(r['rot']):.3f} |")


if __name__ == "__main__":
    main()
