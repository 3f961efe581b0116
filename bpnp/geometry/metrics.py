"""Pose-error metrics (the definitions are a contract: docs/metrics.md).

Per instance, for an estimate ``(R, t)`` against ``(R_gt, t_gt)`` (world-to-camera,
``x_cam = R X + t``):

- ``rot_err_deg = degrees(acos(clamp((tr(R^T R_gt) - 1) / 2, -1, 1)))``
- ``t_err = ||t - t_gt||``
- ``center_err_rel = ||c - c_gt|| / median depth of the matched 3D points in the true camera``,
  ``c = -R^T t``
- ``success = rot_err_deg < 5 and center_err_rel < 0.05``

All metrics are computed in float64 and returned as float64 (bool for ``success``), whatever
the input dtype, so that the same estimate gives the same numbers on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bpnp.geometry.rotations import _check_float, _check_tensor, _check_trailing

__all__ = ["pose_errors", "median_matched_depth", "success_rate_at", "error_auc", "auc"]

#: Rotation error (degrees) given to a non-finite estimate: the largest possible geodesic
#: error, so that it is a failure at every threshold yet keeps CDFs and means finite.
NONFINITE_ROT_ERR_DEG = 180.0


def _masked_median(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Median over the last dim of the entries where ``valid``; NaN for an empty row.

    Follows numpy's definition (mean of the two middle values for an even count), not
    ``torch.median``, which returns the lower of the two.
    """
    if values.shape[-1] == 0:
        return values.new_full(values.shape[:-1], math.nan)
    filled = torch.where(valid, values, torch.full_like(values, math.inf))
    s, _ = filled.sort(dim=-1)
    k = valid.sum(dim=-1)
    lo = ((k - 1).clamp(min=0) // 2).unsqueeze(-1)
    hi = (k // 2).clamp(max=values.shape[-1] - 1).unsqueeze(-1)
    med = 0.5 * (s.gather(-1, lo) + s.gather(-1, hi)).squeeze(-1)
    return torch.where(k > 0, med, torch.full_like(med, math.nan))


def median_matched_depth(
    R_gt: torch.Tensor,
    t_gt: torch.Tensor,
    p3d: torch.Tensor,
    match: torch.Tensor,
    mask2d: torch.Tensor,
    mask3d: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Median depth (camera z) of the matched 3D points in the true camera: the scale of
    ``center_err_rel``.

    The matched points are ``p3d[match[i]]`` for the 2D points ``i`` with ``match[i] >= 0`` and
    ``mask2d[i]`` (and ``mask3d[match[i]]`` when given); a 3D point matched by several 2D points
    counts once per match. If an item has no such point, the median over all its real 3D points
    (``mask3d``, or all if ``mask3d`` is None) is used instead. Non-finite depths are ignored.
    The median is numpy's (mean of the two middle values for an even count).

    Args:
        R_gt: true rotations of shape :math:`(B, 3, 3)`.
        t_gt: true translations of shape :math:`(B, 3)`.
        p3d: 3D points (world frame) of shape :math:`(B, N, 3)`.
        match: index into ``p3d`` per 2D point, shape :math:`(B, M)`, integer, ``-1`` = none.
        mask2d: real 2D points, shape :math:`(B, M)`, bool.
        mask3d: real 3D points, shape :math:`(B, N)`, bool, or None (all real).

    Returns:
        depths of shape :math:`(B,)`, float64; NaN where an item has no real 3D point at all.

    Raises:
        TypeError, ValueError: on wrong types, shapes or out-of-range ``match`` indices.

    Example:
        >>> p3d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 3.0], [0.0, 0.0, 9.0]]])
        >>> match = torch.tensor([[0, 1, -1]])
        >>> mask2d = torch.tensor([[True, True, True]])
        >>> median_matched_depth(torch.eye(3)[None], torch.zeros(1, 3), p3d, match, mask2d)
        tensor([2.], dtype=torch.float64)
    """
    _validate_scene(R_gt, t_gt, p3d, match, mask2d, mask3d, prefix="")
    return _median_depth(R_gt, t_gt, p3d, match, mask2d, mask3d)


def _median_depth(R_gt, t_gt, p3d, match, mask2d, mask3d) -> torch.Tensor:
    R_gt, t_gt, p3d = (x.to(torch.float64) for x in (R_gt, t_gt, p3d))
    n = p3d.shape[1]
    real3 = torch.ones(p3d.shape[:2], dtype=torch.bool, device=p3d.device) if mask3d is None else mask3d
    depth3 = (p3d @ R_gt[:, 2:3, :].transpose(-1, -2)).squeeze(-1) + t_gt[:, 2:3]  # (B, N)
    if n == 0:
        return torch.full(p3d.shape[:1], math.nan, dtype=torch.float64, device=p3d.device)
    idx = match.long().clamp(min=0)
    matched = (match >= 0) & mask2d & real3.gather(1, idx)
    d_matched = depth3.gather(1, idx)
    med_matched = _masked_median(d_matched, matched & torch.isfinite(d_matched))
    med_all = _masked_median(depth3, real3 & torch.isfinite(depth3))
    return torch.where(torch.isnan(med_matched), med_all, med_matched)


def _validate_scene(R_gt, t_gt, p3d, match, mask2d, mask3d, prefix: str) -> int:
    _check_trailing(R_gt, f"{prefix}R_gt", (3, 3), min_ndim=3, expected="(B, 3, 3)")
    _check_trailing(t_gt, f"{prefix}t_gt", (3,), min_ndim=2, expected="(B, 3)")
    _check_trailing(p3d, f"{prefix}p3d", (3,), min_ndim=3, expected="(B, N, 3)")
    for name, x in (("R_gt", R_gt), ("t_gt", t_gt), ("p3d", p3d)):
        _check_float(x, name)
    _check_tensor(match, "match")
    _check_tensor(mask2d, "mask2d")
    if R_gt.ndim != 3 or t_gt.ndim != 2 or p3d.ndim != 3:
        raise ValueError(
            "expected R_gt (B, 3, 3), t_gt (B, 3), p3d (B, N, 3), got "
            f"{tuple(R_gt.shape)}, {tuple(t_gt.shape)}, {tuple(p3d.shape)}"
        )
    b = R_gt.shape[0]
    if t_gt.shape[0] != b or p3d.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: R_gt {tuple(R_gt.shape)}, t_gt {tuple(t_gt.shape)}, p3d {tuple(p3d.shape)}"
        )
    if match.ndim != 2 or match.shape[0] != b or match.dtype.is_floating_point or match.dtype == torch.bool:
        raise ValueError(
            f"match must be an integer tensor of shape (B, M) with B={b}, got {tuple(match.shape)} {match.dtype}"
        )
    if mask2d.shape != match.shape or mask2d.dtype != torch.bool:
        raise ValueError(
            f"mask2d must be a bool tensor of shape {tuple(match.shape)}, got {tuple(mask2d.shape)} {mask2d.dtype}"
        )
    if mask3d is not None:
        _check_tensor(mask3d, "mask3d")
        if mask3d.shape != p3d.shape[:2] or mask3d.dtype != torch.bool:
            raise ValueError(
                f"mask3d must be a bool tensor of shape {tuple(p3d.shape[:2])}, "
                f"got {tuple(mask3d.shape)} {mask3d.dtype}"
            )
    n = p3d.shape[1]
    used = match[mask2d]
    if used.numel() > 0 and (bool((used < -1).any()) or bool((used >= n).any())):
        raise ValueError(f"match entries must lie in [-1, {n - 1}] (p3d has N={n} points)")
    return b


def pose_errors(
    R: torch.Tensor,
    t: torch.Tensor,
    R_gt: torch.Tensor,
    t_gt: torch.Tensor,
    p3d: torch.Tensor,
    match: torch.Tensor,
    mask2d: torch.Tensor,
    mask3d: torch.Tensor | None = None,
    *,
    rot_threshold_deg: float = 5.0,
    center_threshold_rel: float = 0.05,
) -> dict[str, torch.Tensor]:
    r"""Per-instance pose errors and success, exactly as docs/metrics.md defines them.

    - ``rot_err_deg = degrees(acos(clamp((tr(R^T R_gt) - 1) / 2, -1, 1)))``, in [0, 180].
    - ``t_err = ||t - t_gt||`` (units of the scene).
    - ``center_err_rel = ||c - c_gt|| / d``, ``c = -R^T t``, with ``d`` the median depth of the
      matched 3D points in the true camera (see :func:`median_matched_depth`, including its
      fallback to all real 3D points when nothing is matched).
    - ``success = (rot_err_deg < rot_threshold_deg) & (center_err_rel < center_threshold_rel)``
      (strict inequalities).

    Edge cases, never an exception:

    - a non-finite estimate (any NaN/Inf in ``R`` or ``t``) gets ``rot_err_deg = 180``,
      ``t_err = center_err_rel = inf`` and ``success = False``;
    - if ``d`` is not a positive finite number (no real 3D point, or the points are behind the
      true camera), ``center_err_rel = inf`` and the instance fails.

    Args:
        R: estimated rotations of shape :math:`(B, 3, 3)`.
        t: estimated translations of shape :math:`(B, 3)`.
        R_gt: true rotations of shape :math:`(B, 3, 3)`.
        t_gt: true translations of shape :math:`(B, 3)`.
        p3d: 3D points (world frame) of shape :math:`(B, N, 3)`.
        match: index into ``p3d`` per 2D point, shape :math:`(B, M)`, integer, ``-1`` = none.
        mask2d: real 2D points, shape :math:`(B, M)`, bool.
        mask3d: real 3D points, shape :math:`(B, N)`, bool, or None (all real).
        rot_threshold_deg: success threshold on ``rot_err_deg``, degrees.
        center_threshold_rel: success threshold on ``center_err_rel``.

    Returns:
        dict of :math:`(B,)` tensors: ``rot_err_deg``, ``t_err``, ``center_err_rel`` (float64),
        ``success`` (bool), and the diagnostics ``depth_ref`` (float64, the ``d`` used) and
        ``finite`` (bool, whether the estimate was finite).

    Raises:
        TypeError, ValueError: on wrong types or shapes (naming the received shape), or
            ``match`` indices outside ``[-1, N-1]``.

    Example:
        >>> from bpnp.geometry.rotations import so3_exp
        >>> R_gt = torch.eye(3)[None]
        >>> R = so3_exp(torch.tensor([[0.0, 0.0, math.radians(10.0)]]))
        >>> p3d = torch.tensor([[[0.0, 0.0, 4.0]]])
        >>> out = pose_errors(R, torch.zeros(1, 3), R_gt, torch.zeros(1, 3), p3d,
        ...                   torch.tensor([[0]]), torch.tensor([[True]]))
        >>> round(out["rot_err_deg"].item(), 4), out["success"].item()
        (10.0, False)
    """
    b = _validate_scene(R_gt, t_gt, p3d, match, mask2d, mask3d, prefix="")
    _check_trailing(R, "R", (3, 3), min_ndim=3, expected="(B, 3, 3)")
    _check_trailing(t, "t", (3,), min_ndim=2, expected="(B, 3)")
    _check_float(R, "R")
    _check_float(t, "t")
    if R.shape != (b, 3, 3) or t.shape != (b, 3):
        raise ValueError(f"R must have shape ({b}, 3, 3) and t ({b}, 3), got {tuple(R.shape)} and {tuple(t.shape)}")

    f64 = torch.float64
    R, t, R_gt, t_gt = (x.to(f64) for x in (R, t, R_gt, t_gt))
    finite = torch.isfinite(R).flatten(1).all(1) & torch.isfinite(t).all(1)
    # Zero the non-finite estimates so no NaN flows through the arithmetic; they are overwritten.
    R_s = torch.where(finite[:, None, None], R, torch.zeros_like(R))
    t_s = torch.where(finite[:, None], t, torch.zeros_like(t))

    cos = ((R_s.transpose(-1, -2) @ R_gt).diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    rot_err_deg = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    t_err = (t_s - t_gt).norm(dim=-1)
    c = -(R_s.transpose(-1, -2) @ t_s.unsqueeze(-1)).squeeze(-1)
    c_gt = -(R_gt.transpose(-1, -2) @ t_gt.unsqueeze(-1)).squeeze(-1)
    depth = _median_depth(R_gt, t_gt, p3d, match, mask2d, mask3d)
    depth_ok = torch.isfinite(depth) & (depth > 0)
    center_err_rel = (c - c_gt).norm(dim=-1) / torch.where(depth_ok, depth, torch.ones_like(depth))

    inf = torch.full_like(t_err, math.inf)
    center_err_rel = torch.where(depth_ok & finite, center_err_rel, inf)
    rot_err_deg = torch.where(finite, rot_err_deg, torch.full_like(rot_err_deg, NONFINITE_ROT_ERR_DEG))
    t_err = torch.where(finite, t_err, inf)
    success = finite & (rot_err_deg < rot_threshold_deg) & (center_err_rel < center_threshold_rel)
    return {
        "rot_err_deg": rot_err_deg,
        "t_err": t_err,
        "center_err_rel": center_err_rel,
        "success": success,
        "depth_ref": depth,
        "finite": finite,
    }


def success_rate_at(
    rot_err_deg: torch.Tensor,
    center_err_rel: torch.Tensor,
    thresholds: Sequence[tuple[float, float]],
) -> torch.Tensor:
    r"""Fraction of instances with ``rot_err_deg < r`` and ``center_err_rel < c`` for each ``(r, c)``.

    Strict inequalities, as in the success contract; NaN errors count as failures.

    Args:
        rot_err_deg: rotation errors in **degrees**, shape :math:`(N,)`, ``N >= 1``.
        center_err_rel: relative centre errors, shape :math:`(N,)`.
        thresholds: sequence of ``(rot_deg, center_rel)`` pairs, e.g. ``[(5, 0.05), (10, 0.1)]``.

    Returns:
        success rates in [0, 1], float64, shape :math:`(T,)` in the order of ``thresholds``.

    Raises:
        TypeError: if an error tensor is not a tensor.
        ValueError: on shapes that are not ``(N,)`` with ``N >= 1``, or malformed thresholds.

    Example:
        >>> success_rate_at(torch.tensor([1.0, 7.0]), torch.tensor([0.01, 0.01]), [(5, 0.05), (10, 0.05)])
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    _check_tensor(rot_err_deg, "rot_err_deg")
    _check_tensor(center_err_rel, "center_err_rel")
    if rot_err_deg.ndim != 1 or rot_err_deg.shape[0] < 1 or center_err_rel.shape != rot_err_deg.shape:
        raise ValueError(
            "rot_err_deg and center_err_rel must both have shape (N,) with N >= 1, got "
            f"{tuple(rot_err_deg.shape)} and {tuple(center_err_rel.shape)}"
        )
    pairs = [tuple(p) for p in thresholds]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"thresholds must be (rot_deg, center_rel) pairs, got {thresholds!r}")
    r = rot_err_deg.to(torch.float64)
    c = center_err_rel.to(torch.float64)
    th = torch.tensor(pairs, dtype=torch.float64, device=r.device).reshape(-1, 2)
    ok = (r[None, :] < th[:, :1]) & (c[None, :] < th[:, 1:])
    return ok.to(torch.float64).mean(dim=1)


