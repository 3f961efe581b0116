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
from bpnp.so3 import skew, so3_exp


class PnPResult(NamedTuple):
    """Output of :class:`PnPRefine`: ``R`` (B,3,3), ``t`` (B,3) differentiable; ``status``,
    ``iterations`` (B,) int64 and ``objective`` (B,) float are diagnostics."""

    R: torch.Tensor
    t: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    objective: torch.Tensor


def _camera_points(R: torch.Tensor, t: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ R.transpose(1, 2) + t[:, None, :]


def _mean_depth(r: torch.Tensor) -> torch.Tensor:
    """(B,) mean distance of the camera points from their norms ``r`` (B, n, 1), never 0."""
    return r.squeeze(-1).mean(1).clamp_min(torch.finfo(r.dtype).eps)


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)
    return x / r, r


def pnp_objective(
    W: torch.Tensor, bearings: torch.Tensor, points: torch.Tensor, R: torch.Tensor, t: torch.Tensor, kernel: RobustKernel
) -> torch.Tensor:
    """``F = sum_ij W_ij rho(1 - b_i . N(R p_j + t))`` per item, (B,). O(mn) via one matmul.

    For ``rho`` = identity it is evaluated as ``sum W - sum_j a_j . u_j`` with ``a = W^T B``, whose
    derivative to ``W`` is the outer product ``-B u^T`` (one matmul, no (m, n) error matrix).

    Paired form (``W`` of shape (B, K), bearings and points (B, K, 3), one per pair):
    ``F = sum_k W_k rho(1 - b_k . N(R p_k + t))``, O(K) (the dense form with a diagonal ``W``).
    """
    u, _ = _unit(_camera_points(R, t, points))
    return _objective_at(W, bearings, u, kernel)


def _objective_at(W, bearings, u, kernel, linear=None):
    """:func:`pnp_objective` from the unit camera rays ``u`` (B, n or K, 3); ``linear`` as in
    :func:`_derivatives`."""
    if W.ndim == 2:
        return (W * kernel.rho(1 - (bearings * u).sum(-1))).sum(1)
    if linear is not None:
        return linear[2] - (linear[0] * u).sum((1, 2))
    if kernel.is_identity:
        return W.sum((1, 2)) - ((W.transpose(1, 2) @ bearings) * u).sum((1, 2))
    E = torch.baddbmm(torch.ones_like(W), bearings, u.transpose(1, 2), alpha=-1)
    return (W * kernel.rho(E)).sum((1, 2))


def _derivatives(W, bearings, x, kernel, linear=None):
    """Objective, gradient (B,6), exact Hessian (B,6,6) and Gauss-Newton Hessian (B,6,6) of F in
    the local chart xi = (omega, v) at xi = 0, for camera-frame points x (B,n,3).

    ``linear = (a (B,n,3), wsum (B,n), mass (B,))`` precomputed from ``W`` when ``rho`` is the
    identity: then this costs O(n), no (m, n) matrix is touched.

    Paired form: ``W`` (B, K) with bearings and camera points (B, K, 3), pair ``k`` joining
    ``b_k`` and ``x_k`` (see :func:`pnp_objective`): the dense formulas with a diagonal ``W``,
    O(K) (``a_k = W_k rho'_k b_k``, ``C_k = W_k rho''_k b_k b_k^T``).

    Per point the O(mn) part reduces to ``a_j = sum_i W_ij rho'_ij b_i``, ``wsum_j = sum_i W_ij
    rho'_ij`` and, for a robust kernel, ``C_j = sum_i W_ij rho''_ij b_i b_i^T``; the O(n) rest is
    :func:`_chart_derivatives`.
    """
    if W.ndim == 2:
        return _paired_derivatives(W, bearings, x, kernel)
    u, r = _unit(x)
    if linear is not None:
        a, wsum, _ = linear
        F = _objective_at(W, bearings, u, kernel, linear)
        second = []
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
        C = (bb.transpose(1, 2) @ (W * d2)).transpose(1, 2)  # (B, n, 9): C_j = sum_i W rho'' b_i b_i^T
        # proj C proj = sum_cd C_cd (proj e_c)(proj e_d)^T, and the chart maps proj e_c to
        # g_c = (x × e_c, e_c - u_c u): nine weighted rank-one terms, six by symmetry.
        zero = torch.zeros_like(x[..., 0])
        x0, x1, x2 = x.unbind(-1)
        cross_e = (torch.stack([zero, x2, -x1], -1), torch.stack([-x2, zero, x0], -1), torch.stack([x1, -x0, zero], -1))
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        G = [torch.cat([cross_e[c], eye[c] - u[..., c:c + 1] * u], -1) for c in range(3)]
        second = [(G[c], G[c], C[..., 4 * c]) for c in range(3)]
        second += [(G[c], G[d], 2 * C[..., 3 * c + d]) for c in range(3) for d in range(c + 1, 3)]  # symmetrised below
    g, H, Hgn = _chart_derivatives(x, u, r, a, wsum, second)
    return F, g, H, Hgn


