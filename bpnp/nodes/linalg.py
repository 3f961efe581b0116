"""Batched linear solves with per-item fallbacks for the backward passes of declarative nodes.

The implicit function theorem needs ``w = H^-1 v`` (or a KKT system with constraints). At a
degenerate solution ``H`` is singular or indefinite for *some* items of a batch; those items must
not poison the others, must never produce NaN, and must say what happened. Every solver here
returns ``(w, status)`` with a :class:`~bpnp.nodes.status.Status` code per item:

- ``"damp"``: solve ``(H + delta I) w = v`` with the smallest ``delta`` in a geometric ladder that
  makes the Cholesky factorisation succeed (Levenberg style), status ``DAMPED``;
- ``"min_norm"``: the minimum-norm solution via the symmetric pseudo-inverse, status ``MIN_NORM``;
- ``"zero"``: ``w = 0`` (the item contributes no gradient), status ``ZEROED``.
Items whose inputs are not finite always get ``w = 0`` and status ``NONFINITE``.
"""

from __future__ import annotations

from typing import Callable

import torch

from bpnp.nodes.status import Status

SINGULAR_MODES = ("damp", "min_norm", "zero")


def _check_mode(mode: str) -> None:
    if mode not in SINGULAR_MODES:
        raise ValueError(f"singular mode must be one of {SINGULAR_MODES}, got {mode!r}")


def _default_rcond(dtype: torch.dtype) -> float:
    # A factor whose diagonal spans more than ~1/sqrt(eps) is numerically singular: the solve
    # would amplify rounding by more than the precision we have.
    return float(torch.finfo(dtype).eps) ** 0.5


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
        rcond: relative conditioning threshold; default ``sqrt(eps)`` of the dtype.
        damping_ladder: damping values, relative to ``trace(H)/d``, tried in order in ``"damp"``.
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
    status[~finite] = int(Status.NONFINITE)
    return w, status


def _fallback(H, v, mode, rcond, ladder):
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
        mode: fallback for singular items (``"damp"`` adds ``delta I`` to ``H``).

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

    def bordered(Hm):
        top = torch.cat([Hm, A.transpose(1, 2)], dim=2)
        bottom = torch.cat([A, torch.zeros(b, p, p, dtype=H.dtype, device=H.device)], dim=2)
        return torch.cat([top, bottom], dim=1)

    rhs = torch.cat([v, torch.zeros(b, p, dtype=v.dtype, device=v.device)], dim=1)
    finite = torch.isfinite(H).flatten(1).all(1) & torch.isfinite(A).flatten(1).all(1) & torch.isfinite(v).all(1)
    rhs = torch.where(finite[:, None], rhs, torch.zeros_like(rhs))
    K = bordered(torch.where(finite[:, None, None], H, torch.eye(d, dtype=H.dtype, device=H.device)))
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
    return sol[:, :d], sol[:, d:], status


def _cond_proxy(K: torch.Tensor) -> torch.Tensor:
    # Cheap scale of the matrix, used to decide that a solution is absurdly large relative to it.
    return 1.0 / K.abs().flatten(1).amax(1).clamp_min(torch.finfo(K.dtype).tiny)


def conjugate_gradient(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tol: float = 1e-10,
    max_iter: int = 200,
    mode: str = "damp",
    damping: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix-free batched (projected) conjugate gradient for ``H w = v``, with per-item stopping.

    With ``project`` (the orthogonal projector onto the constraints' tangent space) this is the
    projected CG of Gould, Hribar and Nocedal: it solves ``min 1/2 w^T H w - v^T w`` subject to
    ``A w = 0``, i.e. the ``w`` block of :func:`solve_kkt`, without ever forming ``H``.

    Items that meet non-positive curvature (singular or indefinite ``H``) are handled by ``mode``:
    ``"damp"`` restarts them on ``H + damping * mean|diag| I`` (status ``DAMPED``), ``"zero"``
    returns 0 (``ZEROED``); ``"min_norm"`` is treated as ``"damp"`` since CG has no pseudo-inverse.

    Args:
        hvp: maps (B, d) to (B, d), the per-item Hessian-vector product.
        v: (B, d).
        project: optional map (B, d) -> (B, d).
        tol: stop an item when its residual norm is below ``tol * ||v||``.
        max_iter: iteration limit (items that hit it get status ``MAX_ITER``).

    Returns:
        ``(w (B, d), status (B,))``.
    """
    _check_mode(mode)
    b = v.shape[0]
    finite = torch.isfinite(v).all(1)
    v = torch.where(finite[:, None], v, torch.zeros_like(v))
    w, status = _cg(hvp, v, project, tol, max_iter, shift=None)
    bad = (status == int(Status.ZEROED)) & finite
    if bool(bad.any()) and mode != "zero":
        # Damped restart for the items that met non-positive curvature; scale the shift by the
        # curvature CG observed along v so the damping is relative to the problem's size.
        vv = (v * v).sum(1).clamp_min(torch.finfo(v.dtype).tiny)
        scale = ((v * hvp(v)).sum(1).abs() / vv).clamp_min(torch.finfo(v.dtype).eps)
        w2, s2 = _cg(hvp, v, project, tol, max_iter, shift=damping * scale)
        take = bad & (s2 != int(Status.ZEROED))
        w = torch.where(take[:, None], w2, w)
        status = torch.where(take, torch.full_like(status, int(Status.DAMPED)), status)
    w = torch.where(torch.isfinite(w).all(1)[:, None], w, torch.zeros_like(w))
    status = torch.where(finite, status, torch.full_like(status, int(Status.NONFINITE)))
    return w, status


def _cg(hvp, v, project, tol, max_iter, shift):
    P = project if project is not None else (lambda x: x)

    def op(x):
        y = hvp(x)
        return y if shift is None else y + shift[:, None] * x

    b = v.shape[0]
    w = torch.zeros_like(v)
    r = P(v.clone())  # residual of the projected system at w = 0
    p = r.clone()
    rr = (r * r).sum(1)
    stop = (v.norm(dim=1) * tol).clamp_min(torch.finfo(v.dtype).tiny) ** 2
    active = rr > stop
    status = torch.full((b,), int(Status.OK), dtype=torch.long, device=v.device)
    tiny = torch.finfo(v.dtype).tiny
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Hp = P(op(p))
        curv = (p * Hp).sum(1)
        neg = active & (curv <= tiny * 1e3 * (p * p).sum(1).clamp_min(tiny))
        status = torch.where(neg, torch.full_like(status, int(Status.ZEROED)), status)
        active = active & ~neg
        alpha = torch.where(active, rr / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rr))
        w = w + alpha[:, None] * p
        r = r - alpha[:, None] * Hp
        rr_new = (r * r).sum(1)
        beta = torch.where(active, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr > stop)
    status = torch.where(active, torch.full_like(status, int(Status.MAX_ITER)), status)
    w = torch.where((status == int(Status.ZEROED))[:, None], torch.zeros_like(w), w)
    return w, status
