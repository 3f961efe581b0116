r"""The project's one rotation vocabulary: ``skew``, ``so3_exp`` and the two named distances
between rotations. Pure PyTorch, imports nothing from ``bpnp`` (the lowest layer: the nodes, the
geometry and the losses all use it).

Conventions: rotation matrices act on column vectors from the left (``x_cam = R X + t``);
rotation vectors ``omega`` (*, 3) are the unit axis scaled by the angle in **radians**.

Two distances between rotations, named for what they are:

- :func:`geodesic_angle` -- the rotation angle of ``R1^T R2`` in radians, ``[0, pi]`` (the
  metric on SO(3); what "rotation error in degrees" means);
- :func:`chordal_distance` -- the Frobenius norm ``||R1 - R2||_F`` in ``[0, sqrt 8]``; it equals
  ``2 sqrt 2 sin(angle / 2)``, so :func:`angle_from_chordal` turns it into the geodesic angle with
  a derivative that stays finite at ``R1 = R2`` (the pose loss uses that form).
"""

from __future__ import annotations

import math

import torch

__all__ = ["skew", "so3_exp", "geodesic_angle", "chordal_distance", "angle_from_chordal"]


def _check(x: object, name: str, trailing: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape[x.ndim - len(trailing):]) != trailing or x.ndim < len(trailing):
        want = "(" + ", ".join(["*"] + [str(s) for s in trailing]) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def skew(v: torch.Tensor) -> torch.Tensor:
    r"""Cross-product matrices: ``skew(v) @ w == cross(v, w)``; (*, 3) -> (*, 3, 3).

    Example:
        >>> skew(torch.tensor([1.0, 2.0, 3.0]))
        tensor([[ 0., -3.,  2.],
                [ 3.,  0., -1.],
                [-2.,  1.,  0.]])
    """
    _check(v, "v", (3,))
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    r"""Exponential map of SO(3) (Rodrigues): rotation vectors (*, 3), radians -> (*, 3, 3).

    ``+theta`` about ``+z`` maps ``x_hat`` to ``y_hat`` (right-hand rule). Near ``omega = 0`` the
    coefficients ``sin(theta)/theta`` and ``(1 - cos theta)/theta^2`` are their Taylor series to
    fourth order, so first *and second* derivatives at exactly ``omega = 0`` are right: the PnP
    node's implicit backward differentiates twice there. (kornia's version is first order near 0,
    ``I + [omega]_x``, whose second derivative at 0 is wrong, so it is not used.)

    Example:
        >>> so3_exp(torch.tensor([0.0, 0.0, math.pi / 2])).round(decimals=4) + 0.0  # + 0.0: no -0.
        tensor([[ 0., -1.,  0.],
                [ 1.,  0.,  0.],
                [ 0.,  0.,  1.]])
    """
    _check(omega, "omega", (3,))
    theta2 = (omega * omega).sum(-1, keepdim=True).unsqueeze(-1)
    small = theta2 < 1e-6
    safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(safe)
    A = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(theta) / theta)
    B = torch.where(small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(theta)) / safe)
    K = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(K.shape)
    return eye + A * K + B * (K @ K)


def geodesic_angle(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    r"""Geodesic angle between rotations, ``angle(R1^T R2)``, radians in ``[0, pi]``; (*, 3, 3)
    broadcastable pairs -> (*).

    ``atan2(||vee(E - E^T)|| / 2, (tr E - 1) / 2)`` with ``E = R1^T R2`` is accurate at every
    angle (``acos`` of the trace loses half the digits near 0, ``asin`` of the skew part near
    ``pi``); both parts are clamped, so slightly non-orthonormal inputs never give NaN.

    Example:
        >>> geodesic_angle(torch.eye(3), so3_exp(torch.tensor([0.0, 0.0, 0.5])))
        tensor(0.5000)
    """
    _check(R1, "R1", (3, 3))
    _check(R2, "R2", (3, 3))
    try:
        torch.broadcast_shapes(R1.shape[:-2], R2.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(f"R1 and R2 batch shapes must broadcast, got {tuple(R1.shape)} and {tuple(R2.shape)}") from exc
    E = R1.transpose(-1, -2) @ R2
    cos = ((E.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    sin_vec = torch.stack([E[..., 2, 1] - E[..., 1, 2], E[..., 0, 2] - E[..., 2, 0], E[..., 1, 0] - E[..., 0, 1]], dim=-1)
    sin = (sin_vec.norm(dim=-1) / 2.0).clamp(max=1.0)
    return torch.atan2(sin, cos)


def chordal_distance(R1: torch.Tensor, R2: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    r"""Chordal distance ``sqrt(||R1 - R2||_F^2 + eps)`` between rotations (*, 3, 3) -> (*).

    ``eps > 0`` keeps the derivative finite at ``R1 = R2`` (where the plain norm has none).

    Example:
        >>> chordal_distance(torch.eye(3), so3_exp(torch.tensor([0.0, 0.0, math.pi])))
        tensor(2.8284)
    """
    return torch.sqrt((R1 - R2).square().sum((-2, -1)) + eps)


def angle_from_chordal(d: torch.Tensor) -> torch.Tensor:
    r"""The geodesic angle (radians) of rotations at chordal distance ``d``:
    ``2 asin(d / sqrt 8)`` (``d`` clamped to ``sqrt 8``).

    Example:
        >>> R = so3_exp(torch.tensor([0.3, 0.0, 0.0]))
        >>> angle_from_chordal(chordal_distance(torch.eye(3), R))
        tensor(0.3000)
    """
    return 2.0 * torch.asin((d / math.sqrt(8.0)).clamp(max=1.0))
