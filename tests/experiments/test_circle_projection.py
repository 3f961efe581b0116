"""Equality-constrained nodes: the unit circle's dy/dx = -x/y and the sphere projection's
Jacobian (I - y y^T)/||z||, through the generic ImplicitNode."""

import pytest
import torch

from bpnp.experiments import circle_projection as cp
from bpnp.nodes import Status


@pytest.mark.parametrize("branch", [1, -1])
def test_unit_circle_matches_dini(branch):
    x = torch.tensor([-0.95, -0.2, 0.1, 0.6], dtype=torch.float64)
    y, g = cp.circle_derivative(x, branch)
    torch.testing.assert_close(y, branch * torch.sqrt(1 - x**2))
    torch.testing.assert_close(g, -x / y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("branch", [1, -1])
def test_gradcheck_unit_circle(branch):
    x = torch.tensor([-0.5, 0.3], dtype=torch.float64, requires_grad=True)
    node = cp.UnitCircle(branch)
    assert torch.autograd.gradcheck(node, (x,))
    assert node.last_backward_status is not None and bool((node.last_backward_status == int(Status.OK)).all())


def test_sphere_projection_vjp_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    v = torch.randn(4, 3, generator=g, dtype=torch.float64)
    node, closed = cp.projection_vjp(z, v)
    torch.testing.assert_close(node, closed, rtol=1e-12, atol=1e-14)
    zz = z[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(cp.SphereProjection(), (zz,))


def test_invalid_branch():
    with pytest.raises(ValueError, match="branch"):
        cp.UnitCircle(0)


def test_main(capsys):
    checks = cp.main(["--d", "4"])
    out = capsys.readouterr().out
    assert checks.ok, out
    assert out.count("[PASS]") == 3 and "FAIL" not in out
