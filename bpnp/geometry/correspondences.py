"""Ground-truth correspondences of a blind-PnP instance and the metrics of a soft assignment
against them, shared by the training losses, the training/validation logs and evaluation.

``match`` (B, m) int64 holds the true 3D index of each 2D point (-1 = a 2D outlier, or
padding); masks (B, m) / (B, n) are bool, True = a real point.
"""

from __future__ import annotations

import torch

__all__ = ["true_pairs", "correspondence_matrix", "outlier_labels", "match_accuracy", "inlier_precision_recall"]


def true_pairs(match: torch.Tensor, n: int, mask2d: torch.Tensor | None,
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

def correspondence_matrix(match: torch.Tensor, n: int, mask2d: torch.Tensor | None = None, mask3d: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ground-truth correspondence matrix ``C`` (B, m, n) from ``match`` (B, m) (-1 = none).

    ``C[b, i, match[b, i]] = 1`` for real 2D points with ``match >= 0`` (and a real 3D point);
    everything else is 0.
    """
    if match.ndim != 2:
        raise ValueError(f"match must have shape (B, m), got {tuple(match.shape)}")
    B, m = match.shape
    idx, valid = true_pairs(match, n, mask2d, mask3d)
    C = torch.zeros(B, m, n, dtype=dtype, device=match.device)
    C.scatter_(2, idx[..., None], valid[..., None].to(dtype))
    return C

def outlier_labels(match: torch.Tensor, n: int, mask2d: torch.Tensor | None = None,
                   mask3d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth outliers of each side: ``(out2d (B, m), out3d (B, n))`` bool.

    A real 2D point is an outlier when it has no true pair (``match = -1``, or its target is
    padding); a real 3D point is an outlier when no real 2D point's true pair ends on it.
    Padded points are neither.
    """
    B, m = match.shape
    idx, valid = true_pairs(match, n, mask2d, mask3d)
    real2d = mask2d if mask2d is not None else torch.ones_like(valid)
    real3d = mask3d if mask3d is not None else torch.ones(B, n, dtype=torch.bool, device=match.device)
    hits = torch.zeros(B, n, dtype=torch.long, device=match.device)
    hits.scatter_add_(1, idx, valid.long())
    return real2d & ~valid, real3d & (hits == 0)

def inlier_precision_recall(row_inlier: torch.Tensor, col_inlier: torch.Tensor, match: torch.Tensor,
                            mask2d: torch.Tensor | None = None, mask3d: torch.Tensor | None = None,
                            threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Precision and recall of the bins' inlier decision, per item and side.

    A real point is predicted an inlier when its inlier probability (1 - its bin mass) exceeds
    ``threshold``. Returns ``{"precision_2d", "recall_2d", "precision_3d", "recall_3d"}``, each
    (B,), NaN where undefined (no predicted / no true inlier on that side).
    """
    B, m = match.shape
    n = col_inlier.shape[1]
    out2d, out3d = outlier_labels(match, n, mask2d, mask3d)
    real2d = mask2d if mask2d is not None else torch.ones_like(out2d)
    real3d = mask3d if mask3d is not None else torch.ones_like(out3d)
    result = {}
    for side, prob, real, out in (("2d", row_inlier, real2d, out2d), ("3d", col_inlier, real3d, out3d)):
        pred = (prob.detach() > threshold) & real
        true = real & ~out
        tp = (pred & true).sum(1).float()
        result[f"precision_{side}"] = tp / pred.sum(1).float()  # 0/0 = NaN: undefined
        result[f"recall_{side}"] = tp / true.sum(1).float()
    return result


def match_accuracy(P: torch.Tensor, match: torch.Tensor, mask2d: torch.Tensor | None = None,
                   mask3d: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item fraction of true pairs (i, match[i]) whose 3D point is the row maximum of P,
    shape (B,) (NaN for an item without true pairs). Padded 3D columns never win the argmax."""
    B, m, n = P.shape
    idx, valid = true_pairs(match, n, mask2d, mask3d)
    scores = P.detach()
    if mask3d is not None:
        scores = scores.masked_fill(~mask3d[:, None, :], -1.0)
    hit = (scores.argmax(2) == idx) & valid
    return hit.sum(1).to(P.dtype) / valid.sum(1).to(P.dtype)
