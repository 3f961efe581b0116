r"""Training losses of BlindPnPNet.

- Correspondence loss, two kinds (``corr_kind``):

  * ``linear`` (the original's): :math:`L_c = \sum_{ij} (1 - 2 C_{ij}) P_{ij} = 1 - 2 \sum_{ij}
    C_{ij} P_{ij}` per item (P sums to 1), in ``[-1, 1]``, with ``C`` the ground-truth
    correspondence matrix (``C[i, match[i]] = 1`` for real 2D inliers).
  * ``nll``: the mean over true pairs of :math:`-\log(\sqrt{m' n'} P_{ij})` (m', n' the real set
    sizes), i.e. the average of the row and column negative log-likelihoods of the true match
    under the transport plan's conditionals ``m' P[i, :]`` and ``n' P[:, j]``. Its gradient does
    not shrink with the mass on the true pairs: with the linear loss, a network whose plan puts
    ~1 % of each row on the true match gets a ~100x weaker signal from those rows (README.md,
    "The main job", has the measured comparison and its command).
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

__all__ = ["correspondence_matrix", "correspondence_loss", "match_accuracy", "CORR_KINDS", "rotation_angle", "pose_loss", "BlindPnPLoss", "LossTerms"]


def correspondence_matrix(match: torch.Tensor, n: int, mask2d: torch.Tensor | None = None, mask3d: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ground-truth correspondence matrix ``C`` (B, m, n) from ``match`` (B, m) (-1 = none).

    ``C[b, i, match[b, i]] = 1`` for real 2D points with ``match >= 0`` (and a real 3D point);
    everything else is 0.
    """
    if match.ndim != 2:
        raise ValueError(f"match must have shape (B, m), got {tuple(match.shape)}")
    B, m = match.shape
    idx, valid = _true_pairs(match, n, mask2d, mask3d)
    C = torch.zeros(B, m, n, dtype=dtype, device=match.device)
    C.scatter_(2, idx[..., None], valid[..., None].to(dtype))
    return C


CORR_KINDS = ("linear", "nll")

#: Floor of P inside the log of the NLL loss: far below any plan entry that carries signal, above
#: float32's denormal range (so the backward's 1/P stays finite and normal).
_NLL_P_FLOOR = 1e-30


def _true_pairs(match: torch.Tensor, n: int, mask2d: torch.Tensor | None,
                mask3d: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, valid), both (B, m): the matched 3D index of each 2D point (clamped into range) and
    whether (i, match[i]) is a true pair of two real points."""
    valid = match >= 0
    if mask2d is not None:
        valid = valid & mask2d
    idx = match.clamp(0, max(n - 1, 0))
    if mask3d is not None:
        valid = valid & torch.gather(mask3d, 1, idx)
    return idx, valid


def correspondence_loss(P: torch.Tensor, match: torch.Tensor, mask2d: torch.Tensor | None = None,
                        mask3d: torch.Tensor | None = None, kind: str = "nll") -> torch.Tensor:
    """Per-item correspondence loss, shape (B,), by a gather on the true pairs (O(m), no dense C).

    ``linear``: ``sum((1 - 2C) * P)`` computed as ``sum(P) - 2 sum(C * P)``.
    ``nll``: mean over true pairs of ``-log(sqrt(m' n') P_ij)`` (0 for an item without true pairs).
    """
    B, m, n = P.shape
    idx, valid = _true_pairs(match, n, mask2d, mask3d)
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


def match_accuracy(P: torch.Tensor, match: torch.Tensor, mask2d: torch.Tensor | None = None,
                   mask3d: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item fraction of true pairs (i, match[i]) whose 3D point is the row maximum of P,
    shape (B,) (NaN for an item without true pairs). Padded 3D columns never win the argmax."""
    B, m, n = P.shape
    idx, valid = _true_pairs(match, n, mask2d, mask3d)
    scores = P.detach()
    if mask3d is not None:
        scores = scores.masked_fill(~mask3d[:, None, :], -1.0)
    hit = (scores.argmax(2) == idx) & valid
    return hit.sum(1).to(P.dtype) / valid.sum(1).to(P.dtype)


def rotation_angle(R: torch.Tensor, R_gt: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Geodesic angle (radians) between rotations (*, 3, 3), ``2 asin(||R - R_gt||_F / sqrt 8)``."""
    d = (R - R_gt).square().sum((-2, -1))
    s = (torch.sqrt(d + eps) / math.sqrt(8.0)).clamp(max=1.0)
    return 2.0 * torch.asin(s)


def pose_loss(R: torch.Tensor, t: torch.Tensor, R_gt: torch.Tensor, t_gt: torch.Tensor,
              rot_cap: float = math.pi / 2, t_cap: float = 1.0) -> torch.Tensor:
    """Per-item ``min(angle(R, R_gt), rot_cap) + min(||t - t_gt||, t_cap)``, shape (B,)."""
    ang = rotation_angle(R, R_gt).clamp(max=rot_cap)
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
        corr = correspondence_loss(out.P, batch["match"], batch.get("mask2d"), batch.get("mask3d"), self.corr_kind).mean()
        loss = self.corr_weight * corr
        pose = None
        if self.pose_active(epoch):
            pose = pose_loss(out.R, out.t, batch["R"].to(out.R.dtype), batch["t"].to(out.t.dtype), self.rot_cap, self.t_cap).mean()
            loss = loss + self.pose_weight * pose
        return LossTerms(loss=loss, corr=corr, pose=pose)
