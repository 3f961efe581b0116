"""Average and robust pooling nodes: forward optimality, gradient against the closed form
phi''_i / sum_j phi''_j and against finite differences (gradcheck)."""

import pytest
import torch

from bpnp.experiments import robust_pooling as rp
from bpnp.experiments._checks import rel_err


def _data(seed=0, B=2, n=7, d=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    x[:, 0] += 6.0  # one outlier per item
    return x


@pytest.mark.parametrize("penalty", rp.PENALTIES)
def test_forward_is_stationary(penalty):
    x = _data(1)
    node = rp.RobustPool(penalty, alpha=1.0)
    y = node.solve(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(node.objective(x, y).sum(), y)
    assert float(grad.abs().max()) < 1e-10


@pytest.mark.parametrize("penalty", rp.PENALTIES)
def test_gradient_matches_closed_form(penalty):
    x = _data(2)
    v = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, g = rp.node_vjp(x, v, penalty, 1.0)
    assert rel_err(g, rp.closed_form_vjp(x, y, v, penalty, 1.0)) < 1e-10


@pytest.mark.parametrize("penalty", rp.PENALTIES)
def test_gradcheck(penalty):
    x = _data(4, B=1, n=5, d=2).requires_grad_(True)
    assert torch.autograd.gradcheck(rp.RobustPool(penalty, alpha=1.5), (x,), eps=1e-6, atol=1e-7)


def test_average_pooling_is_mean_with_gradient_one_over_n():
    x = _data(5)
    v = torch.ones(2, 3, dtype=torch.float64)
    y, g = rp.node_vjp(x, v, "quadratic", 1.0)
    torch.testing.assert_close(y, x.mean(1))
    torch.testing.assert_close(g, torch.full_like(x, 1 / 7))


def test_outlier_influence():
    x = rp.example_points()
    e = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    infl = {}
    for name in rp.PENALTIES:
        _, g = rp.node_vjp(x, e, name, 1.0)
        infl[name] = float(g[0, -1, 0])
    assert infl["quadratic"] == pytest.approx(1 / 11)
    assert infl["huber"] == 0.0  # beyond alpha the Huber penalty has no curvature
    assert 0 < infl["pseudo_huber"] < 1e-3 and abs(infl["welsch"]) < 1e-20


def test_invalid_arguments():
    with pytest.raises(ValueError, match="penalty"):
        rp.RobustPool("cauchy")
    with pytest.raises(ValueError, match="alpha"):
        rp.RobustPool("huber", alpha=0.0)


def test_main(capsys):
    checks = rp.main([])
    out = capsys.readouterr().out
    assert checks.ok, out
    assert out.count("[PASS]") == 8 and "FAIL" not in out
