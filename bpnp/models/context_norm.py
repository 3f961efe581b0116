r"""Masked normalisation layers for point sets of variable size (padding + boolean masks).

Point features are laid out ``(B, C, N)`` (Conv1d convention); a mask ``(B, N)`` bool marks the
real points (True) and padding (False). Every statistic below is taken over the **real points
only**, and the output at padded positions is exactly 0, so padded values (whatever they hold,
even NaN) never reach a real point's output. The original BPnPNet included padded points in its
statistics, so the answer for one instance changed with the size of the batch it was padded into.

- :func:`masked_mean_var` / :class:`ContextNorm`: context normalisation (Yi et al. 2018),
  per sample and channel over the points, ``(x - mean) / sqrt(var + eps)``, no affine parameters.
- :class:`MaskedBatchNorm`: batch normalisation whose batch statistics are taken over the real
  points of all items (and, optionally, of all DDP ranks). Used by the STN.

Why not ``nn.BatchNorm1d`` in the STN: its statistics would include the padded points (so a batch
padded to 1000 points normalises differently from the same batch padded to 500), and Lightning's
``sync_batchnorm`` would convert it into ``nn.SyncBatchNorm``, which has no mask either. A masked
batch norm keeps the original's architecture (BN with learned affine and running statistics, as in
PointNet) while making the result independent of padding. It is deliberately **not** a subclass of
``nn.modules.batchnorm._BatchNorm`` so that Lightning leaves it alone; it synchronises its own
masked statistics across processes when ``sync`` is on and ``torch.distributed`` is initialised
(differentiably, through :func:`torch.distributed.nn.functional.all_reduce`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["masked_mean_var", "masked_rms_radius", "context_norm", "ContextNorm", "MaskedBatchNorm"]


def _check(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.ndim not in (2, 3):
        raise ValueError(f"x must have shape (B, C, N) or (B, C), got {tuple(x.shape)}")
    if x.ndim == 2:
        if mask is not None:
            raise ValueError("a mask is only meaningful for (B, C, N) inputs")
        return torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
    if mask is None:
        return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    if mask.shape != (x.shape[0], x.shape[2]) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {(x.shape[0], x.shape[2])}, got {mask.dtype} {tuple(mask.shape)}")
    return mask


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (biased) variance over the real points.

    Args:
        x: (B, C, N) features.
        mask: (B, N) bool, True = real point; None = all real.

    Returns:
        ``(mean, var)``, each (B, C, 1). An item with no real point gets mean 0, var 0.
    """
    mask = _check(x, mask)
    w = mask[:, None, :].to(x.dtype)
    xz = torch.where(mask[:, None, :], x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = w.sum(-1, keepdim=True).clamp_min(1)
    mean = xz.sum(-1, keepdim=True) / count
    var = ((xz - mean) * w).square().sum(-1, keepdim=True) / count
    return mean, var


def masked_rms_radius(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked centroid (B, C, 1) and RMS distance to it (B, 1, 1, floored at 1e-8) of the real
    points of (B, C, N) coordinates: the length that makes a point set scale-free."""
    centre, var = masked_mean_var(x, mask)
    return centre, var.sum(1, keepdim=True).sqrt().clamp_min(1e-8)  # mean squared distance = sum of variances


def context_norm(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-3) -> torch.Tensor:
    """Context normalisation ``(x - mean) / sqrt(var + eps)`` per sample and channel over the
    real points; exactly 0 at padded points.

    Args:
        x: (B, C, N) features.
        mask: (B, N) bool, True = real point; None = all real.
        eps: added to the variance (1e-3 as in the original).

    Returns:
        (B, C, N) normalised features.

    Example:
        >>> x = torch.tensor([[[1.0, 3.0, 100.0]]]); m = torch.tensor([[True, True, False]])
        >>> context_norm(x, m, eps=0.0)
        tensor([[[-1.,  1.,  0.]]])
    """
    mask = _check(x, mask)
    mean, var = masked_mean_var(x, mask)
    y = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask[:, None, :], y, torch.zeros((), dtype=x.dtype, device=x.device))


class ContextNorm(nn.Module):
    """Layer form of :func:`context_norm` (no parameters). ``forward(x (B,C,N), mask (B,N))``."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return context_norm(x, mask, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _dist_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class MaskedBatchNorm(nn.Module):
    """Batch normalisation over the real points of a batch (and of all ranks when ``sync``).

    Input ``(B, C, N)`` with a ``(B, N)`` mask, or ``(B, C)`` (one vector per item, no mask). In
    training mode the statistics are the mean and biased variance of the real entries; the
    running statistics (unbiased variance, ``momentum``) are updated only when the batch
    statistics are finite, so a bad batch cannot poison evaluation. In eval mode the running
    statistics are used. Output is 0 at padded points.

    Args:
        num_features: channels C.
        eps, momentum, affine: as in ``nn.BatchNorm1d``.
        sync: synchronise the statistics across processes when ``torch.distributed`` is
            initialised with more than one process (the masked counterpart of
            ``sync_batchnorm``). The network sets it from its ``sync_batchnorm`` option.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True, sync: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.sync = int(num_features), float(eps), float(momentum), bool(sync)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}, sync={self.sync}"

    def _batch_stats(self, x3: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = mask[:, None, :].to(x3.dtype)
        xz = torch.where(mask[:, None, :], x3, torch.zeros((), dtype=x3.dtype, device=x3.device))
        s = xz.sum((0, 2))
        count = w.sum((0, 2))[:1]
        distributed = self.sync and _dist_world() > 1
        if distributed:
            from torch.distributed.nn.functional import all_reduce

            sc = all_reduce(torch.cat([s, count]))
            s, count = sc[:-1], sc[-1:]
        mean = s / count.clamp_min(1)
        sq = ((xz - mean[None, :, None]) * w).square().sum((0, 2))
        if distributed:
            from torch.distributed.nn.functional import all_reduce

            sq = all_reduce(sq)
        var = sq / count.clamp_min(1)
        return mean, var, count

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _check(x, mask)
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {tuple(x.shape)}")
        x3 = x if x.ndim == 3 else x[:, :, None]
        if self.training:
            mean, var, count = self._batch_stats(x3, mask)
            with torch.no_grad():
                n = count.detach()
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                ok = torch.isfinite(mean.detach()).all() & torch.isfinite(unbiased).all() & (n > 1).all()
                new_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean.detach()
                new_var = (1 - self.momentum) * self.running_var + self.momentum * unbiased
                self.running_mean.copy_(torch.where(ok, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(ok, new_var, self.running_var))
                self.num_batches_tracked.add_(ok.long())
        else:
            mean, var = self.running_mean, self.running_var
        y = (x3 - mean[None, :, None]) * torch.rsqrt(var[None, :, None] + self.eps)
        if self.weight is not None:
            y = y * self.weight[None, :, None] + self.bias[None, :, None]
        y = torch.where(mask[:, None, :], y, torch.zeros((), dtype=y.dtype, device=y.device))
        return y if x.ndim == 3 else y[:, :, 0]
