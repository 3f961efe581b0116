r"""GoMatch-style attention matcher: per-point features of both sets from local self-attention
and 2D<->3D cross-attention (after Zhou et al., "Is Geometry Enough for Matching in Visual
Localization?", ECCV 2022; our own code).

An alternative to the pair of :class:`~bpnp.models.encoders.PointEncoder` s with the same output
contract: ``(p2d (B, m, 2), p3d (B, n, 3), mask2d (B, m), mask3d (B, n)) -> (f2d (B, C, m),
f3d (B, C, n))``, unit-norm features at real points and exactly 0 at padding, which
:func:`~bpnp.models.network.feature_cost` turns into the cost ``M_ij = ||f2d_i - f3d_j||``. It
takes the raw inputs (it normalises them itself), so the network's 3D normalisation and STN are
not needed in front of it.

What it computes (tokens ``(B, N, C)`` inside, ``C = width``, ``h = heads``):

1. **Embeddings.** 2D: ``e_i = [b_i, (x_i - c)/r]``, ``b_i`` the unit bearing of the
   camera-normalised point (:func:`~bpnp.geometry.bearings.to_bearings`: where it looks from the
   camera) and ``c``, ``r`` the masked centroid and RMS radius of the keypoint set (the set's
   layout, free of its translation and scale). 3D: ``e_j = (X_j - c)/r`` (similarity
   normalisation, as the network's ``normalize_3d``). A two-layer MLP per side maps ``e`` to
   ``C``. Below ``x`` is the normalised coordinate (``(x - c)/r`` in 2D, ``e`` in 3D).
2. **Neighbourhoods, once per forward.** :func:`~bpnp.models.local_geometry.masked_knn` in ``x``
   (the same neighbours as in the input coordinates) gives each point its ``k`` nearest real
   points (itself included). Their offsets ``o_ij = (x_j - x_i)/s``, ``s`` the mean over the real
   points of the distance to the k-th neighbour (so offsets are O(1) whatever the density, the
   same at 256 and at 1000 points), go through a small MLP once: ``g_ij = MLP([o_ij, |o_ij|])``
   in ``R^P``, shared by all blocks.
3. ``blocks`` **blocks**, each a pre-norm transformer-decoder layer per side (``LN`` = LayerNorm;
   each side and sub-layer has its own weights; all updates residual):

   - *local self-attention* over the kNN, with a learned relative-position encoding added to
     keys and values: per head, ``a_ij = softmax_j(q_i . (k_j + A g_ij) / sqrt(d))`` and
     ``u_i = sum_j a_ij (v_j + B g_ij)``, ``A``, ``B`` learned ``d x P`` maps per head and block.
     This is what gives a feature the *shape* around its point (the original encoders only see
     set-wide statistics). Exact but cheap: ``q_i . A g_ij = [q_i, A^T q_i] . [k_j, g_ij]`` and
     ``sum_j a_ij B g_ij = B sum_j a_ij g_ij``, so one SDPA call on ``[k_j, g_ij]``,
     ``[v_j, g_ij]`` does it and no ``(B, N, k, C)`` encoding is formed. The neighbours' keys and
     values are gathered by index into ``(B N, k, local_dim)`` (never a dense ``(B, C, N, N)``
     edge tensor). On a CPU these gathered pair tensors (``2 local_heads (d + P)`` numbers per
     pair), not the FLOPs, are what the layer costs, hence the bottleneck: ``local_dim = C/4``
     and 2 heads by default (4 heads of 8: +0.4 s per training step at b = 8, m = n = 1000 on
     one thread; bench/matcher.py).
   - *cross-attention*: every 2D point attends to all real 3D points and vice versa (both
     directions from the same state), ``softmax_j(q_i . k_j / sqrt(d)) v_j`` with ``heads``
     heads in ``cross_dim`` (default ``C``) dimensions. This lets each 2D point compare its
     local shape against the whole 3D set (and vice versa) before the OT node has to pick a
     partner, which per-point encoders cannot.
   - a feed-forward MLP ``Linear(C, ffn_mult C) -> GELU -> Linear(ffn_mult C, C)``.

   Padded positions are zeroed after every block.
4. **Output**: ``LN``, a linear projection per side, L2 normalisation; 0 at padding.

All attention goes through :func:`torch.nn.functional.scaled_dot_product_attention` with a
boolean mask that drops padded keys and invalid kNN slots. A query row with no valid key can give
NaN (in the backward too, even if the row is discarded afterwards; torch 2.14's CPU kernels
return 0 there, but that is not a contract of every kernel and release), so padded queries of the
self-attention attend to their first kNN slot only, and in the cross-attention an item whose
other side has no real point gets a dummy key (slot 0) and a zero update. Padded coordinates are
replaced by 0 before any use: NaN/Inf padding never reaches a value or a gradient.

Properties (tests/models/test_attention.py): permutation-equivariant on each side (up to ties in
the k-th neighbour distance); padding-invariant (the features, and the gradients w.r.t. real
inputs and parameters, do not depend on what padded slots hold or on how many there are); the
3D features are invariant to translating and scaling the 3D points (not to rotating them); finite
gradients with any padding, including items with fewer than ``k`` or no real points.

Cost per block, ``N = m + n`` points per item: self-attention O(N k local_heads (d + P)) time
and memory for the gathered keys/values plus O(N C local_dim) for the projections;
cross-attention O(m n cross_dim) time, memory at most O(heads m n) per item (the (B, h, m, n)
scores; SDPA's fused CPU kernel does not even keep them); feed-forward O(N ffn_mult C^2). The
kNN: one O(N^2) distance matrix and top-k per side and forward. Defaults (width 128, 3 blocks,
4 heads, k = 16, local_dim 32 in 2 heads, P = 8, ffn_mult 2): 0.97 M parameters (the pair of
original encoders: 1.19 M). Training forward + backward at b = 8, m = n = 1000 (bench/matcher.py,
2-core CPU): 2.2 s on one thread, 1.2 s on two, 1.1x the original encoders with the kNN stem;
``cross_dim=64`` saves 15 %. Roughly half of it is the cross-attention, a quarter to a third the
local self-attention, 15 % the kNN and the embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bpnp.geometry.bearings import to_bearings
from bpnp.models.context_norm import masked_mean_var
from bpnp.models.local_geometry import masked_knn

__all__ = ["AttentionMatcher"]


def _normalised_coords(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D) points with padding already zeroed -> centred on the masked centroid, divided by
    the masked RMS radius (floored at 1e-8); 0 at padding.

    Same values as :func:`~bpnp.models.context_norm.masked_rms_radius`, but the floor is applied
    before the square root: that helper's ``sqrt(0).clamp_min`` has a NaN gradient for an item
    with one real point (or all points equal)."""
    centre, var = masked_mean_var(x.transpose(1, 2), mask)  # (B, D, 1) each
    rms = var.sum(1, keepdim=True).clamp_min(1e-16).sqrt()  # (B, 1, 1)
    y = (x - centre.transpose(1, 2)) / rms
    return torch.where(mask[..., None], y, torch.zeros((), dtype=x.dtype, device=x.device))


