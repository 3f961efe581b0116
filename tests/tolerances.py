"""Float tolerances of the test suite, derived from the dtype's eps and the problem's conditioning.

A bound on a float32 (or lower-precision) result is never a number seen once on one machine: it is
``eps`` (``torch.finfo(dtype).eps``, 1.19e-7 in float32, 2.2e-16 in float64) times what amplifies
rounding in that problem (a condition number, a Hessian's smallest eigenvalue, the number of terms
summed), plus the solver's own stopping tolerance where it has one, times a small stated safety
factor. The same formula with float64's eps gives the float64 bound, so a test parametrised over
dtypes uses one expression.

Convention: ``eps`` is the spacing at 1, i.e. twice the unit roundoff ``u`` of Higham's "Accuracy
and Stability of Numerical Algorithms"; every ``k u`` bound of the book is written ``k eps``
here, a factor 2 of safety already included.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (the spacing of the numbers at 1)."""
    return float(torch.finfo(dtype).eps)


def gamma(k: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_k = k eps / (1 - k eps)``: the worst-case relative error of a ``k``-term sum
    or dot product, relative to the sum of the terms' magnitudes (any summation order, so it holds
    for every thread count and blocking)."""
    e = k * eps(dtype)
    return e / (1.0 - e)


# --------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------
def so3_exp_entry_error(theta: float, dtype: torch.dtype) -> float:
    """Bound on the entry errors of ``so3_exp(omega)`` (Rodrigues, bpnp/so3.py) at angle
    ``theta = |omega|``: ``theta`` itself carries ~2 eps relative (squares, sum, sqrt), so
    ``sin theta`` and ``1 - cos theta`` carry ``2 eps theta`` absolute (+1 eps each); with the
    divisions by ``theta`` and ``theta^2``, the products with ``K`` (entries <= theta) and
    ``K @ K`` (<= theta^2, a 3-term dot product) and the two additions to ``I``, an entry is off
    by at most ``eps (4 theta + 29)``."""
    return eps(dtype) * (4.0 * theta + 29.0)


def orthonormality_bounds(entry_error: float, dtype: torch.dtype) -> tuple[float, float]:
    """``(max |R R^T - I|, |det R - 1|)`` for a rotation whose entries are off by ``entry_error``:
    ``(R + dR)(R + dR)^T - I = dR R^T + R dR^T`` (each entry <= ``sqrt 3`` max|dR| with unit rows)
    plus the 3-term dot products' ``gamma_3``; ``det(R + dR) - 1 = tr(R^T dR)`` to first order (<=
    ``3 sqrt 3`` max|dR|) plus the LU determinant's own rounding (backward stable, about 18 eps
    for a 3x3 with condition number 1)."""
    e = eps(dtype)
    return 2 * math.sqrt(3.0) * entry_error + gamma(3, dtype), 3 * math.sqrt(3.0) * entry_error + 18 * e


def svd_orthogonality(n: int, dtype: torch.dtype) -> float:
    """Bound on ``max |U^T U - I|`` of the orthogonal factors of a backward-stable SVD of an
    ``n x n`` matrix (LAPACK: O(n^2) Householder/Givens rotations, each within ``gamma_n`` of
    orthogonal), whatever the matrix' rank or scale: ``gamma_(10 n^2)``."""
    return gamma(10 * n * n, dtype)


# --------------------------------------------------------------------------------------------
# PnPRefine (bpnp/nodes/pnp.py)
# --------------------------------------------------------------------------------------------
#: PnPRefine.solve's stopping tolerances when ``xtol`` / ``gtol`` are None: (xtol, gtol) per dtype.
PNP_DEFAULT_TOL = {torch.float32: (1e-6, 1e-9), torch.float64: (1e-12, 1e-12)}


