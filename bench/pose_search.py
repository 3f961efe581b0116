"""The pose search's two kernels before and after session 12's rewrite, side by side in one run.

    python bench/pose_search.py --threads 1

1. ``rematch`` (the (b, k, m, n) mutual-best-match pass, :func:`bpnp.geometry.pose_search.rematch`):
   before, a fresh score tensor per call, ``argmax`` on both axes and a separate gate mask reduced
   by ``all``; now, one workspace for every round, the gate written as -inf into the score by one
   in-place ``threshold_``, and ``max(dim).indices`` (the same first index as ``argmax``, about
   twice as fast on a CPU).
2. ``gauss_newton_angular`` (RANSAC's local optimisation and the search's re-solve,
   :func:`bpnp.geometry.ransac.gauss_newton_angular`): before, a (6, 3) x (3, 6) product per pair
   summed over the K pairs; now one (6, 3K) x (3K, 6) product per item.
3. The whole :func:`~bpnp.geometry.pose_search.pose_search` with the before / after kernels.
4. Session 13's :func:`~bpnp.geometry.pose_search.row_support` (the re-ranking of the search's
   starts) over a pool of 256 poses and 16 partners per 2D point, by ``chunk`` (how many
   (pose, pair) entries are scored at once; the default is 2^18 since session 15), with the supports compared.

b = 1, k = 4 hypotheses near the true pose, m = n points per side (a quarter of them outliers), a
soft-match matrix with a third of each true row's mass on the true pair, float64 as the search runs.
The outputs are compared (the matches must be equal; the poses agree to rounding). Medians of
``--repeats``, contenders alternating. Nothing here is a test; the numbers go to
docs/benchmarks.md with this command.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bpnp.geometry.pose_search as ps  # noqa: E402
from bpnp.geometry.bearings import project, to_bearings  # noqa: E402
from bpnp.geometry.ransac import gauss_newton_angular  # noqa: E402
from bpnp.geometry.rotations import skew, so3_exp  # noqa: E402


# ---- the code as it was before (bpnp at 1965bc2), for the side-by-side timing only -------------
def rematch_before(P, bearings, points, mask2d, mask3d, R, t, gate, prior_weight, log_prior=None, workspace=None):
    single = R.ndim == 3
    if single:
        R, t = R.unsqueeze(1), t.unsqueeze(1)
    b, k = R.shape[:2]
    m, n = bearings.shape[1], points.shape[1]
    x = points.unsqueeze(1) @ R.transpose(-1, -2) + t.unsqueeze(-2)
    front = mask3d.unsqueeze(1) & (x[..., 2] > 0)
    rays = torch.where(front.unsqueeze(-1), F.normalize(x, dim=-1, eps=1e-12), torch.zeros_like(x))
    bw = torch.where(mask2d.unsqueeze(-1), bearings, torch.zeros_like(bearings))
    bk = bw.unsqueeze(1).expand(b, k, m, 3).reshape(b * k, m, 3)
    cos = torch.bmm(bk, rays.reshape(b * k, n, 3).transpose(-1, -2)).view(b, k, m, n)
    scale = 1.0 - math.cos(gate)
    outside = cos <= math.cos(gate)
    score = cos.mul_(1.0 / scale)
    if log_prior is None and prior_weight > 0:
        log_prior = prior_weight * torch.log(P.clamp_min(torch.finfo(P.dtype).tiny)).to(score.dtype)
    if log_prior is not None:
        score.add_(log_prior.unsqueeze(1))
    score.masked_fill_(outside, -math.inf)
    best_j = score.argmax(-1)
    best_i = score.argmax(-2)
    has = ~outside.all(-1)
    mutual = torch.gather(best_i, 2, best_j) == torch.arange(m, device=P.device)
    keep = has & mutual
    matches = torch.where(keep, best_j, torch.full_like(best_j, -1))
    chosen = torch.gather(P.unsqueeze(1).expand(b, k, m, n), 3, best_j.unsqueeze(-1)).squeeze(-1)
    prior = torch.where(keep, chosen, torch.zeros_like(chosen))
    if single:
        matches, prior = matches.squeeze(1), prior.squeeze(1)
    return matches, prior


def gauss_newton_before(R, t, bc, pc, wc, cos_thr, steps):
    eye3 = torch.eye(3, dtype=R.dtype, device=R.device)

    def cost_terms(R_, t_):
        x = pc @ R_.transpose(-1, -2) + t_.unsqueeze(-2)
        nrm = x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(R.dtype).tiny)
        return x, nrm, x / nrm

    for _ in range(steps):
        x, nrm, u = cost_terms(R, t)
        inl = ((u * bc).sum(-1) > cos_thr) & (wc > 0)
        w = wc * inl
        e = u - bc
        cost = (w * (e * e).sum(-1)).sum(-1)
        proj = (eye3 - u.unsqueeze(-1) * u.unsqueeze(-2)) / nrm.unsqueeze(-1)
        Rp = x - t.unsqueeze(-2)
        J = torch.cat([proj @ -skew(Rp), proj], dim=-1)
        Jw = J * w[..., None, None]
        Hm = (Jw.transpose(-1, -2) @ J).sum(1)
        g = (Jw.transpose(-1, -2) @ e.unsqueeze(-1)).sum(1).squeeze(-1)
        damp = 1e-6 * Hm.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True) + 1e-12
        Hm = Hm + torch.diag_embed(damp.expand(-1, 6))
        delta, _ = torch.linalg.solve_ex(Hm, -g.unsqueeze(-1))
        delta = delta.squeeze(-1)
        R_new = so3_exp(delta[:, :3]) @ R
        t_new = t + delta[:, 3:]
        _, _, u_new = cost_terms(R_new, t_new)
        cost_new = (w * ((u_new - bc) ** 2).sum(-1)).sum(-1)
        ok = torch.isfinite(delta).all(-1) & (cost_new <= cost)
        R = torch.where(ok[:, None, None], R_new, R)
        t = torch.where(ok[:, None], t_new, t)
    return R, t


# ---- inputs ------------------------------------------------------------------------------------
def search_inputs(n, k=4, seed=0):
    """One item: n 3D points (a quarter outliers off the image), n bearings (a quarter
    outliers), P with a third of each true row on its pair, k poses 0.5 degrees off."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    X = torch.randn(1, n, 3, generator=g, dtype=f64) + torch.tensor([0.0, 0.0, 6.0], dtype=f64)
    inl = int(0.75 * n)
    b = to_bearings(project(X))
    b[:, inl:] = to_bearings(0.3 * (2 * torch.rand(1, n - inl, 2, generator=g, dtype=f64) - 1))
    P = torch.rand(1, n, n, generator=g, dtype=f64)
    P[0, torch.arange(inl), torch.arange(inl)] += P[0, :inl].sum(1) / 2
    P /= P.sum()
    w = torch.randn(k, 3, generator=g, dtype=f64)
    R = so3_exp(w / w.norm(dim=1, keepdim=True) * math.radians(0.5))[None]
    t = 0.01 * torch.randn(1, k, 3, generator=g, dtype=f64)
    mask = torch.ones(1, n, dtype=torch.bool)
    return P, b, X, mask, R, t


