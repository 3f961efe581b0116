"""Benchmark of the declarative nodes: ratios measured side by side in one run.

    python bench/nodes.py              # all four benchmarks (about 3-5 minutes on 2 CPU cores)
    python bench/nodes.py --only ot    # or ot-bins, pnp, lstsq (repeatable)

1. Sinkhorn OT, b = 4, m = n = 1000, exactly 100 iterations: backward time, saved-tensor bytes and
   the peak RSS of a fresh process, implicit vs unrolled backward (targets: >= 10x less memory,
   >= 3x faster implicit).
   ``ot-bins``: the same with outlier bins (:func:`sinkhorn_with_bins`, a (4, 1001, 1001) augmented
   plan, gradient to M and to the shared bin cost), reported the same way.
2. PnP refinement, b = 16, m = n = 500: forward time and the final objective per item, our batched
   LM vs torch.optim.LBFGS set up as the original BPnPNet (strong-Wolfe, history 100, batch-mean
   objective, max_iter = round(max(min(100, 75 (N/1000)^-1.5), 1)), tolerances 1e-40)
   (target: >= 10x faster at an equal or lower objective on every item).
3. Least squares, b = 8, 1000 x 500: forward + backward vs autograd through torch.linalg.lstsq,
   with errors against a float64 reference (target: faster, no less accurate).

Times are medians of repeated runs, alternating the two contenders so that machine noise hits
both alike. Nothing here is a test; the numbers go to docs/benchmarks.md with this command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpnp.nodes import (  # noqa: E402
    PnPRefine, least_squares, pnp_objective, sinkhorn, sinkhorn_with_bins, so3_exp, uniform_marginals,
)
from bpnp.nodes.robust import RobustKernel  # noqa: E402


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# 1. Optimal transport
# --------------------------------------------------------------------------------------------
def ot_inputs(b=4, m=1000, n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = 2 * torch.rand(b, m, n, generator=g)
    r, c = uniform_marginals(torch.ones(b, m, dtype=torch.bool), torch.ones(b, n, dtype=torch.bool))
    G = torch.randn(b, m, n, generator=g)
    return M, r, c, G


def ot_run(mode, M, r, c, G, iters=100, bins=False):
    """Forward + backward with exactly `iters` iterations (a negative tol never stops early).
    With `bins`, solve the bin-augmented problem of the same real size (r, c then only give the
    masks), differentiating in M and a shared bin cost; the loss is <G, real block of the plan>."""
    Mg = M.clone().requires_grad_(True)
    saved = {}

    def pack(x):
        key = (x.untyped_storage().data_ptr(), x.dtype)
        saved[key] = max(saved.get(key, 0), x.untyped_storage().nbytes())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        t0 = time.perf_counter()
        if bins:
            bin_cost = torch.tensor(1.0, requires_grad=True)
            P, info = sinkhorn_with_bins(Mg, r > 0, c > 0, bin_cost, lam=10.0, max_iter=iters, tol=-1.0, backward=mode)
            P = P[:, :-1, :-1]  # loss on the real block; the plain run keeps its graph unchanged
        else:
            P, info = sinkhorn(Mg, r, c, lam=10.0, max_iter=iters, tol=-1.0, backward=mode)
        t1 = time.perf_counter()
    assert int(info.iterations.min()) == iters, info.iterations
    (P * G).sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, sum(saved.values())


def ot_worker(mode, bins=False):
    """Run in a fresh process: report peak RSS of one forward + backward."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    M, r, c, G = ot_inputs()
    base = peak_rss_mib()
    fwd, bwd, saved = ot_run(mode, M, r, c, G, bins=bins)
    peak = peak_rss_mib()
    print(json.dumps({"mode": mode, "peak_rss_mib": peak, "base_rss_mib": base, "saved_mib": saved / 2**20}))


