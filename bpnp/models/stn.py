r"""PointNet-style spatial transformer for the 3D branch, masked.

``conv 3->64->128->1024`` (each with batch norm and ReLU), a **masked** max-pool over the real
points, ``FC 1024->512->256`` (batch norm, ReLU) and ``FC 256->9``, reshaped to 3x3 and added to
the identity. The batch norms are :class:`~bpnp.models.context_norm.MaskedBatchNorm` (statistics
over real points only; see that module for why not ``nn.BatchNorm1d``). The last layer starts at
zero so that an untrained STN is exactly the identity. With ``width_scale = 1`` it has 803 k
parameters, as in the original.
"""

from __future__ import annotations

import torch
from torch import nn

from bpnp.models.context_norm import MaskedBatchNorm

__all__ = ["STN3d"]


class STN3d(nn.Module):
    """Learned 3x3 transform of a 3D point set.

    Args:
        channels: conv widths (default 64, 128, 1024).
        fc: hidden FC widths (default 512, 256).
        sync_batchnorm: synchronise the masked batch-norm statistics across DDP processes.

    Forward: ``(points (B, 3, N), mask (B, N) bool) -> T (B, 3, 3)``; the network applies it as
    ``p' = p T`` (row vectors, PointNet's convention).
    """

    def __init__(self, channels: tuple[int, ...] = (64, 128, 1024), fc: tuple[int, ...] = (512, 256), sync_batchnorm: bool = False) -> None:
        super().__init__()
        chans = [3, *channels]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, 1) for a, b in zip(chans[:-1], chans[1:]))
        self.conv_bns = nn.ModuleList(MaskedBatchNorm(b, sync=sync_batchnorm) for b in chans[1:])
        fcs = [chans[-1], *fc]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(fcs[:-1], fcs[1:]))
        self.fc_bns = nn.ModuleList(MaskedBatchNorm(b, sync=sync_batchnorm) for b in fcs[1:])
        self.out = nn.Linear(fcs[-1], 9)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if points.ndim != 3 or points.shape[1] != 3:
            raise ValueError(f"points must have shape (B, 3, N), got {tuple(points.shape)}")
        B = points.shape[0]
        if mask is None:
            mask = torch.ones(B, points.shape[2], dtype=torch.bool, device=points.device)
        zero = torch.zeros((), dtype=points.dtype, device=points.device)
        h = torch.where(mask[:, None, :], points, zero)
        for conv, bn in zip(self.convs, self.conv_bns):
            h = torch.relu(bn(conv(h), mask))
        neg = torch.tensor(-torch.inf, dtype=h.dtype, device=h.device)
        g = torch.where(mask[:, None, :], h, neg).amax(dim=2)
        g = torch.where(mask.any(1, keepdim=True), g, zero)  # an empty item pools to 0
        for fc, bn in zip(self.fcs, self.fc_bns):
            g = torch.relu(bn(fc(g)))
        T = self.out(g).view(B, 3, 3)
        return T + torch.eye(3, dtype=T.dtype, device=T.device)
