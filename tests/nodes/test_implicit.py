"""Tests of the generic implicit node: gradcheck, constraints, implicit vs unrolled, singular items."""

import pytest
import torch

from bpnp.nodes.implicit import ImplicitNode, dense_hessian, implicit_vjp
from bpnp.nodes.status import Status


class SmoothRobustMean(ImplicitNode):
    """y = argmin_y sum_k w_k * phi(y - x_k), phi(r) = sqrt(1 + r^2) - 1 (pseudo-Huber), y in R^d.

    The solver is Newton's method written in differentiable torch ops, so the same node can be
    differentiated implicitly and by unrolling.
    """

    def __init__(self, iters=30, **kw):
        super().__init__(**kw)
        self.iters = iters

    def objective(self, x, w, y):  # x (B, K, d), w (B, K), y (B, d)
        r = y[:, None, :] - x
        return (w[..., None] * (torch.sqrt(1 + r**2) - 1)).sum((1, 2))

    def solve(self, x, w):
        y = (w[..., None] * x).sum(1) / w.sum(1, keepdim=True)
        for _ in range(self.iters):
            r = y[:, None, :] - x
            s = torch.sqrt(1 + r**2)
            g = (w[..., None] * r / s).sum(1)
            h = (w[..., None] / s**3).sum(1)
            y = y - g / h
        return y


class HyperplaneProjection(ImplicitNode):
    """y = argmin 1/2 ||y - x||^2 s.t. a^T y = 1."""

    def objective(self, x, a, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, a, y):
        return (a * y).sum(-1, keepdim=True) - 1.0

    def solve(self, x, a):
        lam = ((a * x).sum(-1, keepdim=True) - 1.0) / (a * a).sum(-1, keepdim=True)
        return x - lam * a


class SphereProjection(ImplicitNode):
    """y = argmin 1/2 ||y - x||^2 s.t. ||y||^2 = 1 (nonlinear constraint)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_unconstrained_gradcheck(solver):
    g = _gen(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    node = SmoothRobustMean(linear_solver=solver)
    assert torch.autograd.gradcheck(node, (x, w), eps=1e-6, atol=1e-6)


def test_implicit_equals_unrolled():
    g = _gen(1)
    x = torch.randn(4, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    v = torch.randn(4, 3, generator=g, dtype=torch.float64)
    gi = torch.autograd.grad((SmoothRobustMean(backward="implicit")(x, w) * v).sum(), (x, w))
    gu = torch.autograd.grad((SmoothRobustMean(backward="unrolled")(x, w) * v).sum(), (x, w))
    for a, b in zip(gi, gu):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_hyperplane_constraint_gradcheck_and_closed_form(solver):
    g = _gen(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    node = HyperplaneProjection(linear_solver=solver)
    assert torch.autograd.gradcheck(node, (x, a), eps=1e-6, atol=1e-6)
    # The constraint changes the gradient: dy/dx = I - a a^T / |a|^2, not I.
    v = torch.randn(3, 4, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((node(x, a) * v).sum(), x)
    an = a.detach() / a.detach().norm(dim=-1, keepdim=True)
    expected = v - (v * an).sum(-1, keepdim=True) * an
    torch.testing.assert_close(gx, expected)
    assert not torch.allclose(gx, v)


def test_sphere_constraint_gradcheck_and_closed_form():
    g = _gen(3)
    x = (torch.randn(4, 3, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    node = SphereProjection()
    assert torch.autograd.gradcheck(node, (x,), eps=1e-6, atol=1e-6)
    v = torch.randn(4, 3, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((node(x) * v).sum(), x)
    xd = x.detach()
    u = xd / xd.norm(dim=-1, keepdim=True)
    expected = (v - (v * u).sum(-1, keepdim=True) * u) / xd.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(gx, expected)


def test_float32_and_status_ok():
    g = _gen(4)
    x = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    w = torch.rand(2, 5, generator=g) + 0.5
    node = SmoothRobustMean()
    y = node(x, w)
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert node.last_backward_status.tolist() == [Status.OK, Status.OK]


class Quadratic(ImplicitNode):
    """y = argmin 1/2 y^T Q y - x^T y, solved by least squares so singular Q is allowed."""

    def objective(self, Q, x, y):
        return 0.5 * (y * (Q @ y.unsqueeze(-1)).squeeze(-1)).sum(-1) - (x * y).sum(-1)

    def solve(self, Q, x):
        return torch.linalg.lstsq(Q, x.unsqueeze(-1)).solution.squeeze(-1)


@pytest.mark.parametrize("mode,code", [("damp", Status.DAMPED), ("min_norm", Status.MIN_NORM), ("zero", Status.ZEROED)])
def test_singular_item_gets_status_and_finite_gradient(mode, code):
    Q = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    Q[1, 2, 2] = 0.0  # item 1 singular
    x = torch.randn(3, 3, dtype=torch.float64, generator=_gen(5), requires_grad=True)
    x.data[1, 2] = 0.0
    node = Quadratic(singular=mode)
    y = node(Q, x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()
    assert node.last_backward_status.tolist() == [Status.OK, code, Status.OK]
    # The regular items are untouched by their singular neighbour: dy/dx = I.
    torch.testing.assert_close(gx[[0, 2]], torch.ones(2, 3, dtype=torch.float64))


def test_nonfinite_incoming_gradient_is_contained():
    Q = torch.eye(2, dtype=torch.float64).repeat(2, 1, 1)
    x = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    node = Quadratic()
    y = node(Q, x)
    v = torch.tensor([[1.0, 1.0], [float("nan"), 1.0]], dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, v)
    assert torch.isfinite(gx).all()
    assert node.last_backward_status.tolist() == [Status.OK, Status.NONFINITE]
    torch.testing.assert_close(gx[0], torch.ones(2, dtype=torch.float64))


def test_dense_hessian_matches_autograd():
    g = _gen(6)
    A = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def fn(z):
        return (torch.tanh(A @ z.unsqueeze(-1)).squeeze(-1) ** 2).sum(-1)

    H = dense_hessian(fn, y)
    for i in range(3):
        Hi = torch.autograd.functional.hessian(lambda z: (torch.tanh(A[i] @ z) ** 2).sum(), y[i])
        torch.testing.assert_close(H[i], Hi)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backward"):
        SmoothRobustMean(backward="magic")
    with pytest.raises(ValueError, match="singular"):
        implicit_vjp(lambda y: y.sum(-1), (), torch.zeros(1, 2), torch.zeros(1, 2), singular="bogus")
