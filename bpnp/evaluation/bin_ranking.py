"""How well the outlier bins rank the points: the inlier share among the points the second pass
keeps (a diagnostic for validation sets; it chooses nothing).

    python -m bpnp.evaluation.bin_ranking --ckpt checkpoints/bpnp_synthetic.pt --scenes scenes/val_shift/*out0.5 \\
        --keep 0.6 0.8

For every instance the checkpoint's matcher and OT node run (no pose), and each side's real points
are ranked by their bin's inlier probability (``inlier2d`` = 1 - the 2D point's bin mass,
``inlier3d`` likewise). Of the ``ceil(keep x count)`` best-ranked points (the second pass's choice,
``search.second_keep_2d`` / ``second_keep_3d``), the table gives per scene folder and side, as
means over instances: the inlier share of all points (a 2D point with a partner, a 3D point that
is one's partner), the inlier share of the kept points (precision) and the share of the inliers
that are kept (recall). A ranking no better than chance keeps the base share at a recall of
``keep``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["ranking_stats", "main"]


def ranking_stats(net, dataset, keep_2d: float, keep_3d: float) -> dict[str, float]:
    """Means over the scenes of ``dataset``: ``{side}_base``, ``{side}_precision``,
    ``{side}_recall`` for side ``2d`` and ``3d`` (shares in [0, 1]); ``n`` instances with inliers."""
    from bpnp.data.collate import collate_scenes
    from bpnp.models.network import likeliest_points

    if net.bins == "none":
        raise ValueError("bin_ranking: the checkpoint has no outlier bins (sinkhorn.bins none)")
    rows: dict[str, list[float]] = {f"{s}_{k}": [] for s in ("2d", "3d") for k in ("base", "precision", "recall")}
    net.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            scene = dataset[i]
            batch = collate_scenes([scene])
            out = net(batch, pose=False)
            match = torch.as_tensor(np.asarray(scene["match"]))
            true2 = match >= 0
            if not bool(true2.any()):
                continue
            true3 = torch.zeros(batch["p3d"].shape[1], dtype=torch.bool)
            true3[match[true2]] = True
            for side, score, mask, truth, keep in (("2d", out.inlier2d, batch["mask2d"], true2, keep_2d),
                                                   ("3d", out.inlier3d, batch["mask3d"], true3, keep_3d)):
                idx, kept = likeliest_points(score, mask, keep)
                chosen = truth[idx[0][kept[0]]]
                rows[f"{side}_base"].append(float(truth.float().mean()))
                rows[f"{side}_precision"].append(float(chosen.float().mean()))
                rows[f"{side}_recall"].append(float(chosen.sum()) / float(truth.sum()))
    stats = {k: float(np.mean(v)) if v else float("nan") for k, v in rows.items()}
    stats["n"] = len(rows["2d_base"])
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bpnp.evaluation.bin_ranking", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint (weights-only or Lightning)")
    ap.add_argument("--scenes", nargs="+", type=Path, required=True, metavar="DIR", help="scene folders (validation)")
    ap.add_argument("--keep", nargs=2, type=float, default=(0.6, 0.8), metavar=("KEEP_2D", "KEEP_3D"),
                    help="shares of each side's points kept (default 0.6 0.8)")
    args = ap.parse_args(argv)
    from bpnp.data.scenes import SceneDirectory
    from bpnp.runtime.checkpoint import CheckpointError, load_network

    keep_2d, keep_3d = args.keep
    if not (0 < keep_2d <= 1 and 0 < keep_3d <= 1):
        print(f"error: --keep: shares must lie in (0, 1], got {keep_2d} {keep_3d}", file=sys.stderr)
        return 2
    try:
        net = load_network(args.ckpt)
        sets = [(f"{d.parent.name}/{d.name}", SceneDirectory(d)) for d in args.scenes]
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"kept: {keep_2d:g} of the 2D points, {keep_3d:g} of the 3D points, by their bins' inlier probability")
    print("| scenes | n | 2D inliers | kept 2D: inliers (precision) | inliers kept (recall) "
          "| 3D inliers | kept 3D: inliers | inliers kept |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ds in sets:
        s = ranking_stats(net, ds, keep_2d, keep_3d)
        print(f"| {name} | {s['n']} | {s['2d_base']:.3f} | {s['2d_precision']:.3f} | {s['2d_recall']:.3f} "
              f"| {s['3d_base']:.3f} | {s['3d_precision']:.3f} | {s['3d_recall']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
