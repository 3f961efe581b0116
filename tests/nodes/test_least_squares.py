"""Least-squares node: closed-form backward against finite differences and autograd through lstsq."""

import pytest
import torch

from bpnp.nodes.least_squares import LeastSquares, least_squares
from bpnp.nodes.status import Status
from tests.tolerances import lstsq_error_bound


def _problem(seed=0, B=3, m=7, n=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, m, n, generator=g, dtype=dtype)
    b = torch.randn(B, m, generator=g, dtype=dtype)
    return A, b


def test_gradcheck_A_b():
    A, b = _problem()
    A.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A, b: least_squares(A, b)[0], (A, b))


def test_gradcheck_weights_and_ridge():
    A, b = _problem(1)
    w = (torch.rand(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1).requires_grad_(True)
    ridge = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    A.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A, w, r: least_squares(A, b, weights=w, ridge=r)[0], (A, w, ridge))


def test_matches_autograd_through_torch_lstsq():
    A, b = _problem(3, B=4, m=20, n=6)
    A1, b1 = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    A2, b2 = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    v = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x1 = least_squares(A1, b1)[0]
    x2 = torch.linalg.lstsq(A2, b2.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(x1, x2)
    g1 = torch.autograd.grad((x1 * v).sum(), (A1, b1))
    g2 = torch.autograd.grad((x2 * v).sum(), (A2, b2))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_weighted_equals_row_scaling_and_zero_weight_drops_row():
    A, b = _problem(5)
    w = torch.ones(3, 7, dtype=torch.float64)
    w[:, -1] = 0.0
    x_w = least_squares(A, b, weights=w)[0]
    x_drop = least_squares(A[:, :-1], b[:, :-1])[0]
    torch.testing.assert_close(x_w, x_drop)


def test_ridge_matches_normal_equations():
    A, b = _problem(6)
    x = least_squares(A, b, ridge=0.3)[0]
    AtA = A.transpose(1, 2) @ A + 0.3 * torch.eye(4, dtype=torch.float64)
    ref = torch.linalg.solve(AtA, (A.transpose(1, 2) @ b.unsqueeze(-1))).squeeze(-1)
    torch.testing.assert_close(x, ref)


def test_rank_deficient_item_status_and_finite_grad():
    A, b = _problem(7)
    A[1, :, 3] = A[1, :, 2]  # two equal columns
    A.requires_grad_(True)
    node = LeastSquares()
    x = node(A, b)
    assert node.last_status.tolist() == [Status.OK, Status.DEGENERATE, Status.OK]
    assert torch.isfinite(x).all()
    (g,) = torch.autograd.grad(x.sum(), A)
    assert torch.isfinite(g).all() and g[1].abs().sum() == 0 and g[0].abs().sum() > 0


def test_float32_cpu():
    A, b = _problem(8, dtype=torch.float32)
    x = least_squares(A, b)[0]
    ref = torch.linalg.lstsq(A.double(), b.double().unsqueeze(-1)).solution.squeeze(-1)
    # QR's backward error through the problem's condition number (tests/tolerances.py).
    err = (x.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert (err <= lstsq_error_bound(A, b, torch.float32)).all(), err


def test_bad_input():
    A, b = _problem()
    with pytest.raises(ValueError, match=r"shape \(B, m\)"):
        least_squares(A, b[:, :3])
    with pytest.raises(ValueError, match="underdetermined"):
        least_squares(A[:, :2], b[:, :2])
    with pytest.raises(ValueError, match="non-negative"):
        least_squares(A, b, weights=-torch.ones_like(b))
