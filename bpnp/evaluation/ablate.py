"""Compare inference settings of one network on its run's VALIDATION split (never a test split).

    python -m bpnp.evaluation.ablate <run_dir> --ckpt CKPT \\
        --variant off: --variant search:search.enabled=true \\
        --variant geo:search.enabled=true,search.prior_weight=0 --length 256
    python -m bpnp.evaluation.ablate --scenes scenes/real_val_easy/* --ckpt CKPT --variant off: ...
    python -m bpnp.evaluation.ablate <run_dir> --ckpt SHIPPED --ckpt CANDIDATE --variant shipped:

Each ``--variant NAME:KEY=VALUE,KEY=VALUE`` is a set of network inference settings (the
``ransac``, ``refine``, ``search`` and ``gates`` groups of ``model.net``, dotted) over the checkpoint's, after
the common ``--set`` ones. With ``--scenes DIR [DIR ...]`` the validation set is those scene
folders (e.g. the exported images of validation scenes; never a test set). Otherwise the split is
rebuilt as training built it (the run's
``.hydra/config.yaml``: source, seed, ``val_synthetic``), optionally longer (``--length``: more
instances of the same validation stream). Every instance is solved on its own, as ``evaluate.py``
does (RANSAC drawing from ``seeded_generator(eval_seed, index)``), and the table gives per
variant: success (docs/metrics.md), the RANSAC pose's success, the final pose's match accuracy
(the share of true pairs whose 2D point the search matched to its true 3D point; without the
search, the share that are their row's maximum of P) and the mean time per instance (forward
only, one process, the machine's threads). The first variant is the reference; a variant is
only worth choosing when it beats the reference beyond the noise: the last column pairs the two on
the same instances (instances solved by one only, and the exact two-sided sign test of those);
two unpaired standard errors of a success rate are printed below the table.

``--ckpt`` given more than once compares checkpoints: every variant runs with each checkpoint in
turn on the same instances and the same RANSAC draws, rows are named ``<file stem> / <variant>``,
and the first checkpoint's first variant is the reference of the paired test (the way to choose
between two trained models on validation).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpnp.runtime.checkpoint import CheckpointError, load_network, parse_set_overrides

__all__ = ["parse_variant", "ablate", "median_spread", "main", "INFERENCE_GROUPS"]

#: The network's setting groups that inference settings can vary (``BlindPnPNet.configure``).
INFERENCE_GROUPS = ("ransac", "refine", "search", "gates")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})`` (values parsed as YAML)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] (NAME: for none)")
    items = [s for s in rest.split(",") if s.strip()]
    return name, parse_set_overrides(items)


def _group_overrides(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        group, dot, name = key.partition(".")
        if not dot or group not in INFERENCE_GROUPS:
            raise ValueError(f"{key}: only the inference groups ransac.*, refine.*, search.* and gates.* can vary")
        out.setdefault(group, {})[name] = value
    return out


def ablate(net, dataset, variants: list[tuple[str, dict[str, Any]]], seed: int = 0) -> list[dict[str, Any]]:
    """One row per variant: ``name``, ``n``, ``success``, ``ransac_success``, ``match_acc``,
    ``time_s`` over the scenes of ``dataset`` (scene dicts)."""
    from bpnp.data.collate import collate_scenes
    from bpnp.evaluation.runner import instance_errors
    from bpnp.geometry.ransac import seeded_generator

    base = net.settings()
    scenes = [dataset[i] for i in range(len(dataset))]
    rows = []
    for name, flat in variants:
        groups = _group_overrides(flat)
        net.configure(**{g: {**base[g], **groups.get(g, {})} for g in INFERENCE_GROUPS})
        net.eval()
        succ, rsucc, acc, dts = [], [], [], []
        with torch.no_grad():
            for i, scene in enumerate(scenes):
                batch = collate_scenes([scene])
                start = time.perf_counter()
                out = net(batch, generator=seeded_generator(seed, i))
                dts.append(time.perf_counter() - start)
                succ.append(instance_errors(out.R[0], out.t[0], scene)["success"])
                R_r = out.R0 if out.R_ransac is None else out.R_ransac
                t_r = out.t0 if out.t_ransac is None else out.t_ransac
                rsucc.append(instance_errors(R_r[0], t_r[0], scene)["success"])
                match = torch.as_tensor(np.asarray(scene["match"]))
                true = match >= 0
                if not bool(true.any()):
                    continue
                if out.search_matches is not None:
                    got = out.search_matches[0]
                else:
                    got = out.P[0].argmax(-1)
                acc.append(float((got[true] == match[true]).float().mean()))
        rows.append({"name": name, "n": len(scenes), "success": float(np.mean(succ)), "per_instance": list(map(bool, succ)),
                     "ransac_success": float(np.mean(rsucc)), "match_acc": float(np.mean(acc)) if acc else math.nan,
                     "time_s": float(np.mean(dts))})
    net.configure(**{g: base[g] for g in INFERENCE_GROUPS})
    return rows


def median_spread(dataset) -> float:
    """Median over the scenes of their keypoints' angular spread
    (:func:`bpnp.geometry.angular_scale.keypoint_spread`), radians."""
    from bpnp.geometry.angular_scale import keypoint_spread
    from bpnp.geometry.bearings import to_bearings

    spreads = []
    for i in range(len(dataset)):
        p2d = torch.as_tensor(np.asarray(dataset[i]["p2d"]), dtype=torch.float64)[None]
        spreads.append(float(keypoint_spread(to_bearings(p2d), torch.ones(p2d.shape[:2], dtype=torch.bool))[0]))
    return float(np.median(spreads)) if spreads else math.nan


def paired_test(ref: list[bool], other: list[bool]) -> tuple[int, int, float]:
    """``(wins, losses, p)``: instances solved by ``other`` only, by ``ref`` only, and the exact
    two-sided sign test (McNemar's) of the discordant pairs, the right test for two settings on
    the same instances (the unpaired two standard errors ignore that most instances agree)."""
    wins = sum(o and not r for r, o in zip(ref, other))
    losses = sum(r and not o for r, o in zip(ref, other))
    k, n = min(wins, losses), wins + losses
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return wins, losses, p


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | n | success | RANSAC-only success | match acc. | time per instance | vs the first: solved only here / only there, sign-test p |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        paired = ""
        if i and "per_instance" in r and "per_instance" in rows[0]:
            w, l_, p = paired_test(rows[0]["per_instance"], r["per_instance"])
            paired = f"{w} / {l_}, p = {p:.3f}"
        lines.append(f"| {r['name']} | {r['n']} | {100 * r['success']:.1f} % | {100 * r['ransac_success']:.1f} % | "
                     f"{100 * r['match_acc']:.1f} % | {r['time_s']:.3f} s | {paired} |")
    n = rows[0]["n"] if rows else 0
    p = rows[0]["success"] if rows else 0.0
    se = math.sqrt(max(p * (1 - p), 0.25 / max(n, 1)) / max(n, 1))
    lines.append(f"\ntwo standard errors of a success rate near the reference's: {200 * se:.1f} points (unpaired); "
                 "a variant is told apart from the first by the paired sign test (p < 0.05)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bpnp.evaluation.ablate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default=None, help="a train.py run directory (with .hydra/config.yaml)")
    ap.add_argument("--scenes", nargs="+", type=Path, default=None, metavar="DIR",
                    help="validation scene folders instead of a run's validation split")
    ap.add_argument("--ckpt", action="append", default=None,
                    help="checkpoint (default <run_dir>/checkpoints/last.ckpt); repeat to compare checkpoints")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an inference setting for every variant (repeatable)")
    ap.add_argument("--length", type=int, default=None, help="validation instances (default: the run's val_length)")
    args = ap.parse_args(argv)
    if (args.run_dir is None) == (args.scenes is None):
        print("error: pass a run directory or --scenes DIR [DIR ...] (one of them)", file=sys.stderr)
        return 2
    run = None if args.run_dir is None else Path(args.run_dir)
    cfg_path = None if run is None else run / ".hydra" / "config.yaml"
    if cfg_path is not None and not cfg_path.is_file():
        print(f"error: {cfg_path} not found (pass a train.py run directory)", file=sys.stderr)
        return 2
    if run is None and args.ckpt is None:
        print("error: --scenes needs --ckpt", file=sys.stderr)
        return 2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.utils.data import ConcatDataset

    from bpnp.data.scenes import SceneDirectory

    try:
        variants = [parse_variant(v) for v in args.variant]
        for _, flat in variants:
            _group_overrides(flat)
        ckpts = args.ckpt or [run / "checkpoints" / "last.ckpt"]
        nets = [load_network(c, overrides=parse_set_overrides(args.overrides)) for c in ckpts]
        if args.scenes is not None:
            dataset, seed, where = ConcatDataset([SceneDirectory(d) for d in args.scenes]), 0, \
                f"{len(args.scenes)} scene folders"
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.scenes is None:
        cfg = OmegaConf.load(cfg_path)
        if args.length is not None:
            cfg.data.val_length = int(args.length)
        dm = instantiate(cfg.data)
        dm.setup("validate")
        dataset, seed, where = dm.dataset("val"), int(cfg.model.get("eval_seed", 0)), f"validation split of {run}"
    rows = []
    for ckpt, net in zip(ckpts, nets):
        for row in ablate(net, dataset, variants, seed=seed):
            if len(ckpts) > 1:
                row["name"] = f"{Path(ckpt).stem} / {row['name']}"
            rows.append(row)
    print(f"{where}: {rows[0]['n']} instances, median keypoint spread {median_spread(dataset):.4f} rad "
          "(gates.reference of relative gates chosen here)")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
