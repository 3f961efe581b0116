"""Dense against sparse (top-k pairs per row of P) refinement on a run's VALIDATION split.

    python bench/refine_pairs.py logs/bpnp_synthetic/runs/2026-11-30_12-32-21 --ckpt checkpoints/bpnp_synthetic.pt
    python bench/refine_pairs.py <run> --ckpt <ckpt> --ks 1 2 4 8 --val-length 256 --set robust_scale=5e-5

Rebuilds the run's validation split as training did (``.hydra/config.yaml``: source, seed,
``val_synthetic``; ``--val-length`` takes more instances of the same validation stream, never the
test stream), runs the network once per batch in eval mode (encoders, Sinkhorn, RANSAC seeded per
batch as in validation), then the refinement alone (``BlindPnPNet.refine_pose``) dense
(``refine.top_k = None``) in the network's float32 and in float64 (``refine.dtype``), and with
each ``k`` in float64 (the shipped working precision), all at the checkpoint's inference settings
(plus ``--set``). Prints per setting: success rate, median rotation error (deg), median centre error
(relative to the median depth), median translation error, the LM iterations per item, and the refinement's time per batch
(forward only, medians over batches, settings alternating); and, against dense (float32), how
many items only one of the two solves and the median and 90th percentile of the per-item change
in rotation error. Nothing here touches
a test split, so a ``k`` chosen from it can be the config's default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bpnp.geometry.metrics import pose_errors
    from bpnp.geometry.ransac import seeded_generator
    from bpnp.runtime.checkpoint import load_network, parse_set_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--ckpt", default=None, help="default <run_dir>/checkpoints/last.ckpt")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--val-length", type=int, default=None, help="instances of the validation stream (default: the run's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    if args.val_length is not None:
        cfg.data.val_length = int(args.val_length)
    net = load_network(args.ckpt or run / "checkpoints" / "last.ckpt", overrides=parse_set_overrides(args.overrides))
    dm = instantiate(cfg.data)
    dm.setup("validate")
    loader = dm.val_dataloader()
    seed = int(cfg.model.get("eval_seed", 0))
    base = net.refine_settings.to_dict()
    # (top_k, dtype): dense in the network's float32 (the reference of the comparisons), dense in
    # float64, then each k in float64 (the shipped working precision, RefineSettings.dtype).
    modes = [(None, "input"), (None, "float64")] + [(k, "float64") for k in args.ks]
    errs = {k: {"rot": [], "center": [], "t": [], "success": [], "iters": []} for k in modes}
    times = {k: [] for k in modes}
    for bi, batch in enumerate(loader):
        with torch.no_grad():
            out = net(batch, generator=seeded_generator(seed, bi, "cpu"), refine=False)
            ref = (batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch.get("mask3d"))
            for k in modes:
                net.configure(refine={**base, "top_k": k[0], "dtype": k[1]})
                t0 = time.perf_counter()
                refined = net.refine_pose(out, batch)
                times[k].append(time.perf_counter() - t0)
                errs[k]["iters"].append(refined.pnp_iterations.double())
                e = pose_errors(refined.R, refined.t, *ref)
                for key, name in (("rot", "rot_err_deg"), ("center", "center_err_rel"), ("t", "t_err"), ("success", "success")):
                    errs[k][key].append(e[name].double())
    n = sum(len(x) for x in errs[modes[0]]["success"])
    print(f"validation split of {run} ({n} instances, batches of {loader.batch_size}); checkpoint {args.ckpt}; "
          f"refinement {base}, ransac_hypotheses {net.ransac_kwargs['num_hypotheses']}, "
          f"{torch.get_num_threads()} thread(s)")
    cat = {k: {key: torch.cat(v) for key, v in d.items()} for k, d in errs.items()}
    dense = cat[modes[0]]
    print("| refinement | success | median rot err (deg) | median centre err (rel.) | median t err | "
          "only dense solves | only this solves | per-item change of rot err vs dense: median / 90 % (deg) | "
          "LM iterations: median / max | refinement time per batch (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in modes:
        c = cat[k]
        only_dense = int((dense["success"].bool() & ~c["success"].bool()).sum())
        only_this = int((~dense["success"].bool() & c["success"].bool()).sum())
        d = (c["rot"] - dense["rot"]).abs()
        drot = f"{float(d.median()):.4f} / {float(d.quantile(0.9)):.4f}"
        name = ("dense" if k[0] is None else f"top-{k[0]} per row") + (" (float32)" if k[1] == "input" else " (float64)")
        print(f"| {name} | {float(c['success'].mean()):.3f} | "
              f"{float(c['rot'].median()):.4f} | {float(c['center'].median()):.5f} | {float(c['t'].median()):.5f} | "
              f"{only_dense} | {only_this} | {drot} | {int(c['iters'].median())} / {int(c['iters'].max())} | "
              f"{statistics.median(times[k]):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