def _paired_derivatives(W, bearings, x, kernel):
    r""":func:`_derivatives` of the paired form (``W`` (B, K), bearings and camera points (B, K, 3)),
    every O(K) sum in one matrix product.

    With ``c1 = W rho'``, ``c2 = W rho''``, ``beta = b . u``, ``s = x × b`` and ``q = b - beta u``
    per pair, the chart formulas of :func:`_chart_derivatives` (``a = c1 b``, the rank-one
    second-order term ``c2 g(q) g(q)^T``, ``g(q) = (s, q)``) reduce to weighted moments of
    ``z = (s, q, u)``:

    - gradient ``-(sum c1/r s, sum c1/r q)``;
    - exact Hessian: rotation block ``(sum c1 beta) I - sum c1 beta u u^T - 1/2 sum c1 (q u^T + u
      q^T) + sum c2/r^2 s s^T``; mixed ``sum c1/r^2 s u^T + [sum c1 beta/r u]_x + sum c2/r^2 s
      q^T``; translation ``sum c1/r^2 (q u^T + u q^T) - sum c1 beta/r^2 u u^T + (sum c1 beta/r^2)
      I + sum c2/r^2 q q^T``;
    - Gauss-Newton Hessian ``[[sum c1 (I - u u^T), [sum c1/r u]_x], [-[.]_x, sum c1/r^2 (I - u
      u^T)]]``.

    The general chart path (:func:`_paired_derivatives_rank_one`) forms ~60 (B, K, .)
    intermediates and seven matrix products per call; here about fifteen and one product ``Z R^T``
    (Z = ``(s, q, u, 1)`` channels first, R: 18 weighted columns of z and 7 weights), which
    is cheaper (``python bench/nodes.py --only pnp-lm`` times both).
    tests/nodes/test_pnp_pairs.py checks it against :func:`_paired_derivatives_rank_one`, the
    dense formulas and autograd.
    """
    # Channels first (B, C, K): concatenating along C copies whole rows; along a last dim of 3
    # (the (B, K, 3) layout) torch's CPU cat was 70 % of the time.
    xT, bT = x.transpose(1, 2).contiguous(), bearings.transpose(1, 2).contiguous()
    r = (xT * xT).sum(1).sqrt().clamp_min(torch.finfo(x.dtype).eps)  # (B, K); norm(dim=1) was ~20x slower
    inv_r = 1.0 / r
    u = xT * inv_r[:, None]
    beta = (bT * u).sum(1)
    rho, d1, d2 = kernel.all(1 - beta)
    c1, c2 = W * d1, W * d2
    q = bT - beta[:, None] * u
    s = torch.cross(xT, bT, dim=1)
    c1_r = c1 * inv_r  # c1 / r
    c1_r2 = c1_r * inv_r  # c1 / r^2
    c1b_r2 = c1_r2 * beta  # c1 beta / r^2
    c1b = c1 * beta
    Z = torch.cat([s, q, u, torch.ones_like(r)[:, None]], 1)  # (B, 10, K)
    # The weights go on the narrow side: 25 rows, and every sum is a column of Z R^T.
    R = torch.cat([
        u * c1_r2[:, None], u * c1b_r2[:, None], u * c1[:, None], u * c1b[:, None],  # columns 0-11: u, 4 weights
        Z[:, :6] * (c2 * inv_r * inv_r)[:, None],  # 12-17: c2/r^2 (s, q)
        torch.stack([c1_r, c1_r * beta, c1_r2, c1b_r2, c1, c1b, W * rho], 1),  # 18-24: the weights alone
    ], 1)
    M = Z @ R.transpose(1, 2)  # (B, 10, 25): rows s (0-2), q (3-5), u (6-8), 1 (9)
    S, Q, U, ONE = slice(0, 3), slice(3, 6), slice(6, 9), 9
    # <weight>_<a><b> = sum_k weight_k a_k b_k^T; sum_<weight>[_<a>] = sum_k weight_k (a_k).
    c1r2_su, c1r2_qu, c1r2_uu = M[:, S, 0:3], M[:, Q, 0:3], M[:, U, 0:3]
    c1br2_uu, c1_qu, c1_uu, c1b_uu = M[:, U, 3:6], M[:, Q, 6:9], M[:, U, 6:9], M[:, U, 9:12]
    c2r2_zz = M[:, 0:6, 12:18]  # over (s, q) x (s, q)
    sum_c1r_s, sum_c1r_q, sum_c1r_u, sum_c1br_u = M[:, S, 18], M[:, Q, 18], M[:, U, 18], M[:, U, 19]
    sum_c1r2, sum_c1br2, sum_c1, sum_c1b, F = M[:, ONE, 20], M[:, ONE, 21], M[:, ONE, 22], M[:, ONE, 23], M[:, ONE, 24]
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    X_rt = skew(sum_c1br_u)
    H_rr = sum_c1b[:, None, None] * eye - c1b_uu - 0.5 * (c1_qu + c1_qu.transpose(1, 2))
    H_rt = c1r2_su + X_rt
    S_tt = c1r2_qu + c1br2_uu  # sum c1/r^2 b u^T, with b = q + beta u
    H_tt = S_tt + S_tt.transpose(1, 2) - 3 * c1br2_uu + sum_c1br2[:, None, None] * eye
    H = torch.cat([torch.cat([H_rr, H_rt], 2), torch.cat([H_rt.transpose(1, 2), H_tt], 2)], 1) + c2r2_zz
    X_gn = skew(sum_c1r_u)
    Hgn = torch.cat([torch.cat([sum_c1[:, None, None] * eye - c1_uu, X_gn], 2),
                     torch.cat([-X_gn, sum_c1r2[:, None, None] * eye - c1r2_uu], 2)], 1)
    g = -torch.cat([sum_c1r_s, sum_c1r_q], -1)
    return F, g, 0.5 * (H + H.transpose(1, 2)), 0.5 * (Hgn + Hgn.transpose(1, 2))


