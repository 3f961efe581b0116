r"""Entropic optimal transport (Sinkhorn) as a declarative node.

Per batch item, with cost :math:`M \in \mathbb{R}^{m\times n}`, marginals :math:`r, c \ge 0`,
:math:`\sum r = \sum c`, and inverse temperature :math:`\lambda`:

.. math::
    P^\star = \arg\min_{P \ge 0} \ \langle M, P\rangle + \tfrac{1}{\lambda}\langle P, \log P - 1\rangle
    \quad \text{s.t.} \quad P\mathbf{1} = r, \; P^\top\mathbf{1} = c,

whose solution is :math:`P = \exp(-\lambda M + \alpha \mathbf{1}^\top + \mathbf{1}\beta^\top)`.

**Forward.** ``backward="unrolled"``: Sinkhorn iterations on the log potentials :math:`(\alpha, \beta)` with
``logsumexp`` (stable in float32 for large :math:`\lambda`, where the linear-domain kernel
:math:`e^{-\lambda M}` underflows). After each :math:`\beta` update the columns are exact; the
next :math:`\alpha` update reveals the row sums of the current plan for free,
:math:`P\mathbf{1} = r \odot e^{\alpha_k - \alpha_{k+1}}`, so each item stops on its own L1
marginal error ``tol`` (relative to the total mass) at O(m) cost, and is frozen while the rest of
the batch iterates. ``backward="implicit"`` needs no graph, so it runs the same fixed-point
iteration as mat-vec scalings on a kernel that absorbs the log potentials whenever a scaling leaves
a safe range (stabilised scaling, :func:`_sinkhorn_scaling`): same stopping rule, same plan, about
ten times faster. A zero entry of ``r`` or ``c`` marks a padded row or column anywhere; its
entries of :math:`P` and of every gradient are exactly 0. Both forms shift each row of ``M`` by
its minimum first (the plan is invariant; ``-lam M`` of a large ``M`` would keep few digits in
float32), absorb potentials only into items still iterating, and report the marginal error
measured on the returned plan (:class:`SinkhornInfo`).

**Over-relaxation** (``overrelax`` = :math:`w \in [1, 2)`, implicit mode only; the unrolled mode
ignores it and stays the plain reference). Each scaling becomes
:math:`u \leftarrow u^{1-w} (r / Kv)^w`, i.e. :math:`\log u \leftarrow (1-w)\log u + w \log(r/Kv)`,
and likewise for :math:`v` (Thibault, Chizat, Dossal, Papadakis, Algorithms 2021; Lehmann, von
Renesse, Sambale, Uschmajew, Optim. Lett. 2022). Its fixed points are Sinkhorn's, so the plan,
``tol`` (now on the larger of the row and column errors, as a relaxed column update leaves the
columns inexact), the :class:`SinkhornInfo` fields and the implicit backward keep their meaning;
on slowly converging problems it needs far fewer iterations (bins, 1000 x 1000 costs U[0, 2],
``lam`` = 10, float32: 84 -> 19 at :math:`w` = 1.5; a :math:`w` too large for the problem
oscillates and is slower). Over-relaxation is only locally convergent, so each item takes a
relaxed half-step only if it raises the dual objective by at least half of a relaxed step's
asymptotic gain (a Lyapunov test at O(m + n) cost) and stays finite; otherwise that half-step is
plain Sinkhorn. Every step thus raises the dual, which is bounded above, by a fixed fraction of
the plain step's gain, so the marginal errors tend to 0 from any start as for plain Sinkhorn
(:func:`_relaxed_scaling`). :math:`w` = 1 is the plain iteration exactly.

**Backward (implicit).** Perturbing :math:`M` gives :math:`dP = P\odot(-\lambda\,dM + d\alpha_i
+ d\beta_j)` with :math:`(d\alpha, d\beta)` restoring the marginals. For an incoming gradient
:math:`G = \partial L/\partial P` this yields

.. math::
    \frac{\partial L}{\partial M} = \lambda\, P \odot \left(a \mathbf{1}^\top + \mathbf{1} b^\top - G\right),
    \qquad
    \begin{bmatrix} \mathrm{diag}(P\mathbf{1}) & P \\ P^\top & \mathrm{diag}(P^\top\mathbf{1}) \end{bmatrix}
    \begin{bmatrix} a \\ b \end{bmatrix}
    = \begin{bmatrix} (G\odot P)\mathbf{1} \\ (G\odot P)^\top\mathbf{1} \end{bmatrix},

the lecture's :math:`\Lambda`-block result. The larger side is eliminated (its block is
diagonal), leaving the Schur complement :math:`S = \mathrm{diag}(P\mathbf 1) - P\,
\mathrm{diag}(P^\top\mathbf 1)^{-1}P^\top` on the *smaller* side, batched and solved by Cholesky
with the gradient as right-hand side (never an explicit inverse); by default (``schur="cg"``)
the same system is solved matrix-free by Jacobi-preconditioned conjugate gradients to the
forward's tolerance (two (B, m, n) mat-vecs per iteration instead of an (m, n, m) product and an
:math:`m^3` factorisation; docs/benchmarks.md times both), with the dense Cholesky for any item
CG does not certify. :math:`S` is singular along
:math:`\mathbf 1` (the gauge :math:`a + t, b - t`); the lecture drops one unknown, we instead add
:math:`\tau\, u u^\top` (:math:`u` = normalised mask of real rows), which makes :math:`S` positive
definite without index bookkeeping around padding and does not change :math:`a_i + b_j` because
the right-hand side is orthogonal to :math:`u`. The gradients to the marginals are
:math:`\partial L/\partial r = a`, :math:`\partial L/\partial c = b`, defined up to that same
gauge (only perturbations with :math:`\sum dr = \sum dc` are feasible); we return the
minimum-norm representative.

**Outlier bins (dustbins).** :func:`sinkhorn_with_bins` lets a point stay unmatched, as in
SuperGlue (Sarlin et al., CVPR 2020). With :math:`m', n'` real rows/columns, the cost is augmented
by a bin column at index ``n`` (cost :math:`\gamma_r` of a row going unmatched), a bin row at
index ``m`` (cost :math:`\gamma_c` of a column going unmatched), both after any padding, and the
corner :math:`(\gamma_r + \gamma_c)/2`; the plain problem above is solved on the
:math:`(m+1)\times(n+1)` matrix with marginals

.. math::
    r = \tfrac{1}{m'+n'}\,[\mathbf 1_{m'};\; n'], \qquad c = \tfrac{1}{m'+n'}\,[\mathbf 1_{n'};\; m'].

Each real point owns one unit of mass (units of :math:`1/(m'+n')`, so that the total is 1 and
``tol`` keeps its meaning). A real row can send at most its unit to the bin column; the bin row
holds :math:`n'` units, enough to absorb every column should all of them go unmatched (and the
bin column likewise :math:`m'` for the rows). The share of its unit that a point sends to a bin
is its outlier probability. If :math:`k` units are matched, the bin-row balance puts exactly
:math:`k` on the corner, so the total cost is a constant plus
:math:`\sum_{\text{matched}} (M_{ij} - (\gamma_r+\gamma_c)/2)`: as :math:`\lambda \to \infty`
this is a min-cost partial matching in which only pairs cheaper than the mean bin cost (the
shared :math:`\gamma`) are worth matching; that is why the corner gets the mean. An item with no
real row or no real column gets all-zero marginals, hence an all-zero plan and status
``DEGENERATE``, as :func:`uniform_marginals` does. The bins are ordinary rows/columns of the
augmented problem, so the forward, the implicit backward above and the per-item status are the
plain node's; the gradient to :math:`\gamma` is autograd's through the concatenation that builds
the augmented cost.

**The bins' slow mode, and the balance step.** Plain Sinkhorn on the augmented problem needs
many more iterations than on the plain one (87 against 6 on 200 x 200 costs U[0, 2] at
``lam`` = 10; the bins carry :math:`m'` and :math:`n'` units against one per point). The slow
direction is the exchange of mass between the rows' bin entries (the bin column) and the
columns' (the bin row): scaling the bin column's potential up by :math:`\log x` and the bin
row's down by the same leaves the real block and the corner unchanged, and a row or column
update moves along it by a factor of only about :math:`1 - O(1/m')`. Along that direction the
dual is :math:`l \log x - R x - C/x` (:math:`R`, :math:`C` the current masses of the rows' and
the columns' bin entries, :math:`l = c_{bin} - r_{bin}`), maximised in closed form by the
positive root of :math:`R x^2 - l x - C = 0`. With ``balance`` (the default of
:func:`sinkhorn_with_bins`, implicit mode) every iteration takes that step between its row and
its column update (:func:`_balance_bins`, O(m + n)): an exact ascent step on the concave dual,
so convergence and the fixed point are plain Sinkhorn's, the column update after it keeps the
stopping rule as it is, and the iterations drop to 5-6 in that example. On a trained
network's costs (peaked plans) the slow mode is a different one, and mild over-relaxation still
helps: b = 8, m = n = 1000, the slowest item needs 12 / 16 iterations at w = 1 without / with
the step and 9 / 11 at w = 1.2, against 84 / 3 and 55 / 7 on costs U[0, 2]
(docs/benchmarks.md); the network's default is the step with w = 1.2.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from bpnp.nodes.linalg import SINGULAR_MODES, bmv, bmv_t, solve_spd
from bpnp.nodes.status import Status

BACKWARD_MODES = ("implicit", "unrolled")
BIN_MODES = ("shared", "per_side")  # one bin cost for both sides, or [row -> bin, column -> bin]


@dataclass
class SinkhornInfo:
    """Per-item diagnostics of the last forward pass (all (B,) tensors).

    ``marginal_error`` is measured on the returned plan: the larger of its L1 row and column
    marginal errors, relative to the mass. ``converged`` (status ``OK``) means it is within
    ``max(tol, 10 eps)``; ``backward_status`` is set by the backward (``NONFINITE`` for a
    non-finite incoming gradient on the item's real entries, whose gradients are then zero; the
    implicit backward's linear-solve fallbacks otherwise, ``OK`` for the unrolled one)."""

    iterations: torch.Tensor
    converged: torch.Tensor
    marginal_error: torch.Tensor
    status: torch.Tensor
    backward_status: torch.Tensor | None = None


def uniform_marginals(
    row_mask: torch.Tensor, col_mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform marginals over the real points: ``1/m'`` per real row, ``1/n'`` per real column.

    Args:
        row_mask: (B, m) bool, True for real rows.
        col_mask: (B, n) bool, True for real columns.

    Returns:
        ``(r (B, m), c (B, n))``, each summing to 1 per item, exactly 0 at padding; both are
        all zero for an item with no real point on either side (its plan is all zero).

    Example:
        >>> r, c = uniform_marginals(torch.tensor([[True, True, False]]), torch.tensor([[True, True]]))
        >>> r
        tensor([[0.5000, 0.5000, 0.0000]])
    """
    if row_mask.ndim != 2 or col_mask.ndim != 2 or row_mask.shape[0] != col_mask.shape[0]:
        raise ValueError(
            f"masks must have shapes (B, m) and (B, n), got {tuple(row_mask.shape)} and {tuple(col_mask.shape)}"
        )
    # An item with no real point on one side has nothing to transport: all-zero marginals.
    both = (row_mask.any(1) & col_mask.any(1))[:, None]
    rm, cm = (row_mask & both).to(dtype), (col_mask & both).to(dtype)
    r = rm / rm.sum(1, keepdim=True).clamp_min(1)
    c = cm / cm.sum(1, keepdim=True).clamp_min(1)
    return r, c


def _validate_cost(M: torch.Tensor) -> None:
    if not isinstance(M, torch.Tensor) or not M.is_floating_point():
        raise TypeError(f"M must be a floating-point tensor, got {getattr(M, 'dtype', type(M))}")
    if M.ndim != 3:
        raise ValueError(f"M must have shape (B, m, n), got {tuple(M.shape)}")


def _validate(M: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> None:
    _validate_cost(M)
    B, m, n = M.shape
    for name, x in (("r", r), ("c", c)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"marginal {name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if r.shape != (B, m) or c.shape != (B, n):
        raise ValueError(f"r and c must have shapes {(B, m)} and {(B, n)}, got {tuple(r.shape)} and {tuple(c.shape)}")
    if r.device != M.device or c.device != M.device:
        raise ValueError(f"M, r and c must be on one device, got {M.device}, {r.device}, {c.device}")
    rd, cd = r.detach(), c.detach()
    if not (torch.isfinite(rd).all() and torch.isfinite(cd).all()):
        raise ValueError("marginals r and c must be finite")
    if bool((rd < 0).any()) or bool((cd < 0).any()):
        raise ValueError("marginals r and c must be non-negative (0 marks padding)")
    mass_r, mass_c = rd.sum(1), cd.sum(1)
    gap = (mass_r - mass_c).abs() > 1e-4 * torch.maximum(mass_r, mass_c).clamp_min(1e-12)
    if bool(gap.any()):
        i = int(gap.nonzero()[0])
        raise ValueError(
            f"marginals must have equal mass per item: item {i} has sum(r)={float(mass_r[i]):.6g}, "
            f"sum(c)={float(mass_c[i]):.6g}"
        )


def _check_overrelax(overrelax: float) -> float:
    """``overrelax`` as a float in [1, 2) (1 = plain Sinkhorn), else a ValueError naming it."""
    w = float(overrelax) if isinstance(overrelax, numbers.Real) and not isinstance(overrelax, bool) else float("nan")
    if not 1.0 <= w < 2.0:
        raise ValueError(f"overrelax must be a number with 1 <= overrelax < 2 (1 = plain Sinkhorn), got {overrelax!r}")
    return w


def _check_options(lam: float, backward: str, singular: str, overrelax: float = 1.0) -> None:
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if singular not in SINGULAR_MODES:
        raise ValueError(f"singular must be one of {SINGULAR_MODES}, got {singular!r}")
    if not lam > 0:
        raise ValueError(f"lam must be positive, got {lam}")
    _check_overrelax(overrelax)


def _check_schur(schur: str) -> str:
    if schur not in SCHUR_SOLVERS:
        raise ValueError(f"schur must be one of {SCHUR_SOLVERS}, got {schur!r}")
    return schur


def _row_low(M: torch.Tensor, drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, has)``, both (B, m, 1): the smallest entry of each row of ``M`` outside ``drop``
    (None = nothing dropped), detached, 0 for a row with none; ``has``: the row has one.

    Subtracting it does not change the plan (the row potential absorbs it), but ``-lam * M``
    formed from a large ``M`` keeps only its leading digits: ``M + 1000`` in float32 has a
    spacing of 6e-5, times ``lam`` = 10 a relative error of 6e-4 in the plan. The difference to
    the row minimum is exact (Sterbenz) for entries within a factor 2 of it.
    """
    low = (M.detach() if drop is None else M.detach().masked_fill(drop, float("inf"))).amin(2, keepdim=True)
    has = torch.isfinite(low)
    return torch.where(has, low, torch.zeros_like(low)), has


def _measured_error(P, r, c, mass):
    """(B,) L1 marginal error of the returned plan itself, rows and columns, relative to the mass
    (the iterations' own estimate can miss the rounding of forming the plan)."""
    row_err = (P.detach().sum(2) - r).abs().sum(1)
    col_err = (P.detach().sum(1) - c).abs().sum(1)
    return torch.maximum(row_err, col_err) / mass


def _info(active, row, col, finite_item, iterations, err, tol=None, measured=None) -> SinkhornInfo:
    """Per-item diagnostics shared by both forward algorithms: items still active at the end hit
    max_iter; items with no real row or column are degenerate; non-finite costs win over both.

    With ``measured`` (the marginal error of the returned plan), that is the reported error, and
    an item whose iterations stopped on their estimate but whose plan misses ``tol`` (by more
    than rounding, ``10 eps``) is not converged (status ``MAX_ITER``): e.g. float32 with
    ``lam`` = 1e4, where exponents of 1e4 keep three digits after the point."""
    converged = ~active
    if measured is not None:
        eps = torch.finfo(measured.dtype).eps
        floor = max(float(tol), 10 * eps) if tol is not None and tol >= 0 else float("inf")
        converged = converged & (measured <= floor)
        err = measured
    status = torch.where(converged, int(Status.OK), int(Status.MAX_ITER)).long()
    empty = ~(row.any(1) & col.any(1))
    status = torch.where(empty, torch.full_like(status, int(Status.DEGENERATE)), status)
    status = torch.where(finite_item, status, torch.full_like(status, int(Status.NONFINITE)))
    return SinkhornInfo(iterations=iterations, converged=converged & finite_item, marginal_error=err, status=status)


def _sinkhorn_iterations(M, r, c, lam, max_iter, tol):
    """Log-domain Sinkhorn with per-item stopping; differentiable torch ops throughout."""
    B, m, n = M.shape
    dtype = M.dtype
    # A finite "minus infinity" keeps padded potentials out of the plan (exp underflows to 0)
    # without producing inf - inf = NaN, in the forward or in an unrolled backward.
    # (A sum of two such values must still be representable, hence the /8.)
    neg = -torch.finfo(dtype).max / 8
    row, col = r > 0, c > 0
    real = row[:, :, None] & col[:, None, :]
    finite_item = torch.where(real, torch.isfinite(M), torch.ones_like(real)).flatten(1).all(1)
    keep = real & finite_item[:, None, None]
    logK = -lam * torch.where(keep, M - _row_low(M, ~keep)[0], torch.zeros_like(M))
    log_r = torch.log(torch.where(row, r, torch.ones_like(r)))
    log_c = torch.log(torch.where(col, c, torch.ones_like(c)))
    mass = r.sum(1).clamp_min(torch.finfo(dtype).tiny)

    alpha = torch.where(row, torch.zeros_like(r), torch.full_like(r, neg))
    beta = torch.where(col, log_c - torch.logsumexp(logK + alpha[:, :, None], dim=1), torch.full_like(c, neg))
    active = row.any(1) & col.any(1) & finite_item
    iterations = torch.zeros(B, dtype=torch.long, device=M.device)
    err = torch.zeros(B, dtype=dtype, device=M.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        alpha_new = torch.where(row, log_r - torch.logsumexp(logK + beta[:, None, :], dim=2), torch.full_like(r, neg))
        # Row sums of the current plan are r * exp(alpha - alpha_new): its L1 marginal error.
        ratio = torch.exp(torch.where(row, alpha - alpha_new, torch.zeros_like(r)))
        err_now = (r * (ratio - 1).abs()).sum(1).detach() / mass
        err = torch.where(active, err_now, err)
        active = active & (err_now > tol)
        if not bool(active.any()):
            break
        alpha = torch.where(active[:, None], alpha_new, alpha)
        beta_new = torch.where(col, log_c - torch.logsumexp(logK + alpha[:, :, None], dim=1), torch.full_like(c, neg))
        beta = torch.where(active[:, None], beta_new, beta)
        iterations = iterations + active.long()
    P = torch.exp(logK + alpha[:, :, None] + beta[:, None, :])
    P = torch.where(real & finite_item[:, None, None], P, torch.zeros_like(P))
    measured = _measured_error(P, r, c, mass)
    return P, _info(active, row, col, finite_item, iterations, err, tol, measured)


def _relaxed_scaling(u, Ku, r, real, w, kappa, tiny):
    """Over-relaxed Sinkhorn scaling ``u^(1-w) (r / Ku)^w`` with a per-item safeguard (B, k).

    ``u`` is the current scaling, ``Ku`` the kernel applied to the other one, ``real`` masks the
    real entries. In logs, ``log u <- (1-w) log u + w log(r / Ku)``; it is evaluated as
    ``(r / Ku) * rho^(1-w)`` with ``rho = u Ku / r`` the current plan's marginal ratio, the same
    number, but ``rho -> 1`` at convergence, so the factor rounds to about eps instead of
    ``eps |log u|`` (in float32 with ``|log u|`` ~ 20, about 1e-6 per entry, the size of ``tol``).

    Safeguard (a Lyapunov test in the spirit of Thibault et al.): with ``x = log rho``, the step
    changes the concave dual objective ``<r, alpha> + <c, beta> - sum(P)`` (``alpha``, ``beta``
    the full log scalings, absorbed potentials included) by
    ``sum r (g(x) - g((1-w) x))``, ``g(y) = e^y - 1 - y >= 0``, against ``sum r g(x)`` (the
    generalised KL of ``r`` to the plan's marginal) for the plain step. Each item takes the relaxed
    step only if ``sum r g((1-w) x) <= kappa sum r g(x)``, ``kappa = 1 - w (2-w) / 2``, i.e. if it
    gains at least half of the relaxed step's asymptotic gain ``w (2-w) sum r x^2 / 2`` (always
    true near the solution), and if every relaxed scaling is finite and in the range
    ``[tiny, 1/tiny]`` of a plain one; otherwise it takes the plain step ``r / Ku``. Every step
    thus raises the dual, bounded above, by at least ``w (2-w) / 2`` times the plain step's gain,
    so the errors tend to 0 from any start, as for plain Sinkhorn. (Far from the solution a relaxed
    step can lower the dual: ``g((1-w) x)`` grows like ``e^((w-1)|x|)`` for a marginal far below
    its target. The marginal error itself, monotone for plain Sinkhorn, is not monotone under
    relaxation even where it converges fast: a permanent fallback on an error increase, tried
    first, switched relaxation off after the first iteration on the bin problems.)
    """
    plain = r / Ku.clamp_min(tiny)
    one = torch.ones_like(r)
    x = torch.log1p(torch.where(real, (u * Ku - r) / torch.where(real, r, one), torch.zeros_like(r)))
    g_plain = ((torch.expm1(x) - x) * r).sum(1)
    y = (1.0 - w) * x
    g_rel = ((torch.expm1(y) - y) * r).sum(1)
    relaxed = plain * torch.exp(y)
    ok = (g_rel <= kappa * g_plain) & (~real | ((relaxed >= tiny) & (relaxed <= 1.0 / tiny))).all(1)
    return torch.where(ok[:, None], relaxed, plain)


def _balance_bins(u, v, Kt, r, c, tiny):
    """Exact dual ascent along the bins' exchange direction (B, m+1), (B, n+1) -> new ``u``, ``v``.

    The last row and column are the outlier bins. Scaling the bin column by ``x`` and the bin
    row by ``1/x`` leaves the real block and the corner unchanged and moves mass between the
    rows' bin entries (total ``R x``) and the columns' (total ``C / x``). The dual objective
    along ``log x`` is ``l log x - R x - C / x`` with ``l = c_bin - r_bin``; its maximiser is the
    positive root of ``R x^2 - l x - C = 0``. Plain Sinkhorn moves along this direction only by
    a factor of about ``1 - O(1/m')`` per iteration (the bins carry ``m'``, ``n'`` units against
    one per point), which is why the bins' forward needed ~85 iterations where the plain problem
    needs ~3; this closed-form step per iteration removes that mode (module docstring)."""
    R = (u[:, :-1] * Kt[:, :-1, -1]).sum(1) * v[:, -1]
    C = u[:, -1] * (Kt[:, -1, :-1] * v[:, :-1]).sum(1)
    lin = c[:, -1] - r[:, -1]
    sq = torch.sqrt(lin * lin + 4.0 * R * C)
    # The root in the form without cancellation for either sign of lin.
    x = torch.where(lin >= 0, (lin + sq) / (2.0 * R).clamp_min(tiny), (2.0 * C) / (sq - lin).clamp_min(tiny))
    ok = (R > tiny) & (C > tiny) & torch.isfinite(x) & (x > tiny) & (x < 1.0 / tiny)
    x = torch.where(ok, x, torch.ones_like(x))
    return torch.cat([u[:, :-1], u[:, -1:] / x[:, None]], 1), torch.cat([v[:, :-1], v[:, -1:] * x[:, None]], 1)


def _sinkhorn_scaling(M, r, c, lam, max_iter, tol, overrelax=1.0, balance_bins=False):
    """Stabilised Sinkhorn for the implicit mode (no graph): matrix-vector scaling iterations on
    a kernel that absorbs the log potentials whenever a scaling leaves a safe range.

    Same fixed point and stopping rule as :func:`_sinkhorn_iterations`, but each iteration is two
    batched mat-vecs instead of two ``logsumexp`` passes over the (B, m, n) matrix (about 10x
    faster on a CPU). Absorbing the potentials into the kernel keeps every stored number within
    ``exp(+-absorb)`` of the plan itself, so large ``lam`` cannot under- or overflow as the
    plain linear-domain algorithm of the original does (the log-domain stabilisation of
    Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport problems",
    2019).

    ``overrelax`` = w > 1 replaces each scaling by ``u^(1-w) (r / K v)^w`` (and the same for
    ``v``), per item and step guarded by :func:`_relaxed_scaling`, and an item then stops on the
    larger of its row and column errors (a relaxed ``v`` update leaves the columns inexact);
    w = 1 runs exactly the plain iteration.

    ``balance_bins``: the last row and column are outlier bins; between the row and the column
    update, :func:`_balance_bins` takes the exact dual step along the bins' exchange direction
    (the column update after it keeps the columns exact, so the stopping rule is unchanged).
    """
    B, m, n = M.shape
    dtype = M.dtype
    neg = -torch.finfo(dtype).max / 8
    tiny = torch.finfo(dtype).tiny
    absorb = 0.25 * math.log(torch.finfo(dtype).max)  # |log u| beyond this gets absorbed
    row, col = r > 0, c > 0
    # Every (B, m, n) pass costs about as much as a Sinkhorn iteration (two mat-vecs), so the
    # set-up below makes as few as it can: no masks without padding or non-finite costs, masked
    # fills with scalars, in-place arithmetic.
    finite = torch.isfinite(M)
    drop = None if bool(row.all()) and bool(col.all()) else ~(row[:, :, None] & col[:, None, :])  # padding
    finite_item = (finite if drop is None else finite | drop).flatten(1).all(1)
    if not bool(finite_item.all()):
        bad = ~finite_item[:, None, None]
        drop = bad.expand_as(M).clone() if drop is None else drop | bad
    # M minus its smallest kept entry per row (_row_low): then the largest kept entry of each
    # row of logK is exactly 0, so the row-max-shifted start below is alpha = 0.
    low, has = _row_low(M, drop)
    logK = (M - low).mul_(-lam)
    if drop is not None:
        logK.masked_fill_(drop, neg)
    # Row-max-shifted potentials, so that every real row has an entry of 1 (-neg where a row has
    # no kept entry, as -max(logK) would be).
    alpha = torch.where(row, torch.where(has.squeeze(2), torch.zeros_like(r), torch.full_like(r, -neg)), torch.full_like(r, neg))
    beta = torch.where(col, torch.zeros_like(c), torch.full_like(c, neg))
    mass = r.sum(1).clamp_min(tiny)

    def kernel():
        return logK.add(alpha[:, :, None]).add_(beta[:, None, :]).exp_()

    # kernel() with alpha = beta = 0 where anything is kept; elsewhere (padding, non-finite
    # items) the plan is masked to 0 at the end and u, v never read these entries.
    Kt = logK.exp()
    u = row.to(dtype)
    v = torch.where(col, c / bmv_t(Kt, u).clamp_min(tiny), torch.zeros_like(c))
    active = row.any(1) & col.any(1) & finite_item
    iterations = torch.zeros(B, dtype=torch.long, device=M.device)
    err = torch.zeros(B, dtype=dtype, device=M.device)
    relax = overrelax != 1.0  # w = 1: the plain iteration below, operation for operation

    def _balanced(u, v, active):
        bu, bv = _balance_bins(u, v, Kt, r, c, tiny)
        return torch.where(active[:, None], bu, u), torch.where(active[:, None], bv, v)

    if relax:
        w = float(overrelax)
        # A relaxed step is taken when it gains at least half of what a relaxed step gains
        # asymptotically (see _relaxed_scaling); the column error of the current plan is kept
        # because a relaxed v update leaves the columns inexact.
        kappa = 1.0 - 0.5 * w * (2.0 - w)
        col_err = torch.zeros(B, dtype=dtype, device=M.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Kv = bmv(Kt, v)
        err_now = ((u * Kv - r).abs() * row).sum(1) / mass  # row error of the current plan
        if relax:
            err_now = torch.maximum(err_now, col_err)
        err = torch.where(active, err_now, err)
        active = active & (err_now > tol)
        if not bool(active.any()):
            break
        if relax:
            u = torch.where(active[:, None] & row, _relaxed_scaling(u, Kv, r, row, w, kappa, tiny), u)
            if balance_bins:
                u, v = _balanced(u, v, active)
            KTu = bmv_t(Kt, u)
            v = torch.where(active[:, None] & col, _relaxed_scaling(v, KTu, c, col, w, kappa, tiny), v)
            # Column error of the new plan (zero up to rounding after a plain v update).
            col_err = torch.where(active, ((v * KTu - c).abs() * col).sum(1) / mass, col_err)
        else:
            u = torch.where(active[:, None] & row, r / Kv.clamp_min(tiny), u)
            if balance_bins:
                u, v = _balanced(u, v, active)
            KTu = bmv_t(Kt, u)
            v = torch.where(active[:, None] & col, c / KTu.clamp_min(tiny), v)
        iterations = iterations + active.long()
        lu = torch.where(row, torch.log(u.clamp_min(tiny)), torch.zeros_like(u))
        lv = torch.where(col, torch.log(v.clamp_min(tiny)), torch.zeros_like(v))
        # Absorb per item, and only items still iterating: re-forming the kernel of a converged
        # item from its potentials rounds differently (float32, large lam: exponents ~lam keep
        # few digits) and would change its plan after its error was measured.
        need = active & (((lu.abs() > absorb) & row).any(1) | ((lv.abs() > absorb) & col).any(1))
        if bool(need.any()):
            alpha = torch.where(need[:, None] & row, alpha + lu, alpha)
            beta = torch.where(need[:, None] & col, beta + lv, beta)
            Kt = torch.where(need[:, None, None], kernel(), Kt)
            u = torch.where(need[:, None], row.to(dtype), u)
            v = torch.where(need[:, None], col.to(dtype), v)
    P = (u[:, :, None] * Kt).mul_(v[:, None, :])
    if drop is not None:
        P.masked_fill_(drop, 0.0)
    measured = _measured_error(P, r, c, mass)
    return P, _info(active, row, col, finite_item, iterations, err, tol, measured)


SCHUR_SOLVERS = ("cg", "cholesky")
#: Iteration limit of the Schur system's conjugate gradients; an item that needs more is solved
#: densely instead (a well-conditioned S converges in far fewer).
CG_MAX_ITER = 100


def _schur_dense(P, rs, inv_cs, tau, u, rowf):
    """(B, m, m) Schur complement ``diag(P 1) - P diag(P^T 1)^-1 P^T`` plus the gauge term
    ``tau u u^T`` and a unit diagonal at padded rows (module docstring)."""
    S = torch.diag_embed(rs) - (P * inv_cs[:, None, :]) @ P.transpose(1, 2)
    S = S + tau[:, :, None] * u[:, :, None] * u[:, None, :] + torch.diag_embed(1.0 - rowf)
    return 0.5 * (S + S.transpose(1, 2))


def _schur_pcg(P, rs, inv_cs, tau, u, rowf, rhs, tol):
    """Jacobi-preconditioned conjugate gradients on the Schur system, matrix-free.

    ``S x = rs x - P (inv_cs (P^T x)) + tau u (u . x) + (1 - rowf) x`` costs two (B, m, n)
    mat-vecs, against the dense path's (B, m, n) x (B, n, m) product and an m^3 Cholesky. Each
    item stops when ``||r|| <= tol ||rhs||``. Returns ``(a (B, m), ok (B,))``; ``ok`` is False for
    items that hit :data:`CG_MAX_ITER`, met a non-positive curvature or a non-positive diagonal,
    or did not stay finite (the caller solves those densely)."""
    tiny = torch.finfo(P.dtype).tiny

    def op(x):
        y = bmv(P, inv_cs * bmv_t(P, x))
        return rs * x - y + tau * u * (u * x).sum(1, keepdim=True) + (1.0 - rowf) * x

    diag = rs - (P * P * inv_cs[:, None, :]).sum(2) + tau * u * u + (1.0 - rowf)
    ok = (diag > 0).all(1) & torch.isfinite(rhs).all(1)
    inv_d = torch.where(diag > 0, 1.0 / torch.where(diag > 0, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = inv_d * r
    p = z.clone()
    rz = (r * z).sum(1)
    stop = (tol * rhs.norm(dim=1)) ** 2
    active = ok & ((r * r).sum(1) > stop)
    for _ in range(CG_MAX_ITER):
        if not bool(active.any()):
            break
        Sp = op(p)
        curv = (p * Sp).sum(1)
        bad = active & ~(torch.isfinite(curv) & (curv > tiny))
        ok, active = ok & ~bad, active & ~bad
        alpha = torch.where(active, rz / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rz))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Sp
        z = inv_d * r
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)).clamp_min(tiny), torch.zeros_like(rz))
        p = torch.where(active[:, None], z + beta[:, None] * p, p)
        rz = torch.where(active, rz_new, rz)
        active = active & ((r * r).sum(1) > stop)
    ok = ok & ~active & torch.isfinite(x).all(1)
    return torch.where(ok[:, None], x, torch.zeros_like(x)), ok


def _schur_solve(P, rs, inv_cs, tau, u, rowf, rhs, singular, schur, cg_tol):
    """Solve the Schur system per item: by :func:`_schur_pcg` (``schur="cg"``), with the dense
    Cholesky of :func:`~bpnp.nodes.linalg.solve_spd` for the items it does not certify, or
    densely throughout (``"cholesky"``). Returns ``(a (B, m), status (B,))``."""
    if schur == "cg":
        a, ok = _schur_pcg(P, rs, inv_cs, tau, u, rowf, rhs, cg_tol)
        status = torch.full(ok.shape, int(Status.OK), dtype=torch.long, device=P.device)
        if bool(ok.all()):
            return a, status
        idx = torch.nonzero(~ok).squeeze(1)
        sel = lambda x: x.index_select(0, idx)  # noqa: E731
        a_d, s_d = _schur_dense_solve(sel(P), sel(rs), sel(inv_cs), sel(tau), sel(u), sel(rowf), sel(rhs), singular)
        return a.index_copy(0, idx, a_d), status.index_copy(0, idx, s_d)
    return _schur_dense_solve(P, rs, inv_cs, tau, u, rowf, rhs, singular)


def _schur_dense_solve(P, rs, inv_cs, tau, u, rowf, rhs, singular):
    S = _schur_dense(P, rs, inv_cs, tau, u, rowf)
    # Cholesky success is the criterion here: peaked plans (large lam) make S legitimately
    # ill-conditioned while the solve stays accurate enough for a gradient.
    return solve_spd(S, rhs, mode=singular, rcond=float(torch.finfo(P.dtype).eps))


def _ot_backward(P, G, row, col, lam, need_marginals, singular, schur="cholesky", cg_tol=None):
    """Implicit gradients of the OT plan; see the module docstring for the derivation.

    ``schur``: ``"cg"`` (matrix-free preconditioned CG to the relative residual ``cg_tol``, the
    dense solve for the items it does not certify) or ``"cholesky"`` (dense)."""
    B, m, n = P.shape
    transpose = m > n  # eliminate the larger side so the dense system is min(m, n) square
    if transpose:
        P, G, row, col = P.transpose(1, 2), G.transpose(1, 2), col, row
    GP = G * P
    g_r, g_c = GP.sum(2), GP.sum(1)
    rs, cs = P.sum(2), P.sum(1)
    inv_cs = torch.where(col & (cs > 0), 1.0 / torch.where(cs > 0, cs, torch.ones_like(cs)), torch.zeros_like(cs))
    rowf = row.to(P.dtype)
    count = rowf.sum(1, keepdim=True).clamp_min(1)
    u = rowf / count.sqrt()
    tau = (rs.sum(1, keepdim=True) / count).clamp_min(torch.finfo(P.dtype).tiny)  # mean real row mass
    rhs = g_r - bmv(P, inv_cs * g_c)
    rhs = torch.where(row, rhs, torch.zeros_like(rhs))
    a, status = _schur_solve(P, rs, inv_cs, tau, u, rowf, rhs, singular, schur, cg_tol)
    b = (g_c - bmv_t(P, a)) * inv_cs
    gM = lam * P * (a[:, :, None] + b[:, None, :] - G)
    ga = gb = None
    if need_marginals:
        # Minimum-norm representative of the gauge family (a + t, b - t).
        colf = col.to(P.dtype)
        t = ((b * colf).sum(1) - (a * rowf).sum(1)) / (rowf.sum(1) + colf.sum(1)).clamp_min(1)
        ga = (a + t[:, None]) * rowf
        gb = (b - t[:, None]) * colf
    if transpose:
        gM = gM.transpose(1, 2)
        ga, gb = gb, ga
    return gM, ga, gb, status


def _screen_incoming(G, row, col):
    """The incoming gradient dL/dP with every non-finite item zeroed, and the (B,) mask of finite
    items. A non-finite value on an item's real entries makes that item NONFINITE with zero
    gradients (not silently 0 with status OK, nor NaN in dL/dM); at padding (P = 0 exactly, a
    constant) it is ignored."""
    real = row[:, :, None] & col[:, None, :]
    g_ok = torch.where(real, torch.isfinite(G), torch.ones_like(real)).flatten(1).all(1)
    return torch.where(real & g_ok[:, None, None], G, torch.zeros_like(G)), g_ok


class _SinkhornFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, r, c, lam, max_iter, tol, singular, holder, overrelax, balance_bins, schur):
        with torch.no_grad():
            P, info = _sinkhorn_scaling(M, r, c, lam, max_iter, tol, overrelax, balance_bins)
        holder["info"] = info
        ctx.lam, ctx.singular, ctx.holder, ctx.schur = lam, singular, holder, schur
        # The Schur system to the forward's own accuracy (never below what the dtype resolves).
        ctx.cg_tol = max(float(tol), 10 * float(torch.finfo(M.dtype).eps))
        ctx.save_for_backward(P, r > 0, c > 0)
        return P

    @staticmethod
    def backward(ctx, G):
        P, row, col = ctx.saved_tensors
        need_r, need_c = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        G, g_ok = _screen_incoming(G, row, col)
        gM, ga, gb, status = _ot_backward(P, G, row, col, ctx.lam, need_r or need_c, ctx.singular,
                                          ctx.schur, ctx.cg_tol)
        status = torch.where(g_ok, status, torch.full_like(status, int(Status.NONFINITE)))
        info = ctx.holder.get("info")
        if info is not None:
            info.backward_status = status
        return gM, (ga if need_r else None), (gb if need_c else None), None, None, None, None, None, None, None, None


def sinkhorn(
    M: torch.Tensor,
    r: torch.Tensor,
    c: torch.Tensor,
    lam: float = 10.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    backward: str = "implicit",
    singular: str = "damp",
    *,
    overrelax: float = 1.0,
    balance_bins: bool = False,
    schur: str = "cg",
) -> tuple[torch.Tensor, SinkhornInfo]:
    """Entropic optimal transport plan, batched, differentiable in ``M``, ``r`` and ``c``.

    Args:
        M: (B, m, n) cost matrices (finite on real entries; padded entries are ignored).
        r: (B, m) row marginals, >= 0, 0 marks a padded row.
        c: (B, n) column marginals, >= 0, same mass as ``r`` per item.
        lam: inverse temperature lambda > 0 (larger = closer to a hard assignment).
        max_iter: iteration limit per item.
        tol: stop an item when its L1 row-marginal error divided by its mass is <= tol; a
            negative ``tol`` runs exactly ``max_iter`` iterations (for benchmarks). The returned
            plan's own error (rows and columns) is then measured: an item above
            ``max(tol, 10 eps)`` (float32 with a very large ``lam``) is ``MAX_ITER``, not ``OK``.
        backward: ``"implicit"`` (Schur-complement solve, memory independent of iterations) or
            ``"unrolled"`` (autograd through the iterations).
        singular: per-item fallback if the backward system is singular (``"damp"``,
            ``"min_norm"``, ``"zero"``).
        overrelax: over-relaxation factor w, 1 <= w < 2, of the implicit-mode forward: each
            scaling becomes ``u^(1-w) (r / K v)^w``. Same fixed point, same ``tol`` (then on the
            row *and* column error, as columns are no longer exact), fewer iterations on slow
            problems (bins); a relaxed step that fails a per-item Lyapunov (dual ascent) test
            is replaced by the plain one. 1 (default) is plain Sinkhorn, exactly. Ignored by
            ``backward="unrolled"``, which stays the plain log-domain reference.
        balance_bins: the last row and column are outlier bins (:func:`sinkhorn_with_bins`):
            the implicit-mode forward adds an exact dual step along their exchange direction
            per iteration (:func:`_balance_bins`; same fixed point and ``tol``). Ignored by
            ``backward="unrolled"``.
        schur: how the implicit backward solves its Schur system: ``"cg"`` (Jacobi-preconditioned
            conjugate gradients, matrix-free, to the relative residual ``max(tol, 10 eps)``; the
            dense Cholesky for any item it does not certify) or ``"cholesky"`` (dense, the
            reference). Per-item ``backward_status`` as before.

    Returns:
        ``(P, info)``: (B, m, n) transport plans and per-item :class:`SinkhornInfo`.

    Example:
        >>> M = torch.rand(2, 3, 4); r, c = uniform_marginals(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
        >>> P, info = sinkhorn(M, r, c)
        >>> torch.allclose(P.sum(2), r, atol=1e-5)
        True
    """
    _check_options(lam, backward, singular, overrelax)
    _check_schur(schur)
    _validate(M, r, c)
    r, c = r.to(M.dtype), c.to(M.dtype)
    if backward == "unrolled":
        P, info = _sinkhorn_iterations(M, r, c, lam, max_iter, tol)
        if P.requires_grad:  # the same screening of dL/dP as the implicit backward
            row, col = r > 0, c > 0

            def screen(G):
                G, g_ok = _screen_incoming(G, row, col)
                info.backward_status = torch.where(g_ok, int(Status.OK), int(Status.NONFINITE)).long()
                return G

            P.register_hook(screen)
        return P, info
    holder: dict = {}
    P = _SinkhornFunction.apply(
        M, r, c, float(lam), int(max_iter), float(tol), singular, holder, _check_overrelax(overrelax),
        bool(balance_bins), schur,
    )
    return P, holder["info"]


class SinkhornOT(nn.Module):
    """Layer form of :func:`sinkhorn`; the last forward's diagnostics are in :attr:`last_info`.

    Args:
        lam, max_iter, tol, backward, singular, overrelax, schur: as in :func:`sinkhorn`.
    """

    def __init__(
        self,
        lam: float = 10.0,
        max_iter: int = 100,
        tol: float = 1e-6,
        backward: str = "implicit",
        singular: str = "damp",
        *,
        overrelax: float = 1.0,
        schur: str = "cg",
    ) -> None:
        super().__init__()
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
        self.lam, self.max_iter, self.tol, self.backward, self.singular = lam, max_iter, tol, backward, singular
        self.overrelax = _check_overrelax(overrelax)
        self.schur = _check_schur(schur)
        self.last_info: SinkhornInfo | None = None

    def forward(self, M: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        P, self.last_info = sinkhorn(
            M, r, c, self.lam, self.max_iter, self.tol, self.backward, self.singular, overrelax=self.overrelax, schur=self.schur
        )
        return P

    def extra_repr(self) -> str:
        extra = f", overrelax={self.overrelax}" if self.overrelax != 1.0 else ""
        return f"lam={self.lam}, max_iter={self.max_iter}, tol={self.tol}, backward={self.backward!r}{extra}"


# --------------------------------------------------------------------------------------------
# Outlier bins (dustbins); see the module docstring.
# --------------------------------------------------------------------------------------------
def _validate_masks(mask_rows: torch.Tensor, mask_cols: torch.Tensor, B: int, m: int, n: int, device) -> None:
    for name, mask, size in (("mask_rows", mask_rows, m), ("mask_cols", mask_cols, n)):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (B, size):
            raise ValueError(f"{name} must have shape {(B, size)}, got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"{name} must be on {device}, got {mask.device}")


def bin_marginals(
    mask_rows: torch.Tensor, mask_cols: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginals of the bin-augmented problem (SuperGlue's, scaled to total mass 1).

    With ``m'``, ``n'`` the real counts of an item: ``1/(m'+n')`` per real row and column,
    ``n'/(m'+n')`` on the bin row, ``m'/(m'+n')`` on the bin column, 0 at padding.

    Args:
        mask_rows: (B, m) bool, True for real rows.
        mask_cols: (B, n) bool, True for real columns.
        dtype: floating dtype of the result.

    Returns:
        ``(r (B, m+1), c (B, n+1))``, the bin last, each summing to 1 per item; both all zero for
        an item with no real row or no real column (nothing to match: zero plan, ``DEGENERATE``).

    Example:
        >>> r, c = bin_marginals(torch.tensor([[True, True, False]]), torch.tensor([[True, True]]))
        >>> r, c
        (tensor([[0.2500, 0.2500, 0.0000, 0.5000]]), tensor([[0.2500, 0.2500, 0.5000]]))
    """
    shapes = [tuple(getattr(x, "shape", ())) for x in (mask_rows, mask_cols)]
    if len(shapes[0]) != 2 or len(shapes[1]) != 2:
        raise ValueError(f"mask_rows and mask_cols must have shapes (B, m) and (B, n), got {shapes[0]} and {shapes[1]}")
    _validate_masks(mask_rows, mask_cols, shapes[0][0], shapes[0][1], shapes[1][1], mask_rows.device)
    rows, cols = mask_rows.to(dtype), mask_cols.to(dtype)
    m_real, n_real = rows.sum(1, keepdim=True), cols.sum(1, keepdim=True)
    unit = ((m_real > 0) & (n_real > 0)).to(dtype) / (m_real + n_real).clamp_min(1)  # 0: nothing to match
    return torch.cat([rows * unit, n_real * unit], 1), torch.cat([cols * unit, m_real * unit], 1)


def _augmented_cost(M: torch.Tensor, bin_cost: torch.Tensor | float) -> torch.Tensor:
    """(B, m+1, n+1) cost: ``M``, then the row -> bin column, the column -> bin row, the corner."""
    if not isinstance(bin_cost, torch.Tensor):
        bin_cost = torch.as_tensor(bin_cost, dtype=M.dtype, device=M.device)
    if bin_cost.shape not in ((), (2,)):
        raise ValueError(f"bin_cost must have shape () (shared) or (2,) (row, column), got {tuple(bin_cost.shape)}")
    if bin_cost.device != M.device:
        raise ValueError(f"bin_cost must be on {M.device} like M, got {bin_cost.device}")
    g = bin_cost.to(M.dtype)
    # The corner carries the matched mass; the mean makes "matched" mean "cheaper than the mean
    # bin cost" (module docstring). A shared cost is its own mean, kept exact.
    g_row, g_col, corner = (g, g, g) if g.ndim == 0 else (g[0], g[1], g.mean())
    B, m, n = M.shape
    # Two cats (not slice assignment) so that the backward only takes views of the gradient.
    top = torch.cat([M, g_row.expand(B, m, 1)], 2)
    return torch.cat([top, torch.cat([g_col.expand(B, 1, n), corner.expand(B, 1, 1)], 2)], 1)


def sinkhorn_with_bins(
    M: torch.Tensor,
    mask_rows: torch.Tensor,
    mask_cols: torch.Tensor,
    bin_cost: torch.Tensor | float,
    lam: float = 10.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    backward: str = "implicit",
    singular: str = "damp",
    *,
    overrelax: float = 1.0,
    balance: bool = True,
    schur: str = "cg",
) -> tuple[torch.Tensor, SinkhornInfo]:
    """Entropic OT with outlier bins (dustbins): every real point may stay unmatched.

    Solves :func:`sinkhorn` on the cost augmented by a bin column (index ``n``) and a bin row
    (index ``m``), with the marginals of :func:`bin_marginals`; see the module docstring.
    Differentiable in ``M`` and ``bin_cost``; the padding, stopping rule, implicit backward and
    per-item status are the plain node's. A non-finite ``bin_cost`` makes every item
    ``NONFINITE`` (zero plan), as a non-finite real cost does for its own item.

    Args:
        M: (B, m, n) costs between real rows and columns (entries at padding are ignored).
        mask_rows: (B, m) bool, False marks a padded row.
        mask_cols: (B, n) bool, False marks a padded column.
        bin_cost: cost of leaving a point unmatched, in the units of ``M``: shape () shared by
            both sides, or (2,) ``[row -> bin column, column -> bin row]``; the corner (bin, bin)
            gets their mean. A float is taken as a shared cost.
        lam, max_iter, tol, backward, singular, overrelax, schur: as in :func:`sinkhorn` (``tol``
            is relative to the total mass 1 of the augmented plan).
        balance: the exact dual step along the bins' exchange direction per iteration
            (``balance_bins`` of :func:`sinkhorn`; module docstring). The bins' large marginals
            make plain Sinkhorn slow here (about 85 iterations on 1000 x 1000 costs U[0, 2] at
            ``lam`` = 10 where the plain problem needs 3); with it, about as many as the plain
            problem. False: the plain iteration (``overrelax`` then helps).

    Returns:
        ``(P_aug, info)``: (B, m+1, n+1) plans, the bins last (``P_aug[:, m]``, ``P_aug[:, :, n]``),
        exactly 0 on padded rows/columns; :class:`SinkhornInfo` per item. :func:`split_bins`
        turns ``P_aug`` into the matching and the inlier probabilities.

    Example:
        >>> M = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [2.0, 2.0]]])  # row 2 matches nothing
        >>> rows, cols = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
        >>> P_aug, info = sinkhorn_with_bins(M, rows, cols, torch.tensor(1.0), lam=10.0, max_iter=1000)
        >>> P_aug.shape, info.status.tolist()
        (torch.Size([1, 4, 3]), [0])
        >>> split_bins(P_aug, rows, cols).row_inlier.round(decimals=2)
        tensor([[0.9900, 0.9900, 0.0000]])
    """
    _validate_cost(M)
    B, m, n = M.shape
    _validate_masks(mask_rows, mask_cols, B, m, n, M.device)
    r, c = bin_marginals(mask_rows, mask_cols, M.dtype)
    return sinkhorn(_augmented_cost(M, bin_cost), r, c, lam, max_iter, tol, backward, singular, overrelax=overrelax,
                    balance_bins=balance, schur=schur)


@dataclass
class BinSplit:
    """A bin-augmented plan split into what its consumers need (see :func:`split_bins`).

    Attributes:
        P: (B, m, n) real block renormalised to sum 1 per item (all zero if it carries no mass).
        row_inlier: (B, m) probability in [0, 1] that a row is matched (0 at padding).
        col_inlier: (B, n) probability in [0, 1] that a column is matched (0 at padding).
        P_aug: (B, m+1, n+1) the plan itself.
    """

    P: torch.Tensor
    row_inlier: torch.Tensor
    col_inlier: torch.Tensor
    P_aug: torch.Tensor


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """num / den where ``keep & den > 0``, else 0, with no NaN in the value or its gradient."""
    ok = den > 0 if keep is None else keep & (den > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def split_bins(P_aug: torch.Tensor, mask_rows: torch.Tensor, mask_cols: torch.Tensor) -> BinSplit:
    """Split a plan of :func:`sinkhorn_with_bins` into the matching and the inlier probabilities.

    A point's inlier probability is the share of its plan mass that goes to real points: its
    real-block row (column) sum over its full row (column) sum including the bin. At convergence
    the full sum is its marginal; dividing by the plan's own sum keeps the ratio in [0, 1] even
    when ``max_iter`` stopped the solve early. Differentiable; no NaN for an all-zero plan.

    Args:
        P_aug: (B, m+1, n+1) plans, the bin row and column last.
        mask_rows: (B, m) bool, False marks a padded row.
        mask_cols: (B, n) bool, False marks a padded column.

    Returns:
        :class:`BinSplit` with ``P`` (B, m, n), ``row_inlier`` (B, m), ``col_inlier`` (B, n).
    """
    if not isinstance(P_aug, torch.Tensor) or P_aug.ndim != 3 or min(P_aug.shape[1:]) < 1:
        raise ValueError(f"P_aug must have shape (B, m+1, n+1), got {tuple(getattr(P_aug, 'shape', ()))}")
    B, m, n = P_aug.shape[0], P_aug.shape[1] - 1, P_aug.shape[2] - 1
    _validate_masks(mask_rows, mask_cols, B, m, n, P_aug.device)
    P = P_aug[:, :m, :n]
    mass = P.sum((1, 2), keepdim=True)
    P_norm = _safe_ratio(P, mass)
    # part / (part + bin) with bin >= 0 stays <= 1 under rounding, unlike part / row sum.
    row_real, col_real = P.sum(2), P.sum(1)
    row_inlier = _safe_ratio(row_real, row_real + P_aug[:, :m, n], mask_rows)
    col_inlier = _safe_ratio(col_real, col_real + P_aug[:, m, :n], mask_cols)
    return BinSplit(P=P_norm, row_inlier=row_inlier, col_inlier=col_inlier, P_aug=P_aug)


class SinkhornOTWithBins(nn.Module):
    """Layer form of :func:`sinkhorn_with_bins` with a learnable bin cost.

    Args:
        lam, max_iter, tol, backward, singular: as in :func:`sinkhorn` (same order as
            :class:`SinkhornOT`).
        overrelax: as in :func:`sinkhorn` (keyword only).
        balance: as in :func:`sinkhorn_with_bins`; schur: as in :func:`sinkhorn` (keyword only).
        bins: ``"shared"`` (:attr:`bin_cost` of shape ()) or ``"per_side"`` (shape (2,):
            ``[row -> bin, column -> bin]``).
        bin_init: initial bin cost, in the units of ``M``. The network's costs lie in [0, 2]:
            1.0 sits between a perfect match (0) and an unrelated pair (about 1.4).

    The last forward's diagnostics are in :attr:`last_info`.
    """

    def __init__(
        self,
        lam: float = 10.0,
        max_iter: int = 100,
        tol: float = 1e-6,
        backward: str = "implicit",
        singular: str = "damp",
        *,
        bins: str = "shared",
        bin_init: float = 1.0,
        overrelax: float = 1.0,
        balance: bool = True,
        schur: str = "cg",
    ) -> None:
        super().__init__()
        _check_options(lam, backward, singular, overrelax)
        if bins not in BIN_MODES:
            raise ValueError(f"bins must be one of {BIN_MODES}, got {bins!r}")
        if not math.isfinite(bin_init):
            raise ValueError(f"bin_init must be finite, got {bin_init}")
        self.lam, self.max_iter, self.tol, self.backward, self.singular = lam, max_iter, tol, backward, singular
        self.bins = bins
        self.overrelax = _check_overrelax(overrelax)
        self.balance = bool(balance)
        self.schur = _check_schur(schur)
        self.bin_cost = nn.Parameter(torch.full(() if bins == "shared" else (2,), float(bin_init)))
        self.last_info: SinkhornInfo | None = None

    def forward(self, M: torch.Tensor, mask_rows: torch.Tensor, mask_cols: torch.Tensor) -> torch.Tensor:
        """(B, m, n) costs and (B, m), (B, n) masks -> (B, m+1, n+1) plans, bins last."""
        P_aug, self.last_info = sinkhorn_with_bins(
            M,
            mask_rows,
            mask_cols,
            self.bin_cost,
            self.lam,
            self.max_iter,
            self.tol,
            self.backward,
            self.singular,
            overrelax=self.overrelax,
            balance=self.balance,
            schur=self.schur,
        )
        return P_aug

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins!r}, lam={self.lam}, max_iter={self.max_iter}, tol={self.tol}, "
            f"backward={self.backward!r}, singular={self.singular!r}"
            + (f", overrelax={self.overrelax}" if self.overrelax != 1.0 else "")
            + ("" if self.balance else ", balance=False")
        )
