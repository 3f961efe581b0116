"""Correspondence and pose losses."""

from __future__ import annotations

import math

import torch

from bpnp.geometry.rotations import geodesic_angle, so3_exp
import pytest

from bpnp.nodes.sinkhorn import sinkhorn, uniform_marginals
from bpnp.geometry.correspondences import correspondence_matrix, inlier_precision_recall, match_accuracy, outlier_labels
from bpnp.training.losses import BlindPnPLoss, bin_nll_loss, correspondence_loss, pose_loss


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
    ang = geodesic_angle(R, R_gt)
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


def _bin_problem(seed=0):
    """A small padded batch with 2D and 3D outliers and a bin plan from the OT node."""
    from bpnp.nodes import sinkhorn_with_bins

    g = torch.Generator().manual_seed(seed)
    B, m, n = 2, 6, 7
    M = torch.rand(B, m, n, generator=g, dtype=torch.float64) * 2
    mask2d = torch.ones(B, m, dtype=torch.bool)
    mask2d[1, 5:] = False
    mask3d = torch.ones(B, n, dtype=torch.bool)
    mask3d[1, 6:] = False
    match = torch.tensor([[0, 2, -1, 4, -1, 1], [3, -1, 0, 5, 2, -1]])
    P_aug, _ = sinkhorn_with_bins(M, mask2d, mask3d, torch.tensor(1.0, dtype=torch.float64), tol=1e-12, max_iter=5000)
    return P_aug, match, mask2d, mask3d


def test_outlier_labels_mark_unmatched_points_of_each_side():

    match = torch.tensor([[0, 2, -1, 2], [1, -1, -1, 3]])
    mask2d = torch.tensor([[True, True, True, True], [True, True, True, False]])
    mask3d = torch.tensor([[True, True, True, False], [True, True, True, True]])
    out2d, out3d = outlier_labels(match, 4, mask2d, mask3d)
    assert out2d.tolist() == [[False, False, True, False], [False, True, True, False]]
    # item 0: 3D points 0 and 2 are observed, 1 is not, 3 is padding; item 1: only 1 is observed
    # (2D point 3 that would observe 3D point 3 is padding)
    assert out3d.tolist() == [[False, True, False, False], [True, False, True, True]]


def test_bin_nll_loss_equals_dense_formula():

    P_aug, match, mask2d, mask3d = _bin_problem()
    loss = bin_nll_loss(P_aug, match, mask2d, mask3d)
    out2d, out3d = outlier_labels(match, 7, mask2d, mask3d)
    for b in range(2):
        scale = float(mask2d[b].sum() + mask3d[b].sum())
        terms = []
        for i in range(6):
            if mask2d[b, i] and match[b, i] >= 0:
                terms.append(-math.log(scale * float(P_aug[b, i, match[b, i]])))
            elif out2d[b, i]:
                terms.append(-math.log(scale * float(P_aug[b, i, 7])))
        for j in range(7):
            if out3d[b, j]:
                terms.append(-math.log(scale * float(P_aug[b, 6, j])))
        assert loss[b].item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


def test_bin_nll_loss_is_zero_for_the_perfect_plan_and_used_by_blindpnploss():
    from types import SimpleNamespace


    # 3 2D points (the last an outlier), 3 3D points (the last an outlier): the perfect augmented
    # plan puts each real row's / column's whole mass 1/(m'+n') on its target.
    match = torch.tensor([[1, 0, -1]])
    P = torch.zeros(1, 4, 4, dtype=torch.float64)
    P[0, 0, 1] = P[0, 1, 0] = P[0, 2, 3] = P[0, 3, 2] = 1 / 6
    P[0, 3, 3] = 2 / 6  # the corner takes what the bins have left (marginals 3/6 and 3/6)
    assert bin_nll_loss(P, match).item() == pytest.approx(0.0, abs=1e-12)
    out = SimpleNamespace(P=P[:, :3, :3] / P[:, :3, :3].sum(), P_aug=P)
    terms = BlindPnPLoss(corr_kind="nll")(out, {"match": match}, epoch=0)
    assert terms.corr.item() == pytest.approx(0.0, abs=1e-12)
    P_bad = P.clone()
    P_bad[0, 2, 3], P_bad[0, 2, 0] = 1 / 12, 1 / 12  # the outlier row half matched
    assert bin_nll_loss(P_bad, match).item() == pytest.approx(math.log(2) / 4, rel=1e-12)  # 3 rows + 1 column


def test_bin_nll_loss_gradient_reaches_the_bin_cost():
    from bpnp.nodes import sinkhorn_with_bins

    torch.manual_seed(3)
    M = torch.rand(1, 5, 5, dtype=torch.float64) + 0.5
    z = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 5, dtype=torch.bool)
    match = torch.tensor([[-1, -1, -1, -1, -1]])  # all outliers: the loss must push the bin cost down
    P_aug, _ = sinkhorn_with_bins(M, mask, mask, z, tol=1e-12, max_iter=5000)
    bin_nll_loss(P_aug, match).sum().backward()
    assert z.grad is not None and z.grad.item() > 0


def test_inlier_precision_recall_counts():

    match = torch.tensor([[0, 1, -1, -1]])
    row = torch.tensor([[0.9, 0.2, 0.8, 0.1]])  # predicted inliers: 0 and 2; true: 0 and 1
    col = torch.tensor([[0.9, 0.9, 0.9]])       # all predicted; true: 0 and 1
    pr = inlier_precision_recall(row, col, match)
    assert pr["precision_2d"].item() == pytest.approx(0.5) and pr["recall_2d"].item() == pytest.approx(0.5)
    assert pr["precision_3d"].item() == pytest.approx(2 / 3) and pr["recall_3d"].item() == pytest.approx(1.0)
