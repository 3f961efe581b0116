"""Synthetic blind-PnP instances: a deterministic function of ``(seed, index)``.

Each instance samples a shape, places a camera looking at it, keeps the 3D points the camera can
see, projects some of them (the inliers, with Gaussian pixel noise) and adds outliers:

- **Shapes** (``SyntheticConfig.shape_weights``): surfaces of primitives (``sphere`` = ellipsoid,
  ``box``, ``cylinder``, ``torus``) with random sizes, ``union`` of 2-4 of them randomly posed
  (ModelNet-like objects), and ``scene`` layouts (ground plane, 1-3 walls and 2-8 boxes, so the
  points spread in depth). Points are sampled on the surfaces in proportion to area.
- **Camera**: objects are seen from a uniformly random direction with a random roll, at a distance
  where their bounding sphere fills ``view_fill`` of the half field of view; scenes are seen from
  an elevation of ``scene_elevation_deg`` above the ground, from a distance ``scene_distance``
  times the scene's half-extent, with a small roll. ``x_cam = R X + t``.
- **Visibility**: a 3D point can be observed only if it is in front of the camera (depth above
  ``min_depth_frac`` times the camera distance), projects inside the image (``fov_deg`` wide,
  ``aspect`` = width / height, focal ``focal_px``) and, with ``backface_culling``, its surface
  faces the camera (walls and the ground's top are seen from either side / above). Occlusion of
  one part by another is not modelled.
- **Counts**: ``m`` 2D points in total, of which a fraction ``outlier_frac_2d`` are outliers
  (uniform in the bounding box of the inliers' normalised coordinates); ``k = m - round(f2 m)``
  inlier pairs; the 3D set holds the ``k`` inlier points plus ``round(f3 / (1 - f3) k)`` outliers,
  so that a fraction ``outlier_frac_3d`` of it is outliers. With ``visible_only`` the 3D outliers
  are uniform in the inliers' 3D bounding box; otherwise they are first taken from surface points
  the camera cannot see (the realistic case where the cloud covers the whole object), topped up
  with uniform ones.
- **Noise**: ``noise_px`` pixels of Gaussian noise per coordinate at focal ``focal_px``, i.e.
  ``noise_px / focal_px`` in normalised units.

Both point orders are shuffled, so indices leak nothing about the matches. Randomness comes only
from ``numpy.random.default_rng([seed, index])``; global random state is never touched, so every
DDP rank, worker and rerun builds the same instance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np
from scipy.spatial.transform import Rotation

from bpnp.data.shuffle import shuffle_sets

__all__ = ["SyntheticConfig", "make_instance", "FAMILIES"]

FAMILIES = ("sphere", "box", "cylinder", "torus", "union", "scene")
Range = tuple[float, float]


def _default_weights() -> dict[str, float]:
    return {"sphere": 1.0, "box": 1.0, "cylinder": 1.0, "torus": 1.0, "union": 4.0, "scene": 2.0}


@dataclass
class SyntheticConfig:
    """Every knob of the synthetic generator. A ``(lo, hi)`` pair is drawn uniformly per instance
    (integers inclusive); a scalar is fixed.

    Attributes:
        num_points_2d: total 2D points ``m`` (inliers + 2D outliers).
        outlier_frac_2d: fraction of the 2D points that are outliers, in [0, 1).
        outlier_frac_3d: fraction of the 3D points that are outliers (observed by no 2D point).
        noise_px: std of the Gaussian 2D noise, in pixels at ``focal_px``.
        focal_px: focal length in pixels (sets the noise scale and ``K``).
        fov_deg: horizontal field of view in degrees; image width = 2 f tan(fov / 2).
        aspect: image width / height.
        shape_weights: relative frequency of each family in :data:`FAMILIES` (0 disables one).
        object_scale: bounding-sphere radius of objects, world units.
        view_fill: fraction of the (shorter) half field of view an object's bounding sphere
            subtends; below 1 keeps the whole object in view.
        scene_size: half-extent of scene layouts' ground plane, world units.
        scene_distance: camera distance from the scene's target point / half-extent.
        scene_elevation_deg: camera elevation above the ground for scenes, degrees.
        scene_roll_deg: maximum absolute camera roll for scenes, degrees (objects: any roll).
        visible_only: 3D outliers uniform in the bounding box (True) or first taken from surface
            points the camera cannot see (False).
        backface_culling: surfaces facing away from the camera are not observed.
        min_depth_frac: near plane, as a fraction of the camera-to-target distance.
    """

    num_points_2d: int | Range = (200, 1000)
    outlier_frac_2d: float | Range = 0.0
    outlier_frac_3d: float | Range = 0.0
    noise_px: float | Range = 1.0
    focal_px: float = 800.0
    fov_deg: float = 60.0
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
        if not self.fov_deg < 180:
            raise ValueError(f"SyntheticConfig.fov_deg must be < 180, got {self.fov_deg}")
        if _hi(self.view_fill) >= 2.0:
            raise ValueError("SyntheticConfig.view_fill must be < 2 (object would be too close)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "SyntheticConfig" | None) -> "SyntheticConfig":
        """Build from a mapping (e.g. a Hydra DictConfig); unknown keys raise ``ValueError``."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"SyntheticConfig: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        out = {}
        for k, v in d.items():
            if k == "shape_weights":
                out[k] = dict(v)
            elif not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):
                out[k] = tuple(v)
            else:
                out[k] = v
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict (pairs as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        w = int(math.ceil(2.0 * self.focal_px * math.tan(math.radians(self.fov_deg) / 2.0)))
        return w, int(math.ceil(w / self.aspect))

    @property
    def K(self) -> np.ndarray:
        """(3, 3) intrinsics: focal ``focal_px``, principal point at the image centre."""
        w, h = self.image_size
        return np.array([[self.focal_px, 0.0, w / 2.0], [0.0, self.focal_px, h / 2.0], [0, 0, 1.0]])


def _lo(v) -> float:
    return v[0] if isinstance(v, tuple) else v


def _hi(v) -> float:
    return v[1] if isinstance(v, tuple) else v


def _draw(rng: np.random.Generator, v) -> float:
    return float(rng.uniform(v[0], v[1])) if isinstance(v, tuple) else float(v)


def _draw_int(rng: np.random.Generator, v) -> int:
    return int(rng.integers(int(v[0]), int(v[1]) + 1)) if isinstance(v, tuple) else int(v)


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


def _place_camera(rng, cfg: SyntheticConfig, family: str, shape_radius: float, scene_half: float):
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
    w, h = cfg.image_size
    half_fov = math.atan(min(w, h) / 2.0 / cfg.focal_px)
    fill = _draw(rng, cfg.view_fill)
    dist = shape_radius / math.sin(min(fill * half_fov, 0.99 * math.pi / 2))
    target = rng.uniform(-0.1, 0.1, 3) * shape_radius
    direction = _unit(rng.normal(size=3))
    centre = target + dist * direction
    up = np.cross(direction, _unit(rng.normal(size=3)))  # random roll
    R, t = _look_at(centre, target, _unit(up))
    return R, t, centre, dist


def _visible(cfg, R, t, centre, dist, pts, normals, two_sided) -> np.ndarray:
    X = pts @ R.T + t
    z = X[:, 2]
    front = z > cfg.min_depth_frac * dist
    zs = np.where(front, z, 1.0)
    K = cfg.K
    w, h = cfg.image_size
    u = K[0, 0] * X[:, 0] / zs + K[0, 2]
    v = K[1, 1] * X[:, 1] / zs + K[1, 2]
    ok = front & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    if cfg.backface_culling:
        facing = np.einsum("ij,ij->i", normals, centre - pts) > 0
        ok &= facing | two_sided
    return ok


def make_instance(cfg: SyntheticConfig, seed: int, index: int) -> dict[str, np.ndarray]:
    """Build synthetic instance ``index`` of the stream ``seed``.

    Args:
        cfg: generator settings.
        seed, index: non-negative integers; the result depends on them (and ``cfg``) only.

    Returns:
        Scene dict (DESIGN.md contract): ``p2d`` (m, 2), ``p3d`` (n, 3), ``R`` (3, 3), ``t`` (3,),
        ``K`` (3, 3) float64; ``match`` (m,) int64 (-1 = 2D outlier); ``image_size`` (2,) int64.
    """
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"make_instance: seed and index must be >= 0, got {seed}, {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    m = _draw_int(rng, cfg.num_points_2d)
    f2, f3 = _draw(rng, cfg.outlier_frac_2d), _draw(rng, cfg.outlier_frac_3d)
    noise = _draw(rng, cfg.noise_px) / cfg.focal_px
    m_out = int(round(f2 * m))
    k = m - m_out

    names = [f for f in FAMILIES if cfg.shape_weights.get(f, 0.0) > 0]
    weights = np.array([cfg.shape_weights[f] for f in names])
    n_out3 = int(round(f3 / (1.0 - f3) * k))
    need_hidden = 0 if cfg.visible_only else n_out3
    for _attempt in range(5):
        # A new shape and camera if the view sees too few points (grazing scene views); the
        # retries consume the same rng, so the result stays a function of (seed, index).
        family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        scene_half = 0.0
        if family == "scene":
            scene_half = _draw(rng, cfg.scene_size)
            shape = _make_scene(rng, scene_half)
            radius = scene_half * math.sqrt(2.0)
        else:
            shape = _make_object(rng, family)
            radius = _draw(rng, cfg.object_scale)
            shape.normalise(rng, radius)
        R, t, centre, dist = _place_camera(rng, cfg, family, radius, scene_half)
        pool_p, pool_vis = np.zeros((0, 3)), np.zeros(0, dtype=bool)
        for _ in range(6):  # grow the pool until enough visible (and hidden) points exist
            p, nrm, two = shape.sample(rng, max(3 * (k + need_hidden), 512))
            pool_p = np.concatenate([pool_p, p])
            pool_vis = np.concatenate([pool_vis, _visible(cfg, R, t, centre, dist, p, nrm, two)])
            if pool_vis.sum() >= k and (~pool_vis).sum() >= need_hidden:
                break
        if pool_vis.sum() >= k:
            break
    vis_idx = np.flatnonzero(pool_vis)
    if len(vis_idx) < k:
        k = len(vis_idx)  # keep the configured outlier fractions with fewer inliers
        if k < 4:
            raise RuntimeError(f"make_instance(seed={seed}, index={index}): only {k} visible points")
        n_out3 = int(round(f3 / (1.0 - f3) * k))
        m_out = int(round(f2 / (1.0 - f2) * k))
    X_in = pool_p[rng.choice(vis_idx, size=k, replace=False)]

    Xc = X_in @ R.T + t
    p2d_in = Xc[:, :2] / Xc[:, 2:3] + rng.normal(scale=noise, size=(k, 2))
    lo2, hi2 = p2d_in.min(0), p2d_in.max(0)
    p2d_out = rng.uniform(lo2, hi2, size=(m_out, 2))

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
    w, h = cfg.image_size
    return {
        "p2d": p2d,
        "p3d": p3d,
        "R": R,
        "t": t,
        "match": match,
        "K": cfg.K,
        "image_size": np.array([w, h], dtype=np.int64),
    }
