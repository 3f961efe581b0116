r"""Blind-PnP pose refinement as a declarative node.

Per batch item, given soft correspondence weights :math:`W \in \mathbb{R}_{\ge 0}^{m\times n}`,
unit bearing vectors :math:`b_i` of the 2D points, 3D points :math:`p_j` (world frame) and an
initial pose, it solves

.. math::
    (R^\star, t^\star) = \arg\min_{R \in SO(3),\, t} \; F = \sum_{ij} W_{ij}\,
        \rho\!\left(1 - b_i^\top N(R p_j + t)\right), \qquad N(x) = x / \|x\|,

with a robust kernel :math:`\rho` (:mod:`bpnp.nodes.robust`).

**Structure.** With :math:`e_{ij} = 1 - b_i^\top u_j` and reweighted
:math:`\tilde W = W \odot \rho'(E)`, everything the solver needs per point is
:math:`\tilde a_j = \sum_i \tilde W_{ij} b_i` (one matmul :math:`\tilde A = \tilde W^\top B`) and,
for the robust second-order term, :math:`C_j = \sum_i W_{ij}\rho''(e_{ij}) b_i b_i^\top` (one more
matmul); gradient and Hessian are then O(n) sums. For :math:`\rho` = identity the objective is
:math:`\sum W - \sum_j a_j^\top u_j` exactly and :math:`a = W^\top B` is formed once.

**Solver.** Levenberg-Marquardt on :math:`SO(3)\times\mathbb{R}^3` with the local update
:math:`R \leftarrow \mathrm{Exp}(\omega) R`, :math:`t \leftarrow \mathrm{Exp}(\omega) t + v`, using
the exact (analytic) Hessian when it is positive definite and the Gauss-Newton Hessian of the
chordal residuals :math:`b_i - u_j` otherwise; per-item damping, acceptance and convergence, so
items never share a line search (unlike the original's batch-mean L-BFGS).

**Backward.** The implicit function theorem in the local chart at the solution,
:math:`w = H^{-1} \partial L/\partial\xi` (6x6 per item, :mod:`bpnp.nodes.linalg` fallbacks for
degenerate items) and one reverse pass of :math:`-\langle\nabla_\xi F, w\rangle` for the gradients
to :math:`W`, the bearings and the 3D points (:func:`bpnp.nodes.implicit.implicit_vjp`). For
:math:`\rho` = identity the mixed derivative to :math:`W` is the outer product
:math:`-b_i^\top z_j`, one matmul, which autograd produces from the ``W^T B`` form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bpnp.nodes.implicit import implicit_vjp
from bpnp.nodes.linalg import SINGULAR_MODES
from bpnp.nodes.robust import RobustKernel
from bpnp.nodes.status import Status


class PnPResult(NamedTuple):
    """Output of :class:`PnPRefine`: ``R`` (B,3,3), ``t`` (B,3) differentiable; ``status``,
    ``iterations`` (B,) int64 and ``objective`` (B,) float are diagnostics."""

    R: torch.Tensor
    t: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    objective: torch.Tensor


def skew(w: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices ``[w]_x`` of (*, 3) vectors, shape (*, 3, 3)."""
    o = torch.zeros_like(w[..., 0])
    x, y, z = w.unbind(-1)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*w.shape[:-1], 3, 3)


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``Exp(w)`` of axis-angle vectors (*, 3) (radians), shape (*, 3, 3).

    Rodrigues' formula with series coefficients near 0. We do not use kornia's version here:
    its small-angle branch is first order (``I + [w]_x``), so its second derivative at ``w = 0``
    is wrong, and the implicit backward differentiates twice at exactly ``w = 0``.
    """
    theta2 = (w * w).sum(-1, keepdim=True).unsqueeze(-1)
    small = theta2 < 1e-6
    safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(safe)
    A = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(theta) / theta)
    B = torch.where(small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(theta)) / safe)
    K = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(K.shape)
    return eye + A * K + B * (K @ K)


def _camera_points(R: torch.Tensor, t: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ R.transpose(1, 2) + t[:, None, :]


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)
    return x / r, r


def pnp_objective(
    W: torch.Tensor, bearings: torch.Tensor, points: torch.Tensor, R: torch.Tensor, t: torch.Tensor, kernel: RobustKernel
) -> torch.Tensor:
    """``F = sum_ij W_ij rho(1 - b_i . N(R p_j + t))`` per item, (B,). O(mn) via one matmul.

    For ``rho`` = identity it is evaluated as ``sum W - sum_j a_j . u_j`` with ``a = W^T B``, whose
    derivative to ``W`` is the outer product ``-B u^T`` (one matmul, no (m, n) error matrix).
    """
    u, _ = _unit(_camera_points(R, t, points))
    if kernel.is_identity:
        return W.sum((1, 2)) - ((W.transpose(1, 2) @ bearings) * u).sum((1, 2))
    E = torch.baddbmm(torch.ones_like(W), bearings, u.transpose(1, 2), alpha=-1)
    return (W * kernel.rho(E)).sum((1, 2))


def _derivatives(W, bearings, x, kernel, linear=None):
    """Objective, gradient (B,6), exact Hessian (B,6,6) and Gauss-Newton Hessian (B,6,6) of F in
    the local chart xi = (omega, v) at xi = 0, for camera-frame points x (B,n,3).

    ``linear = (a (B,n,3), wsum (B,n), mass (B,))`` precomputed from ``W`` when ``rho`` is the
    identity: then this costs O(n), no (m, n) matrix is touched.
    """
    u, r = _unit(x)
    if linear is not None:
        a, wsum, mass = linear
        F = mass - (a * u).sum((1, 2))
        C = None
    else:
        E = torch.baddbmm(torch.ones_like(W), bearings, u.transpose(1, 2), alpha=-1)  # 1 - B U^T
        rho, d1, d2 = kernel.all(E)
        F = (W * rho).sum((1, 2))
        Wt = W * d1
        # (3, m) @ (m, n) and (9, m) @ (m, n): contiguous operands, about 5x faster on a CPU than
        # the transposed (n, m) @ (m, 9) product.
        a = (bearings.transpose(1, 2) @ Wt).transpose(1, 2)  # (B, n, 3): a_j = sum_i Wt_ij b_i
        wsum = Wt.sum(1)  # (B, n)
        bb = (bearings[..., :, None] * bearings[..., None, :]).flatten(2)  # (B, m, 9)
        C = (bb.transpose(1, 2) @ (W * d2)).transpose(1, 2).reshape(*a.shape[:2], 3, 3)
    au = (a * u).sum(-1, keepdim=True)
    q = (a - au * u) / r  # gradient of a_j . u_j w.r.t. x_j
    gx = -q  # dF/dx_j
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    uu = u[..., :, None] * u[..., None, :]
    r2 = (r * r)[..., None]
    Hau = (-(a[..., :, None] * u[..., None, :] + u[..., :, None] * a[..., None, :]) - au[..., None] * eye + 3 * au[..., None] * uu) / r2
    proj = eye - uu
    K = -Hau  # d2F/dx_j^2 from the first-order kernel term
    if C is not None:
        # Second-order kernel term: sum_i W rho'' (grad e)(grad e)^T, grad_x e_ij = -proj b_i / r,
        # with C_j = sum_i W_ij rho''_ij b_i b_i^T.
        K = K + proj @ C @ proj / r2
    X = skew(x)
    # Second-order term of Exp(omega) x contracted with dF/dx: 1/2 (g x^T + x g^T) (g . x = 0).
    Q = 0.5 * (gx[..., :, None] * x[..., None, :] + x[..., :, None] * gx[..., None, :])
    H = torch.zeros(*x.shape[:1], 6, 6, dtype=x.dtype, device=x.device)
    H[:, :3, :3] = (-X @ K @ X + Q).sum(1)
    H[:, :3, 3:] = (X @ K).sum(1)
    H[:, 3:, :3] = (-K @ X).sum(1)
    H[:, 3:, 3:] = K.sum(1)
    Kgn = wsum[..., None, None] * proj / r2
    Hgn = torch.zeros_like(H)
    Hgn[:, :3, :3] = (-X @ Kgn @ X).sum(1)
    Hgn[:, :3, 3:] = (X @ Kgn).sum(1)
    Hgn[:, 3:, :3] = (-Kgn @ X).sum(1)
    Hgn[:, 3:, 3:] = Kgn.sum(1)
    g = torch.cat([(torch.cross(x, gx, dim=-1)).sum(1), gx.sum(1)], dim=-1)
    H = 0.5 * (H + H.transpose(1, 2))
    Hgn = 0.5 * (Hgn + Hgn.transpose(1, 2))
    return F, g, H, Hgn


def _retract(R, t, delta):
    Rd = so3_exp(delta[:, :3])
    return Rd @ R, (Rd @ t.unsqueeze(-1)).squeeze(-1) + delta[:, 3:]


def _validate(W, bearings, points, R0, t0):
    for name, x in (("W", W), ("bearings", bearings), ("points", points), ("R0", R0), ("t0", t0)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if W.ndim != 3:
        raise ValueError(f"W must have shape (B, m, n), got {tuple(W.shape)}")
    B, m, n = W.shape
    expected = {"bearings": (B, m, 3), "points": (B, n, 3), "R0": (B, 3, 3), "t0": (B, 3)}
    for name, x in (("bearings", bearings), ("points", points), ("R0", R0), ("t0", t0)):
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for W of shape {tuple(W.shape)}, got {tuple(x.shape)}")
    dtypes = {x.dtype for x in (W, bearings, points, R0, t0)}
    devices = {x.device for x in (W, bearings, points, R0, t0)}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"inputs must share one dtype and device, got {sorted(map(str, dtypes))} / {sorted(map(str, devices))}")


class PnPRefine(nn.Module):
    """Robust weighted angular pose refinement (see the module docstring for the maths).

    Args:
        robust: kernel name, one of ``none``, ``huber``, ``geman_mcclure``, ``tanh``.
        robust_scale: kernel scale in units of ``1 - cos(angle)``.
        max_iter: LM iteration limit per item.
        xtol: stop when the step ``|omega| + |v| / mean depth`` is below this; default
            ``1e-12`` in float64 and ``1e-6`` in float32.
        gtol: stop when ``|grad F| <= gtol * sum(W)``; default like ``xtol``.
        damping: initial LM damping, relative to the Hessian diagonal.
        degenerate_rcond: an item whose scaled Gauss-Newton Hessian has an eigenvalue ratio
            below this (and never below ``100 eps`` of the working dtype, ~1.2e-5 in float32) is
            reported ``DEGENERATE`` (pose not determined by the weighted points, e.g. collinear).
        backward: ``"implicit"`` or ``"unrolled"`` (autograd through the LM iterations).
        singular: backward fallback for degenerate items, ``"damp"``, ``"min_norm"`` or ``"zero"``.
        degenerate_check_every: every this many iterations, items found degenerate stop iterating
            (0 = test only at the end); the final status is the same, the time is not.

    Forward: ``(W (B,m,n) >= 0, bearings (B,m,3) unit, points (B,n,3), R0 (B,3,3), t0 (B,3),
    mask2d (B,m) bool = None, mask3d (B,n) bool = None) -> PnPResult``. Masked rows and columns of
    ``W`` are ignored. Items with non-finite inputs return their initial pose with status
    ``NONFINITE``. After a backward pass, :attr:`last_backward_status` has per-item codes.
    """

    def __init__(
        self,
        robust: str = "none",
        robust_scale: float = 0.01,
        max_iter: int = 50,
        xtol: float | None = None,
        gtol: float | None = None,
        damping: float = 1e-6,
        degenerate_rcond: float = 1e-9,
        backward: str = "implicit",
        singular: str = "damp",
        degenerate_check_every: int = 5,
    ) -> None:
        super().__init__()
        if backward not in ("implicit", "unrolled"):
            raise ValueError(f"backward must be 'implicit' or 'unrolled', got {backward!r}")
        if singular not in SINGULAR_MODES:
            raise ValueError(f"singular must be one of {SINGULAR_MODES}, got {singular!r}")
        self.kernel = RobustKernel(robust, robust_scale)
        self.max_iter, self.xtol, self.gtol, self.damping = max_iter, xtol, gtol, damping
        self.degenerate_rcond, self.backward_mode, self.singular = degenerate_rcond, backward, singular
        self.degenerate_check_every = int(degenerate_check_every)
        self.last_backward_status: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, max_iter={self.max_iter}, backward={self.backward_mode!r}"

    # --- forward solver ---------------------------------------------------------------------
    def solve(self, W, bearings, points, R0, t0):
        """Batched LM; differentiable torch ops (used as is by ``backward="unrolled"``)."""
        B = W.shape[0]
        dtype = W.dtype
        xtol = self.xtol if self.xtol is not None else (1e-12 if dtype == torch.float64 else 1e-6)
        gtol = self.gtol if self.gtol is not None else xtol
        finite = (
            torch.isfinite(W).flatten(1).all(1)
            & torch.isfinite(bearings).flatten(1).all(1)
            & torch.isfinite(points).flatten(1).all(1)
            & torch.isfinite(R0).flatten(1).all(1)
            & torch.isfinite(t0).all(1)
        )
        zero3 = torch.zeros(B, 3, dtype=dtype, device=W.device)
        eye3 = torch.eye(3, dtype=dtype, device=W.device).expand(B, 3, 3)
        Wc = torch.where(finite[:, None, None], W, torch.zeros_like(W))
        bc = torch.where(finite[:, None, None], bearings, torch.zeros_like(bearings))
        pc = torch.where(finite[:, None, None], points, torch.zeros_like(points))
        # Items with bad inputs keep their initial pose (if that is finite) and are not iterated.
        pose_ok = torch.isfinite(R0).flatten(1).all(1) & torch.isfinite(t0).all(1)
        R = torch.where(pose_ok[:, None, None], R0, eye3)
        t = torch.where(pose_ok[:, None], t0, zero3)
        mass = Wc.sum((1, 2))

        mu = torch.full((B,), self.damping, dtype=dtype, device=W.device)
        active = finite & (mass > 0)
        iterations = torch.zeros(B, dtype=torch.long, device=W.device)
        eye6 = torch.eye(6, dtype=dtype, device=W.device)
        # rho = identity: a = W^T B once, then every iteration is O(n).
        linear = (Wc.transpose(1, 2) @ bc, Wc.sum(1), mass) if self.kernel.is_identity else None
        F, g, H, Hgn = _derivatives(Wc, bc, _camera_points(R, t, pc), self.kernel, linear)
        for it in range(1, self.max_iter + 1):
            if not bool(active.any()):
                break
            depth = _camera_points(R, t, pc).norm(dim=-1).mean(1).clamp_min(torch.finfo(dtype).eps)
            D = torch.diagonal(Hgn, dim1=1, dim2=2).clamp_min(torch.finfo(dtype).eps) + 1e-12 * mass[:, None]
            damp = mu[:, None, None] * torch.diag_embed(D)
            L, info = torch.linalg.cholesky_ex(H + damp)
            use_gn = info != 0
            if bool(use_gn.any()):
                Lgn, info_gn = torch.linalg.cholesky_ex(Hgn + damp + 1e-12 * eye6)
                L = torch.where(use_gn[:, None, None], Lgn, L)
                bad = use_gn & (info_gn != 0)
            else:
                bad = torch.zeros_like(active)
            delta = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
            delta = torch.where((active & ~bad)[:, None] & torch.isfinite(delta), delta, torch.zeros_like(delta))
            R_new, t_new = _retract(R, t, delta)
            F_new, g_new, H_new, Hgn_new = self._candidate(Wc, bc, pc, R_new, t_new, linear, active, (F, g, H, Hgn))
            # Near the optimum F changes by less than its rounding error (F ~ sum of m*n terms),
            # so comparing F alone would stall at sqrt(eps) accuracy; there a step is accepted
            # when it reduces the gradient instead.
            f_noise = 64 * torch.finfo(dtype).eps * (F.abs() + mass)
            flat = (F_new - F).abs() <= f_noise
            decrease = (F_new < F) | (flat & (g_new.norm(dim=1) < g.norm(dim=1)))
            accept = active & ~bad & torch.isfinite(F_new) & decrease
            step = delta[:, :3].norm(dim=1) + delta[:, 3:].norm(dim=1) / depth
            R = torch.where(accept[:, None, None], R_new, R)
            t = torch.where(accept[:, None], t_new, t)
            F = torch.where(accept, F_new, F)
            g = torch.where(accept[:, None], g_new, g)
            H = torch.where(accept[:, None, None], H_new, H)
            Hgn = torch.where(accept[:, None, None], Hgn_new, Hgn)
            mu = torch.where(accept, (mu / 3).clamp_min(1e-12), mu * 4)
            iterations = iterations + active.long()
            small_step = accept & (step.detach() < xtol)
            small_grad = g.detach().norm(dim=1) <= gtol * mass
            stalled = mu > 1e12  # no decrease possible at working precision
            active = active & ~(small_step | small_grad | stalled)
            if self.degenerate_check_every and it % self.degenerate_check_every == 0:
                # An item whose weights do not determine the pose (e.g. the near-uniform W of an
                # untrained network, whose optimum runs off to infinity along the mean bearing)
                # never meets the step or gradient test; stop it, its status is DEGENERATE anyway.
                active = active & ~self._degenerate(Hgn, mass)

        status = torch.full((B,), int(Status.OK), dtype=torch.long, device=W.device)
        status = torch.where(active, torch.full_like(status, int(Status.MAX_ITER)), status)
        degenerate = self._degenerate(Hgn, mass)
        status = torch.where(degenerate, torch.full_like(status, int(Status.DEGENERATE)), status)
        status = torch.where(finite, status, torch.full_like(status, int(Status.NONFINITE)))
        return R, t, status, iterations, F

    def _degenerate(self, Hgn: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the weighted points do not determine all six pose parameters (the
        diagonally scaled Gauss-Newton Hessian has an eigenvalue ratio <= rcond), or no mass."""
        dtype = Hgn.dtype
        s = torch.diagonal(Hgn, dim1=1, dim2=2).detach().clamp_min(torch.finfo(dtype).tiny).rsqrt()
        ev = torch.linalg.eigvalsh(s[:, :, None] * Hgn.detach() * s[:, None, :])
        # An exactly singular Hessian evaluated in float32 has an eigenvalue ratio of ~eps, not 0
        # (collinear points: ~1e-7), so the threshold is never below 100 eps of the working dtype.
        rcond = max(float(self.degenerate_rcond), 100 * torch.finfo(dtype).eps)
        return (ev[:, 0] <= rcond * ev[:, -1].clamp_min(torch.finfo(dtype).tiny)) | (mass <= 0)

    def _candidate(self, W, bearings, points, R, t, linear, active, current):
        """Derivatives at the candidate poses of the items still iterating only: the O(mn) work
        of converged items is skipped instead of being computed and discarded."""
        if bool(active.all()):
            return _derivatives(W, bearings, _camera_points(R, t, points), self.kernel, linear)
        sub = active.nonzero().squeeze(1)
        lin = None if linear is None else tuple(x.index_select(0, sub) for x in linear)
        x = _camera_points(R.index_select(0, sub), t.index_select(0, sub), points.index_select(0, sub))
        new = _derivatives(W.index_select(0, sub), bearings.index_select(0, sub), x, self.kernel, lin)
        # Out-of-place index_copy keeps the unrolled mode differentiable.
        return tuple(cur.index_copy(0, sub, val) for cur, val in zip(current, new))

    # --- layer ------------------------------------------------------------------------------
    def forward(
        self,
        W: torch.Tensor,
        bearings: torch.Tensor,
        points: torch.Tensor,
        R0: torch.Tensor,
        t0: torch.Tensor,
        mask2d: torch.Tensor | None = None,
        mask3d: torch.Tensor | None = None,
    ) -> PnPResult:
        _validate(W, bearings, points, R0, t0)
        B, m, n = W.shape
        for name, mask, size in (("mask2d", mask2d, m), ("mask3d", mask3d, n)):
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                     or tuple(mask.shape) != (B, size) or mask.device != W.device):
                got = f"{mask.dtype} of shape {tuple(mask.shape)} on {mask.device}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{name} must be a bool tensor of shape {(B, size)} on {W.device}, got {got}")
        if mask2d is not None:
            W = W * mask2d[:, :, None].to(W.dtype)
        if mask3d is not None:
            W = W * mask3d[:, None, :].to(W.dtype)
        if self.backward_mode == "unrolled":
            return PnPResult(*self.solve(W, bearings, points, R0, t0))
        R, t, status, iterations, F = _PnPFunction.apply(self, W, bearings, points, R0.detach(), t0.detach())
        return PnPResult(R, t, status, iterations, F)


