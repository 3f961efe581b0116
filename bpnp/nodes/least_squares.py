r"""Batched (weighted, ridge-regularised) linear least squares as a declarative node.

.. math::
    x^\star = \arg\min_x \; \sum_k \omega_k (a_k^\top x - b_k)^2 + \beta \|x\|^2

is reduced to the plain problem :math:`\min_x \|\tilde A x - \tilde b\|^2` with
:math:`\tilde A = [\,\mathrm{diag}(\sqrt\omega) A;\ \sqrt\beta I\,]`,
:math:`\tilde b = [\,\mathrm{diag}(\sqrt\omega) b;\ 0\,]` (plain differentiable torch ops, so the
gradients to the weights and to :math:`\beta` follow by the chain rule), which is solved by a
reduced QR factorisation :math:`\tilde A = QR` with :math:`R` cached for the backward pass.

Backward (the lecture's closed form): with :math:`v = \partial L / \partial x`,
:math:`w = (\tilde A^\top \tilde A)^{-1} v = R^{-1} R^{-\top} v` (two triangular solves),
residual :math:`r = \tilde b - \tilde A x`,

.. math::
    \frac{\partial L}{\partial \tilde b} = \tilde A w, \qquad
    \frac{\partial L}{\partial \tilde A} = r\, w^\top - (\tilde A w)\, x^\top .

Rank-deficient items (a diagonal entry of :math:`R` below ``rcond`` times the largest) get the
minimum-norm solution in the forward pass, a zero gradient, and status ``DEGENERATE``; see
:attr:`LeastSquares.last_status`.
"""

from __future__ import annotations

import torch
from torch import nn

from bpnp.nodes.status import Status


def _check(A: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"A and b must be tensors, got {type(A).__name__} and {type(b).__name__}")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (B, m, n), got {tuple(A.shape)}")
    if b.shape != A.shape[:2]:
        raise ValueError(f"b must have shape (B, m) = {tuple(A.shape[:2])}, got {tuple(b.shape)}")
    if not (A.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"A and b must be floating point, got {A.dtype} and {b.dtype}")


class _QRSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, b, rcond):
        Q, R = torch.linalg.qr(A, mode="reduced")  # (B, m, n), (B, n, n)
        diag = torch.diagonal(R, dim1=-2, dim2=-1).abs()
        full_rank = diag.amin(-1) > rcond * diag.amax(-1).clamp_min(torch.finfo(A.dtype).tiny)
        full_rank &= torch.isfinite(R).flatten(1).all(1)
        # Triangular solves on rank-deficient items would divide by ~0: give them identity R
        # here and the min-norm solution below.
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
        R_safe = torch.where(full_rank[:, None, None], R, eye)
        qtb = (Q.transpose(1, 2) @ b.unsqueeze(-1))
        x = torch.linalg.solve_triangular(R_safe, qtb, upper=True).squeeze(-1)
        if not bool(full_rank.all()):
            bad = ~full_rank
            x[bad] = (torch.linalg.pinv(A[bad]) @ b[bad].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(A, b, R_safe, x, full_rank)
        ctx.mark_non_differentiable(full_rank)
        return x, full_rank

    @staticmethod
    def backward(ctx, v, _unused):
        A, b, R, x, full_rank = ctx.saved_tensors
        # w = R^-1 R^-T v: the QR factor is reused, so no normal equations are formed.
        z = torch.linalg.solve_triangular(R.transpose(1, 2), v.unsqueeze(-1), upper=False)
        w = torch.linalg.solve_triangular(R, z, upper=True)  # (B, n, 1)
        Aw = A @ w  # (B, m, 1)
        r = b.unsqueeze(-1) - A @ x.unsqueeze(-1)  # (B, m, 1)
        gA = r @ w.transpose(1, 2) - Aw @ x.unsqueeze(1)
        gb = Aw.squeeze(-1)
        keep = full_rank[:, None, None]
        gA = torch.where(keep, gA, torch.zeros_like(gA))
        gb = torch.where(keep[..., 0], gb, torch.zeros_like(gb))
        return gA, gb, None


def least_squares(
    A: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor | None = None,
    ridge: float | torch.Tensor = 0.0,
    rcond: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``min_x sum_k w_k (a_k^T x - b_k)^2 + ridge ||x||^2`` per batch item.

    Args:
        A: (B, m, n) design matrices; ``m >= n`` unless ``ridge > 0``.
        b: (B, m) targets.
        weights: optional (B, m) non-negative row weights (0 removes a row, e.g. padding).
        ridge: ridge strength ``>= 0``, a float or a (B,) tensor (differentiable).
        rcond: relative threshold on ``|diag R|`` below which an item is rank-deficient;
            default ``m * eps`` of the dtype.

    Returns:
        ``(x, status)``: (B, n) solutions and (B,) status codes (``OK`` or ``DEGENERATE``).

    Example:
        >>> A = torch.eye(3).expand(2, 3, 3); b = torch.ones(2, 3)
        >>> least_squares(A, b)[0]
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    _check(A, b)
    B, m, n = A.shape
    if weights is not None:
        if weights.shape != (B, m):
            raise ValueError(f"weights must have shape (B, m) = {(B, m)}, got {tuple(weights.shape)}")
        if bool((weights < 0).any()):
            raise ValueError("weights must be non-negative")
        s = weights.clamp_min(0).sqrt()
        A = A * s.unsqueeze(-1)
        b = b * s
    ridge_t = torch.as_tensor(ridge, dtype=A.dtype, device=A.device)
    if bool((ridge_t < 0).any()):
        raise ValueError(f"ridge must be non-negative, got {ridge}")
    if ridge_t.requires_grad or bool((ridge_t > 0).any()):
        root = ridge_t.expand(B).sqrt() if ridge_t.ndim == 0 else ridge_t.sqrt()
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        A = torch.cat([A, root[:, None, None] * eye], dim=1)
        b = torch.cat([b, torch.zeros(B, n, dtype=b.dtype, device=b.device)], dim=1)
    elif m < n:
        raise ValueError(f"underdetermined system: A has {m} rows < {n} columns; use ridge > 0")
    rcond = A.shape[1] * float(torch.finfo(A.dtype).eps) if rcond is None else rcond
    x, full_rank = _QRSolve.apply(A, b, rcond)
    status = torch.where(full_rank, int(Status.OK), int(Status.DEGENERATE)).long()
    return x, status


class LeastSquares(nn.Module):
    """Layer form of :func:`least_squares` with a fixed ``ridge``; ``last_status`` after each call."""

    def __init__(self, ridge: float = 0.0, rcond: float | None = None) -> None:
        super().__init__()
        self.ridge = ridge
        self.rcond = rcond
        self.last_status: torch.Tensor | None = None

    def forward(self, A: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        x, self.last_status = least_squares(A, b, weights=weights, ridge=self.ridge, rcond=self.rcond)
        return x
