"""Write a weights-only checkpoint (network weights + network config) from a training checkpoint.

    python -m bpnp.evaluation.export_weights logs/bpnp_synthetic/runs/<run>/checkpoints/last.ckpt checkpoints/bpnp_synthetic.pt

The result holds no optimizer state (a 2 M-parameter network is about 8 MB in float32) and is
loaded by ``evaluate.py ckpt_path=...`` with no other file.
"""

from __future__ import annotations

import argparse
import sys

from bpnp.evaluation.checkpoint import CheckpointError, load_checkpoint_dict, load_network, network_config, save_weights_only


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="Lightning .ckpt of train.py (or a weights-only file)")
    ap.add_argument("out", help="output path, e.g. checkpoints/bpnp_synthetic.pt")
    args = ap.parse_args(argv)
    try:
        net = load_network(args.ckpt)  # validates that config and weights fit
        config = network_config(load_checkpoint_dict(args.ckpt), args.ckpt)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = save_weights_only(args.out, net, config)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {sum(p.numel() for p in net.parameters())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
