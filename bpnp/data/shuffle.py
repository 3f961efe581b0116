"""Shuffle the two point sets of a blind-PnP instance, keeping ``match`` consistent."""

from __future__ import annotations

import numpy as np


def shuffle_sets(
    p2d: np.ndarray, p3d: np.ndarray, match: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permute the 2D and the 3D points at random and remap ``match``, so that positions leak
    nothing about which points are inliers or outliers.

    Args:
        p2d: (m, 2) 2D points; p3d: (n, 3) 3D points; match: (m,) int, index into p3d or -1.
        rng: numpy Generator; draws the 3D permutation first, then the 2D one.

    Returns:
        ``(p2d[perm2], p3d[perm3], match')`` where the old 3D index ``j`` now sits at
        ``inv3[j]`` (``p3d[perm3]`` puts old index ``perm3[k]`` at position ``k``).
    """
    perm3 = rng.permutation(len(p3d))
    inv3 = np.empty_like(perm3)
    inv3[perm3] = np.arange(len(perm3))
    perm2 = rng.permutation(len(p2d))
    match = match[perm2]
    match = np.where(match >= 0, inv3[np.maximum(match, 0)], -1).astype(np.int64)
    return p2d[perm2], p3d[perm3], match
