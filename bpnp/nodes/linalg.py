"""Batched linear solves with per-item fallbacks for the backward passes of declarative nodes.

The implicit function theorem needs ``w = H^-1 v`` (or a KKT system with constraints). At a
degenerate solution ``H`` is singular or indefinite for *some* items of a batch; those items must
not poison the others, must never produce NaN, and must say what happened. Every solver here
returns ``(w, status)`` with a :class:`~bpnp.nodes.status.Status` code per item:

- ``"damp"``: solve ``(H + delta diag|H|) w = v`` with the smallest ``delta`` in a geometric
  ladder that makes the Cholesky factorisation succeed (Levenberg-Marquardt style), status
  ``DAMPED``;
- ``"min_norm"``: the minimum-norm solution of the Jacobi-scaled system (below) via the symmetric
  pseudo-inverse, status ``MIN_NORM``;
- ``"zero"``: ``w = 0`` (the item contributes no gradient), status ``ZEROED``.
Items whose inputs are not finite always get ``w = 0`` and status ``NONFINITE``.

**Scaling.** Whether a system is "singular" must not depend on the units of the unknowns: a pose
Hessian mixes radians and metres, and a distant scene (small angular extent, large depth) has
diagonal entries many orders apart although it is well posed. Every rank / conditioning decision
and every damping is therefore made on the Jacobi-scaled matrix ``D^-1/2 H D^-1/2``,
``D = diag|H|``, whose diagonal is 1 (van der Sluis: this is within a factor ``d`` of the best
diagonal scaling for the condition number); the solve itself is the same.
"""

from __future__ import annotations

from typing import Callable

import torch

from bpnp.nodes.status import Status

SINGULAR_MODES = ("damp", "min_norm", "zero")


def bmv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A x`` per item: ``A`` (B, m, n), ``x`` (B, n) -> (B, m).

    Formed as the row vector ``x^T A^T``: torch's CPU ``bmm`` with a one-column right operand,
    ``A @ x[..., None]``, was 2-12x slower than the same product with a one-row left operand
    at m = n = 256-1,000 (contiguous or transposed ``A``, float32 or float64; the 2-core x86 CPU
    of docs/benchmarks.md, ``python bench/nodes.py --only matvec``)."""
    return (x.unsqueeze(-2) @ A.transpose(-1, -2)).squeeze(-2)


def bmv_t(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A^T x`` per item: ``A`` (B, m, n), ``x`` (B, m) -> (B, n), as the row vector ``x^T A``
    (see :func:`bmv`)."""
    return (x.unsqueeze(-2) @ A).squeeze(-2)


def _check_mode(mode: str) -> None:
    if mode not in SINGULAR_MODES:
        raise ValueError(f"singular mode must be one of {SINGULAR_MODES}, got {mode!r}")


def _default_rcond(dtype: torch.dtype) -> float:
    # A factor whose diagonal spans more than ~1/sqrt(eps) is numerically singular: the solve
    # would amplify rounding by more than the precision we have.
    return float(torch.finfo(dtype).eps) ** 0.5


def jacobi_scale(H: torch.Tensor) -> torch.Tensor:
    """(B, d) symmetric Jacobi scaling ``s = |diag H|^-1/2`` of (B, d, d) matrices, so that
    ``s_i H_ij s_j`` has a unit diagonal (up to sign).

    A zero (or non-finite) diagonal entry gets the scale of the item's mean diagonal instead: its
    row and column then stay (near) zero in the scaled matrix, which the rank test sees as
    singular, as it is; an all-zero item gets scale 1.
    """
    diag = torch.diagonal(H, dim1=-2, dim2=-1).abs()
    diag = torch.where(torch.isfinite(diag), diag, torch.zeros_like(diag))
    d = diag.shape[-1]
    mean = diag.sum(-1, keepdim=True) / d
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    # Entries below tiny relative to the mean would overflow the scale; treat them as zero.
    use = diag > mean * torch.finfo(H.dtype).eps ** 2
    return torch.where(use, diag, mean).rsqrt()


