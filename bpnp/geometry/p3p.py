r"""Batched minimal P3P solver on bearing vectors (Lambda-Twist style), all in torch.

Problem: given three bearings ``y_i`` (unit, camera frame) and three world points ``X_i``, find
the poses ``(R, t)`` with ``R X_i + t = lambda_i y_i``, ``lambda_i > 0``; there are at most four.

Method (after Persson & Nordberg, "Lambda Twist", ECCV 2018), written for batched tensors:

1. The unknown depths ``Lambda = (lambda_0, lambda_1, lambda_2)`` satisfy three quadrics
   ``Lambda^T M_ij Lambda = a_ij`` with ``a_ij = ||X_i - X_j||^2``. Eliminating the right-hand
   sides gives two homogeneous conics ``D1 = a_12 M_01 - a_01 M_12`` and
   ``D2 = a_12 M_02 - a_02 M_12`` whose (at most four) common points are the solutions.
2. A degenerate member ``D0 = D1 + gamma D2`` of their pencil (``det D0 = 0``, a cubic in gamma;
   one real root always exists and any real root works) is a pair of lines through all common
   points. The cubic is solved in closed form and polished by Newton steps.
3. ``D0`` is split into its two lines with the adjugate trick (``adj(D0) = -p p^T``,
   ``D0 - [p]_x = 2 l m^T``), each line is intersected with the other conic (a homogeneous
   quadratic, solved in its cancellation-free form), the depths are scaled to the true distances
   and polished by Gauss-Newton on the three distance equations.
4. ``R`` comes from aligning the triads spanned by the triangle in both frames, so it is a
   rotation by construction; ``t = mean(lambda_i y_i) - R mean(X_i)``.

Why this solver rather than Grunert/Kneip quartics: every step has a fixed number of outputs and
no data-dependent branching (only ``torch.where``), so it vectorises over any batch; it needs a
cubic, not a quartic (no companion-matrix eigenvalues, which ``torch.linalg.eigvals`` would
compute with a device-to-host sync on CUDA); and it is known as the most accurate P3P in
practice. Each of the four solution slots carries a ``valid`` flag: degenerate samples
(collinear or repeated world points, repeated bearings), complex solutions, non-positive
depths and solutions whose reprojection check fails are marked invalid and hold the identity
and a zero translation, never NaN.

Use float64 when accuracy matters (RANSAC calls this in float64): P3P is ill-conditioned near
its critical configurations and float32 loses several digits there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from bpnp.geometry.rotations import _check_float, _check_trailing, skew

__all__ = ["P3PSolutions", "p3p"]


class P3PSolutions(NamedTuple):
    """Up to four P3P solutions per problem; invalid slots hold ``R = I``, ``t = 0``."""

    R: torch.Tensor
    """(*, 4, 3, 3) rotations (world to camera)."""
    t: torch.Tensor
    """(*, 4, 3) translations."""
    valid: torch.Tensor
    """(*, 4) bool, True where the slot holds a real solution with positive depths."""


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _adj3(A: torch.Tensor) -> torch.Tensor:
    """Adjugate of (*, 3, 3) matrices: columns are cross products of rows."""
    r0, r1, r2 = A[..., 0, :], A[..., 1, :], A[..., 2, :]
    return torch.stack([torch.cross(r1, r2, dim=-1), torch.cross(r2, r0, dim=-1), torch.cross(r0, r1, dim=-1)], dim=-1)


def _det3(A: torch.Tensor) -> torch.Tensor:
    return _dot(A[..., 0, :], torch.cross(A[..., 1, :], A[..., 2, :], dim=-1))


def _cubic_real_root(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One real root of ``x^3 + a x^2 + b x + c`` (closed form, then Newton polish).

    Three-real-root case by the trigonometric formula, one-real-root case by Cardano in the
    cancellation-free form (Numerical Recipes 5.6). Both branches are computed and selected
    with ``where``, so NaN in the unused one is harmless (no autograd here).
    """
    Q = (a * a - 3.0 * b) / 9.0
    Rr = (2.0 * a**3 - 9.0 * a * b + 27.0 * c) / 54.0
    Q3 = Q**3
    three = Rr * Rr < Q3
    sqQ = torch.sqrt(Q.clamp(min=0.0))
    theta = torch.acos((Rr / torch.sqrt(Q3.clamp(min=torch.finfo(a.dtype).tiny))).clamp(-1.0, 1.0))
    x_three = -2.0 * sqQ * torch.cos(theta / 3.0) - a / 3.0
    disc = torch.sqrt((Rr * Rr - Q3).clamp(min=0.0))
    s = torch.where(Rr >= 0, 1.0, -1.0).to(a.dtype)
    A = -s * (Rr.abs() + disc).pow(1.0 / 3.0)
    B = torch.where(A != 0, Q / torch.where(A != 0, A, torch.ones_like(A)), torch.zeros_like(A))
    x_one = A + B - a / 3.0
    x = torch.where(three, x_three, x_one)
    for _ in range(3):
        f = ((x + a) * x + b) * x + c
        df = (3.0 * x + 2.0 * a) * x + b
        step = f / torch.where(df != 0, df, torch.ones_like(df))
        x_new = x - step
        f_new = ((x_new + a) * x_new + b) * x_new + c
        x = torch.where((df != 0) & torch.isfinite(x_new) & (f_new.abs() <= f.abs()), x_new, x)
    return x


