import pytest
import torch

from bpnp.geometry.bearings import (
    bearings_to_normalised,
    denormalise_keypoints,
    normalise_keypoints,
    project,
    to_bearings,
    transform,
)
from bpnp.geometry.rotations import random_rotation

F64 = torch.float64


def test_to_bearings_unit_forward_and_inverse():
    g = torch.Generator().manual_seed(0)
    p2d = torch.randn(3, 7, 2, generator=g, dtype=F64)
    b = to_bearings(p2d)
    assert b.shape == (3, 7, 3)
    assert torch.allclose(b.norm(dim=-1), torch.ones(3, 7, dtype=F64))
    assert (b[..., 2] > 0).all()
    # Parallel to [x, y, 1].
    assert torch.allclose(b[..., :2] / b[..., 2:], p2d)
    assert torch.allclose(bearings_to_normalised(b), p2d, atol=1e-12)


def test_transform_project_round_trip():
    g = torch.Generator().manual_seed(1)
    b, n = 4, 9
    R = random_rotation(b, generator=g, dtype=F64)
    t = torch.randn(b, 3, generator=g, dtype=F64)
    z = 2.0 + torch.rand(b, n, 1, generator=g, dtype=F64)
    xy = torch.randn(b, n, 2, generator=g, dtype=F64)
    x_cam = torch.cat([xy * z, z], -1)
    X = (x_cam - t[:, None]) @ R  # world points with R X + t = x_cam
    got = transform(R, t, X)
    assert torch.allclose(got, x_cam, atol=1e-12)
    assert torch.allclose(project(got), xy, atol=1e-12)
    # Bearings of the projections point at the camera-frame points.
    assert torch.allclose(to_bearings(project(got)), torch.nn.functional.normalize(x_cam, dim=-1), atol=1e-12)


def test_transform_broadcasts_a_single_pose():
    X = torch.randn(2, 5, 3, dtype=F64)
    R = random_rotation(1, generator=torch.Generator().manual_seed(2), dtype=F64)[0]
    t = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    assert torch.allclose(transform(R, t, X), X @ R.T + t)


def test_project_behaviour_at_and_behind_the_principal_plane():
    x = torch.tensor([[2.0, 4.0, -2.0], [2.0, 4.0, 0.0], [2.0, 4.0, 1e-12]])
    out = project(x)
    assert torch.equal(out[0], torch.tensor([-1.0, -2.0]))  # mirrored, as in the pinhole model
    assert torch.equal(out[1], torch.tensor([2.0, 4.0]))  # |z| <= eps: returned undivided
    assert torch.equal(out[2], torch.tensor([2.0, 4.0]))
    assert torch.isfinite(out).all()
    assert project(torch.tensor([3.0, 6.0, 3.0])).tolist() == [1.0, 2.0]  # single point


def test_normalise_keypoints_with_K_including_skew():
    K = torch.tensor([[500.0, 2.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]], dtype=F64)
    g = torch.Generator().manual_seed(3)
    uv = torch.rand(2, 6, 2, generator=g, dtype=F64) * 640
    xy = normalise_keypoints(uv, K)  # (3, 3) K broadcasts against (2, 6, 2)
    hom = torch.cat([uv, torch.ones(2, 6, 1, dtype=F64)], -1) @ torch.linalg.inv(K).T
    assert torch.allclose(xy, hom[..., :2] / hom[..., 2:], atol=1e-12)
    # By hand for the principal point and one offset pixel.
    pts = normalise_keypoints(torch.tensor([[320.0, 240.0], [822.0, 720.0]], dtype=F64), K)
    assert torch.allclose(pts, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64))
    assert torch.allclose(denormalise_keypoints(xy, K.expand(2, 3, 3)), uv, atol=1e-9)


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda: to_bearings(torch.zeros(4, 3)), r"p2d must have shape \(\*, 2\), got \(4, 3\)"),
        (lambda: project(torch.zeros(4, 2)), r"x_cam must have shape \(\*, 3\), got \(4, 2\)"),
        (lambda: transform(torch.eye(3), torch.zeros(3), torch.zeros(3)),
         r"X must have shape \(\*, N, 3\), got \(3,\)"),
        (lambda: transform(torch.eye(3).expand(2, 3, 3), torch.zeros(3, 3), torch.zeros(2, 5, 3)), "must broadcast"),
        (lambda: normalise_keypoints(torch.zeros(5, 2), torch.eye(2)), r"K must have shape \(\*, 3, 3\), got \(2, 2\)"),
    ],
)
def test_bad_shapes_raise(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_bad_types_raise():
    with pytest.raises(TypeError):
        to_bearings([[0.0, 0.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        to_bearings(torch.zeros(2, 2, dtype=torch.long))
