"""Synthetic blind-PnP instances: a deterministic function of ``(seed, index)``.

Each instance samples a shape, places a camera looking at it, keeps the 3D points the camera can
see, projects some of them (the inliers, with Gaussian pixel noise) and adds outliers:

- **Shapes** (``SyntheticConfig.shape_weights``): surfaces of primitives (``sphere`` = ellipsoid,
  ``box``, ``cylinder``, ``torus``) with random sizes, ``union`` of 2-4 of them randomly posed
  (ModelNet-like objects), ``scene`` layouts (ground plane, 1-3 walls and 2-8 boxes, so the
  points spread in depth) and ``mesh``: real triangle meshes read at run time from
  ``mesh_root`` (:mod:`bpnp.data.meshes`: scans, CAD parts, furniture, vehicles, buildings,
  rooms, terrain), drawn from the split ``mesh_split`` with per-category weights
  ``mesh_category_weights``, normalised to a unit bounding sphere and sampled by area with
  face normals. Points are sampled on the surfaces in proportion to area.
- **Camera**: objects (primitives, unions and the object-like mesh categories ``CAD``,
  ``furniture``, ``organic_scan``, ``other``, ``vehicle``) are seen from a uniformly random
  direction with a random roll, at a distance where their bounding sphere fills ``view_fill`` of
  the half field of view; scenes are seen from an elevation of ``scene_elevation_deg`` above the
  ground, from a distance ``scene_distance`` times the scene's half-extent, with a small roll.
  Scene-like meshes: ``room`` from *inside*, the camera near the middle of the floor plan
  (25-75 % of each horizontal extent) at 30-55 % of the room's height, looking horizontally
  (pitch -20 to +10 degrees, roll up to ``scene_roll_deg``); ``building`` from the *street / air*:
  upright camera at elevation ``scene_elevation_deg`` looking at a point 10-50 % up the building,
  at the object distance (``view_fill``); ``terrain`` *aerial/oblique*: looking at a point of the
  terrain near its middle from elevation ``scene_elevation_deg`` and a distance of
  ``scene_distance / 2`` bounding radii, kept above the ground. ``x_cam = R X + t``.
- **Intrinsics**: by default the focal length is ``focal_px`` and the image ``2 f tan(fov / 2)``
  wide. With ``image_width`` set, the image is that wide and the focal length follows from a
  field of view drawn from ``fov_deg`` (a range varies it per instance); ``K`` is per instance.
- **Visibility**: a 3D point can be observed only if it is in front of the camera (depth above
  ``min_depth_frac`` times the camera distance), projects inside the image and, with
  ``backface_culling``, its surface faces the camera (walls, the ground's top and meshes that are
  not closed are two-sided). With ``occlusion_px > 0`` a point hidden behind another surface is
  not observed either: a z-buffer over a dense sample of ``occlusion_samples`` surface points
  (:mod:`bpnp.data.occlusion`, cells of ``occlusion_px`` pixels, relative depth tolerance
  ``occlusion_tol``) decides; with 0 occlusion is not modelled (the old behaviour).
- **Counts**: ``m`` 2D points in total, of which a fraction ``outlier_frac_2d`` are outliers;
  ``k = m - round(f2 m)`` inlier pairs; the 3D set holds the ``k`` inlier points plus
  ``round(f3 / (1 - f3) k)`` outliers, so that a fraction ``outlier_frac_3d`` of it is outliers.
- **2D outliers** (``outliers_2d``): ``bbox`` (old) uniform in the bounding box of the inliers'
  normalised coordinates; ``image`` uniform over the whole image, except a fraction
  ``outlier_2d_cluster_frac`` drawn in 1-4 Gaussian blobs (sigma 2-6 % of the image width) around
  random centres (detections on background texture), all inside the image.
- **3D outliers** (``outliers_3d``): ``uniform`` (old): with ``visible_only`` uniform in the
  inliers' 3D bounding box, otherwise first surface points the camera cannot see, topped up with
  uniform ones. ``surface``: other points of the same surfaces, never uniform ones. The dense
  surface sample is the "map"; a keypoint fires on a visible map point with probability
  ``d = detection_rate``, and the fired ones are the inliers. The 3D outliers are a uniform draw
  from the map points without a keypoint: visible-undetected ones (a share
  ``(1 - d) / (1 - d + H / V)``, with ``H / V`` the ratio of hidden to visible map points) and
  hidden ones (occluded, back-facing, out of view, behind the camera). ``other_shape``: points on
  the surface of a second, unrelated object (a random union of primitives with the main shape's
  bounding radius) standing beside the structure, its centre 2-3 radii from the structure's; none is
  observed.
- ``outliers_2d="other_shape"``: the 2D outliers are projections of points on a second object
  (a random union of primitives, 0.3-1 times the main radius) placed in the view between the
  camera and the structure (keypoints of an unmodelled foreground object), topped up uniformly
  over the image where too few of its points project inside it. Both ``other_shape`` modes draw
  from a stream of their own (``(seed, index, 7)``), so an instance keeps the main shape and camera
  of the same config with the other modes. They exist for the shift suite
  (docs/results.md), never for training.
- **Noise**: ``noise_px`` pixels of Gaussian noise per coordinate at the instance's focal length
  ``f``, i.e. ``noise_px / f`` in normalised units.

With every new field at its default (``mesh`` weight 0, ``image_width`` None, ``occlusion_px``
0, ``detection_rate`` 1, ``outliers_3d="uniform"``, ``outliers_2d="bbox"``) an instance is
exactly what the generator produced before these options existed (tested against recorded
instances). :data:`WORLD` is the realistic preset (``SyntheticConfig.world(mesh_root=...)``)
that ``configs/data/synthetic.yaml`` mirrors. Measured over instances 0-199 of seed 0 with
``python -m bpnp.data.synthetic --preset world --num 200`` (measured before the embedded set,
with ``--mesh-root ../shared/data/meshes``, mesh split ``train``)::

    2D points m             mean 816.130  min 102.000  median 802.500  max 1472.000
    3D points n             mean 844.620  min  63.000  median 748.500  max 2506.000
    2D outlier fraction     mean   0.312  min   0.015  median   0.315  max   0.600
    3D outlier fraction     mean   0.303  min   0.000  median   0.293  max   0.599
    3D outliers in view     mean   0.765  min   0.000  median   1.000  max   1.000
    focal length (px)       mean 837.781  min 513.960  median 774.532  max 1368.554
    generation time         27.4 ms per instance (warm mesh cache; 2 shared cores, load ~2)

(``n = k / (1 - f3)`` with ``k = (1 - f2) m``, so the 3D side ranges wider than 100-1500.
"3D outliers in view": share of the 3D outliers that project into the image in front of the
camera, i.e. visible-undetected or occluded; the rest are back-facing-out-of-view or behind.)
Occlusion quality, checked by ray casting against the mesh triangles: for two boxes
(``tests/data/test_meshes.py``) under 1 % of the matched points are occluded; on shared meshes
of the furniture, CAD, room and building categories (a one-off check, not kept in the repo)
about 2 % of the points the z-buffer calls visible were occluded (up to ~10 % in the cluttered
``room`` meshes, whose thin parts get few samples), and about 18 % of truly visible points were
hidden, mostly within a splat's reach of a nearer depth edge (the z-buffer is conservative).

Both point orders are shuffled, so indices leak nothing about the matches. Randomness comes only
from ``numpy.random.default_rng([seed, index])``; global random state is never touched, so every
DDP rank, worker and rerun builds the same instance (meshes are read once per process and cached;
the cache holds arrays only and does not affect the result).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from bpnp.data.embedded import MESH_ROOT
from bpnp.data.meshes import CATEGORIES, MESH_SPLITS, load_mesh, mesh_choices, view_mode
from bpnp.data.occlusion import zbuffer_visible
from bpnp.data.ranges import config_kwargs, draw, draw_int, hi, lo, parse_set_items
from bpnp.data.shuffle import shuffle_sets

__all__ = ["SyntheticConfig", "make_instance", "FAMILIES", "WORLD"]

FAMILIES = ("sphere", "box", "cylinder", "torus", "union", "scene", "mesh")
OUTLIERS_3D = ("uniform", "surface", "other_shape")
OUTLIERS_2D = ("bbox", "image", "other_shape")
Range = tuple[float, float]

#: The realistic preset (``configs/data/synthetic.yaml`` sets the same values; the dataclass
#: defaults keep the old generator). ``mesh_root`` must be added: ``SyntheticConfig.world(...)``.
WORLD: dict[str, Any] = {
    "num_points_2d": (100, 1500),
    "outlier_frac_2d": (0.0, 0.6),
    "outlier_frac_3d": (0.0, 0.6),
    "noise_px": (0.0, 2.0),
    "image_width": 1024,
    "fov_deg": (40.0, 90.0),
    "shape_weights": {"sphere": 0.0, "box": 0.0, "cylinder": 0.0, "torus": 0.0, "union": 1.0,
                      "scene": 1.0, "mesh": 3.0},
    "visible_only": False,
    "occlusion_px": 4.0,
    "detection_rate": (0.3, 0.9),
    "outliers_3d": "surface",
    "outliers_2d": "image",
    "outlier_2d_cluster_frac": (0.0, 0.5),
}


def _default_weights() -> dict[str, float]:
    return {"sphere": 1.0, "box": 1.0, "cylinder": 1.0, "torus": 1.0, "union": 4.0, "scene": 2.0}


def _default_category_weights() -> dict[str, float]:
    return {c: 1.0 for c in CATEGORIES}


@dataclass
class SyntheticConfig:
    """Every knob of the synthetic generator. A ``(lo, hi)`` pair is drawn uniformly per instance
    (integers inclusive); a scalar is fixed. Defaults reproduce the original generator; see
    :data:`WORLD` for the realistic preset.

    Attributes:
        num_points_2d: total 2D points ``m`` (inliers + 2D outliers).
        outlier_frac_2d: fraction of the 2D points that are outliers, in [0, 1).
        outlier_frac_3d: fraction of the 3D points that are outliers (observed by no 2D point).
        noise_px: std of the Gaussian 2D noise, in pixels (at the instance's focal length).
        focal_px: focal length in pixels when ``image_width`` is None (sets the noise scale and
            ``K``); ignored otherwise.
        fov_deg: horizontal field of view in degrees. Without ``image_width`` (a number only):
            image width = 2 f tan(fov / 2). With ``image_width``: drawn per instance (a range
            varies it) and the focal length is ``image_width / (2 tan(fov / 2))``.
        aspect: image width / height.
        image_width: image width in pixels, or None (the width follows from ``focal_px`` and
            ``fov_deg``, the old behaviour).
        shape_weights: relative frequency of each family in :data:`FAMILIES` (0 disables one).
        object_scale: bounding-sphere radius of objects (also object-like meshes), world units.
        view_fill: fraction of the (shorter) half field of view an object's bounding sphere
            subtends; below 1 keeps the whole object in view. Also buildings' distance.
        scene_size: half-extent of scene layouts' ground plane, world units; scene-like meshes
            (room, building, terrain) get a bounding radius of ``sqrt(2) scene_size``.
        scene_distance: camera distance from the scene's target point / half-extent (terrain
            meshes: half of it, in bounding radii).
        scene_elevation_deg: camera elevation above the ground for scenes, buildings and
            terrain, degrees.
        scene_roll_deg: maximum absolute camera roll for scenes and scene-like meshes, degrees
            (objects: any roll).
        visible_only: with ``outliers_3d="uniform"``: 3D outliers uniform in the bounding box
            (True) or first taken from surface points the camera cannot see (False).
        backface_culling: surfaces facing away from the camera are not observed.
        min_depth_frac: near plane, as a fraction of the camera-to-target distance.
        mesh_root: folder of the ``mesh`` family's meshes (category subfolders); required when
            ``shape_weights["mesh"] > 0``. Read at run time, never copied.
        mesh_split: which meshes the ``mesh`` family draws from: ``train``, ``val``,
            ``test_unseen_meshes``, ``test_unseen_category`` or ``all``
            (:func:`bpnp.data.meshes.split_meshes`).
        mesh_category_weights: relative frequency of each mesh category (spread evenly over the
            category's meshes in the split; categories absent from the split drop out).
        heldout_category: the category held out of train and val (the ``test_unseen_category``
            split), or None.
        heldout_mesh_frac: fraction of every other category's meshes held out for val + test.
        occlusion_px: z-buffer cell size in pixels; 0 disables occlusion (the old behaviour).
        occlusion_tol: relative depth tolerance of the z-buffer test.
        occlusion_samples: surface points sampled for the z-buffer (the candidate pool).
        detection_rate: probability that a keypoint fires on a visible surface point, in
            (0, 1]; with ``outliers_3d="surface"`` it sets the share of 3D outliers that are
            visible but undetected (1 = every 3D outlier is hidden).
        outliers_3d: ``uniform`` (old behaviour, see ``visible_only``), ``surface`` or
            ``other_shape`` (a second object beside the structure; module docstring).
        outliers_2d: ``bbox`` (old: uniform in the inliers' bounding box), ``image`` or
            ``other_shape`` (projections of a foreground object; module docstring).
        outlier_2d_cluster_frac: with ``outliers_2d="image"``: fraction of the 2D outliers drawn
            in blobs around 1-4 random centres instead of uniformly.
        other_shape_prob_2d, other_shape_prob_3d: per-instance probability that the 2D (3D)
            outliers are ``other_shape`` instead of ``outliers_2d`` (``outliers_3d``): a mix of
            placements for training (domain randomisation). Drawn from a stream of its own
            (``[seed, index, 8]``), so 0 (the default) reproduces the single-mode generator.
    """

    num_points_2d: int | Range = (200, 1000)
    outlier_frac_2d: float | Range = 0.0
    outlier_frac_3d: float | Range = 0.0
    noise_px: float | Range = 1.0
    focal_px: float = 800.0
    fov_deg: float | Range = 60.0
    aspect: float = 4.0 / 3.0
    shape_weights: dict[str, float] = field(default_factory=_default_weights)
    object_scale: float | Range = (0.5, 2.0)
    view_fill: float | Range = (0.5, 0.9)
    scene_size: float | Range = (5.0, 20.0)
    scene_distance: float | Range = (0.8, 1.6)
    scene_elevation_deg: float | Range = (10.0, 40.0)
    scene_roll_deg: float = 10.0
    visible_only: bool = True
    backface_culling: bool = True
    min_depth_frac: float = 0.05
    image_width: int | None = None
    mesh_root: str | None = None
    mesh_split: str = "train"
    mesh_category_weights: dict[str, float] = field(default_factory=_default_category_weights)
    heldout_category: str | None = "vehicle"
    heldout_mesh_frac: float = 0.2
    occlusion_px: float = 0.0
    occlusion_tol: float = 0.01
    occlusion_samples: int = 20000
    detection_rate: float | Range = 1.0
    outliers_3d: str = "uniform"
    outliers_2d: str = "bbox"
    outlier_2d_cluster_frac: float | Range = 0.0
    other_shape_prob_2d: float = 0.0
    other_shape_prob_3d: float = 0.0

    def __post_init__(self) -> None:
        # Accept lists (YAML/Hydra) for pairs; validate now so a bad config fails at build time.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (list, tuple)):
                if len(v) != 2:
                    raise ValueError(f"SyntheticConfig.{f.name}: expected a number or a (lo, hi) "
                                     f"pair, got {v!r}")
                v = (v[0], v[1])
                if not v[0] <= v[1]:
                    raise ValueError(f"SyntheticConfig.{f.name}: lo > hi in {v!r}")
                setattr(self, f.name, v)
        self.shape_weights = {str(k): float(w) for k, w in dict(self.shape_weights).items()}
        unknown = set(self.shape_weights) - set(FAMILIES)
        if unknown:
            raise ValueError(f"SyntheticConfig.shape_weights: unknown families {sorted(unknown)} "
                             f"(known: {list(FAMILIES)})")
        if any(w < 0 for w in self.shape_weights.values()) or sum(self.shape_weights.values()) <= 0:
            raise ValueError("SyntheticConfig.shape_weights: weights must be >= 0, not all zero")
        lo_m = _lo(self.num_points_2d)
        for name in ("outlier_frac_2d", "outlier_frac_3d"):
            v = getattr(self, name)
            if not (0.0 <= _lo(v) and _hi(v) < 1.0):
                raise ValueError(f"SyntheticConfig.{name} must lie in [0, 1), got {v!r}")
        if lo_m - round(_hi(self.outlier_frac_2d) * lo_m) < 4:
            raise ValueError(
                f"SyntheticConfig: num_points_2d={self.num_points_2d!r} with outlier_frac_2d="
                f"{self.outlier_frac_2d!r} leaves fewer than 4 inliers"
            )
        positive = ("focal_px", "fov_deg", "aspect", "object_scale", "view_fill", "scene_size",
                    "scene_distance", "min_depth_frac")
        for name in positive:
            if _lo(getattr(self, name)) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if _lo(self.noise_px) < 0:
            raise ValueError(f"SyntheticConfig.noise_px must be >= 0, got {self.noise_px!r}")
        if not _hi(self.fov_deg) < 180:
            raise ValueError(f"SyntheticConfig.fov_deg must be < 180, got {self.fov_deg}")
        if _hi(self.view_fill) >= 2.0:
            raise ValueError("SyntheticConfig.view_fill must be < 2 (object would be too close)")
        self._validate_new_fields()

    def _validate_new_fields(self) -> None:
        if self.image_width is None:
            if isinstance(self.fov_deg, tuple):
                raise ValueError(f"SyntheticConfig.fov_deg: a range {self.fov_deg!r} needs "
                                 "image_width (the focal length then follows from the width)")
        else:
            if isinstance(self.image_width, bool) or not float(self.image_width).is_integer() \
                    or int(self.image_width) < 16:
                raise ValueError(f"SyntheticConfig.image_width must be an integer >= 16 or None, "
                                 f"got {self.image_width!r}")
            self.image_width = int(self.image_width)
        if self.mesh_split not in MESH_SPLITS:
            raise ValueError(f"SyntheticConfig.mesh_split: unknown split {self.mesh_split!r} "
                             f"(known: {', '.join(MESH_SPLITS)})")
        self.mesh_category_weights = {str(k): float(w) for k, w in dict(self.mesh_category_weights).items()}
        unknown = set(self.mesh_category_weights) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"SyntheticConfig.mesh_category_weights: unknown categories "
                             f"{sorted(unknown)} (known: {list(CATEGORIES)})")
        if any(w < 0 for w in self.mesh_category_weights.values()):
            raise ValueError("SyntheticConfig.mesh_category_weights: weights must be >= 0")
        if self.heldout_category is not None and self.heldout_category not in CATEGORIES:
            raise ValueError(f"SyntheticConfig.heldout_category: unknown category "
                             f"{self.heldout_category!r} (known: {list(CATEGORIES)} or None)")
        if not 0.0 <= float(self.heldout_mesh_frac) < 1.0:
            raise ValueError(f"SyntheticConfig.heldout_mesh_frac must lie in [0, 1), got "
                             f"{self.heldout_mesh_frac!r}")
        if self.mesh_root is not None:
            self.mesh_root = str(self.mesh_root)
        if not float(self.occlusion_px) >= 0:
            raise ValueError(f"SyntheticConfig.occlusion_px must be >= 0, got {self.occlusion_px!r}")
        if not 0.0 <= float(self.occlusion_tol) < 1.0:
            raise ValueError(f"SyntheticConfig.occlusion_tol must lie in [0, 1), got {self.occlusion_tol!r}")
        if isinstance(self.occlusion_samples, bool) or int(self.occlusion_samples) != self.occlusion_samples \
                or int(self.occlusion_samples) < 1000:
            raise ValueError(f"SyntheticConfig.occlusion_samples must be an integer >= 1000, got "
                             f"{self.occlusion_samples!r}")
        self.occlusion_samples = int(self.occlusion_samples)
        if not (0.0 < _lo(self.detection_rate) and _hi(self.detection_rate) <= 1.0):
            raise ValueError(f"SyntheticConfig.detection_rate must lie in (0, 1], got {self.detection_rate!r}")
        if self.outliers_3d not in OUTLIERS_3D:
            raise ValueError(f"SyntheticConfig.outliers_3d must be one of {OUTLIERS_3D}, got {self.outliers_3d!r}")
        if self.outliers_2d not in OUTLIERS_2D:
            raise ValueError(f"SyntheticConfig.outliers_2d must be one of {OUTLIERS_2D}, got {self.outliers_2d!r}")
        for name in ("other_shape_prob_2d", "other_shape_prob_3d"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be a probability in [0, 1], got {v!r}")
            setattr(self, name, float(v))
        if not (0.0 <= _lo(self.outlier_2d_cluster_frac) and _hi(self.outlier_2d_cluster_frac) <= 1.0):
            raise ValueError(f"SyntheticConfig.outlier_2d_cluster_frac must lie in [0, 1], got "
                             f"{self.outlier_2d_cluster_frac!r}")
        if self.shape_weights.get("mesh", 0.0) > 0:
            if not self.mesh_root:
                raise ValueError("SyntheticConfig.mesh_root: required when shape_weights.mesh > 0 "
                                 "(the folder of category subfolders, e.g. data/meshes)")
            if not Path(self.mesh_root).is_dir():
                raise FileNotFoundError(f"SyntheticConfig.mesh_root={self.mesh_root}: not a directory")
            mesh_choices(self.mesh_root, self.mesh_split, self.heldout_category,
                         self.heldout_mesh_frac, self.mesh_category_weights)  # raises if empty

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "SyntheticConfig" | None) -> "SyntheticConfig":
        """Build from a mapping (e.g. a Hydra DictConfig); unknown keys raise ``ValueError``."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        return cls(**config_kwargs(cls, d, mappings=("shape_weights", "mesh_category_weights")))

    @classmethod
    def world(cls, mesh_root: str | Path | None, **overrides: Any) -> "SyntheticConfig":
        """The realistic preset :data:`WORLD` with ``mesh_root`` (None drops the ``mesh``
        family) and ``overrides``."""
        d = {**WORLD, "shape_weights": dict(WORLD["shape_weights"])}
        if mesh_root is None:
            d["shape_weights"]["mesh"] = 0.0
        else:
            d["mesh_root"] = str(mesh_root)
        d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict (pairs as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if self.image_width is not None:
            w = int(self.image_width)
        else:
            w = int(math.ceil(2.0 * self.focal_px * math.tan(math.radians(self.fov_deg) / 2.0)))
        return w, int(math.ceil(w / self.aspect))

    @property
    def K(self) -> np.ndarray:
        """(3, 3) intrinsics (principal point at the image centre) when they are fixed; with a
        ``fov_deg`` range they vary per instance (read ``K`` from the instance)."""
        if self.image_width is None:
            f = self.focal_px
        elif isinstance(self.fov_deg, tuple):
            raise ValueError("SyntheticConfig.K: fov_deg is a range, K varies per instance")
        else:
            f = self.image_width / (2.0 * math.tan(math.radians(self.fov_deg) / 2.0))
        w, h = self.image_size
        return np.array([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0, 0, 1.0]])


_lo, _hi, _draw, _draw_int = lo, hi, draw, draw_int


# ---------------------------------------------------------------------------------------------
# Surfaces: each sampler returns points (k, 3) and unit outward normals (k, 3) in local frame.
# ---------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _sample_ellipsoid(rng, n, abc):
    u = _unit(rng.normal(size=(n, 3)))
    abc = np.asarray(abc)
    return u * abc, _unit(u / abc)


def _sample_box(rng, n, abc):
    a, b, c = abc
    areas = np.array([b * c, b * c, a * c, a * c, a * b, a * b])
    face = rng.choice(6, size=n, p=areas / areas.sum())
    p = rng.uniform(-1.0, 1.0, size=(n, 3))
    axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
    p[np.arange(n), axis] = sign
    normals = np.zeros((n, 3))
    normals[np.arange(n), axis] = sign
    return p * np.asarray(abc), normals


def _sample_cylinder(rng, n, rh):
    r, h = rh
    areas = np.array([4 * np.pi * r * h, np.pi * r * r, np.pi * r * r])
    part = rng.choice(3, size=n, p=areas / areas.sum())
    theta = rng.uniform(0, 2 * np.pi, size=n)
    rad = np.where(part == 0, r, r * np.sqrt(rng.uniform(size=n)))
    z = np.where(part == 0, rng.uniform(-h, h, size=n), np.where(part == 1, h, -h))
    p = np.stack([rad * np.cos(theta), rad * np.sin(theta), z], axis=1)
    normals = np.where(
        (part == 0)[:, None],
        np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], axis=1),
        np.stack([np.zeros(n), np.zeros(n), np.where(part == 1, 1.0, -1.0)], axis=1),
    )
    return p, normals


