r"""Local-geometry stem: what a point's k nearest neighbours look like, as a per-point feature.

The original encoders (context-normalised residual blocks) let a point meet the others only
through per-channel means and variances over the whole set, so a point's feature can describe
where it lies in the set but hardly the shape around it. Matching an image point to a 3D point is
mostly a matter of local shape, so this optional stem (``knn > 0`` in
:class:`~bpnp.models.encoders.PointEncoder`) adds, to the first layer's output, an EdgeConv /
PointNet++-style encoding of each point's neighbourhood:

.. math::
    s_i = W_3 \max_{j \in \mathrm{kNN}(i)} \mathrm{ReLU}(W_2\, \mathrm{ReLU}(W_1 e_{ij})), \qquad
    e_{ij} = \big(\tfrac{x_j - x_i}{r},\ \tfrac{\|x_j - x_i\|}{r}\big),

with ``r`` a length of the set (so the encoding is invariant to the set's translation and
scale, as an image of an object is at any distance) and the max over the real neighbours only.
``scale="radius"`` takes the set's masked RMS radius; ``scale="neighbour"`` the mean, over the
real points, of the distance to the k-th nearest neighbour, which also makes the offsets
invariant to the density (the same surface sampled with 4x the points in 2D has neighbourhoods
half as wide).
Padded points are never anyone's neighbour and get a zero stem output; the stem is
permutation-equivariant (up to ties in the k-th distance, which real data does not have).

Neighbourhoods in the image and in 3D are not the same sets (projection brings points at
different depths together), which is why the network learns the encoding rather than comparing
the neighbourhoods directly. Cost: an ``(N, N)`` distance matrix per item and two small layers
on ``N k`` edges (hidden width 64).
"""

from __future__ import annotations

import torch
from torch import nn

from bpnp.geometry.selection import top_k
from bpnp.models.context_norm import masked_mean_var, masked_rms_radius

__all__ = ["KNNStem", "masked_knn"]


def masked_knn(x: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each point's ``k`` nearest real points (itself included).

    Args:
        x: (B, C, N) coordinates.
        mask: (B, N) bool, True = real point.
        k: neighbours per point; capped at N.

    Returns:
        ``(idx, valid)``: (B, N, k) int64 neighbour indices and (B, N, k) bool, False where an item
        has fewer than k real points (those slots hold some padded index and must be ignored).
    """
    k = min(int(k), x.shape[2])
    xt = x.transpose(1, 2)  # (B, N, C)
    d2 = torch.cdist(xt, xt).square()
    d2 = d2.masked_fill(~mask[:, None, :], float("inf"))
    dist, idx = top_k(d2, k, largest=False)
    return idx, torch.isfinite(dist)


class KNNStem(nn.Module):
    """Per-point encoding of the k-nearest-neighbour offsets, see the module docstring.

    Args:
        in_channels: coordinate channels (2 or 3).
        width: output channels (the encoder width).
        k: neighbours per point (including the point itself).
        hidden: width of the two edge layers.
        scale: ``"radius"`` (the set's RMS radius) or ``"neighbour"`` (the set's mean k-th
            neighbour distance), see the module docstring.

    Forward: ``(x (B, C, N), mask (B, N) bool) -> (B, width, N)``, 0 at padded points.
    """

    SCALES = ("radius", "neighbour")

    def __init__(self, in_channels: int, width: int, k: int = 16, hidden: int = 64, scale: str = "radius") -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if scale not in self.SCALES:
            raise ValueError(f"scale must be one of {self.SCALES}, got {scale!r}")
        self.k, self.scale = int(k), scale
        self.edge = nn.Sequential(
            nn.Conv2d(in_channels + 1, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        )
        self.out = nn.Conv1d(hidden, width, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, C, N = x.shape
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        m3 = mask[:, None, :]
        xz = torch.where(m3, x, zero)
        idx, valid = masked_knn(xz, mask, self.k)
        k = idx.shape[2]
        neighbours = torch.gather(xz, 2, idx.reshape(B, 1, N * k).expand(B, C, N * k)).reshape(B, C, N, k)
        offset = neighbours - xz[..., None]  # (B, C, N, k)
        offset = offset / self._set_length(xz, mask, offset, valid)[..., None]
        # the clamp keeps the gradient finite at the zero offset of the point to itself
        length = offset.square().sum(1, keepdim=True).clamp_min(1e-12).sqrt()
        e = torch.cat([offset, length], 1)  # (B, C + 1, N, k)
        h = self.edge(e)
        h = h.masked_fill(~valid[:, None], float("-inf")).amax(3)  # the point itself is always valid
        h = torch.where(m3, h, zero)
        return torch.where(m3, self.out(h), zero)

    def _set_length(self, xz, mask, offset, valid) -> torch.Tensor:
        """(B, 1, 1) length that scales the offsets (B, C, N, k) of each set (module docstring)."""
        if self.scale == "radius":
            return masked_rms_radius(xz, mask)[1]
        # farthest valid neighbour of each point (an item with fewer than k points: its farthest);
        # the clamp keeps the gradient finite where that is the point itself
        length = offset.square().sum(1).clamp_min(1e-12).sqrt().masked_fill(~valid, 0.0)  # (B, N, k)
        mean, _ = masked_mean_var(length.amax(2)[:, None, :], mask)  # (B, 1, 1)
        return mean.clamp_min(1e-8)
