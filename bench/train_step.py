"""Time of one BlindPnPNet training step (forward + backward, pose loss on), split by stage.

    python bench/train_step.py                 # b = 8, m = n = 256 and 1000 (3 repeats each)
    python bench/train_step.py --sizes 256     # the quick case only
    python bench/train_step.py --robust geman_mcclure   # with the configs' robust kernel
    python bench/train_step.py --knn 16        # the original encoders with the local-geometry stem
    python bench/train_step.py --networks attention   # only the default network

Two networks are timed side by side in one run, steps alternating (``--networks``): the original
encoders (``bpnpnet``: feature 128, depth 12, STN, uniform marginals, ``--knn`` stem) and the
default matcher (``attention``: configs/model/net/attention.yaml widths, outlier bins), and the
ratio of their steps is printed.

Setting as in docs/REFERENCE_BPNPNET.md "Measured": random weights, training mode, correspondence + pose loss (refinement on),
synthetic inputs, torch threads = 2. Stages:

- forward: encoders (incl. STN and cost), OT (Sinkhorn), RANSAC, refinement (LM);
- backward: refinement (IFT, until the gradient reaches P), OT (until it reaches M), the rest
  (encoders), timed with tensor hooks on P and M.

The refinement objective defaults to the original's (``--robust none``, plain P-weighted angular
error) so the comparison is like for like. Measured numbers, with this command, are in docs/benchmarks.md
("Training step"); a robust kernel costs O(mn) per refinement iteration (no ``a = W^T B``
shortcut), so run ``--robust geman_mcclure`` to see the configs' default.

"Geometric layers" = OT + RANSAC + refinement, forward and backward, the quantity the reference
reports as 60-90 % of its step. The reference numbers are printed beside ours with the ratios.
Times are medians of ``--repeats`` steps after one warm-up step at each size (the first step at
a new size pays for allocations). The correspondence loss is the original's linear one (the loss
form does not change the cost of any layer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpnp.data.collate import collate_scenes  # noqa: E402
from bpnp.data.synthetic import SyntheticConfig, make_instance  # noqa: E402
from bpnp.models import BlindPnPNet  # noqa: E402
from bpnp.training.losses import BlindPnPLoss  # noqa: E402

#: docs/REFERENCE_BPNPNET.md, b = 8, full model, training step (s), and its geometric layers.
REFERENCE = {256: {"step": 1.95, "geometric": 1.3}, 1000: {"step": 14.3, "geometric": 12.9}}
STAGES = ("encoders", "ot_fwd", "ransac", "refine_fwd", "refine_bwd", "ot_bwd", "encoders_bwd")


def make_batch(b: int, n: int, seed: int = 0) -> dict:
    cfg = SyntheticConfig(num_points_2d=n, outlier_frac_2d=0.0, outlier_frac_3d=0.0)
    return collate_scenes([make_instance(cfg, seed, i) for i in range(b)])


def one_step(net: BlindPnPNet, loss_fn: BlindPnPLoss, opt: torch.optim.Optimizer, batch: dict) -> dict[str, float]:
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = net(batch, refine=True)
    fwd = dict(net.last_timings)
    loss = loss_fn(out, batch, epoch=0).loss
    marks: dict[str, float] = {}

    def mark(name):
        def hook(grad):
            marks.setdefault(name, time.perf_counter())
        return hook

    out.P.register_hook(mark("P"))
    out.M.register_hook(mark("M"))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    return {
        "encoders": fwd["encoders"], "ot_fwd": fwd["sinkhorn"], "ransac": fwd["ransac"], "refine_fwd": fwd["refinement"],
        "refine_bwd": marks.get("P", t1) - t1, "ot_bwd": marks.get("M", t1) - marks.get("P", t1),
        "encoders_bwd": t2 - marks.get("M", t1), "forward": t1 - t0, "backward": t2 - t1, "step": t2 - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1000])
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per size (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--robust", default="none",
                    help="refinement kernel: none = the original's objective (default, like for like); "
                         "geman_mcclure = configs/model/bpnp.yaml's default")
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormal floats to zero")
    ap.add_argument("--knn", type=int, default=16,
                    help="neighbours of the bpnpnet encoders' local-geometry stem (0 = the original's encoders; 16 = "
                         "the previous main job's)")
    ap.add_argument("--networks", nargs="+", default=["bpnpnet", "attention"], choices=["bpnpnet", "attention"],
                    help="networks timed side by side (steps alternate)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # As train.py does (configs/train.yaml flush_denormal): gradients reaching the encoders are
    # scaled by P ~ 1/(m n) and go denormal at 1000 points, which makes the encoder backward
    # ~20x slower on x86 CPUs (measured: 11.8 s vs 0.6 s); --keep-denormals shows that.
    torch.set_flush_denormal(not args.keep_denormals)
    nets = {}
    for name in args.networks:
        torch.manual_seed(0)
        if name == "bpnpnet":  # the original's widths
            net = BlindPnPNet(matcher="bpnpnet", feature_dim=128, depth=12, use_stn=True, knn=args.knn, bins="none",
                              robust=args.robust)
        else:  # configs/model/net/attention.yaml and configs/model/bpnp.yaml
            net = BlindPnPNet(matcher="attention", feature_dim=128, depth=3, heads=4, knn=16, bins="shared",
                              robust=args.robust)
        net.train()
        net.profile = True
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-3)
        nets[name] = (net, opt)
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{name}: {n_params / 1e6:.2f} M parameters")
    loss_fn = BlindPnPLoss(corr_weight=1.0, pose_weight=1.0, pose_start_epoch=0, corr_kind="linear")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, training mode, pose loss on, "
          f"refinement kernel {args.robust}, knn stem of bpnpnet {args.knn}")
    for n in args.sizes:
        warm, batch = make_batch(args.batch, n, seed=99), make_batch(args.batch, n)
        runs = {name: [] for name in nets}
        for name, (net, opt) in nets.items():
            one_step(net, loss_fn, opt, warm)  # warm-up at this size
        for _ in range(args.repeats):  # alternate, so that machine load hits both alike
            for name, (net, opt) in nets.items():
                runs[name].append(one_step(net, loss_fn, opt, batch))
        steps = {}
        for name, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            steps[name] = med["step"]
            geo = med["ot_fwd"] + med["ransac"] + med["refine_fwd"] + med["refine_bwd"] + med["ot_bwd"]
            print(f"\n{name}: b = {args.batch}, m = n = {n}  (median of {args.repeats})")
            print("  " + "  ".join(f"{k} {med[k]:.3f}s" for k in STAGES))
            print(f"  forward {med['forward']:.3f}s  backward {med['backward']:.3f}s  step {med['step']:.3f}s  "
                  f"geometric layers {geo:.3f}s ({100 * geo / med['step']:.0f}% of the step)")
            ref = REFERENCE.get(n)
            if ref and args.batch == 8 and name == "bpnpnet":
                print(f"  original BPnPNet (REFERENCE_BPNPNET.md): step {ref['step']:.2f}s, geometric layers ~{ref['geometric']:.1f}s")
                print(f"  ratio original/ours: step {ref['step'] / med['step']:.1f}x, geometric layers {ref['geometric'] / geo:.1f}x")
        if {"bpnpnet", "attention"} <= set(steps):
            print(f"\n  m = n = {n}: attention step / bpnpnet step = {steps['attention'] / steps['bpnpnet']:.2f}x "
                  f"(target: <= 1.5x at 1000 points)")


if __name__ == "__main__":
    main()
