r"""Generic declarative node differentiated by the implicit function theorem.

A node solves, per batch item,

.. math::
    y^\star(x) = \arg\min_y f(x, y) \quad \text{subject to} \quad h(x, y) = 0 \ (\text{optional}),

and its backward pass returns the vector-Jacobian product :math:`v^\top \mathrm{D}y^\star(x)`
without differentiating through the solver. With the Lagrangian
:math:`\ell = f + \nu^\top h` (:math:`\nu` from stationarity :math:`\nabla_y f + A^\top\nu = 0`,
:math:`A = \nabla_y h`), :math:`H = \nabla^2_{yy}\ell`, :math:`B = \nabla^2_{xy}\ell`,
:math:`C = \nabla_x h`, differentiating the optimality conditions gives

.. math::
    \begin{bmatrix} H & A^\top \\ A & 0 \end{bmatrix}
    \begin{bmatrix} w \\ \mu \end{bmatrix} = \begin{bmatrix} v \\ 0 \end{bmatrix},
    \qquad
    v^\top \mathrm{D}y^\star = -\left(w^\top B + \mu^\top C\right)
      = -\nabla_x \left[\langle \nabla_y \ell(x, y), w\rangle + \mu^\top h(x, y)\right]_{y, \nu, w, \mu \text{ fixed}}.

So the engine solves one linear system for :math:`w` (and :math:`\mu`) and then takes *all*
input gradients in one reverse pass of a scalar; ``B`` and the Jacobian are never formed.
Without constraints this is :math:`w = H^{-1}v`, :math:`v^\top\mathrm{D}y = -w^\top B`.

``H`` is dense (built with ``torch.func`` forward-over-reverse, one vmapped call) when ``y`` is
small, and only applied matrix-free through Hessian-vector products in a (projected) conjugate
gradient when ``y`` is large. Singular or indefinite systems are handled per item
(:mod:`bpnp.nodes.linalg`) and reported in :attr:`ImplicitNode.last_backward_status`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from bpnp.nodes.linalg import (
    SINGULAR_MODES,
    conjugate_gradient,
    constraint_basis,
    solve_kkt,
    solve_spd,
)
from bpnp.nodes.status import Status

BACKWARD_MODES = ("implicit", "unrolled")
LINEAR_SOLVERS = ("auto", "dense", "cg")

Objective = Callable[..., torch.Tensor]


def _batch_size(y: torch.Tensor) -> int:
    if y.ndim < 1:
        raise ValueError(f"y must have a leading batch dimension, got shape {tuple(y.shape)}")
    return y.shape[0]


def dense_hessian(fn: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per-item Hessians of a batch-separable scalar function.

    Args:
        fn: maps ``y`` (B, d) to per-item values (B,); item i must depend on ``y[i]`` only.
        y: (B, d) point of evaluation.

    Returns:
        (B, d, d): ``H[i] = d^2 fn(y)[i] / dy[i]^2``.

    Because items are independent, pushing the basis vector ``e_k`` through every item at once
    gives column ``k`` of every item's Hessian; ``torch.func.vmap`` runs the ``d`` directions in
    one call. Objectives that ``torch.func`` cannot transform fall back to ``d`` double-backward
    passes with plain autograd (same result, slower).
    """
    b, d = y.shape
    basis = torch.eye(d, dtype=y.dtype, device=y.device).unsqueeze(1).expand(d, b, d)
    try:
        grad_fn = torch.func.grad(lambda z: fn(z).sum())

        def column(e):
            return torch.func.jvp(grad_fn, (y,), (e,))[1]

        cols = torch.func.vmap(column)(basis)  # (d, B, d): cols[k, i] = H[i][:, k]
        return cols.permute(1, 2, 0).contiguous()
    except (RuntimeError, NotImplementedError, TypeError):
        with torch.enable_grad():
            z = y.detach().requires_grad_(True)
            g = torch.autograd.grad(fn(z).sum(), z, create_graph=True)[0]
            cols = [torch.autograd.grad(g, z, basis[k], retain_graph=True)[0] for k in range(d)]
        return torch.stack(cols, dim=2).detach()


