"""The matrix-free least-squares solver (``solver="cg"``) and the CGLS it is built on."""

import pytest
import torch

from bpnp.nodes import Status, least_squares
from bpnp.nodes.least_squares import LeastSquares
from bpnp.nodes.linalg import cgls
from tests.tolerances import cgls_error_bound


def _problem(seed, B=3, m=30, n=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, m, n, generator=g, dtype=dtype)
    b = torch.randn(B, m, generator=g, dtype=dtype)
    w = torch.rand(B, m, generator=g, dtype=dtype) + 0.1
    ridge = torch.tensor([0.0, 0.3, 2.0], dtype=dtype)[:B]
    return A, b, w, ridge


@pytest.mark.parametrize("weighted,ridged", [(False, False), (True, False), (False, True), (True, True)])
def test_cg_equals_qr_solution_and_gradients(weighted, ridged):
    A, b, w, ridge = _problem(0)
    kw = dict(weights=w if weighted else None, ridge=ridge if ridged else 0.0)
    v = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    for solver in ("qr", "cg"):
        Ag, bg = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
        x, status = least_squares(Ag, bg, solver=solver, **kw)
        assert status.tolist() == [int(Status.OK)] * 3
        out[solver] = (x, *torch.autograd.grad((x * v).sum(), (Ag, bg)))
    for a, c in zip(out["qr"], out["cg"]):
        torch.testing.assert_close(c, a, rtol=1e-8, atol=1e-10)


def test_cg_gradcheck_every_input():
    A, b, w, ridge = _problem(2, m=12, n=4)
    ridge = ridge + 0.1  # finite differences need both sides of the ridge feasible
    args = tuple(t.clone().requires_grad_(True) for t in (A, b, w, ridge))
    assert torch.autograd.gradcheck(lambda A_, b_, w_, r_: least_squares(A_, b_, weights=w_, ridge=r_, solver="cg")[0], args)


def test_cg_keeps_no_n_by_n_factor():
    """What autograd keeps for the backward: the inputs and two n-vectors, no (n, n) factor."""
    A, b, _, _ = _problem(3, B=1, m=64, n=32)
    A.requires_grad_(True)
    shapes = {}
    for solver in ("qr", "cg"):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            least_squares(A, b, solver=solver)
        shapes[solver] = kept
    assert (1, 32, 32) in shapes["qr"]  # R
    assert sorted(shapes["cg"]) == sorted([(1, 64, 32), (1, 64), (1,), (1, 32), (1, 32)])


def test_cg_float32_and_iteration_limit():
    A, b, _, _ = _problem(4, dtype=torch.float32)
    x, status = least_squares(A, b, solver="cg")
    ref = torch.linalg.lstsq(A.double(), b.double().unsqueeze(-1)).solution.squeeze(-1)
    # CGLS's stopping test (default tol, 10 eps) through kappa^2, plus rounding (tests/tolerances.py).
    err = (x.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert (err <= cgls_error_bound(A, b, torch.float32)).all() and (status == 0).all(), err
    x, status = least_squares(A.double(), b.double(), solver="cg", max_iter=2)  # 8 unknowns need ~8
    assert status.tolist() == [int(Status.MAX_ITER)] * 3 and torch.isfinite(x).all()


def test_cg_rank_deficient_gives_min_norm_and_finite_gradient():
    A, b, _, _ = _problem(5, B=1, m=10, n=4)
    A = torch.cat([A, A[:, :, :1]], dim=2).requires_grad_(True)  # a repeated column
    x, _ = least_squares(A, b, solver="cg")
    ref = torch.linalg.pinv(A.detach()) @ b.unsqueeze(-1)
    torch.testing.assert_close(x, ref.squeeze(-1), rtol=1e-7, atol=1e-9)
    (g,) = torch.autograd.grad(x.sum(), A)
    assert torch.isfinite(g).all()


def test_cgls_unrolled_is_differentiable_and_stops_per_item():
    A, b, _, _ = _problem(6, m=20, n=5)
    A[1] = A[1, :, :1].expand(20, 5) * torch.arange(1.0, 6.0, dtype=torch.float64)  # rank 1: stops early
    A.requires_grad_(True)
    x, iterations, converged = cgls(A, b)
    assert converged.all() and iterations[1] < iterations[0] <= 5 + 1
    (g,) = torch.autograd.grad(x[0].sum(), A)  # autograd through the iterations
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0 and g[1:].abs().sum() == 0


def test_layer_and_bad_solver():
    A, b, _, _ = _problem(7)
    layer = LeastSquares(ridge=0.1, solver="cg")
    torch.testing.assert_close(layer(A, b), least_squares(A, b, ridge=0.1)[0])
    with pytest.raises(ValueError, match="solver"):
        least_squares(A, b, solver="lu")
    with pytest.raises(ValueError, match="solver"):
        LeastSquares(solver="lu")


@pytest.mark.parametrize("solver", ["qr", "cg"])
def test_backward_status_and_nonfinite_incoming_gradient(solver):
    """A NaN incoming gradient on one item: that item's gradients are 0 and its backward status
    NONFINITE; the other items' gradients are those of a clean backward."""
    A, b, _, _ = _problem(8)
    info = {}
    Ag = A.clone().requires_grad_(True)
    x, _ = least_squares(Ag, b, solver=solver, info=info)
    v = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (g_clean,) = torch.autograd.grad(x, Ag, v, retain_graph=True)
    assert info["backward_status"].tolist() == [int(Status.OK)] * 3
    v_bad = v.clone()
    v_bad[1, 2] = float("nan")
    (g,) = torch.autograd.grad(x, Ag, v_bad)
    assert info["backward_status"].tolist() == [int(Status.OK), int(Status.NONFINITE), int(Status.OK)]
    assert torch.isfinite(g).all() and g[1].abs().sum() == 0
    torch.testing.assert_close(g[[0, 2]], g_clean[[0, 2]])


def test_backward_status_rank_deficient_and_layer():
    A, b, _, _ = _problem(10, B=2, m=10, n=4)
    A = A.clone()
    A[1, :, 3] = A[1, :, 0]  # item 1: a repeated column
    layer = LeastSquares()
    assert layer.last_backward_status is None
    Ag = A.requires_grad_(True)
    layer(Ag, b).sum().backward()
    assert layer.last_status.tolist() == [int(Status.OK), int(Status.DEGENERATE)]
    assert layer.last_backward_status.tolist() == [int(Status.OK), int(Status.ZEROED)]
    assert Ag.grad[1].abs().sum() == 0
    info = {}
    A2 = A.detach().clone().requires_grad_(True)
    least_squares(A2, b, solver="cg", max_iter=1, info=info)[0].sum().backward()  # 1 CG step cannot solve 4 unknowns
    assert int(Status.MAX_ITER) in info["backward_status"].tolist()
