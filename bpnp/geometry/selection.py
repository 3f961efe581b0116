r"""The ``k`` largest or smallest entries along the last dimension: :func:`torch.topk`'s values,
selected the way torch's CPU kernel is fastest at.

Why our own: on a CPU, ``torch.topk`` selects each row by ``nth_element`` and a sort of the first
``k`` while the row has fewer than ``64 k`` entries, and by a partial (heap) sort from ``64 k`` on
(``topk_impl_loop`` in ``aten/src/ATen/native/TopKImpl.h`` of torch 2.x). Two shapes of this
project sit badly there (``python bench/selection.py`` times both against ``torch.topk``):

- **rows just below the switch**: a (1000, 1000) top-16 (the neighbour distances of one
  1,000-point set, which the matcher's kNN, RANSAC's guided sampling and the pose search's row
  support each need) takes 10 ms on one thread, 5.7 ms once each row is padded to 1,024 entries
  with the worst value. Rows of ``40 k`` to ``64 k`` entries are padded to ``64 k``.
- **one very long row**: RANSAC's candidates, the 1,000 largest of the ``m n`` entries of P
  (48 ms at m = n = 2,000). From ``2^14`` entries per row on, the row's columns are split into
  ``g`` strided groups of ``s = round(sqrt(N / k))`` (group ``j``: columns ``j, j + g, ...``;
  the ``N - s g`` left over are candidates outright). The ``k`` groups with the best extreme
  hold every entry of a top-k: with ``v`` the k-th best value, a group whose extreme beats ``v``
  holds an entry that beats ``v``, and fewer than ``k`` entries do, so every such group is
  chosen and with them every entry better than ``v``; the other chosen groups (or, if too few,
  every group holding a ``v``) add entries equal to ``v`` up to ``k``. ``topk`` then runs on
  the ``s k`` members of the chosen groups only (4.7 ms at m = n = 2,000).

Every other input, and every non-CPU tensor, goes to ``torch.topk`` unchanged. Both paths give
the values of ``torch.topk`` and the indices of a valid top-k of the input; among entries tied
with the k-th value they may choose other indices than ``torch.topk`` (whose choice among ties
is unspecified). The padding is the worst value (``+inf`` for the smallest, ``-inf`` for the
largest): where a row would need it to fill its ``k`` (fewer than ``k`` entries at least as
good), the call is redone by ``torch.topk`` unpadded. NaN, which ``torch.topk`` ranks above
every number: the groups' maxima keep that rank (``amax`` propagates NaN), their minima would
not, so a top-k of the smallest with a NaN in its input goes to ``torch.topk``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["top_k", "padded_length", "group_size"]

#: torch's CPU topk uses a partial sort from this many entries per selected one on.
_PARTIAL_SORT_RATIO = 64
#: Rows shorter than this many entries per selected one are not padded (there the slower path is
#: short and the padding costs more than it saves: bench/selection.py).
_PAD_FROM_RATIO = 40


#: Rows from this many entries on are selected by groups.
_GROUP_FROM = 1 << 14


def group_size(n: int, k: int) -> int:
    """Columns per group for a top-``k`` of rows of ``n`` entries: ``round(sqrt(n / k))`` (which
    balances the ``n / s`` group extremes against the ``s k`` candidates) from ``2^14`` entries
    on, 0 (no groups) below or when fewer than 2 columns would form a group."""
    if k < 1 or n < _GROUP_FROM:
        return 0
    s = int(round(math.sqrt(n / k)))
    return s if s >= 2 and n // s >= k else 0


def padded_length(n: int, k: int) -> int:
    """The row length ``top_k`` selects from on a CPU: ``64 k`` for ``40 k <= n < 64 k``, else ``n``."""
    return _PARTIAL_SORT_RATIO * k if k >= 1 and _PAD_FROM_RATIO * k <= n < _PARTIAL_SORT_RATIO * k else n


def top_k(x: torch.Tensor, k: int, *, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1, largest=largest, sorted=True)``, by groups or padded on a CPU
    (module docstring).

    Args:
        x: (..., N) tensor.
        k: entries per row, ``0 <= k <= N``.
        largest: the largest (True) or the smallest entries.

    Returns:
        ``(values, indices)``, (..., k) each, best first: the values of ``torch.topk``, the
        indices of a valid top-k of ``x``.
    """
    if x.ndim == 0 or x.device.type != "cpu" or not x.is_floating_point():
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    n = x.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"top_k: k must be in [0, {n}], got {k}")
    s = group_size(n, k)
    if s:
        if largest or not bool(torch.isnan(x).any()):
            return _by_groups(x, k, s, largest)
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    length = padded_length(n, k)
    if length == n:
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    worst = -math.inf if largest else math.inf
    values, idx = torch.topk(F.pad(x, (0, length - n), value=worst), k, dim=-1, largest=largest, sorted=True)
    if bool((idx >= n).any()):  # the padding was needed to fill some row: redo it unpadded
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    return values, idx


def _by_groups(x: torch.Tensor, k: int, s: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of ``x`` (..., N) through ``N // s`` strided groups of ``s`` columns (module docstring)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    g = n // s
    grouped = x[..., :s * g].unflatten(-1, (s, g))  # a view: group j is column j of the (s, g) block
    extreme = grouped.amax(-2) if largest else grouped.amin(-2)  # (..., g)
    chosen = torch.topk(extreme, k, dim=-1, largest=largest, sorted=False).indices  # (..., k)
    cand = (chosen.unsqueeze(-2) + torch.arange(s, device=x.device)[:, None] * g).flatten(-2)  # (..., s k)
    if s * g < n:  # the columns left over: candidates outright
        cand = torch.cat([cand, torch.arange(s * g, n, device=x.device).expand(*lead, n - s * g)], -1)
    values, pick = torch.topk(torch.gather(x, -1, cand), k, dim=-1, largest=largest, sorted=True)
    return values, torch.gather(cand, -1, pick)
