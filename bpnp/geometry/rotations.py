"""Rotations in SO(3): exponential/logarithm maps, random rotations, angles, projection.

Conventions (shared by all of :mod:`bpnp.geometry`):

- rotation matrices act on column vectors from the left, ``x_cam = R @ X + t``;
- axis-angle (rotation) vectors ``omega`` have the unit rotation axis scaled by the angle in
  **radians**; ``so3_exp(omega) = expm(skew(omega))``;
- any number of leading batch dimensions ``*`` is accepted unless a docstring says otherwise.

``skew``, ``so3_exp`` and the named distances ``geodesic_angle`` / ``chordal_distance`` are
:mod:`bpnp.so3`'s (the project's one rotation vocabulary), re-exported here; the logarithm wraps
kornia.
"""

from __future__ import annotations

import math  # noqa: F401  (used by the doctest examples)
from collections.abc import Sequence

import torch
from kornia.geometry.conversions import quaternion_to_rotation_matrix, rotation_matrix_to_axis_angle

from bpnp.so3 import angle_from_chordal, chordal_distance, geodesic_angle, skew, so3_exp

__all__ = [
    "so3_exp",
    "so3_log",
    "skew",
    "random_rotation",
    "geodesic_angle",
    "chordal_distance",
    "angle_from_chordal",
    "project_to_so3",
]


# --------------------------------------------------------------------------------------------
# Input validation shared by the modules of bpnp.geometry (private; kept here, in the lowest
# module of the package, so that every module can import it without a cycle).
# --------------------------------------------------------------------------------------------
def _check_tensor(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_trailing(
    x: object, name: str, trailing: Sequence[int], min_ndim: int | None = None, expected: str | None = None
) -> None:
    """Raise unless ``x`` is a tensor of shape ``(*, *trailing)`` with at least ``min_ndim`` dims.

    ``expected`` is the shape as written in the message, e.g. ``"(*, N, 3)"``.
    """
    _check_tensor(x, name)
    assert isinstance(x, torch.Tensor)
    k = len(trailing)
    min_ndim = k if min_ndim is None else min_ndim
    ok = x.ndim >= min_ndim and tuple(x.shape[x.ndim - k :]) == tuple(trailing)
    if not ok:
        want = expected or "(" + ", ".join(["*"] + [str(s) for s in trailing]) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def _check_float(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


# --------------------------------------------------------------------------------------------
def so3_log(R: torch.Tensor) -> torch.Tensor:
    r"""Logarithm map of SO(3): rotation matrix to rotation vector.

    Wraps :func:`kornia.geometry.conversions.rotation_matrix_to_axis_angle`.

    Args:
        R: rotation matrices of shape :math:`(*, 3, 3)`. Not checked for orthonormality; pass
            the output of :func:`project_to_so3` if unsure.

    Returns:
        rotation vectors of shape :math:`(*, 3)` with angle (norm) in :math:`[0, \pi]`
        radians. At an angle of exactly :math:`\pi` the sign of the axis is arbitrary.

    Raises:
        TypeError: if ``R`` is not a floating-point tensor.
        ValueError: if ``R`` is not of shape ``(*, 3, 3)``.

    Example:
        >>> so3_log(so3_exp(torch.tensor([0.1, -0.2, 0.3])))
        tensor([ 0.1000, -0.2000,  0.3000])
    """
    _check_trailing(R, "R", (3, 3))
    _check_float(R, "R")
    return rotation_matrix_to_axis_angle(R)


def random_rotation(
    b: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Rotations drawn uniformly (Haar measure) from SO(3).

    A normalised 4D standard normal vector is uniform on the unit quaternion sphere, and the
    double cover maps that to the uniform distribution on SO(3). (kornia's ``So3.random`` takes no
    ``torch.Generator``, and we need reproducible draws, so this is written here.)

    Args:
        b: number of rotations, ``b >= 0``.
        generator: optional generator; the draw is a deterministic function of its state. The
            numbers are drawn on the generator's device and then moved to ``device``.
        dtype: floating dtype of the result.
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        rotation matrices of shape :math:`(b, 3, 3)`.

    Raises:
        TypeError: if ``b`` is not an int or ``dtype`` is not floating point.
        ValueError: if ``b < 0``.

    Example:
        >>> R = random_rotation(2, generator=torch.Generator().manual_seed(0))
        >>> R.shape
        torch.Size([2, 3, 3])
        >>> torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(2, 3, 3), atol=1e-6)
        True
    """
    if not isinstance(b, int) or isinstance(b, bool):
        raise TypeError(f"b must be an int, got {type(b).__name__}")
    if b < 0:
        raise ValueError(f"b must be >= 0, got {b}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    gen_device = generator.device if generator is not None else (device or "cpu")
    out_device = device if device is not None else gen_device
    q = torch.randn(b, 4, generator=generator, dtype=torch.float64, device=gen_device)
    # A draw of exactly zero has probability zero, but would be mapped to the identity by kornia,
    # not uniformly; replace it to keep the distribution exact.
    q = torch.where(q.norm(dim=-1, keepdim=True) > 1e-12, q, torch.ones_like(q))
    return quaternion_to_rotation_matrix(q).to(device=out_device, dtype=dtype)


def project_to_so3(M: torch.Tensor) -> torch.Tensor:
    r"""Nearest rotation matrix in the Frobenius norm (orthogonal Procrustes).

    ``R = U diag(1, 1, det(U V^T)) V^T`` for ``M = U S V^T``: the determinant fix turns the nearest
    orthogonal matrix into the nearest *rotation* when ``det(M) < 0``.

    Args:
        M: matrices of shape :math:`(*, 3, 3)`.

    Returns:
        rotation matrices of shape :math:`(*, 3, 3)` (``R R^T = I``, ``det R = +1``). For a
        rank-deficient ``M`` the result is a rotation but not unique. Non-finite inputs give
        non-finite outputs (the SVD of NaN is NaN); callers that must stay finite mask them.

    Raises:
        TypeError: if ``M`` is not a floating-point tensor.
        ValueError: if ``M`` is not of shape ``(*, 3, 3)``.

    Example:
        >>> project_to_so3(2.0 * torch.eye(3))
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    _check_trailing(M, "M", (3, 3))
    _check_float(M, "M")
    # Written here: kornia has no projection onto SO(3).
    U, _, Vh = torch.linalg.svd(M)
    d = torch.det(U @ Vh)
    # sign() of an exact 0 (singular M) would zero a column; treat it as +1.
    d = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    D = torch.ones(*d.shape, 3, dtype=M.dtype, device=M.device)
    D[..., 2] = d
    return (U * D.unsqueeze(-2)) @ Vh
