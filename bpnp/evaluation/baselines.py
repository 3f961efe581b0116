r"""Baselines run on the same instances as the model, sharing its RANSAC settings and its
pose-refinement node, so that the only thing that differs is where the correspondences come from.

- **oracle**: the true correspondences (``match``), uniformly weighted, then RANSAC and the
  refinement node: the accuracy limit of the geometric back end (noise only, no matching error).
- **ransac**: the model's own RANSAC pose ``(R0, t0)`` before refinement (no extra compute; it is
  read off the model output in :mod:`bpnp.evaluation.runner`).
- **hungarian**: a one-to-one assignment on the network's cost ``M``
  (:func:`scipy.optimize.linear_sum_assignment`), then RANSAC and the refinement node. The pairs are
  weighted by the Sinkhorn plan ``P`` (renormalised) or uniformly (``weights="uniform"``).

Both solvers work on the **reduced** problem of their ``k`` pairs: bearings ``(1, k, 3)``, points
``(1, k, 3)`` and a diagonal weight matrix ``W = diag(w)``. The refinement objective
``sum_ij W_ij rho(1 - b_i . N(R p_j + t))`` and the RANSAC candidate set (entries with ``W > 0``)
are exactly those of the full ``(m, n)`` matrix that is zero off the pairs, at ``O(k^2)`` instead
of ``O(m n)`` memory, which matters for real scenes with thousands of points per side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from bpnp.geometry.bearings import to_bearings
from bpnp.geometry.ransac import RansacStatus, ransac_pnp
from bpnp.nodes import PnPRefine

__all__ = [
    "BaselinePose",
    "true_pairs",
    "hungarian_pairs",
    "pose_from_pairs",
    "oracle_pose",
    "hungarian_pose",
]


@dataclass
class BaselinePose:
    """A pose estimate of one instance plus its diagnostics.

    Attributes:
        R: (3, 3) float64 rotation, world to camera.
        t: (3,) float64 translation.
        ransac_status: :class:`bpnp.geometry.ransac.RansacStatus` code (0 = ok).
        ransac_inliers: inlier pairs of the RANSAC pose.
        pnp_status: :class:`bpnp.nodes.Status` code of the refinement (0 = converged), or -1
            when it did not run.
        pairs_2d, pairs_3d: (k,) int64 indices of the pairs used (for overlays and precision).
    """

    R: np.ndarray
    t: np.ndarray
    ransac_status: int
    ransac_inliers: int
    pnp_status: int
    pairs_2d: np.ndarray
    pairs_3d: np.ndarray


def true_pairs(match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth pairs of a scene.

    Args:
        match: (m,) int, index into ``p3d`` per 2D point, -1 = 2D outlier.

    Returns:
        ``(i, j)``: (k,) int64 arrays with ``match[i] = j >= 0``.
    """
    match = np.asarray(match).reshape(-1)
    i = np.flatnonzero(match >= 0).astype(np.int64)
    return i, match[i].astype(np.int64)


