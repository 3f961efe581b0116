"""Solve scene files with a checkpoint and print the poses as JSON.

    python -m bpnp.solve --ckpt checkpoints/bpnp_synthetic.pt scene.npz
    python -m bpnp.solve --ckpt CKPT a.npz b.npz --set ransac.num_hypotheses=4096 --device cuda

Each ``.npz`` holds ``p2d`` (m, 2) camera-normalised, undistorted keypoints and ``p3d`` (n, 3)
world points (``K`` optional and unused: ``p2d`` is already normalised). A file with the full
scene-file contract (docs/data.md: also ``R``, ``t``, ``match``) is validated as ``evaluate.py``
does, and its output also gives ``rot_err_deg`` against the stored ``R``.

Output (stdout): one JSON object per file, a list for several files, with ``file``, ``R`` (3x3,
world-to-camera, ``x_cam = R X + t``), ``t``, ``status`` (the PnP refinement's, ``OK`` =
converged), ``ransac_status``, ``m``, ``n``, ``num_matches`` (keypoints the soft assignment
matches), ``num_pose_matches`` (keypoints with a partner that agrees with the pose), ``time_s``.
See :class:`bpnp.runtime.solver.BlindPnPSolver` for the rules.

``--set KEY=VALUE`` (repeatable) replaces an inference setting of the checkpoint's network, dotted
keys as in ``evaluate.py net_overrides`` (``refine.robust_scale=1e-4``); the value is read as an
int, a float or else YAML. Bad input (a missing or malformed file or key, too few points, a bad
checkpoint or setting, an unavailable device) is found before any solving and printed as one line
``error: <message>`` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from bpnp.runtime.cli import EXIT_USER_ERROR, ConfigError, run_with_error_policy

__all__ = ["main", "read_instance"]


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error policy: one ``error:`` line and exit 2 (argparse itself
    prints the usage as well)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see python -m bpnp.solve --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m bpnp.solve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenes", nargs="+", metavar="SCENE.npz", help="scene files to solve (keys p2d, p3d; K optional)")
    ap.add_argument("--ckpt", required=True, help="checkpoint: a weights-only file (checkpoints/bpnp_synthetic.pt) "
                                                  "or a train.py Lightning .ckpt")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an inference setting over the checkpoint's, e.g. ransac.num_hypotheses=4096 (repeatable)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda or cuda:i")
    ap.add_argument("--seed", type=int, default=0, help="RANSAC's seed (default 0); same seed, same result")
    return ap


def read_instance(path: str | Path) -> dict[str, Any]:
    """One scene file's ``p2d``, ``p3d`` (float64, checked as the solver checks its arguments,
    keys named as in the file) and ``R`` when the file holds the full scene-file contract.

    Raises:
        SceneFileError: the file is missing, unreadable or malformed (the message starts with it).
    """
    from bpnp.data.scenes import REQUIRED_KEYS, SceneFileError, read_scene_file, validate_scene
    from bpnp.runtime.solver import check_instance

    name = str(path)
    raw = read_scene_file(path)
    full = all(key in raw for key in REQUIRED_KEYS)
    if full:
        raw = validate_scene(raw, name)  # the full contract, as evaluate.py reads it
    for key in ("p2d", "p3d"):
        if key not in raw:
            raise SceneFileError(f"{name}: missing key '{key}'")
    p2d, p3d, _ = check_instance(raw["p2d"], raw["p3d"], None, name, keys=("p2d", "p3d", "K"), what="key")
    return {"p2d": p2d, "p3d": p3d, "R": raw["R"] if full else None}


def _record(path: str, scene: dict[str, Any], sol: Any) -> dict[str, Any]:
    import numpy as np

    out = {
        "file": path,
        "R": np.asarray(sol.R, dtype=float).round(10).tolist(),
        "t": np.asarray(sol.t, dtype=float).round(10).tolist(),
        "status": getattr(sol.status, "name", str(sol.status)),
        "ransac_status": getattr(sol.ransac_status, "name", str(sol.ransac_status)),
        "m": int(len(scene["p2d"])),
        "n": int(len(scene["p3d"])),
        "num_matches": int((np.asarray(sol.matches) >= 0).sum()),
        "num_pose_matches": int((np.asarray(sol.pose_matches) >= 0).sum()),
        "time_s": round(float(sol.time_s), 6),
    }
    if scene.get("R") is not None:
        cos = (np.trace(np.asarray(sol.R).T @ scene["R"]) - 1.0) / 2.0
        out["rot_err_deg"] = round(float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))), 6)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bpnp.solve ...``; returns the exit code (0, or 2 for bad input) and prints the
    JSON on stdout."""
    try:
        args = _parser().parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help (0) or a bad command line (2, one error: line printed)
        return int(exc.code or 0)

    def work() -> list[dict[str, Any]]:
        from bpnp.runtime.checkpoint import load_network, parse_set_overrides
        from bpnp.runtime.cli import resolve_device
        from bpnp.runtime.solver import BlindPnPSolver

        try:
            overrides = parse_set_overrides(args.overrides)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        scenes = [read_instance(p) for p in args.scenes]  # every file checked before any solving
        # BlindPnPSolver.from_checkpoint(ckpt, device, **overrides), without its keywords' names
        # (seed, device) ever meeting a --set key
        solver = BlindPnPSolver(load_network(args.ckpt, resolve_device(args.device), overrides or None), seed=args.seed)
        return [_record(p, s, solver(s["p2d"], s["p3d"])) for p, s in zip(args.scenes, scenes)]

    code, records = run_with_error_policy(work)
    if code:
        return code
    print(_dumps(records[0]) if len(records) == 1 else "[\n" + ",\n".join(_dumps(r, "  ") for r in records) + "\n]")
    return 0


def _dumps(record: dict[str, Any], pad: str = "") -> str:
    """One record as JSON, a key per line (``R`` on one line)."""
    lines = [f"{pad}  {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()]
    return pad + "{\n" + ",\n".join(lines) + "\n" + pad + "}"


if __name__ == "__main__":
    sys.exit(main())
