r"""Pose search: re-estimate the correspondences from a pose, re-solve, repeat (inference only).

Blind PnP couples two easy problems: given the matches the pose is a PnP problem, and given the
pose the matches are a nearest-neighbour problem in the image (the lectures' alternation). RANSAC
on the soft matches ``P`` of a learned matcher often lands *near* the pose while most of its
candidate pairs are wrong; from there, the geometry alone can recover the matches that ``P``
ranked too low. :func:`pose_search` does this for the best few RANSAC hypotheses of each item:

1. **Re-match** under the pose ``(R, t)``: for every pair, the angular residual
   :math:`r_{ij} = 1 - b_i \cdot \mathrm{normalize}(R p_j + t)` and the combined score
   :math:`s_{ij} = w \log P_{ij} - r_{ij} / (1 - \cos\tau)`, where ``w`` (``prior_weight``)
   weighs the learned matches against the geometry and :math:`\tau` is the current gate (an
   angle). A pair is a match iff :math:`r_{ij} < 1 - \cos\tau`, ``j`` is the best partner of
   ``i`` and ``i`` the best partner of ``j`` by ``s`` (mutual, so one-to-one).
2. **Re-solve**: damped Gauss-Newton on the angular error of the matches
   (:func:`bpnp.geometry.ransac.gauss_newton_angular`, the refinement's objective).
3. **Repeat** ``iterations`` times with the gate shrinking geometrically from
   ``start_threshold`` to ``threshold`` (a wide gate first, so a pose a few degrees off still
   finds its matches).
4. **Select** per item the hypothesis with the largest consensus: the number of mutual matches
   within ``threshold`` (ties: the larger sum of ``P`` over them).

Which hypotheses to start from: RANSAC ranks its poses by the ``P``-weighted count of inliers
among its top-``K`` candidate pairs, and with many outliers those candidates hold few true pairs
(a median of 2-3 % in the failures of docs/experiments.md "Session 13"), so a pose near the truth is often
ranked far below wrong ones. :func:`rerank_by_row_support` ranks a larger pool of RANSAC's poses
by a score closer to the search's own consensus: the number of 2D points with one of their
``partners`` most probable 3D points within the gate (a cheap, non-mutual proxy of step 4).

Cost per item: ``k`` hypotheses x ``iterations`` x one (m, n) residual matrix, e.g. 4 x 3 x 10^6
entries at m = n = 1000. Not differentiable (``torch.no_grad``): it chooses the pose the
refinement node starts from, as RANSAC does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bpnp.geometry.angular_scale import check_angle
from bpnp.geometry.ransac import gauss_newton_angular, pair_features, reduce_inliers_in_chunks
from bpnp.geometry.rotations import _check_tensor
from bpnp.geometry.selection import top_k

__all__ = ["PoseSearchResult", "pose_search", "rematch", "row_support", "rerank_by_row_support", "select_by_consensus"]


class PoseSearchResult(NamedTuple):
    """Output of :func:`pose_search` (batch size b)."""

    R: torch.Tensor
    """(b, 3, 3) rotation of the selected hypothesis, world to camera."""
    t: torch.Tensor
    """(b, 3) its translation."""
    matches: torch.Tensor
    """(b, m) int64: the 3D index matched to each 2D point under the selected pose, or -1."""
    consensus: torch.Tensor
    """(b,) int64: number of matches of the selected pose (within ``threshold``)."""
    hypothesis: torch.Tensor
    """(b,) int64: which input hypothesis was selected (0 = the first, RANSAC's best)."""


def rematch(P: torch.Tensor, bearings: torch.Tensor, points: torch.Tensor, mask2d: torch.Tensor,
            mask3d: torch.Tensor, R: torch.Tensor, t: torch.Tensor, gate: float,
            prior_weight: float, log_prior: torch.Tensor | None = None,
            workspace: torch.Tensor | None = None, chunk: int = 1 << 17) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual best matches under poses (step 1 of the module docstring).

    Args:
        P: (b, m, n) soft matches (>= 0); bearings (b, m, 3) unit; points (b, n, 3); masks (b, m),
            (b, n) bool; R (b, 3, 3), t (b, 3) one pose per item, or R (b, k, 3, 3), t (b, k, 3)
            ``k`` poses per item; gate: angle in radians, or a (b,) tensor of one per item;
            prior_weight: ``w``.
        log_prior: ``w log P`` (b, m, n) if already computed (:func:`pose_search` forms it once
            for all its rounds), else formed here from ``P`` and ``prior_weight``.
        workspace: a contiguous tensor of the bearings' dtype with at least ``chunk`` entries
            (or ``k m n``, if fewer) that the score is written into (:func:`pose_search` passes
            one for all its rounds), else one is allocated.
        chunk: most score entries formed at once (the (k, rows, n) block of one item's rows).

    Returns:
        ``(matches, prior)``: (b, m) (or (b, k, m)) int64 3D index or -1, and the ``P`` of each
        match (0 where none).

    The (b, k, m, n) score matrix is never formed whole: each item's rows are scored in blocks of
    ``chunk`` entries (1 MB in float64 by default, so a block stays in cache), each written by one
    batched ``b . ray`` product into ``workspace`` and updated in place; a block gives its rows'
    maxima and updates the running column maxima, so every entry is computed as on the whole matrix
    and the matches are the same. Why the blocks, the workspace and these passes: on a CPU touching
    fresh or uncached memory costs more than the arithmetic on it (its pages are first touched,
    16 ms of a 20 ms product at k m n = 4e6 in float64; the whole matrix of 4 poses at m = n =
    1,000 is 32 MB), ``max(dim).indices`` is about twice as fast as ``argmax(dim)`` for the same
    (first) index and ``amax`` four times faster still, the gate is one in-place threshold and the
    scaling and the prior one fused pass (``python bench/pose_search.py``).
    """
    single = R.ndim == 3
    if single:
        R, t = R.unsqueeze(1), t.unsqueeze(1)
    b, k = R.shape[:2]
    # The zeroed rays below rely on cos(gate) > 0.
    check_angle(gate, b, "rematch: gate")
    if isinstance(gate, torch.Tensor):
        cos_gate = torch.cos(gate.to(bearings.dtype))
        gates = [(float(c), 1.0 / float(1.0 - c)) for c in cos_gate]
    else:
        cos_gate = math.cos(gate)
        gates = [(cos_gate, 1.0 / (1.0 - cos_gate))] * b
    m, n = bearings.shape[1], points.shape[1]
    x = points.unsqueeze(1) @ R.transpose(-1, -2) + t.unsqueeze(-2)  # (b, k, n, 3)
    # Rays of padded points and of points behind the camera are 0, and so are padded bearings:
    # their cosine with anything is 0 < cos(gate), which the gate test below then rejects (so
    # no separate masks need combining over the (b, k, m, n) matrix).
    front = mask3d.unsqueeze(1) & (x[..., 2] > 0)
    rays_t = torch.where(front.unsqueeze(-1), F.normalize(x, dim=-1, eps=1e-12), torch.zeros_like(x)).transpose(-1, -2)
    bw = torch.where(mask2d.unsqueeze(-1), bearings, torch.zeros_like(bearings))
    if log_prior is None and prior_weight > 0:
        log_prior = prior_weight * torch.log(P.clamp_min(torch.finfo(P.dtype).tiny)).to(bearings.dtype)
    block = max(1, min(m, chunk // max(k * n, 1)))  # rows per block
    need = k * block * n
    if workspace is None or workspace.numel() < need:
        workspace = torch.empty(need, dtype=bearings.dtype, device=bearings.device)
    buf = workspace.view(-1)
    best = torch.empty(b, k, m, dtype=bearings.dtype, device=bearings.device)
    best_j = torch.empty(b, k, m, dtype=torch.long, device=bearings.device)
    col_best = torch.full((b, k, n), -math.inf, dtype=bearings.dtype, device=bearings.device)
    for i, (cg, inv_scale) in enumerate(gates):
        for r0 in range(0, m, block):
            r = min(block, m - r0)
            score = torch.bmm(bw[i, r0:r0 + r].expand(k, r, 3), rays_t[i], out=buf[:k * r * n].view(k, r, n))
            # Not a candidate: residual 1 - cos >= 1 - cos(gate), i.e. cos <= cos(gate). -inf
            # first: it stays -inf below. threshold_ (x if x > c else -inf, in place) is one
            # pass with no mask tensor: 7x faster than a comparison and masked_fill_ on a CPU.
            F.threshold_(score, cg, -math.inf)
            # The score -r / scale + w log P, up to the constant -1 / scale (argmax ignores it),
            # in place (one fused pass: log P + score / scale; P clamped at tiny, so finite).
            if log_prior is None:
                score.mul_(inv_scale)
            else:
                torch.add(log_prior[i, r0:r0 + r], score, alpha=inv_scale, out=score)
            best[i, :, r0:r0 + r], best_j[i, :, r0:r0 + r] = score.max(-1)  # each row's first best
            torch.maximum(col_best[i], score.amax(-2), out=col_best[i])
    # Mutual: row i's best is column j and no row beats i in column j. The column maxima alone
    # (amax: 4x faster than max with indices) say that; among rows that tie for a column's
    # maximum the lowest index keeps it, so the matches stay one-to-one.
    has = best > -math.inf
    claim = has & (best == torch.gather(col_best, 2, best_j))
    rows = torch.arange(m, device=P.device).expand(b, k, m)
    first = torch.full((b, k, n), m, dtype=torch.long, device=P.device).scatter_reduce_(
        2, best_j, torch.where(claim, rows, torch.full_like(rows, m)), reduce="amin")
    keep = claim & (torch.gather(first, 2, best_j) == rows)
    matches = torch.where(keep, best_j, torch.full_like(best_j, -1))
    chosen = torch.gather(P.unsqueeze(1).expand(b, k, m, n), 3, best_j.unsqueeze(-1)).squeeze(-1)
    prior = torch.where(keep, chosen, torch.zeros_like(chosen))
    if single:
        matches, prior = matches.squeeze(1), prior.squeeze(1)
    return matches, prior


def row_support(P: torch.Tensor, bearings: torch.Tensor, points: torch.Tensor, mask2d: torch.Tensor,
                mask3d: torch.Tensor, R: torch.Tensor, t: torch.Tensor, *, partners: int,
                threshold: float | torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """Row support of poses: per pose, the number of real 2D points ``i`` with at least one of
    their ``partners`` most probable real 3D points ``j`` (largest ``P_ij > 0``) within
    ``threshold`` of the bearing (angle between ``b_i`` and ``R p_j + t``, in front of the camera).

    Args:
        P: (b, m, n) soft matches; bearings (b, m, 3) unit; points (b, n, 3); masks (b, m), (b, n)
            bool; R (b, k, 3, 3), t (b, k, 3) poses; partners: ``T >= 1`` 3D points per 2D point;
            threshold: radians, one angle or a (b,) tensor; chunk: most (pose, pair) entries
            scored at once (memory: about 12 bytes each, so 3 MB at the default 2^18; the pairs'
            features are formed once for all chunks; at m = 1,000, 2^18 is 1.2x faster than 2^20
            and 1.9x faster than 2^23: ``python bench/pose_search.py``).

    Returns:
        (b, k) int64; -1 for a pose that is not finite.

    Cost: ``k m T`` angle tests (:func:`bpnp.geometry.ransac.angular_inliers`), e.g. 4 x 10^6 at
    k = 256, m = 1000, T = 16: a fraction of one :func:`rematch` round over the k poses (k m n).
    """
    check_angle(threshold, P.shape[0], "row_support: threshold")
    if not isinstance(partners, int) or partners < 1:
        raise ValueError(f"row_support: partners must be a positive int, got {partners!r}")
    b, m, n = P.shape
    T = min(partners, n)
    dtype = torch.promote_types(bearings.dtype, points.dtype)
    real = mask2d[:, :, None] & mask3d[:, None, :]
    key = torch.where(real & torch.isfinite(P), P, torch.full((), -math.inf, dtype=P.dtype, device=P.device))
    val, J = top_k(key, T)  # (b, m, T): each 2D point's T most probable 3D points
    ok = (val > 0).reshape(b, m * T)
    bc = bearings.to(dtype)[:, :, None, :].expand(b, m, T, 3).reshape(b, m * T, 3)
    pc = torch.gather(points.to(dtype), 1, J.reshape(b, m * T, 1).expand(b, m * T, 3))
    zero = torch.zeros((), dtype=dtype, device=P.device)
    bc, pc = torch.where(ok[..., None], bc, zero), torch.where(ok[..., None], pc, zero)  # bc = 0: never an inlier
    cos_thr = (torch.cos(threshold.to(device=P.device, dtype=torch.float64))[:, None].to(dtype)
               if isinstance(threshold, torch.Tensor) else math.cos(threshold))
    finite = torch.isfinite(R).flatten(2).all(-1) & torch.isfinite(t).all(-1)
    Rs = torch.where(finite[..., None, None], R.to(dtype), torch.eye(3, dtype=dtype, device=P.device))
    ts = torch.where(finite[..., None], t.to(dtype), zero)
    f = pair_features(bc, pc, cos_thr)  # once for every chunk of poses
    support = reduce_inliers_in_chunks(Rs, ts, f, lambda inl: inl.view(b, -1, m, T).any(-1).sum(-1), chunk)
    return torch.where(finite, support, torch.full_like(support, -1))


def rerank_by_row_support(P: torch.Tensor, bearings: torch.Tensor, points: torch.Tensor, mask2d: torch.Tensor,
                          mask3d: torch.Tensor, R: torch.Tensor, t: torch.Tensor, keep: int, *, partners: int,
                          threshold: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` poses of the (b, k, 3, 3), (b, k, 3) pool ``R, t`` with the largest
    :func:`row_support` (ties: the earlier in the pool, i.e. RANSAC's better rank), in that order.

    Returns:
        ``(R, t)`` of shapes (b, keep, 3, 3), (b, keep, 3); ``keep <= k``.
    """
    b, k = R.shape[:2]
    if not 1 <= keep <= k:
        raise ValueError(f"rerank_by_row_support: keep must be in [1, {k}], got {keep!r}")
    with torch.no_grad():
        support = row_support(P, bearings, points, mask2d, mask3d, R, t, partners=partners, threshold=threshold)
        # Support first, pool position second (exact in int64: both below 2^31).
        rank = (support + 1) * k + (k - 1 - torch.arange(k, device=support.device))
        order = rank.topk(keep, dim=1).indices
        return (torch.gather(R, 1, order[..., None, None].expand(b, keep, 3, 3)),
                torch.gather(t, 1, order[..., None].expand(b, keep, 3)))


def _solve_on_matches(R, t, bearings, points, matches, gate, steps):
    """Gauss-Newton on the angular error of the matched pairs (weights 1), within ``gate`` (an
    angle, or one per row of ``R`` as a tensor)."""
    idx = matches.clamp_min(0)
    pc = torch.gather(points, 1, idx.unsqueeze(-1).expand(*idx.shape, 3))
    w = (matches >= 0).to(points.dtype)
    cos_gate = torch.cos(gate)[:, None] if isinstance(gate, torch.Tensor) else math.cos(gate)
    return gauss_newton_angular(R, t, bearings, pc, w, cos_gate, steps)


def pose_search(
    P: torch.Tensor,
    bearings: torch.Tensor,
    points: torch.Tensor,
    mask2d: torch.Tensor,
    mask3d: torch.Tensor,
    R_init: torch.Tensor,
    t_init: torch.Tensor,
    *,
    iterations: int = 3,
    threshold: float = 0.01,
    start_threshold: float = 0.04,
    prior_weight: float = 1.0,
    solve_steps: int = 5,
    gate_factor: torch.Tensor | None = None,
) -> PoseSearchResult:
    """Alternate matching and pose from ``k`` initial poses per item; keep the best (module docstring).

    Args:
        P: (b, m, n) soft matches, >= 0 (e.g. Sinkhorn's real block).
        bearings: (b, m, 3) unit bearings of the 2D points; points: (b, n, 3) world points.
        mask2d, mask3d: (b, m), (b, n) bool, real points.
        R_init, t_init: (b, k, 3, 3), (b, k, 3) initial poses (e.g. RANSAC's ``k`` best).
        iterations: re-match / re-solve rounds (>= 1).
        threshold, start_threshold: final and first gate, radians (``start >= final``).
        prior_weight: ``w`` >= 0, weight of ``log P`` in the matching score (0 = geometry only).
        solve_steps: Gauss-Newton steps per round.
        gate_factor: optional (b,) positive tensor; item ``b``'s gates are ``threshold`` and
            ``start_threshold`` times ``gate_factor[b]`` (:mod:`bpnp.geometry.angular_scale`),
            each below pi/2.

    Returns:
        :class:`PoseSearchResult`. Computed in float64.

    Example:
        >>> from bpnp.geometry.bearings import to_bearings, project
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(1, 50, 3, generator=g, dtype=torch.float64) + torch.tensor([0.0, 0.0, 6.0])
        >>> b = to_bearings(project(X))                       # true pose: identity
        >>> P = torch.full((1, 50, 50), 1.0 / 2500, dtype=torch.float64)   # no learned information
        >>> m = torch.ones(1, 50, dtype=torch.bool)
        >>> R0 = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.01, 0.0], [0.01, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ...                                            dtype=torch.float64))[None, None]   # 0.6 deg off
        >>> res = pose_search(P, b, X, m, m, R0, torch.zeros(1, 1, 3, dtype=torch.float64))
        >>> bool(res.consensus[0] >= 45), torch.allclose(res.R[0], torch.eye(3, dtype=torch.float64), atol=1e-6)
        (True, True)
    """
    _check_poses(P, bearings, points, R_init, t_init, "R_init", "t_init")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if not 0.0 < threshold <= start_threshold < math.pi / 2:
        raise ValueError(f"need 0 < threshold <= start_threshold < pi/2 (radians), got {threshold!r}, "
                         f"{start_threshold!r}")
    if not prior_weight >= 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight!r}")
    b, k = R_init.shape[:2]
    if gate_factor is not None:
        if not (isinstance(gate_factor, torch.Tensor) and tuple(gate_factor.shape) == (b,)
                and bool(torch.isfinite(gate_factor).all()) and bool((gate_factor > 0).all())):
            raise ValueError(f"gate_factor must be a finite positive tensor of shape {(b,)}")
        if not bool((start_threshold * gate_factor < math.pi / 2).all()):
            raise ValueError("start_threshold * gate_factor must stay below pi/2 radians")
    with torch.no_grad():
        f64 = torch.float64
        m = bearings.shape[1]
        P64, b64, p64 = P.detach().to(f64), bearings.detach().to(f64), points.detach().to(f64)
        # w log P once for every round and hypothesis (broadcast over the k poses, never copied).
        log_prior = None
        if prior_weight > 0:  # in place on one fresh buffer: the same values, a third of the memory traffic
            log_prior = P64.clamp_min(torch.finfo(f64).tiny).log_()
            if prior_weight != 1.0:
                log_prior.mul_(prior_weight)
        bk = b64.unsqueeze(1).expand(b, k, m, 3).reshape(b * k, m, 3)  # small: for the re-solve
        pk = p64.unsqueeze(1).expand(b, k, *p64.shape[1:]).reshape(b * k, *p64.shape[1:])
        R, t, finite = _finite_poses(R_init, t_init)

        workspace = torch.empty(min(1 << 17, k * m * P.shape[2]), dtype=f64, device=P.device)  # every round's score blocks

        def match(R, t, gate):
            mt, pr = rematch(P64, b64, p64, mask2d, mask3d, R.view(b, k, 3, 3), t.view(b, k, 3), gate,
                             prior_weight, log_prior, workspace)
            return mt.reshape(b * k, m), pr.reshape(b * k, m)

        factor = None if gate_factor is None else gate_factor.detach().to(device=P.device, dtype=f64)

        def per_item(gate):  # one angle, or one per item, and per row of the (b k) re-solve
            if factor is None:
                return gate, gate
            return gate * factor, (gate * factor).repeat_interleave(k)

        ratio = threshold / start_threshold
        for it in range(iterations):
            gate, gate_rows = per_item(start_threshold * ratio ** (it / max(iterations - 1, 1)))
            matches, _ = match(R, t, gate)
            R_new, t_new = _solve_on_matches(R, t, bk, pk, matches, gate_rows, solve_steps)
            enough = (matches >= 0).sum(1) >= 4
            R = torch.where(enough[:, None, None], R_new, R)
            t = torch.where(enough[:, None], t_new, t)
        matches, prior = match(R, t, per_item(threshold)[0])
        return _select(R, t, matches, prior, finite, b, k)


def _check_poses(P, bearings, points, R, t, r_name: str, t_name: str) -> None:
    """The inputs' tensor checks and the (b, k, 3, 3) / (b, k, 3) shapes of ``k`` poses per item."""
    for name, x in (("P", P), ("bearings", bearings), ("points", points), (r_name, R), (t_name, t)):
        _check_tensor(x, name)
    if R.ndim != 4 or R.shape[-2:] != (3, 3) or t.shape != (*R.shape[:2], 3):
        raise ValueError(f"{r_name} must have shape (b, k, 3, 3) and {t_name} (b, k, 3), got "
                         f"{tuple(R.shape)} and {tuple(t.shape)}")


def _finite_poses(R: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, k, 3, 3), (b, k, 3) poses as (b k, 3, 3), (b k, 3) float64, non-finite ones replaced by
    the identity (so the scoring stays finite), and which were finite (b k,)."""
    f64 = torch.float64
    R = R.detach().to(f64).reshape(-1, 3, 3)
    t = t.detach().to(f64).reshape(-1, 3)
    finite = torch.isfinite(R).flatten(1).all(1) & torch.isfinite(t).all(1)
    R = torch.where(finite[:, None, None], R, torch.eye(3, dtype=f64, device=R.device))
    t = torch.where(finite[:, None], t, torch.zeros_like(t))
    return R, t, finite


def _select(R, t, matches, prior, finite, b: int, k: int) -> PoseSearchResult:
    """Step 4 over (b k) poses and their final matches: per item the largest consensus, then the
    larger ``P`` mass over it (``prior`` < 1 in total, so it only breaks ties; the first on a tie)."""
    count = (matches >= 0).sum(1)
    count = torch.where(finite, count, torch.full_like(count, -1))
    rank = count.to(torch.float64) + prior.sum(1).clamp(max=0.999)
    best = rank.reshape(b, k).argmax(1)
    sel = torch.arange(b, device=best.device) * k + best
    return PoseSearchResult(R[sel], t[sel], matches[sel], count[sel].clamp_min(0), best)


def select_by_consensus(P: torch.Tensor, bearings: torch.Tensor, points: torch.Tensor, mask2d: torch.Tensor,
                        mask3d: torch.Tensor, R: torch.Tensor, t: torch.Tensor, *, threshold: float = 0.01,
                        prior_weight: float = 1.0, gate_factor: torch.Tensor | None = None) -> PoseSearchResult:
    """Step 4 alone: of ``k`` given poses per item, the one with the largest consensus under ``P``
    (the mutual matches within ``threshold``, ties: the larger ``P`` mass over them), no re-solve.

    Used to choose between poses found from different soft matches (the network's second pass:
    poses from a subset's matching, compared on all points under the first pass's ``P``).

    Args:
        P, bearings, points, mask2d, mask3d: as :func:`pose_search`.
        R, t: (b, k, 3, 3), (b, k, 3) candidate poses; non-finite ones are never selected
            (unless all of an item's are).
        threshold: matching gate, radians (times ``gate_factor[b]`` per item when given).
        prior_weight: weight of ``log P`` in the matching score.

    Returns:
        :class:`PoseSearchResult` of the selected poses (``hypothesis``: which of the ``k``).
        Computed in float64.
    """
    _check_poses(P, bearings, points, R, t, "R", "t")
    if not 0.0 < threshold < math.pi / 2:
        raise ValueError(f"need 0 < threshold < pi/2 (radians), got {threshold!r}")
    if not prior_weight >= 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight!r}")
    b, k = R.shape[:2]
    with torch.no_grad():
        f64 = torch.float64
        R64, t64, finite = _finite_poses(R, t)
        gate = threshold if gate_factor is None else threshold * gate_factor.detach().to(device=P.device, dtype=f64)
        matches, prior = rematch(P.detach().to(f64), bearings.detach().to(f64), points.detach().to(f64), mask2d,
                                 mask3d, R64.view(b, k, 3, 3), t64.view(b, k, 3), gate, prior_weight)
        return _select(R64, t64, matches.reshape(b * k, -1), prior.reshape(b * k, -1), finite, b, k)
