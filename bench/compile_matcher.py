"""Does ``torch.compile`` pay for the default matcher on this machine? Eager against compiled, in
one run, alternating.

    python bench/compile_matcher.py                 # inference b = 1, m = n = 1000; training b = 8, m = n = 256
    python bench/compile_matcher.py --threads 2 --repeats 7

The matcher (:class:`bpnp.models.attention.AttentionMatcher`, configs/model/net/attention.yaml
widths, random weights) is the part of the network without data-dependent control flow; the
geometric layers (Sinkhorn, RANSAC, LM) stop per item and are not compiled. ``torch.compile(...,
dynamic=True)`` (inductor, the default backend), so that a new point count does not recompile.
Printed: the first call of each case (compilation included), then medians of ``--repeats``
alternating calls: inference (eval mode, no grad) and a training forward + backward of a loss of
the features.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpnp.models.attention import AttentionMatcher  # noqa: E402


def inputs(b: int, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(b, n, dtype=torch.bool)
    return torch.randn(b, n, 2, generator=g) * 0.3, torch.randn(b, n, 3, generator=g), ones, ones.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = AttentionMatcher(width=128, blocks=3, heads=4, knn=16)
    compiled = torch.compile(eager, dynamic=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for case, b, n in (("inference", 1, 1000), ("training fwd+bwd", 8, 256)):
        d = inputs(b, n)

        def call(mod, case=case, d=d):
            if case == "inference":
                mod.eval()
                with torch.no_grad():
                    return mod(*d)
            mod.train()
            f2, f3 = mod(*d)
            ((f2.transpose(1, 2) @ f3).square().sum() + f2.sum()).backward()

        t0 = time.perf_counter()
        call(compiled)
        first = time.perf_counter() - t0
        call(compiled)
        call(eager)
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, mod in (("eager", eager), ("compiled", compiled)):
                t0 = time.perf_counter()
                call(mod)
                times[name].append(time.perf_counter() - t0)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"{case}, b = {b}, m = n = {n}: first compiled call {first:.1f} s (compilation); eager {e:.4f} s, "
              f"compiled {c:.4f} s (median of {args.repeats}): compiled saves {e - c:.4f} s per call ({(e - c) / e:.0%}); "
              f"compilation pays after {first / max(e - c, 1e-9):.0f} calls")


if __name__ == "__main__":
    main()
