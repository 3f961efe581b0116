"""The float32 bounds of the node tests are not tuned to one rounding: inputs perturbed at eps
level (``x (1 + k eps u)``, ``u`` uniform in [-1, 1], a few draws; a different rounding of every
operation downstream, as another CPU, thread count or summation order gives) keep the float32
results within the same derived bounds (tests/tolerances.py) against the float64 solution of the
same perturbed inputs.
"""

import pytest
import torch

from bpnp.nodes import PnPRefine, Status, sinkhorn, sinkhorn_with_bins, uniform_marginals
from bpnp.nodes.sinkhorn import _augmented_cost, bin_marginals
from bpnp.so3 import geodesic_angle
from tests.nodes.pnp_problems import float32_default_cases
from tests.tolerances import eps, marginal_rounding, plan_gap, pnp_rotation_bound, sinkhorn_plan_bound

F32, F64 = torch.float32, torch.float64
DRAWS = 4  # perturbed copies of each input, solved as one batch (items are independent)
K = 4  # perturbation size in eps (a few roundings' worth)


def _jitter(x, draws, seed):
    """(draws, *x.shape[1:]) float32 copies of a one-item float32 tensor, each entry times
    ``1 + K eps u``; the first copy is the input itself."""
    g = torch.Generator().manual_seed(seed)
    u = 2 * torch.rand((draws, *x.shape[1:]), generator=g, dtype=F64) - 1
    u[0] = 0
    return (x.double() * (1 + K * eps(F32) * u)).float()


@pytest.mark.parametrize("case", range(7))
def test_pnp_float32_defaults_within_the_bound_under_eps_perturbations(case):
    """test_edge_cases.test_pnp_float32_defaults_reach_the_optimum's cases, every input (W,
    bearings, points and the start) perturbed: each solution within pnp_rotation_bound of the
    float64 optimum of its own inputs."""
    W, b, p, R0, t0 = (_jitter(x, DRAWS, 100 * case + k) for k, x in enumerate(float32_default_cases()[case]))
    out = PnPRefine()(W, b, p, R0, t0)
    assert (out.status == Status.OK).all()
    ref = PnPRefine(max_iter=300, xtol=1e-15, gtol=1e-16)(*(x.double() for x in (W, b, p, R0, t0)))
    err = geodesic_angle(out.R.double(), ref.R)
    bound = pnp_rotation_bound(W, b, p, ref.R, ref.t, F32)
    assert (err <= bound).all(), (err, bound)


def _check_plan(P, info, M, lam, r, c, tol, ref):
    """Status OK, the reported error within tol plus its rounding, and the plan within its
    a-posteriori bound of the exact plan ``ref`` (float64, tol 1e-13) of the same inputs."""
    m, n = P.shape[1:]
    assert (info.status == Status.OK).all(), info.status
    assert (info.marginal_error <= max(tol, 10 * eps(F32)) + 2 * marginal_rounding(m, n, F32)).all()
    bound = sinkhorn_plan_bound(P, M, lam, r, c, F32, P_ref=ref)
    assert (plan_gap(P, ref) <= bound).all(), (plan_gap(P, ref), bound)


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
@pytest.mark.parametrize("offset,lam,tol", [(1000.0, 10.0, 1e-7), (0.0, 100.0, 1e-4)])
def test_sinkhorn_float32_within_the_bound_under_eps_perturbations(offset, lam, tol, backward):
    """Plain Sinkhorn in float32: the large cost offset (test_edge_cases) and the large lam
    (test_sinkhorn) cases, the cost perturbed at eps level."""
    g = torch.Generator().manual_seed(1)
    m, n = (8, 10) if offset else (30, 40)
    M0 = (2 * torch.rand(1, m, n, generator=g, dtype=F64) + offset).float()
    M = _jitter(M0, DRAWS, 7)
    # exact marginals for the reference and the bound: the float32 ones' rounding (1/10 is not a
    # float32 number) is part of what the float32 plan's residual measures
    r, c = uniform_marginals(torch.ones(DRAWS, m, dtype=torch.bool), torch.ones(DRAWS, n, dtype=torch.bool), dtype=F64)
    P, info = sinkhorn(M, r.float(), c.float(), lam=lam, max_iter=5000, tol=tol, backward=backward)
    ref, ref_info = sinkhorn(M.double() - offset, r, c, lam=lam, max_iter=20000, tol=1e-13)
    assert (ref_info.status == Status.OK).all()
    _check_plan(P, info, M.double() - offset, lam, r, c, tol, ref)


@pytest.mark.parametrize("overrelax,backward", [(1.0, "implicit"), (1.5, "implicit"), (1.0, "unrolled")])
def test_sinkhorn_with_bins_float32_within_the_bound_under_eps_perturbations(overrelax, backward):
    """Sinkhorn with bins in float32 (a padded row and column), cost and bin cost perturbed; the
    over-relaxed forward (implicit mode only) too."""
    g = torch.Generator().manual_seed(2)
    m, n, lam, tol = 20, 15, 10.0, 1e-6
    M = _jitter((2 * torch.rand(1, m, n, generator=g, dtype=F64)).float(), DRAWS, 8)
    bin_cost = _jitter(torch.tensor([[0.9, 1.1]]), DRAWS, 9)  # (DRAWS, 2): per item [row, column] bin costs
    rows, cols = torch.ones(DRAWS, m, dtype=torch.bool), torch.ones(DRAWS, n, dtype=torch.bool)
    rows[:, 3], cols[:, -1] = False, False
    P, info, Ma = [], [], []
    for k in range(DRAWS):  # the bin cost is one per call
        Pk, ik = sinkhorn_with_bins(M[k:k + 1], rows[k:k + 1], cols[k:k + 1], bin_cost[k], lam=lam, max_iter=5000,
                                    tol=tol, backward=backward, overrelax=overrelax)
        P.append(Pk)
        info.append(ik)
        Ma.append(_augmented_cost(M[k:k + 1].double(), bin_cost[k].double()))
    P, Ma = torch.cat(P), torch.cat(Ma)
    status = torch.cat([i.status for i in info])
    err = torch.cat([i.marginal_error for i in info])
    r, c = bin_marginals(rows, cols, F64)
    ref, ref_info = sinkhorn(Ma, r, c, lam=lam, max_iter=20000, tol=1e-13)
    assert (ref_info.status == Status.OK).all() and (status == Status.OK).all(), status
    assert (err <= tol + 2 * marginal_rounding(m + 1, n + 1, F32)).all()
    bound = sinkhorn_plan_bound(P, Ma, lam, r, c, F32, P_ref=ref)
    assert (plan_gap(P, ref) <= bound).all(), (plan_gap(P, ref), bound)
    assert (P[:, 3] == 0).all() and (P[:, :, n - 1] == 0).all()
