"""COLMAP camera models: intrinsics, lens distortion and its inversion (pixels <-> normalised).

Conventions (those of COLMAP): a camera-frame point ``(X, Y, Z)`` has normalised coordinates
``(x, y) = (X / Z, Y / Z)``; the lens maps them to distorted normalised coordinates
``(x_d, y_d) = d(x, y)`` and the pixel is ``(u, v) = (fx x_d + cx, fy y_d + cy)``, with the centre of
the top-left pixel at (0.5, 0.5). Undistortion inverts ``d`` by Newton's method (vectorised over
points), which stays accurate for strong distortion where OpenCV's default fixed-point iteration
(5 steps) does not.

Supported models and their parameter order (as in COLMAP's ``cameras.txt``):

=================  ============================================  ===========================
model              params                                        distortion
=================  ============================================  ===========================
SIMPLE_PINHOLE     f, cx, cy                                     none
PINHOLE            fx, fy, cx, cy                                none
SIMPLE_RADIAL      f, cx, cy, k                                  radial k r^2
RADIAL             f, cx, cy, k1, k2                             radial k1 r^2 + k2 r^4
OPENCV             fx, fy, cx, cy, k1, k2, p1, p2                radial + tangential
FULL_OPENCV        fx, fy, cx, cy, k1, k2, p1, p2, k3..k6        rational radial + tangential
=================  ============================================  ===========================

The fisheye models of COLMAP can be read by :mod:`bpnp.data.colmap` but not undistorted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# COLMAP model id -> (name, number of params); the ids are COLMAP's binary-format codes.
CAMERA_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
}
NUM_PARAMS: dict[str, int] = {name: n for name, n in CAMERA_MODELS.values()}
SUPPORTED_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")


class UnsupportedCameraError(ValueError):
    """A camera model that can be read but not undistorted (e.g. COLMAP's fisheye models)."""


@dataclass(frozen=True)
class Camera:
    """One COLMAP camera.

    Attributes:
        id: COLMAP camera id.
        model: model name, e.g. ``"SIMPLE_RADIAL"``.
        width, height: image size in pixels.
        params: (p,) float64 parameters in COLMAP order (see the module docstring).
    """

    id: int
    model: str
    width: int
    height: int
    params: np.ndarray

    def _check_supported(self) -> None:
        if self.model not in SUPPORTED_MODELS:
            raise UnsupportedCameraError(
                f"camera {self.id} uses model {self.model}, which bpnp cannot undistort "
                f"(supported: {', '.join(SUPPORTED_MODELS)})"
            )

    @property
    def focal(self) -> tuple[float, float]:
        """(fx, fy) in pixels."""
        self._check_supported()
        p = self.params
        if self.model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
            return float(p[0]), float(p[0])
        return float(p[0]), float(p[1])

    @property
    def principal_point(self) -> tuple[float, float]:
        """(cx, cy) in pixels."""
        self._check_supported()
        p = self.params
        if self.model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
            return float(p[1]), float(p[2])
        return float(p[2]), float(p[3])

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsic matrix (pinhole part; distortion is separate)."""
        fx, fy = self.focal
        cx, cy = self.principal_point
        return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])

    def _distortion(self) -> np.ndarray:
        """OpenCV-ordered coefficients (k1, k2, p1, p2, k3, k4, k5, k6), zeros where absent."""
        self._check_supported()
        c = np.zeros(8)
        p = self.params
        if self.model == "SIMPLE_RADIAL":
            c[0] = p[3]
        elif self.model == "RADIAL":
            c[0:2] = p[3:5]
        elif self.model == "OPENCV":
            c[0:4] = p[4:8]
        elif self.model == "FULL_OPENCV":
            c[:] = p[4:12]
        return c

    @property
    def has_distortion(self) -> bool:
        return bool(np.any(self._distortion() != 0.0))

    def distort(self, xy: np.ndarray) -> np.ndarray:
        """Apply the lens distortion to normalised coordinates.

        Args:
            xy: (k, 2) undistorted normalised coordinates.

        Returns:
            (k, 2) distorted normalised coordinates.
        """
        return _distort(np.asarray(xy, dtype=np.float64), self._distortion())

    def undistort(
        self, xy_d: np.ndarray, max_iter: int = 50, tol: float = 1e-12
    ) -> tuple[np.ndarray, np.ndarray]:
        """Invert :meth:`distort` by Newton's method, independently per point.

        Args:
            xy_d: (k, 2) distorted normalised coordinates.
            max_iter: Newton iterations at most.
            tol: convergence threshold on the residual ``|d(x) - x_d|`` (normalised units).

        Returns:
            ``(xy, converged)``: (k, 2) undistorted normalised coordinates and a (k,) bool mask,
            False where the iteration did not converge (far outside the lens' valid range).
        """
        xy_d = np.asarray(xy_d, dtype=np.float64)
        coeffs = self._distortion()
        if not np.any(coeffs != 0.0):
            return xy_d.copy(), np.ones(len(xy_d), dtype=bool)
        return _undistort_newton(xy_d, coeffs, max_iter, tol)

    def pixels_to_normalised(self, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (k, 2) -> undistorted camera-normalised coordinates (k, 2) and a converged mask."""
        uv = np.asarray(uv, dtype=np.float64)
        fx, fy = self.focal
        cx, cy = self.principal_point
        xy_d = np.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy], axis=1)
        return self.undistort(xy_d)

    def normalised_to_pixels(self, xy: np.ndarray) -> np.ndarray:
        """Undistorted normalised (k, 2) -> pixels (k, 2), distortion applied."""
        xy_d = self.distort(xy)
        fx, fy = self.focal
        cx, cy = self.principal_point
        return np.stack([fx * xy_d[:, 0] + cx, fy * xy_d[:, 1] + cy], axis=1)


