"""New views of real SfM models: blind-PnP instances at camera poses no image was taken from.

A COLMAP model holds real structure (3D points where real keypoints were triangulated, real
keypoints that never were) but only as many instances as registered images. A *view* reuses that
structure at a new camera:

- **Pose**: a registered image, the *anchor*, is perturbed. Its centre moves by a random offset of
  ``offset_frac`` times the median depth of its matched points (uniform direction), its rotation
  by ``rot_deg`` about a uniformly random axis, then by an in-plane roll in ``[-roll_deg,
  roll_deg]`` about the optical axis: ``R = R_roll R_axis R_anchor``, ``t = -R c``. The offset's
  lower bound (``offset_frac[0] > 0``) keeps every view off the anchor's pose by construction.
- **Intrinsics**: the anchor camera's pinhole part ``(fx, fy, cx, cy, w, h)``, zoomed (focal
  lengths times ``zoom``, the principal point kept: a longer or shorter lens on the same sensor)
  and cropped to a random sub-window of ``crop`` times the width and (independently) the height,
  placed uniformly in the image; the principal point moves with the window. ``K`` and
  ``image_size`` describe the window.
- **Visibility**: the 3D points observed by the anchor and its ``k_nearest`` nearest registered
  images (distance ``|c_i - c| / depth + angle between the optical axes in radians`` from the new
  camera) that lie in front of the camera (depth above ``min_depth_frac`` times the anchor's
  median depth) and project inside the window; each of them is detected with probability
  ``detection_rate``. The detected ones are the inliers: projected with the new pose and
  intrinsics (pinhole, so the 2D points are undistorted normalised coordinates by construction)
  plus Gaussian noise of ``noise_px`` pixels per coordinate (``noise_px / f`` normalised).
- **2D outliers** (a fraction ``outlier_frac_2d`` of the 2D set): the anchor's unmatched
  keypoints (point id -1: detected, never triangulated), undistorted with the anchor's lens and
  carried into the new view by the relative rotation ``R R_anchor^T`` alone, kept where they
  land inside the window; if the anchor has too few, the neighbours' unmatched keypoints (nearest
  first) are mapped the same way, and the rest is drawn uniformly over the window.
- **3D outliers** (a fraction ``outlier_frac_3d`` of the 3D set): other model points, uniformly
  from the whole model (visible-but-undetected points included, as in
  :func:`bpnp.data.instances.instance_from_image`).
- **World**: with ``similarity``, a random similarity ``X' = s Q X + T`` (``Q`` uniform on SO(3),
  ``s`` from ``world_scale``, ``T`` Gaussian with a standard deviation of ``s`` times the depth)
  is applied to the 3D points and folded into the pose (``R' = R Q^T``, ``t' = s t - R' T``: the
  camera frame scales by ``s``, so every projection is unchanged). Its draws come from a stream of
  their own, so switching it off changes nothing else.
- **Caps and order** as in :func:`~bpnp.data.instances.instance_from_image`: ``max_points_2d`` /
  ``max_points_3d`` bound the sets (the number of inliers is lowered to meet both budgets at the
  drawn outlier fractions); both sets are shuffled (:func:`bpnp.data.shuffle.shuffle_sets`).

A ``(lo, hi)`` range is drawn uniformly per view; a number is fixed. A draw that leaves fewer than
``min_inliers`` inliers (a view turned away from the structure) is redrawn, up to ``max_tries``
times, from the same stream (so still deterministic).

**Approximations** (what a real image at that pose would have differently):

- *Occlusion is not modelled*: a point seen from a nearby registered image is taken as visible
  from the new pose if it projects inside the window in front of the camera; moving the camera
  by up to ``offset_frac`` of the depth can uncover or hide points behind depth edges.
- *Detection is independent per point* (``detection_rate``), not tied to viewpoint change, scale
  or texture; structure beyond the neighbours' tracks is never observed (a zoomed-out view sees
  nothing past what the nearby cameras triangulated, so its inliers may not fill the window).
- *2D outliers move by the rotation only*: an unmatched keypoint is a direction seen from the
  anchor, mapped as if it lay at infinity (no parallax from the centre offset); their layout is
  that of real untriangulated detections (clustered on texture) but slightly rigid.
- *Noise is Gaussian and isotropic* in pixels (real keypoints carry detector noise and the SfM
  model's own error, ~0.2-0.4 px on the embedded models).

Randomness comes only from ``numpy.random.default_rng([seed, index])`` (:meth:`RealViews.instance`)
or the generator passed in; global state is never touched. Statistics of a model's views:
``python -m bpnp.data.real_views --model data/real/lund_door --num 20``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from bpnp.data.cameras import SUPPORTED_MODELS
from bpnp.data.colmap import ColmapModel, read_model
from bpnp.data.ranges import config_kwargs, draw, hi, lo, parse_set_items
from bpnp.data.shuffle import shuffle_sets

__all__ = ["ViewConfig", "RealViews", "make_view", "view_stats"]

Range = tuple[float, float]


def _lo(v) -> float:
    return float(lo(v))


def _hi(v) -> float:
    return float(hi(v))


_draw = draw


@dataclass
class ViewConfig:
    """Ranges of the view generator (a ``(lo, hi)`` pair is drawn uniformly per view; a number is
    fixed). See the module docstring for what each does.

    Attributes:
        offset_frac: camera-centre offset from the anchor's, in units of the anchor's median
            depth of matched points (``lo > 0`` keeps views off the anchor pose).
        rot_deg: rotation perturbation about a uniformly random axis, degrees.
        roll_deg: largest in-plane roll about the optical axis, degrees (uniform in +-).
        zoom: focal-length factor (principal point kept).
        crop: window size as a fraction of the anchor image's width (and, drawn separately, its
            height), in (0, 1].
        k_nearest: registered images besides the anchor whose tracks supply the 3D points.
        detection_rate: probability that a visible point becomes an inlier keypoint, in (0, 1].
        noise_px: Gaussian noise of the inlier keypoints, pixels per coordinate.
        outlier_frac_2d, outlier_frac_3d: target fraction of each set that is outliers, [0, 1).
        max_points_2d, max_points_3d: caps on the set sizes (None = no cap), >= 8.
        min_inliers: redraw a view with fewer inliers, >= 4.
        max_tries: redraws before ``ValueError``.
        min_depth_frac: near plane, fraction of the anchor's median depth.
        similarity: apply a random similarity to the world (and fold it into the pose).
        world_scale: its scale factor ``s``.
    """

    offset_frac: float | Range = (0.02, 0.15)
    rot_deg: float | Range = (0.0, 10.0)
    roll_deg: float = 30.0
    zoom: float | Range = (0.7, 1.4)
    crop: float | Range = (0.6, 1.0)
    k_nearest: int = 4
    detection_rate: float | Range = (0.5, 0.9)
    noise_px: float | Range = (0.5, 1.5)
    outlier_frac_2d: float | Range = (0.1, 0.6)
    outlier_frac_3d: float | Range = (0.1, 0.6)
    max_points_2d: int | None = 1000
    max_points_3d: int | None = 1000
    min_inliers: int = 16
    max_tries: int = 20
    min_depth_frac: float = 0.05
    similarity: bool = True
    world_scale: float | Range = (0.5, 2.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (list, tuple)):
                if len(v) != 2:
                    raise ValueError(f"ViewConfig.{f.name}: expected a number or a (lo, hi) pair, got {v!r}")
                v = (float(v[0]), float(v[1]))
                if not v[0] <= v[1]:
                    raise ValueError(f"ViewConfig.{f.name}: lo > hi in {v!r}")
                setattr(self, f.name, v)

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"ViewConfig.{name} must {what}, got {getattr(self, name)!r}")

        need(_lo(self.offset_frac) >= 0, "offset_frac", "be >= 0")
        need(_lo(self.rot_deg) >= 0 and _hi(self.rot_deg) <= 180, "rot_deg", "lie in [0, 180]")
        need(0 <= float(self.roll_deg) <= 180, "roll_deg", "lie in [0, 180]")
        need(_lo(self.zoom) > 0, "zoom", "be > 0")
        need(_lo(self.crop) > 0 and _hi(self.crop) <= 1, "crop", "lie in (0, 1]")
        need(0 < _lo(self.detection_rate) and _hi(self.detection_rate) <= 1, "detection_rate", "lie in (0, 1]")
        need(_lo(self.noise_px) >= 0, "noise_px", "be >= 0")
        for name in ("outlier_frac_2d", "outlier_frac_3d"):
            need(0 <= _lo(getattr(self, name)) and _hi(getattr(self, name)) < 1, name, "lie in [0, 1)")
        for name in ("max_points_2d", "max_points_3d"):
            v = getattr(self, name)
            need(v is None or (not isinstance(v, bool) and int(v) == v and v >= 8), name, "be an integer >= 8 or None")
            if v is not None:
                setattr(self, name, int(v))
        for name, low in (("k_nearest", 0), ("min_inliers", 4), ("max_tries", 1)):
            v = getattr(self, name)
            need(not isinstance(v, bool) and int(v) == v and v >= low, name, f"be an integer >= {low}")
            setattr(self, name, int(v))
        need(0 < float(self.min_depth_frac) < 1, "min_depth_frac", "lie in (0, 1)")
        need(_lo(self.world_scale) > 0, "world_scale", "be > 0")
        self.similarity = bool(self.similarity)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "ViewConfig" | None) -> "ViewConfig":
        """Build from a mapping (e.g. a Hydra DictConfig); unknown keys raise ``ValueError``."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        return cls(**config_kwargs(cls, d))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict (pairs as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# Rotations (numpy)
