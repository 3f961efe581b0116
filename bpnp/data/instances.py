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

from bpnp.data.cameras import SUPPORTED_MODELS, UnsupportedCameraError
from bpnp.data.colmap import ColmapModel, find_model_files
from bpnp.data.shuffle import shuffle_sets

__all__ = ["instance_from_image", "instances_from_model", "screen_images", "dropped_images_warning"]


def screen_images(model: ColmapModel, min_inliers: int = 4) -> tuple[list[int], list[tuple[int, str, str]]]:
    """Check every image of ``model`` before any instance is built: which give an instance.

    Returns:
        ``(usable image ids, dropped)``, ``dropped`` = ``(image id, name, reason)`` for the images
        with fewer than ``max(min_inliers, 4)`` matched keypoints (keypoints with a 3D point whose
        undistortion converges): their instance cannot be built.

    Raises:
        UnsupportedCameraError: an image's camera model cannot be undistorted; the message names
            the images file, the image (name and id) and its camera (id and model).
    """
    files = None
    need = max(int(min_inliers), 4)
    usable: list[int] = []
    dropped: list[tuple[int, str, str]] = []
    for image_id in model.image_ids:
        image = model.images[image_id]
        camera = model.cameras[image.camera_id]
        if camera.model not in SUPPORTED_MODELS:
            files = files or find_model_files(model.path)
            same = [i for i in model.image_ids if model.images[i].camera_id == camera.id]
            more = f" (and {len(same) - 1} other image(s) of that camera)" if len(same) > 1 else ""
            raise UnsupportedCameraError(
                f"{files['images']}: image '{image.name}' (id {image_id}) uses camera {camera.id} of model "
                f"{camera.model} ({files['cameras']}){more}, which bpnp cannot undistort (supported: "
                f"{', '.join(SUPPORTED_MODELS)}); undistort the model first (colmap image_undistorter) or "
                "remove those images")
        matched = image.point3D_ids >= 0
        count = int(matched.sum())
        reason = None
        if count == 0:
            reason = "no matched keypoints"
        elif count < need:
            reason = f"only {count} matched keypoints, need {need}"
        elif camera.has_distortion:
            _, ok = camera.pixels_to_normalised(image.xys[matched])
            if int(ok.sum()) < need:
                reason = f"only {int(ok.sum())} of its {count} matched keypoints undistort, need {need}"
        if reason is None:
            usable.append(image_id)
        else:
            dropped.append((image_id, image.name, reason))
    return usable, dropped


def dropped_images_warning(model: ColmapModel, dropped: list[tuple[int, str, str]], limit: int = 3) -> str:
    """``warning: <model>: dropped 1 of 7 images (image 'x.jpg' id 3: no matched keypoints)``."""
    shown = "; ".join(f"image '{name}' id {i}: {why}" for i, name, why in dropped[:limit])
    if len(dropped) > limit:
        shown += f"; ... {len(dropped) - limit} more"
    return f"warning: {model.path}: dropped {len(dropped)} of {len(model.images)} images ({shown})"


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
    outliers_per_inlier_2d: float | None = None,
) -> dict[str, np.ndarray]:
    """Build the blind-PnP instance of one registered image.

    Args:
        model: a model from :func:`bpnp.data.colmap.read_model`.
        image_id: COLMAP id of the image.
        max_points_2d: cap on the number of 2D points (None = all keypoints).
        max_points_3d: cap on the number of 3D points (None = no cap).
        outlier_frac_3d: target fraction of the 3D set that is outliers, in [0, 1).
        rng: a ``numpy.random.Generator`` or a seed for one.
        outliers_per_inlier_2d: keep at most this many unmatched keypoints per matched one
            (before the ``max_points_2d`` cap, which keeps the resulting ratio); None = as the
            image has them. The real-data protocols of docs/results.md: 0.25 ("easy").

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

    # Target counts: k inlier and j outlier keypoints, same ratio as the image has (or as
    # outliers_per_inlier_2d allows).
    k, j = len(inl), len(out)
    if outliers_per_inlier_2d is not None:
        if not outliers_per_inlier_2d >= 0:
            raise ValueError(f"outliers_per_inlier_2d must be >= 0, got {outliers_per_inlier_2d}")
        j = min(j, int(round(outliers_per_inlier_2d * k)))
    ratio = k / (k + j)
    j_per_k = j / k
    if max_points_2d is not None and k + j > max_points_2d:
        k = max(4, int(round(max_points_2d * ratio)))
        j = max_points_2d - k
    if max_points_3d is not None:
        # 3D inliers <= kept inlier keypoints (duplicates aside), so budget them first.
        k_cap = max(4, int(np.floor(max_points_3d * (1.0 - outlier_frac_3d))))
        if k > k_cap:
            j = int(round(k_cap * j_per_k))
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
    outliers_per_inlier_2d: float | None = None,
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """All images of a model, in image-id order, as ``(image_id, scene)`` pairs.

    Image ``image_id`` uses ``numpy.random.default_rng([seed, image_id])``, so the result for one
    image does not depend on which other images are built.
    """
    return [
        (i, instance_from_image(model, i, max_points_2d=max_points_2d,
                                max_points_3d=max_points_3d, outlier_frac_3d=outlier_frac_3d,
                                outliers_per_inlier_2d=outliers_per_inlier_2d,
                                rng=np.random.default_rng([seed, i])))
        for i in model.image_ids
    ]
