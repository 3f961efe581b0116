"""Rotations in SO(3): exponential/logarithm maps, random rotations, angles, projection.

Conventions (shared by all of :mod:`bpnp.geometry`):

- rotation matrices act on column vectors from the left, ``x_cam = R @ X + t``;
- axis-angle (rotation) vectors ``omega`` have the unit rotation axis scaled by the angle in
  **radians**; ``so3_exp(omega) = expm(skew(omega))``;
- any number of leading batch dimensions ``*`` is accepted unless a docstring says otherwise.

The exp/log maps are thin wrappers over kornia so that the whole project shares one
implementation (and kornia's care at the identity, where ``sqrt`` would otherwise give NaN
gradients).
"""

from __future__ import annotations

import math  # noqa: F401  (used by the doctest examples)
from collections.abc import Sequence

import torch
from kornia.geometry.conversions import (
    axis_angle_to_rotation_matrix,
    quaternion_to_rotation_matrix,
    rotation_matrix_to_axis_angle,
)

__all__ = [
    "so3_exp",
    "so3_log",
    "skew",
    "random_rotation",
    "rotation_angle",
    "rotation_angle_between",
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
def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    r"""Exponential map of SO(3): rotation vector to rotation matrix (Rodrigues).

    Wraps :func:`kornia.geometry.conversions.axis_angle_to_rotation_matrix`.

    Args:
        omega: rotation vectors of shape :math:`(*, 3)`, axis times angle in **radians**.
            ``+theta`` about ``+z`` maps ``x_hat`` to ``y_hat`` (right-hand rule).

    Returns:
        rotation matrices of shape :math:`(*, 3, 3)`. Finite gradients at ``omega = 0``.

    Raises:
        TypeError: if ``omega`` is not a floating-point tensor.
        ValueError: if the last dimension is not 3.

    Example:
        >>> so3_exp(torch.tensor([0.0, 0.0, math.pi / 2])).round(decimals=4) + 0.0  # + 0.0: no -0.
        tensor([[ 0., -1.,  0.],
                [ 1.,  0.,  0.],
                [ 0.,  0.,  1.]])
    """
    _check_trailing(omega, "omega", (3,))
    _check_float(omega, "omega")
    return axis_angle_to_rotation_matrix(omega)


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


def skew(v: torch.Tensor) -> torch.Tensor:
    r"""Cross-product matrix: ``skew(v) @ w == cross(v, w)``.

    Args:
        v: vectors of shape :math:`(*, 3)`.

    Returns:
        skew-symmetric matrices of shape :math:`(*, 3, 3)`.

    Raises:
        ValueError: if the last dimension is not 3.

    Example:
        >>> skew(torch.tensor([1.0, 2.0, 3.0]))
        tensor([[ 0., -3.,  2.],
                [ 3.,  0., -1.],
                [-2.,  1.,  0.]])
    """
    _check_trailing(v, "v", (3,))
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


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


def rotation_angle(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    r"""Geodesic angle between rotations, ``angle(R1^T R2)``, in **radians** in :math:`[0, \pi]`.

    Computed as ``atan2(||vee(E - E^T)|| / 2, (tr(E) - 1) / 2)`` with ``E = R1^T R2``, which is
    accurate at every angle: ``acos`` of the trace alone loses half the digits near 0 (its slope
    is infinite there) and ``asin`` of the skew part loses them near :math:`\pi`. The cosine is
    clamped to ``[-1, 1]`` first, so slightly non-orthonormal inputs never give NaN. For the
    evaluation metric of the project, whose formula is fixed, see
    :func:`bpnp.geometry.metrics.pose_errors`.

    Args:
        R1: rotation matrices of shape :math:`(*, 3, 3)`.
        R2: rotation matrices of shape :math:`(*, 3, 3)`, broadcastable with ``R1``.

    Returns:
        angles of shape :math:`(*)` in radians. Non-finite inputs give NaN.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: if an input is not of shape ``(*, 3, 3)`` or the batch shapes do not
            broadcast.

    Example:
        >>> Rz = so3_exp(torch.tensor([0.0, 0.0, 0.5]))
        >>> rotation_angle(torch.eye(3), Rz)
        tensor(0.5000)
    """
    _check_trailing(R1, "R1", (3, 3))
    _check_trailing(R2, "R2", (3, 3))
    _check_float(R1, "R1")
    _check_float(R2, "R2")
    try:
        torch.broadcast_shapes(R1.shape[:-2], R2.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"R1 and R2 batch shapes must broadcast, got {tuple(R1.shape)} and {tuple(R2.shape)}"
        ) from exc
    E = R1.transpose(-1, -2) @ R2
    cos = ((E.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    sin_vec = torch.stack(
        [E[..., 2, 1] - E[..., 1, 2], E[..., 0, 2] - E[..., 2, 0], E[..., 1, 0] - E[..., 0, 1]], dim=-1
    )
    sin = (sin_vec.norm(dim=-1) / 2.0).clamp(max=1.0)
    return torch.atan2(sin, cos)


# The name used in docs/INTERFACES.md.
rotation_angle_between = rotation_angle


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
