"""Write a weights-only checkpoint (network weights + network config) from a training checkpoint.

    python -m bpnp.evaluation.export_weights logs/bpnp_synthetic/runs/<run>/checkpoints/last.ckpt checkpoints/bpnp_synthetic.pt
    python -m bpnp.evaluation.export_weights <ckpt> <out> --set refine.robust_scale=1e-4   # inference settings

``--set KEY=VALUE`` (repeatable; dotted keys of the network config, ``refine.gate``,
``ransac.num_hypotheses``...) replaces a network setting in the written config (the value is read
as an int, a float or else YAML: booleans, strings), e.g. an inference setting chosen on
validation data. The written config is the checkpoint's in today's nested form.

The result holds no optimizer state (a 2 M-parameter network is about 8 MB in float32) and is
loaded by ``evaluate.py ckpt_path=...`` with no other file.
"""

from __future__ import annotations

import argparse
import sys

from bpnp.models.settings import merge_overrides
from bpnp.runtime.checkpoint import (
    CheckpointError, legacy_network_defaults, load_checkpoint_dict, network_config, network_from_dict,
    parse_set_overrides, save_weights_only,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="Lightning .ckpt of train.py (or a weights-only file)")
    ap.add_argument("out", help="output path, e.g. checkpoints/bpnp_synthetic.pt")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="replace a network setting in the written config (repeatable)")
    args = ap.parse_args(argv)
    try:
        overrides = parse_set_overrides(args.overrides)
        ckpt = load_checkpoint_dict(args.ckpt)
        state = {k.removeprefix("net."): v for k, v in (ckpt.get("state_dict") or {}).items()}
        config = merge_overrides(legacy_network_defaults(network_config(ckpt, args.ckpt), state), overrides, "--set")
        net = network_from_dict(ckpt, args.ckpt, overrides=overrides)  # validates that config and weights fit
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = save_weights_only(args.out, net, config)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {sum(p.numel() for p in net.parameters())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