def _sample_torus(rng, n, Rr):
    R, r = Rr
    out_u, out_v = [], []
    got = 0
    while got < n:
        # Area element is proportional to (R + r cos v): rejection keeps the density uniform.
        u = rng.uniform(0, 2 * np.pi, size=2 * (n - got) + 8)
        v = rng.uniform(0, 2 * np.pi, size=u.size)
        keep = rng.uniform(size=u.size) < (R + r * np.cos(v)) / (R + r)
        out_u.append(u[keep])
        out_v.append(v[keep])
        got += int(keep.sum())
    u, v = np.concatenate(out_u)[:n], np.concatenate(out_v)[:n]
    normals = np.stack([np.cos(v) * np.cos(u), np.cos(v) * np.sin(u), np.sin(v)], axis=1)
    centre = np.stack([R * np.cos(u), R * np.sin(u), np.zeros(n)], axis=1)
    return centre + r * normals, normals


def _sample_rect(rng, n, ab):
    a, b = ab
    p = np.stack([rng.uniform(-a, a, n), rng.uniform(-b, b, n), np.zeros(n)], axis=1)
    return p, np.tile([0.0, 0.0, 1.0], (n, 1))


def _ellipsoid_area(abc) -> float:
    a, b, c = abc
    p = 1.6075  # Knud Thomsen's approximation, within ~1 %
    return 4 * np.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)