def error_auc(errors_deg: torch.Tensor, max_threshold_deg: float | Sequence[float]) -> torch.Tensor:
    r"""Area under the recall-vs-threshold curve of an error, up to a threshold, normalised to [0, 1].

    The usual definition of pose-estimation papers (e.g. SuperGlue, LoFTR ``pose_auc``): sort the
    errors, recall at error ``e_k`` is ``k / N``; integrate recall over ``[0, T]`` with the
    trapezoid rule on the points ``(0, 0), (e_1, 1/N), ...``, closed at ``T`` with the recall
    reached there, and divide by ``T``. Errors ``>= T`` never count; non-finite errors count as
    failures. AUC = 1 only if every error is 0.

    Args:
        errors_deg: errors in **degrees** (typically ``rot_err_deg``), shape :math:`(N,)`,
            ``N >= 1``.
        max_threshold_deg: ``T`` (e.g. 5, 10, 20 degrees), or a sequence of them.

    Returns:
        float64 scalar tensor, or shape :math:`(T,)` for a sequence of thresholds.

    Raises:
        TypeError: if ``errors_deg`` is not a tensor.
        ValueError: if it is not of shape ``(N,)`` with ``N >= 1``, or a threshold is not > 0.

    Example:
        >>> # trapezoids: recall 1/2 at 0 rising to 1 at 5 (area 3.75), then 1 up to 10 (area 5)
        >>> error_auc(torch.tensor([0.0, 5.0]), 10.0)
        tensor(0.8750, dtype=torch.float64)
    """
    _check_tensor(errors_deg, "errors_deg")
    if errors_deg.ndim != 1 or errors_deg.shape[0] < 1:
        raise ValueError(f"errors_deg must have shape (N,) with N >= 1, got {tuple(errors_deg.shape)}")
    scalar = isinstance(max_threshold_deg, (int, float))
    ths = [float(max_threshold_deg)] if scalar else [float(x) for x in max_threshold_deg]  # type: ignore[union-attr]
    if len(ths) == 0 or any(not (x > 0 and math.isfinite(x)) for x in ths):
        raise ValueError(f"max_threshold_deg must be > 0 and finite, got {max_threshold_deg!r}")
    e = errors_deg.detach().to(torch.float64)
    e = torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf)).clamp(min=0.0)
    e, _ = e.sort()
    n = e.shape[0]
    recall = torch.arange(1, n + 1, dtype=torch.float64, device=e.device) / n
    e = torch.cat([e.new_zeros(1), e])
    recall = torch.cat([recall.new_zeros(1), recall])
    out = []
    for T in ths:
        last = int(torch.searchsorted(e, torch.tensor(T, dtype=torch.float64, device=e.device)))
        r = torch.cat([recall[:last], recall[last - 1 : last]])
        x = torch.cat([e[:last], e.new_tensor([T])])
        out.append(torch.trapezoid(r, x) / T)
    res = torch.stack(out)
    return res[0] if scalar else res


# Name used in docs/INTERFACES.md.
auc = error_auc
