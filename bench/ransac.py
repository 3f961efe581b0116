"""RANSAC's cost by the number of hypotheses, and guided sampling before / after session 14's
neighbour lists, side by side in one run.

    python bench/ransac.py --scenes scenes/timing_1000 --threads 1

For each ``num_hypotheses`` the shipped checkpoint's RANSAC (its own settings: guided sampling on
a quarter of the hypotheses, relative gates, the 256 best poses returned for the search) runs on
the network's ``P`` of the first scene of ``--scenes``, twice per repeat: with
:func:`bpnp.geometry.ransac._guided_samples` as shipped (Gumbel keys on each seed's list of
consistent neighbours) and with the dense form it replaced (keys on all K candidate columns per
hypothesis, kept below for this timing only). Both must give the same pose and ranking. Medians of
``--repeats``, contenders alternating. Nothing here is a test; the numbers go to
docs/benchmarks.md with this command.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bpnp.geometry.ransac as rs  # noqa: E402


def guided_samples_dense(w64, C, u_seed, gumbel_u):
    """The guided sampler as it was before session 14 (bpnp at b611c93), for the timing only."""
    K = w64.shape[1]
    cdf = w64.cumsum(-1)
    seed = torch.searchsorted(cdf, u_seed * cdf[:, -1:], right=True).clamp(max=K - 1)
    allowed = torch.gather(C, 1, seed[..., None].expand(*seed.shape, K))
    logw = torch.where(allowed & (w64[:, None, :] > 0), w64[:, None, :].clamp_min(1e-300).log(),
                       torch.full_like(gumbel_u, -math.inf))
    keys = logw - torch.log(-torch.log(gumbel_u.clamp(1e-300, 1.0 - 1e-16)))
    rest = keys.topk(3, dim=2).indices
    ok = torch.isfinite(torch.gather(keys, 2, rest)).all(-1)
    return torch.cat([seed[..., None], rest], -1), ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=Path, default=Path("scenes/timing_1000"))
    ap.add_argument("--ckpt", default="checkpoints/bpnp_synthetic.pt")
    ap.add_argument("--hypotheses", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bpnp.data.collate import collate_scenes
    from bpnp.data.scenes import SceneDirectory
    from bpnp.models.network import _geometric_inputs
    from bpnp.runtime.checkpoint import load_network

    net = load_network(args.ckpt).eval()
    batch = collate_scenes([SceneDirectory(args.scenes)[0]])
    shipped = rs._guided_samples
    with torch.no_grad():
        out = net(batch, generator=rs.seeded_generator(0, 0))
        bearings, points = _geometric_inputs(batch["p2d"], batch["p3d"], batch["mask2d"], batch["mask3d"])
        kw = net._ransac_call_kwargs(net._gate_factor(bearings, batch["mask2d"]))
        m = int(batch["mask2d"].sum())
        print(f"# RANSAC at m = {m}: torch {torch.__version__}, {args.threads} thread(s), b = 1, guided {kw['guided']}, "
              f"256 poses returned, median of {args.repeats}")
        print("| hypotheses | dense guided s | neighbour lists s | dense / lists | same poses and ranking |")
        print("|---|---|---|---|---|")
        for H in args.hypotheses:
            kw["num_hypotheses"] = H
            times = {"dense": [], "lists": []}
            results = {}
            for _ in range(args.repeats):
                for name, fn in (("dense", guided_samples_dense), ("lists", shipped)):
                    rs._guided_samples = fn
                    t0 = time.perf_counter()
                    results[name] = rs.ransac_pnp(out.P, bearings, points, batch["mask2d"], batch["mask3d"],
                                                  generator=rs.seeded_generator(0, 0), top_hypotheses=256, **kw)
                    times[name].append(time.perf_counter() - t0)
            rs._guided_samples = shipped
            same = torch.equal(results["dense"].R_top, results["lists"].R_top)
            d, s = statistics.median(times["dense"]), statistics.median(times["lists"])
            print(f"| {H} | {d:.3f} | {s:.3f} | **{d / s:.2f}x** | {same} |")


if __name__ == "__main__":
    main()