def peak_rss_mib():
    """Peak resident set size of this process (VmHWM). Not ru_maxrss: Linux carries that over
    an exec from the parent's image, so a child spawned by a big parent would report its size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ot(repeats, bins=False):
    M, r, c, G = ot_inputs()
    res = {"implicit": {"fwd": [], "bwd": []}, "unrolled": {"fwd": [], "bwd": []}}
    saved = {}
    for _ in range(repeats):
        for mode in ("implicit", "unrolled"):
            f, b, s = ot_run(mode, M, r, c, G, bins=bins)
            res[mode]["fwd"].append(f)
            res[mode]["bwd"].append(b)
            saved[mode] = s
    rss = {}
    for mode in ("implicit", "unrolled"):
        out = subprocess.run(
            [sys.executable, __file__, "--ot-worker", mode] + (["--ot-bins"] if bins else []),
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        rss[mode] = json.loads(out)
    what = "Sinkhorn OT with bins (plan 4 x 1001 x 1001)" if bins else "Sinkhorn OT"
    print(f"\n## {what}: b = 4, m = n = 1000, 100 iterations, float32 (median of {repeats})")
    print("| backward | forward s | backward s | saved tensors MiB | peak RSS MiB (fresh process) | RSS above baseline MiB |")
    print("|---|---|---|---|---|---|")
    for mode in ("implicit", "unrolled"):
        f, b = statistics.median(res[mode]["fwd"]), statistics.median(res[mode]["bwd"])
        q = rss[mode]
        print(f"| {mode} | {f:.3f} | {b:.3f} | {saved[mode] / 2**20:.1f} | {q['peak_rss_mib']:.0f} | {q['peak_rss_mib'] - q['base_rss_mib']:.0f} |")
    bi, bu = statistics.median(res["implicit"]["bwd"]), statistics.median(res["unrolled"]["bwd"])
    ri = rss["implicit"]["peak_rss_mib"] - rss["implicit"]["base_rss_mib"]
    ru = rss["unrolled"]["peak_rss_mib"] - rss["unrolled"]["base_rss_mib"]
    print(f"\nimplicit backward {bu / bi:.1f}x faster; saved tensors {saved['unrolled'] / saved['implicit']:.1f}x smaller; "
          f"peak RSS above baseline {ru / max(ri, 1e-9):.1f}x smaller (targets: >= 3x, >= 10x)")


# --------------------------------------------------------------------------------------------
# 2. PnP refinement
# --------------------------------------------------------------------------------------------
def pnp_inputs(b=16, m=500, n=500, seed=0, dtype=torch.float32):
    """Soft correspondences like an OT layer produces: half the mass on the true pairs (with 1 px
    noise at f = 800), the rest spread by a random Sinkhorn plan; start 10 deg / 10 % off."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, generator=g, dtype=torch.float64)
    axis = q[:, 1:] / q[:, 1:].norm(dim=1, keepdim=True)
    R = so3_exp(axis * torch.rand(b, 1, generator=g, dtype=torch.float64) * math.pi)
    t = torch.randn(b, 3, generator=g, dtype=torch.float64) * 0.5 + torch.tensor([0, 0, 6.0], dtype=torch.float64)
    x_cam = torch.randn(b, n, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    x_cam[..., 2] += 6.0
    points = (x_cam - t[:, None]) @ R
    bear = x_cam / x_cam.norm(dim=-1, keepdim=True)
    bear = bear + torch.randn(bear.shape, generator=g, dtype=torch.float64) / 800
    bear = bear / bear.norm(dim=-1, keepdim=True)
    M = 2 * torch.rand(b, m, n, generator=g, dtype=torch.float64)
    r, c = uniform_marginals(torch.ones(b, m, dtype=torch.bool), torch.ones(b, n, dtype=torch.bool), dtype=torch.float64)
    spread, _ = sinkhorn(M, r, c, lam=10.0)
    W = 0.5 * spread + 0.5 * torch.eye(m, n, dtype=torch.float64).expand(b, m, n) / m
    axis0 = torch.randn(b, 3, generator=g, dtype=torch.float64)
    R0 = so3_exp(axis0 / axis0.norm(dim=1, keepdim=True) * math.radians(10)) @ R
    t0 = t * (1 + 0.1 * torch.randn(b, 1, generator=g, dtype=torch.float64))
    return [x.to(dtype) for x in (W, bear, points, R0, t0)]


def lbfgs_reference(W, bear, points, R0, t0):
    """torch.optim.LBFGS as the original BPnPNet sets it up (one line search for the batch)."""
    from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle

    N = W.shape[-1]
    max_iter = int(round(max(min(100, 75 * (N / 1000) ** -1.5), 1)))
    theta = torch.cat([rotation_matrix_to_axis_angle(R0), t0], dim=1).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=max_iter, max_eval=None, tolerance_grad=1e-40, tolerance_change=1e-40,
        history_size=100, line_search_fn="strong_wolfe",
    )
    kernel = RobustKernel("none")

    def closure():
        opt.zero_grad()
        R = axis_angle_to_rotation_matrix(theta[:, :3])
        loss = pnp_objective(W, bear, points, R, theta[:, 3:], kernel).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        R = axis_angle_to_rotation_matrix(theta[:, :3])
        return R, theta[:, 3:].detach(), max_iter