_SAMPLERS = {
    "sphere": (_sample_ellipsoid, _ellipsoid_area),
    "box": (_sample_box, lambda s: 8 * (s[0] * s[1] + s[1] * s[2] + s[0] * s[2])),
    "cylinder": (_sample_cylinder, lambda s: 4 * np.pi * s[0] * s[1] + 2 * np.pi * s[0] ** 2),
    "torus": (_sample_torus, lambda s: 4 * np.pi**2 * s[0] * s[1]),
    "rect": (_sample_rect, lambda s: 4 * s[0] * s[1]),
}


@dataclass
class _Part:
    kind: str
    size: tuple
    rot: np.ndarray  # local -> world rotation
    offset: np.ndarray
    two_sided: bool = False

    @property
    def area(self) -> float:
        return float(_SAMPLERS[self.kind][1](self.size))


class _Shape:
    """A union of surface parts with a global similarity (scale about ``centre``)."""

    def __init__(self, parts: list[_Part]):
        self.parts = parts
        self.centre = np.zeros(3)
        self.scale = 1.0

    def sample(self, rng, n):
        """n points on the surfaces (area-proportional): points, normals (n, 3), two_sided (n,)."""
        areas = np.array([p.area for p in self.parts])
        counts = rng.multinomial(n, areas / areas.sum())
        pts, nrm, two = [], [], []
        for part, c in zip(self.parts, counts):
            if c == 0:
                continue
            p, q = _SAMPLERS[part.kind][0](rng, int(c), part.size)
            pts.append(p @ part.rot.T + part.offset)
            nrm.append(q @ part.rot.T)
            two.append(np.full(int(c), part.two_sided))
        pts = (np.concatenate(pts) - self.centre) * self.scale
        return pts, np.concatenate(nrm), np.concatenate(two)

    @property
    def area(self) -> float:
        """Total surface area in world units."""
        return float(sum(p.area for p in self.parts)) * self.scale**2

    def normalise(self, rng, radius: float) -> None:
        """Centre the shape at the origin and scale its bounding sphere to ``radius``."""
        p, _, _ = self.sample(rng, 4000)
        self.centre = (p.min(0) + p.max(0)) / 2
        self.scale = radius / max(np.max(np.linalg.norm(p - self.centre, axis=1)), 1e-9)