def pnp_scaled_hessian(W, bearings, points, R, t, kernel=None):
    """The Hessian of the PnP objective at the pose ``(R, t)`` in the depth-scaled chart
    ``xi' = (omega, v / depth)`` (radians in all six directions), in float64: (B, 6, 6), with the
    mean depth (B,) of the camera points and the mass ``sum W`` (B,).

    The node's own analytic Hessian (``_derivatives``, checked against autograd in
    ``tests/nodes/pnp_problems.py``) in the chart ``xi = (omega, v)``, scaled by ``D = diag(1, 1, 1,
    d, d, d)``: ``H' = D H D``. In this chart the gradient's rounding error is of the same size in
    all six components (the v part of ``g`` carries ``1 / depth``, see :func:`pnp_rotation_bound`).
    """
    from bpnp.nodes.pnp import _camera_points, _derivatives
    from bpnp.nodes.robust import RobustKernel

    kernel = RobustKernel("none", 1e-3) if kernel is None else kernel
    W, bearings, points, R, t = (x.detach().to(F64) for x in (W, bearings, points, R, t))
    x = _camera_points(R, t, points)
    _, _, H, _ = _derivatives(W, bearings, x, kernel)
    depth = x.norm(dim=-1).mean(1)
    d = torch.cat([torch.ones_like(depth)[:, None].expand(-1, 3), depth[:, None].expand(-1, 3)], 1)
    return d[:, :, None] * H * d[:, None, :], depth, W.flatten(1).sum(1)


def pnp_rotation_bound(W, bearings, points, R, t, dtype, xtol=None, gtol=None, kernel=None, safety=2.0):
    """(B,) bound in radians on the rotation error of PnPRefine in ``dtype`` against the exact
    optimum ``(R, t)`` of the same inputs, from the solver's stopping tests and rounding.

    PnPRefine.solve stops an item when (a) the undamped Newton step ``|omega| + |v| / depth`` is
    below ``xtol``, (b) a step was rejected with F flat to rounding and that Newton step is below
    ``10 xtol`` (the precision floor), (c) an accepted step is below ``xtol``, or (d)
    ``|grad F| <= gtol sum(W)``. The Newton step is the distance to the optimum to first order, so
    (a)-(c) leave at most ``10 xtol``; (d) leaves ``|g'| / lambda_min(H')`` with ``|g'| <=
    max(1, depth) |g|`` in the scaled chart of :func:`pnp_scaled_hessian`.

    Rounding: the gradient ``g = sum_j J_j^T (a_j - (a_j . u_j) u_j) / r_j`` is evaluated in
    ``dtype``; each point's tangential term is formed (from ``x = R p + t``, ``|x|``, ``u = x / |x|``)
    with about 4 roundings of relative size eps of ``|a_j| <= sum_i W_ij``; over n independent
    points they add up like ``sqrt(n)``: ``4 eps sum(W) / sqrt(n)``, at most ``eps sum(W)`` in the
    scaled chart for n >= 16 (1.15 times that for the 12 points of the smallest case here, inside
    the safety factor).
    The computed optimum is where the computed gradient vanishes: ``eps sum(W) / lambda_min(H')``
    from the exact one. ``safety`` (2) covers the second-order terms of (a)-(c) and the
    orthonormality drift of a float32 ``R``.

    ``R, t``: the optimum (e.g. from a float64 solve of the same inputs to xtol = 1e-15).
    """
    d_xtol, d_gtol = PNP_DEFAULT_TOL[dtype]
    xtol = d_xtol if xtol is None else xtol
    gtol = d_gtol if gtol is None else gtol
    H, depth, mass = pnp_scaled_hessian(W, bearings, points, R, t, kernel)
    lam_min = torch.linalg.eigvalsh(H)[:, 0]
    grad = (depth.clamp_min(1.0) * gtol + eps(dtype)) * mass
    return safety * (10.0 * xtol + grad / lam_min)


