"""Correspondence and pose losses."""

from __future__ import annotations

import math

import torch

from bpnp.geometry.rotations import so3_exp
from bpnp.training.losses import BlindPnPLoss, correspondence_loss, correspondence_matrix, pose_loss, rotation_angle


def test_correspondence_loss_equals_dense_formula():
    torch.manual_seed(0)
    B, m, n = 3, 6, 8
    P = torch.rand(B, m, n)
    P = P / P.sum((1, 2), keepdim=True)
    match = torch.randint(-1, n, (B, m))
    mask2d = torch.ones(B, m, dtype=torch.bool)
    mask2d[1, 4:] = False
    mask3d = torch.ones(B, n, dtype=torch.bool)
    mask3d[2, 6:] = False
    P = P * mask2d[:, :, None] * mask3d[:, None, :]
    C = correspondence_matrix(match, n, mask2d, mask3d)
    dense = ((1 - 2 * C) * P).sum((1, 2))
    assert torch.allclose(correspondence_loss(P, match, mask2d, mask3d), dense, atol=1e-6)
    # C has one 1 per real matched row, none for -1 / padding / padded 3D targets
    expected = ((match >= 0) & mask2d & torch.gather(mask3d, 1, match.clamp(min=0))).sum(1)
    assert torch.equal(C.sum((1, 2)).long(), expected)


def test_correspondence_loss_range():
    n = 5
    match = torch.arange(n)[None]
    perfect = torch.eye(n)[None] / n
    uniform = torch.full((1, n, n), 1.0 / n**2)
    assert torch.allclose(correspondence_loss(perfect, match), torch.tensor([-1.0]))
    assert torch.allclose(correspondence_loss(uniform, match), torch.tensor([1.0 - 2.0 / n]))
    wrong = torch.roll(torch.eye(n), 1, 1)[None] / n
    assert torch.allclose(correspondence_loss(wrong, match), torch.tensor([1.0]))


def test_pose_loss_caps_and_gradients():
    R_gt = so3_exp(torch.tensor([[0.1, -0.2, 0.3], [1.0, 0.0, 0.0]]))
    t_gt = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    assert torch.allclose(pose_loss(R_gt, t_gt, R_gt, t_gt), torch.zeros(2), atol=1e-5)
    d = so3_exp(torch.tensor([[0.0, 0.0, 0.2], [0.0, 2.5, 0.0]]))
    R = d @ R_gt
    ang = rotation_angle(R, R_gt)
    assert torch.allclose(ang, torch.tensor([0.2, 2.5]), atol=1e-4)
    tr = (R.transpose(1, 2) @ R_gt).diagonal(dim1=1, dim2=2).sum(-1)
    assert torch.allclose(ang, torch.acos(((tr - 1) / 2).clamp(-1, 1)), atol=1e-4)
    t = t_gt + torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, 10.0]])
    loss = pose_loss(R, t, R_gt, t_gt)
    assert torch.allclose(loss, torch.tensor([0.2 + 0.3, math.pi / 2 + 1.0]), atol=1e-4)
    assert torch.allclose(pose_loss(R, t, R_gt, t_gt, rot_cap=0.1, t_cap=0.2), torch.tensor([0.3, 0.3]), atol=1e-4)
    # Finite gradient at zero error (acos of the trace would give inf/NaN there).
    Rz = R_gt.clone().requires_grad_(True)
    tz = t_gt.clone().requires_grad_(True)
    pose_loss(Rz, tz, R_gt, t_gt).sum().backward()
    assert torch.isfinite(Rz.grad).all() and torch.isfinite(tz.grad).all()


def test_pose_term_switches_on_at_epoch():
    class Out:
        P = torch.eye(3)[None] / 3
        R = torch.eye(3)[None]
        t = torch.zeros(1, 3)

    batch = {"match": torch.arange(3)[None], "R": so3_exp(torch.tensor([[0.0, 0.0, 0.5]])), "t": torch.tensor([[0.0, 0.0, 0.5]])}
    loss = BlindPnPLoss(corr_weight=2.0, pose_weight=3.0, pose_start_epoch=2)
    early, late = loss(Out(), batch, epoch=1), loss(Out(), batch, epoch=2)
    assert early.pose is None and torch.allclose(early.loss, torch.tensor(-2.0))
    assert torch.allclose(late.pose, torch.tensor(1.0), atol=1e-4)
    assert torch.allclose(late.loss, torch.tensor(-2.0 + 3.0), atol=1e-4)
    assert not BlindPnPLoss(pose_start_epoch=None).pose_active(100)