def _random_primitive(rng) -> _Part:
    kind = ("sphere", "box", "cylinder", "torus")[int(rng.integers(4))]
    return _primitive(rng, kind)


def _primitive(rng, kind: str) -> _Part:
    if kind == "sphere":
        size = tuple(rng.uniform(0.4, 1.2, 3))
    elif kind == "box":
        size = tuple(rng.uniform(0.2, 1.2, 3))
    elif kind == "cylinder":
        size = (rng.uniform(0.2, 0.8), rng.uniform(0.2, 1.2))
    else:  # torus
        big = rng.uniform(0.5, 1.0)
        size = (big, big * rng.uniform(0.15, 0.5))
    return _Part(kind, size, Rotation.random(random_state=rng).as_matrix(), np.zeros(3))


def _make_object(rng, family: str) -> _Shape:
    if family == "union":
        parts = [_random_primitive(rng) for _ in range(int(rng.integers(2, 5)))]
        for p in parts:
            p.offset = rng.uniform(-1.0, 1.0, 3)
        return _Shape(parts)
    return _Shape([_primitive(rng, family)])


def _make_scene(rng, half: float) -> _Shape:
    """Ground [-half, half]^2 at z = 0, walls on 1-3 of its edges, 2-8 boxes standing on it."""
    eye = np.eye(3)
    parts = [_Part("rect", (half, half), eye, np.zeros(3))]
    height = half * rng.uniform(0.2, 0.5)
    for side in rng.permutation(4)[: int(rng.integers(1, 4))]:
        yaw = side * np.pi / 2
        # A vertical rectangle whose normal points to the centre; seen from both sides.
        normal_dir = -np.array([np.cos(yaw), np.sin(yaw), 0.0])
        # Build the wall frame explicitly: x along the edge, y up, z = normal (right-handed).
        x_axis = np.cross([0.0, 0.0, 1.0], normal_dir)
        rot = np.stack([x_axis, [0.0, 0.0, 1.0], normal_dir], axis=1)
        offset = -normal_dir * half + np.array([0.0, 0.0, height / 2])
        parts.append(_Part("rect", (half, height / 2), rot, offset, two_sided=True))
    for _ in range(int(rng.integers(2, 9))):
        size = tuple(half * rng.uniform([0.04, 0.04, 0.03], [0.2, 0.2, 0.25]))
        yaw = Rotation.from_euler("z", rng.uniform(0, 2 * np.pi)).as_matrix()
        xy = rng.uniform(-0.8 * half, 0.8 * half, 2)
        parts.append(_Part("box", size, yaw, np.array([xy[0], xy[1], size[2]])))
    return _Shape(parts)