# ---------------------------------------------------------------------------------------------


def _axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation by ``angle`` radians about the unit ``axis``."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * kx + (1.0 - math.cos(angle)) * (kx @ kx)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform on SO(3) (a normalised Gaussian quaternion)."""
    w, x, y, z = rng.normal(size=4)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _rot_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    c = (np.trace(Ra.T @ Rb) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


class RealViews:
    """New-view generator over one COLMAP model (per-image data precomputed once).

    Args:
        model: a model from :func:`bpnp.data.colmap.read_model`.
        cfg: a :class:`ViewConfig`, a mapping of its fields, or None (defaults); ``ranges``
            override single fields.

    Attributes:
        anchors: ids of the images a view may start from (a supported camera model and at least
            ``cfg.min_inliers`` matched keypoints), sorted.

    >>> from bpnp.data.embedded import REAL_ROOT
    >>> views = RealViews(read_model(REAL_ROOT / "maupertuis"), noise_px=1.0)
    >>> scene = views.instance(seed=0, index=3)
    >>> sorted(scene)
    ['K', 'R', 'image_size', 'match', 'p2d', 'p3d', 't']
    """

    def __init__(self, model: ColmapModel, cfg: ViewConfig | Mapping | None = None, **ranges: Any):
        base = ViewConfig.from_dict(cfg).to_dict()
        base.update(ranges)
        self.cfg = ViewConfig.from_dict(base)
        self.model = model
        self.ids = np.array(model.image_ids, dtype=np.int64)
        if len(self.ids) == 0:
            raise ValueError(f"{model.path}: the model has no registered image")
        self.R = np.stack([model.images[i].R for i in self.ids])
        self.t = np.stack([np.asarray(model.images[i].tvec, dtype=np.float64) for i in self.ids])
        self.centres = -np.einsum("kji,kj->ki", self.R, self.t)  # c = -R^T t
        self.axes = self.R[:, 2, :]                              # optical axis in the world: R^T e_z
        self.rows: list[np.ndarray] = []   # per image: model rows of its matched keypoints
        self.depth = np.zeros(len(self.ids))
        for k, i in enumerate(self.ids):
            ids = model.images[i].point3D_ids
            rows = model.rows_of(ids[ids >= 0])
            rows = np.unique(rows[rows >= 0])
            self.rows.append(rows)
            if len(rows):
                z = model.xyz[rows] @ self.R[k, 2] + self.t[k, 2]
                z = z[z > 0]
                self.depth[k] = float(np.median(z)) if len(z) else 0.0
        self._unmatched: dict[int, np.ndarray] = {}
        ok = [k for k, i in enumerate(self.ids)
              if len(self.rows[k]) >= self.cfg.min_inliers and self.depth[k] > 0
              and model.cameras[model.images[i].camera_id].model in SUPPORTED_MODELS]
        self._anchor_pos = {int(self.ids[k]): k for k in ok}
        self.anchors = [int(self.ids[k]) for k in ok]

    def _unmatched_xy(self, k: int) -> np.ndarray:
        """Undistorted normalised coordinates (q, 2) of image ``k``'s unmatched keypoints."""
        if k not in self._unmatched:
            image = self.model.images[int(self.ids[k])]
            camera = self.model.cameras[image.camera_id]
            if camera.model not in SUPPORTED_MODELS:
                self._unmatched[k] = np.zeros((0, 2))
            else:
                xy, ok = camera.pixels_to_normalised(image.xys[image.point3D_ids < 0])
                self._unmatched[k] = xy[ok]
        return self._unmatched[k]

    # -- one view --------------------------------------------------------------------------------

    def instance(self, seed: int, index: int, return_info: bool = False):
        """View ``index`` of the stream ``seed``: the anchor is drawn uniformly from
        :attr:`anchors` by ``default_rng([seed, index])``, which then draws the view."""
        if int(seed) < 0 or int(index) < 0:
            raise ValueError(f"RealViews.instance: seed and index must be >= 0, got {seed}, {index}")
        rng = np.random.default_rng([int(seed), int(index)])
        if not self.anchors:
            raise ValueError(f"{self.model.path}: no image can anchor a view (each needs >= "
                             f"{self.cfg.min_inliers} matched keypoints and a supported camera)")
        anchor = self.anchors[int(rng.integers(len(self.anchors)))]
        return self.view(anchor, rng, return_info=return_info)

    def view(self, anchor_id: int, rng: np.random.Generator | int | None = 0, return_info: bool = False):
        """Build one view around the registered image ``anchor_id``.

        Args:
            anchor_id: COLMAP id of the anchor image (one of :attr:`anchors`).
            rng: a ``numpy.random.Generator`` or a seed for one; the result is a function of it.
            return_info: also return a dict describing the view (anchor, offsets, counts).

        Returns:
            Scene dict: ``p2d`` (m, 2), ``p3d`` (n, 3), ``R`` (3, 3), ``t`` (3,), ``K`` (3, 3)
            float64, ``match`` (m,) int64 (-1 = 2D outlier), ``image_size`` (2,) int64 (width,
            height); with ``return_info`` the pair ``(scene, info)``.

        Raises:
            KeyError: ``anchor_id`` is not an anchor. ValueError: no draw in ``max_tries`` gave
            ``min_inliers`` inliers.
        """
        if int(anchor_id) not in self._anchor_pos:
            raise KeyError(f"{self.model.path}: image {anchor_id} cannot anchor a view (unknown, "
                           f"fewer than {self.cfg.min_inliers} matched keypoints or unsupported camera)")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        # The world similarity has a stream of its own (drawn first, always), so turning it off
        # leaves every other draw as it was.
        world_rng = np.random.default_rng(int(rng.integers(2**63)))
        cfg = self.cfg
        a = self._anchor_pos[int(anchor_id)]
        for _ in range(cfg.max_tries):
            out = self._try(a, rng)
            if out is not None:
                break
        else:
            raise ValueError(f"{self.model.path}: no view of image {anchor_id} with >= "
                             f"{cfg.min_inliers} inliers in {cfg.max_tries} draws (smaller "
                             f"offset_frac / rot_deg / roll_deg, or a larger crop?)")
        scene, info = out
        if cfg.similarity:
            s = _draw(world_rng, cfg.world_scale)
            Q = _random_rotation(world_rng)
            T = world_rng.normal(size=3) * s * self.depth[a]
            R = scene["R"] @ Q.T
            scene["p3d"] = s * scene["p3d"] @ Q.T + T
            scene["t"] = s * scene["t"] - R @ T
            scene["R"] = R
            info["world_scale"] = s
        return (scene, info) if return_info else scene

    def _try(self, a: int, rng: np.random.Generator):
        """One draw of a view around image position ``a``; None when it has too few inliers."""
        cfg, model = self.cfg, self.model
        image = model.images[int(self.ids[a])]
        camera = model.cameras[image.camera_id]
        d = self.depth[a]

        # Pose: centre offset, rotation about a random axis, then roll about the optical axis.
        offset = _unit(rng.normal(size=3)) * _draw(rng, cfg.offset_frac) * d
        angle = math.radians(_draw(rng, cfg.rot_deg))
        roll = math.radians(rng.uniform(-cfg.roll_deg, cfg.roll_deg))
        R_delta = _axis_angle(np.array([0.0, 0.0, 1.0]), roll) @ _axis_angle(rng.normal(size=3), angle)
        R = R_delta @ self.R[a]
        c = self.centres[a] + offset
        t = -R @ c

        # Intrinsics: zoom (focal lengths), then a crop window (principal point follows it).
        (fx, fy), (cx, cy) = camera.focal, camera.principal_point
        zoom = _draw(rng, cfg.zoom)
        fx, fy = zoom * fx, zoom * fy
        w = max(8, int(round(_draw(rng, cfg.crop) * camera.width)))
        h = max(8, int(round(_draw(rng, cfg.crop) * camera.height)))
        x0 = float(rng.uniform(0.0, camera.width - w)) if camera.width > w else 0.0
        y0 = float(rng.uniform(0.0, camera.height - h)) if camera.height > h else 0.0
        cx, cy = cx - x0, cy - y0
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])

        # Nearest registered images (the anchor first) by centre distance and axis angle.
        axis = R[2]
        score = (np.linalg.norm(self.centres - c, axis=1) / d
                 + np.arccos(np.clip(self.axes @ axis, -1.0, 1.0)))
        score[a] = -np.inf
        near = np.argsort(score, kind="stable")[: 1 + cfg.k_nearest]

        # Visible candidates: their tracks' points, in front and inside the window.
        rows = np.unique(np.concatenate([self.rows[k] for k in near]))
        X = model.xyz[rows] @ R.T + t
        front = X[:, 2] > cfg.min_depth_frac * d
        z = np.where(front, X[:, 2], 1.0)
        xy = X[:, :2] / z[:, None]
        u, v = fx * xy[:, 0] + cx, fy * xy[:, 1] + cy
        inside = front & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        det = _draw(rng, cfg.detection_rate)
        detected = inside & (rng.uniform(size=len(rows)) < det)
        cand = np.flatnonzero(detected)

        # Counts: k inliers, j 2D outliers, n3 3D outliers, within the caps.
        f2, f3 = _draw(rng, cfg.outlier_frac_2d), _draw(rng, cfg.outlier_frac_3d)
        noise_px = _draw(rng, cfg.noise_px)
        k = len(cand)
        if cfg.max_points_2d is not None:
            k = min(k, int(math.floor(cfg.max_points_2d * (1.0 - f2))))
        if cfg.max_points_3d is not None:
            k = min(k, int(math.floor(cfg.max_points_3d * (1.0 - f3))))
        if k < cfg.min_inliers:
            return None
        keep = np.sort(rng.choice(cand, size=k, replace=False))
        j = int(round(f2 / (1.0 - f2) * k))
        if cfg.max_points_2d is not None:
            j = min(j, cfg.max_points_2d - k)
        n3 = int(round(f3 / (1.0 - f3) * k))
        if cfg.max_points_3d is not None:
            n3 = min(n3, cfg.max_points_3d - k)

        # Inliers: projections plus pixel noise.
        p2d_in = xy[keep] + rng.normal(size=(k, 2)) * noise_px / np.array([fx, fy])
        in_rows = rows[keep]

        # 2D outliers: unmatched keypoints of the anchor (then the neighbours), rotated into the view.
        out2d, from_keypoints = [], 0
        for kk in near:
            if from_keypoints >= j:
                break
            b = self._unmatched_xy(int(kk))
            if len(b) == 0:
                continue
            dirs = np.concatenate([b, np.ones((len(b), 1))], axis=1) @ (R @ self.R[kk].T).T
            ok = dirs[:, 2] > 1e-9
            q = dirs[ok, :2] / dirs[ok, 2:3]
            qu, qv = fx * q[:, 0] + cx, fy * q[:, 1] + cy
            q = q[(qu >= 0) & (qu < w) & (qv >= 0) & (qv < h)]
            take = min(j - from_keypoints, len(q))
            if take:
                out2d.append(q[rng.choice(len(q), size=take, replace=False)])
                from_keypoints += take
        n_uniform = j - from_keypoints
        if n_uniform:
            uv = rng.uniform([0.0, 0.0], [w, h], size=(n_uniform, 2))
            out2d.append(np.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy], axis=1))
        p2d_out = np.concatenate(out2d) if out2d else np.zeros((0, 2))

        # 3D outliers: other model points, uniformly.
        others = np.setdiff1d(np.arange(len(model.xyz)), in_rows, assume_unique=True)
        n3 = max(0, min(n3, len(others)))
        out_rows = rng.choice(others, size=n3, replace=False)

        p2d = np.concatenate([p2d_in, p2d_out])
        p3d = model.xyz[np.concatenate([in_rows, out_rows])].astype(np.float64)
        match = np.concatenate([np.arange(k), np.full(j, -1)]).astype(np.int64)
        p2d, p3d, match = shuffle_sets(p2d, p3d, match, rng)
        scene = {"p2d": p2d, "p3d": p3d, "R": R, "t": t, "match": match, "K": K,
                 "image_size": np.array([w, h], dtype=np.int64)}
        info = {"anchor_id": int(self.ids[a]), "anchor_name": image.name,
                "neighbours": [int(self.ids[kk]) for kk in near[1:]],
                "offset_rel": float(np.linalg.norm(offset) / d),
                "rot_deg": _rot_angle_deg(R, self.R[a]), "zoom": zoom, "crop": (w, h),
                "noise_px": noise_px, "detection_rate": det, "visible": int(inside.sum()),
                "outliers_2d_from_keypoints": from_keypoints, "outliers_2d_uniform": n_uniform,
                "depth": float(d)}
        return scene, info


