"""Micro-benchmark of the per-point feature networks: the GoMatch-style AttentionMatcher against
the original pair of encoders, measured side by side in one run.

    python bench/matcher.py                 # 1 thread, b = 8, m = n = 256 and 1000 (about a minute)
    python bench/matcher.py --cross-dim 64  # also the cheaper cross-attention
    python bench/matcher.py --threads 2 --repeats 3

Contenders, all at their defaults (width 128):

- ``attention``: :class:`bpnp.models.attention.AttentionMatcher()` (3 blocks, 4 heads, k = 16).
- ``encoders knn=16`` / ``encoders knn=0``: ``PointEncoder(2, 128, 12, knn=k)`` +
  ``PointEncoder(3, 128, 12, knn=k)`` as BlindPnPNet builds them, the 3D points similarity-
  normalised first (the STN, which the attention matcher does not need, is left out).
- optionally (``--cross-dim 64``): ``AttentionMatcher(cross_dim=64)``, the cheaper cross-attention.

For each size it prints the forward and forward+backward times (training mode, a fixed random
linear loss on the features), medians over ``--repeats`` repetitions after one warm-up, the
contenders alternating within each repetition so that machine noise hits all alike; the ratio
of the attention matcher's forward+backward time to each contender's (> 1: the matcher is
slower); and the bytes autograd saves for the backward (unique storages). Then the inference
forward (eval mode, ``torch.inference_mode``) at b = 1, m = n = 1000 on one thread.
Denormals are flushed to zero as train.py does. Nothing here is a test.
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
from bpnp.models.encoders import PointEncoder  # noqa: E402
from bpnp.models.network import _masked_similarity_normalise  # noqa: E402


class EncoderPair(torch.nn.Module):
    """The original feature path of BlindPnPNet.features without the STN, same call signature
    as the matcher."""

    def __init__(self, knn: int) -> None:
        super().__init__()
        self.encoder2d = PointEncoder(2, 128, 12, knn=knn)
        self.encoder3d = PointEncoder(3, 128, 12, knn=knn)

    def forward(self, p2d, p3d, mask2d, mask3d):
        x3 = _masked_similarity_normalise(p3d.transpose(1, 2), mask3d)
        return self.encoder2d(p2d.transpose(1, 2), mask2d), self.encoder3d(x3, mask3d)


def make_inputs(b: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p2d = torch.rand(b, n, 2, generator=g) - 0.5  # camera-normalised, about a 53-degree field of view
    p3d = 3.0 * torch.randn(b, n, 3, generator=g) + torch.tensor([1.0, 2.0, 10.0])
    mask = torch.ones(b, n, dtype=torch.bool)
    weights = torch.randn(b, 128, n, generator=g), torch.randn(b, 128, n, generator=g)
    return p2d, p3d, mask, weights


def step(net, inputs) -> tuple[float, float]:
    """One forward + backward; returns (forward seconds, forward + backward seconds)."""
    p2d, p3d, mask, (w2, w3) = inputs
    net.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    f2d, f3d = net(p2d, p3d, mask, mask)
    t1 = time.perf_counter()
    ((f2d * w2).sum() + (f3d * w3).sum()).backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def saved_bytes(net, inputs) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return x

    p2d, p3d, mask, _ = inputs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        f2d, f3d = net(p2d, p3d, mask, mask)
    del f2d, f3d
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1000])
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions per size (after one warm-up)")
    ap.add_argument("--cross-dim", type=int, nargs="*", default=[],
                    help="also time AttentionMatcher(cross_dim=D) for each D (the cheaper cross-attention)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    nets = {"attention": AttentionMatcher()}
    nets.update({f"attention cross={d}": AttentionMatcher(cross_dim=d) for d in args.cross_dim})
    nets.update({"encoders knn=16": EncoderPair(16), "encoders knn=0": EncoderPair(0)})
    for net in nets.values():
        net.train()
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, training mode; "
          f"median of {args.repeats} (contenders alternating)")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items()))
    for n in args.sizes:
        inputs = make_inputs(args.batch, n)
        for net in nets.values():
            step(net, inputs)  # warm-up at this size
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in nets}
        for _ in range(args.repeats):
            for name, net in nets.items():
                times[name].append(step(net, inputs))
        mem = {name: saved_bytes(net, inputs) for name, net in nets.items()}
        print(f"\nb = {args.batch}, m = n = {n}")
        print(f"  {'':20s} {'forward':>9s} {'fwd+bwd':>9s} {'attention / this':>17s} {'saved for bwd':>14s}")
        ref = statistics.median(t for _, t in times["attention"])
        for name in nets:
            fwd = statistics.median(f for f, _ in times[name])
            tot = statistics.median(t for _, t in times[name])
            print(f"  {name:20s} {fwd:8.3f}s {tot:8.3f}s {ref / tot:16.2f}x {mem[name] / 2**20:10.0f} MiB")

    torch.set_num_threads(1)
    inputs = make_inputs(1, 1000)
    p2d, p3d, mask, _ = inputs
    print("\ninference forward, b = 1, m = n = 1000, 1 thread, eval mode (median of "
          f"{max(args.repeats, 5)})")
    for net in nets.values():
        net.eval()
    times = {name: [] for name in nets}
    with torch.inference_mode():
        for net in nets.values():
            net(p2d, p3d, mask, mask)
        for _ in range(max(args.repeats, 5)):
            for name, net in nets.items():
                t0 = time.perf_counter()
                net(p2d, p3d, mask, mask)
                times[name].append(time.perf_counter() - t0)
    for name in nets:
        print(f"  {name:20s} {statistics.median(times[name]) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
