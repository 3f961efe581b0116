"""The shift suite: held-out scene sets whose generator settings lie outside what training draws.

A matcher trained on one generator learns that generator's settings (camera, noise, point counts,
how outliers are placed, camera distance), not only geometry; test splits drawn with the same
settings cannot show it. Each set here changes **one** setting of a common base to a value
training never draws (``configs/experiment/bpnp_synthetic.yaml`` lists training's ranges beside
the values below), and one set combines several. The suite was written down before any
inference setting or checkpoint was chosen, and nothing is chosen on it (docs/results.md).

Base: the realistic generator (:data:`bpnp.data.synthetic.WORLD`) on the held-out meshes
(``test_unseen_meshes``: meshes neither training nor validation draws), 200-1000 points per
side, 1 px noise, stream seed 24680 (training uses 12345, validation 12346, the test splits 12347).

=====================  ==========================================  ===========================
set                    setting (vs the base)                       training draws
=====================  ==========================================  ===========================
``fov_20``             field of view 20 deg                        30-100 deg
``fov_120``            field of view 120 deg                       30-100 deg
``fixed_camera``       one camera for all: 1920 x 1080, 65 deg     1024 wide, 4:3, 30-100 deg
``noise_0``            no keypoint noise                           0.25-2.5 px
``noise_3``            3 px noise                                  0.25-2.5 px
``points_50``          50 points                                   100-600
``points_2000``        2,000 points                                100-600
``outliers_uniform``   2D outliers uniform over the image          0-60 % of them in blobs
``outliers_bbox``      2D outliers uniform in the inliers' box     over the whole image
``outliers_clustered`` every 2D outlier in blobs                   0-60 % in blobs
``outliers_shape``     2D outliers: projections of another object  image-wide / blobs
``outliers3d_shape``   3D outliers: points of another object       the structure's own surface
``camera_near``        objects fill 1.5 of the view, scenes 0.55   0.4-1.1 / 0.7-1.8
``camera_far``         objects fill 0.25 of the view, scenes 2.5   0.4-1.1 / 0.7-1.8
``combined``           fixed_camera + noise_3 + outliers_shape +   (as above)
                       outliers3d_shape + camera_near
=====================  ==========================================  ===========================

``outliers_uniform`` is at the edge of training's range, not outside it (training's blob
fraction starts at 0); it is kept because users' outliers often look like it.

"Training draws" is the main job (``configs/experiment/bpnp_synthetic.yaml``). Its continuation
(``configs/experiment/bpnp_synthetic_continue.yaml``, session 10) draws wider, still outside
every value above: noise 0.1-2.8 px, 25-110 deg, objects filling 0.3-1.2 of the view and scenes
0.65-2.2, 0-80 % of the 2D outliers in blobs; but it also draws other-object outliers in a
quarter of its instances per side, so for weights trained with it ``outliers_shape`` and
``outliers3d_shape`` hold out only the objects, not the placement.

``python -m bpnp.data.shift_suite --out scenes/shift`` writes every set at 25 % and 50 % outliers
per side (``<out>/<set>_out<frac>``, 40 instances each; ``--only`` a subset, ``--fracs`` other
fractions) with :mod:`bpnp.data.export`, so each folder has its ``index.json``.
``--validation --out scenes/val_shift`` writes the validation shifts instead
(:data:`VALIDATION_SHIFTS`: for choosing, never for reporting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["BASE", "SHIFT_SUITE", "SEED", "VALIDATION_BASE", "VALIDATION_SHIFTS", "VALIDATION_SEED", "export_args",
           "main"]

SEED = 24680
#: The base of every set: held-out meshes, 200-1000 points, 1 px noise (WORLD otherwise).
BASE: dict[str, Any] = {"shape_weights": {"mesh": 1.0}, "mesh_split": "test_unseen_meshes",
                        "num_points_2d": [200, 1000], "noise_px": 1.0}

_NEAR = {"view_fill": 1.5, "scene_distance": 0.55}
_FAR = {"view_fill": 0.25, "scene_distance": 2.5}
_FIXED = {"image_width": 1920, "aspect": 1920 / 1080, "fov_deg": 65.0}
_SHAPE_2D = {"outliers_2d": "other_shape"}
_SHAPE_3D = {"outliers_3d": "other_shape"}

#: set name -> SyntheticConfig overrides of BASE.
SHIFT_SUITE: dict[str, dict[str, Any]] = {
    "fov_20": {"fov_deg": 20.0},
    "fov_120": {"fov_deg": 120.0},
    "fixed_camera": _FIXED,
    "noise_0": {"noise_px": 0.0},
    "noise_3": {"noise_px": 3.0},
    "points_50": {"num_points_2d": 50},
    "points_2000": {"num_points_2d": 2000},
    "outliers_uniform": {"outlier_2d_cluster_frac": 0.0},
    "outliers_bbox": {"outliers_2d": "bbox"},
    "outliers_clustered": {"outlier_2d_cluster_frac": 1.0},
    "outliers_shape": _SHAPE_2D,
    "outliers3d_shape": _SHAPE_3D,
    "camera_near": _NEAR,
    "camera_far": _FAR,
    "combined": {**_FIXED, "noise_px": 3.0, **_SHAPE_2D, **_SHAPE_3D, **_NEAR},
}


#: Validation shifts (session 12): for choosing inference settings that must hold off training's
#: ranges, on the *validation* meshes with their own seed and values that are neither training's
#: nor the suite's (a 22 degree lens; objects filling 0.28 of the view, scenes 2.35 away). They
#: share two axes with the suite (``fov_20``, ``camera_far``): settings chosen on them make those
#: rows no longer blind to the axis, only to its value, meshes and instances (docs/results.md).
VALIDATION_SEED = 13579
VALIDATION_BASE: dict[str, Any] = {**BASE, "mesh_split": "val"}
VALIDATION_SHIFTS: dict[str, dict[str, Any]] = {
    "fov_22": {"fov_deg": 22.0},
    "camera_far_val": {"view_fill": 0.28, "scene_distance": 2.35},
}


def export_args(name: str, frac: float, out: Path, num: int = 40) -> list[str]:
    """The ``python -m bpnp.data.export`` arguments that write set ``name`` (of the suite, or of
    the validation shifts) at outlier fraction ``frac`` per side into ``out``."""
    if name in SHIFT_SUITE:
        base, sets, seed = BASE, SHIFT_SUITE, SEED
    elif name in VALIDATION_SHIFTS:
        base, sets, seed = VALIDATION_BASE, VALIDATION_SHIFTS, VALIDATION_SEED
    else:
        raise KeyError(f"unknown shift-suite set {name!r} (known: {', '.join([*SHIFT_SUITE, *VALIDATION_SHIFTS])})")
    args = ["synthetic", "--preset", "world", "--num", str(num), "--seed", str(seed), "--out", str(out),
            "--outlier-frac-2d", str(frac), "--outlier-frac-3d", str(frac), "--quiet"]
    for key, value in {**base, **sets[name]}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from bpnp.data.export import main as export

    parser = argparse.ArgumentParser(prog="python -m bpnp.data.shift_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the sets")
    parser.add_argument("--only", nargs="+", default=None, choices=[*SHIFT_SUITE, *VALIDATION_SHIFTS],
                        help="these sets only")
    parser.add_argument("--validation", action="store_true",
                        help="the validation shifts (validation meshes, their own seed) instead of the suite")
    parser.add_argument("--fracs", nargs="+", type=float, default=[0.25, 0.5], help="outlier fractions per side")
    parser.add_argument("--num", type=int, default=40, help="instances per set")
    parser.add_argument("--overwrite", action="store_true", help="replace existing sets")
    args = parser.parse_args(argv)
    for name in args.only or list(VALIDATION_SHIFTS if args.validation else SHIFT_SUITE):
        for frac in args.fracs:
            out = args.out / f"{name}_out{frac:g}"
            extra = ["--overwrite"] if args.overwrite else []
            rc = export(export_args(name, frac, out, args.num) + extra)
            if rc != 0:
                return rc
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
