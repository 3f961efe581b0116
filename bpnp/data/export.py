"""Write scene sets (directories of ``.npz`` scene files) from the synthetic generator, a COLMAP
model or BPnPNet pickles.

Examples::

    python -m bpnp.data.export synthetic --out scenes/synth_test --num 500 --seed 2 \\
        --outlier-frac-2d 0.2 --outlier-frac-3d 0.2 --noise-px 1.0
    python -m bpnp.data.export synthetic --preset world --out scenes/unseen_category --num 200 \\
        --seed 2 --set mesh_root=data/meshes --set mesh_split=test_unseen_category
    python -m bpnp.data.export colmap --model data/real/lund_door --out scenes/lund \\
        --max-points-2d 2000 --max-points-3d 3000
    python -m bpnp.data.export pickles --root data/bpnpnet --dataset modelnet40 --split test \\
        --out scenes/modelnet40_test

Files are named by zero-padded index (``000000.npz`` ...), so sorting by name keeps the order,
and ``index.json`` records what was written (source, arguments, per-file origin, counts).
An output directory that already holds ``.npz`` files is refused unless ``--overwrite``.

The export is atomic: everything is written to ``<out>.tmp-<pid>`` beside ``--out`` (holding
the marker :data:`bpnp.data.scenes.EXPORT_INCOMPLETE_MARKER` while it is written), and renamed
to ``--out`` once ``index.json``, the last file, is written; on an error or an interruption the
temporary folder is removed and ``--out`` is as it was. With ``--overwrite`` into a folder that
holds other files, its ``.npz`` files and ``index.json`` are replaced with the marker in place
meanwhile, so a folder caught half-way is refused by ``evaluate.py`` (and :class:`~bpnp.data.scenes.SceneDirectory`).
COLMAP images that cannot give an instance (fewer than 4 matched keypoints) are skipped with one
``warning:`` line naming them; a camera model that cannot be undistorted fails before any file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from bpnp.data.embedded import MESH_ROOT
from bpnp.data.ranges import parse_set_items
from bpnp.data.scenes import EXPORT_INCOMPLETE_MARKER, save_scene, validate_scene

__all__ = ["main", "build_parser"]


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is not a folder or already holds scenes (unless
    ``--overwrite``); nothing is created or deleted here (see :func:`_write_all`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} exists and is not a directory")
    existing = sorted(out.glob("*.npz")) if out.is_dir() else []
    if existing and not overwrite:
        raise SystemExit(f"error: {out} already holds {len(existing)} .npz files; "
                         "use --overwrite to replace them")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _temp_dir(out: Path) -> Path:
    """A fresh ``<out>.tmp-<pid>`` beside ``out``, holding the unfinished-export marker; the
    temporary folders of earlier exports to ``out`` whose process is gone (killed) are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f"{out.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if old.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) \
                and (old / EXPORT_INCOMPLETE_MARKER).exists():
            shutil.rmtree(old, ignore_errors=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / EXPORT_INCOMPLETE_MARKER).write_text(f"unfinished export to {out} by process {os.getpid()}\n")
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export ``tmp`` to ``out``: one rename when ``out`` is absent or empty;
    otherwise (``--overwrite`` into a folder with other files) replace its ``.npz`` files and
    ``index.json``, with the marker in ``out`` until ``index.json`` is in place."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        (tmp / EXPORT_INCOMPLETE_MARKER).unlink()
        os.replace(tmp, out)  # rename(2) replaces an empty directory
        return
    os.replace(tmp / EXPORT_INCOMPLETE_MARKER, out / EXPORT_INCOMPLETE_MARKER)
    for old in out.glob("*.npz"):
        old.unlink()
    for new in sorted(tmp.glob("*.npz")):
        os.replace(new, out / new.name)
    os.replace(tmp / "index.json", out / "index.json")
    (out / EXPORT_INCOMPLETE_MARKER).unlink()
    shutil.rmtree(tmp, ignore_errors=True)


def _write_all(out: Path, scenes: Iterable[tuple[dict[str, Any], dict[str, Any]]], total: int,
               meta: dict[str, Any], quiet: bool) -> int:
    out = Path(out)
    width = max(6, len(str(max(total - 1, 0))))
    entries = []
    tmp = _temp_dir(out)
    try:
        for i, (scene, origin) in enumerate(scenes):
            name = f"{i:0{width}d}.npz"
            # validated under its final name, so that an error names the file the user asked for
            save_scene(tmp / name, validate_scene(scene, str(out / name)))
            entries.append({"file": name, "m": int(len(scene["p2d"])), "n": int(len(scene["p3d"])),
                            "inliers_2d": int(np.sum(scene["match"] >= 0)), **origin})
            if not quiet and (i + 1) % 100 == 0:
                print(f"{i + 1}/{total} scenes written", file=sys.stderr)
        meta = {**meta, "count": len(entries), "files": entries, "written_by": "bpnp.data.export"}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1))  # the last file of an export
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"wrote {len(entries)} scenes to {out}")
    return len(entries)