class _MeshShape:
    """A normalised mesh (:class:`bpnp.data.meshes.MeshData`) scaled to bounding radius
    ``radius``; samples like :class:`_Shape`."""

    def __init__(self, mesh, radius: float):
        self.mesh, self.radius = mesh, float(radius)
        self.category = mesh.category

    @property
    def area(self) -> float:
        return self.mesh.area * self.radius**2

    @property
    def bounds(self) -> np.ndarray:
        return self.mesh.bounds * self.radius

    def sample(self, rng, n):
        p, q = self.mesh.sample(rng, n)
        return p * self.radius, q, np.full(len(p), self.mesh.two_sided)

    def ground_height(self, xy: np.ndarray) -> float:
        """Highest surface (vertex) z within 3 % of the radius of the horizontal point ``xy``
        (the nearest vertex's z when none is that close)."""
        v = self.mesh.vertices * self.radius
        d = np.linalg.norm(v[:, :2] - xy, axis=1)
        near = d < 0.03 * self.radius
        return float(v[near, 2].max()) if near.any() else float(v[int(np.argmin(d)), 2])


def _make_mesh(rng, cfg: SyntheticConfig) -> _MeshShape:
    files, p = mesh_choices(cfg.mesh_root, cfg.mesh_split, cfg.heldout_category,
                            cfg.heldout_mesh_frac, cfg.mesh_category_weights)
    rel = files[int(rng.choice(len(files), p=p))]
    mesh = load_mesh(Path(cfg.mesh_root) / rel)
    if view_mode(mesh.category) == "object":
        radius = _draw(rng, cfg.object_scale)
    else:
        radius = _draw(rng, cfg.scene_size) * math.sqrt(2.0)
    return _MeshShape(mesh, radius)


@dataclass(frozen=True)
class _Cam:
    """Pinhole intrinsics of one instance: focal ``f`` (pixels), image ``w`` x ``h``."""

    f: float
    w: int
    h: int

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.f, 0.0, self.w / 2.0], [0.0, self.f, self.h / 2.0], [0, 0, 1.0]])


def _camera(rng, cfg: SyntheticConfig) -> _Cam:
    if cfg.image_width is None:  # the old behaviour: fixed focal, width from the field of view
        w, h = cfg.image_size
        return _Cam(float(cfg.focal_px), w, h)
    fov = math.radians(_draw(rng, cfg.fov_deg))
    w = int(cfg.image_width)
    return _Cam(w / (2.0 * math.tan(fov / 2.0)), w, int(math.ceil(w / cfg.aspect)))