class _Neighbourhood:
    """The kNN of one set, computed once per forward and shared by all blocks.

    Attributes:
        flat: (B N k,) int64 row indices of the neighbours into the (B N, .) flattened tokens.
        attn_mask: (B N, 1, 1, k) bool, True = attend (valid neighbour of a real point; padded
            points attend to their first slot only, so that no row is empty); None when every
            slot is attended.
        offsets: (B N, k, D) neighbour offsets ``(x_j - x_i) / s`` (0 on invalid slots).
        k: neighbours per point (``min(knn, N)``).
    """

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, knn: int) -> None:
        B, N, D = x.shape
        with torch.no_grad():
            idx, valid = masked_knn(x.detach().transpose(1, 2), mask, knn)  # (B, N, k)
        k = idx.shape[2]
        base = torch.arange(B, device=x.device)[:, None, None] * N
        self.flat = (idx + base).reshape(-1)
        self.k = k
        attn = valid & mask[:, :, None]
        first = torch.zeros_like(attn)
        first[..., 0] = True
        attn = torch.where(mask[:, :, None], attn, first)
        # None where every slot is attended (no padding, k real neighbours everywhere): SDPA
        # without a mask is the same arithmetic (a mask adds 0 to every score), a little faster.
        self.attn_mask = None if bool(attn.all()) else attn.reshape(B * N, 1, 1, k)
        xf = x.reshape(B * N, D)
        off = xf.index_select(0, self.flat).reshape(B * N, k, D) - xf[:, None, :]
        valid_f = (valid & mask[:, :, None]).reshape(B * N, k, 1)
        off = torch.where(valid_f, off, torch.zeros((), dtype=x.dtype, device=x.device))
        # The clamp keeps the gradient finite at the zero offset of a point to itself.
        dist = off.square().sum(-1).clamp_min(1e-24).sqrt()  # (B N, k)
        dist = torch.where(valid_f[..., 0], dist, torch.zeros((), dtype=x.dtype, device=x.device))
        kth = dist.amax(-1).reshape(B, 1, N)  # distance to the farthest valid neighbour
        scale, _ = masked_mean_var(kth, mask)  # (B, 1, 1)
        scale = scale.clamp_min(1e-8).reshape(B, 1, 1).expand(B, N, 1).reshape(B * N, 1, 1)
        self.offsets = off / scale


