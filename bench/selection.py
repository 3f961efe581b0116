"""``bpnp.geometry.selection.top_k`` beside ``torch.topk`` on the shapes inference and training use.

    python bench/selection.py --threads 1

Rows: the (b, N, N) neighbour distances of the matcher's kNN and of RANSAC's guided sampling
(k = 16, smallest), the pose search's row support (each 2D point's 16 largest entries of P), and
RANSAC's candidate pairs (the K largest of the m n entries of P). Random inputs of those shapes
(distances of uniform points; P a row-normalised matrix of lognormal entries with a true pair per
row). Medians of ``--repeats``, the two alternating; the values must be equal (the indices too,
where no entries tie). Nothing here is a test; the numbers go to docs/benchmarks.md with this
command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpnp.geometry.selection import padded_length, top_k  # noqa: E402


def _cases():
    g = torch.Generator().manual_seed(0)
    for b, N in ((1, 256), (8, 256), (1, 1000), (8, 1000), (1, 2000)):
        x = torch.rand(b, N, 3, generator=g)
        d = torch.cdist(x, x).square().masked_fill(torch.eye(N, dtype=torch.bool), float("inf"))
        yield f"neighbour distances b={b} N={N}, 16 smallest", d, 16, False
    for m in (256, 1000, 2000):
        P = torch.randn(1, m, m, generator=g).exp()
        P[0, torch.arange(m), torch.randperm(m, generator=g)] += 30.0
        P = P / P.sum()
        yield f"row support m=n={m}, 16 largest per row", P, 16, True
        K = min(1000, (3 * m + 1) // 2)
        yield f"RANSAC candidates m=n={m}, {K} largest of m n", P.flatten(1), K, True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print("| case | row length selected from | torch.topk ms | top_k ms | ratio | same values | same indices |")
    print("|---|---|---|---|---|---|---|")
    for name, x, k, largest in _cases():
        ref = torch.topk(x, k, dim=-1, largest=largest)
        got = top_k(x, k, largest=largest)
        times = {"torch": [], "ours": []}
        for _ in range(args.repeats):
            for key, fn in (("torch", lambda: torch.topk(x, k, dim=-1, largest=largest)),
                            ("ours", lambda: top_k(x, k, largest=largest))):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[key]) * 1e3 for key in ("torch", "ours"))
        print(f"| {name} | {padded_length(x.shape[-1], k)} | {a:.2f} | {b:.2f} | **{a / b:.2f}x** | "
              f"{torch.equal(ref.values, got[0])} | {torch.equal(ref.indices, got[1])} |")


if __name__ == "__main__":
    main()