def _cholesky_ok(H: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of each item and a mask of items that are positive definite and
    well conditioned (ratio of smallest to largest diagonal entry of L squared above rcond)."""
    L, info = torch.linalg.cholesky_ex(H)
    diag = torch.diagonal(L, dim1=-2, dim2=-1)
    ok = (info == 0) & torch.isfinite(L).flatten(1).all(dim=1)
    dmax = diag.abs().amax(dim=-1).clamp_min(torch.finfo(H.dtype).tiny)
    dmin = diag.abs().amin(dim=-1)
    ok = ok & ((dmin / dmax) ** 2 > rcond)
    return L, ok


def solve_spd(
    H: torch.Tensor,
    v: torch.Tensor,
    mode: str = "damp",
    rcond: float | None = None,
    damping_ladder: tuple[float, ...] = (1e-8, 1e-6, 1e-4, 1e-2, 1.0),
    force_fallback: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``H w = v`` per item for symmetric positive (semi-)definite ``H``.

    Args:
        H: (B, d, d) symmetric matrices.
        v: (B, d) right-hand sides.
        mode: what to do for items whose ``H`` is singular, indefinite or ill-conditioned:
            ``"damp"``, ``"min_norm"`` or ``"zero"`` (see module docstring).
        rcond: relative conditioning threshold on the Jacobi-scaled ``H`` (the squared ratio of
            the smallest to the largest Cholesky pivot); default ``sqrt(eps)`` of the dtype
            (1.5e-8 in float64, 3.5e-4 in float32), i.e. items whose scaled condition number
            is above ``~1/sqrt(eps)`` are not trusted.
        damping_ladder: damping values ``delta``, relative to the diagonal of ``H`` (``H + delta
            diag|H|``, i.e. ``delta I`` on the scaled matrix), tried in order in ``"damp"``.
        force_fallback: optional (B,) bool: items known to be degenerate (e.g. by the forward
            solver) take the fallback even if their factorisation happens to succeed.

    Returns:
        ``(w, status)`` with ``w`` (B, d), finite, and ``status`` (B,) int64.

    Example:
        >>> H = torch.eye(2).expand(3, 2, 2).clone(); H[1] = 0.0
        >>> w, status = solve_spd(H, torch.ones(3, 2), mode="zero")
        >>> status.tolist()
        [0, 4, 0]
    """
    _check_mode(mode)
    if H.ndim != 3 or H.shape[-1] != H.shape[-2] or v.shape != H.shape[:-1]:
        raise ValueError(f"expected H (B, d, d) and v (B, d), got {tuple(H.shape)} and {tuple(v.shape)}")
    rcond = _default_rcond(H.dtype) if rcond is None else rcond
    b, d = v.shape
    finite = torch.isfinite(H).flatten(1).all(dim=1) & torch.isfinite(v).all(dim=1)
    Hs = torch.where(finite[:, None, None], H, torch.eye(d, dtype=H.dtype, device=H.device))
    vs = torch.where(finite[:, None], v, torch.zeros_like(v))
    # Solve the Jacobi-scaled system (s H s) z = s v, w = s z: same solution, but the rank test
    # and the damping below no longer depend on the units of the unknowns (module docstring).
    s = jacobi_scale(Hs)
    Hs = s[:, :, None] * Hs * s[:, None, :]
    vs = s * vs

    L, ok = _cholesky_ok(Hs, rcond)
    if force_fallback is not None:
        ok = ok & ~force_fallback
    w = torch.cholesky_solve(vs.unsqueeze(-1), L).squeeze(-1)
    w = torch.where(ok[:, None], w, torch.zeros_like(w))
    status = torch.full((b,), int(Status.OK), dtype=torch.long, device=H.device)

    bad = ~ok & finite
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        w_bad, s_bad = _fallback(Hs[idx], vs[idx], mode, rcond, damping_ladder)
        w[idx] = w_bad
        status[idx] = s_bad
    w = s * w
    blown = ~torch.isfinite(w).all(1)  # overflow in a solve: never let it through
    w = torch.where(blown[:, None], torch.zeros_like(w), w)
    status[blown] = int(Status.ZEROED)
    status[~finite] = int(Status.NONFINITE)
    return w, status


def _fallback(H, v, mode, rcond, ladder):
    """Fallback solves of the (already Jacobi-scaled) items that failed the rank test."""
    b, d = v.shape
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    if mode == "zero":
        return torch.zeros_like(v), torch.full((b,), int(Status.ZEROED), dtype=torch.long, device=H.device)
    if mode == "min_norm":
        w = (torch.linalg.pinv(H, hermitian=True, rtol=rcond) @ v.unsqueeze(-1)).squeeze(-1)
        good = torch.isfinite(w).all(dim=1)
        w = torch.where(good[:, None], w, torch.zeros_like(w))
        s = torch.where(good, int(Status.MIN_NORM), int(Status.ZEROED))
        return w, s.long()
    # "damp": smallest damping from the ladder that makes the item well posed.
    scale = (torch.diagonal(H, dim1=-2, dim2=-1).abs().sum(-1) / d).clamp_min(torch.finfo(H.dtype).tiny)
    w = torch.zeros_like(v)
    s = torch.full((b,), int(Status.ZEROED), dtype=torch.long, device=H.device)
    todo = torch.ones(b, dtype=torch.bool, device=H.device)
    for rel in ladder:
        Hd = H + (rel * scale)[:, None, None] * eye
        L, ok = _cholesky_ok(Hd, rcond * rel)  # damping itself bounds the conditioning
        ok = ok & todo
        if bool(ok.any()):
            sol = torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1)
            w = torch.where(ok[:, None], sol, w)
            s = torch.where(ok, torch.full_like(s, int(Status.DAMPED)), s)
            todo = todo & ~ok
        if not bool(todo.any()):
            break
    return w, s


