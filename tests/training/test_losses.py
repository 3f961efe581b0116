"""Correspondence and pose losses."""

from __future__ import annotations

import math

import torch

from bpnp.geometry.rotations import so3_exp
import pytest

from bpnp.nodes.sinkhorn import sinkhorn, uniform_marginals
from bpnp.training.losses import (BlindPnPLoss, correspondence_loss, correspondence_matrix, match_accuracy, pose_loss,
                                  rotation_angle)


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
    assert torch.allclose(correspondence_loss(P, match, mask2d, mask3d, kind="linear"), dense, atol=1e-6)
    # C has one 1 per real matched row, none for -1 / padding / padded 3D targets
    expected = ((match >= 0) & mask2d & torch.gather(mask3d, 1, match.clamp(min=0))).sum(1)
    assert torch.equal(C.sum((1, 2)).long(), expected)


def test_correspondence_loss_range():
    n = 5
    match = torch.arange(n)[None]
    perfect = torch.eye(n)[None] / n
    uniform = torch.full((1, n, n), 1.0 / n**2)
    assert torch.allclose(correspondence_loss(perfect, match, kind="linear"), torch.tensor([-1.0]))
    assert torch.allclose(correspondence_loss(uniform, match, kind="linear"), torch.tensor([1.0 - 2.0 / n]))
    wrong = torch.roll(torch.eye(n), 1, 1)[None] / n
    assert torch.allclose(correspondence_loss(wrong, match, kind="linear"), torch.tensor([1.0]))


def test_nll_correspondence_loss_dense_formula_and_values():
    torch.manual_seed(1)
    B, m, n = 3, 6, 8
    P = torch.rand(B, m, n, dtype=torch.float64)
    match = torch.randint(-1, n, (B, m))
    match[0, 0] = 3  # every item has at least one true pair
    match[1, 0] = 2
    match[2, 0] = 1
    mask2d = torch.ones(B, m, dtype=torch.bool)
    mask2d[1, 4:] = False
    mask3d = torch.ones(B, n, dtype=torch.bool)
    mask3d[2, 6:] = False
    P = P * mask2d[:, :, None] * mask3d[:, None, :]
    P = P / P.sum((1, 2), keepdim=True)
    C = correspondence_matrix(match, n, mask2d, mask3d, dtype=P.dtype)
    scale = (mask2d.sum(1) * mask3d.sum(1)).double().sqrt()[:, None, None]
    dense = -(C * torch.log(scale * P.clamp_min(1e-300))).sum((1, 2)) / C.sum((1, 2))
    torch.testing.assert_close(correspondence_loss(P, match, mask2d, mask3d, kind="nll"), dense)
    # Uniform plan: log sqrt(m n); the plan of a permutation: -log sqrt(m n) + log n = 0 for m = n.
    k = 5
    eye = torch.eye(k)[None] / k
    assert torch.allclose(correspondence_loss(torch.full((1, k, k), 1.0 / k**2), torch.arange(k)[None], kind="nll"),
                          torch.tensor([math.log(k)]))
    assert torch.allclose(correspondence_loss(eye, torch.arange(k)[None], kind="nll"), torch.tensor([0.0]), atol=1e-6)
    # No true pair: 0, not NaN.
    assert correspondence_loss(eye, torch.full((1, k), -1), kind="nll").item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        correspondence_loss(eye, torch.arange(k)[None], kind="cross_entropy")


def test_nll_gradient_through_sinkhorn_is_finite_with_vanishing_entries():
    """The loss takes log P: a true pair whose plan entry is ~1e-17 (17 orders below the row's
    mass) must still give a finite gradient through the OT node, of the right sign."""
    torch.manual_seed(2)
    m = n = 40
    M = torch.rand(1, m, n) * 2.0
    M[0, 0, :] = 2.0
    M[0, 0, 5] = 0.0  # row 0 matches column 5; its true match is column 0 (P ~ exp(-20 * 2) / mn)
    M.requires_grad_(True)
    r, c = uniform_marginals(torch.ones(1, m, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), M.dtype)
    P, _ = sinkhorn(M, r, c, lam=20.0, max_iter=100, backward="implicit")
    loss = correspondence_loss(P, torch.arange(m)[None], kind="nll").sum()
    (g,) = torch.autograd.grad(loss, M)
    assert torch.isfinite(g).all()
    assert g[0, 0, 0] > 0  # raising the true pair's cost raises the loss


def test_match_accuracy_counts_row_argmax_on_true_pairs():
    P = torch.tensor([[[0.5, 0.1, 0.0], [0.2, 0.1, 0.3], [0.0, 0.4, 0.9]]])
    match = torch.tensor([[0, 1, -1]])
    assert match_accuracy(P, match).item() == 0.5  # row 0 right, row 1 wrong, row 2 unmatched
    mask3d = torch.tensor([[True, True, False]])
    assert match_accuracy(P, match, mask3d=mask3d).item() == 0.5  # padded column 2 never wins
    mask3d_b = torch.tensor([[True, True, False]])
    P2 = P.clone()
    P2[0, 1, 2] = 5.0  # padding holds garbage: row 1 now picks column 0 (0.2) over 1 (0.1)
    assert match_accuracy(P2, match, mask3d=mask3d_b).item() == 0.5
    assert torch.isnan(match_accuracy(P, torch.full((1, 3), -1))).all()


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
    loss = BlindPnPLoss(corr_weight=2.0, pose_weight=3.0, pose_start_epoch=2, corr_kind="linear")
    early, late = loss(Out(), batch, epoch=1), loss(Out(), batch, epoch=2)
    assert early.pose is None and torch.allclose(early.loss, torch.tensor(-2.0))
    assert torch.allclose(late.pose, torch.tensor(1.0), atol=1e-4)
    assert torch.allclose(late.loss, torch.tensor(-2.0 + 3.0), atol=1e-4)
    assert not BlindPnPLoss(pose_start_epoch=None).pose_active(100)
    nll = BlindPnPLoss(corr_weight=2.0, pose_start_epoch=None)(Out(), batch, epoch=5)  # the default kind
    assert torch.allclose(nll.loss, torch.tensor(0.0), atol=1e-6)  # a perfect plan: -log(sqrt(9) / 3) = 0
    with pytest.raises(ValueError, match="corr_kind"):
        BlindPnPLoss(corr_kind="hinge")
