r"""Training losses of BlindPnPNet.

- Correspondence loss, two kinds (``corr_kind``):

  * ``linear`` (the original's): :math:`L_c = \sum_{ij} (1 - 2 C_{ij}) P_{ij} = 1 - 2 \sum_{ij}
    C_{ij} P_{ij}` per item (P sums to 1), in ``[-1, 1]``, with ``C`` the ground-truth
    correspondence matrix (``C[i, match[i]] = 1`` for real 2D inliers).
  * ``nll``: without outlier bins, the mean over true pairs of :math:`-\log(\sqrt{m' n'} P_{ij})` (m', n' the real set
    sizes), i.e. the average of the row and column negative log-likelihoods of the true match
    under the transport plan's conditionals ``m' P[i, :]`` and ``n' P[:, j]``. Its gradient does
    not shrink with the mass on the true pairs: with the linear loss, a network whose plan puts
    ~1 % of each row on the true match gets a ~100x weaker signal from those rows (docs/previous_model.md,
    "The main job", has the measured comparison and its command).
    With outlier bins (the network's ``P_aug`` (B, m+1, n+1), :func:`bpnp.nodes.sinkhorn_with_bins`),
    the NLL of SuperGlue / GoMatch: the mean, over every true pair, every 2D outlier and every
    3D outlier, of :math:`-\log` of the row (column) conditional of the augmented plan at the
    true target: the true 3D point of a matched 2D point, the bin column for a 2D outlier, the bin
    row for a 3D outlier (a real 3D point no real 2D inlier observes). Every real row and column
    of the augmented plan carries the mass ``1 / (m' + n')``, so the conditional is
    ``(m' + n') P_aug``. :func:`bin_nll_loss`.
- Pose loss :math:`\min(\angle(R, R_{gt}), \text{rot\_cap}) + \min(\|t - t_{gt}\|, \text{t\_cap})`
  with the caps ``pi/2`` and 1 of the original. The angle is computed as
  ``2 asin(||R - R_gt||_F / sqrt(8))``, whose gradient stays finite at a zero error (``acos`` of
  the trace has an infinite slope there).

Both are averaged over the batch; :class:`BlindPnPLoss` combines them with configurable weights
and switches the pose term on from a given epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bpnp.geometry.correspondences import outlier_labels, true_pairs
from bpnp.so3 import angle_from_chordal, chordal_distance

__all__ = ["correspondence_loss", "bin_nll_loss", "CORR_KINDS", "pose_loss", "BlindPnPLoss", "LossTerms"]


CORR_KINDS = ("linear", "nll")

#: Floor of P inside the log of the NLL loss: far below any plan entry that carries signal, above
#: float32's denormal range (so the backward's 1/P stays finite and normal).
_NLL_P_FLOOR = 1e-30


def correspondence_loss(P: torch.Tensor, match: torch.Tensor, mask2d: torch.Tensor | None = None,
                        mask3d: torch.Tensor | None = None, kind: str = "nll") -> torch.Tensor:
    """Per-item correspondence loss, shape (B,), by a gather on the true pairs (O(m), no dense C).

    ``linear``: ``sum((1 - 2C) * P)`` computed as ``sum(P) - 2 sum(C * P)``.
    ``nll``: mean over true pairs of ``-log(sqrt(m' n') P_ij)`` (0 for an item without true pairs).
    """
    B, m, n = P.shape
    idx, valid = true_pairs(match, n, mask2d, mask3d)
    p_true = torch.gather(P, 2, idx[..., None])[..., 0]
    w = valid.to(P.dtype)
    if kind == "linear":
        return P.sum((1, 2)) - 2.0 * (p_true * w).sum(1)
    if kind != "nll":
        raise ValueError(f"correspondence_loss: kind must be one of {CORR_KINDS}, got {kind!r}")
    m_real = mask2d.sum(1).to(P.dtype) if mask2d is not None else P.new_full((B,), float(m))
    n_real = mask3d.sum(1).to(P.dtype) if mask3d is not None else P.new_full((B,), float(n))
    log_scale = 0.5 * torch.log((m_real * n_real).clamp_min(1.0))
    nll = -(torch.log(p_true.clamp_min(_NLL_P_FLOOR)) + log_scale[:, None])
    return (nll * w).sum(1) / w.sum(1).clamp_min(1.0)


def bin_nll_loss(P_aug: torch.Tensor, match: torch.Tensor, mask2d: torch.Tensor | None = None,
                 mask3d: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item negative log-likelihood of an augmented plan with outlier bins, shape (B,).

    Args:
        P_aug: (B, m + 1, n + 1) plan whose last row / column are the bins, every real row and
            column of mass ``1 / (m' + n')`` (:func:`bpnp.nodes.sinkhorn_with_bins`).
        match: (B, m) true 3D index of each 2D point, -1 for none.
        mask2d, mask3d: (B, m) / (B, n) bool, True = real point (None = all real).

    Returns:
        The mean over true pairs, 2D outliers and 3D outliers of ``-log((m' + n') P_aug[target])``
        (module docstring); 0 for an item with no real point.
    """
    B, m1, n1 = P_aug.shape
    m, n = m1 - 1, n1 - 1
    if match.shape != (B, m):
        raise ValueError(f"bin_nll_loss: match must have shape {(B, m)} for P_aug of shape {tuple(P_aug.shape)}, "
                         f"got {tuple(match.shape)}")
    idx, valid = true_pairs(match, n, mask2d, mask3d)
    out2d, out3d = outlier_labels(match, n, mask2d, mask3d)
    # Row target: the true 3D point for an inlier, the bin column (index n) for an outlier.
    target = torch.where(valid, idx, torch.full_like(idx, n))
    p_row = torch.gather(P_aug[:, :m, :], 2, target[..., None])[..., 0]
    p_col = P_aug[:, m, :n]
    w_row = (valid | out2d).to(P_aug.dtype)
    w_col = out3d.to(P_aug.dtype)
    m_real = w_row.new_full((B,), float(m)) if mask2d is None else mask2d.sum(1).to(P_aug.dtype)
    n_real = w_row.new_full((B,), float(n)) if mask3d is None else mask3d.sum(1).to(P_aug.dtype)
    log_scale = torch.log((m_real + n_real).clamp_min(1.0))[:, None]
    nll_row = -(torch.log(p_row.clamp_min(_NLL_P_FLOOR)) + log_scale)
    nll_col = -(torch.log(p_col.clamp_min(_NLL_P_FLOOR)) + log_scale)
    total = (nll_row * w_row).sum(1) + (nll_col * w_col).sum(1)
    return total / (w_row.sum(1) + w_col.sum(1)).clamp_min(1.0)


