"""Occlusion by a z-buffer over a dense point sample of the surfaces.

Every candidate point is also an occluder: a small disc of the surface (its share of the sampled
area). Points are binned into image cells of ``cell_px`` pixels. Each occluder writes its depth
into its cell and, when its disc projects wider than a cell (near surfaces, sparse samples), into
the neighbouring cells it covers (a square of ``2 r + 1`` cells, ``r`` from the projected disc
radius, at most ``max_radius_cells``): this closes the gaps between the samples of a near surface,
so far points do not show through it. Splat sizes are rounded to a ladder (0, 1, 2, 3, 4, 6, 8,
12, ... cells); per size one ``np.minimum.at`` and a separable minimum filter, and the z-buffer is
their minimum.

The depth test. Without normals a point is visible when ``z <= (1 + rel_tol) z_q``, ``z_q`` the
nearest depth written into its cell. With normals (what the generator uses) the nearest
occluder ``q`` (the point that wrote that depth) is looked up and its tangent plane decides: the
point is visible when it is not behind that plane (where its viewing ray meets the plane, with
the relative tolerance), so samples of a
surface seen at a grazing angle (a floor from eye height) do not hide each other, while a point
behind a thin part (a chair's seat, the far side of a banana) is hidden. The plane's allowance is
capped at the depth change of ``q``'s surface over the splat's reach, ``reach / f * tan(theta)``
(``theta`` between the normal and the viewing ray, ``tan`` at most 20), and is never below the
plain relative test.

Vectorised numpy, no Python loop over points.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import minimum_filter

__all__ = ["zbuffer_visible", "MAX_SLOPE"]

#: Cap on ``tan(theta)`` of an occluder's surface in the plane allowance.
MAX_SLOPE = 20.0
#: Splat half-sizes (cells) are rounded to the nearest of these (fewer minimum filters).
_LADDER = np.array([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256])


def zbuffer_visible(u: np.ndarray, v: np.ndarray, z: np.ndarray, width: int, height: int,
                    cell_px: float, rel_tol: float, radius_px: np.ndarray | float = 0.0,
                    points: np.ndarray | None = None, normals: np.ndarray | None = None,
                    focal_px: float = 1.0, occluder: np.ndarray | None = None,
                    max_radius_cells: int = 256) -> np.ndarray:
    """Which points are not hidden behind nearer points.

    Args:
        u, v: (n,) pixel coordinates; z: (n,) depths (points with ``z <= 0`` or outside the
            image are neither visible nor occluders).
        width, height: image size in pixels.
        cell_px: z-buffer cell size in pixels (> 0).
        rel_tol: relative depth tolerance.
        radius_px: (n,) or scalar: projected radius of each occluder's surface disc, in pixels.
        points, normals: optional (n, 3) camera-frame points and surface normals (any sign):
            enable the tangent-plane test (module docstring).
        focal_px: focal length in pixels (the plane allowance's cap).
        occluder: optional (n,) bool: only these points write into the z-buffer (default all).
        max_radius_cells: cap on the splat half-size, in cells.

    Returns:
        (n,) bool.
    """
    u, v, z = (np.asarray(a, dtype=np.float64) for a in (u, v, z))
    n = len(z)
    gw, gh = max(1, int(math.ceil(width / cell_px))), max(1, int(math.ceil(height / cell_px)))
    inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    cx = np.clip((np.where(inside, u, 0.0) / cell_px).astype(np.int64), 0, gw - 1)
    cy = np.clip((np.where(inside, v, 0.0) / cell_px).astype(np.int64), 0, gh - 1)
    cell = cy * gw + cx
    writes = inside if occluder is None else inside & np.asarray(occluder, dtype=bool)
    r = np.broadcast_to(np.asarray(radius_px, dtype=np.float64), (n,))
    rc = np.clip(np.rint(r / cell_px), 0, max_radius_cells).astype(np.int64)
    rc = np.minimum(_LADDER[np.searchsorted((_LADDER[1:] + _LADDER[:-1]) / 2.0, rc)], max_radius_cells)
    # One z-buffer: the minimum over the splat-size groups (grid-level work per group only).
    zbuf = np.full(gw * gh, np.inf)
    for radius in np.unique(rc[writes]):
        sel = writes & (rc == radius)
        grid = np.full(gw * gh, np.inf)
        np.minimum.at(grid, cell[sel], z[sel])
        if radius > 0:
            grid = minimum_filter(grid.reshape(gh, gw), size=2 * int(radius) + 1, mode="constant",
                                  cval=np.inf).ravel()
        np.minimum(zbuf, grid, out=zbuf)
    ins = np.flatnonzero(inside)
    zi = z[ins]
    zq = zbuf[cell[ins]]
    allowed = zq * (1.0 + rel_tol)
    if points is not None and normals is not None and len(ins):
        X = np.asarray(points, dtype=np.float64)
        nrm = np.asarray(normals, dtype=np.float64)
        # The occluder that wrote zq: depths are unique floats, so a sorted lookup finds it.
        occ = np.flatnonzero(writes)
        order = occ[np.argsort(z[occ], kind="stable")]
        has = np.isfinite(zq)
        q = order[np.clip(np.searchsorted(z[order], zq[has]), 0, len(order) - 1)]
        xq, nq = X[q], nrm[q]
        offset = np.einsum("ij,ij->i", nq, xq)  # q's tangent plane: n . x = offset
        cos = np.abs(offset) / np.maximum(np.linalg.norm(xq, axis=1), 1e-300)
        slope = np.minimum(np.sqrt(np.maximum(1.0 - cos**2, 0.0)) / np.maximum(cos, 1e-12), MAX_SLOPE)
        ray = X[ins[has]] / zi[has, None]  # each point's viewing ray, scaled to depth 1
        with np.errstate(divide="ignore", invalid="ignore"):
            s_plane = offset / np.einsum("ij,ij->i", nq, ray)  # depth where the ray meets the plane
        s_plane = np.where(np.isfinite(s_plane) & (s_plane > 0), s_plane, np.inf)
        reach = (rc[q] + 1.0) * cell_px * math.sqrt(2.0)  # farthest pixel its splat reaches
        cap = zq[has] * (1.0 + rel_tol + reach / focal_px * slope)
        allowed[has] = np.maximum(allowed[has], np.minimum(s_plane * (1.0 + rel_tol), cap))
    visible = np.zeros(n, dtype=bool)
    visible[ins] = zi <= allowed
    return visible