def timed(fns, repeats):
    """Median seconds of each of ``fns`` (name -> callable), alternating, one warm-up round."""
    times = {name: [] for name in fns}
    outs = {}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# pose search kernels, before / after: torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f} at start, b = 1, k = 4, float64, median of {args.repeats}")
    print("| m = n | rematch before ms | after ms | ratio | Gauss-Newton (5 steps, K = m) before ms | after ms | ratio "
          "| pose search before s | after s | ratio | same matches | pose difference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        P, b, X, mask, R, t = search_inputs(n)
        lp = torch.log(P.clamp_min(torch.finfo(P.dtype).tiny))
        work = torch.empty(4, n, n, dtype=torch.float64)
        rm, rm_out = timed({"before": lambda: rematch_before(P, b, X, mask, mask, R, t, 0.01, 1.0, lp),
                            "after": lambda: ps.rematch(P, b, X, mask, mask, R, t, 0.01, 1.0, lp, work)}, args.repeats)
        bk, pk = b.expand(4, n, 3), X.expand(4, n, 3)
        wk = torch.ones(4, n, dtype=torch.float64)
        gn, _ = timed({"before": lambda: gauss_newton_before(R[0], t[0], bk, pk, wk, math.cos(0.02), 5),
                       "after": lambda: gauss_newton_angular(R[0], t[0], bk, pk, wk, math.cos(0.02), 5)}, args.repeats)

        def search_before():
            new_rm, new_gn = ps.rematch, ps.gauss_newton_angular
            ps.rematch, ps.gauss_newton_angular = rematch_before, gauss_newton_before
            try:
                return ps.pose_search(P, b, X, mask, mask, R, t)
            finally:
                ps.rematch, ps.gauss_newton_angular = new_rm, new_gn

        se, se_out = timed({"before": search_before, "after": lambda: ps.pose_search(P, b, X, mask, mask, R, t)},
                           args.repeats)
        same = bool(torch.equal(rm_out["before"][0], rm_out["after"][0])) and bool(
            torch.equal(se_out["before"].matches, se_out["after"].matches))
        dpose = float((se_out["before"].R - se_out["after"].R).abs().max())
        print(f"| {n} | {1e3 * rm['before']:.1f} | {1e3 * rm['after']:.1f} | **{rm['before'] / rm['after']:.2f}x** | "
              f"{1e3 * gn['before']:.2f} | {1e3 * gn['after']:.2f} | **{gn['before'] / gn['after']:.2f}x** | "
              f"{se['before']:.3f} | {se['after']:.3f} | **{se['before'] / se['after']:.2f}x** | {same} | {dpose:.1e} |")


    chunks = (1 << 23, 1 << 20, 1 << 18, 1 << 16)
    print(f"\n# row support of a pool of 256 poses, 16 partners, float32 (as the network runs it), by chunk, "
          f"median of {args.repeats}")
    print("| m = n | " + " | ".join(f"chunk 2^{c.bit_length() - 1} ms" for c in chunks)
          + " | 2^23 / 2^18 | same supports |")
    print("|---|" + "---|" * (len(chunks) + 2))
    for n in args.sizes:
        P, b, X, mask, _, _ = search_inputs(n)
        g = torch.Generator().manual_seed(1)
        w = torch.randn(256, 3, generator=g, dtype=torch.float64)
        R = so3_exp(w / w.norm(dim=1, keepdim=True) * math.radians(2.0))[None].float()
        t = 0.05 * torch.randn(1, 256, 3, generator=g).float()
        P32, b32, X32 = P.float(), b.float(), X.float()
        rs, rs_out = timed({c: (lambda c=c: ps.row_support(P32, b32, X32, mask, mask, R, t, partners=16, threshold=0.01,
                                                            chunk=c)) for c in chunks}, args.repeats)
        same = all(torch.equal(rs_out[chunks[0]], rs_out[c]) for c in chunks)
        print(f"| {n} | " + " | ".join(f"{1e3 * rs[c]:.1f}" for c in chunks)
              + f" | **{rs[chunks[0]] / rs[1 << 18]:.2f}x** | {same} |")


if __name__ == "__main__":
    main()