def pose_loss(R: torch.Tensor, t: torch.Tensor, R_gt: torch.Tensor, t_gt: torch.Tensor,
              rot_cap: float = math.pi / 2, t_cap: float = 1.0) -> torch.Tensor:
    """Per-item ``min(angle(R, R_gt), rot_cap) + min(||t - t_gt||, t_cap)``, shape (B,)."""
    # The geodesic angle through the chordal distance: its gradient stays finite at R = R_gt.
    ang = angle_from_chordal(chordal_distance(R, R_gt, eps=1e-12)).clamp(max=rot_cap)
    te = torch.sqrt((t - t_gt).square().sum(-1) + 1e-12).clamp(max=t_cap)
    return ang + te


@dataclass
class LossTerms:
    loss: torch.Tensor
    """scalar total loss."""
    corr: torch.Tensor
    """scalar mean correspondence loss."""
    pose: torch.Tensor | None
    """scalar mean pose loss, or None when the pose term is off."""


class BlindPnPLoss:
    """``w_corr * L_c + w_pose * L_pose`` (batch means); the pose term is used from epoch
    ``pose_start_epoch`` on (``None`` = never).

    Args:
        corr_weight, pose_weight: weights.
        corr_kind: ``nll`` (default) or ``linear`` (the original's); see the module docstring.
        pose_start_epoch: first epoch (0-based) with the pose term, or None to disable it.
        rot_cap: cap of the rotation term, radians (pi/2).
        t_cap: cap of the translation term, scene units (1).
    """

    def __init__(self, corr_weight: float = 1.0, pose_weight: float = 1.0, pose_start_epoch: int | None = None,
                 rot_cap: float = math.pi / 2, t_cap: float = 1.0, corr_kind: str = "nll") -> None:
        if corr_kind not in CORR_KINDS:
            raise ValueError(f"BlindPnPLoss: corr_kind must be one of {CORR_KINDS}, got {corr_kind!r}")
        self.corr_kind = corr_kind
        self.corr_weight, self.pose_weight = float(corr_weight), float(pose_weight)
        self.pose_start_epoch = None if pose_start_epoch is None else int(pose_start_epoch)
        self.rot_cap, self.t_cap = float(rot_cap), float(t_cap)

    def pose_active(self, epoch: int) -> bool:
        return self.pose_weight > 0 and self.pose_start_epoch is not None and epoch >= self.pose_start_epoch

    def __call__(self, out, batch, epoch: int) -> LossTerms:
        P_aug = getattr(out, "P_aug", None)
        if P_aug is not None and self.corr_kind == "nll":
            corr = bin_nll_loss(P_aug, batch["match"], batch.get("mask2d"), batch.get("mask3d")).mean()
        else:
            corr = correspondence_loss(out.P, batch["match"], batch.get("mask2d"), batch.get("mask3d"), self.corr_kind).mean()
        loss = self.corr_weight * corr
        pose = None
        if self.pose_active(epoch):
            pose = pose_loss(out.R, out.t, batch["R"].to(out.R.dtype), batch["t"].to(out.t.dtype), self.rot_cap, self.t_cap).mean()
            loss = loss + self.pose_weight * pose
        return LossTerms(loss=loss, corr=corr, pose=pose)
