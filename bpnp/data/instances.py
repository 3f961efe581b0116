"""Turn one image of a COLMAP model into a blind-PnP instance (a scene dict).

For image ``i``:

- **2D points**: its keypoints, undistorted to camera-normalised coordinates. Keypoints with a
  3D point id are inliers; those with id -1 are real 2D outliers (detected, never triangulated).
- **3D points**: the model points that this image's (kept) inlier keypoints observe, plus other
  model points drawn uniformly at random as 3D outliers, so that a fraction ``outlier_frac_3d``
  of the 3D set is outliers (capped by what the model holds).
- **Subsampling** (``max_points_2d``, ``max_points_3d``): inlier and outlier keypoints are
  subsampled in proportion, so the image's 2D inlier ratio is kept; the 3D budget is met by
  lowering the number of inlier keypoints (and outliers with them), never by dropping 3D points
  that a kept keypoint observes.
- **Ground truth**: the model's pose ``x_cam = R X + t``, ``K`` (pinhole part) and image size.

Keypoints whose undistortion does not converge (far outside the lens model's valid range) are
dropped. Randomness comes only from the ``rng`` argument.
"""

from __future__ import annotations

import numpy as np

from bpnp.data.colmap import ColmapModel
from bpnp.data.shuffle import shuffle_sets

__all__ = ["instance_from_image", "instances_from_model"]


def _check_frac(name: str, v: float) -> None:
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {v}")


def instance_from_image(
    model: ColmapModel,
    image_id: int,
    *,
    max_points_2d: int | None = None,
    max_points_3d: int | None = None,
    outlier_frac_3d: float = 0.5,
    rng: np.random.Generator | int | None = 0,
) -> dict[str, np.ndarray]:
    """Build the blind-PnP instance of one registered image.

    Args:
        model: a model from :func:`bpnp.data.colmap.read_model`.
        image_id: COLMAP id of the image.
        max_points_2d: cap on the number of 2D points (None = all keypoints).
        max_points_3d: cap on the number of 3D points (None = no cap).
        outlier_frac_3d: target fraction of the 3D set that is outliers, in [0, 1).
        rng: a ``numpy.random.Generator`` or a seed for one.

    Returns:
        Scene dict: ``p2d`` (m, 2), ``p3d`` (n, 3), ``R`` (3, 3), ``t`` (3,), ``K`` (3, 3) float64,
        ``match`` (m,) int64 (-1 = 2D outlier), ``image_size`` (2,) int64 (width, height).

    Raises:
        KeyError: unknown image id. ValueError: bad arguments, or fewer than 4 inlier keypoints.
        bpnp.data.cameras.UnsupportedCameraError: a camera model that cannot be undistorted.
    """
    if image_id not in model.images:
        raise KeyError(f"{model.path}: no image with id {image_id}")
    _check_frac("outlier_frac_3d", outlier_frac_3d)
    for name, v in (("max_points_2d", max_points_2d), ("max_points_3d", max_points_3d)):
        if v is not None and v < 8:
            raise ValueError(f"{name} must be >= 8 (or None), got {v}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    image = model.images[image_id]
    camera = model.cameras[image.camera_id]

    xy, ok = camera.pixels_to_normalised(image.xys)
    ids = image.point3D_ids
    inl = np.flatnonzero(ok & (ids >= 0))
    out = np.flatnonzero(ok & (ids < 0))
    if len(inl) < 4:
        raise ValueError(f"{model.path}: image {image_id} ({image.name}) has only {len(inl)} "
                         "keypoints with a 3D point (need >= 4)")

    # Target counts: k inlier and j outlier keypoints, same ratio as the image has.
    ratio = len(inl) / (len(inl) + len(out))
    k, j = len(inl), len(out)
    if max_points_2d is not None and k + j > max_points_2d:
        k = max(4, int(round(max_points_2d * ratio)))
        j = max_points_2d - k
    if max_points_3d is not None:
        # 3D inliers <= kept inlier keypoints (duplicates aside), so budget them first.
        k_cap = max(4, int(np.floor(max_points_3d * (1.0 - outlier_frac_3d))))
        if k > k_cap:
            j = int(round(k_cap * len(out) / len(inl))) if len(inl) else 0
            k = k_cap
    j = min(j, len(out))
    keep_in = np.sort(rng.choice(inl, size=k, replace=False))
    keep_out = np.sort(rng.choice(out, size=j, replace=False))

    # 3D inliers: the distinct points the kept inlier keypoints observe.
    seen_ids, inverse = np.unique(ids[keep_in], return_inverse=True)
    seen_rows = model.rows_of(seen_ids)
    n_in = len(seen_rows)
    n_out = int(round(outlier_frac_3d / (1.0 - outlier_frac_3d) * n_in))
    if max_points_3d is not None:
        n_out = min(n_out, max(max_points_3d - n_in, 0))
    # Outliers: any other model point, including ones this image sees but whose keypoints were
    # subsampled away (they are unobserved in this instance, hence outliers by definition).
    others = np.setdiff1d(np.arange(len(model.point_ids)), seen_rows, assume_unique=True)
    n_out = min(n_out, len(others))
    out_rows = rng.choice(others, size=n_out, replace=False)

    p3d = model.xyz[np.concatenate([seen_rows, out_rows])]
    p2d = np.concatenate([xy[keep_in], xy[keep_out]])
    match = np.concatenate([inverse.reshape(-1), np.full(len(keep_out), -1)]).astype(np.int64)

    p2d, p3d, match = shuffle_sets(p2d, p3d, match, rng)
    return {
        "p2d": p2d,
        "p3d": p3d,
        "R": image.R,
        "t": np.asarray(image.tvec, dtype=np.float64),
        "match": match,
        "K": camera.K,
        "image_size": np.array([camera.width, camera.height], dtype=np.int64),
    }


def instances_from_model(
    model: ColmapModel,
    *,
    max_points_2d: int | None = None,
    max_points_3d: int | None = None,
    outlier_frac_3d: float = 0.5,
    seed: int = 0,
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """All images of a model, in image-id order, as ``(image_id, scene)`` pairs.

    Image ``image_id`` uses ``numpy.random.default_rng([seed, image_id])``, so the result for one
    image does not depend on which other images are built.
    """
    return [
        (i, instance_from_image(model, i, max_points_2d=max_points_2d,
                                max_points_3d=max_points_3d, outlier_frac_3d=outlier_frac_3d,
                                rng=np.random.default_rng([seed, i])))
        for i in model.image_ids
    ]