def implicit_vjp(
    objective: Objective,
    xs: Sequence[Any],
    y: torch.Tensor,
    v: torch.Tensor,
    constraints: Objective | None = None,
    solver: str = "auto",
    singular: str = "damp",
    dense_max_dim: int = 64,
    cg_tol: float | None = None,
    cg_max_iter: int = 500,
    force_fallback: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor | None, ...], torch.Tensor]:
    """Vector-Jacobian product of ``y*(xs)`` by the implicit function theorem.

    Args:
        objective: ``objective(*xs, y) -> (B,)``, the per-item objective ``f``.
        xs: the node's inputs; tensors that require grad receive a gradient, others get ``None``.
        y: (B, *shape) the solution ``y*`` (detached).
        v: (B, *shape) incoming gradient ``dL/dy``.
        constraints: optional ``constraints(*xs, y) -> (B, p)``, equality constraints ``h = 0``.
        solver: ``"dense"``, ``"cg"`` or ``"auto"`` (dense when ``prod(shape) <= dense_max_dim``).
        singular: per-item fallback ``"damp"``, ``"min_norm"`` or ``"zero"``.
        cg_tol: relative residual tolerance of the conjugate gradient; default ``None`` is
            :func:`~bpnp.nodes.linalg.default_cg_tol` of the dtype (1e-10 in float64, 1.2e-6 in
            float32); smaller values are raised to ``eps`` of the dtype.
        cg_max_iter: conjugate-gradient iteration limit (status ``MAX_ITER`` beyond).
        force_fallback: optional (B,) bool, items that take the fallback regardless (dense,
            unconstrained solves only), e.g. those a forward solver found degenerate.
        hessian: optional (B, d, d) exact Hessian of the objective in ``y`` at the solution,
            when the problem has it in closed form (unconstrained, dense solves only); it
            replaces the ``torch.func`` Hessian, the most expensive part for large inputs.

    Returns:
        ``(grads, status)``: one gradient (or None) per input, and (B,) int64 status codes.
    """
    if solver not in LINEAR_SOLVERS:
        raise ValueError(f"solver must be one of {LINEAR_SOLVERS}, got {solver!r}")
    if singular not in SINGULAR_MODES:
        raise ValueError(f"singular must be one of {SINGULAR_MODES}, got {singular!r}")
    b = _batch_size(y)
    shape = y.shape[1:]
    d = int(torch.Size(shape).numel())
    v = v.reshape(b, d).to(y.dtype)
    y_flat = y.detach().reshape(b, d)

    x_leaves = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.requires_grad else x for x in xs]
    x_diff = [x for x in x_leaves if isinstance(x, torch.Tensor) and x.requires_grad]

    def as_y(z):
        return z.reshape(b, *shape)

    with torch.enable_grad():
        xs_const = [x.detach() if isinstance(x, torch.Tensor) else x for x in xs]
        nu = None
        A = None
        if constraints is not None:
            # Multipliers from stationarity: grad_y f + A^T nu = 0 in the least-squares sense.
            z = y_flat.clone().requires_grad_(True)
            hval = constraints(*xs_const, as_y(z))
            if hval.ndim != 2 or hval.shape[0] != b:
                raise ValueError(f"equality_constraints must return (B, p), got {tuple(hval.shape)}")
            p = hval.shape[1]
            A = torch.stack(
                [torch.autograd.grad(hval[:, k].sum(), z, retain_graph=True)[0] for k in range(p)], dim=1
            )  # (B, p, d)
            gf = torch.autograd.grad(objective(*xs_const, as_y(z)).sum(), z)[0]
            # LAPACK rejects a batch with one non-finite item outright: solve the finite ones
            # (the others end NONFINITE / ZEROED below, per item).
            ok = torch.isfinite(A).flatten(1).all(1) & torch.isfinite(gf).all(1)
            A_ok = torch.where(ok[:, None, None], A, torch.zeros_like(A))
            gf_ok = torch.where(ok[:, None], gf, torch.zeros_like(gf))
            nu = -torch.linalg.lstsq(A_ok.transpose(1, 2), gf_ok.unsqueeze(-1)).solution.squeeze(-1)  # (B, p)
            nu = nu.detach()
            A = A.detach()

        def lagrangian(xs_, z):
            val = objective(*xs_, as_y(z))
            if nu is not None:
                val = val + (nu * constraints(*xs_, as_y(z))).sum(-1)
            return val

        use_dense = solver == "dense" or (solver == "auto" and d <= dense_max_dim)
        if use_dense:
            if hessian is not None and constraints is None:
                H = hessian.detach().reshape(b, d, d).to(y.dtype)
            else:
                H = dense_hessian(lambda z: lagrangian(xs_const, z), y_flat)
            H = 0.5 * (H + H.transpose(1, 2))
            if A is None:
                w, status = solve_spd(H, v, mode=singular, force_fallback=force_fallback)
                mu = None
            else:
                w, mu, status = solve_kkt(H, A, v, mode=singular)
        else:
            z = y_flat.clone().requires_grad_(True)
            g = torch.autograd.grad(lagrangian(xs_const, z).sum(), z, create_graph=True)[0]

            def hvp(u):
                return torch.autograd.grad(g, z, u, retain_graph=True)[0]

            project = None
            if A is not None:
                # Projector onto the tangent space {u : A u = 0} from an orthonormal basis of the
                # rows of A, per item: an item whose constraint Jacobian is rank deficient (e.g.
                # the unit circle at x = 1, where dh/dy = 2y = 0) has no tangent space to speak
                # of; it gets w = mu = 0 and status ZEROED, as in the dense path, instead of a
                # batched solve with a singular Gram matrix raising for the whole batch.
                Q, Rq, sq, a_ok = constraint_basis(A)

                def project(u):
                    return u - (Q @ (Q.transpose(1, 2) @ u.unsqueeze(-1))).squeeze(-1)

            w, status = conjugate_gradient(hvp, v, project, tol=cg_tol, max_iter=cg_max_iter, mode=singular)
            mu = None
            if A is not None:
                # mu from the first KKT row, A^T mu = v - H w, by the same QR:
                # A^T = Q R diag(1/s), so mu = diag(s) R^-1 Q^T (v - H w).
                res = (v - hvp(w)).unsqueeze(-1)
                mu = sq * torch.linalg.solve_triangular(Rq, Q.transpose(1, 2) @ res, upper=True).squeeze(-1)
                a_finite = torch.isfinite(A).flatten(1).all(1)
                rank_bad = ~a_ok
                w = torch.where(rank_bad[:, None], torch.zeros_like(w), w)
                mu = torch.where(rank_bad[:, None], torch.zeros_like(mu), mu)
                status = torch.where(rank_bad & a_finite & (status != int(Status.NONFINITE)),
                                     torch.full_like(status, int(Status.ZEROED)), status)
                status = torch.where(a_finite, status, torch.full_like(status, int(Status.NONFINITE)))
            w, mu = w.detach(), (mu.detach() if mu is not None else None)

        if not x_diff:
            return tuple(None for _ in xs), status

        # One reverse pass: -d/dx [<grad_y l(x, y), w> + mu^T h(x, y)] at fixed y, nu, w, mu.
        z = y_flat.clone().requires_grad_(True)
        gy = torch.autograd.grad(lagrangian(x_leaves, z).sum(), z, create_graph=True)[0]
        scalar = (gy * w).sum()
        if mu is not None:
            scalar = scalar + (mu * constraints(*x_leaves, as_y(z))).sum()
        grads = torch.autograd.grad(-scalar, x_diff, allow_unused=True)

    grads, status = _zero_nonfinite(grads, x_diff, b, status)
    it = iter(grads)
    out = tuple(next(it) if (isinstance(x, torch.Tensor) and x.requires_grad) else None for x in x_leaves)
    return out, status