def pnp_input_rounding_bound(W, bearings, points, R, t, dtype):
    """(B,) radians: how far rounding the inputs once to ``dtype`` (bearings within ``eps / 2``,
    points within ``eps / 2`` of ``|p|``, i.e. a bearing error ``eps / 2 |p| / r`` at depth ``r``)
    moves the optimum ``(R, t)`` of exact data: each pair's gradient term moves by its weight times
    that, so ``|dg'| <= eps / 2 (1 + max |p| / r) sum(W)`` in the scaled chart, through
    ``lambda_min(H')`` (:func:`pnp_scaled_hessian`)."""
    H, _, mass = pnp_scaled_hessian(W, bearings, points, R, t)
    p, R, t = (x.detach().to(F64) for x in (points, R, t))
    ratio = (p.norm(dim=-1) / (p @ R.transpose(1, 2) + t[:, None]).norm(dim=-1)).amax(1)
    return 0.5 * eps(dtype) * (1 + ratio) * mass / torch.linalg.eigvalsh(H)[:, 0]


# --------------------------------------------------------------------------------------------
# Sinkhorn (bpnp/nodes/sinkhorn.py)
# --------------------------------------------------------------------------------------------
def sinkhorn_kappa(P, r, c):
    """(B,) condition number ``1 / (1 - sigma_2)`` of the plan's marginal map, in float64.

    At the solution, a relative perturbation ``delta`` of the plan's entries is undone by
    potentials ``(da, db)`` with ``[[diag r, P], [P^T, diag c]] (da, db) = marginals of P * delta``:
    with ``N = diag(r)^-1/2 P diag(c)^-1/2`` the scaled system is ``[[I, N], [N^T, I]]``, whose
    eigenvalues are ``1 +- sigma_k(N)``; ``sigma_1 = 1`` is the gauge ``(a + s, b - s)``, which does
    not change P, so the potentials are at most ``1 / (1 - sigma_2)`` times the perturbation (the
    same system the implicit backward solves). Padded rows and columns (0 marginals) are left out.
    """
    out = []
    for Pb, rb, cb in zip(P.detach().to(F64), r.detach().to(F64), c.detach().to(F64)):
        rows, cols = rb > 0, cb > 0
        if not (bool(rows.any()) and bool(cols.any())):
            out.append(1.0)  # an empty item: nothing to transport
            continue
        Pr = Pb[rows][:, cols]
        rs, cs = Pr.sum(1), Pr.sum(0)  # the plan's own marginals (== r, c up to the tolerance)
        s = torch.linalg.svdvals(Pr / rs.sqrt()[:, None] / cs.sqrt()[None, :])
        out.append(1.0 / (1.0 - float(s[1])) if s.numel() > 1 else 1.0)
    return torch.tensor(out, dtype=F64)


def sinkhorn_entry_rounding(M, lam, r, c, dtype):
    """(B,) relative rounding of a Sinkhorn plan's entries ``P = u K v``, ``K = exp(-lam (M - row
    min) + alpha + beta)``: the exponent has magnitude at most ``E = lam * spread(M)`` (real
    entries) and each potential (absorbed ones in the implicit mode, all of them in the unrolled
    log-domain mode) at most ``E + log(1 / min marginal)``, so the exponent rounds to
    ``eps (3 E + 2 log(1 / min marginal))``, plus about 4 roundings (scaling, exp, two products)."""
    out = []
    for Mb, rb, cb in zip(M.detach().to(F64), r.detach().to(F64), c.detach().to(F64)):
        rows, cols = rb > 0, cb > 0
        if not (bool(rows.any()) and bool(cols.any())):
            out.append(0.0)
            continue
        Mr = Mb[rows][:, cols]
        E = lam * float((Mr - Mr.amin(1, keepdim=True)).max())
        smallest = min(float(rb[rows].min()), float(cb[cols].min())) / float(rb.sum())
        out.append(eps(dtype) * (3 * E + 2 * math.log(1.0 / smallest) + 4))
    return torch.tensor(out, dtype=F64)


