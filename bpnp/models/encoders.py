r"""Per-point encoders: context-normalised residual blocks (BPnPNet / OANet style).

An encoder maps a point set ``(B, C_in, N)`` with a mask ``(B, N)`` to per-point features
``(B, width, N)``: one pointwise ``Conv1d(C_in -> width)``, then ``depth`` residual blocks

.. math::
    h = \mathrm{conv}_1(x), \quad h = \mathrm{ReLU}(\mathrm{CN}(\mathrm{conv}_2(h))), \quad
    \mathrm{out} = \mathrm{ReLU}(\mathrm{CN}(\mathrm{conv}_3(h))) + x,

with CN the masked context normalisation of :mod:`bpnp.models.context_norm`. All convolutions
are pointwise (kernel 1), so a point only meets the others through the CN statistics, which
exclude padding: the encoder is permutation-equivariant and padding-invariant. The ReLU after the
inner CN (the reference's formula has none there) keeps the block nonlinear between its two
normalised layers. At width 128, depth 12 a block has 3 x 16,512 parameters (595 k per encoder).
"""

from __future__ import annotations

import torch
from torch import nn

from bpnp.models.context_norm import context_norm
from bpnp.models.local_geometry import KNNStem

__all__ = ["ResidualCNBlock", "PointEncoder"]


class ResidualCNBlock(nn.Module):
    """One residual block ``out = ReLU(CN(conv3(ReLU(CN(conv2(conv1(x))))))) + x``."""

    def __init__(self, width: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 1)
        self.conv2 = nn.Conv1d(width, width, 1)
        self.conv3 = nn.Conv1d(width, width, 1)
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = torch.relu(context_norm(self.conv2(h), mask, self.eps))
        h = torch.relu(context_norm(self.conv3(h), mask, self.eps))
        return h + x


class PointEncoder(nn.Module):
    """Point-set encoder with L2-normalised output features.

    Args:
        in_channels: input channels (2 for image points, 3 for 3D points).
        width: feature width (128 in the original).
        depth: number of residual blocks (12 in the original).
        eps: context-normalisation epsilon (1e-3 in the original).
        knn: 0 (the original) or the neighbours of the local-geometry stem
            (:class:`~bpnp.models.local_geometry.KNNStem`) added to the first layer's output.
        knn_scale: the stem's offset scale, ``"radius"`` or ``"neighbour"`` (``KNNStem``).

    Forward: ``(x (B, C_in, N), mask (B, N) bool) -> (B, width, N)``, unit-norm features at real
    points and exactly 0 at padded points (whatever the padded input holds).
    """

    def __init__(self, in_channels: int, width: int = 128, depth: int = 12, eps: float = 1e-3, knn: int = 0,
                 knn_scale: str = "radius") -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or depth < 0 or knn < 0:
            raise ValueError(f"need in_channels >= 1, width >= 1, depth >= 0, knn >= 0, got {in_channels}, {width}, {depth}, {knn}")
        if knn_scale not in KNNStem.SCALES:  # checked even without a stem: a typo should not pass silently
            raise ValueError(f"knn_scale must be one of {KNNStem.SCALES}, got {knn_scale!r}")
        self.conv_in = nn.Conv1d(in_channels, width, 1)
        self.stem = KNNStem(in_channels, width, knn, scale=knn_scale) if knn > 0 else None
        self.blocks = nn.ModuleList(ResidualCNBlock(width, eps) for _ in range(depth))
        self.in_channels, self.width, self.depth = in_channels, width, depth

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, N), got {tuple(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        m3 = mask[:, None, :]
        x = torch.where(m3, x, zero)
        h = self.conv_in(x)
        if self.stem is not None:
            h = h + self.stem(x, mask)
        for block in self.blocks:
            # Zeroing padded positions keeps them finite through any depth (they never feed the
            # real points anyway: convolutions are pointwise and CN statistics are masked).
            h = torch.where(m3, block(h, mask), zero)
        f = nn.functional.normalize(h, dim=1, eps=1e-12)
        return torch.where(m3, f, zero)
