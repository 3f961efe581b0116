"""Dense against sparse (top-k pairs per row of P) refinement on a run's VALIDATION split.

    python bench/refine_pairs.py logs/bpnp_synthetic/runs/2026-11-30_12-32-21 --ckpt checkpoints/bpnp_synthetic.pt
    python bench/refine_pairs.py <run> --ckpt <ckpt> --ks 1 2 4 8 --val-length 256 --set robust_scale=5e-5

Rebuilds the run's validation split as training did (``.hydra/config.yaml``: source, seed,
``val_synthetic``; ``--val-length`` takes more instances of the same validation stream, never the
test stream), runs the network once per batch in eval mode (encoders, Sinkhorn, RANSAC seeded per
batch as in validation), then the refinement alone (``BlindPnPNet.refine_pose``) dense
(``refine.top_k = None``, float32 as today, and in float64 for reference) and with each ``k``
(float64, as the network solves the sparse problem), all at the checkpoint's inference settings (plus
``--set``). Prints per setting: success rate, median rotation error (deg), median centre error
(relative to the median depth), median translation error, the LM iterations per item, and the refinement's time per batch
(forward only, medians over batches, settings alternating); and, against dense (float32), how
many items only one of the two solves and the median and 90th percentile of the per-item change
in rotation error. Nothing here touches
a test split, so a ``k`` chosen from it can be the config's default.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _dense64(net, out, batch):
    """Today's dense refinement (gate included) solved in float64: what the network's ``_refine``
    does with ``top_k = None``, on float64 copies."""
    from bpnp.models.network import _consensus_mask, _geometric_inputs

    mask2d, mask3d = batch["mask2d"], batch["mask3d"]
    b, p = (x.double() for x in _geometric_inputs(batch["p2d"], batch["p3d"], mask2d, mask3d))
    P, R0, t0 = out.P.double(), out.R0.double(), out.t0.double()
    if net.refine_gate is not None:
        P = P * _consensus_mask(b, p, R0, t0, net.refine_gate).double()
    res = net.pnp(P, b, p, R0, t0, mask2d, mask3d)
    return replace(out, R=res.R.float(), t=res.t.float(), pnp_status=res.status, pnp_iterations=res.iterations)


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
    modes = [None, "dense64"] + list(args.ks)
    errs = {k: {"rot": [], "center": [], "t": [], "success": [], "iters": []} for k in modes}
    times = {k: [] for k in modes}
    for bi, batch in enumerate(loader):
        with torch.no_grad():
            out = net(batch, generator=seeded_generator(seed, bi, "cpu"), refine=False)
            ref = (batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch.get("mask3d"))
            for k in modes:
                net.configure(refine={**base, "top_k": None if k == "dense64" else k})
                t0 = time.perf_counter()
                refined = _dense64(net, out, batch) if k == "dense64" else net.refine_pose(out, batch)
                times[k].append(time.perf_counter() - t0)
                errs[k]["iters"].append(refined.pnp_iterations.double())
                e = pose_errors(refined.R, refined.t, *ref)
                for key, name in (("rot", "rot_err_deg"), ("center", "center_err_rel"), ("t", "t_err"), ("success", "success")):
                    errs[k][key].append(e[name].double())
    n = sum(len(x) for x in errs[None]["success"])
    print(f"validation split of {run} ({n} instances, batches of {loader.batch_size}); checkpoint {args.ckpt}; "
          f"refinement {base}, ransac_hypotheses {net.ransac_kwargs['num_hypotheses']}, "
          f"{torch.get_num_threads()} thread(s)")
    cat = {k: {key: torch.cat(v) for key, v in d.items()} for k, d in errs.items()}
    dense = cat[None]
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
        name = {None: "dense (float32, today)", "dense64": "dense, float64"}.get(k, f"top-{k} per row (float64)")
        print(f"| {name} | {float(c['success'].mean()):.3f} | "
              f"{float(c['rot'].median()):.4f} | {float(c['center'].median()):.5f} | {float(c['t'].median()):.5f} | "
              f"{only_dense} | {only_this} | {drot} | {int(c['iters'].median())} / {int(c['iters'].max())} | "
              f"{statistics.median(times[k]):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