def _distance_residuals(lam: torch.Tensor, cos: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Residuals of ``l_i^2 + l_j^2 - 2 c_ij l_i l_j - a_ij`` for pairs (01, 02, 12)."""
    l0, l1, l2 = lam.unbind(-1)
    c01, c02, c12 = cos.unbind(-1)
    a01, a02, a12 = a.unbind(-1)
    return torch.stack(
        [
            l0 * l0 + l1 * l1 - 2.0 * c01 * l0 * l1 - a01,
            l0 * l0 + l2 * l2 - 2.0 * c02 * l0 * l2 - a02,
            l1 * l1 + l2 * l2 - 2.0 * c12 * l1 * l2 - a12,
        ],
        dim=-1,
    )


def _refine_depths(lam: torch.Tensor, cos: torch.Tensor, a: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Newton steps (square system) on the three distance equations; a step is kept only if it
    is finite and lowers the residual."""
    c01, c02, c12 = cos.unbind(-1)
    for _ in range(steps):
        r = _distance_residuals(lam, cos, a)
        l0, l1, l2 = lam.unbind(-1)
        # J = 2 [[a_, b_, 0], [c_, 0, d_], [0, e_, f_]]: solved by Cramer's rule in closed form
        # (float64), a few elementwise ops instead of a batched LU of thousands of 3x3 systems.
        # A singular J gives inf/NaN, rejected below.
        a_, b_ = l0 - c01 * l1, l1 - c01 * l0
        c_, d_ = l0 - c02 * l2, l2 - c02 * l0
        e_, f_ = l1 - c12 * l2, l2 - c12 * l1
        y0, y1, y2 = (-0.5 * r).unbind(-1)
        det = -(a_ * d_ * e_ + b_ * c_ * f_)
        delta = torch.stack(
            [
                -d_ * e_ * y0 - b_ * f_ * y1 + b_ * d_ * y2,
                -c_ * f_ * y0 + a_ * f_ * y1 - a_ * d_ * y2,
                c_ * e_ * y0 - a_ * e_ * y1 - b_ * c_ * y2,
            ],
            dim=-1,
        ) / det.unsqueeze(-1)
        new = lam + delta
        better = _distance_residuals(new, cos, a).abs().sum(-1) < r.abs().sum(-1)
        ok = torch.isfinite(new).all(-1) & better
        lam = torch.where(ok.unsqueeze(-1), new, lam)
    return lam


def _triad(P0: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal frame [e1 e2 n] (columns) of a triangle, and the norm of its cross product."""
    d1 = P1 - P0
    cr = torch.cross(d1, P2 - P0, dim=-1)
    e1 = F.normalize(d1, dim=-1)
    n = F.normalize(cr, dim=-1)
    e2 = torch.cross(n, e1, dim=-1)
    return torch.stack([e1, e2, n], dim=-1), cr.norm(dim=-1)


def p3p(bearings: torch.Tensor, points: torch.Tensor) -> P3PSolutions:
    r"""All (up to four) poses explaining three bearing/point correspondences.

    Solves ``R X_i + t = lambda_i y_i`` with ``lambda_i > 0`` for ``i = 0, 1, 2``, batched over
    any leading dims. See the module docstring for the method.

    Args:
        bearings: camera-frame bearing vectors of shape :math:`(*, 3, 3)` (``[..., i, :]`` is the
            i-th bearing); normalised internally, must point into the half-space of the points
            (e.g. ``to_bearings`` output, z > 0).
        points: world points of shape :math:`(*, 3, 3)` (``[..., i, :]`` is the i-th point).

    Returns:
        :class:`P3PSolutions` with ``R`` :math:`(*, 4, 3, 3)`, ``t`` :math:`(*, 4, 3)`,
        ``valid`` :math:`(*, 4)`. The same solution may appear in two slots (double roots).
        Invalid slots (complex, negative depth, degenerate input, NaN input) hold ``R = I``,
        ``t = 0``. All outputs are finite.

    Raises:
        TypeError: if an input is not a floating-point tensor.
        ValueError: if the shapes are not ``(*, 3, 3)`` or the batch dims differ.

    Example:
        >>> X = torch.tensor([[0.0, 0.0, 4.0], [1.0, 0.0, 5.0], [0.0, 1.0, 6.0]], dtype=torch.float64)
        >>> y = X / X.norm(dim=-1, keepdim=True)        # camera at the world origin
        >>> sol = p3p(y, X)
        >>> err = (sol.R - torch.eye(3, dtype=torch.float64)).flatten(-2).abs().amax(-1)
        >>> bool((sol.valid & (err < 1e-9)).any())
        True
    """
    _check_trailing(bearings, "bearings", (3, 3))
    _check_trailing(points, "points", (3, 3))
    _check_float(bearings, "bearings")
    _check_float(points, "points")
    if bearings.shape != points.shape:
        raise ValueError(
            f"bearings and points must have the same shape (*, 3, 3), got {tuple(bearings.shape)} "
            f"and {tuple(points.shape)}"
        )
    dtype = torch.promote_types(bearings.dtype, points.dtype)
    y = F.normalize(bearings.to(dtype), dim=-1)
    X = points.to(dtype)
    eps = torch.finfo(dtype).eps
    tiny = eps**0.5

    # Centre and scale the world points: the conics then have O(1) entries whatever the units.
    centre = X.mean(-2, keepdim=True)
    scale = (X - centre).norm(dim=-1).amax(-1).clamp(min=torch.finfo(dtype).tiny)
    Xn = (X - centre) / scale[..., None, None]

    # Relabel so that the longest side is (1, 2): a_12 is the common factor of D1 and D2 and must
    # not vanish.
    a_sides = torch.stack(
        [_dot(Xn[..., 1, :] - Xn[..., 2, :], Xn[..., 1, :] - Xn[..., 2, :]),
         _dot(Xn[..., 0, :] - Xn[..., 2, :], Xn[..., 0, :] - Xn[..., 2, :]),
         _dot(Xn[..., 0, :] - Xn[..., 1, :], Xn[..., 0, :] - Xn[..., 1, :])],
        dim=-1,
    )  # (a12, a02, a01)
    longest = a_sides.argmax(-1)
    perms = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1]], device=X.device)
    # longest == 0: (1,2) already; == 1: side (0,2) -> relabel [1,2,0]; == 2: side (0,1) -> [2,0,1].
    perm = perms[longest]  # (*, 3)
    idx = perm.unsqueeze(-1).expand(*perm.shape, 3)
    y = torch.gather(y, -2, idx)
    Xn = torch.gather(Xn, -2, idx)
    X = torch.gather(X, -2, idx)

    y0, y1, y2 = y.unbind(-2)
    X0, X1, X2 = Xn.unbind(-2)
    c01, c02, c12 = _dot(y0, y1), _dot(y0, y2), _dot(y1, y2)
    a01, a02, a12 = _dot(X0 - X1, X0 - X1), _dot(X0 - X2, X0 - X2), _dot(X1 - X2, X1 - X2)
    cos = torch.stack([c01, c02, c12], -1)
    a = torch.stack([a01, a02, a12], -1)

    one, zero = torch.ones_like(c01), torch.zeros_like(c01)

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    M01 = mat([[one, -c01, zero], [-c01, one, zero], [zero, zero, zero]])
    M02 = mat([[one, zero, -c02], [zero, zero, zero], [-c02, zero, one]])
    M12 = mat([[zero, zero, zero], [zero, one, -c12], [zero, -c12, one]])
    e = lambda v: v[..., None, None]  # noqa: E731
    D1 = e(a12) * M01 - e(a01) * M12
    D2 = e(a12) * M02 - e(a02) * M12

    # det(D1 + g D2) = c0 + c1 g + c2 g^2 + c3 g^3 (for symmetric D1, D2).
    c0 = _det3(D1)
    c3 = _det3(D2)
    c1 = (_adj3(D1) * D2).sum((-1, -2))
    c2 = (D1 * _adj3(D2)).sum((-1, -2))
    # Solve in g = gamma or in its inverse, whichever has the larger leading coefficient, so the
    # monic form never divides by a vanishing number.
    use_gamma = c3.abs() >= c0.abs()
    lead = torch.where(use_gamma, c3, c0)
    p2 = torch.where(use_gamma, c2, c1)
    p1 = torch.where(use_gamma, c1, c2)
    p0 = torch.where(use_gamma, c0, c3)
    cmax = torch.stack([c0.abs(), c1.abs(), c2.abs(), c3.abs()], -1).amax(-1)
    lead_ok = lead.abs() > eps * cmax
    safe_lead = torch.where(lead_ok, lead, torch.ones_like(lead))
    root = _cubic_real_root(p2 / safe_lead, p1 / safe_lead, p0 / safe_lead)
    # Both ends vanishing means D1 (gamma form) is itself degenerate: root 0.
    root = torch.where(lead_ok, root, torch.zeros_like(root))
    alpha1 = torch.where(use_gamma, one, root)
    alpha2 = torch.where(use_gamma, root, one)
    D0 = e(alpha1) * D1 + e(alpha2) * D2
    D0 = D0 / D0.flatten(-2).norm(dim=-1).clamp(min=torch.finfo(dtype).tiny)[..., None, None]
    # Intersect the lines with the member of the pencil that D0 depends on least.
    D_other = torch.where(e(alpha1.abs() >= alpha2.abs()), D2, D1)
    D_other = D_other / D_other.flatten(-2).norm(dim=-1).clamp(min=torch.finfo(dtype).tiny)[..., None, None]

    # Split the degenerate conic D0 = l m^T + m l^T: adj(D0) = -p p^T with p = l x m (real lines
    # iff the diagonal of adj(D0) is non-positive), and D0 + [±p]_x is rank one, = 2 l m^T.
    B = _adj3(D0)
    diagB = B.diagonal(dim1=-2, dim2=-1)
    i_min = diagB.argmin(-1, keepdim=True)
    neg = -diagB.gather(-1, i_min).squeeze(-1)
    lines_ok = neg > eps
    beta = torch.sqrt(neg.clamp(min=torch.finfo(dtype).tiny))
    p = torch.gather(B, -1, i_min.unsqueeze(-2).expand(*B.shape[:-1], 1)).squeeze(-1) / beta.unsqueeze(-1)
    C = D0 + skew(p)
    flat = C.flatten(-2).abs().argmax(-1)
    r_idx, c_idx = flat // 3, flat % 3
    line_g = torch.gather(C, -2, r_idx[..., None, None].expand(*C.shape[:-2], 1, 3)).squeeze(-2)
    line_h = torch.gather(C, -1, c_idx[..., None, None].expand(*C.shape[:-2], 3, 1)).squeeze(-1)
    lines = F.normalize(torch.stack([line_g, line_h], dim=-2), dim=-1)  # (*, 2, 3)

    # Parametrise each line by two orthonormal points u, v and solve the homogeneous quadratic
    # [s t] Q [s t]^T = 0 with Q = [u v]^T D_other [u v].
    k = lines.abs().argmin(-1)
    ek = F.one_hot(k, 3).to(dtype)
    u = F.normalize(torch.cross(lines, ek, dim=-1), dim=-1)
    v = torch.cross(lines, u, dim=-1)
    Do = D_other.unsqueeze(-3)
    Du = (Do @ u.unsqueeze(-1)).squeeze(-1)
    Dv = (Do @ v.unsqueeze(-1)).squeeze(-1)
    q11, q12, q22 = _dot(u, Du), _dot(u, Dv), _dot(v, Dv)
    disc = q12 * q12 - q11 * q22
    real = disc >= -tiny * (q12 * q12 + (q11 * q22).abs())
    sq = torch.sqrt(disc.clamp(min=0.0))
    sgn = torch.where(q12 >= 0, 1.0, -1.0).to(dtype)
    qq = -(q12 + sgn * sq)
    # Roots (s, t) = (qq, q11) and (q22, qq): the cancellation-free pair of the quadratic formula.
    lam_a = qq.unsqueeze(-1) * u + q11.unsqueeze(-1) * v
    lam_b = q22.unsqueeze(-1) * u + qq.unsqueeze(-1) * v
    lam = torch.stack([lam_a, lam_b], dim=-2).flatten(-3, -2)  # (*, 4, 3)
    ok = real.repeat_interleave(2, dim=-1) & lines_ok.unsqueeze(-1)

    # Homogeneous -> metric: same sign, positive, scaled to the true side lengths.
    lam = lam * torch.where(lam.sum(-1, keepdim=True) >= 0, 1.0, -1.0).to(dtype)
    lam_norm = lam.norm(dim=-1)
    ok = ok & (lam.amin(-1) > tiny * lam_norm)
    cs = cos.unsqueeze(-2)
    asum = a.sum(-1, keepdim=True)
    ones = torch.ones_like(lam[..., 0])
    # Lambda^T (M01 + M02 + M12) Lambda: the sum of squared side lengths of the unscaled triangle.
    den = _distance_residuals(lam, cs, torch.zeros_like(lam)).sum(-1)
    ok = ok & (den > tiny * lam_norm.square())
    lam = lam * torch.sqrt(asum / torch.where(den > 0, den, ones)).unsqueeze(-1)
    lam = _refine_depths(lam, cs, a.unsqueeze(-2).expand(*lam.shape))

    # Pose from triads: exact rotation by construction, no SVD.
    Y = lam.unsqueeze(-1) * y.unsqueeze(-3)  # (*, 4, 3, 3), normalised world units
    Fy, cross_y = _triad(Y[..., 0, :], Y[..., 1, :], Y[..., 2, :])
    Fx, cross_x = _triad(X0, X1, X2)
    R = Fy @ Fx.unsqueeze(-3).transpose(-1, -2)
    Yw = Y * scale[..., None, None, None]
    t = Yw.mean(-2) - (R @ X.mean(-2)[..., None, :, None]).squeeze(-1)

    # Degenerate input: repeated/collinear world points, repeated bearings.
    nondeg = (
        (cross_x > tiny)
        & (a.amin(-1) > tiny)
        & (1.0 - cos.amax(-1) > eps * 16)
        & torch.isfinite(X).flatten(-2).all(-1)
        & torch.isfinite(y).flatten(-2).all(-1)
    )
    ok = ok & nondeg.unsqueeze(-1) & (cross_y > 0.5 * tiny)

    # Reprojection check on the three points (catches any numerically failed root).
    xc = (R.unsqueeze(-3) @ X.unsqueeze(-3).unsqueeze(-1)).squeeze(-1) + t.unsqueeze(-2)  # (*, 4, 3, 3)
    res = 1.0 - _dot(F.normalize(xc, dim=-1), y.unsqueeze(-3))
    ok = ok & (res.amax(-1) < tiny) & torch.isfinite(R).flatten(-2).all(-1) & torch.isfinite(t).all(-1)

    eye = torch.eye(3, dtype=dtype, device=X.device).expand_as(R)
    R = torch.where(ok[..., None, None], R, eye)
    t = torch.where(ok.unsqueeze(-1), t, torch.zeros_like(t))
    return P3PSolutions(R=R, t=t, valid=ok)
