r"""Batched (weighted, ridge-regularised) linear least squares as a declarative node.

.. math::
    x^\star = \arg\min_x \; \sum_k \omega_k (a_k^\top x - b_k)^2 + \beta \|x\|^2

is reduced to the plain problem :math:`\min_x \|\tilde A x - \tilde b\|^2` with
:math:`\tilde A = [\,\mathrm{diag}(\sqrt\omega) A;\ \sqrt\beta I\,]`,
:math:`\tilde b = [\,\mathrm{diag}(\sqrt\omega) b;\ 0\,]`, which is solved by a reduced QR
factorisation of the column-scaled matrix :math:`\tilde A C = QR`, :math:`C = \mathrm{diag}(1 /
\|\tilde a_{:,j}\|)` (Jacobi scaling: the rank test does not depend on the units of the unknowns),
with :math:`R` cached for the backward pass.

Backward (the lecture's closed form, from the normal equations
:math:`N x = A^\top \Omega b`, :math:`N = A^\top \Omega A + \beta I`): with
:math:`v = \partial L / \partial x`, :math:`w = N^{-1} v = C R^{-1} R^{-\top} C v` (two triangular
solves) and the *unweighted* residual :math:`r = b - A x`,

.. math::
    \frac{\partial L}{\partial b} = \Omega A w, \qquad
    \frac{\partial L}{\partial A} = \Omega\,(r\, w^\top - (A w)\, x^\top), \qquad
    \frac{\partial L}{\partial \omega_k} = (a_k^\top w)\, r_k, \qquad
    \frac{\partial L}{\partial \beta} = -w^\top x .

The last two are not taken through :math:`\sqrt\omega` and :math:`\sqrt\beta` (whose derivative
is infinite at 0, which gave NaN for :math:`\beta = 0`): they are finite at :math:`\omega_k = 0`
and :math:`\beta = 0`, where they are the one-sided derivatives (the only feasible side).

``solver="cg"`` solves the same problem matrix-free (CGLS forward, conjugate gradient on the
column-scaled normal equations in the backward, the same closed-form gradients from its ``w``):
it keeps two n-vectors for the backward instead of ``R``, which is what a bi-level problem at
large n wants (docs/lectures.md).

Rank-deficient items (a diagonal entry of :math:`R` below ``rcond`` times the largest) get the
minimum-norm solution in the forward pass, a zero gradient, and status ``DEGENERATE``; see
:attr:`LeastSquares.last_status`.
"""

from __future__ import annotations

import torch
from torch import nn

from bpnp.nodes.linalg import bmv, bmv_t, cgls, conjugate_gradient
from bpnp.nodes.status import Status

SOLVERS = ("qr", "cg")


def _check(A: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"A and b must be tensors, got {type(A).__name__} and {type(b).__name__}")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (B, m, n), got {tuple(A.shape)}")
    if b.shape != A.shape[:2]:
        raise ValueError(f"b must have shape (B, m) = {tuple(A.shape[:2])}, got {tuple(b.shape)}")
    if not (A.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"A and b must be floating point, got {A.dtype} and {b.dtype}")


def _closed_form_grads(A, b, weights, x, w, needs):
    """The closed-form gradients (module docstring) from ``w = N^-1 v``; ``needs`` flags
    (A, b, weights, ridge). Returns ``(gA, gb, gw, gr)``, None where not needed."""
    need_A, need_b, need_w, need_r = needs
    Aw = bmv(A, w)  # (B, m)
    r = b - bmv(A, x)  # (B, m), unweighted residual
    gA = gb = gw = gr = None
    if need_A:
        gA = r.unsqueeze(-1) * w.unsqueeze(1) - Aw.unsqueeze(-1) * x.unsqueeze(1)
        gA = gA if weights is None else weights.unsqueeze(-1) * gA
    if need_b:
        gb = Aw if weights is None else weights * Aw
    if need_w:
        # N dx = a_k (b_k - a_k^T x) dw_k: finite at w_k = 0 (the one-sided derivative).
        gw = Aw * r
    if need_r:
        gr = -(w * x).sum(-1)  # N dx = -x dbeta
    return gA, gb, gw, gr