def _run_synthetic(args: argparse.Namespace) -> int:
    from bpnp.data.synthetic import WORLD, SyntheticConfig, make_instance

    # Precedence: the preset, then the flags given, then --set KEY=VALUE.
    kw: dict[str, Any] = {} if args.preset == "legacy" else {**WORLD}
    if args.preset == "world":
        kw["mesh_root"] = None
    lo, hi = args.min_points, args.max_points
    if lo is not None or hi is not None:
        base = SyntheticConfig.from_dict({k: v for k, v in kw.items() if k == "num_points_2d"}).num_points_2d
        base = base if isinstance(base, tuple) else (base, base)
        kw["num_points_2d"] = (base[0] if lo is None else lo, base[1] if hi is None else hi)
    flags = {"outlier_frac_2d": args.outlier_frac_2d, "outlier_frac_3d": args.outlier_frac_3d,
             "noise_px": args.noise_px, "focal_px": args.focal_px, "fov_deg": args.fov_deg}
    kw.update({k: v for k, v in flags.items() if v is not None})
    if args.hidden_outliers:
        kw["visible_only"] = False
    if args.shapes:
        kw["shape_weights"] = {s: 1.0 for s in args.shapes}
    kw.update(parse_set_items(args.set, strict=True))
    if kw.get("mesh_root") is None and float(dict(kw.get("shape_weights") or {}).get("mesh", 0)) > 0:
        kw["mesh_root"] = str(MESH_ROOT)
    cfg = SyntheticConfig.from_dict(kw)
    _prepare_out(args.out, args.overwrite)
    scenes = ((make_instance(cfg, args.seed, i), {"seed": args.seed, "index": i})
              for i in range(args.num))
    meta = {"source": "synthetic", "seed": args.seed, "config": cfg.to_dict()}
    return _write_all(args.out, scenes, args.num, meta, args.quiet)


def _run_colmap(args: argparse.Namespace) -> int:
    from bpnp.data.colmap import read_model
    from bpnp.data.instances import dropped_images_warning, instance_from_image, screen_images

    model = read_model(args.model)
    # Every camera and image is checked first: an unsupported camera fails before any file.
    ids, dropped = screen_images(model)
    if dropped:
        print(dropped_images_warning(model, dropped), file=sys.stderr)
    if not ids:
        raise ValueError(f"{args.model}: no image of the model gives an instance")
    _prepare_out(args.out, args.overwrite)
    scenes = (
        (instance_from_image(model, i, max_points_2d=args.max_points_2d,
                             max_points_3d=args.max_points_3d, outlier_frac_3d=args.outlier_frac_3d,
                             outliers_per_inlier_2d=args.outliers_per_inlier_2d,
                             rng=np.random.default_rng([args.seed, i])),
         {"image_id": i, "image_name": model.images[i].name})
        for i in ids
    )
    meta = {"source": "colmap", "model": str(Path(args.model).resolve()), "seed": args.seed,
            "max_points_2d": args.max_points_2d, "max_points_3d": args.max_points_3d,
            "outliers_per_inlier_2d": args.outliers_per_inlier_2d,
            "outlier_frac_3d": args.outlier_frac_3d,
            "dropped_images": [{"image_id": i, "image_name": nm, "reason": why} for i, nm, why in dropped]}
    return _write_all(args.out, scenes, len(ids), meta, args.quiet)