def _distort(xy: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Brown-Conrady distortion with OpenCV coefficients c = (k1, k2, p1, p2, k3, k4, k5, k6)."""
    k1, k2, p1, p2, k3, k4, k5, k6 = c
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = (1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1.0 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return np.stack([xd, yd], axis=-1)


def _undistort_newton(
    xy_d: np.ndarray, c: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Solve d(x) = x_d per point; the 2x2 Jacobian is taken by central differences, which is
    enough because the residual itself is exact (Newton then converges to the exact root)."""
    x = xy_d.copy()
    active = np.ones(len(x), dtype=bool)
    h = 1e-7
    ex = np.array([h, 0.0])
    ey = np.array([0.0, h])
    for _ in range(max_iter):
        xa = x[active]
        res = _distort(xa, c) - xy_d[active]
        done = np.max(np.abs(res), axis=1) < tol
        if np.all(done):
            active[np.flatnonzero(active)] = False
            break
        jx = (_distort(xa + ex, c) - _distort(xa - ex, c)) / (2 * h)  # d d / d x, (k, 2)
        jy = (_distort(xa + ey, c) - _distort(xa - ey, c)) / (2 * h)  # d d / d y
        det = jx[:, 0] * jy[:, 1] - jy[:, 0] * jx[:, 1]
        safe = np.abs(det) > 1e-12
        det = np.where(safe, det, 1.0)
        # 2x2 inverse applied to the residual, in closed form.
        dx = (jy[:, 1] * res[:, 0] - jy[:, 0] * res[:, 1]) / det
        dy = (-jx[:, 1] * res[:, 0] + jx[:, 0] * res[:, 1]) / det
        step = np.where(safe[:, None], np.stack([dx, dy], axis=1), 0.0)
        step[done] = 0.0
        x[active] = xa - step
        idx = np.flatnonzero(active)
        active[idx[done | ~safe]] = False
        if not active.any():
            break
    residual = np.max(np.abs(_distort(x, c) - xy_d), axis=1)
    converged = np.isfinite(residual) & (residual < max(tol * 1e3, 1e-9))
    x[~np.isfinite(x)] = 0.0
    return x, converged
