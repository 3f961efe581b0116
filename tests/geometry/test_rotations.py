import math

import pytest
import torch

from bpnp.geometry.rotations import (
    project_to_so3,
    random_rotation,
    geodesic_angle,
    skew,
    so3_exp,
    so3_log,
)

F64 = torch.float64


def _axis_angles(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=F64), dim=-1)
    angle = torch.rand(n, 1, generator=g, dtype=F64) * (math.pi - 1e-3)
    return axis * angle


def test_exp_log_round_trip_and_orthonormality():
    w = _axis_angles(200, 0).view(4, 50, 3)  # arbitrary leading dims
    R = so3_exp(w)
    assert R.shape == (4, 50, 3, 3)
    eye = torch.eye(3, dtype=F64)
    assert torch.allclose(R @ R.transpose(-1, -2), eye.expand_as(R), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(4, 50, dtype=F64), atol=1e-12)
    assert torch.allclose(so3_log(R), w, atol=1e-9)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-6, 1e-3, math.pi - 1e-4])
def test_exp_log_round_trip_small_and_large_angles(angle):
    axis = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8], dtype=F64), dim=0)
    w = axis * angle
    assert torch.allclose(so3_log(so3_exp(w)), w, atol=1e-9)


def test_exp_matches_right_hand_rule():
    R = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2], dtype=F64))
    assert torch.allclose(R @ torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0, 0.0], dtype=F64))


def test_exp_gradient_finite_at_identity():
    w = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    so3_exp(w).sum().backward()
    assert torch.isfinite(w.grad).all()


def test_skew_is_cross_product():
    g = torch.Generator().manual_seed(1)
    v, u = torch.randn(2, 5, 3, generator=g, dtype=F64)
    assert torch.allclose((skew(v) @ u.unsqueeze(-1)).squeeze(-1), torch.cross(v, u, dim=-1))


def test_random_rotation_is_rotation_deterministic_and_uniform():
    R = random_rotation(20000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert R.shape == (20000, 3, 3) and R.dtype == F64
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=F64).expand_as(R), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(20000, dtype=F64), atol=1e-12)
    again = random_rotation(20000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(R, again)
    other = random_rotation(3, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert not torch.allclose(other, R[:3])
    # Haar measure: E[R] = 0, and the angle has density (1 - cos a) / pi, so E[cos a] = -1/2
    # (tr R = 1 + 2 cos a, so E[tr R] = 0).
    assert R.mean(0).abs().max() < 0.03
    cos = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    assert abs(cos.mean().item() + 0.5) < 0.02


def test_random_rotation_bad_args():
    with pytest.raises(ValueError, match="b must be >= 0"):
        random_rotation(-1)
    with pytest.raises(TypeError):
        random_rotation(2.0)  # type: ignore[arg-type]
    assert random_rotation(0).shape == (0, 3, 3)


@pytest.mark.parametrize("angle", [0.0, 1e-7, 1e-4, 0.5, 2.0, math.pi - 1e-6, math.pi])
def test_rotation_angle_accurate_near_0_and_pi(angle):
    axis = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, -0.5], dtype=F64), dim=0)
    R1 = so3_exp(torch.tensor([0.2, -0.1, 0.4], dtype=F64))
    R2 = R1 @ so3_exp(axis * angle)
    got = geodesic_angle(R1, R2)
    assert got.shape == ()
    assert abs(got.item() - angle) <= 1e-12 + 1e-7 * angle
    assert abs(geodesic_angle(R2, R1).item() - angle) <= 1e-12 + 1e-7 * angle


def test_rotation_angle_clamps_and_broadcasts():
    # Slightly non-orthonormal input must not give NaN (the cosine would exceed 1).
    R = torch.eye(3, dtype=F64) * (1 + 1e-9)
    assert geodesic_angle(R, torch.eye(3, dtype=F64)).item() == pytest.approx(0.0, abs=1e-6)
    Rs = so3_exp(_axis_angles(6, 3)).view(2, 3, 3, 3)
    out = geodesic_angle(torch.eye(3, dtype=F64), Rs)
    assert out.shape == (2, 3)
    assert torch.allclose(out, _axis_angles(6, 3).norm(dim=-1).view(2, 3), atol=1e-10)


def test_project_to_so3():
    g = torch.Generator().manual_seed(4)
    R = so3_exp(_axis_angles(10, 4))
    noisy = R + 1e-4 * torch.randn(10, 3, 3, generator=g, dtype=F64)
    P = project_to_so3(noisy)
    assert torch.allclose(P @ P.transpose(-1, -2), torch.eye(3, dtype=F64).expand_as(P), atol=1e-12)
    assert (geodesic_angle(P, R) < 1e-3).all()
    # A reflection maps to a proper rotation.
    refl = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    assert torch.det(project_to_so3(refl)).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "fn, arg, msg",
    [
        (so3_exp, torch.zeros(4, 5), r"omega must have shape \(\*, 3\), got \(4, 5\)"),
        (so3_log, torch.zeros(4, 3), r"R must have shape \(\*, 3, 3\), got \(4, 3\)"),
        (project_to_so3, torch.zeros(2, 3, 4), r"M must have shape \(\*, 3, 3\), got \(2, 3, 4\)"),
        (skew, torch.zeros(2), r"v must have shape \(\*, 3\), got \(2,\)"),
    ],
)
def test_bad_shapes_raise_value_error(fn, arg, msg):
    with pytest.raises(ValueError, match=msg):
        fn(arg)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        so3_exp([0.0, 0.0, 1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        so3_exp(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="must broadcast"):
        geodesic_angle(torch.eye(3).expand(2, 3, 3), torch.eye(3).expand(3, 3, 3))


@pytest.mark.parametrize("module", ["rotations", "bearings", "metrics", "p3p", "ransac"])
def test_docstring_examples_of_bpnp_geometry(module):
    # The examples are part of the documented contract (kornia style); keep them true.
    import doctest
    import importlib

    mod = importlib.import_module(f"bpnp.geometry.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch, "math": math}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