class _LocalSelfAttention(nn.Module):
    """Multi-head attention of each point over its kNN with relative-position terms ``A g_ij`` on
    the keys and ``B g_ij`` on the values (module docstring, step 3), in a ``local_dim``-wide
    bottleneck (the gathered ``(B N, k, .)`` tensors are what this layer costs)."""

    def __init__(self, width: int, local_dim: int, heads: int, pos_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.local_dim, self.dropout = heads, local_dim // heads, local_dim, dropout
        self.qkv = nn.Linear(width, 3 * local_dim)
        bound = 1.0 / math.sqrt(pos_dim)
        self.pos_key = nn.Parameter(torch.empty(heads, self.head_dim, pos_dim).uniform_(-bound, bound))
        self.pos_value = nn.Parameter(torch.empty(heads, self.head_dim, pos_dim).uniform_(-bound, bound))
        self.out = nn.Linear(local_dim, width)

    def forward(self, x: torch.Tensor, g: torch.Tensor, nb: _Neighbourhood) -> torch.Tensor:
        B, N, _ = x.shape
        h, d, L, k, P = self.heads, self.head_dim, self.local_dim, nb.k, g.shape[-1]
        qkv = self.qkv(x).reshape(B * N, 3 * L)
        q = qkv[:, :L].reshape(B * N, h, d)
        keys, values = qkv[:, L:].index_select(0, nb.flat).reshape(B * N, k, 2 * L).split(L, -1)
        gh = g[:, :, None, :].expand(B * N, k, h, P)
        keys = torch.cat([keys.reshape(B * N, k, h, d), gh], -1).transpose(1, 2)  # (B N, h, k, d + P)
        values = torch.cat([values.reshape(B * N, k, h, d), gh], -1).transpose(1, 2)
        query = torch.cat([q, torch.einsum("nhd,hdp->nhp", q, self.pos_key)], -1)[:, :, None]  # (B N, h, 1, d + P)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=nb.attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0 / math.sqrt(d))[:, :, 0]  # (B N, h, d + P)
        o = o[..., :d] + torch.einsum("nhp,hdp->nhd", o[..., d:], self.pos_value)
        return self.out(o.reshape(B, N, L))


class _CrossAttention(nn.Module):
    """Multi-head attention of the queries of one set over all real points of the other, in a
    ``cross_dim``-wide space."""

    def __init__(self, width: int, cross_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.cross_dim, self.dropout = heads, cross_dim, dropout
        self.q = nn.Linear(width, cross_dim)
        self.kv = nn.Linear(width, 2 * cross_dim)
        self.out = nn.Linear(cross_dim, width)

    def forward(self, x: torch.Tensor, other: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = x.shape
        h, D = self.heads, self.cross_dim
        q = self.q(x).reshape(B, N, h, D // h).transpose(1, 2)  # (B, h, N, d)
        kv = self.kv(other).reshape(B, other.shape[1], 2, h, D // h)
        keys, values = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, h, N', d)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class _FeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int, dropout: float) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.GELU(),
                         nn.Linear(mult * width, width), nn.Dropout(dropout))


class _Block(nn.Module):
    """One interleaved block: per side local self-attention, then 2D<->3D cross-attention, then a
    feed-forward MLP, each a pre-norm residual update; padding zeroed at the end."""

    def __init__(self, width: int, local_dim: int, local_heads: int, cross_dim: int, heads: int, pos_dim: int,
                 ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.self_attn = nn.ModuleList(_LocalSelfAttention(width, local_dim, local_heads, pos_dim, dropout)
                                       for _ in range(2))
        self.norm_cross = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.cross_attn = nn.ModuleList(_CrossAttention(width, cross_dim, heads, dropout) for _ in range(2))
        self.ffn = nn.ModuleList(_FeedForward(width, ffn_mult, dropout) for _ in range(2))
        self.drop = nn.Dropout(dropout)

    def forward(self, hs, gs, nbs, masks, key_masks, has_points):
        hs = [h + self.drop(att(norm(h), g, nb))
              for h, g, nb, norm, att in zip(hs, gs, nbs, self.norm_self, self.self_attn)]
        cs = [norm(h) for h, norm in zip(hs, self.norm_cross)]
        zero = torch.zeros((), dtype=hs[0].dtype, device=hs[0].device)
        updates = []
        for side in range(2):  # both directions from the same state
            other = 1 - side
            u = self.cross_attn[side](cs[side], cs[other], key_masks[other])
            updates.append(torch.where(has_points[other][:, None, None], u, zero))  # other side empty: no update
        hs = [h + self.drop(u) for h, u in zip(hs, updates)]
        hs = [h + ffn(h) for h, ffn in zip(hs, self.ffn)]
        return [torch.where(mask[..., None], h, zero) for h, mask in zip(hs, masks)]


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, cout))


class AttentionMatcher(nn.Module):
    """GoMatch-style per-point features of both sets (see the module docstring).

    Args:
        width: feature width ``C`` (divisible by ``heads``).
        blocks: interleaved self/cross-attention blocks (0: embeddings and output layer only).
        heads: heads of the cross-attention.
        knn: neighbours of the local self-attention (each point included; capped at the set size).
        dropout: dropout on attention weights and residual updates (training only).
        local_dim: width of the local self-attention's queries/keys/values (divisible by
            ``local_heads``); None = ``width / 4`` rounded down to a multiple of ``local_heads``
            (at least ``local_heads``).
        local_heads: heads of the local self-attention (its cost grows with them, see the module
            docstring).
        cross_dim: width of the cross-attention's queries/keys/values (divisible by ``heads``);
            None = ``width``.
        pos_dim: width ``P`` of the relative-position encoding ``g_ij``.
        pos_hidden: hidden width of the relative-position MLP.
        ffn_mult: hidden width of the feed-forward MLP, in multiples of ``width``.

    Raises:
        ValueError: on a bad hyper-parameter (naming it), and in the forward on malformed input
            (naming the argument).

    Forward: ``(p2d (B, m, 2) camera-normalised image points, p3d (B, n, 3) raw world points,
    mask2d (B, m) bool, mask3d (B, n) bool)`` (a mask of None = all real) ``-> (f2d (B, C, m),
    f3d (B, C, n))``, unit-norm at real points and exactly 0 at padding (whatever it holds).
    """

    def __init__(self, width: int = 128, blocks: int = 3, heads: int = 4, knn: int = 16, dropout: float = 0.0,
                 local_dim: int | None = None, local_heads: int = 2, cross_dim: int | None = None, pos_dim: int = 8,
                 pos_hidden: int = 32, ffn_mult: int = 2) -> None:
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"AttentionMatcher: width must be >= 1, got {width}")
        if int(heads) < 1 or int(width) % int(heads) != 0:
            raise ValueError(f"AttentionMatcher: heads must be >= 1 and divide width {width}, got {heads}")
        if int(knn) < 1:
            raise ValueError(f"AttentionMatcher: knn must be >= 1, got {knn}")
        if int(blocks) < 0:
            raise ValueError(f"AttentionMatcher: blocks must be >= 0, got {blocks}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"AttentionMatcher: dropout must be in [0, 1), got {dropout}")
        for name, v in (("pos_hidden", pos_hidden), ("pos_dim", pos_dim), ("ffn_mult", ffn_mult)):
            if int(v) < 1:
                raise ValueError(f"AttentionMatcher: {name} must be >= 1, got {v}")
        if int(local_heads) < 1:
            raise ValueError(f"AttentionMatcher: local_heads must be >= 1, got {local_heads}")
        if local_dim is None:
            local_dim = int(local_heads) * max(1, int(width) // 4 // int(local_heads))
        if int(local_dim) < 1 or int(local_dim) % int(local_heads) != 0:
            raise ValueError(f"AttentionMatcher: local_dim must be >= 1 and divisible by local_heads {local_heads}, "
                             f"got {local_dim}")
        cross_dim = int(width) if cross_dim is None else cross_dim
        if int(cross_dim) < 1 or int(cross_dim) % int(heads) != 0:
            raise ValueError(f"AttentionMatcher: cross_dim must be >= 1 and divisible by heads {heads}, "
                             f"got {cross_dim}")
        self.width, self.num_blocks, self.heads, self.knn = int(width), int(blocks), int(heads), int(knn)
        self.local_dim, self.local_heads = int(local_dim), int(local_heads)
        self.cross_dim, self.pos_dim = int(cross_dim), int(pos_dim)
        self.embed = nn.ModuleList([_mlp(5, width, width), _mlp(3, width, width)])  # [bearing, 2D layout], 3D
        self.pos = nn.ModuleList([_mlp(3, pos_hidden, pos_dim), _mlp(4, pos_hidden, pos_dim)])  # [offset, |offset|]
        self.blocks = nn.ModuleList(
            _Block(width, int(local_dim), int(local_heads), int(cross_dim), heads, pos_dim, ffn_mult, dropout)
            for _ in range(blocks))
        self.head = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(2))

    def extra_repr(self) -> str:
        return (f"width={self.width}, blocks={self.num_blocks}, heads={self.heads}, knn={self.knn}, "
                f"local_dim={self.local_dim}, local_heads={self.local_heads}, cross_dim={self.cross_dim}, "
                f"pos_dim={self.pos_dim}")

    def _check(self, p2d, p3d, mask2d, mask3d):
        for name, x, dim in (("p2d", p2d, 2), ("p3d", p3d, 3)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 3 or x.shape[2] != dim:
                raise ValueError(f"AttentionMatcher: {name} must be a floating-point tensor of shape (B, N, {dim}), "
                                 f"got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
            if x.shape[1] == 0:
                raise ValueError(f"AttentionMatcher: {name} holds no points (shape {tuple(x.shape)})")
        if p3d.shape[0] != p2d.shape[0]:
            raise ValueError(f"AttentionMatcher: p3d batch size {p3d.shape[0]} differs from p2d's {p2d.shape[0]}")
        if p3d.dtype != p2d.dtype or p3d.device != p2d.device:
            raise ValueError(f"AttentionMatcher: p3d is {p3d.dtype} on {p3d.device} but p2d is {p2d.dtype} "
                             f"on {p2d.device}")
        out = []
        for name, mask, x in (("mask2d", mask2d, p2d), ("mask3d", mask3d, p3d)):
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            elif not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == x.shape[:2]
                      and mask.device == x.device):
                got = (f"{mask.dtype} {tuple(mask.shape)} on {mask.device}" if isinstance(mask, torch.Tensor)
                       else type(mask).__name__)
                raise ValueError(f"AttentionMatcher: {name} must be a bool tensor of shape {tuple(x.shape[:2])} "
                                 f"on {x.device}, got {got}")
            out.append(mask)
        return out

    def forward(self, p2d: torch.Tensor, p3d: torch.Tensor, mask2d: torch.Tensor | None = None,
                mask3d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mask2d, mask3d = self._check(p2d, p3d, mask2d, mask3d)
        masks = (mask2d, mask3d)
        zero = torch.zeros((), dtype=p2d.dtype, device=p2d.device)
        p2z = torch.where(mask2d[..., None], p2d, zero)  # NaN/Inf padding never reaches a value or a gradient
        p3z = torch.where(mask3d[..., None], p3d, zero)
        x2, x3 = _normalised_coords(p2z, mask2d), _normalised_coords(p3z, mask3d)
        e2 = torch.cat([to_bearings(p2z), x2], -1)
        hs = [torch.where(mask[..., None], embed(e), zero) for e, embed, mask in zip((e2, x3), self.embed, masks)]

        nbs, gs = [], []
        for x, mask, pos in zip((x2, x3), masks, self.pos):
            nb = _Neighbourhood(x, mask, self.knn)
            off = nb.offsets
            length = off.square().sum(-1, keepdim=True).clamp_min(1e-24).sqrt()
            nbs.append(nb)
            gs.append(pos(torch.cat([off, length], -1)))  # (B N, k, P)
        has_points = [mask.any(1) for mask in masks]
        key_masks = []
        for mask, has in zip(masks, has_points):  # an empty side gets a dummy key (slot 0): no NaN row
            if bool(mask.all()):  # no padding: no mask (the same scores, SDPA's faster path)
                key_masks.append(None)
                continue
            dummy = torch.zeros_like(mask)
            dummy[:, 0] = ~has
            key_masks.append((mask | dummy)[:, None, None, :])

        for block in self.blocks:
            hs = block(hs, gs, nbs, masks, key_masks, has_points)
        feats = []
        for h, head, mask in zip(hs, self.head, masks):
            f = F.normalize(head(h), dim=-1, eps=1e-12)
            feats.append(torch.where(mask[..., None], f, zero).transpose(1, 2).contiguous())
        return feats[0], feats[1]