def _paired_derivatives_rank_one(W, bearings, x, kernel):
    """The paired form through the general chart path (:func:`_chart_derivatives`, its rank-one
    second-order term ``C_k = W_k rho''_k b_k b_k^T``): the same result as
    :func:`_paired_derivatives` with several times its cost; kept as the tests' and
    bench/nodes.py's reference."""
    u, r = _unit(x)
    beta = (bearings * u).sum(-1)  # (B, K)
    rho, d1, d2 = kernel.all(1 - beta)
    F = (W * rho).sum(1)
    wsum = W * d1
    a = wsum[..., None] * bearings
    # proj C proj = W rho'' v v^T with v = b - beta u, and the chart maps v to g(v) = (x × b, v).
    v = bearings - beta[..., None] * u
    gv = torch.cat([torch.cross(x, bearings, dim=-1), v], -1)
    g, H, Hgn = _chart_derivatives(x, u, r, a, wsum, [(gv, gv, W * d2)])
    return F, g, H, Hgn


def _chart_derivatives(x, u, r, a, wsum, second):
    r"""Gradient (B,6), exact and Gauss-Newton Hessians (B,6,6) in the chart, from per-point sums.

    Args:
        x: (B, n, 3) camera points; ``u = x / r`` (B, n, 3), ``r`` (B, n, 1).
        a: (B, n, 3) ``a_j = sum_i W_ij rho'_ij b_i``; wsum: (B, n) ``sum_i W_ij rho'_ij``.
        second: the kernel's second-order term ``sum_j proj C_j proj / r_j^2`` in the chart, as
            ``(p, q, w)`` triples meaning ``sum_j w_j / r_j^2 p_j q_j^T`` with p, q (B, n, 6), w
            (B, n) (empty for ``rho`` = identity); the total must be symmetric after
            symmetrisation (a ``(p, q)`` term with ``p != q`` stands for half of ``p q^T + q p^T``).

    The Hessian of ``F`` in ``x_j`` is ``K_j = (a u^T + u a^T + alpha I - 3 alpha u u^T) / r^2 +
    proj C proj / r^2`` with ``alpha = a . u``. The chart's Jacobian ``J = [-[x]_x, I]`` maps a
    rank-one ``p q^T`` to ``g(p) g(q)^T`` with ``g(p) = (x × p, p)`` (so ``g(u) = (0, u)``), and
    ``J^T J = [[|x|^2 I - x x^T, [x]_x], [-[x]_x, I]]``: every sum over points is a (6, n) @ (n, 6)
    product, no per-point 3x3 matrix. The retraction's second order adds ``1/2 (g_x x^T + x
    g_x^T)`` to the rotation block (``g_x . x = 0``); the Gauss-Newton Hessian is ``sum wsum / r^2
    J^T (I - u u^T) J``.
    """
    inv = 1.0 / (r * r).squeeze(-1)  # (B, n)
    alpha = (a * u).sum(-1)
    gx = -(a - alpha[..., None] * u) / r  # dF/dx_j
    ga = torch.cat([torch.cross(x, a, dim=-1), a], -1)  # g(a), (B, n, 6)
    gu = torch.cat([torch.zeros_like(u), u], -1)  # g(u)

    def outer(p, w, q):  # sum_j w_j p_j q_j^T, (B, 6, 6)
        return (p * w[..., None]).transpose(1, 2) @ q

    def jtj(c):  # sum_j c_j J_j^T J_j, (B, 6, 6)
        xx = (x * c[..., None]).transpose(1, 2) @ x
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        out = torch.empty(*c.shape[:1], 6, 6, dtype=x.dtype, device=x.device)
        out[:, :3, :3] = xx.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] * eye - xx
        Xs = skew((c[..., None] * x).sum(1))
        out[:, :3, 3:] = Xs
        out[:, 3:, :3] = -Xs
        out[:, 3:, 3:] = c.sum(1)[:, None, None] * eye
        return out

    S = outer(ga, inv, gu)
    H = S + S.transpose(1, 2) - 3 * outer(gu, alpha * inv, gu) + jtj(alpha * inv)
    for p, q, w in second:
        H = H + outer(p, w * inv, q)
    Sx = gx.transpose(1, 2) @ x  # sum_j g_j x_j^T
    H[:, :3, :3] += 0.5 * (Sx + Sx.transpose(1, 2))
    Hgn = jtj(wsum * inv) - outer(gu, wsum * inv, gu)
    g = torch.cat([torch.cross(x, gx, dim=-1).sum(1), gx.sum(1)], dim=-1)
    H = 0.5 * (H + H.transpose(1, 2))
    Hgn = 0.5 * (Hgn + Hgn.transpose(1, 2))
    return g, H, Hgn