def hungarian_pairs(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment on a cost matrix.

    Args:
        M: (m, n) cost (any real, finite). Rectangular is fine: ``min(m, n)`` pairs result.

    Returns:
        ``(i, j)``: (min(m, n),) int64 arrays of assigned rows and columns, rows ascending.

    Raises:
        ValueError: if ``M`` is not 2-D or holds non-finite values.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"hungarian_pairs: M must have shape (m, n), got {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("hungarian_pairs: M holds non-finite values")
    i, j = linear_sum_assignment(M)
    return i.astype(np.int64), j.astype(np.int64)


def pose_from_pairs(
    p2d: np.ndarray,
    p3d: np.ndarray,
    pairs_2d: np.ndarray,
    pairs_3d: np.ndarray,
    weights: np.ndarray | None,
    *,
    refine: PnPRefine,
    ransac_kwargs: Mapping[str, Any],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> BaselinePose:
    """RANSAC then refinement on given 2D-3D pairs (the reduced diagonal problem, see module doc).

    Args:
        p2d: (m, 2) camera-normalised 2D points.
        p3d: (n, 3) 3D points, world frame.
        pairs_2d, pairs_3d: (k,) int indices of the pairs.
        weights: (k,) non-negative pair weights, or None for uniform. Normalised to sum 1.
        refine: the pose-refinement node (the model's, so that its kernel and iterations apply).
        ransac_kwargs: keyword arguments of :func:`bpnp.geometry.ransac.ransac_pnp`
            (``num_hypotheses``, ``top_k``, ``threshold`` in radians, ...).
        generator: RANSAC random source (on ``device``).
        dtype: working dtype of RANSAC and refinement.
        device: where to compute.

    Returns:
        :class:`BaselinePose`; with fewer than 4 pairs RANSAC reports
        ``TOO_FEW_CORRESPONDENCES`` and the (finite) identity pose is returned.
    """
    pairs_2d = np.asarray(pairs_2d, dtype=np.int64).reshape(-1)
    pairs_3d = np.asarray(pairs_3d, dtype=np.int64).reshape(-1)
    k = len(pairs_2d)
    if len(pairs_3d) != k:
        raise ValueError(f"pose_from_pairs: {k} 2D indices but {len(pairs_3d)} 3D indices")
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != k or np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("pose_from_pairs: weights must be k finite non-negative numbers")
    total = w.sum()
    w = w / total if total > 0 else np.full(k, 1.0 / max(k, 1))

    kw = dict(dtype=dtype, device=device)
    b = to_bearings(torch.as_tensor(np.asarray(p2d)[pairs_2d], **kw)).reshape(1, k, 3)
    X = torch.as_tensor(np.asarray(p3d)[pairs_3d], **kw).reshape(1, k, 3)
    W = torch.diag_embed(torch.as_tensor(w, **kw)).reshape(1, k, k)
    mask = torch.ones(1, k, dtype=torch.bool, device=device)
    rs = ransac_pnp(W, b, X, mask, mask, generator=generator, **dict(ransac_kwargs))
    if int(rs.status[0]) == int(RansacStatus.TOO_FEW_CORRESPONDENCES):
        pnp_status, R, t = -1, rs.R, rs.t
    else:
        res = refine(W, b, X, rs.R.to(dtype), rs.t.to(dtype), mask, mask)
        pnp_status, R, t = int(res.status[0]), res.R, res.t
    return BaselinePose(
        R=R[0].detach().cpu().double().numpy(),
        t=t[0].detach().cpu().double().numpy(),
        ransac_status=int(rs.status[0]),
        ransac_inliers=int(rs.num_inliers[0]),
        pnp_status=pnp_status,
        pairs_2d=pairs_2d,
        pairs_3d=pairs_3d,
    )


def oracle_pose(scene: Mapping[str, Any], **kwargs: Any) -> BaselinePose:
    """Pose from the true correspondences of ``scene`` (uniform weights).

    Args:
        scene: scene dict (``p2d``, ``p3d``, ``match``; numpy).
        **kwargs: ``refine``, ``ransac_kwargs``, ``generator``, ``dtype``, ``device`` of
            :func:`pose_from_pairs`.
    """
    i, j = true_pairs(scene["match"])
    return pose_from_pairs(scene["p2d"], scene["p3d"], i, j, None, **kwargs)


def hungarian_pose(
    scene: Mapping[str, Any],
    M: np.ndarray,
    P: np.ndarray | None = None,
    weights: str = "P",
    **kwargs: Any,
) -> BaselinePose:
    """Pose from the one-to-one assignment on the network's cost.

    Args:
        scene: scene dict (``p2d``, ``p3d``; numpy).
        M: (m, n) cost matrix of the network for this instance (no padding).
        P: (m, n) Sinkhorn plan, used as pair weights when ``weights == "P"``.
        weights: ``"P"`` (pair weights = ``P`` at the assigned entries, renormalised; RANSAC then
            samples confident pairs first, as it does for the model) or ``"uniform"``.
        **kwargs: see :func:`oracle_pose`.
    """
    if weights not in ("P", "uniform"):
        raise ValueError(f"hungarian_pose: weights must be 'P' or 'uniform', got {weights!r}")
    i, j = hungarian_pairs(M)
    w = None
    if weights == "P" and P is not None:
        w = np.asarray(P, dtype=np.float64)[i, j]
        # A plan that underflowed to zero on every pair carries no ranking: fall back to uniform.
        if not np.any(w > 0):
            w = None
    return pose_from_pairs(scene["p2d"], scene["p3d"], i, j, w, **kwargs)