def _zero_nonfinite(grads, xs, b, status):
    """Never let NaN/Inf through: zero the offending items (per item when the input is batched)."""
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]
    bad = torch.zeros(b, dtype=torch.bool, device=status.device)
    for g in grads:
        if g.ndim >= 1 and g.shape[0] == b:
            bad |= ~torch.isfinite(g.reshape(b, -1)).all(1)
        elif not bool(torch.isfinite(g).all()):
            bad[:] = True
    if bool(bad.any()):
        out = []
        for g in grads:
            if g.ndim >= 1 and g.shape[0] == b:
                g = torch.where(bad.view(b, *([1] * (g.ndim - 1))), torch.zeros_like(g), g)
            else:
                g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            out.append(g)
        grads = out
        status = torch.where(bad, torch.full_like(status, int(Status.ZEROED)), status)
    return grads, status


class _ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, node: "ImplicitNode", *xs):
        with torch.no_grad():
            y = node.solve(*xs)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{type(node).__name__}.solve must return a tensor, got {type(y).__name__}")
        ctx.node = node
        ctx.n_tensor = [isinstance(x, torch.Tensor) for x in xs]
        ctx.others = [None if t else x for x, t in zip(xs, ctx.n_tensor)]
        ctx.save_for_backward(y, *[x for x in xs if isinstance(x, torch.Tensor)])
        ctx.needs = ctx.needs_input_grad[1:]
        return y.clone()

    @staticmethod
    def backward(ctx, v):
        node: ImplicitNode = ctx.node
        y, *tensors = ctx.saved_tensors
        it = iter(tensors)
        xs = []
        for is_t, other, need in zip(ctx.n_tensor, ctx.others, ctx.needs):
            if is_t:
                x = next(it)
                xs.append(x.detach().requires_grad_(bool(need)))
            else:
                xs.append(other)
        grads, status = implicit_vjp(
            node.objective,
            xs,
            y,
            v,
            constraints=node.equality_constraints if node.has_constraints else None,
            solver=node.linear_solver,
            singular=node.singular,
            dense_max_dim=node.dense_max_dim,
            cg_tol=node.cg_tol,
            cg_max_iter=node.cg_max_iter,
        )
        node.last_backward_status = status.detach()
        return (None, *grads)