def _retract(R, t, delta):
    Rd = so3_exp(delta[:, :3])
    return Rd @ R, (Rd @ t.unsqueeze(-1)).squeeze(-1) + delta[:, 3:]


def _validate(W, bearings, points, R0, t0):
    for name, x in (("W", W), ("bearings", bearings), ("points", points), ("R0", R0), ("t0", t0)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if W.ndim not in (2, 3):
        raise ValueError(f"W must have shape (B, m, n) (dense) or (B, K) (pairs), got {tuple(W.shape)}")
    B, m, n = W.shape if W.ndim == 3 else (*W.shape, W.shape[1])
    expected = {"bearings": (B, m, 3), "points": (B, n, 3), "R0": (B, 3, 3), "t0": (B, 3)}
    for name, x in (("bearings", bearings), ("points", points), ("R0", R0), ("t0", t0)):
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for W of shape {tuple(W.shape)}, got {tuple(x.shape)}")
    dtypes = {x.dtype for x in (W, bearings, points, R0, t0)}
    devices = {x.device for x in (W, bearings, points, R0, t0)}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"inputs must share one dtype and device, got {sorted(map(str, dtypes))} / {sorted(map(str, devices))}")


def gather_pairs(W: torch.Tensor, bearings: torch.Tensor, points: torch.Tensor, k: int,
                 score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` entries of each row of ``W`` as pairs for :class:`PnPRefine`'s paired form.

    Args:
        W: (B, m, n) weights >= 0 (e.g. the plan ``P``; 0 on padding).
        bearings: (B, m, 3) unit bearings of the rows.
        points: (B, n, 3) 3D points of the columns.
        k: pairs kept per row, ``>= 1`` (capped at ``n``).
        score: (B, m, n) ranking of the entries (the ``k`` largest of each row are kept); None =
            ``W`` itself. Not differentiated.

    Returns:
        ``(Wk (B, m k), bearings_k (B, m k, 3), points_k (B, m k, 3))``: pair ``i k + r`` joins row
        ``i`` and one of its ``k`` best columns. The choice is piecewise constant and not
        differentiated; the gathers are, so the gradient of a loss of the paired solution
        reaches ``W`` at the kept entries exactly (0 elsewhere) and the bearings and points
        summed over their pairs. O(mn) once, for the top-k.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"gather_pairs: k must be an int >= 1, got {k!r}")
    B, m, n = W.shape
    if score is not None and score.shape != W.shape:
        raise ValueError(f"gather_pairs: score must have W's shape {tuple(W.shape)}, got {tuple(score.shape)}")
    k = min(k, n)
    idx = (W if score is None else score).detach().topk(k, dim=2, sorted=False).indices  # (B, m, k)
    Wk = W.gather(2, idx).reshape(B, m * k)
    bk = bearings[:, :, None, :].expand(B, m, k, 3).reshape(B, m * k, 3)
    pk = points.gather(1, idx.reshape(B, m * k, 1).expand(B, m * k, 3))
    return Wk, bk, pk


class PnPRefine(nn.Module):
    """Robust weighted angular pose refinement (see the module docstring for the maths).

    Args:
        robust: kernel name, one of ``none``, ``huber``, ``geman_mcclure``, ``tanh``.
        robust_scale: kernel scale in units of ``1 - cos(angle)`` (1e-3, about 2.6 degrees: the same
            default as the application's ``refine.robust_scale``, :class:`bpnp.models.settings.RefineSettings`).
        max_iter: LM iteration limit per item.
        xtol: stop when an accepted step, or the undamped Newton step at the current pose,
            ``|omega| + |v| / mean depth`` (radians) is below this; default ``1e-12`` in float64
            and ``1e-6`` in float32 (the Newton step is a scale-free distance to the optimum;
            float32 reaches ~1e-5 deg from the float64 optimum of the same inputs).
        gtol: also stop when ``|grad F| <= gtol * sum(W)``; default ``1e-12`` in float64 and
            ``1e-9`` in float32. This absolute test is not scale free (a distant scene has a
            gradient ``(extent/depth)^2`` times smaller at the same distance from the optimum),
            so its float32 default is below float32 rounding and the Newton-step test decides.
            ``gtol=1e-6`` gives the former float32 behaviour: up to ~2e-3 deg from the optimum
            on ordinary scenes (2e-2 deg on distant ones) instead of ~3e-5 deg, for about half
            an LM iteration fewer per item on average.
        damping: initial LM damping, relative to the Hessian diagonal.
        degenerate_rcond: an item whose Jacobi-scaled Gauss-Newton Hessian has an eigenvalue
            ratio below this (and never below ``4 eps`` of the working dtype, ~4.8e-7 in float32)
            is reported ``DEGENERATE`` (pose not determined by the weighted points, e.g.
            collinear, or not at working precision: in float32 a scene whose depth is more than
            ~200 times its extent).
        backward: ``"implicit"`` or ``"unrolled"`` (autograd through the LM iterations).
        singular: backward fallback for degenerate items, ``"damp"``, ``"min_norm"`` or ``"zero"``.
        degenerate_check_every: every this many iterations, items found degenerate stop iterating
            (0 = test only at the end); the final status is the same, the time is not.
        work_dtype: solve (forward and implicit backward) in this dtype and return ``R``, ``t`` in
            the inputs' dtype, e.g. ``torch.float64`` for a float32 network with a narrow robust
            kernel (float32 resolves ``1 - b . u`` to ~1e-7 only, so LM needs more iterations and
            stops farther from the optimum); the casts are differentiable. None (default): the
            inputs' dtype. float64 is not used on "mps" devices, which have none.

    Forward: ``(W (B,m,n) >= 0, bearings (B,m,3) unit, points (B,n,3), R0 (B,3,3), t0 (B,3),
    mask2d (B,m) bool = None, mask3d (B,n) bool = None) -> PnPResult``. Masked rows and columns of
    ``W`` are ignored. Items with non-finite inputs return their initial pose with status
    ``NONFINITE``. After a backward pass, :attr:`last_backward_status` has per-item codes.
    """

    def __init__(
        self,
        robust: str = "none",
        robust_scale: float = 1e-3,
        max_iter: int = 50,
        xtol: float | None = None,
        gtol: float | None = None,
        damping: float = 1e-6,
        degenerate_rcond: float = 1e-9,
        backward: str = "implicit",
        singular: str = "damp",
        degenerate_check_every: int = 5,
        work_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if work_dtype is not None and not (isinstance(work_dtype, torch.dtype) and work_dtype.is_floating_point):
            raise ValueError(f"work_dtype must be a floating torch.dtype or None, got {work_dtype!r}")
        if backward not in ("implicit", "unrolled"):
            raise ValueError(f"backward must be 'implicit' or 'unrolled', got {backward!r}")
        if singular not in SINGULAR_MODES:
            raise ValueError(f"singular must be one of {SINGULAR_MODES}, got {singular!r}")
        self.kernel = RobustKernel(robust, robust_scale)
        self.max_iter, self.xtol, self.gtol, self.damping = max_iter, xtol, gtol, damping
        self.degenerate_rcond, self.backward_mode, self.singular = degenerate_rcond, backward, singular
        self.degenerate_check_every = int(degenerate_check_every)
        self.work_dtype = work_dtype
        self.last_backward_status: torch.Tensor | None = None

    def extra_repr(self) -> str:
        wd = f", work_dtype={self.work_dtype}" if self.work_dtype is not None else ""
        return f"kernel={self.kernel}, max_iter={self.max_iter}, backward={self.backward_mode!r}{wd}"

    # --- forward solver ---------------------------------------------------------------------
    def solve(self, W, bearings, points, R0, t0, kernel: RobustKernel | None = None):
        """Batched LM; differentiable torch ops (used as is by ``backward="unrolled"``).
        ``kernel``: the robust kernel to use (default ``self.kernel``; a per-item one from
        :meth:`forward`'s ``scale_factor``)."""
        kernel = self.kernel if kernel is None else kernel
        B = W.shape[0]
        dtype = W.dtype
        f64 = dtype == torch.float64
        xtol = self.xtol if self.xtol is not None else (1e-12 if f64 else 1e-6)
        gtol = self.gtol if self.gtol is not None else (1e-12 if f64 else 1e-9)
        finite = (
            torch.isfinite(W).flatten(1).all(1)
            & torch.isfinite(bearings).flatten(1).all(1)
            & torch.isfinite(points).flatten(1).all(1)
            & torch.isfinite(R0).flatten(1).all(1)
            & torch.isfinite(t0).all(1)
        )
        zero3 = torch.zeros(B, 3, dtype=dtype, device=W.device)
        eye3 = torch.eye(3, dtype=dtype, device=W.device).expand(B, 3, 3)
        Wc = torch.where(finite.reshape((-1,) + (1,) * (W.ndim - 1)), W, torch.zeros_like(W))  # W (B,m,n) or (B,K)
        bc = torch.where(finite[:, None, None], bearings, torch.zeros_like(bearings))
        pc = torch.where(finite[:, None, None], points, torch.zeros_like(points))
        # Items with bad inputs keep their initial pose (if that is finite) and are not iterated.
        pose_ok = torch.isfinite(R0).flatten(1).all(1) & torch.isfinite(t0).all(1)
        R = torch.where(pose_ok[:, None, None], R0, eye3)
        t = torch.where(pose_ok[:, None], t0, zero3)
        mass = Wc.flatten(1).sum(1)

        mu = torch.full((B,), self.damping, dtype=dtype, device=W.device)
        active = finite & (mass > 0)
        iterations = torch.zeros(B, dtype=torch.long, device=W.device)
        eye6 = torch.eye(6, dtype=dtype, device=W.device)
        # rho = identity: a = W^T B once, then every iteration is O(n).
        linear = (Wc.transpose(1, 2) @ bc, Wc.sum(1), mass) if kernel.is_identity and W.ndim == 3 else None
        x0 = _camera_points(R, t, pc)
        F, g, H, Hgn = _derivatives(Wc, bc, x0, kernel, linear)
        depth = _mean_depth(x0.norm(dim=-1, keepdim=True))  # of the current pose, for the scale-free step size
        for it in range(1, self.max_iter + 1):
            if not bool(active.any()):
                break
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
            # Distance to the optimum, scale free: the undamped Newton step at the current pose
            # (where the exact Hessian is positive definite), in the units of xtol. Near the
            # optimum in float32 LM steps are often rejected (F and g are at rounding level), so
            # an accepted small step may never come; the Newton step still says we are there.
            # A gradient test |g| <= gtol sum(W) alone is not enough: a distant scene (small
            # angular extent) has a gradient (extent/depth)^2 times smaller at the same distance.
            L0, info0 = torch.linalg.cholesky_ex(H.detach())
            newton = torch.cholesky_solve(g.detach().unsqueeze(-1), L0).squeeze(-1)
            newton_step = newton[:, :3].norm(dim=1) + newton[:, 3:].norm(dim=1) / depth.detach()
            near = (info0 == 0) & torch.isfinite(newton_step) & (newton_step < xtol)
            # Converged at the current pose: stop before evaluating a candidate (its O(mn) cost
            # would only confirm it).
            active = active & ~near
            if not bool(active.any()):
                break
            delta = torch.where(active[:, None], delta, torch.zeros_like(delta))
            R_new, t_new = _retract(R, t, delta)
            # The objective first (a fraction of the derivatives' cost); the derivatives only where
            # the step can be accepted. Near the optimum F changes by less than its rounding error
            # (F ~ sum of m*n terms), so comparing F alone would stall at sqrt(eps) accuracy;
            # there a step is accepted when it reduces the gradient instead.
            F_try, depth_try = self._objective(Wc, bc, pc, R_new, t_new, linear, active, (F, depth), kernel)
            f_noise = 64 * torch.finfo(dtype).eps * (F.abs() + mass)
            flat = (F_try - F).abs() <= f_noise
            hopeful = active & ~bad & torch.isfinite(F_try) & ((F_try < F) | flat)
            F_new, g_new, H_new, Hgn_new = self._candidate(Wc, bc, pc, R_new, t_new, linear, hopeful, (F, g, H, Hgn), kernel)
            decrease = (F_try < F) | (flat & (g_new.norm(dim=1) < g.norm(dim=1)))
            accept = hopeful & decrease
            step = delta[:, :3].norm(dim=1) + delta[:, 3:].norm(dim=1) / depth
            depth = torch.where(accept, depth_try, depth)
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
            # At the precision floor: a (near-Newton) step from a pose within 10 xtol of the
            # optimum was rejected with F flat to rounding. Nothing measurable is left to gain,
            # and waiting for mu to grow to the stall limit would cost ~40 O(mn) iterations
            # (float32, robust kernels, distant scenes).
            floor = active & ~accept & flat.detach() & (info0 == 0) & (newton_step < 10 * xtol)
            active = active & ~(small_step | small_grad | stalled | floor)
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
        eps = torch.finfo(Hgn.dtype).eps
        # The 6x6 eigenproblem in float64 whatever the working dtype (negligible cost): then the
        # only rounding left is that of forming Hgn, which puts an exactly singular float32
        # Hessian (collinear points, 20 to 1000 of them) at a ratio of <= 0.5 eps, not ~1 eps.
        wide = torch.float64 if Hgn.device.type != "mps" else Hgn.dtype  # MPS has no float64
        H64 = Hgn.detach().to(wide)
        s = torch.diagonal(H64, dim1=1, dim2=2).clamp_min(torch.finfo(wide).tiny).rsqrt()
        ev = torch.linalg.eigvalsh(s[:, :, None] * H64 * s[:, None, :])
        # Never below 4 eps of the working dtype: a scaled condition number above 1/(4 eps)
        # leaves the weakest pose direction undetermined at working precision. In float32 that
        # is a scene of depth/extent >~ 200; a distant but well-posed scene below that is not
        # degenerate (it was at 100 eps: depth/extent >~ 30, and the early stop of
        # degenerate_check_every then left its pose, and gradient, 10-30 % wrong).
        rcond = max(float(self.degenerate_rcond), 4 * eps)
        return (ev[:, 0] <= rcond * ev[:, -1].clamp_min(torch.finfo(wide).tiny)) | (mass <= 0)

    def _objective(self, W, bearings, points, R, t, linear, active, current, kernel):
        """(B,) objective and mean depth at the candidate poses of the ``active`` items
        (``current = (F, depth)`` elsewhere)."""
        if not bool(active.any()):
            return current
        sub = None if bool(active.all()) else active.nonzero().squeeze(1)
        pick = (lambda x: x) if sub is None else (lambda x: x.index_select(0, sub))
        u, r = _unit(_camera_points(pick(R), pick(t), pick(points)))
        lin = None if linear is None else tuple(pick(x) for x in linear)
        kernel = kernel if sub is None else kernel.select(sub)
        new = (_objective_at(pick(W), pick(bearings), u, kernel, lin), _mean_depth(r))
        return new if sub is None else tuple(cur.index_copy(0, sub, val) for cur, val in zip(current, new))

    def _candidate(self, W, bearings, points, R, t, linear, active, current, kernel):
        """Derivatives at the candidate poses of the ``active`` items only (``current``
        elsewhere): the O(mn) work of converged items and of rejected steps is skipped instead of
        being computed and discarded."""
        if not bool(active.any()):
            return current
        if bool(active.all()):
            return _derivatives(W, bearings, _camera_points(R, t, points), kernel, linear)
        sub = active.nonzero().squeeze(1)
        lin = None if linear is None else tuple(x.index_select(0, sub) for x in linear)
        x = _camera_points(R.index_select(0, sub), t.index_select(0, sub), points.index_select(0, sub))
        new = _derivatives(W.index_select(0, sub), bearings.index_select(0, sub), x, kernel.select(sub), lin)
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
        scale_factor: torch.Tensor | None = None,
    ) -> PnPResult:
        """Dense: ``W`` (B, m, n), bearings (B, m, 3), points (B, n, 3), optional masks (see the
        class docstring); every iteration is O(mn) with a robust kernel.

        ``scale_factor``: an optional positive (B,) tensor; item ``b`` is then solved with the
        kernel scale ``robust_scale * scale_factor[b]`` (e.g. the application's gates relative to
        the keypoints' spread, :mod:`bpnp.geometry.angular_scale`). Not differentiated.

        Paired: ``W`` (B, K) >= 0, bearings (B, K, 3) and points (B, K, 3) gathered per pair
        (:func:`gather_pairs`), no masks (give padded pairs ``W = 0``); minimises
        ``sum_k W_k rho(1 - b_k . N(R p_k + t))`` in O(K) per iteration, with the same solver
        and the same exact implicit backward (to ``W`` and to the gathered bearings and points,
        which autograd carries back through the gather)."""
        _validate(W, bearings, points, R0, t0)
        kernel = self.kernel
        if scale_factor is not None:
            if not (isinstance(scale_factor, torch.Tensor) and tuple(scale_factor.shape) == (W.shape[0],)
                    and scale_factor.is_floating_point() and bool(torch.isfinite(scale_factor).all())
                    and bool((scale_factor > 0).all())):
                got = (f"{scale_factor.dtype} of shape {tuple(scale_factor.shape)}" if isinstance(scale_factor, torch.Tensor)
                       else type(scale_factor).__name__)
                raise ValueError(f"PnPRefine: scale_factor must be a finite positive float tensor of shape "
                                 f"{(W.shape[0],)}, got {got}")
            kernel = self.kernel.per_item(scale_factor.detach().to(W.device))
        if W.ndim == 2:
            if mask2d is not None or mask3d is not None:
                raise ValueError("PnPRefine: masks are for a dense W (B, m, n); in the paired form (W of shape "
                                 "(B, K)) give padded pairs W = 0 instead")
        B, m, n = W.shape if W.ndim == 3 else (*W.shape, W.shape[1])
        for name, mask, size in (("mask2d", mask2d, m), ("mask3d", mask3d, n)):
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                     or tuple(mask.shape) != (B, size) or mask.device != W.device):
                got = f"{mask.dtype} of shape {tuple(mask.shape)} on {mask.device}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{name} must be a bool tensor of shape {(B, size)} on {W.device}, got {got}")
        if mask2d is not None:
            W = W * mask2d[:, :, None].to(W.dtype)
        if mask3d is not None:
            W = W * mask3d[:, None, :].to(W.dtype)
        out_dtype, work = W.dtype, self.work_dtype
        if work is None or (work == torch.float64 and W.device.type == "mps"):  # mps has no float64
            work = out_dtype
        if work != out_dtype:  # differentiable casts: the gradient reaches the inputs in their dtype
            W, bearings, points, R0, t0 = (x.to(work) for x in (W, bearings, points, R0, t0))
        if self.backward_mode == "unrolled":
            res = PnPResult(*self.solve(W, bearings, points, R0, t0, kernel))
        else:
            res = PnPResult(*_PnPFunction.apply(self, kernel, W, bearings, points, R0.detach(), t0.detach()))
        if work != out_dtype:
            res = res._replace(R=res.R.to(out_dtype), t=res.t.to(out_dtype), objective=res.objective.to(out_dtype))
        return res


class _PnPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, node: PnPRefine, kernel: RobustKernel, W, bearings, points, R0, t0):
        with torch.no_grad():
            R, t, status, iterations, F = node.solve(W, bearings, points, R0, t0, kernel)
        ctx.node, ctx.kernel = node, kernel
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
        kernel = ctx.kernel
        needs = ctx.needs_input_grad[2:5]
        xs = [x.detach().requires_grad_(bool(n)) for x, n in zip((W, bearings, points), needs)]

        def local_objective(W_, b_, p_, xi_):
            R_, t_ = _retract(R, t, xi_)
            return pnp_objective(W_, b_, p_, R_, t_, kernel)

        # A degenerate forward item has no unique pose, so it always takes the selected fallback.
        degenerate = status == int(Status.DEGENERATE)
        # The forward's analytic Hessian (exact, O(mn) once) replaces a torch.func Hessian of the
        # O(mn) objective in six directions.
        linear = (W.transpose(1, 2) @ bearings, W.sum(1), W.sum((1, 2))) if kernel.is_identity and W.ndim == 3 else None
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
        return (None, None, *grads, None, None)