def make_view(model: ColmapModel, seed: int, index: int, cfg: ViewConfig | Mapping | None = None,
              **ranges: Any) -> dict[str, np.ndarray]:
    """View ``index`` of the stream ``seed`` of ``model`` (:meth:`RealViews.instance`); builds the
    per-model index each call, so keep a :class:`RealViews` for many views."""
    return RealViews(model, cfg, **ranges).instance(seed, index)


def view_stats(scene: Mapping[str, Any]) -> dict[str, float]:
    """Per-instance numbers: set sizes, inliers, outlier fractions, focal length, window size."""
    match = np.asarray(scene["match"])
    m, n = len(scene["p2d"]), len(scene["p3d"])
    k = int(np.sum(match >= 0))
    return {"m": m, "n": n, "k": k, "out2d": 1.0 - k / m, "out3d": 1.0 - k / n,
            "focal": float(scene["K"][0, 0]), "width": float(scene["image_size"][0]),
            "height": float(scene["image_size"][1])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bpnp.data.real_views",
        description="Build views 0..N-1 of one COLMAP model and print their statistics.")
    parser.add_argument("--model", required=True, help="COLMAP sparse model folder")
    parser.add_argument("--num", type=int, default=20, help="number of views")
    parser.add_argument("--seed", type=int, default=0, help="stream seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ViewConfig field (YAML value), repeatable")
    args = parser.parse_args(argv)
    overrides = parse_set_items(args.set)
    try:
        model = read_model(args.model)
        views = RealViews(model, overrides)
        t0 = time.perf_counter()
        pairs = [views.instance(args.seed, i, return_info=True) for i in range(args.num)]
        dt = (time.perf_counter() - t0) / max(args.num, 1)
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = [dict(view_stats(s), offset_rel=i["offset_rel"], rot_deg=i["rot_deg"],
                  kp_out=i["outliers_2d_from_keypoints"] / max(1, s["match"].size - int((s["match"] >= 0).sum())))
             for s, i in pairs]
    cols = {k: np.array([s[k] for s in stats], dtype=np.float64) for k in stats[0]}

    def q(a):
        a = a[np.isfinite(a)]
        return f"mean {a.mean():8.3f}  min {a.min():8.3f}  median {np.median(a):8.3f}  max {a.max():8.3f}"

    print(f"{args.num} views of {args.model} ({len(views.anchors)} anchors of {len(views.ids)} "
          f"images), seed {args.seed}, overrides {overrides}")
    print(f"  2D points m                {q(cols['m'])}")
    print(f"  3D points n                {q(cols['n'])}")
    print(f"  inliers k                  {q(cols['k'])}")
    print(f"  2D outlier fraction        {q(cols['out2d'])}")
    print(f"  3D outlier fraction        {q(cols['out3d'])}")
    print(f"  2D outliers from keypoints {q(cols['kp_out'])}")
    print(f"  focal length (px)          {q(cols['focal'])}")
    print(f"  window width (px)          {q(cols['width'])}")
    print(f"  window height (px)         {q(cols['height'])}")
    print(f"  centre offset / depth      {q(cols['offset_rel'])}")
    print(f"  rotation from anchor (deg) {q(cols['rot_deg'])}")
    print(f"  generation time            {1000 * dt:.1f} ms per view")
    return 0


if __name__ == "__main__":
    sys.exit(main())