class _PnPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, node: PnPRefine, W, bearings, points, R0, t0):
        with torch.no_grad():
            R, t, status, iterations, F = node.solve(W, bearings, points, R0, t0)
        ctx.node = node
        ctx.save_for_backward(W, bearings, points, R, t, status)
        ctx.mark_non_differentiable(status, iterations, F)
        return R, t, status, iterations, F

    @staticmethod
    def backward(ctx, gR, gt, _s, _i, _f):
        node: PnPRefine = ctx.node
        W, bearings, points, R, t, status = ctx.saved_tensors
        B = W.shape[0]
        gR = torch.zeros_like(R) if gR is None else gR
        gt = torch.zeros_like(t) if gt is None else gt
        # Incoming gradient in the local chart: d/dxi <gR, Exp(w) R> + <gt, Exp(w) t + v> at 0.
        with torch.enable_grad():
            xi = torch.zeros(B, 6, dtype=R.dtype, device=R.device, requires_grad=True)
            Rx, tx = _retract(R, t, xi)
            (v,) = torch.autograd.grad((gR * Rx).sum() + (gt * tx).sum(), xi)
        kernel = node.kernel
        needs = ctx.needs_input_grad[1:4]
        xs = [x.detach().requires_grad_(bool(n)) for x, n in zip((W, bearings, points), needs)]

        def local_objective(W_, b_, p_, xi_):
            R_, t_ = _retract(R, t, xi_)
            return pnp_objective(W_, b_, p_, R_, t_, kernel)

        # A degenerate forward item has no unique pose, so it always takes the selected fallback.
        degenerate = status == int(Status.DEGENERATE)
        # The forward's analytic Hessian (exact, O(mn) once) replaces a torch.func Hessian of the
        # O(mn) objective in six directions.
        linear = (W.transpose(1, 2) @ bearings, W.sum(1), W.sum((1, 2))) if kernel.is_identity else None
        _, _, H, _ = _derivatives(W, bearings, _camera_points(R, t, points), kernel, linear)
        grads, bstatus = implicit_vjp(
            local_objective, xs, torch.zeros_like(v), v, solver="dense", singular=node.singular,
            force_fallback=degenerate, hessian=H,
        )
        nonfinite = status == int(Status.NONFINITE)
        grads = tuple(
            None if g is None else torch.where(nonfinite.view(B, *([1] * (g.ndim - 1))), torch.zeros_like(g), g)
            for g in grads
        )
        node.last_backward_status = torch.where(nonfinite, torch.full_like(bstatus, int(Status.NONFINITE)), bstatus)
        return (None, *grads, None, None)
