"""Benchmark of the declarative nodes: ratios measured side by side in one run.

    python bench/nodes.py              # every benchmark (about 5-10 minutes on 2 CPU cores)
    python bench/nodes.py --only ot    # or ot-bins, ot-overrelax, ot-speed, ot-original, pnp, pnp-pairs, pnp-lm, matvec, lstsq (repeatable)
    python bench/nodes.py --only ot-speed --threads 1   # issue 27: bins forward and Schur CG, side by side

1. ``ot``: Sinkhorn OT, b = 4, m = n = 1000, exactly 100 iterations: backward time, saved-tensor
   bytes and the peak RSS of a fresh process, implicit vs unrolled backward (targets: >= 10x less
   memory, >= 3x faster implicit). ``ot-bins``: the same with outlier bins
   (:func:`sinkhorn_with_bins`, a (4, 1001, 1001) augmented plan, gradient to M and to the shared
   bin cost).
   ``ot-overrelax``: the plain bin Sinkhorn iteration (no balance step; b = 8, m = n = 1000,
   float32, tol 1e-6) for over-relaxation factors w = 1 (plain), 1.2, 1.4 (the config's), 1.5, on
   random costs and on the shipped checkpoint's costs: iterations and forward time.
   ``ot-speed``: at m = n = 256 and 1000, b = 8, the plain node's forward against the bins'
   forward before (no balance step, w = 1.4) and now (balance step, w = 1.2), and the backward's
   Schur solve by dense Cholesky against preconditioned CG, on the same costs and tolerance.
2. ``ot-original``: our Sinkhorn node (implicit backward) against the ORIGINAL's
   ``RegularisedTransport`` (../shared/reference/bpnpnet through ../shared/tools/refbench), on the
   harness's inputs (b = 4, m = n = 1000, lambda = 10, uniform marginals, a fixed upstream
   gradient), at the original's iteration count; forward and backward times.
3. ``pnp``: our PnP refinement against the ORIGINAL's ``NonlinearWeightedBlindPnP`` (L-BFGS with
   strong-Wolfe line search on the batch-mean objective, its own implicit backward) through the
   harness, b = 16, m = n = 500, on its inputs (peaked W, start 10 degrees off); forward and
   backward times, the final objective per item (ours in float64 at both poses) and the rotation
   errors (targets: >= 10x faster, equal or lower objective on every item).
4. ``pnp-pairs``: the robust refinement (Geman-McClure) dense (O(mn) per iteration) against the
   paired form over the top-k entries of each row of W (:func:`bpnp.nodes.pnp.gather_pairs`),
   b = 8, m = n = 1000, float32 dense as the network ran it before and float64 pairs as it runs
   them now; forward + backward times and the pose difference.
5. ``lstsq``: least squares, b = 8, 1000 x 500: forward + backward vs autograd through
   torch.linalg.lstsq, with errors against a float64 reference (target: faster, no less accurate).

Times are medians of repeated runs, alternating the contenders so that machine noise hits them
alike; the original runs in a child process with the same thread count (one warm-up and one
timed repetition per call). Without ../shared the original's benchmarks are skipped with a
message. Nothing here is a test; the numbers go to docs/benchmarks.md with this command.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import original  # noqa: E402  (bench/original.py: the original through its harness)
from bpnp.nodes import (  # noqa: E402
    PnPRefine, least_squares, pnp_objective, sinkhorn, sinkhorn_with_bins, so3_exp, uniform_marginals,
)
from bpnp.nodes.pnp import gather_pairs  # noqa: E402
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
# 2. Sinkhorn against the original
# --------------------------------------------------------------------------------------------
def bench_ot_original(repeats, threads, b=4, m=1000, n=1000):
    import tempfile

    if not original.available():
        print("\n## Sinkhorn OT against the original: skipped. " + original.missing_message())
        return
    ours_f, ours_b, ref_f, ref_b = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ot.pt")
        for r in range(repeats):
            rec = original.run("sinkhorn", b, m, n, threads, save_inputs=path if r == 0 else None, count=r == 0)
            ref_f.append(rec["forward_s"])
            ref_b.append(rec["backward_s"])
            if r == 0:
                iters = int(rec["checks"]["sinkhorn_iterations"])
                d = torch.load(path, map_location="cpu")
                M, rr, cc, G = d["M"], d["r"], d["c"], d["grad_P"]
                ot_run("implicit", M, rr, cc, G, iters=iters)  # warm-up
            f, bw, _ = ot_run("implicit", M, rr, cc, G, iters=iters)
            ours_f.append(f)
            ours_b.append(bw)
    of, ob, rf, rb = (statistics.median(x) for x in (ours_f, ours_b, ref_f, ref_b))
    print(f"\n## Sinkhorn OT against the original: b = {b}, m = n = {m}, lambda 10, {iters} iterations each "
          f"(the original's count on these inputs), float32, {threads} thread(s) (median of {repeats}, alternating)")
    print("| | forward s | backward s | forward + backward s |")
    print("|---|---|---|---|")
    print(f"| ours (log-domain scaling, implicit backward) | {of:.3f} | {ob:.3f} | {of + ob:.3f} |")
    print(f"| original RegularisedTransport | {rf:.3f} | {rb:.3f} | {rf + rb:.3f} |")
    print(f"\nours: forward {rf / of:.1f}x, backward {rb / ob:.1f}x, forward + backward {(rf + rb) / (of + ob):.1f}x faster")


# --------------------------------------------------------------------------------------------
# 3. PnP refinement against the original
# --------------------------------------------------------------------------------------------
def bench_pnp(repeats, threads, b=16, m=500, n=500):
    import tempfile

    from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle

    if not original.available():
        print("\n## PnP refinement against the original: skipped. " + original.missing_message())
        return
    node = PnPRefine()  # robust none: the original's objective
    kernel = RobustKernel("none")

    def ours(W, bear, p3d, R0, t0, G):
        Wg = W.clone().requires_grad_(True)
        t_0 = time.perf_counter()
        out = node(Wg, bear, p3d, R0, t0)
        t_1 = time.perf_counter()
        theta = torch.cat([rotation_matrix_to_axis_angle(out.R), out.t], 1)
        theta.backward(G)
        t_2 = time.perf_counter()
        return out, t_1 - t_0, t_2 - t_1

    res = {"ours": ([], []), "original": ([], [])}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pnp.pt")
        for r in range(repeats):
            rec = original.run("pnp", b, m, n, threads, save_inputs=path if r == 0 else None, count=r == 0)
            res["original"][0].append(rec["forward_s"])
            res["original"][1].append(rec["backward_s"])
            if r == 0:
                checks = rec["checks"]
                d = torch.load(path, map_location="cpu")
                W, bear, p3d, G = d["W"], d["p2d_bearings"], d["p3d"], d["grad_theta"]
                R0, t0 = axis_angle_to_rotation_matrix(d["theta0"][:, :3]), d["theta0"][:, 3:].clone()
                R_gt = d["R_gt"]
                ours(W, bear, p3d, R0, t0, G)  # warm-up
            out, f, bw = ours(W, bear, p3d, R0, t0, G)
            res["ours"][0].append(f)
            res["ours"][1].append(bw)
    with torch.no_grad():
        f_ours = pnp_objective(W.double(), bear.double(), p3d.double(), out.R.double(), out.t.double(), kernel)
        f_init = pnp_objective(W.double(), bear.double(), p3d.double(), R0.double(), t0.double(), kernel)
        c = ((out.R.double().transpose(1, 2) @ R_gt.double()).diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2
        rot_ours = torch.rad2deg(torch.arccos(c.clamp(-1, 1)))
    f_ref = torch.tensor(checks["objective_final"], dtype=torch.float64)  # the original's function, float32
    with torch.no_grad():  # ours by the original's formula in float32, and its rounding noise (vs float64)
        u = torch.nn.functional.normalize(p3d @ out.R.transpose(1, 2) + out.t[:, None], dim=-1)
        f_ours32 = torch.einsum("bmn,bmn->b", W, 1.0 - torch.einsum("bmd,bnd->bmn", bear, u)).double()
    noise = (f_ours32 - f_ours).abs()
    rot_ref = torch.tensor(checks["rot_err_deg_final"], dtype=torch.float64)
    (of, ob), (rf, rb) = ([statistics.median(x) for x in res[k]] for k in ("ours", "original"))
    print(f"\n## PnP refinement against the original: b = {b}, m = n = {m}, float32, forward + backward, "
          f"{threads} thread(s) (median of {repeats}, alternating)")
    print("| solver | forward s | backward s | objective (original's formula, float32): median over items | "
          "rotation error: median / max deg |")
    print("|---|---|---|---|---|")
    print(f"| ours (batched LM, per item; implicit backward) | {of:.3f} | {ob:.3f} | {float(f_ours32.median()):.4e} | "
          f"{float(rot_ours.median()):.4f} / {float(rot_ours.max()):.4f} |")
    print(f"| original NonlinearWeightedBlindPnP (L-BFGS, {checks.get('lbfgs_function_evals', '?')} objective evaluations) | "
          f"{rf:.3f} | {rb:.3f} | {float(f_ref.median()):.4e} | {float(rot_ref.median()):.4f} / {float(rot_ref.max()):.4f} |")
    diff = f_ours32 - f_ref  # both by the original's formula in float32
    print(f"\nours: forward {rf / of:.1f}x, backward {rb / ob:.1f}x, forward + backward {(rf + rb) / (of + ob):.1f}x faster; "
          f"objective (both by the original's formula in float32) <= the original's on {int((diff <= 0).sum())}/{b} items, "
          f"within its float32 rounding noise (|float32 - float64| of ours, max {float(noise.max()):.1e}) on "
          f"{int((diff <= noise).sum())}/{b}; max (ours - original) {float(diff.max()):+.2e}, median objective "
          f"{float(f_ref.median()):.3e}; initial objective median {float(f_init.median()):.6f}; "
          f"our status counts {dict(zip(*[x.tolist() for x in out.status.unique(return_counts=True)]))} "
          f"(targets: >= 10x faster, every item equal or lower)")


# --------------------------------------------------------------------------------------------
# 4. Robust refinement: dense against top-k pairs
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


def bench_pnp_pairs(repeats, ks=(1, 4, 8), b=8, m=1000, n=1000):
    W, bear, points, R0, t0 = pnp_inputs(b=b, m=m, n=n, dtype=torch.float64)
    node = PnPRefine(robust="geman_mcclure", robust_scale=1e-3)
    g = torch.Generator().manual_seed(5)
    GR, Gt = torch.randn(b, 3, 3, generator=g), torch.randn(b, 3, generator=g)

    def run(k):
        dtype = torch.float32 if k is None else torch.float64
        Wg = W.to(dtype).requires_grad_(True)
        args = (Wg, bear.to(dtype), points.to(dtype)) if k is None else gather_pairs(Wg, bear, points, k)
        t_0 = time.perf_counter()
        out = node(*args, R0.to(dtype), t0.to(dtype))
        t_1 = time.perf_counter()
        ((out.R * GR.to(dtype)).sum() + (out.t * Gt.to(dtype)).sum()).backward()
        t_2 = time.perf_counter()
        return out, t_1 - t_0, t_2 - t_1

    modes = [None] + list(ks)
    times = {k: ([], []) for k in modes}
    outs = {}
    for k in modes:
        run(k)  # warm-up
    for _ in range(repeats):
        for k in modes:
            outs[k], f, bw = run(k)
            times[k][0].append(f)
            times[k][1].append(bw)
    print(f"\n## Robust refinement (Geman-McClure, scale 1e-3): dense against top-k pairs per row, b = {b}, m = n = {m}, "
          f"forward + backward (median of {repeats}, alternating)")
    print("| W | pairs per item | forward s | backward s | iterations (max over items) | rotation vs dense: max deg |")
    print("|---|---|---|---|---|---|")
    dense = outs[None]
    for k in modes:
        o = outs[k]
        # 2 asin(|R1 - R2|_F / sqrt 8): no acos rounding floor (~0.03 deg for float32 rotations)
        chord = (o.R.detach().double() - dense.R.detach().double()).flatten(1).norm(dim=1)
        drot = float(torch.rad2deg(2 * torch.asin((chord / math.sqrt(8)).clamp(max=1))).max())
        name = "dense (m n), float32" if k is None else f"top-{k} per row, float64"
        print(f"| {name} | {m * n if k is None else m * k} | {statistics.median(times[k][0]):.3f} | "
              f"{statistics.median(times[k][1]):.3f} | {int(o.iterations.max())} | {drot:.4f} |")


def bench_pnp_lm(repeats, sizes=(256, 1000), k=4, b=8):
    """Issue 27: the paired LM's derivatives by weighted moments (one product) against the
    general chart path they replaced (``_paired_derivatives_rank_one``), per call and inside the
    whole solve, alternating. Two kinds of W: an OT plan of random costs (an untrained network:
    LM wanders to its iteration limit) and pnp_inputs' half-true plan (a trained one)."""
    import bpnp.nodes.pnp as pnp_mod

    fast = pnp_mod._paired_derivatives
    node = PnPRefine(robust="geman_mcclure", robust_scale=5e-5, max_iter=50)
    print(f"\n## Paired refinement (top-{k} per row, float64, Geman-McClure 5e-5), b = {b}: derivatives by moments "
          f"against the chart path, median of {repeats}, alternating")
    print("| m = n | W | derivatives: chart path ms | moments ms | ratio | LM solve: chart path s | moments s | ratio "
          "| iterations (max) | rotation difference deg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        W, bear, points, R0, t0 = pnp_inputs(b=b, m=n, n=n, dtype=torch.float64)
        r, c = uniform_marginals(torch.ones(b, n, dtype=torch.bool), torch.ones(b, n, dtype=torch.bool), dtype=torch.float64)
        Wr, _ = sinkhorn(2 * torch.rand(b, n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64),
                         r, c, lam=10.0)
        for name, Wd in (("random costs' plan", Wr), ("half on true pairs", W)):
            Wk, bk, pk = gather_pairs(Wd, bear, points, k)
            x = pnp_mod._camera_points(R0, t0, pk)
            times = {key: [] for key in ("d_ref", "d_fast", "s_ref", "s_fast")}
            outs = {}
            for rep in range(repeats + 1):  # the first round warms up
                for key, fn in (("ref", pnp_mod._paired_derivatives_rank_one), ("fast", fast)):
                    t_0 = time.perf_counter()
                    fn(Wk, bk, x, node.kernel)
                    t_1 = time.perf_counter()
                    pnp_mod._paired_derivatives = fn
                    try:
                        outs[key] = node.solve(Wk, bk, pk, R0, t0)
                    finally:
                        pnp_mod._paired_derivatives = fast
                    t_2 = time.perf_counter()
                    if rep:
                        times["d_" + key].append(t_1 - t_0)
                        times["s_" + key].append(t_2 - t_1)
            med = {key: statistics.median(v) for key, v in times.items()}
            chord = (outs["ref"][0] - outs["fast"][0]).flatten(1).norm(dim=1)
            drot = float(torch.rad2deg(2 * torch.asin((chord / math.sqrt(8)).clamp(max=1))).max())
            print(f"| {n} | {name} | {1e3 * med['d_ref']:.2f} | {1e3 * med['d_fast']:.2f} | **{med['d_ref'] / med['d_fast']:.2f}x** | "
                  f"{med['s_ref']:.3f} | {med['s_fast']:.3f} | **{med['s_ref'] / med['s_fast']:.2f}x** | "
                  f"{int(outs['ref'][3].max())} / {int(outs['fast'][3].max())} | {drot:.1e} |")


def bench_matvec(repeats, shapes=((8, 257), (8, 1001), (32, 1001))):
    """Why bpnp.nodes.linalg.bmv / bmv_t: the batched mat-vec as a one-column right operand
    (``A @ x[..., None]``) against a one-row left operand (``x^T A^T``), side by side."""
    from bpnp.nodes.linalg import bmv, bmv_t

    print(f"\n## Batched mat-vec, (B, m, m) by (B, m), median of {max(repeats, 5)}, alternating")
    print("| B | m | dtype | A | A x: A @ x[..., None] ms | bmv ms | ratio | A^T x: A^T @ x[..., None] ms | bmv_t ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for B, m in shapes:
        for dtype in (torch.float32, torch.float64):
            g = torch.Generator().manual_seed(0)
            K = torch.rand(B, m, m, generator=g, dtype=dtype)
            x = torch.rand(B, m, generator=g, dtype=dtype)
            for layout, A in (("contiguous", K), ("transposed view", K.transpose(1, 2))):
                fns = {"col": lambda: (A @ x.unsqueeze(-1)).squeeze(-1), "row": lambda: bmv(A, x),
                       "col_t": lambda: (A.transpose(1, 2) @ x.unsqueeze(-1)).squeeze(-1), "row_t": lambda: bmv_t(A, x)}
                times = {k: [] for k in fns}
                for rep in range(max(repeats, 5) + 1):
                    for k, fn in fns.items():
                        t_0 = time.perf_counter()
                        fn()
                        if rep:
                            times[k].append(time.perf_counter() - t_0)
                med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
                print(f"| {B} | {m} | {str(dtype).split('.')[-1]} | {layout} | {med['col']:.2f} | {med['row']:.2f} | "
                      f"**{med['col'] / med['row']:.1f}x** | {med['col_t']:.2f} | {med['row_t']:.2f} | **{med['col_t'] / med['row_t']:.1f}x** |")


# --------------------------------------------------------------------------------------------
# 5. Least squares
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


def _trained_costs(b, n, ckpt=None):
    """The shipped network's cost matrices (b, n, n) on synthetic instances of n points per side
    (the generator's defaults), or None without the checkpoint."""
    from bpnp.data.collate import collate_scenes
    from bpnp.data.synthetic import SyntheticConfig, make_instance
    from bpnp.runtime.checkpoint import load_network

    ckpt = Path(ckpt) if ckpt else Path(__file__).resolve().parents[1] / "checkpoints" / "bpnp_synthetic.pt"
    if not ckpt.exists():
        return None
    net = load_network(ckpt).eval()
    batch = collate_scenes([make_instance(SyntheticConfig(num_points_2d=n), 7, i) for i in range(b)])
    with torch.no_grad():
        return net.cost(batch["p2d"], batch["p3d"], batch["mask2d"], batch["mask3d"]), net.sinkhorn.bin_cost.detach()


def bench_ot_overrelax(repeats, ws=(1.0, 1.2, 1.4, 1.5), b=8, n=1000):
    """The plain bin Sinkhorn iteration's forward (no balance step; float32, lam 10, tol 1e-6)
    against the over-relaxation factor w, on random costs U[0, 2] (random weights) and on the shipped network's
    costs; the loop runs until the slowest item of the batch stops."""
    g = torch.Generator().manual_seed(0)
    costs = {"U[0, 2] (random network)": (2 * torch.rand(b, n, n, generator=g), torch.tensor(1.0))}
    trained = _trained_costs(b, n)
    if trained is None:
        print("\n(no checkpoints/bpnp_synthetic.pt: the trained-cost rows are skipped)")
    else:
        costs["shipped network, synthetic instances"] = trained
    mask = torch.ones(b, n, dtype=torch.bool)
    print(f"\n## Bin Sinkhorn forward against over-relaxation: b = {b}, m = n = {n}, lam 10, tol 1e-6, float32 "
          f"(median of {repeats}, w alternating)")
    print("| costs | w | iterations: max / mean over items | forward s | vs w = 1 |")
    print("|---|---|---|---|---|")
    for name, (M, bin_cost) in costs.items():
        times, its = {w: [] for w in ws}, {}
        for _ in range(repeats):
            for w in ws:
                t0 = time.perf_counter()
                _, info = sinkhorn_with_bins(M, mask, mask, bin_cost, lam=10.0, max_iter=1000, tol=1e-6, overrelax=w,
                                             balance=False)
                times[w].append(time.perf_counter() - t0)
                its[w] = info.iterations.float()
        base = statistics.median(times[ws[0]])
        for w in ws:
            t = statistics.median(times[w])
            print(f"| {name} | {w:g} | {int(its[w].max())} / {float(its[w].mean()):.1f} | {t:.3f} | {base / t:.2f}x |")


def bench_ot_speed(repeats, sizes=(256, 1000), b=8):
    """Issue 27, items 1-2, side by side on the same costs and tol (float32, lam 10, tol 1e-6,
    the network's settings): the plain node's forward (uniform marginals, no bins) against the
    bins' forward as shipped before (no balance step, w = 1.4) and now (balance step, w = 1.2);
    then the implicit backward's Schur solve, dense Cholesky against preconditioned CG (same
    plan, same upstream gradient), with the gradients' relative difference. Costs: U[0, 2] (a
    random network) and the shipped network's on synthetic instances of m = n points."""
    from bpnp.nodes.sinkhorn import uniform_marginals as um

    print(f"\n## OT forward and backward, b = {b}, float32, lam 10, tol 1e-6, {torch.get_num_threads()} thread(s), "
          f"median of {repeats}, contenders alternating")
    print("| m = n | costs | plain node fwd s (iters max) | bins before: w 1.4, no balance s (iters) | "
          "bins now: balance, w 1.2 s (iters) | bins now / plain | bins before / now | "
          "backward Cholesky s | backward CG s | Cholesky / CG | grad rel. diff |")
    print("|---" * 11 + "|")
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        costs = {"U[0, 2]": (2 * torch.rand(b, n, n, generator=g), torch.tensor(1.0))}
        trained = _trained_costs(b, n)
        if trained is not None:
            costs["shipped network"] = trained
        mask = torch.ones(b, n, dtype=torch.bool)
        r, c = um(mask, mask)
        G = torch.randn(b, n + 1, n + 1, generator=g)
        for name, (M, bin_cost) in costs.items():
            t = {k: [] for k in ("plain", "before", "now", "chol", "cg")}
            its = {}
            grads = {}
            for _ in range(repeats):
                for key in ("plain", "before", "now"):
                    t0 = time.perf_counter()
                    if key == "plain":
                        _, info = sinkhorn(M, r, c, 10.0, 1000, 1e-6)
                    else:
                        _, info = sinkhorn_with_bins(M, mask, mask, bin_cost, lam=10.0, max_iter=1000, tol=1e-6,
                                                     overrelax=1.4 if key == "before" else 1.2,
                                                     balance=key == "now")
                    t[key].append(time.perf_counter() - t0)
                    its[key] = int(info.iterations.max())
                for key, schur in (("chol", "cholesky"), ("cg", "cg")):
                    Mg = M.clone().requires_grad_(True)
                    P, _ = sinkhorn_with_bins(Mg, mask, mask, bin_cost, lam=10.0, max_iter=1000, tol=1e-6,
                                              overrelax=1.2, schur=schur)
                    loss = (P * G).sum()
                    t0 = time.perf_counter()
                    loss.backward()
                    t[key].append(time.perf_counter() - t0)
                    grads[key] = Mg.grad
            med = {k: statistics.median(v) for k, v in t.items()}
            diff = float((grads["cg"] - grads["chol"]).norm() / grads["chol"].norm())
            print(f"| {n} | {name} | {med['plain']:.3f} ({its['plain']}) | {med['before']:.3f} ({its['before']}) | "
                  f"{med['now']:.3f} ({its['now']}) | {med['now'] / med['plain']:.2f}x | "
                  f"**{med['before'] / med['now']:.2f}x** | {med['chol']:.3f} | {med['cg']:.3f} | "
                  f"**{med['chol'] / med['cg']:.2f}x** | {diff:.1e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["ot", "ot-bins", "ot-overrelax", "ot-speed", "ot-original", "pnp", "pnp-pairs", "pnp-lm",
                                       "matvec", "lstsq"],
                    action="append")
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
    print(f"# bpnp node benchmarks: torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    todo = args.only or ["ot", "ot-bins", "ot-overrelax", "ot-speed", "ot-original", "pnp", "pnp-pairs", "pnp-lm", "matvec",
                         "lstsq"]
    if "ot" in todo:
        bench_ot(args.repeats)
    if "ot-bins" in todo:
        bench_ot(args.repeats, bins=True)
    if "ot-overrelax" in todo:
        bench_ot_overrelax(args.repeats)
    if "ot-speed" in todo:
        bench_ot_speed(args.repeats)
    if "ot-original" in todo:
        bench_ot_original(args.repeats, args.threads)
    if "pnp" in todo:
        bench_pnp(args.repeats, args.threads)
    if "pnp-pairs" in todo:
        bench_pnp_pairs(args.repeats)
    if "pnp-lm" in todo:
        bench_pnp_lm(args.repeats)
    if "matvec" in todo:
        bench_matvec(args.repeats)
    if "lstsq" in todo:
        bench_lstsq(args.repeats)


if __name__ == "__main__":
    main()