def sinkhorn_plan_bound(P, M, lam, r, c, dtype, P_ref=None, safety=2.0):
    """(B,) a-posteriori bound on ``sum |P - P*| / mass`` for a Sinkhorn plan ``P`` computed in
    ``dtype``, ``P*`` the exact plan of the same inputs ``M``, ``r``, ``c`` (float64 values).

    Write ``P = P* (1 + x)``. The marginal map splits ``x`` in two parts, orthogonal in the
    P-weighted inner product ``<x, y> = sum P x y`` (its normal equations are the marginal
    constraints):

    - the part the marginals do not see, at most the entries' own rounding ``e_entry``
      (:func:`sinkhorn_entry_rounding`);
    - potentials ``(da, db)`` that produce the plan's residual marginals ``rho`` (measured here in
      float64 from ``P`` itself and the exact ``r``, ``c``): their P-weighted norm is at most
      ``sqrt(kappa) |rho'|``, ``rho' = (rho_r / sqrt r, rho_c / sqrt c)``, ``kappa`` of
      :func:`sinkhorn_kappa` (the eigenvalues of the scaled system are ``1 +- sigma_k``).

    Cauchy-Schwarz, ``sum P |x| <= sqrt(mass) |x|_P``, turns this into
    ``e_entry + sqrt(kappa / mass) |rho'|``; ``safety`` (2) covers the first-order analysis.
    ``P_ref`` (the exact plan, for ``kappa``; default ``P``, whose kappa is the same to first order).
    """
    Pd, rd, cd = (x.detach().to(F64) for x in (P, r, c))
    kappa = sinkhorn_kappa(Pd if P_ref is None else P_ref, rd, cd)
    e_entry = sinkhorn_entry_rounding(M, lam, rd, cd, dtype)
    out = []
    for k, (Pb, rb, cb) in enumerate(zip(Pd, rd, cd)):
        rows, cols = rb > 0, cb > 0
        if not (bool(rows.any()) and bool(cols.any())):
            out.append(0.0)  # an empty item: an exactly zero plan
            continue
        mass = float(rb.sum())
        rho_r, rho_c = (Pb.sum(1) - rb)[rows], (Pb.sum(0) - cb)[cols]
        q = math.sqrt(float((rho_r ** 2 / rb[rows]).sum() + (rho_c ** 2 / cb[cols]).sum()))
        out.append(safety * (float(e_entry[k]) + math.sqrt(float(kappa[k]) / mass) * q))
    return torch.tensor(out, dtype=F64)


def plan_gap(P, Q):
    """(B,) ``sum |P - Q| / sum Q`` in float64."""
    P, Q = P.detach().to(F64), Q.detach().to(F64)
    return (P - Q).abs().sum((1, 2)) / Q.sum((1, 2))


def marginal_rounding(m, n, dtype):
    """Rounding of a plan's measured L1 marginal error (relative to the mass): each of the row sums
    of ``n`` terms (column sums of ``m``) is off by ``gamma_k`` of its value, the subtraction of the
    marginal and the division by the mass add one rounding each; summed over the rows that is
    ``gamma_(k+2)`` of the mass, whatever the summation order (threads)."""
    return gamma(max(m, n) + 2, dtype)


# --------------------------------------------------------------------------------------------
# Least squares (bpnp/nodes/least_squares.py)
# --------------------------------------------------------------------------------------------
def _scaled_lstsq(A, b):
    """float64: the solution ``y`` of the column-scaled problem ``(A C) y = b`` (C = inverse column
    norms, as the node scales), its residual norm, ``kappa(A C)``, ``sigma_max(A C)`` and the
    spread ``max C / min C`` (what the error in ``y`` can become in ``x = C y``)."""
    A, b = A.detach().to(F64), b.detach().to(F64)
    C = 1.0 / A.norm(dim=1)  # (B, n)
    AC = A * C[:, None, :]
    y = torch.linalg.lstsq(AC, b.unsqueeze(-1)).solution.squeeze(-1)
    res = (b - (AC @ y.unsqueeze(-1)).squeeze(-1)).norm(dim=1)
    s = torch.linalg.svdvals(AC)
    return y, res, s[:, 0] / s[:, -1], s[:, 0], C.amax(1) / C.amin(1)