def bench_pnp(repeats):
    W, bear, points, R0, t0 = pnp_inputs()
    node = PnPRefine()
    kernel = RobustKernel("none")
    ours_t, ref_t = [], []
    for _ in range(repeats):
        t0_ = time.perf_counter()
        with torch.no_grad():
            out = node(W, bear, points, R0, t0)
        ours_t.append(time.perf_counter() - t0_)
        t0_ = time.perf_counter()
        R_ref, t_ref, max_iter = lbfgs_reference(W, bear, points, R0, t0)
        ref_t.append(time.perf_counter() - t0_)
    with torch.no_grad():
        f_ours = pnp_objective(W.double(), bear.double(), points.double(), out.R.double(), out.t.double(), kernel)
        f_ref = pnp_objective(W.double(), bear.double(), points.double(), R_ref.double(), t_ref.double(), kernel)
        f_init = pnp_objective(W.double(), bear.double(), points.double(), R0.double(), t0.double(), kernel)
    to, tr = statistics.median(ours_t), statistics.median(ref_t)
    print(f"\n## PnP refinement: b = 16, m = n = 500, float32, forward only (median of {repeats})")
    print("| solver | forward s | iterations | objective: median over items | max over items of (ours - L-BFGS) |")
    print("|---|---|---|---|---|")
    print(f"| ours (batched LM, per-item) | {to:.3f} | {int(out.iterations.max())} (max over items) | {float(f_ours.median()):.6f} | {float((f_ours - f_ref).max()):+.2e} |")
    print(f"| torch L-BFGS as the original | {tr:.3f} | {max_iter} | {float(f_ref.median()):.6f} | |")
    better = int((f_ours <= f_ref + 1e-7 * f_ref.abs()).sum())
    print(f"\nours {tr / to:.1f}x faster; objective <= L-BFGS's (to 1e-7 relative) on {better}/{len(f_ours)} items; "
          f"initial objective median {float(f_init.median()):.6f}; our status counts {dict(zip(*[x.tolist() for x in out.status.unique(return_counts=True)]))} "
          f"(target: >= 10x faster, every item equal or lower)")


# --------------------------------------------------------------------------------------------
# 3. Least squares
# --------------------------------------------------------------------------------------------
def bench_lstsq(repeats):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 1000, 500, generator=g)
    b = torch.randn(8, 1000, generator=g)
    v = torch.randn(8, 500, generator=g)

    def run_ours():
        Ag, bg = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
        x = least_squares(Ag, bg)[0]
        gA, gb = torch.autograd.grad((x * v).sum(), (Ag, bg))
        return x, gA, gb

    def run_torch():
        Ag, bg = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
        x = torch.linalg.lstsq(Ag, bg.unsqueeze(-1)).solution.squeeze(-1)
        gA, gb = torch.autograd.grad((x * v).sum(), (Ag, bg))
        return x, gA, gb

    ours_t, torch_t = [], []
    for _ in range(repeats):
        ours_t.append(median_time(run_ours, 1))
        torch_t.append(median_time(run_torch, 1))
    A64, b64 = A.double().requires_grad_(True), b.double().requires_grad_(True)
    x64 = torch.linalg.lstsq(A64, b64.unsqueeze(-1)).solution.squeeze(-1)
    gA64, gb64 = torch.autograd.grad((x64 * v.double()).sum(), (A64, b64))

    def rel(a, ref):
        return float((a.double() - ref).norm() / ref.norm())

    xo, gAo, gbo = run_ours()
    xt, gAt, gbt = run_torch()
    to, tt = statistics.median(ours_t), statistics.median(torch_t)
    print(f"\n## Least squares: b = 8, 1000 x 500, float32, forward + backward (median of {repeats})")
    print("| method | time s | rel. error x | rel. error dL/dA | rel. error dL/db |")
    print("|---|---|---|---|---|")
    print(f"| ours (QR + closed-form backward) | {to:.3f} | {rel(xo, x64):.1e} | {rel(gAo, gA64):.1e} | {rel(gbo, gb64):.1e} |")
    print(f"| autograd through torch.linalg.lstsq | {tt:.3f} | {rel(xt, x64):.1e} | {rel(gAt, gA64):.1e} | {rel(gbt, gb64):.1e} |")
    print(f"\nours {tt / to:.2f}x faster (errors against a float64 lstsq reference)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["ot", "ot-bins", "pnp", "lstsq"], action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ot-worker", choices=["implicit", "unrolled"], help=argparse.SUPPRESS)
    ap.add_argument("--ot-bins", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ot_worker:
        ot_worker(args.ot_worker, bins=args.ot_bins)
        return
    os.environ["BENCH_THREADS"] = str(args.threads)
    print(f"# bpnp node benchmarks: torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")
    todo = args.only or ["ot", "ot-bins", "pnp", "lstsq"]
    if "ot" in todo:
        bench_ot(args.repeats)
    if "ot-bins" in todo:
        bench_ot(args.repeats, bins=True)
    if "pnp" in todo:
        bench_pnp(args.repeats)
    if "lstsq" in todo:
        bench_lstsq(args.repeats)


if __name__ == "__main__":
    main()