def solve_kkt(
    H: torch.Tensor,
    A: torch.Tensor,
    v: torch.Tensor,
    mode: str = "damp",
    rcond: float | None = None,
    damping_ladder: tuple[float, ...] = (1e-8, 1e-6, 1e-4, 1e-2, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve the equality-constrained system ``[[H, A^T], [A, 0]] [w; mu] = [v; 0]`` per item.

    ``w`` is the projection of ``H^-1 v`` onto the tangent space of the constraints, as the
    implicit function theorem with equality constraints needs it; ``H`` may be singular in
    directions the constraints remove, so the bordered (indefinite) matrix is solved by LU.

    Args:
        H: (B, d, d) Hessian of the Lagrangian.
        A: (B, p, d) constraint Jacobian, p < d, full row rank.
        v: (B, d) right-hand side.
        mode: fallback for singular items (``"damp"`` adds ``delta diag|H|`` to ``H``).
        rcond: a solution larger than ``1 / rcond`` times the right-hand side over the largest
            entry of the (scaled) bordered matrix is rejected as near singular; default
            ``sqrt(eps)``. The test and the damping are made on the symmetrically scaled
            system (Jacobi on ``H``, unit constraint rows), so they do not depend on units.

    Returns:
        ``(w (B, d), mu (B, p), status (B,))``.
    """
    _check_mode(mode)
    b, p, d = A.shape
    if H.shape != (b, d, d) or v.shape != (b, d):
        raise ValueError(
            f"expected H (B, d, d), A (B, p, d), v (B, d); got {tuple(H.shape)}, {tuple(A.shape)}, {tuple(v.shape)}"
        )
    rcond = _default_rcond(H.dtype) if rcond is None else rcond
    finite = torch.isfinite(H).flatten(1).all(1) & torch.isfinite(A).flatten(1).all(1) & torch.isfinite(v).all(1)
    H = torch.where(finite[:, None, None], H, torch.eye(d, dtype=H.dtype, device=H.device))
    A = torch.where(finite[:, None, None], A, torch.zeros_like(A))
    v = torch.where(finite[:, None], v, torch.zeros_like(v))
    # Symmetric scaling of the bordered matrix, diag(s, t) K diag(s, t): Jacobi on H (units of
    # the unknowns) and unit rows for the scaled constraints (units of each constraint), so that
    # the blow-up test and the damping below do not depend on units. w = s w^, mu = t mu^.
    sc = jacobi_scale(H)
    H = sc[:, :, None] * H * sc[:, None, :]
    A = A * sc[:, None, :]
    rn = A.norm(dim=2)
    tc = torch.where(rn > 0, 1.0 / torch.where(rn > 0, rn, torch.ones_like(rn)), torch.ones_like(rn))
    A = A * tc[:, :, None]
    v = sc * v

    def bordered(Hm):
        top = torch.cat([Hm, A.transpose(1, 2)], dim=2)
        bottom = torch.cat([A, torch.zeros(b, p, p, dtype=H.dtype, device=H.device)], dim=2)
        return torch.cat([top, bottom], dim=1)

    rhs = torch.cat([v, torch.zeros(b, p, dtype=v.dtype, device=v.device)], dim=1)
    K = bordered(H)
    K = torch.where(finite[:, None, None], K, torch.eye(d + p, dtype=H.dtype, device=H.device))

    def attempt(Km):
        sol, info = torch.linalg.solve_ex(Km, rhs)
        # LU reports exact singularity only; also reject solutions that blew up (near-singular).
        ok = (info == 0) & torch.isfinite(sol).all(1)
        big = sol.abs().amax(1) * rcond > rhs.abs().amax(1).clamp_min(torch.finfo(H.dtype).tiny) * _cond_proxy(Km)
        return sol, ok & ~big

    sol, ok = attempt(K)
    status = torch.full((b,), int(Status.OK), dtype=torch.long, device=H.device)
    sol = torch.where(ok[:, None], sol, torch.zeros_like(sol))
    bad = ~ok & finite
    if bool(bad.any()):
        status[bad] = int(Status.ZEROED)
        if mode == "min_norm":
            alt = (torch.linalg.pinv(K, hermitian=True, rtol=rcond) @ rhs.unsqueeze(-1)).squeeze(-1)
            good = bad & torch.isfinite(alt).all(1)
            sol = torch.where(good[:, None], alt, sol)
            status[good] = int(Status.MIN_NORM)
        elif mode == "damp":
            scale = (torch.diagonal(H, dim1=-2, dim2=-1).abs().sum(-1) / d).clamp_min(torch.finfo(H.dtype).tiny)
            todo = bad.clone()
            for rel in damping_ladder:
                eye = torch.eye(d, dtype=H.dtype, device=H.device)
                alt, ok2 = attempt(bordered(H + (rel * scale)[:, None, None] * eye))
                good = todo & ok2
                sol = torch.where(good[:, None], alt, sol)
                status[good] = int(Status.DAMPED)
                todo = todo & ~good
                if not bool(todo.any()):
                    break
    status[~finite] = int(Status.NONFINITE)
    w, mu = sc * sol[:, :d], tc * sol[:, d:]
    blown = ~(torch.isfinite(w).all(1) & torch.isfinite(mu).all(1))
    w = torch.where(blown[:, None], torch.zeros_like(w), w)
    mu = torch.where(blown[:, None], torch.zeros_like(mu), mu)
    status[blown] = int(Status.ZEROED)
    return w, mu, status


def _cond_proxy(K: torch.Tensor) -> torch.Tensor:
    # Cheap scale of the matrix, used to decide that a solution is absurdly large relative to it.
    return 1.0 / K.abs().flatten(1).amax(1).clamp_min(torch.finfo(K.dtype).tiny)


def default_cg_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance of :func:`conjugate_gradient` when none is given: ``1e-10``,
    but never below ``10 eps`` of the dtype (1.2e-6 in float32), since a residual below rounding
    level cannot be certified and the iterations past it only add rounding noise."""
    return max(1e-10, 10 * float(torch.finfo(dtype).eps))


def constraint_basis(
    A: torch.Tensor, rcond: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the row space of each item's constraint Jacobian, with a rank test.

    QR of the row-normalised ``A^T``: ``diag(s) A = (Q R)^T`` with ``s = 1 / ||A_k||`` (so the
    rank test does not depend on the scale of each constraint) and ``Q`` (B, d, p) orthonormal.

    Args:
        A: (B, p, d) constraint Jacobians, ``p <= d``.
        rcond: an item is rank deficient when ``min |diag R| <= rcond`` (the sine of the angle
            between a normalised constraint gradient and the span of the others; exactly 0 for a
            zero gradient); default ``sqrt(eps)`` of the dtype, as for :func:`solve_spd`.

    Returns:
        ``(Q (B, d, p), R (B, p, p), s (B, p), ok (B,) bool)``: ``Q`` is zero and ``R`` the
        identity for items that are rank deficient or not finite (``ok`` False), so that
        ``u - Q Q^T u`` is then the identity and nothing downstream divides by zero.
    """
    rcond = _default_rcond(A.dtype) if rcond is None else rcond
    b, p, d = A.shape
    finite = torch.isfinite(A).flatten(1).all(1)
    A = torch.where(finite[:, None, None], A, torch.zeros_like(A))
    norm = A.norm(dim=2)
    s = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.ones_like(norm))
    Q, R = torch.linalg.qr((A * s[:, :, None]).transpose(1, 2), mode="reduced")  # (B, d, p), (B, p, p)
    ok = finite & (torch.diagonal(R, dim1=-2, dim2=-1).abs().amin(-1) > rcond)
    ok = ok & torch.isfinite(Q).flatten(1).all(1) & torch.isfinite(R).flatten(1).all(1)
    eye = torch.eye(p, dtype=A.dtype, device=A.device)
    Q = torch.where(ok[:, None, None], Q, torch.zeros_like(Q))
    R = torch.where(ok[:, None, None], R, eye)
    return Q, R, s, ok


def conjugate_gradient(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tol: float | None = None,
    max_iter: int = 200,
    mode: str = "damp",
    damping: float = 1e-4,
    rcond: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix-free batched (projected) conjugate gradient for ``H w = v``, with per-item stopping.

    With ``project`` (the orthogonal projector onto the constraints' tangent space) this is the
    projected CG of Gould, Hribar and Nocedal: it solves ``min 1/2 w^T H w - v^T w`` subject to
    ``A w = 0``, i.e. the ``w`` block of :func:`solve_kkt`, without ever forming ``H``. Every
    product is ``P H P`` and the residual is re-projected after each update: the Hessian of a
    Lagrangian need only be positive definite on the tangent space, and rounding (float32) that
    lets a direction drift out of it would otherwise meet the normal-space curvature, which can
    be anything (wrong answers with status OK, or spurious negative curvature).

    Items that meet non-positive or negligible curvature (a Rayleigh quotient ``p^T H p / p^T p``
    at most ``rcond`` times the largest one seen: singular, indefinite, or too ill-conditioned to
    trust) are handled by ``mode``: ``"damp"`` restarts them on ``H + damping * s I`` with ``s``
    the curvature along ``v`` (status ``DAMPED``), ``"zero"`` returns 0 (``ZEROED``);
    ``"min_norm"`` is treated as ``"damp"`` since CG has no pseudo-inverse.

    Args:
        hvp: maps (B, d) to (B, d), the per-item Hessian-vector product.
        v: (B, d).
        project: optional map (B, d) -> (B, d).
        tol: stop an item when its residual norm is below ``tol * ||v||``; default
            :func:`default_cg_tol` (1e-10 in float64, 1.2e-6 in float32). A smaller value is
            raised to ``eps`` of the dtype.
        max_iter: iteration limit (items that hit it get status ``MAX_ITER``).
        rcond: relative curvature threshold (above); default ``10 eps`` of the dtype: a
            Rayleigh quotient below it is rounding noise of the largest, i.e. ``H`` is singular
            (or more ill-conditioned than the precision resolves) along that direction.

    Returns:
        ``(w (B, d), status (B,))``.
    """
    _check_mode(mode)
    eps = float(torch.finfo(v.dtype).eps)
    tol = default_cg_tol(v.dtype) if tol is None else max(float(tol), eps)
    rcond = 10 * eps if rcond is None else rcond
    finite = torch.isfinite(v).all(1)
    v = torch.where(finite[:, None], v, torch.zeros_like(v))
    w, status = _cg(hvp, v, project, tol, max_iter, None, rcond)
    bad = (status == int(Status.ZEROED)) & finite
    if bool(bad.any()) and mode != "zero":
        # Damped restart for the items that met non-positive curvature; scale the shift by the
        # curvature CG observed along v so the damping is relative to the problem's size.
        pv = project(v) if project is not None else v
        vv = (pv * pv).sum(1).clamp_min(torch.finfo(v.dtype).tiny)
        Hpv = hvp(pv)
        Hpv = project(Hpv) if project is not None else Hpv
        scale = ((pv * Hpv).sum(1).abs() / vv).clamp_min(eps)
        # The shift bounds the curvature below; only a non-positive one fails the restart.
        w2, s2 = _cg(hvp, v, project, tol, max_iter, damping * scale, 0.0)
        take = bad & (s2 != int(Status.ZEROED))
        w = torch.where(take[:, None], w2, w)
        status = torch.where(take, torch.full_like(status, int(Status.DAMPED)), status)
    blown = ~torch.isfinite(w).all(1)
    w = torch.where(blown[:, None], torch.zeros_like(w), w)
    status = torch.where(blown, torch.full_like(status, int(Status.ZEROED)), status)
    status = torch.where(finite, status, torch.full_like(status, int(Status.NONFINITE)))
    return w, status


def _cg(hvp, v, project, tol, max_iter, shift, rcond):
    P = project if project is not None else (lambda x: x)

    def op(x):
        x = P(x)
        y = hvp(x)
        return P(y if shift is None else y + shift[:, None] * x)

    b = v.shape[0]
    tiny = torch.finfo(v.dtype).tiny
    w = torch.zeros_like(v)
    r = P(v.clone())  # residual of the projected system at w = 0
    p = r.clone()
    rr = (r * r).sum(1)
    stop = (v.norm(dim=1) * tol).clamp_min(tiny) ** 2
    active = rr > stop
    status = torch.full((b,), int(Status.OK), dtype=torch.long, device=v.device)
    top = torch.zeros_like(rr)  # largest Rayleigh quotient seen per item: the curvature scale
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Hp = op(p)
        pp = (p * p).sum(1).clamp_min(tiny)
        curv = (p * Hp).sum(1)
        top = torch.where(active, torch.maximum(top, curv / pp), top)
        # Relative test: a curvature that is rounding noise next to the largest one is as bad
        # as a negative one (alpha would be huge and wrong), whatever the units of H.
        neg = active & ((curv <= tiny * 1e3 * pp) | (curv <= rcond * top * pp) | ~torch.isfinite(curv))
        status = torch.where(neg, torch.full_like(status, int(Status.ZEROED)), status)
        active = active & ~neg
        alpha = torch.where(active, rr / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rr))
        w = w + alpha[:, None] * p
        # Re-projection keeps the residual (and so every direction) in the tangent space.
        r = P(r - alpha[:, None] * Hp)
        rr_new = (r * r).sum(1)
        beta = torch.where(active, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr > stop)
    status = torch.where(active, torch.full_like(status, int(Status.MAX_ITER)), status)
    w = torch.where((status == int(Status.ZEROED))[:, None], torch.zeros_like(w), w)
    return w, status


def cgls(
    A: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor | None = None,
    ridge: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Matrix-free batched least squares by CGLS (conjugate gradient on the normal equations).

    Solves :math:`\min_x \sum_k \omega_k (a_k^\top x - b_k)^2 + \beta \|x\|^2` per item using only
    products with ``A`` and ``A^T`` (Hestenes-Stiefel's CGLS, which updates the residual
    :math:`b - Ax` instead of forming :math:`A^\top A`, so rounding sees :math:`\kappa(A)`, not its
    square). ``col_scale`` ``C`` is a right preconditioner (the iteration runs on :math:`A C`,
    ``x = C y``), e.g. the inverse column norms as in :func:`bpnp.nodes.least_squares`. Its state is
    a few vectors of size m and n; nothing of size m x n is allocated.

    Written in plain differentiable torch ops with per-item stopping by ``torch.where``: under
    ``torch.no_grad()`` it is a forward solver (the least-squares node's ``solver="cg"``), with
    autograd on it is the *unrolled* solver every iteration of which is kept in the graph (the
    comparison of ``bpnp.experiments.bilevel_least_squares``). A stopped item is frozen, so no
    division by a vanishing residual enters the graph.

    Args:
        A: (B, m, n); b: (B, m).
        weights: optional (B, m) non-negative row weights; ridge: optional (B,) ``beta >= 0``.
        col_scale: optional (B, n) positive column scaling.
        tol: stop an item when its preconditioned normal residual
            :math:`\|C (A^\top \Omega (b - A x) - \beta x)\|` is at most ``tol`` times its initial
            value; default :func:`default_cg_tol` (1e-10 in float64, 1.2e-6 in float32).
        max_iter: iteration limit.

    Returns:
        ``(x (B, n), iterations (B,) long, converged (B,) bool)``.
    """
    tol = default_cg_tol(A.dtype) if tol is None else tol
    B, m, n = A.shape
    sw = None if weights is None else weights.sqrt()
    c = torch.ones(B, n, dtype=A.dtype, device=A.device) if col_scale is None else col_scale
    sb = None if ridge is None else ridge.sqrt()[:, None]  # the ridge as n extra rows sqrt(beta) I

    def op(y):  # (A C y, sqrt(beta) C y): the augmented matrix times y
        q = bmv(A, c * y)
        q = q if sw is None else sw * q
        return q, (None if sb is None else sb * c * y)

    def op_t(r, r2):  # C (A^T sqrt(w) r + sqrt(beta) r2)
        s = bmv_t(A, r if sw is None else sw * r)
        return c * (s if r2 is None else s + sb * r2)

    y = torch.zeros(B, n, dtype=A.dtype, device=A.device)
    r = b if sw is None else sw * b
    r2 = None if sb is None else torch.zeros(B, n, dtype=A.dtype, device=A.device)
    s = op_t(r, r2)
    p = s
    gamma = (s * s).sum(1)
    stop = (tol**2) * gamma.detach()
    active = gamma.detach() > stop
    iterations = torch.zeros(B, dtype=torch.long, device=A.device)
    tiny = torch.finfo(A.dtype).tiny
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q, q2 = op(p)
        qq = (q * q).sum(1) + (0 if q2 is None else (q2 * q2).sum(1))
        ok = active & (qq.detach() > tiny)
        alpha = torch.where(ok, gamma / torch.where(ok, qq, torch.ones_like(qq)), torch.zeros_like(qq))
        y = y + alpha[:, None] * p
        r = r - alpha[:, None] * q
        r2 = None if r2 is None else r2 - alpha[:, None] * q2
        s = op_t(r, r2)
        gamma_new = (s * s).sum(1)
        beta = torch.where(ok, gamma_new / torch.where(ok, gamma, torch.ones_like(gamma)), torch.zeros_like(gamma))
        p = torch.where(ok[:, None], s + beta[:, None] * p, p)
        gamma = torch.where(ok, gamma_new, gamma)
        iterations = iterations + ok.long()
        active = ok & (gamma.detach() > stop)
    converged = ~active
    return c * y, iterations, converged
