"""Bi-level least squares at tiny sizes: the four gradients against the closed form, finite
differences and gradcheck; the unrolled CGLS solver; the loss curves; the command line."""

import pytest
import torch

from bpnp.experiments import bilevel_least_squares as bls
from bpnp.experiments._checks import rel_err


def test_cgls_solves_batched_least_squares_and_freezes_converged_items():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, 5, generator=g, dtype=torch.float64)
    A[1] *= 1e-3  # badly scaled item: the tolerance is relative, so it converges as fast
    b = torch.randn(3, 10, generator=g, dtype=torch.float64)
    x, k = bls.cgls(A, b)
    ref = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    assert rel_err(x, ref) < 1e-10
    assert k <= 10  # exact termination after about n = 5 steps, plus rounding
    x1, _ = bls.cgls(A[0], b[0])  # unbatched form
    torch.testing.assert_close(x1, x[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [3, 6])
def test_all_gradients_match_closed_form(n):
    A, b, xt = bls.make_problem(n, seed=n)
    ref = bls.closed_form_gradient(A, b, xt)
    for method in bls.METHODS:
        loss, g = bls.gradient(A, b, xt, method)
        assert rel_err(g, ref) < 1e-9, method
        assert abs(float(loss) - float(bls.upper_loss(A, b, xt, "node"))) < 1e-12 * float(loss)


def test_truncated_unrolled_solver_gives_a_different_gradient():
    A, b, xt = bls.make_problem(8, seed=1)
    ref = bls.closed_form_gradient(A, b, xt)
    _, g = bls.gradient(A, b, xt, "unrolled", iters=2)  # two CG steps: far from x*
    assert rel_err(g, ref) > 1e-2


@pytest.mark.parametrize("method", ["node", "node_cg", "unrolled"])
def test_gradcheck_upper_loss(method):
    A, b, xt = bls.make_problem(3, seed=2)
    A.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A: bls.upper_loss(A, b, xt, method), (A,), eps=1e-6, atol=1e-7)


def test_finite_differences_helper_agrees_with_node():
    A, b, xt = bls.make_problem(4, seed=3)
    pairs = bls.finite_difference(A, b, xt, directions=2)
    torch.testing.assert_close(pairs[:, 0], pairs[:, 1], rtol=1e-6, atol=0.0)


def test_loss_curves_coincide_and_decrease():
    A0, b, xt = bls.make_problem(4, seed=0)
    curves = {k: bls.descend(A0, b, xt, k, steps=12)[0] for k in bls.METHODS}
    base = curves["node"]
    assert float(base[-1]) < 0.2 * float(base[0])
    for k in bls.METHODS[1:]:
        assert float(((curves[k] - base).abs() / base).max()) < 1e-8, k


def test_main_tiny_prints_passing_checks(capsys, tmp_path):
    checks = bls.main(["--n", "4", "--steps", "20", "--plot", str(tmp_path / "loss.png")])
    out = capsys.readouterr().out
    assert checks.ok, out
    assert "FAIL" not in out and out.count("[PASS]") == len(checks.items) == 12
    assert checks["node vs unrolled: relative difference"] < 1e-6
    assert checks["node vs node_cg: relative difference"] < 1e-6
    assert (tmp_path / "loss.png").stat().st_size > 0