class ImplicitNode(nn.Module):
    r"""Base class of a declarative node: ``y = argmin_y f(x, y)`` (s.t. ``h(x, y) = 0``).

    Subclasses implement:

    - :meth:`solve` ``(*xs) -> y`` with ``y`` of shape (B, \*shape); called without gradient
      tracking in ``backward="implicit"`` mode; must be written in differentiable torch ops for
      ``backward="unrolled"`` (then autograd goes through the iterations).
    - :meth:`objective` ``(*xs, y) -> (B,)``; item ``i`` must depend only on item ``i`` of its
      inputs (the batch dimension is separable).
    - optionally :meth:`equality_constraints` ``(*xs, y) -> (B, p)``.

    Args:
        backward: ``"implicit"`` (implicit function theorem) or ``"unrolled"`` (autograd
            through :meth:`solve`; for tests and benchmarks).
        linear_solver: ``"auto"``, ``"dense"`` (``torch.func`` Hessian, Cholesky / LU) or
            ``"cg"`` (matrix-free conjugate gradient).
        singular: per-item fallback for singular systems: ``"damp"``, ``"min_norm"``, ``"zero"``.
        dense_max_dim: largest ``prod(y.shape[1:])`` solved densely in ``"auto"``.
        cg_tol: conjugate-gradient relative residual tolerance; ``None`` (default) picks it by
            dtype: 1e-10 in float64, 1.2e-6 (10 eps) in float32. (It was 1e-10 for every dtype,
            below float32 rounding: with equality constraints the iterations went on in noise
            and returned wrong gradients with status ``OK``.)
        cg_max_iter: conjugate-gradient iteration limit.

    After each backward pass, :attr:`last_backward_status` holds the (B,) status codes.

    Example (projection onto a hyperplane ``a^T y = 1``)::

        class Project(ImplicitNode):
            def solve(self, x, a): ...
            def objective(self, x, a, y): return 0.5 * ((y - x) ** 2).sum(-1)
            def equality_constraints(self, x, a, y): return (a * y).sum(-1, keepdim=True) - 1
    """

    def __init__(
        self,
        backward: str = "implicit",
        linear_solver: str = "auto",
        singular: str = "damp",
        dense_max_dim: int = 64,
        cg_tol: float | None = None,
        cg_max_iter: int = 500,
    ) -> None:
        super().__init__()
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
        if linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {linear_solver!r}")
        if singular not in SINGULAR_MODES:
            raise ValueError(f"singular must be one of {SINGULAR_MODES}, got {singular!r}")
        self.backward_mode = backward
        self.linear_solver = linear_solver
        self.singular = singular
        self.dense_max_dim = dense_max_dim
        self.cg_tol = cg_tol
        self.cg_max_iter = cg_max_iter
        self.last_backward_status: torch.Tensor | None = None

    # --- to be provided by subclasses -------------------------------------------------------
    def solve(self, *xs: Any) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, *xs_and_y: Any) -> torch.Tensor:
        raise NotImplementedError

    def equality_constraints(self, *xs_and_y: Any) -> torch.Tensor:
        raise NotImplementedError

    @property
    def has_constraints(self) -> bool:
        return type(self).equality_constraints is not ImplicitNode.equality_constraints

    # --- the layer --------------------------------------------------------------------------
    def forward(self, *xs: Any) -> torch.Tensor:
        if self.backward_mode == "unrolled":
            return self.solve(*xs)
        return _ImplicitFunction.apply(self, *xs)
