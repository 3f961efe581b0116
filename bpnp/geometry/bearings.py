"""Bearing vectors, rigid transforms and pinhole projection in camera-normalised coordinates.

Conventions: ``x_cam = R X + t`` (world to camera); camera-normalised 2D points
``(x, y) = dehomog(K^-1 [u v 1]^T)``; bearings ``normalize([x, y, 1])`` (unit vectors with
positive z, i.e. in front of the camera).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import convert_points_from_homogeneous

from bpnp.geometry.rotations import _check_float, _check_trailing

__all__ = [
    "to_bearings",
    "bearings_to_normalised",
    "transform",
    "project",
    "normalise_keypoints",
    "denormalise_keypoints",
]


def to_bearings(p2d: torch.Tensor) -> torch.Tensor:
    r"""Unit bearing vectors of camera-normalised image points: ``normalize([x, y, 1])``.

    Args:
        p2d: camera-normalised points of shape :math:`(*, 2)` (not pixels; see
            :func:`normalise_keypoints`).

    Returns:
        unit vectors of shape :math:`(*, 3)` with positive z. Always finite for finite input
        (the norm is at least 1).

    Raises:
        TypeError: if ``p2d`` is not a floating-point tensor.
        ValueError: if the last dimension is not 2.

    Example:
        >>> to_bearings(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        tensor([[0.0000, 0.0000, 1.0000],
                [0.7071, 0.0000, 0.7071]])
    """
    _check_trailing(p2d, "p2d", (2,))
    _check_float(p2d, "p2d")
    return F.normalize(torch.cat([p2d, torch.ones_like(p2d[..., :1])], dim=-1), dim=-1)


def bearings_to_normalised(b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Camera-normalised image points of bearing vectors (inverse of :func:`to_bearings`).

    Same rule as :func:`project`: divides by z where ``|z| > eps``; see there for ``z <= 0``.

    Args:
        b: bearing (or any direction) vectors of shape :math:`(*, 3)`; need not be unit.
        eps: threshold on ``|z|`` below which ``(x, y)`` is returned undivided.

    Returns:
        points of shape :math:`(*, 2)`.

    Raises:
        TypeError: if ``b`` is not a floating-point tensor.
        ValueError: if the last dimension is not 3.

    Example:
        >>> bearings_to_normalised(to_bearings(torch.tensor([0.5, -0.25])))
        tensor([ 0.5000, -0.2500])
    """
    _check_trailing(b, "b", (3,))
    _check_float(b, "b")
    return project(b, eps=eps)


def transform(R: torch.Tensor, t: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    r"""Rigid transform of point sets: ``x = R X + t`` for every point.

    Args:
        R: rotations of shape :math:`(*, 3, 3)`.
        t: translations of shape :math:`(*, 3)`.
        X: points of shape :math:`(*, N, 3)`. The batch dims ``*`` of the three inputs must
            broadcast.

    Returns:
        transformed points of shape :math:`(*, N, 3)`.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong trailing shapes or batch shapes that do not broadcast.

    Example:
        >>> R = torch.eye(3)[None]
        >>> t = torch.tensor([[0.0, 0.0, 2.0]])
        >>> transform(R, t, torch.tensor([[[1.0, 1.0, 1.0]]]))
        tensor([[[1., 1., 3.]]])
    """
    _check_trailing(R, "R", (3, 3))
    _check_trailing(t, "t", (3,))
    _check_trailing(X, "X", (3,), min_ndim=2, expected="(*, N, 3)")
    for name, x in (("R", R), ("t", t), ("X", X)):
        _check_float(x, name)
    try:
        torch.broadcast_shapes(R.shape[:-2], t.shape[:-1], X.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            "batch shapes of R (*, 3, 3), t (*, 3), X (*, N, 3) must broadcast, got "
            f"{tuple(R.shape)}, {tuple(t.shape)}, {tuple(X.shape)}"
        ) from exc
    return X @ R.transpose(-1, -2) + t.unsqueeze(-2)


def project(x_cam: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Pinhole projection of camera-frame points to camera-normalised coordinates, ``(x/z, y/z)``.

    Behaviour at ``z <= 0`` (follows :func:`kornia.geometry.conversions.convert_points_from_homogeneous`,
    which is used here, and OpenCV):

    - ``z < -eps`` (behind the camera): divided by ``z`` like any point, so the point is mirrored
      through the centre of projection. Projection does not check cheirality; callers that care
      test ``x_cam[..., 2] > 0`` (RANSAC and the metrics do).
    - ``|z| <= eps`` (on the principal plane): ``(x, y)`` is returned undivided, finite but
      meaningless.

    Args:
        x_cam: points in the camera frame of shape :math:`(*, 3)`, e.g. :math:`(B, N, 3)`.
        eps: threshold on ``|z|``.

    Returns:
        points of shape :math:`(*, 2)`.

    Raises:
        TypeError: if ``x_cam`` is not a floating-point tensor.
        ValueError: if the last dimension is not 3.

    Example:
        >>> project(torch.tensor([[[2.0, 4.0, 2.0], [1.0, 1.0, 0.0]]]))
        tensor([[[1., 2.],
                 [1., 1.]]])
    """
    _check_trailing(x_cam, "x_cam", (3,))
    _check_float(x_cam, "x_cam")
    # kornia requires rank >= 2; a single point is handled by adding a dim.
    if x_cam.ndim == 1:
        return convert_points_from_homogeneous(x_cam[None], eps=eps)[0]
    return convert_points_from_homogeneous(x_cam, eps=eps)


def normalise_keypoints(uv: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    r"""Pixel keypoints to camera-normalised coordinates: ``dehomog(K^-1 [u v 1]^T)``.

    Uses the full ``K`` (skew and ``K[2, 2]`` included), unlike
    :func:`kornia.geometry.conversions.normalize_points_with_intrinsics`, which ignores the skew
    entry; the scene-file contract defines ``p2d`` with the full inverse. Undistortion is not
    done here.

    Args:
        uv: pixel coordinates of shape :math:`(*, N, 2)`.
        K: invertible intrinsic matrices of shape :math:`(*, 3, 3)`; batch dims broadcast with
            those of ``uv``.

    Returns:
        camera-normalised points of shape :math:`(*, N, 2)`.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong shapes.

    Example:
        >>> K = torch.tensor([[100.0, 0.0, 320.0], [0.0, 200.0, 240.0], [0.0, 0.0, 1.0]])
        >>> normalise_keypoints(torch.tensor([[420.0, 440.0]]), K)
        tensor([[1., 1.]])
    """
    _check_trailing(uv, "uv", (2,), min_ndim=2, expected="(*, N, 2)")
    _check_trailing(K, "K", (3, 3))
    _check_float(uv, "uv")
    _check_float(K, "K")
    try:
        batch = torch.broadcast_shapes(uv.shape[:-2], K.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"batch shapes of uv (*, N, 2) and K (*, 3, 3) must broadcast, got {tuple(uv.shape)} "
            f"and {tuple(K.shape)}"
        ) from exc
    hom = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)  # (*, N, 3)
    rhs = hom.transpose(-1, -2).expand(*batch, 3, uv.shape[-2])
    # A solve rather than an explicit K^-1: better conditioned for any (even skewed) K.
    x = torch.linalg.solve(K.expand(*batch, 3, 3), rhs)
    return project(x.transpose(-1, -2))


def denormalise_keypoints(xy: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    r"""Camera-normalised points to pixels: ``dehomog(K [x y 1]^T)`` (inverse of :func:`normalise_keypoints`).

    Args:
        xy: camera-normalised points of shape :math:`(*, N, 2)`.
        K: intrinsic matrices of shape :math:`(*, 3, 3)`; batch dims broadcast with ``xy``'s.

    Returns:
        pixel coordinates of shape :math:`(*, N, 2)`.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: on wrong shapes.

    Example:
        >>> K = torch.tensor([[100.0, 0.0, 320.0], [0.0, 200.0, 240.0], [0.0, 0.0, 1.0]])
        >>> denormalise_keypoints(torch.tensor([[1.0, 1.0]]), K)
        tensor([[420., 440.]])
    """
    _check_trailing(xy, "xy", (2,), min_ndim=2, expected="(*, N, 2)")
    _check_trailing(K, "K", (3, 3))
    _check_float(xy, "xy")
    _check_float(K, "K")
    try:
        torch.broadcast_shapes(xy.shape[:-2], K.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"batch shapes of xy (*, N, 2) and K (*, 3, 3) must broadcast, got {tuple(xy.shape)} "
            f"and {tuple(K.shape)}"
        ) from exc
    hom = torch.cat([xy, torch.ones_like(xy[..., :1])], dim=-1)
    return project(hom @ K.transpose(-1, -2))