def _look_at(centre: np.ndarray, target: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) for a camera at ``centre`` looking at ``target``; image y is -up."""
    z = _unit(target - centre)
    x = np.cross(-up, z)
    if np.linalg.norm(x) < 1e-8:  # up parallel to the viewing direction
        x = np.cross(-_unit(np.array([up[1], up[2], up[0]]) + 0.1), z)
    x = _unit(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ centre


def _roll(R: np.ndarray, t: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    Rz = Rotation.from_euler("z", angle).as_matrix()
    return Rz @ R, Rz @ t


def _place_camera(rng, cfg: SyntheticConfig, cam: _Cam, family: str, shape_radius: float,
                  scene_half: float):
    """Returns R, t, camera centre, distance to target."""
    if family == "scene":
        target = np.array([*rng.uniform(-0.3, 0.3, 2) * scene_half, rng.uniform(0, 0.2) * scene_half])
        az = rng.uniform(0, 2 * np.pi)
        el = math.radians(_draw(rng, cfg.scene_elevation_deg))
        dist = _draw(rng, cfg.scene_distance) * scene_half
        centre = target + dist * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az),
                                           math.sin(el)])
        R, t = _look_at(centre, target, np.array([0.0, 0.0, 1.0]))
        R, t = _roll(R, t, math.radians(rng.uniform(-cfg.scene_roll_deg, cfg.scene_roll_deg)))
        return R, t, centre, dist
    w, h = cam.w, cam.h
    half_fov = math.atan(min(w, h) / 2.0 / cam.f)
    fill = _draw(rng, cfg.view_fill)
    dist = shape_radius / math.sin(min(fill * half_fov, 0.99 * math.pi / 2))
    target = rng.uniform(-0.1, 0.1, 3) * shape_radius
    direction = _unit(rng.normal(size=3))
    centre = target + dist * direction
    up = np.cross(direction, _unit(rng.normal(size=3)))  # random roll
    R, t = _look_at(centre, target, _unit(up))
    return R, t, centre, dist


def _direction(az: float, el: float) -> np.ndarray:
    return np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def _place_mesh_camera(rng, cfg: SyntheticConfig, cam: _Cam, shape: _MeshShape):
    """Camera for a mesh by its category's view mode (module docstring): R, t, centre, distance
    (the near plane is ``min_depth_frac`` times that distance)."""
    mode = view_mode(shape.category)
    if mode == "object":
        return _place_camera(rng, cfg, cam, "mesh", shape.radius, 0.0)
    up = np.array([0.0, 0.0, 1.0])
    lo, hi = shape.bounds
    ext = hi - lo
    if mode == "inside":
        centre = lo + ext * np.array([rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75),
                                      rng.uniform(0.30, 0.55)])
        yaw, pitch = rng.uniform(0, 2 * np.pi), math.radians(rng.uniform(-20.0, 10.0))
        target = centre + _direction(yaw, pitch)
        dist = 0.5 * shape.radius
    elif mode == "street":
        target = np.array([rng.uniform(-0.2, 0.2) * ext[0], rng.uniform(-0.2, 0.2) * ext[1],
                           lo[2] + rng.uniform(0.1, 0.5) * ext[2]])
        az, el = rng.uniform(0, 2 * np.pi), math.radians(_draw(rng, cfg.scene_elevation_deg))
        half_fov = math.atan(min(cam.w, cam.h) / 2.0 / cam.f)
        dist = shape.radius / math.sin(min(_draw(rng, cfg.view_fill) * half_fov, 0.99 * math.pi / 2))
        centre = target + dist * _direction(az, el)
    else:  # aerial: terrain
        xy = rng.uniform(-0.35, 0.35, 2) * ext[:2]
        target = np.array([xy[0], xy[1], shape.ground_height(xy)])
        az, el = rng.uniform(0, 2 * np.pi), math.radians(_draw(rng, cfg.scene_elevation_deg))
        dist = 0.5 * _draw(rng, cfg.scene_distance) * shape.radius
        centre = target + dist * _direction(az, el)
        floor = shape.ground_height(centre[:2]) + 0.03 * shape.radius
        if centre[2] < floor:  # keep the camera above the terrain under it
            centre[2] = floor
            dist = float(np.linalg.norm(centre - target))
    R, t = _look_at(centre, target, up)
    R, t = _roll(R, t, math.radians(rng.uniform(-cfg.scene_roll_deg, cfg.scene_roll_deg)))
    return R, t, centre, dist


#: Pool size multiplier for ``room`` meshes (the camera sees a small part of the surface, and
#: thin near structures need samples to occlude what is behind them).
_ROOM_POOL_FACTOR = 3

#: Each sampled point stands for a surface disc of area ``_SPLAT_SCALE**2 * area / n`` when it
#: occludes (the z-buffer closes the gaps between samples of near surfaces).
_SPLAT_SCALE = 1.5


def _visible(cfg, cam: _Cam, R, t, centre, dist, pts, normals, two_sided,
             footprint: float | None = None) -> np.ndarray:
    """Observable points: in front, in the image, facing the camera (``backface_culling``) and,
    when ``footprint`` (world radius of a sample's surface disc) is given, not occluded."""
    X = pts @ R.T + t
    z = X[:, 2]
    front = z > cfg.min_depth_frac * dist
    zs = np.where(front, z, 1.0)
    K = cam.K
    w, h = cam.w, cam.h
    u = K[0, 0] * X[:, 0] / zs + K[0, 2]
    v = K[1, 1] * X[:, 1] / zs + K[1, 2]
    ok = front & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    if cfg.backface_culling:
        facing = np.einsum("ij,ij->i", normals, centre - pts) > 0
        ok &= facing | two_sided
    if footprint is not None:
        # Every surface point in front occludes, back-facing ones too (they are surfaces). A
        # sample's disc projects to an ellipse with axes f r / z and f r cos(theta) / z; the
        # splat takes their geometric mean (the image-space spacing of the samples).
        nc = normals @ R.T
        cos = np.abs(np.einsum("ij,ij->i", nc, X)) / np.maximum(np.linalg.norm(X, axis=1), 1e-12)
        # Surfaces nearer than the near plane are not observed but still occlude.
        ahead = z > 1e-6 * dist
        za = np.where(ahead, z, 1.0)
        ua, va = K[0, 0] * X[:, 0] / za + K[0, 2], K[1, 1] * X[:, 1] / za + K[1, 2]
        seen = zbuffer_visible(ua, va, np.where(ahead, z, -1.0), w, h, cfg.occlusion_px,
                               cfg.occlusion_tol, radius_px=cam.f * footprint * np.sqrt(cos) / za,
                               points=X, normals=nc, focal_px=cam.f)
        ok &= seen
    return ok


def _sample_pool(rng, cfg, cam, shape, R, t, centre, dist, need_vis: int, need_hidden: int):
    """Candidate surface points and which of them are observable."""
    if cfg.occlusion_px > 0:
        n0 = max(cfg.occlusion_samples, 3 * (need_vis + need_hidden))
        if getattr(shape, "category", None) == "room":
            n0 *= _ROOM_POOL_FACTOR  # inside a room most of the surface is out of view
        pool_p, pool_n, pool_two = shape.sample(rng, n0)
        for growth in range(4):  # up to 8 x n0 points when too few are visible
            footprint = _SPLAT_SCALE * math.sqrt(shape.area / (math.pi * len(pool_p)))
            pool_vis = _visible(cfg, cam, R, t, centre, dist, pool_p, pool_n, pool_two, footprint)
            if (pool_vis.sum() >= need_vis and (~pool_vis).sum() >= need_hidden) or growth == 3:
                break
            p, q, two = shape.sample(rng, len(pool_p))
            pool_p, pool_n, pool_two = (np.concatenate(a) for a in ((pool_p, p), (pool_n, q), (pool_two, two)))
        return pool_p, pool_vis
    pool_p, pool_vis = np.zeros((0, 3)), np.zeros(0, dtype=bool)
    for _ in range(6):  # grow the pool until enough visible (and hidden) points exist
        p, nrm, two = shape.sample(rng, max(3 * (need_vis + need_hidden), 512))
        pool_p = np.concatenate([pool_p, p])
        pool_vis = np.concatenate([pool_vis, _visible(cfg, cam, R, t, centre, dist, p, nrm, two)])
        if pool_vis.sum() >= need_vis and (~pool_vis).sum() >= need_hidden:
            break
    return pool_p, pool_vis


def _image_outliers(rng, cam: _Cam, n: int, cluster_frac: float) -> np.ndarray:
    """``n`` 2D outliers inside the image (normalised coordinates): uniform, except
    ``round(cluster_frac n)`` in Gaussian blobs around 1-4 random centres."""
    size = np.array([cam.w, cam.h], dtype=np.float64)
    n_c = int(round(cluster_frac * n))
    uv = rng.uniform(0.0, 1.0, size=(n - n_c, 2)) * size
    if n_c > 0:
        n_centres = int(rng.integers(1, 5))
        centres = rng.uniform(0.0, 1.0, size=(n_centres, 2)) * size
        sigma = rng.uniform(0.02, 0.06, size=n_centres) * cam.w
        which = rng.integers(n_centres, size=n_c)
        blob = centres[which] + rng.normal(size=(n_c, 2)) * sigma[which, None]
        for _ in range(8):  # redraw the ones that fell outside the image
            bad = np.flatnonzero(np.any((blob < 0) | (blob >= size), axis=1))
            if len(bad) == 0:
                break
            blob[bad] = centres[which[bad]] + rng.normal(size=(len(bad), 2)) * sigma[which[bad], None]
        blob = np.clip(blob, 0.0, np.nextafter(size, 0))
        uv = np.concatenate([uv, blob])
    return (uv - size / 2.0) / cam.f


def _shape_radius(shape, pts: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and bounding radius of a structure from its sampled points."""
    centre = (pts.min(0) + pts.max(0)) / 2.0
    return centre, float(np.max(np.linalg.norm(pts - centre, axis=1)))


def _other_shape_3d(rng, pts: np.ndarray, n: int) -> np.ndarray:
    """``n`` points on a second object beside the structure sampled as ``pts`` (module docstring)."""
    if n == 0:
        return np.zeros((0, 3))
    centre, radius = _shape_radius(None, pts)
    other = _make_object(rng, "union")
    other.normalise(rng, radius)
    d = _unit(rng.normal(size=3))
    p, _, _ = other.sample(rng, n)
    return p + centre + rng.uniform(2.0, 3.0) * radius * d  # >= 1 radius clear of the structure's sphere


def _other_shape_2d(rng, cam: _Cam, R: np.ndarray, t: np.ndarray, pts: np.ndarray, n: int) -> np.ndarray:
    """``n`` 2D outliers: projections of a foreground object in view (module docstring)."""
    if n == 0:
        return np.zeros((0, 2))
    centre, radius = _shape_radius(None, pts)
    cam_centre = -R.T @ t
    other = _make_object(rng, "union")
    other.normalise(rng, rng.uniform(0.3, 1.0) * radius)
    # A point on the ray from the camera towards the structure, 30-70 % of the way, pushed
    # sideways by up to the structure's radius.
    along = rng.uniform(0.3, 0.7)
    place = cam_centre + along * (centre - cam_centre) + rng.uniform(-0.5, 0.5, 3) * radius
    p, _, _ = other.sample(rng, 4 * n)
    X = (p + place) @ R.T + t
    size = np.array([cam.w, cam.h], dtype=np.float64)
    front = X[:, 2] > 1e-6
    uv = X[front, :2] / X[front, 2:3] * cam.f + size / 2.0
    inside = uv[np.all((uv >= 0) & (uv < size), axis=1)]
    out = inside[:n]
    if len(out) < n:
        fill = rng.uniform(0.0, 1.0, size=(n - len(out), 2)) * size
        out = np.concatenate([out, fill])
    return (out - size / 2.0) / cam.f


def _outlier_modes(cfg: SyntheticConfig, seed: int, index: int) -> tuple[str, str]:
    """This instance's 2D and 3D outlier modes: ``other_shape`` with probability
    ``other_shape_prob_*``, else the configured mode (stream ``[seed, index, 8]``, untouched when
    both probabilities are 0)."""
    mode_2d, mode_3d = cfg.outliers_2d, cfg.outliers_3d
    if cfg.other_shape_prob_2d > 0 or cfg.other_shape_prob_3d > 0:
        u2, u3 = np.random.default_rng([int(seed), int(index), 8]).uniform(size=2)
        mode_2d = "other_shape" if u2 < cfg.other_shape_prob_2d else mode_2d
        mode_3d = "other_shape" if u3 < cfg.other_shape_prob_3d else mode_3d
    return mode_2d, mode_3d


def make_instance(cfg: SyntheticConfig, seed: int, index: int) -> dict[str, np.ndarray]:
    """Build synthetic instance ``index`` of the stream ``seed``.

    Args:
        cfg: generator settings.
        seed, index: non-negative integers; the result depends on them (and ``cfg``, and for the
            ``mesh`` family the mesh files) only.

    Returns:
        Scene dict (the scene-file keys of docs/data.md): ``p2d`` (m, 2), ``p3d`` (n, 3), ``R`` (3, 3), ``t`` (3,),
        ``K`` (3, 3) float64; ``match`` (m,) int64 (-1 = 2D outlier); ``image_size`` (2,) int64.
    """
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"make_instance: seed and index must be >= 0, got {seed}, {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    m = _draw_int(rng, cfg.num_points_2d)
    f2, f3 = _draw(rng, cfg.outlier_frac_2d), _draw(rng, cfg.outlier_frac_3d)
    noise_px = _draw(rng, cfg.noise_px)
    # New draws only consume the stream when their option is a range / enabled, so the default
    # config reproduces the old generator exactly.
    cam = _camera(rng, cfg)
    noise = noise_px / cam.f
    det = _draw(rng, cfg.detection_rate)
    mode_2d, mode_3d = _outlier_modes(cfg, seed, index)
    # ("other_shape" draws it too, unused, so its instances keep the shape and camera of "image".)
    cluster = _draw(rng, cfg.outlier_2d_cluster_frac) if mode_2d in ("image", "other_shape") else 0.0
    m_out = int(round(f2 * m))
    k = m - m_out

    names = [f for f in FAMILIES if cfg.shape_weights.get(f, 0.0) > 0]
    weights = np.array([cfg.shape_weights[f] for f in names])
    n_out3 = int(round(f3 / (1.0 - f3) * k))
    surface = mode_3d == "surface"
    # The shift suite's modes draw from their own stream (the main stream stays that of "image" /
    # "uniform"), so switching them changes only the outliers.
    other_rng = np.random.default_rng([int(seed), int(index), 7])

    # With surface outliers the pool must hold the inliers and (in the worst case) every 3D
    # outlier hidden; which outliers are visible-undetected is decided from the pool below.
    need_vis, need_hidden = k, (n_out3 if surface or not cfg.visible_only else 0)
    for _attempt in range(5):
        # A new shape and camera if the view sees too few points (grazing scene views); the
        # retries consume the same rng, so the result stays a function of (seed, index).
        family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        scene_half = 0.0
        if family == "scene":
            scene_half = _draw(rng, cfg.scene_size)
            shape = _make_scene(rng, scene_half)
            radius = scene_half * math.sqrt(2.0)
        elif family == "mesh":
            shape = _make_mesh(rng, cfg)
        else:
            shape = _make_object(rng, family)
            radius = _draw(rng, cfg.object_scale)
            shape.normalise(rng, radius)
        if family == "mesh":
            R, t, centre, dist = _place_mesh_camera(rng, cfg, cam, shape)
        else:
            R, t, centre, dist = _place_camera(rng, cfg, cam, family, radius, scene_half)
        pool_p, pool_vis = _sample_pool(rng, cfg, cam, shape, R, t, centre, dist, need_vis, need_hidden)
        if pool_vis.sum() >= k:
            break
    vis_idx = np.flatnonzero(pool_vis)
    if len(vis_idx) < k:
        k = len(vis_idx)  # keep the configured outlier fractions with fewer inliers
        if k < 4:
            raise RuntimeError(f"make_instance(seed={seed}, index={index}): only {k} visible points")
        n_out3 = int(round(f3 / (1.0 - f3) * k))
        m_out = int(round(f2 / (1.0 - f2) * k))
    if surface:
        # The pool is a uniform "map" of the surfaces; the inliers are the detected fraction
        # ``det`` of its visible points. The 3D outliers are a uniform draw from the map points
        # without a keypoint, so a share (1 - d) / (1 - d + H / V) of them is visible-undetected
        # (H / V: hidden / visible pool points) and the rest hidden.
        hid_idx = np.flatnonzero(~pool_vis)
        ratio = len(hid_idx) / max(len(vis_idx), 1)
        share = (1.0 - det) / (1.0 - det + ratio) if det < 1.0 else 0.0
        n_undet = min(int(round(share * n_out3)), len(vis_idx) - k)
        n_hidden = min(n_out3 - n_undet, len(hid_idx))
        n_undet = min(n_out3 - n_hidden, len(vis_idx) - k)  # too few hidden: more undetected
        pick = rng.choice(vis_idx, size=k + n_undet, replace=False)
        X_in, X_undet = pool_p[pick[:k]], pool_p[pick[k:]]
    else:
        X_in = pool_p[rng.choice(vis_idx, size=k, replace=False)]

    Xc = X_in @ R.T + t
    p2d_in = Xc[:, :2] / Xc[:, 2:3] + rng.normal(scale=noise, size=(k, 2))
    if mode_2d == "image":
        p2d_out = _image_outliers(rng, cam, m_out, cluster)
    elif mode_2d == "other_shape":
        p2d_out = _other_shape_2d(other_rng, cam, R, t, pool_p, m_out)
    else:
        lo2, hi2 = p2d_in.min(0), p2d_in.max(0)
        p2d_out = rng.uniform(lo2, hi2, size=(m_out, 2))

    if surface:
        hidden = pool_p[rng.choice(hid_idx, size=n_hidden, replace=False)] if n_hidden > 0 else np.zeros((0, 3))
        p3d = np.concatenate([X_in, X_undet, hidden])
    elif mode_3d == "other_shape":
        p3d = np.concatenate([X_in, _other_shape_3d(other_rng, pool_p, n_out3)])
    else:
        hidden = np.zeros((0, 3))
        if not cfg.visible_only and n_out3 > 0:
            hid_idx = np.flatnonzero(~pool_vis)
            take = min(n_out3, len(hid_idx))
            hidden = pool_p[rng.choice(hid_idx, size=take, replace=False)]
        lo3, hi3 = X_in.min(0), X_in.max(0)
        uniform = rng.uniform(lo3, hi3, size=(n_out3 - len(hidden), 3))
        p3d = np.concatenate([X_in, hidden, uniform])
    p2d = np.concatenate([p2d_in, p2d_out])
    match = np.concatenate([np.arange(k), np.full(m_out, -1)]).astype(np.int64)

    p2d, p3d, match = shuffle_sets(p2d, p3d, match, rng)
    return {
        "p2d": p2d,
        "p3d": p3d,
        "R": R,
        "t": t,
        "match": match,
        "K": cam.K,
        "image_size": np.array([cam.w, cam.h], dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------------
# python -m bpnp.data.synthetic: statistics and timing of a config
# ---------------------------------------------------------------------------------------------


def instance_stats(scene: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-instance numbers: set sizes, outlier fractions and where the 3D outliers are (in the
    image and in front of the camera, or not)."""
    p3d, match = scene["p3d"], scene["match"]
    m, n = len(scene["p2d"]), len(p3d)
    used = np.zeros(n, dtype=bool)
    used[match[match >= 0]] = True
    X = p3d[~used] @ scene["R"].T + scene["t"]
    K, (w, h) = scene["K"], scene["image_size"]
    z = np.where(X[:, 2] > 0, X[:, 2], 1.0)
    u, v = K[0, 0] * X[:, 0] / z + K[0, 2], K[1, 1] * X[:, 1] / z + K[1, 2]
    in_view = (X[:, 2] > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    return {"m": m, "n": n, "out2d": float(np.mean(match < 0)), "out3d": float(1 - used.mean()),
            "out3d_in_view": float(in_view.mean()) if len(X) else float("nan"),
            "focal": float(K[0, 0])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bpnp.data.synthetic",
        description="Generate instances 0..N-1 of a stream and print their statistics and the "
                    "generation time (one process, after a warm-up pass that loads the meshes).")
    parser.add_argument("--preset", choices=["legacy", "world"], default="world",
                        help="legacy = SyntheticConfig() defaults; world = WORLD")
    parser.add_argument("--mesh-root", default=None,
                        help="mesh folder (default: the embedded <repo>/data/meshes)")
    parser.add_argument("--num", type=int, default=200, help="number of instances")
    parser.add_argument("--seed", type=int, default=0, help="stream seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a SyntheticConfig field (YAML value), repeatable")
    args = parser.parse_args(argv)
    overrides = parse_set_items(args.set)
    root = args.mesh_root
    if root is None:
        root = str(MESH_ROOT) if MESH_ROOT.is_dir() else None
    try:
        if args.preset == "world":
            cfg = SyntheticConfig.world(root, **overrides)
        else:
            cfg = SyntheticConfig.from_dict(overrides)
        for i in range(args.num):  # warm-up: load every mesh the stream uses
            make_instance(cfg, args.seed, i)
        t0 = time.perf_counter()
        stats = [instance_stats(make_instance(cfg, args.seed, i)) for i in range(args.num)]
        dt = (time.perf_counter() - t0) / max(args.num, 1)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cols = {k: np.array([s[k] for s in stats]) for k in stats[0]}

    def q(a):
        a = a[np.isfinite(a)]
        return f"mean {a.mean():7.3f}  min {a.min():7.3f}  median {np.median(a):7.3f}  max {a.max():7.3f}"

    print(f"{args.num} instances of seed {args.seed}, preset {args.preset}, overrides {overrides}")
    print(f"  2D points m             {q(cols['m'])}")
    print(f"  3D points n             {q(cols['n'])}")
    print(f"  2D outlier fraction     {q(cols['out2d'])}")
    print(f"  3D outlier fraction     {q(cols['out3d'])}")
    print(f"  3D outliers in view     {q(cols['out3d_in_view'])}")
    print(f"  focal length (px)       {q(cols['focal'])}")
    print(f"  generation time         {1000 * dt:.1f} ms per instance (warm mesh cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
