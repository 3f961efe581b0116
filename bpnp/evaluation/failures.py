"""Where the pipeline fails: per failed instance, is the pose search's score wrong, or did no start
come near the pose? (A diagnostic for validation sets; it chooses nothing.)

    python -m bpnp.evaluation.failures --ckpt checkpoints/bpnp_synthetic.pt --scenes scenes/val_shift/*

For every instance the checkpoint's forward runs with its own settings (RANSAC drawing from
``seeded_generator(0, index)`` with the index within its folder, as ``evaluate.py`` does). For each failure
(docs/metrics.md) it then measures:

- **score**: the consensus (:func:`bpnp.geometry.pose_search.pose_search`'s count of mutual
  matches within the final gate) of the search started from the chosen pose and from the true
  pose. If the true pose's is the larger, the search's score would have preferred the truth:
  the failure is one of *search* (no start reached the truth's basin), not of scoring;
- **starts**: whether any of RANSAC's hypotheses (all ``ransac.num_hypotheses`` of them, ranked
  as RANSAC ranks them) lies within 5 degrees of the true rotation, and whether one of those was
  among the poses the search started from;
- **candidates**: how many of RANSAC's candidate pairs (the top-``K`` entries of ``P``) are true
  pairs, against the successes' (the inlier rate that RANSAC's sampling works with).

One table row per scene folder. Costs about three forwards per failure.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpnp.so3 import geodesic_angle

__all__ = ["diagnose", "format_table", "main"]

NEAR_DEG = 5.0


def _rotation_errors_deg(R: torch.Tensor, R_true: torch.Tensor) -> torch.Tensor:
    """(k,) angles in degrees between the (k, 3, 3) rotations and the true (3, 3) one (NaN for a
    non-finite rotation, which no threshold test passes)."""
    return torch.rad2deg(geodesic_angle(R.double(), R_true.double().expand_as(R)))


def diagnose(net, dataset) -> dict[str, Any]:
    """Counts over the scenes of ``dataset`` (scene dicts) for :func:`format_table`."""
    from bpnp.data.collate import collate_scenes
    from bpnp.evaluation.runner import instance_errors
    from bpnp.geometry.pose_search import pose_search
    from bpnp.geometry.ransac import default_top_k, ransac_pnp, seeded_generator
    from bpnp.models.network import _geometric_inputs

    net.eval()
    s = net.search_settings
    out_rows = {"n": 0, "success": 0, "failures": 0, "truth_scores_higher": 0, "near_start": 0, "near_in_starts": 0,
                "cand_true_fail": [], "cand_true_ok": [], "consensus_chosen": [], "consensus_true": []}
    for i in range(len(dataset)):
        scene = dataset[i]
        batch = collate_scenes([scene])
        with torch.no_grad():
            out = net(batch, generator=seeded_generator(0, i))
        ok = instance_errors(out.R[0], out.t[0], scene)["success"]
        out_rows["n"] += 1
        out_rows["success"] += ok
        match = torch.as_tensor(np.asarray(scene["match"]))
        P = out.P[0]
        K = int(default_top_k(torch.tensor(P.shape[0])))
        flat = P.flatten().topk(min(K, P.numel())).indices
        cand_true = float((match[flat // P.shape[1]] == flat % P.shape[1]).float().mean())
        out_rows["cand_true_ok" if ok else "cand_true_fail"].append(cand_true)
        if ok:
            continue
        out_rows["failures"] += 1
        bearings, points = _geometric_inputs(batch["p2d"], batch["p3d"], batch["mask2d"], batch["mask3d"])
        factor = net._gate_factor(bearings, batch["mask2d"])
        R_true = torch.as_tensor(np.asarray(scene["R"]), dtype=torch.float64).reshape(3, 3)
        t_true = torch.as_tensor(np.asarray(scene["t"]), dtype=torch.float64).reshape(3)
        args = (P[None], bearings, points, batch["mask2d"], batch["mask3d"])
        kw = net._search_call_kwargs(factor)
        with torch.no_grad():
            chosen = pose_search(*args, out.R0[:, None], out.t0[:, None], **kw)
            truth = pose_search(*args, R_true[None, None].to(P.dtype), t_true[None, None].to(P.dtype), **kw)
            ransac_kwargs = net._ransac_call_kwargs(factor)
            H = ransac_kwargs["num_hypotheses"]
            rs = ransac_pnp(*args, generator=seeded_generator(0, i), top_hypotheses=H, **ransac_kwargs)
            # The starts the forward searched from: RANSAC's best-ranked pool, re-ranked as configured.
            pool = max(s.hypotheses, s.rerank_pool)
            starts, _ = net._search_starts(*args, rs.R_top[:, :pool], rs.t_top[:, :pool], factor)
            starts = starts[:, :s.hypotheses]
        c_chosen, c_true = int(chosen.consensus[0]), int(truth.consensus[0])
        out_rows["consensus_chosen"].append(c_chosen)
        out_rows["consensus_true"].append(c_true)
        out_rows["truth_scores_higher"] += c_true > c_chosen
        out_rows["near_start"] += bool((_rotation_errors_deg(rs.R_top[0], R_true) < NEAR_DEG).any())
        out_rows["near_in_starts"] += bool((_rotation_errors_deg(starts[0], R_true) < NEAR_DEG).any())
    return out_rows


def _median(x: list[float]) -> float:
    return float(np.median(x)) if x else math.nan


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| scenes | n | success | failures | of which the true pose has the larger consensus | median consensus, "
             "chosen / true | a RANSAC pose within 5 deg | ... among the search's starts | true share of RANSAC's "
             "candidates, failures / successes (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n']} | {r['success']} | {r['failures']} | {r['truth_scores_higher']} | "
                     f"{_median(r['consensus_chosen']):.0f} / {_median(r['consensus_true']):.0f} | {r['near_start']} | "
                     f"{r['near_in_starts']} | {100 * _median(r['cand_true_fail']):.1f} % / "
                     f"{100 * _median(r['cand_true_ok']):.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bpnp.evaluation.failures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint (weights-only or Lightning)")
    ap.add_argument("--scenes", nargs="+", type=Path, required=True, metavar="DIR", help="scene folders (validation)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="network setting over the checkpoint's (e.g. search.rerank_pool=256)")
    args = ap.parse_args(argv)
    from bpnp.data.scenes import SceneDirectory
    from bpnp.runtime.checkpoint import CheckpointError, load_network, parse_set_overrides

    try:
        net = load_network(args.ckpt, overrides=parse_set_overrides(args.overrides))
        sets = [(d.name, SceneDirectory(d)) for d in args.scenes]
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table([(name, diagnose(net, ds)) for name, ds in sets]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