def lstsq_error_bound(A, b, dtype, componentwise=False, safety=2.0):
    """Bound on the forward error of the node's column-scaled QR least-squares solve in ``dtype``
    against the exact solution of the same inputs: (B,) normwise ``|dx| / |x|``, or (B, n) per
    unknown ``|dx_i| / |x_i|`` (``componentwise``).

    Householder QR is column-wise backward stable: the computed solution solves a problem with
    each column of ``A C`` and ``b`` perturbed by ``gamma_m`` relative (m-term reflections;
    Higham, Thm. 20.3). The least-squares perturbation bound (Wedin; Higham, Thm. 20.1) turns
    that into ``gamma_m (2 kappa + kappa^2 |r| / (|A C| |y|))`` relative in the scaled unknowns
    ``y = x / C``, ``kappa = kappa(A C)`` (the node factorises the scaled matrix, so units do not
    enter). In ``x`` that is multiplied by the spread ``max C / min C`` of the scales (normwise)
    or by ``|y| / |y_i|`` (componentwise: an unknown can carry the whole normwise error).
    ``safety`` (2) for the first-order analysis.
    """
    m = A.shape[1]
    y, res, kappa, smax, spread = _scaled_lstsq(A, b)
    ynorm = y.norm(dim=1)
    rel = safety * gamma(m, dtype) * (2 * kappa + kappa ** 2 * res / (smax * ynorm))
    if componentwise:
        return rel[:, None] * ynorm[:, None] / y.abs()
    return rel * spread


def cgls_error_bound(A, b, dtype, tol=None, safety=2.0):
    """(B,) bound on ``|dx| / |x|`` of the node's CGLS solve (``solver="cg"``) in ``dtype``.

    CGLS stops when the scaled normal residual ``|C A^T (b - A x)|`` is at most ``tol`` times its
    value at ``x = 0``, ``|C A^T b| = |(A C)^T (A C) y*| <= sigma_max^2 |y*|``: the error in ``y``
    is then at most ``kappa(A C)^2 tol`` relative. ``tol``: default_cg_tol (10 eps in float32).
    Rounding: CGLS updates the residual instead of forming the normal equations, so it sees
    ``kappa``, not its square, as QR does (:func:`lstsq_error_bound`, added). In ``x = C y``
    times the spread ``max C / min C``.
    """
    from bpnp.nodes.linalg import default_cg_tol

    tol = default_cg_tol(dtype) if tol is None else tol
    _, _, kappa, _, spread = _scaled_lstsq(A, b)
    return safety * kappa ** 2 * tol * spread + lstsq_error_bound(A, b, dtype, safety=safety)


# --------------------------------------------------------------------------------------------
# Normalisation layers (bpnp/models/context_norm.py)
# --------------------------------------------------------------------------------------------
def normalise_bound(x, dtype, n_terms=None):
    """(B, C) bound on ``|y_hat - y|`` (max over the points) of ``y = (x - mean) / sqrt(var)``
    over the last dim (two-pass, as masked_mean_var), evaluated in ``dtype`` with sums of
    ``n_terms`` terms (default ``x.shape[-1]``; padded zeros count), from float64 statistics of x.

    The mean is off by ``gamma_(n+1) mean|x|``; the variance by ``gamma_(n+3)`` relative (the
    mean's error enters it only to second order, as ``sum (x - mean) = 0``); the reciprocal square
    root halves that and adds a rounding; the subtraction and the product two more. So
    ``|dy| <= gamma_(n+1) mean|x| / sigma + max|y| (gamma_(n+3) / 2 + 3 eps)``.
    """
    x = x.detach().to(F64)
    n = x.shape[-1] if n_terms is None else n_terms
    mean, sigma = x.mean(-1), x.std(-1, unbiased=False)
    ymax = ((x - mean[..., None]).abs().amax(-1)) / sigma
    return gamma(n + 1, dtype) * x.abs().mean(-1) / sigma + ymax * (gamma(n + 3, dtype) / 2 + 3 * eps(dtype))
