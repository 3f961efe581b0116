"""Bi-level optimal transport at tiny sizes: our unrolled Sinkhorn solvers against the node,
implicit gradient against unrolled ones, finite differences and gradcheck; the command line."""

import pytest
import torch

from bpnp.experiments import bilevel_ot as bot
from bpnp.experiments._checks import rel_err


@pytest.mark.parametrize("solver", [bot.sinkhorn_log, bot.sinkhorn_scaling])
def test_own_sinkhorn_matches_node_plan(solver):
    g = torch.Generator().manual_seed(0)
    M = torch.rand(5, 7, generator=g, dtype=torch.float64)
    r, c = bot.marginals(5, 7)
    P, k = solver(M, r, c, lam=10.0)
    ref = bot.plan(M, "implicit", 10.0)
    assert rel_err(P, ref) < 1e-10
    torch.testing.assert_close(P.sum(1), r, rtol=0, atol=1e-12)  # the stopping rule: L1 row error <= 1e-12
    torch.testing.assert_close(P.sum(0), c, rtol=0, atol=1e-14)  # columns exact after the last update
    assert 0 < k < 1000
    _, k_fixed = solver(M, r, c, lam=10.0, max_iter=37, tol=-1.0)  # negative tol: exactly max_iter
    assert k_fixed == 37


def test_gradients_agree_rectangular():
    g = torch.Generator().manual_seed(1)
    M = torch.rand(4, 6, generator=g, dtype=torch.float64)
    P_target = bot.plan(torch.rand(4, 6, generator=g, dtype=torch.float64), "implicit")
    grads = {k: bot.gradient(M, P_target, k)[1] for k in bot.METHODS}
    for k in ("unrolled_log", "unrolled_scaling"):
        assert rel_err(grads[k], grads["implicit"]) < 1e-8, k
    # unrolled too early: a different gradient (the comparison above is not vacuous)
    _, g2 = bot.gradient(M, P_target, "unrolled_log", max_iter=1, tol=-1.0)
    assert rel_err(g2, grads["implicit"]) > 1e-3


def test_gradcheck_implicit_upper_loss():
    g = torch.Generator().manual_seed(2)
    M = torch.rand(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    P_target = bot.plan(torch.rand(3, 4, generator=g, dtype=torch.float64), "implicit")
    assert torch.autograd.gradcheck(lambda M: bot.upper_loss(M, P_target, "implicit"), (M,), eps=1e-6, atol=1e-9)


def test_finite_differences_and_descent():
    M0, P_target = bot.make_problem(5, seed=3)
    pairs = bot.finite_difference(M0, P_target, directions=2)
    torch.testing.assert_close(pairs[:, 0], pairs[:, 1], rtol=1e-6, atol=0.0)
    runs = {k: bot.descend(M0, P_target, k, steps=15) for k in bot.METHODS}
    base = runs["implicit"][0]
    assert float(base[-1]) < 0.3 * float(base[0])
    for k in ("unrolled_log", "unrolled_scaling"):
        assert float(((runs[k][0] - base).abs() / base).max()) < 1e-8
        torch.testing.assert_close(runs[k][1], runs["implicit"][1], rtol=1e-8, atol=1e-10)


def test_main_tiny_prints_passing_checks(capsys, tmp_path):
    checks = bot.main(["--m", "5", "--steps", "30", "--plot", str(tmp_path / "plans.png")])
    out = capsys.readouterr().out
    assert checks.ok, out
    assert "FAIL" not in out and out.count("[PASS]") == len(checks.items) == 8
    assert (tmp_path / "plans.png").stat().st_size > 0