def _run_pickles(args: argparse.Namespace) -> int:
    from bpnp.data.datasets import PickleDataset

    ds = PickleDataset(args.root, args.dataset, args.split, w_gt_per=args.w_gt_per)
    _prepare_out(args.out, args.overwrite)
    scenes = (({k: v for k, v in ds[i].items() if k != "index"}, {"sample": i}) for i in range(len(ds)))
    meta = {"source": "pickles", "root": str(Path(args.root).resolve()), "dataset": args.dataset,
            "split": args.split}
    return _write_all(args.out, scenes, len(ds), meta, args.quiet)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except the uninformative None/False of optional caps and flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hide = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hide and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bpnp.data.export",
        description="Write a scene set: one .npz blind-PnP instance per file (keys p2d, p3d, R, t, "
                    "match, K, image_size; see docs/data.md) plus index.json.",
        epilog="examples:" + __doc__.split("Examples::", 1)[1].split("Files are named", 1)[0].rstrip(),
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{synthetic,colmap,pickles}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, required=True, help="output directory")
        p.add_argument("--overwrite", action="store_true",
                       help="replace .npz files already in --out")
        p.add_argument("--quiet", action="store_true", help="print nothing on success")

    s = sub.add_parser("synthetic", help="instances of the synthetic generator",
                       formatter_class=_Formatter,
                       description="Instances 0..N-1 of the synthetic stream SEED "
                                   "(bpnp.data.synthetic.make_instance).")
    common(s)
    s.add_argument("--num", type=int, required=True, help="number of instances")
    s.add_argument("--seed", type=int, default=0, help="stream seed (>= 0)")
    s.add_argument("--preset", choices=["legacy", "world"], default="legacy",
                   help="base config: legacy = SyntheticConfig defaults (the original generator), "
                        "world = bpnp.data.synthetic.WORLD (the embedded meshes of data/meshes "
                        "unless --set mesh_root=DIR)")
    s.add_argument("--min-points", type=int, default=None,
                   help="fewest 2D points per instance (legacy default: 200)")
    s.add_argument("--max-points", type=int, default=None,
                   help="most 2D points per instance (legacy default: 1000)")
    s.add_argument("--outlier-frac-2d", type=float, default=None,
                   help="fraction of 2D points that are outliers, in [0, 1) (legacy default: 0)")
    s.add_argument("--outlier-frac-3d", type=float, default=None,
                   help="fraction of 3D points that are outliers, in [0, 1) (legacy default: 0)")
    s.add_argument("--noise-px", type=float, default=None, help="2D noise std in pixels (legacy default: 1)")
    s.add_argument("--focal-px", type=float, default=None, help="focal length in pixels (legacy default: 800)")
    s.add_argument("--fov-deg", type=float, default=None, help="horizontal field of view (legacy default: 60)")
    s.add_argument("--shapes", nargs="+", default=None,
                   choices=["sphere", "box", "cylinder", "torus", "union", "scene", "mesh"],
                   help="shape families to use, equally weighted (default: the config's mix)")
    s.add_argument("--hidden-outliers", action="store_true",
                   help="take 3D outliers from surface points the camera cannot see")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any SyntheticConfig field (YAML value), applied last; repeatable, e.g. "
                        "--set mesh_split=test_unseen_category --set 'fov_deg=[40, 90]'")
    s.set_defaults(func=_run_synthetic)

    c = sub.add_parser("colmap", help="one instance per registered image of a COLMAP model",
                       formatter_class=_Formatter,
                       description="One instance per image of a COLMAP sparse model "
                                   "(cameras/images/points3D as .txt or .bin).")
    common(c)
    c.add_argument("--model", type=Path, required=True, help="COLMAP sparse model folder")
    c.add_argument("--max-points-2d", type=int, default=None, help="cap on 2D points (omit for all keypoints)")
    c.add_argument("--max-points-3d", type=int, default=None, help="cap on 3D points (omit for no cap)")
    c.add_argument("--outlier-frac-3d", type=float, default=0.5,
                   help="fraction of the 3D set drawn from unobserved model points")
    c.add_argument("--seed", type=int, default=0, help="seed for subsampling and 3D outliers")
    c.add_argument("--outliers-per-inlier-2d", type=float, default=None,
                   help="keep at most this many unmatched keypoints per matched one (default: all; "
                        "the 'easy' real protocol of docs/results.md: 0.25)")
    c.set_defaults(func=_run_colmap)

    k = sub.add_parser("pickles", help="samples of the original BPnPNet pre-processed pickles",
                       formatter_class=_Formatter,
                       description="Convert <root>/<dataset>_<split>/preprocessed/*.pkl.")
    common(k)
    k.add_argument("--root", type=Path, required=True, help="folder holding <dataset>_<split>/")
    k.add_argument("--dataset", required=True, help="e.g. modelnet40, megadepth, data61_2d3d")
    k.add_argument("--split", default="test", choices=["train", "test"])
    k.add_argument("--w-gt-per", default=None, choices=["3d", "2d"],
                   help="W_gt indexing (default: 2d for data61*, else 3d)")
    k.set_defaults(func=_run_pickles)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        if args.num < 1:
            parser.error("--num must be >= 1")
        if args.min_points is not None and args.max_points is not None and args.min_points > args.max_points:
            parser.error("--min-points must be <= --max-points")
    try:
        args.func(args)
    except (ValueError, OSError) as exc:
        # Bad inputs (corrupt model, bad config) get one clear line, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.out} (the temporary folder was removed)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