def _finite_rows(v):
    """An incoming gradient with non-finite items zeroed, and the (B,) mask of finite items: such
    an item gets zero gradients and status NONFINITE, as in every node (not NaN everywhere)."""
    finite = torch.isfinite(v).all(1)
    return torch.where(finite[:, None], v, torch.zeros_like(v)), finite


def _with_nonfinite(status, finite):
    return torch.where(finite, status, torch.full_like(status, int(Status.NONFINITE)))


def _column_scale(A, weights, ridge, augment):
    """Inverse column norms of the (weighted, ridge-augmented) matrix; 1 for a zero column."""
    sq = (A * A) if weights is None else weights.unsqueeze(-1) * A * A
    sq = sq.sum(1) + (ridge[:, None] if augment else 0.0)
    norm = sq.sqrt()
    return torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.ones_like(norm))


class _WeightedLstsq(torch.autograd.Function):
    """``x = argmin sum_k w_k (a_k^T x - b_k)^2 + beta ||x||^2`` per item, closed-form backward.

    The weights and the ridge enter the factorisation through ``sqrt`` (rows ``sqrt(w_k) a_k``
    and ``sqrt(beta) I``), but they are *not* differentiated through that ``sqrt``, whose
    derivative is infinite at 0: the gradients to ``w`` and ``beta`` come from the normal
    equations directly and are finite there (see :func:`least_squares`).
    """

    @staticmethod
    def forward(ctx, A, b, weights, ridge, augment, rcond, holder):
        B, m, n = A.shape
        At, bt = A, b
        if weights is not None:
            sw = weights.sqrt()
            At, bt = A * sw.unsqueeze(-1), b * sw
        if augment:
            eye = torch.eye(n, dtype=A.dtype, device=A.device)
            At = torch.cat([At, ridge.sqrt()[:, None, None] * eye], dim=1)
            bt = torch.cat([bt, torch.zeros(B, n, dtype=b.dtype, device=b.device)], dim=1)
        # Column (Jacobi) scaling: the rank test and the solve see unit columns, so an item is
        # not called rank deficient because its unknowns have different units (columns 1e4 and
        # 1e-4 apart in float32 were: cond 1e8, from units alone).
        c = _column_scale(A, weights, ridge, augment)  # (B, n)
        Q, R = torch.linalg.qr(At * c[:, None, :], mode="reduced")  # (B, M, n), (B, n, n)
        diag = torch.diagonal(R, dim1=-2, dim2=-1).abs()
        full_rank = diag.amin(-1) > rcond * diag.amax(-1).clamp_min(torch.finfo(A.dtype).tiny)
        full_rank &= torch.isfinite(R).flatten(1).all(1)
        # Triangular solves on rank-deficient items would divide by ~0: give them identity R
        # here and the min-norm solution below.
        eye = torch.eye(n, dtype=R.dtype, device=R.device)
        R_safe = torch.where(full_rank[:, None, None], R, eye)
        qtb = Q.transpose(1, 2) @ bt.unsqueeze(-1)
        x = c * torch.linalg.solve_triangular(R_safe, qtb, upper=True).squeeze(-1)
        if not bool(full_rank.all()):
            bad = ~full_rank
            x[bad] = (torch.linalg.pinv(At[bad]) @ bt[bad].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(A, b, weights, R_safe, c, x, full_rank)
        ctx.mark_non_differentiable(full_rank)
        ctx.holder = holder
        return x, full_rank

    @staticmethod
    def backward(ctx, v, _unused):
        A, b, weights, R, c, x, full_rank = ctx.saved_tensors
        v, finite = _finite_rows(v)
        # w = N^-1 v with N = A^T W A + beta I = diag(1/c) R^T R diag(1/c): the QR factor of the
        # scaled matrix is reused, so no normal equations are formed.
        z = torch.linalg.solve_triangular(R.transpose(1, 2), (c * v).unsqueeze(-1), upper=False)
        w = c * torch.linalg.solve_triangular(R, z, upper=True).squeeze(-1)  # (B, n)
        w = torch.where(full_rank[:, None], w, torch.zeros_like(w))  # rank deficient: no gradient
        status = torch.where(full_rank, int(Status.OK), int(Status.ZEROED)).long()
        ctx.holder["backward_status"] = _with_nonfinite(status, finite)
        return _closed_form_grads(A, b, weights, x, w, ctx.needs_input_grad[:4]) + (None, None, None)


class _MatrixFreeLstsq(torch.autograd.Function):
    """``solver="cg"``: the same problem and gradients as :class:`_WeightedLstsq`, matrix-free.

    Forward by :func:`~bpnp.nodes.linalg.cgls` (no graph), backward ``w = N^-1 v`` by conjugate
    gradient on the column-scaled normal equations with products ``A^T (W (A y))``. What it keeps
    for the backward is the inputs (references) and two n-vectors (``x`` and the column scale):
    no n x n factor and nothing per iteration.
    """

    @staticmethod
    def forward(ctx, A, b, weights, ridge, augment, tol, max_iter, holder):
        ridge_ = ridge if augment else None
        c = _column_scale(A, weights, ridge, augment)
        x, _, converged = cgls(A, b, weights, ridge_, c, tol, max_iter)
        ctx.augment, ctx.tol, ctx.max_iter, ctx.holder = augment, tol, max_iter, holder
        ctx.save_for_backward(A, b, weights, ridge, c, x)
        ctx.mark_non_differentiable(converged)
        return x, converged

    @staticmethod
    def backward(ctx, v, _unused):
        A, b, weights, ridge, c, x = ctx.saved_tensors
        v, finite = _finite_rows(v)

        def hvp(y):  # C N C y, N = A^T W A + beta I
            Ay = bmv(A, c * y)
            Ay = Ay if weights is None else weights * Ay
            Ny = bmv_t(A, Ay)
            return c * (Ny + ridge[:, None] * c * y if ctx.augment else Ny)

        y, status = conjugate_gradient(hvp, c * v, tol=ctx.tol, max_iter=ctx.max_iter, mode="zero")
        ctx.holder["backward_status"] = _with_nonfinite(status, finite)
        return _closed_form_grads(A, b, weights, x, c * y, ctx.needs_input_grad[:4]) + (None, None, None, None)


def least_squares(
    A: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor | None = None,
    ridge: float | torch.Tensor = 0.0,
    rcond: float | None = None,
    solver: str = "qr",
    tol: float | None = None,
    max_iter: int = 1000,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``min_x sum_k w_k (a_k^T x - b_k)^2 + ridge ||x||^2`` per batch item.

    Args:
        A: (B, m, n) design matrices; ``m >= n`` unless ``ridge > 0``.
        b: (B, m) targets.
        weights: optional (B, m) non-negative row weights (0 removes a row, e.g. padding).
        ridge: ridge strength ``>= 0``, a float or a (B,) tensor (differentiable).
        rcond: relative threshold on ``|diag R|`` of the column-scaled matrix below which an item
            is rank-deficient; default ``m * eps`` of the dtype (rows including the ridge's).
            Only for ``solver="qr"``.
        solver: ``"qr"`` (default): QR of the column-scaled matrix, ``R`` kept for the backward
            (two triangular solves); ``"cg"``: matrix-free, CGLS forward and conjugate-gradient
            backward (:class:`_MatrixFreeLstsq`); it keeps only two n-vectors beyond the inputs,
            for problems where the n x n factor is the memory that matters, at the price of
            iterations (their count grows with the condition number). No rank test: a
            rank-deficient item converges to the minimum-norm solution and gets a zero gradient
            where the backward's CG meets zero curvature.
        tol, max_iter: ``solver="cg"`` only: relative residual tolerance of both CG solves
            (default :func:`~bpnp.nodes.linalg.default_cg_tol`) and their iteration limit.
        info: optional dict; after a backward pass ``info["backward_status"]`` holds (B,) codes:
            ``OK``, ``ZEROED`` (rank deficient, qr; zero curvature met, cg), ``MAX_ITER`` (cg) or
            ``NONFINITE`` (a non-finite incoming gradient: that item's gradients are zero).

    Gradients are finite everywhere on the feasible set: to a weight ``w_k = 0`` (a removed or
    padded row) the one-sided derivative ``(a_k^T N^-1 v)(b_k - a_k^T x)`` of adding that row
    back, with ``N = A^T W A + ridge I`` (not 0: the loss does depend on the weight), and to
    ``ridge = 0`` the one-sided ``-x^T N^-1 v``. Rank-deficient items get zero gradients.

    Returns:
        ``(x, status)``: (B, n) solutions and (B,) status codes: ``OK`` or ``DEGENERATE`` (qr);
        ``OK`` or ``MAX_ITER`` (cg).

    Example:
        >>> A = torch.eye(3).expand(2, 3, 3); b = torch.ones(2, 3)
        >>> least_squares(A, b)[0]
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    _check(A, b)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    B, m, n = A.shape
    if weights is not None:
        if weights.shape != (B, m):
            raise ValueError(f"weights must have shape (B, m) = {(B, m)}, got {tuple(weights.shape)}")
        if bool((weights < 0).any()):
            raise ValueError("weights must be non-negative")
        weights = weights.to(A.dtype)
    ridge_t = torch.as_tensor(ridge, dtype=A.dtype, device=A.device)
    if bool((ridge_t < 0).any()):
        raise ValueError(f"ridge must be non-negative, got {ridge}")
    if ridge_t.ndim not in (0, 1) or (ridge_t.ndim == 1 and ridge_t.shape[0] != B):
        raise ValueError(f"ridge must be a float, a 0-d tensor or a (B,) = ({B},) tensor, got shape {tuple(ridge_t.shape)}")
    augment = bool(ridge_t.requires_grad or bool((ridge_t > 0).any()))
    if not augment and m < n:
        raise ValueError(f"underdetermined system: A has {m} rows < {n} columns; use ridge > 0")
    ridge_b = ridge_t.expand(B) if ridge_t.ndim == 0 else ridge_t
    holder = {} if info is None else info
    if solver == "cg":
        x, converged = _MatrixFreeLstsq.apply(A, b, weights, ridge_b, augment, tol, int(max_iter), holder)
        return x, torch.where(converged, int(Status.OK), int(Status.MAX_ITER)).long()
    rows = m + (n if augment else 0)
    rcond = rows * float(torch.finfo(A.dtype).eps) if rcond is None else rcond
    x, full_rank = _WeightedLstsq.apply(A, b, weights, ridge_b, augment, rcond, holder)
    status = torch.where(full_rank, int(Status.OK), int(Status.DEGENERATE)).long()
    return x, status


class LeastSquares(nn.Module):
    """Layer form of :func:`least_squares` with a fixed ``ridge``; ``last_status`` after each call,
    ``last_backward_status`` after a backward pass."""

    def __init__(self, ridge: float = 0.0, rcond: float | None = None, solver: str = "qr",
                 tol: float | None = None, max_iter: int = 1000) -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.ridge, self.rcond, self.solver, self.tol, self.max_iter = ridge, rcond, solver, tol, max_iter
        self.last_status: torch.Tensor | None = None
        self._info: dict = {}

    @property
    def last_backward_status(self) -> torch.Tensor | None:
        """(B,) status codes of the last backward pass through the last forward (None before one)."""
        return self._info.get("backward_status")

    def forward(self, A: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        self._info = {}
        x, self.last_status = least_squares(A, b, weights=weights, ridge=self.ridge, rcond=self.rcond,
                                            solver=self.solver, tol=self.tol, max_iter=self.max_iter, info=self._info)
        return x
