"""Choose the refinement's robust scale of a trained network on its run's VALIDATION split.

    python -m bpnp.evaluation.tune_robust_scale logs/bpnp_synthetic/runs/<run>
    python -m bpnp.evaluation.tune_robust_scale <run> --ckpt <run>/checkpoints/last.ckpt --scales 1e-3 1e-4
    python -m bpnp.evaluation.tune_robust_scale <run> --ckpt <other run>/checkpoints/last.ckpt   # compare runs on one split
    python -m bpnp.evaluation.tune_robust_scale <run> --set ransac.num_hypotheses=2048   # other inference settings fixed
    python -m bpnp.evaluation.tune_robust_scale <run> --gates none 0.01 0.02   # also the refinement's gate (radians)

Rebuilds the validation split exactly as training did (the run's ``.hydra/config.yaml``: data
source, seed, ``val_synthetic``, ``val_length``), runs the network in eval mode once per batch
(RANSAC random numbers seeded per batch as in validation), then the refinement alone with each
scale (``BlindPnPNet.refine_pose``), and prints the success rate of each,
plus the RANSAC pose's and the match accuracy (true pairs that are their row's maximum of P; it
does not depend on the scale). ``--ckpt`` may come from another run, which puts checkpoints of
different runs on the same validation split; ``--set`` fixes other inference settings (RANSAC
hypotheses, ...) for every scale. The test split is never touched, so the chosen values can be
written into a weights-only checkpoint (``export_weights --set refine.robust_scale=...``) or passed as
``evaluate.py net_overrides={refine.robust_scale: ...}`` without selecting on test data.

Why a separate step: the scale is an inference setting of the refinement. With a diffuse
correspondence matrix, wrong pairs within a few degrees bias the refined pose, and the best
scale at test time can be smaller than the one the pose loss was trained with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bpnp.runtime.checkpoint import CheckpointError, load_network, parse_set_overrides


def validation_success(net, loader, scales: list[float], seed: int = 0,
                       inliers: dict[str, float] | None = None,
                       gates: list[float | None] | None = None) -> tuple[dict, float, float]:
    """Success rate (docs/metrics.md definition) of ``net`` over ``loader`` for each refinement scale
    (keys: the scales; with ``gates``, ``(gate, scale)`` pairs for each ``refine.gate`` in
    ``gates``, None = no gate), of the RANSAC pose, and the mean per-item match accuracy; RANSAC draws from
    ``seed * 1_000_003 + batch_index`` (as validation). A network with outlier bins also fills
    ``inliers`` (when given) with the mean per-item precision / recall of its inlier decision
    (``precision_2d``, ``recall_2d``, ``precision_3d``, ``recall_3d``)."""
    from bpnp.geometry.metrics import pose_errors
    from bpnp.geometry.ransac import seeded_generator
    from bpnp.geometry.correspondences import inlier_precision_recall, match_accuracy

    keys = list(scales) if gates is None else [(g, s) for g in gates for s in scales]
    hits = {key: [] for key in keys}
    ransac, matched = [], []
    pr_all: dict[str, list[torch.Tensor]] = {}
    for k, batch in enumerate(loader):
        args = (batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch.get("mask3d"))
        with torch.no_grad():  # encoders, Sinkhorn and RANSAC once; only the refinement depends on the scale
            out = net(batch, generator=seeded_generator(seed, k, "cpu"), refine=False)
            for key in keys:
                gate, s = (None, key) if gates is None else key
                net.configure(refine={"robust_scale": float(s), **({} if gates is None else {"gate": gate})})
                refined = net.refine_pose(out, batch)
                hits[key].append(pose_errors(refined.R, refined.t, *args)["success"].float())
        ransac.append(pose_errors(out.R0, out.t0, *args)["success"].float())
        matched.append(match_accuracy(out.P, batch["match"], batch["mask2d"], batch.get("mask3d")))
        if out.inlier2d is not None:
            pr = inlier_precision_recall(out.inlier2d, out.inlier3d, batch["match"], batch["mask2d"], batch.get("mask3d"))
            for key, v in pr.items():
                pr_all.setdefault(key, []).append(v)
    if inliers is not None:
        for key, v in pr_all.items():
            v = torch.cat(v)
            inliers[key] = float(v[~v.isnan()].mean()) if bool((~v.isnan()).any()) else float("nan")
    acc = torch.cat(matched)
    acc = acc[~acc.isnan()]  # items without a true pair
    match_acc = float(acc.mean()) if acc.numel() else float("nan")
    return {s: float(torch.cat(v).mean()) for s, v in hits.items()}, float(torch.cat(ransac).mean()), match_acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a train.py run directory (with .hydra/config.yaml)")
    ap.add_argument("--ckpt", default=None, help="checkpoint to tune (default <run_dir>/checkpoints/last.ckpt)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 5e-5])
    ap.add_argument("--gates", nargs="+", default=None, metavar="RADIANS|none",
                    help="also try these refine.gate values (radians, or none), every one with every scale")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another network (inference) setting for every scale, e.g. ransac.num_hypotheses=2048 (repeatable)")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    cfg_path = run / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        print(f"error: {cfg_path} not found (pass a train.py run directory)", file=sys.stderr)
        return 2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cfg_path)
    try:
        net = load_network(args.ckpt or run / "checkpoints" / "last.ckpt", overrides=parse_set_overrides(args.overrides))
    except (CheckpointError, ValueError) as exc:  # SettingError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dm = instantiate(cfg.data)
    dm.setup("validate")
    loader = dm.val_dataloader()
    gates = None
    if args.gates is not None:
        try:
            gates = [None if g.lower() == "none" else float(g) for g in args.gates]
        except ValueError:
            print(f"error: --gates: expected angles in radians or 'none', got {args.gates}", file=sys.stderr)
            return 2
    inliers: dict[str, float] = {}
    success, ransac, match_acc = validation_success(net, loader, list(args.scales), seed=int(cfg.model.get("eval_seed", 0)),
                                                    inliers=inliers, gates=gates)
    print(f"validation split: {len(dm.dataset('val'))} instances; match accuracy {match_acc:.4f}; "
          f"RANSAC pose alone: success {ransac:.3f}")
    if inliers:
        print("outlier bins' inlier decision (p > 0.5): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(inliers.items())))
    if gates is None:
        for s in args.scales:
            print(f"refine.robust_scale {s:g}: success {success[s]:.3f}")
        best = max(args.scales, key=lambda s: (success[s], s))  # ties: the larger scale (wider basin)
        print(f"best: refine.robust_scale={best:g}")
        return 0
    for g, s in success:
        print(f"refine.gate {g if g is None else f'{g:g}'} refine.robust_scale {s:g}: success {success[(g, s)]:.3f}")
    # ties: no gate before a gate, a wider gate before a narrower one, the larger scale
    g, s = max(success, key=lambda k: (success[k], k[0] is None, k[0] or 0.0, k[1]))
    print(f"best: refine.gate={'null' if g is None else f'{g:g}'} refine.robust_scale={s:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
