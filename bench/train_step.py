"""One training step (forward + loss + backward, pose loss on) of BlindPnPNet beside the ORIGINAL
BPnPNet, on identical inputs, in one run.

    python bench/train_step.py                           # b = 8, m = n = 256 and 1000, 1 thread, 3 repeats
    python bench/train_step.py --sizes 256 --repeats 5
    python bench/train_step.py --configs shipped shipped-dense like-original
    python bench/train_step.py --threads 2

The original is ../shared/reference/bpnpnet (MIT, unedited), timed by its harness
../shared/tools/refbench/refbench.py (``--component full``: DBPnP forward with the pose branch +
TotalLoss backward, the original's training step) in a child process with the same thread count.
Repeats alternate: one original step (the harness's warm-up step, then one timed step), then one
step of each bpnp configuration, so that machine load hits all alike; medians are printed with
the ratios original / bpnp. The first harness call also saves its inputs (``--save-inputs``:
points, ground-truth pose and correspondences), and bpnp is timed on exactly those: b items of
m = n points, no outliers, no padding. Without ../shared the original is skipped (with a
message) and bpnp runs alone on its own synthetic batch; ``--no-original`` skips it on purpose.

bpnp configurations (``--configs``), composed from configs/ (Hydra) and built like train.py:

- ``shipped``: configs/model/bpnp.yaml with its default network (configs/model/net/), the robust
  refinement and its ``refine.top_k``; the loss of the config with the pose loss on;
- ``shipped-dense``: the same with ``model.net.refine.top_k=null`` and ``refine.dtype=input`` (every refinement iteration
  O(mn), as before the sparse refinement);
- ``like-original``: the original's encoders (``model/net=bpnpnet``, 12 blocks, STN, no kNN stem),
  uniform marginals (no bins), plain weighted angular error (``refine.robust=none``, dense, in
  float32), the original's linear correspondence loss;
- ``original-encoders-shipped``: the original's encoders with the rest as shipped;
- ``session-9-ot``: shipped, with the OT node as it was before issue 27 (no bins balance step,
  w = 1.4, dense Cholesky Schur solve).

Weights are random (as the harness's original) unless ``--init CKPT`` loads a trained network into
the configurations it fits: a random network's diffuse P makes the refinement run to its
iteration limit, a trained one's converges in a few iterations (the pose loss starts at epoch 20
in configs/experiment/bpnp_synthetic.yaml, on a trained network).

Stages, both sides: encoders (bpnp: matcher + cost; original: STN + both encoders + pairwise
distance), OT forward/backward, RANSAC, refinement forward/backward, the rest of the backward
("encoders_bwd"). bpnp's are the network's stage timer and tensor hooks on P and M; the
original's are the harness's module hooks. "Geometric" = OT + RANSAC + refinement, forward and
backward. bpnp flushes denormal floats as train.py does (``--keep-denormals`` does not); the
harness runs the original as it ships. Training mode, one Adam step per bpnp step (not timed). Nothing here is a test: run it on an otherwise idle machine and read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import original  # noqa: E402  (bench/original.py: the original through its harness)

from bpnp.data.collate import collate_scenes  # noqa: E402
from bpnp.data.synthetic import SyntheticConfig, make_instance  # noqa: E402

#: bpnp configurations: Hydra overrides of configs/train.yaml's model group.
CONFIGS = {
    "shipped": [],
    "shipped-dense": ["model.net.refine.top_k=null", "model.net.refine.dtype=input"],
    "like-original": ["model/net=bpnpnet", "model.net.knn=0", "model.net.sinkhorn.bins=none",
                      "model.net.refine.robust=none", "model.net.refine.gate=null", "model.net.refine.top_k=null",
                      "model.net.refine.dtype=input", "model.loss.corr_kind=linear"],
    "original-encoders-shipped": ["model/net=bpnpnet", "model.net.knn=0"],
    # The shipped configuration's OT node as of session 9 (before issue 27): plain bins iteration
    # over-relaxed at 1.4, dense Cholesky backward.
    "session-9-ot": ["model.net.sinkhorn.balance_bins=false", "model.net.sinkhorn.overrelax=1.4",
                     "model.net.sinkhorn.schur=cholesky"],
}
STAGES = ("encoders", "ot_fwd", "ransac", "refine_fwd", "refine_bwd", "ot_bwd", "encoders_bwd")
GEOMETRIC = ("ot_fwd", "ransac", "refine_fwd", "refine_bwd", "ot_bwd")


# --------------------------------------------------------------------------------------------
# the original, through its harness
# --------------------------------------------------------------------------------------------
def original_step(b: int, n: int, threads: int, seed: int, save_inputs: str | None = None) -> dict[str, float]:
    """One timed step of the original (after the harness's warm-up step) in a child process;
    stage times in seconds, keyed like bpnp's."""
    rec = original.run("full", b, n, n, threads, seed, save_inputs=save_inputs)
    st = rec["stages"]
    return {
        "encoders": st["stn"] + st["enc2d"] + st["enc3d"] + st["pairwise_dist"], "ot_fwd": st["sinkhorn"],
        "ransac": st["ransac_p3p"], "refine_fwd": st["wbpnp"], "refine_bwd": st["bwd_wbpnp"],
        "ot_bwd": st["bwd_sinkhorn"], "encoders_bwd": st["bwd_other"], "forward": rec["forward_s"],
        "backward": rec["backward_s"] + st["loss"], "step": rec["step_s"],
    }


def batch_from_inputs(path: str) -> dict[str, torch.Tensor]:
    """bpnp's batch dict from the harness's saved inputs (b items, m 2D and n 3D points each, no
    padding; ``match`` from the ground-truth correspondence matrix)."""
    d = torch.load(path, map_location="cpu", weights_only=False)["inputs"]
    C = d["C_gt"]
    has = C.sum(2) > 0
    match = torch.where(has, C.argmax(2), torch.full_like(has, -1, dtype=torch.long))
    B, m, n = C.shape
    return {"p2d": d["p2d"].float(), "p3d": d["p3d"].float(), "mask2d": torch.ones(B, m, dtype=torch.bool),
            "mask3d": torch.ones(B, n, dtype=torch.bool), "R": d["R_gt"].float(), "t": d["t_gt"].float(),
            "match": match}


def own_batch(b: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = SyntheticConfig(num_points_2d=n, outlier_frac_2d=0.0, outlier_frac_3d=0.0)
    return collate_scenes([make_instance(cfg, seed, i) for i in range(b)])


# --------------------------------------------------------------------------------------------
# bpnp
# --------------------------------------------------------------------------------------------
def build(name: str):
    """(network, loss, optimizer) of a named configuration, composed from configs/."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bpnp.runtime.checkpoint import build_net
    from bpnp.training.losses import BlindPnPLoss

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=CONFIGS[name])
    net_cfg = OmegaConf.to_container(cfg.model.net, resolve=True)
    loss_cfg = OmegaConf.to_container(cfg.model.loss, resolve=True)
    loss_cfg["pose_start_epoch"] = 0  # pose loss on: the refinement runs and is differentiated
    torch.manual_seed(0)
    net = build_net(net_cfg)
    net.train()
    net.profile = True
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return net, BlindPnPLoss(**loss_cfg), opt, net_cfg


def bpnp_step(net, loss_fn, opt, batch: dict) -> dict[str, float]:
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


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["geometric"] = statistics.median(sum(r[k] for k in GEOMETRIC) for r in runs)
    med["encoders_total"] = statistics.median(r["encoders"] + r["encoders_bwd"] for r in runs)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1000], help="m = n per item")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per contender and size (alternating)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="the harness's problem seed")
    ap.add_argument("--configs", nargs="+", default=["shipped", "like-original"], choices=list(CONFIGS))
    ap.add_argument("--no-original", action="store_true", help="do not time the original")
    ap.add_argument("--init", default=None, metavar="CKPT",
                    help="start the bpnp configurations whose weights fit from this checkpoint (e.g. "
                         "checkpoints/bpnp_synthetic.pt: the step as it runs once the pose loss is on, on a trained "
                         "network) instead of random weights; the original keeps its random weights")
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormal floats to zero (bpnp)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # As train.py (configs/train.yaml flush_denormal): gradients reaching the encoders are scaled
    # by P ~ 1/(m n) and go denormal at 1000 points, which makes the encoder backward of x86 CPUs
    # up to ~20x slower.
    torch.set_flush_denormal(not args.keep_denormals)
    with_original = not args.no_original and original.available()
    if not args.no_original and not with_original:
        print(original.missing_message() + " bpnp runs on its own synthetic batch.")
    nets = {name: build(name) for name in args.configs}
    if args.init:
        from bpnp.runtime.checkpoint import load_network

        state = load_network(args.init).state_dict()
        for name, (net, _, _, _) in nets.items():
            try:
                net.load_state_dict(state)
                print(f"bpnp {name}: weights from {args.init}")
            except RuntimeError:
                print(f"bpnp {name}: random weights ({args.init} does not fit its network)")
    for name, (net, _, _, cfg) in nets.items():
        print(f"bpnp {name}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
              f"matcher {cfg['matcher']}, bins {cfg['sinkhorn']['bins']}, refine {cfg['refine']}, "
              f"ransac hypotheses {cfg['ransac']['num_hypotheses']}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) each, batch {args.batch}, training mode, "
          f"pose loss on, medians of {args.repeats} alternating repeats, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    for n in args.sizes:
        runs: dict[str, list] = {name: [] for name in (["original"] if with_original else []) + list(nets)}
        with tempfile.TemporaryDirectory() as tmp:
            inputs = os.path.join(tmp, "inputs.pt")
            for r in range(args.repeats):
                if with_original:
                    runs["original"].append(original_step(args.batch, n, args.threads, args.seed,
                                                          save_inputs=inputs if r == 0 else None))
                if r == 0:
                    batch = batch_from_inputs(inputs) if with_original else own_batch(args.batch, n)
                    for net, loss_fn, opt, _ in nets.values():
                        bpnp_step(net, loss_fn, opt, batch)  # warm-up at this size
                for name, (net, loss_fn, opt, _) in nets.items():
                    runs[name].append(bpnp_step(net, loss_fn, opt, batch))
        med = {name: medians(rs) for name, rs in runs.items()}
        print(f"\n## b = {args.batch}, m = n = {n}, {args.threads} thread(s), median of {args.repeats}"
              + (", inputs of the original's harness" if with_original else ""))
        print("| | step s | encoders fwd + bwd s | geometric s | " + " | ".join(STAGES)
              + (" | step: original / this | geometric: original / this |" if with_original else " |"))
        print("|---" * (4 + len(STAGES) + (2 if with_original else 0)) + "|")
        for name, m_ in med.items():
            row = f"| {name} | {m_['step']:.3f} | {m_['encoders_total']:.3f} | {m_['geometric']:.3f} | " + \
                  " | ".join(f"{m_[k]:.3f}" for k in STAGES)
            if with_original:
                o = med["original"]
                row += " | " + ("" if name == "original" else f"**{o['step'] / m_['step']:.2f}x**") + \
                       " | " + ("" if name == "original" else f"**{o['geometric'] / m_['geometric']:.2f}x**")
            print(row + " |")
        print("per repeat, step s: " + "; ".join(f"{name} " + ", ".join(f"{r['step']:.3f}" for r in rs)
                                                 for name, rs in runs.items()))


if __name__ == "__main__":
    main()
