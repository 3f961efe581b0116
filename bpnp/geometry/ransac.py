r"""Batched RANSAC for blind PnP from a soft correspondence matrix, all in torch.

Given a joint probability matrix ``P`` (b, m, n) between 2D bearings and 3D points (e.g. from
Sinkhorn), :func:`ransac_pnp` finds, per batch item, the pose ``x_cam = R X + t`` that
maximises the P-weighted count of angular inliers among the ``top_k`` most probable pairs:

1. **Candidates**: the ``top_k`` largest entries of ``P`` among real rows/columns with
   ``P > 0`` (finite); ties (also at the cut) are broken by the 2D index, then the 3D index,
   an order that padding cannot change, so neither the set nor its order depends on padding.
   ``top_k`` defaults per item to ``min(1000, ceil(1.5 m_real))``, as in the original.
2. **Sampling**: each hypothesis draws 4 distinct candidates with probability proportional to
   ``P`` (successive sampling without replacement, by inverse CDF with the drawn mass
   removed). The random numbers are one ``(b, num_hypotheses, 4)`` draw from ``generator``.
   With ``sample_power`` = gamma != 1 the sampling weights are ``P^gamma`` instead (gamma > 1
   concentrates the draws on the confident pairs, a lower sampling temperature); scoring and the
   local optimisation still weigh by ``P``.
   **Guided sampling** (``guided`` > 0, a fraction of the hypotheses, the last ones): the first
   candidate is drawn as above, the other three from its *consistent neighbours* only, the
   candidates whose 2D point is among the ``guided_neighbours`` nearest 2D points (by angle) of
   the first's and whose 3D point is among the nearest 3D points of the first's, proportional to ``P``
   (Gumbel top-3: successive sampling without replacement). A true pair's neighbours on the
   surface project to its neighbours in the image, so its consistent neighbours are mostly true
   pairs; a wrong pair's are random pairs, true at about the base rate (NAPSAC-like locality on
   both sides). The uniforms of all hypotheses are followed by one ``(b, H_guided, 1000)`` draw
   (``top_k`` columns when given), so padding does not change them.
3. **Minimal solver**: :func:`bpnp.geometry.p3p.p3p` (float64) on the first 3; the 4th picks
   one of the up-to-4 solutions (smallest angular residual), like OpenCV's P3P. With
   ``score_all_solutions=True`` every valid solution is scored instead (4x the memory, more
   robust when many 4th points are outliers). Samples that reuse a 2D or 3D point, or are
   degenerate, give no hypothesis (masked, never NaN).
4. **Scoring**: pair ``(i, j)`` is an inlier of ``(R, t)`` iff the angle between ``b_i`` and
   ``R p_j + t`` is below ``threshold`` (radians); score = sum of ``P_ij`` over inliers. A
   point behind the camera is never an inlier (cheirality): ``cos(angle) > cos(threshold) > 0``
   forces ``b_i . x > 0``, i.e. positive depth along the bearing.
5. **Local optimisation** (``refine_steps`` > 0): damped Gauss-Newton on
   ``sum_k w_k ||normalize(R p_k + t) - b_k||^2`` over the current inliers (``w = P``), the
   same angular objective as the pose-refinement node; kept only if it does not lower the
   score.

Threshold semantics: ``threshold`` is an **angle in radians** between bearing and the ray to the
transformed point (internally compared as ``1 - cos``). The original used 0.01 in normalised
image units with OpenCV; near the optical axis a normalised distance ``d`` is an angle of ``d``
radians (``d(angle) = d(x) cos^2(angle_off_axis)``), so the default 0.01 rad matches it at the
centre and is slightly more permissive in normalised units towards the borders.

Memory: the scoring step scores the hypotheses in chunks of 2^19 (hypothesis, pair) entries,
peaking at about 5 x 2^19 floats of the working dtype (10 MB in float32) and ``2 b H`` for the
scores, whatever ``H`` = ``num_hypotheses`` (``4 H`` with ``score_all_solutions``) and ``K`` =
``top_k`` (or ``min(1000, ceil(1.5 m))`` from the padded ``m``). Candidate selection needs ~20 bytes per entry of ``P`` (b = 8, m = n = 1000: 160 MB);
the minimal solver ~3 KB per hypothesis. Guided sampling adds one (b, H_guided, K) float64
array of uniforms, (b, m, m) and (b, n, n) distances, one (b, n, n) (or (b, m, m)) boolean
nearest-point relation and (b, K, k G) / (b, K, L) / (b, H_guided, L) neighbour lists, ``k`` =
``guided_neighbours``, G the most candidates sharing one point, L the largest count of
consistent neighbours (tens; b = 1, H_guided = 1,024, m = n = 1000, K = 1000: about 20 MB by
these shapes). Time at b = 8, m = n = 1000, H = 512 on two CPU
threads: about 0.1 s in ``python bench/train_step.py`` (the original's per-sample OpenCV loop:
0.59 s).

Determinism: given the same ``generator`` state, the result of an item is a function of its
own (unpadded) data, its position in the batch and the batch size only; other items and padding
never influence it. Not differentiable (runs under ``torch.no_grad``); use it to initialise the
pose-refinement node.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bpnp.geometry.angular_scale import check_angle
from bpnp.geometry.p3p import p3p
from bpnp.geometry.rotations import _check_float, _check_tensor, so3_exp
from bpnp.geometry import selection  # its top_k: the module's name, since _ransac has a top_k argument
from bpnp.geometry.vec3 import dot3, norm3

__all__ = ["RansacStatus", "RansacResult", "ransac_pnp", "default_top_k", "seeded_generator", "gauss_newton_angular",
           "angular_inliers", "PairFeatures", "pair_features", "inliers_of_features", "reduce_inliers_in_chunks"]


class RansacStatus(IntEnum):
    """Per-item outcome of :func:`ransac_pnp`."""

    OK = 0
    """A hypothesis with enough support was found."""
    TOO_FEW_CORRESPONDENCES = 1
    """Fewer than 4 candidate pairs, 2D points or 3D points: the pose is the identity, t = 0."""
    NO_VALID_HYPOTHESIS = 2
    """No sample gave a valid pose with ``min_inliers`` inliers and ``min_inlier_weight``; the
    pose is the best valid hypothesis found, or the identity with t = 0 if there was none."""


class RansacResult(NamedTuple):
    """Output of :func:`ransac_pnp`; every field has batch size b and is finite."""

    R: torch.Tensor
    """(b, 3, 3) rotation, world to camera."""
    t: torch.Tensor
    """(b, 3) translation."""
    score: torch.Tensor
    """(b,) sum of P over the inlier candidate pairs of the returned pose."""
    num_inliers: torch.Tensor
    """(b,) int64 number of inlier candidate pairs of the returned pose."""
    status: torch.Tensor
    """(b,) int64 :class:`RansacStatus` code; nonzero is a failure."""
    num_valid_hypotheses: torch.Tensor
    """(b,) int64 number of hypotheses that produced a valid pose (diagnostic; with
    ``score_all_solutions`` it counts valid P3P solutions)."""
    R_top: torch.Tensor | None = None
    """(b, k, 3, 3) the ``k = top_hypotheses`` best-ranked poses (slot 0 = ``R``, locally
    optimised; the others as the minimal solver gave them), or None when ``top_hypotheses=1``."""
    t_top: torch.Tensor | None = None
    """(b, k, 3) their translations, or None."""


def seeded_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random source of RANSAC for item or batch ``index`` of a deterministic evaluation:
    a generator on ``device`` seeded with ``seed * 1_000_003 + index``. Validation/test in
    training and ``evaluate.py`` both use it, so one index draws the same numbers in both."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed) * 1_000_003 + int(index))
    return g


def default_top_k(m_real: torch.Tensor) -> torch.Tensor:
    """``min(1000, ceil(1.5 m_real))``: the number of candidate pairs of the original BPnPNet.

    Args:
        m_real: number of real 2D points per item, integer tensor of shape :math:`(*)`.

    Returns:
        int64 tensor of the same shape.

    Example:
        >>> default_top_k(torch.tensor([3, 100, 2000]))
        tensor([   5,  150, 1000])
    """
    _check_tensor(m_real, "m_real")
    # Integer arithmetic: ceil(3 m / 2) exactly.
    return torch.clamp((3 * m_real.long() + 1) // 2, max=1000)


def _take(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``src`` (b, K, *f) at ``idx`` (b, *s): returns (b, *s, *f)."""
    b = idx.shape[0]
    flat = idx.reshape(b, -1)
    feat = src.shape[2:]
    out = torch.gather(src, 1, flat.view(b, -1, *([1] * len(feat))).expand(b, flat.shape[1], *feat))
    return out.view(*idx.shape, *feat)


def _sample_without_replacement(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Successive weighted sampling without replacement by inverse CDF.

    Args:
        w: (b, K) non-negative weights (float64).
        u: (b, H, S) uniforms in [0, 1).

    Returns:
        (b, H, S) int64 indices into K; draw s has probability proportional to ``w`` restricted
        to the candidates not drawn before it. Rounding can rarely repeat an index; callers
        check for repeats.
    """
    K = w.shape[1]
    cdf = w.cumsum(-1)  # (b, K)
    total = cdf[:, -1:]  # (b, 1)
    drawn: list[torch.Tensor] = []
    for s in range(u.shape[2]):  # S = 4 draws of one sample; hypotheses stay vectorised
        target = u[..., s] * total
        if drawn:
            prev = torch.stack(drawn, -1)  # (b, H, s)
            target = u[..., s] * (total - _take(w, prev).sum(-1))
            # Walk the removed candidates in index order, stepping over each one's mass.
            prev_sorted, _ = prev.sort(-1)
            for r in range(prev_sorted.shape[-1]):
                e = prev_sorted[..., r]
                we = _take(w, e)
                before = _take(cdf, e) - we
                target = torch.where(target >= before, target + we, target)
        idx = torch.searchsorted(cdf, target, right=True)  # (b, H): batched over b
        drawn.append(idx.clamp(max=K - 1))
    return torch.stack(drawn, -1)


class PairFeatures(NamedTuple):
    """The pose-independent part of :func:`angular_inliers` for K pairs (:func:`pair_features`),
    formed once when many chunks of poses are tested against the same pairs."""

    origin: torch.Tensor
    """(b, 1, 3) the first pair's 3D point (the points are taken relative to it)."""
    Fr: torch.Tensor
    """(b, K, 5) ``[1, c2 |p|^2, p]`` of the relative points ``p``."""
    Fk: torch.Tensor
    """(b, K, 12) ``[vec(b p^T), b]``."""
    c2: float | torch.Tensor
    """``cos_thr^2``, one number or (b, 1, 1)."""


def pair_features(bc: torch.Tensor, pc: torch.Tensor, cos_thr: float | torch.Tensor) -> PairFeatures:
    """:class:`PairFeatures` of unit bearings ``bc`` (b, K, 3) and points ``pc`` (b, K, 3) at the
    inlier cosine ``cos_thr`` (one number or (b, 1) per item)."""
    # Points relative to the top candidate's 3D point (padding-invariant): the camera-frame
    # terms of the test then have the size of the visible structure and its depth, not of the
    # world coordinates, so the expanded |x|^2 keeps float32 accuracy near the threshold.
    origin = pc[:, :1, :]
    p0 = pc - origin  # (b, K, 3)
    c2 = cos_thr * cos_thr
    if isinstance(c2, torch.Tensor):  # per item (b, 1) -> (b, 1, 1) against (b, H, .) and (b, K, .)
        c2 = c2.to(pc.dtype)[..., None]
    Fr = torch.cat([torch.ones_like(p0[..., :1]), c2 * p0.square().sum(-1, keepdim=True), p0], -1)
    Fk = torch.cat([(bc.unsqueeze(-1) * p0.unsqueeze(-2)).reshape(*pc.shape[:2], 9), bc], -1)
    return PairFeatures(origin, Fr, Fk, c2)


def inliers_of_features(R: torch.Tensor, t: torch.Tensor, f: PairFeatures) -> torch.Tensor:
    """(b, H, K) bool: :func:`angular_inliers` of poses ``R`` (b, H, 3, 3), ``t`` (b, H, 3) against
    pairs given by their :func:`pair_features`."""
    t0 = t + (R @ f.origin.transpose(1, 2).unsqueeze(1)).squeeze(-1)  # (b, H, 3): R c + t
    # cos_thr^2 |R p + t|^2 = c2 |t|^2 + c2 |p|^2 + 2 c2 (R^T t) . p: one (b, H, 5) x (b, 5, K)
    # matmul of [c2 |t|^2, 1, 2 c2 R^T t] and [1, c2 |p|^2, p].
    q = (R.transpose(-1, -2) @ t0.unsqueeze(-1)).squeeze(-1)  # (b, H, 3)
    c2 = f.c2
    Gr = torch.cat([c2 * t0.square().sum(-1, keepdim=True), torch.ones_like(q[..., :1]), 2.0 * c2 * q], -1)
    rhs = Gr @ f.Fr.transpose(1, 2)
    # b . (R p + t) = vec(R) . vec(b p^T) + t . b: one (b, H, 12) x (b, 12, K) matmul.
    G = torch.cat([R.reshape(*R.shape[:2], 9), t0], -1)
    dot = G @ f.Fk.transpose(1, 2)
    return (dot * dot.abs()) > rhs


def reduce_inliers_in_chunks(R: torch.Tensor, t: torch.Tensor, f: PairFeatures, reduce,
                             chunk: int) -> torch.Tensor:
    """``reduce`` of :func:`inliers_of_features` over chunks of the poses, concatenated along the
    pose dimension: poses (b, H, 3, 3), (b, H, 3), about ``chunk`` (pose, pair) entries of the
    (b, h, K) inlier mask at a time (``reduce`` maps it to (b, h, ...)). The chunks split the
    poses only, so every entry is computed as on the whole mask (why chunks:
    :func:`_angular_scores`)."""
    b, H, K = R.shape[0], R.shape[1], f.Fk.shape[1]
    step = max(1, chunk // max(b * K, 1))
    return torch.cat([reduce(inliers_of_features(R[:, h:h + step], t[:, h:h + step], f))
                      for h in range(0, H, step)], 1)


def angular_inliers(
    R: torch.Tensor,
    t: torch.Tensor,
    bc: torch.Tensor,
    pc: torch.Tensor,
    cos_thr: float | torch.Tensor,
) -> torch.Tensor:
    """(b, H, K) bool: pair k (unit bearing ``bc`` (b, K, 3), point ``pc`` (b, K, 3)) is an
    inlier of pose h (``R`` (b, H, 3, 3), ``t`` (b, H, 3)); ``cos_thr`` one number or (b, 1)
    per item.

    Pair k is an inlier of hypothesis h iff ``d |d| > cos_thr^2 |x|^2`` with ``x = R_h p_k + t_h``
    and ``d = b_k . x`` (|b| = 1), i.e. ``d > 0`` (in front of the camera) and
    ``cos(angle) > cos_thr``: no sqrt, no (b, H, 3, K) tensor of transformed points. Pairs
    with ``bc = 0`` are never inliers. Many chunks of poses against the same pairs: form
    :func:`pair_features` once and call :func:`inliers_of_features` per chunk.
    """
    return inliers_of_features(R, t, pair_features(bc, pc, cos_thr))


def _angular_scores(R: torch.Tensor, t: torch.Tensor, bc: torch.Tensor, pc: torch.Tensor, wc: torch.Tensor,
                    cos_thr: float | torch.Tensor, chunk: int = 1 << 19) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted inlier score and count of poses (b, H) over candidates (b, K) with weights
    ``wc`` (b, K) (:func:`angular_inliers`), ``chunk`` (pose, pair) entries at a time.

    Why chunks: the (b, H, K) products and masks of all poses at once (16 MB each at H = 4,096,
    K = 1,000 in float32) are fresh memory on every call, and on a CPU touching it costs more
    than the arithmetic; chunks of 2^19 entries stay in cache and score the same poses faster
    (``python bench/ransac.py``). The chunks split the poses only, so every entry is the same
    computation whatever the chunk.
    """
    f = pair_features(bc, pc, cos_thr)
    # Score (sum of weights) and count (real candidates) of the inliers in one matmul.
    wk = torch.stack([wc, (wc > 0).to(wc.dtype)], -1)  # (b, K, 2)
    sc = reduce_inliers_in_chunks(R, t, f, lambda inl: inl.to(wc.dtype) @ wk, chunk)
    return sc[..., 0], sc[..., 1].round().long()


def gauss_newton_angular(
    R: torch.Tensor,
    t: torch.Tensor,
    bc: torch.Tensor,
    pc: torch.Tensor,
    wc: torch.Tensor,
    cos_thr: float | torch.Tensor,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Gauss-Newton on ``sum_k w_k ||normalize(R p_k + t) - b_k||^2`` over the pairs whose
    angle is within ``acos(cos_thr)`` of the current pose (RANSAC's local optimisation, also
    :func:`bpnp.geometry.pose_search.pose_search`'s re-solve). A step is kept only where it
    lowers the cost.

    Args:
        R (b, 3, 3), t (b, 3): start pose; bc (b, K, 3) unit bearings and pc (b, K, 3) points
        of K pairs with weights wc (b, K) (0 = unused); cos_thr: cosine of the inlier angle,
        one number or (b, 1) per item; steps: iterations. Returns the pose ``(R, t)``.
    """
    eye3 = torch.eye(3, dtype=R.dtype, device=R.device)
    b, K = pc.shape[:2]

    def cost_terms(R_, t_):
        x = pc @ R_.transpose(-1, -2) + t_.unsqueeze(-2)  # (b, K, 3)
        nrm = norm3(x).clamp(min=torch.finfo(R.dtype).tiny).unsqueeze(-1)
        u = x / nrm
        return x, nrm, u

    for _ in range(steps):
        x, nrm, u = cost_terms(R, t)
        inl = (dot3(u, bc) > cos_thr) & (wc > 0)
        w = wc * inl
        e = u - bc  # (b, K, 3)
        cost = (w * dot3(e, e)).sum(-1)
        proj = (eye3 - u.unsqueeze(-1) * u.unsqueeze(-2)) / nrm.unsqueeze(-1)  # d u / d x, symmetric
        Rp = x - t.unsqueeze(-2)
        # Left perturbation: x(d) = exp([dw]) R p + t + dt  =>  dx/d(dw, dt) = [-[Rp]_x, I], so
        # row r of d u / d(dw, dt) is [Rp x proj_r, proj_r] (v^T [a]_x = (v x a)^T): one cross
        # product instead of K (3, 3) matrix products.
        J = torch.cat([torch.linalg.cross(Rp.unsqueeze(-2).expand_as(proj), proj), proj], dim=-1)  # (b, K, 3, 6)
        Jw = (J * w[..., None, None]).reshape(b, 3 * K, 6)
        J = J.reshape(b, 3 * K, 6)  # the K (3, 6) blocks stacked
        # One (6, 3K) x (3K, 6) product per item sums the pairs' J^T w J (a product per pair
        # and a sum formed K (6, 6) matrices first: twice the time at b = 4, K = 1000).
        Hm = Jw.transpose(1, 2) @ J  # (b, 6, 6)
        g = (e.reshape(b, 1, 3 * K) @ Jw).squeeze(1)  # (b, 6)
        damp = 1e-6 * Hm.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True) + 1e-12
        Hm = Hm + torch.diag_embed(damp.expand(-1, 6))
        delta, _ = torch.linalg.solve_ex(Hm, -g.unsqueeze(-1))
        delta = delta.squeeze(-1)
        R_new = so3_exp(delta[:, :3]) @ R
        t_new = t + delta[:, 3:]
        _, _, u_new = cost_terms(R_new, t_new)
        e_new = u_new - bc
        cost_new = (w * dot3(e_new, e_new)).sum(-1)
        ok = torch.isfinite(delta).all(-1) & (cost_new <= cost)
        R = torch.where(ok[:, None, None], R_new, R)
        t = torch.where(ok[:, None], t_new, t)
    return R, t


def ransac_pnp(
    P: torch.Tensor,
    bearings: torch.Tensor,
    points: torch.Tensor,
    mask2d: torch.Tensor,
    mask3d: torch.Tensor,
    *,
    num_hypotheses: int = 512,
    top_k: int | None = None,
    threshold: float | torch.Tensor = 0.01,
    min_inliers: int = 4,
    min_inlier_weight: float = 0.0,
    score_all_solutions: bool = False,
    refine_steps: int = 5,
    generator: torch.Generator | None = None,
    top_hypotheses: int = 1,
    guided: float = 0.0,
    guided_neighbours: int = 16,
    sample_power: float = 1.0,
) -> RansacResult:
    r"""Robust pose from soft 2D-3D correspondences by batched, P-weighted RANSAC-P3P.

    Maximises, over hypotheses from minimal samples, the score
    :math:`\sum_{(i,j) \in \mathcal{C}} P_{ij} [\angle(b_i, R p_j + t) < \tau]` over the candidate
    set :math:`\mathcal{C}` (top-k entries of P), then locally refines the winner. See the module
    docstring for every step, memory use and determinism. No Python loop over items or
    hypotheses, no host round trip, no OpenCV.

    Args:
        P: correspondence weights of shape :math:`(B, M, N)`, non-negative (negative, zero and
            non-finite entries are never candidates).
        bearings: unit bearing vectors of the 2D points, :math:`(B, M, 3)`, z > 0.
        points: 3D points (world frame), :math:`(B, N, 3)`.
        mask2d: real 2D points, :math:`(B, M)` bool.
        mask3d: real 3D points, :math:`(B, N)` bool.
        num_hypotheses: minimal samples per item, ``H >= 1``.
        top_k: number of candidate pairs per item; None = ``min(1000, ceil(1.5 m_real))``
            per item.
        threshold: inlier angle in **radians** (0.01 ~ the original's 0.01 normalised units); a
            (b,) tensor gives each item its own (:mod:`bpnp.geometry.angular_scale`).
        min_inliers: a hypothesis counts only with at least this many inlier pairs (the 3
            sample pairs are always inliers, so 4 asks for one supporting pair).
        min_inlier_weight: ... and with a score of at least this fraction of the total
            candidate weight of the item.
        score_all_solutions: score every P3P solution instead of picking one by the 4th point.
        refine_steps: Gauss-Newton steps of the local optimisation (0 = off).
        generator: source of the ``(B, H, 4)`` uniforms (drawn on its device); None uses the
            global RNG.
        top_hypotheses: also return the ``k`` best-ranked poses (``R_top``, ``t_top``; for
            :func:`bpnp.geometry.pose_search.pose_search`); 1 = only the best.
        guided: fraction in [0, 1] of the hypotheses drawn by guided sampling (module docstring,
            step 2); 0 = P-weighted sampling only (the same hypotheses as without the option).
        guided_neighbours: neighbours per side that define a consistent neighbour, >= 3.
        sample_power: exponent gamma > 0 of the sampling weights ``P^gamma`` (both samplers;
            module docstring, step 2); 1 = proportional to ``P`` (the same hypotheses as
            without the option).

    Returns:
        :class:`RansacResult` with ``R`` (B, 3, 3) and ``t`` (B, 3) in the promoted dtype of
        ``bearings``/``points``, ``score`` (B,) in that dtype, ``num_inliers``, ``status``,
        ``num_valid_hypotheses`` (B,) int64. Items with ``status != 0`` still hold a finite
        pose (see :class:`RansacStatus`).

    Raises:
        TypeError: on non-tensor, non-float or non-bool inputs.
        ValueError: on inconsistent shapes (naming the received shape) or invalid options.

    Example:
        >>> from bpnp.geometry.bearings import to_bearings, project
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(1, 20, 3, generator=g) + torch.tensor([0.0, 0.0, 6.0])
        >>> bearings = to_bearings(project(X))      # camera at the origin, identity pose
        >>> P = torch.eye(20)[None] / 20            # exact correspondences
        >>> mask = torch.ones(1, 20, dtype=torch.bool)
        >>> res = ransac_pnp(P, bearings, X, mask, mask, generator=g)
        >>> res.status.tolist(), torch.allclose(res.R, torch.eye(3), atol=1e-5)
        ([0], True)
    """
    # ------------------------------------------------------------------ validation
    for name, x in (("P", P), ("bearings", bearings), ("points", points), ("mask2d", mask2d), ("mask3d", mask3d)):
        _check_tensor(x, name)
    if P.ndim != 3:
        raise ValueError(f"P must have shape (B, M, N), got {tuple(P.shape)}")
    b, m, n = P.shape
    if bearings.shape != (b, m, 3):
        raise ValueError(f"bearings must have shape (B, M, 3) = ({b}, {m}, 3), got {tuple(bearings.shape)}")
    if points.shape != (b, n, 3):
        raise ValueError(f"points must have shape (B, N, 3) = ({b}, {n}, 3), got {tuple(points.shape)}")
    if mask2d.shape != (b, m) or mask2d.dtype != torch.bool:
        raise ValueError(f"mask2d must be a bool tensor of shape ({b}, {m}), got {tuple(mask2d.shape)} {mask2d.dtype}")
    if mask3d.shape != (b, n) or mask3d.dtype != torch.bool:
        raise ValueError(f"mask3d must be a bool tensor of shape ({b}, {n}), got {tuple(mask3d.shape)} {mask3d.dtype}")
    for name, x in (("P", P), ("bearings", bearings), ("points", points)):
        _check_float(x, name)
    for name, x in (("bearings", bearings), ("points", points), ("mask2d", mask2d), ("mask3d", mask3d)):
        if x.device != P.device:
            raise ValueError(f"{name} is on {x.device} but P is on {P.device}; all inputs must share one device")
    if not isinstance(num_hypotheses, int) or num_hypotheses < 1:
        raise ValueError(f"num_hypotheses must be a positive int, got {num_hypotheses!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    check_angle(threshold, b, "threshold")
    if not isinstance(min_inliers, int) or min_inliers < 0:
        raise ValueError(f"min_inliers must be a non-negative int, got {min_inliers!r}")
    if not (0.0 <= min_inlier_weight <= 1.0):
        raise ValueError(f"min_inlier_weight must be a fraction in [0, 1], got {min_inlier_weight!r}")
    if not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be a non-negative int, got {refine_steps!r}")
    if not isinstance(top_hypotheses, int) or top_hypotheses < 1:
        raise ValueError(f"top_hypotheses must be a positive int, got {top_hypotheses!r}")
    if isinstance(guided, bool) or not isinstance(guided, (int, float)) or not 0.0 <= guided <= 1.0:
        raise ValueError(f"guided must be a fraction in [0, 1], got {guided!r}")
    if isinstance(guided_neighbours, bool) or not isinstance(guided_neighbours, int) or guided_neighbours < 3:
        raise ValueError(f"guided_neighbours must be an int >= 3, got {guided_neighbours!r}")
    if (isinstance(sample_power, bool) or not isinstance(sample_power, (int, float)) or not math.isfinite(sample_power)
            or sample_power <= 0):
        raise ValueError(f"sample_power must be a finite number > 0, got {sample_power!r}")

    with torch.no_grad():
        return _ransac(
            P.detach(), bearings.detach(), points.detach(), mask2d, mask3d,
            H=num_hypotheses, top_k=top_k, threshold=threshold, min_inliers=min_inliers,
            min_inlier_weight=min_inlier_weight, score_all=score_all_solutions,
            refine_steps=refine_steps, generator=generator, top=top_hypotheses,
            guided=int(round(float(guided) * num_hypotheses)), neighbours=guided_neighbours,
            sample_power=float(sample_power),
        )


def _nearest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (b, N, k') of the ``k' = min(k, N)`` nearest columns of each row by the distances
    ``d`` (b, N, N) (inf = excluded: itself, padding) and whether each is a real neighbour."""
    val, idx = selection.top_k(d, min(k, d.shape[-1]), largest=False)
    return idx, torch.isfinite(val)


def _neighbour_distances(bearings, points, mask2d, mask3d):
    """(b, m, m) angular (``1 - cos``) and (b, n, n) Euclidean distances, inf on the diagonal and
    wherever a point is padding."""
    eye2 = torch.eye(bearings.shape[1], dtype=torch.bool, device=bearings.device)
    eye3 = torch.eye(points.shape[1], dtype=torch.bool, device=points.device)
    d2 = (1.0 - bearings @ bearings.transpose(1, 2)).masked_fill(eye2 | ~(mask2d[:, :, None] & mask2d[:, None, :]), math.inf)
    d3 = torch.cdist(points, points).masked_fill(eye3 | ~(mask3d[:, :, None] & mask3d[:, None, :]), math.inf)
    return d2, d3


def _consistent_neighbours(bearings, points, mask2d, mask3d, ci, cj, cvalid, k):
    """Each candidate's consistent neighbours as lists: ``(nbr, ok)``, (b, K, L) int64 candidate
    indices and bool, the ``ok`` entries of a row being its consistent neighbours (each once, in
    no particular order), ``L`` the largest count (at least 3).

    Candidate ``c'`` is a consistent neighbour of ``c`` when the 2D point of ``c'`` is among the
    ``k`` nearest 2D points (by angle) of ``c``'s and its 3D point among the ``k`` nearest 3D
    points of ``c``'s (distinct points: a point's several candidate pairs count once); a candidate
    sharing ``c``'s 2D or 3D point is not one, nor is an invalid candidate.

    How, without the (b, K, K) relation: the candidates are grouped by the point of one side (the
    side whose points carry fewer candidates each, at most ``G``); for each of ``c``'s ``k``
    nearest points on that side, the ``G`` slots of its group are tested against the other side's
    (b, N, N) nearest-point relation. O(m^2 + n^2 + K k G) per item (G is 1-3 for a Sinkhorn
    ``P``), against O(K^2) for the dense relation it replaces (``python bench/ransac.py``).
    """
    b, K = ci.shape
    device = ci.device
    d2, d3 = _neighbour_distances(bearings, points, mask2d, mask3d)
    counts = [torch.zeros(b, d.shape[1] + 1, dtype=torch.long, device=device).scatter_add_(
        1, torch.where(cvalid, c, d.shape[1]), torch.ones_like(c)) for c, d in ((ci, d2), (cj, d3))]
    g2, g3 = (int(c[:, :-1].max()) if c.shape[1] > 1 else 0 for c in counts)
    # Group by the side with the smaller largest group; test the other side's relation.
    (ca, da, cnt, G), (cb, db) = ((ci, d2, counts[0], g2), (cj, d3)) if g2 <= g3 else ((cj, d3, counts[1], g3), (ci, d2))
    Na = da.shape[1]
    bidx = torch.arange(b, device=device)[:, None]
    if G == 0:
        nbr = torch.zeros(b, K, 3, dtype=torch.long, device=device)
        return nbr, torch.zeros_like(nbr, dtype=torch.bool)
    near_a, real_a = _nearest(da, k)  # (b, Na, k)
    near_b, real_b = _nearest(db, k)
    Nb = db.shape[1]
    rel_b = torch.zeros(b, Nb, Nb, dtype=torch.bool, device=device).scatter_(2, near_b, real_b)
    # Candidates sorted by their side-a point (invalid ones last); group g starts at first[g].
    order = torch.where(cvalid, ca, Na).argsort(dim=1, stable=True)  # (b, K)
    first = cnt.cumsum(1) - cnt  # (b, Na + 1)
    pa = near_a[bidx, ca]  # (b, K, k): c's nearest side-a points
    ra = real_a[bidx, ca] & cvalid[:, :, None]
    slot = torch.arange(G, device=device)
    start, size = torch.gather(first, 1, pa.flatten(1)).view_as(pa), torch.gather(cnt, 1, pa.flatten(1)).view_as(pa)
    pos = (start[..., None] + slot).clamp(max=K - 1)  # (b, K, k, G)
    nbr = torch.gather(order, 1, pos.flatten(1)).view(b, K, -1)  # (b, K, k G)
    ok = (ra[..., None] & (slot < size[..., None])).view(b, K, -1)
    # ... and c' is one only if its side-b point is among the nearest of c's.
    cb_n = torch.gather(cb, 1, nbr.flatten(1)).view_as(nbr)
    ok &= torch.gather(rel_b.view(b, Nb * Nb), 1, (cb[:, :, None] * Nb + cb_n).flatten(1)).view_as(nbr)
    L = max(3, int(ok.sum(-1).max()))
    if L < nbr.shape[2]:  # the ok entries of every row first
        keep = ok.to(torch.uint8).topk(L, dim=2).indices
        nbr, ok = torch.gather(nbr, 2, keep), torch.gather(ok, 2, keep)
    elif L > nbr.shape[2]:
        pad = L - nbr.shape[2]
        nbr = F.pad(nbr, (0, pad))
        ok = F.pad(ok, (0, pad))
    return nbr, ok


def _guided_samples(w64, nbr, nbr_ok, u_seed, gumbel_u):
    """(b, Hg, 4) candidate indices: the first by P (inverse CDF of ``u_seed`` (b, Hg)), the other
    three among its consistent neighbours (``nbr``, ``nbr_ok`` (b, K, L), :func:`_consistent_neighbours`)
    proportional to ``w64`` (b, K), by Gumbel top-3 of ``gumbel_u`` (b, Hg, K). A hypothesis whose
    first candidate has fewer than three consistent neighbours gets weight-0 draws (its sample is
    then invalid)."""
    K = w64.shape[1]
    cdf = w64.cumsum(-1)
    seed = torch.searchsorted(cdf, u_seed * cdf[:, -1:], right=True).clamp(max=K - 1)  # (b, Hg)
    # The Gumbel keys are formed on the seed's neighbour list, not on all K columns per
    # hypothesis: the same keys (each neighbour keeps its own uniform of ``gumbel_u``), so the
    # same draws, at L / K of the cost.
    pick = seed[..., None].expand(*seed.shape, nbr.shape[2])
    nb, allowed = torch.gather(nbr, 1, pick), torch.gather(nbr_ok, 1, pick)  # (b, Hg, L)
    w_nb = torch.gather(w64, 1, nb.flatten(1)).view_as(nb)
    u_nb = torch.gather(gumbel_u, 2, nb)
    logw = torch.where(allowed & (w_nb > 0), w_nb.clamp_min(1e-300).log(), torch.full_like(u_nb, -math.inf))
    keys = logw - torch.log(-torch.log(u_nb.clamp(1e-300, 1.0 - 1e-16)))
    top = keys.topk(3, dim=2)
    rest = torch.gather(nb, 2, top.indices)  # (b, Hg, 3)
    ok = torch.isfinite(top.values).all(-1)
    return torch.cat([seed[..., None], rest], -1), ok


def _ransac(P, bearings, points, mask2d, mask3d, *, H, top_k, threshold, min_inliers,
            min_inlier_weight, score_all, refine_steps, generator, top=1, guided=0, neighbours=16,
            sample_power=1.0) -> RansacResult:
    b, m, n = P.shape
    device = P.device
    dtype = torch.promote_types(bearings.dtype, points.dtype)
    f64 = torch.float64
    long = torch.long
    eye = torch.eye(3, dtype=dtype, device=device).expand(b, 3, 3)

    m_real, n_real = mask2d.sum(1), mask3d.sum(1)
    k_item = default_top_k(m_real) if top_k is None else torch.full_like(m_real, top_k)
    # Static size from shapes only (no host sync); items use their own k_item <= K.
    K_static = min(1000, (3 * m + 1) // 2) if top_k is None else top_k
    K = max(1, min(K_static, m * n))

    u = torch.rand(b, H, 4, generator=generator, dtype=f64,
                   device=generator.device if generator is not None else device).to(device)

    if m == 0 or n == 0:
        z = torch.zeros(b, dtype=long, device=device)
        tops = (None, None) if top == 1 else (eye.clone()[:, None].expand(b, top, 3, 3).clone(),
                                                 torch.zeros(b, top, 3, dtype=dtype, device=device))
        return RansacResult(eye.clone(), torch.zeros(b, 3, dtype=dtype, device=device),
                            torch.zeros(b, dtype=dtype, device=device), z,
                            torch.full_like(z, RansacStatus.TOO_FEW_CORRESPONDENCES), z.clone(), *tops)

    # ------------------------------------------------------------------ candidates
    ok_b = mask2d & torch.isfinite(bearings).all(-1)
    ok_p = mask3d & torch.isfinite(points).all(-1)
    entry_ok = ok_b.unsqueeze(-1) & ok_p.unsqueeze(-2) & torch.isfinite(P) & (P > 0)
    key = torch.where(entry_ok, P, torch.full_like(P, -math.inf)).flatten(1)  # (b, m n)
    # Ties (also at the k-th value) are broken by the flat index i n + j, i.e. lexicographically
    # by (i, j); padding only inserts indices, so it keeps that order among the real entries.
    # topk's own tie-breaking is unspecified (and differs between devices), hence a second topk
    # that re-selects the entries tied with the k-th value by index.
    first_values, first_indices = selection.top_k(key, K)
    v_k = first_values[:, -1:]
    if bool(((key == v_k).sum(1) == (first_values == v_k).sum(1)).all()):
        # Every entry tied with the k-th value is already selected (the usual case for float P):
        # the set is unique, so the second topk would pick the same entries.
        flat = first_indices
    else:
        flat_idx = torch.arange(m * n, device=device).unsqueeze(0)
        sel_key = torch.where(key > v_k, -1, torch.where(key == v_k, flat_idx, m * n))
        flat = sel_key.topk(K, dim=1, largest=False).indices
    flat, _ = flat.sort(dim=1)
    vals = key.gather(1, flat)
    # Value desc, then index asc (stable sort of index-sorted entries).
    o = vals.argsort(dim=1, descending=True, stable=True)
    vals, flat = vals.gather(1, o), flat.gather(1, o)
    ci, cj = flat // n, flat % n
    pos = torch.arange(K, device=device).unsqueeze(0)
    cvalid = torch.isfinite(vals) & (vals > 0) & (pos < k_item.unsqueeze(1))
    wc = torch.where(cvalid, vals, torch.zeros_like(vals))  # (b, K), dtype of P
    bc = torch.gather(bearings, 1, ci.unsqueeze(-1).expand(b, K, 3)).to(dtype)
    pc = torch.gather(points, 1, cj.unsqueeze(-1).expand(b, K, 3)).to(dtype)
    bc = torch.where(cvalid.unsqueeze(-1), F.normalize(bc, dim=-1), torch.zeros_like(bc))
    pc = torch.where(cvalid.unsqueeze(-1), pc, torch.zeros_like(pc))
    num_cand = cvalid.sum(1)
    too_few = (num_cand < 4) | (m_real < 4) | (n_real < 4)

    # ------------------------------------------------------------------ sampling
    w64 = wc.to(f64)
    if sample_power == 1.0:
        w_draw = w64
    else:
        # Relative to the item's largest weight first, so that P^gamma cannot underflow to 0 for
        # a whole item (P ~ 1 / (m n), gamma up to ~30 in float64); draws are scale-invariant.
        w_draw = (w64 / w64.amax(1, keepdim=True).clamp_min(torch.finfo(f64).tiny)) ** sample_power
    Hp = H - guided  # P-weighted hypotheses first, then the guided ones
    s_idx = _sample_without_replacement(w_draw, u[:, :Hp])  # (b, Hp, 4)
    guided_ok = None
    if guided:
        # A column count that padding cannot change (K grows with the padded m), so that an
        # item's random numbers, and its result, do not depend on padding.
        K_draw = 1000 if top_k is None else top_k
        gumbel_u = torch.rand(b, guided, max(K_draw, K), generator=generator, dtype=f64,
                              device=generator.device if generator is not None else device).to(device)[:, :, :K]
        nbr, nbr_ok = _consistent_neighbours(F.normalize(bearings.to(dtype), dim=-1), points.to(dtype), ok_b, ok_p,
                                             ci, cj, cvalid, neighbours)
        g_idx, g_ok = _guided_samples(w_draw, nbr, nbr_ok, u[:, Hp:, 0], gumbel_u)
        s_idx = torch.cat([s_idx, g_idx], 1)
        guided_ok = torch.cat([torch.ones(b, Hp, dtype=torch.bool, device=device), g_ok], 1)
    s_i, s_j, s_w = _take(ci, s_idx), _take(cj, s_idx), _take(w_draw, s_idx)
    distinct = torch.ones_like(s_w[..., 0], dtype=torch.bool)
    for a_, b_ in ((0, 1), (0, 2), (1, 2)):  # the 3 pairs of the minimal sample
        distinct &= (s_i[..., a_] != s_i[..., b_]) & (s_j[..., a_] != s_j[..., b_])
    sample_ok = distinct & (s_w[..., :3] > 0).all(-1)
    if guided_ok is not None:
        sample_ok &= guided_ok

    sb = _take(bc, s_idx).to(f64)  # (b, H, 4, 3)
    sp = _take(pc, s_idx).to(f64)

    # ------------------------------------------------------------------ minimal solver (float64)
    sol = p3p(sb[..., :3, :], sp[..., :3, :])  # R (b, H, 4, 3, 3)
    valid = sol.valid & sample_ok.unsqueeze(-1)
    if score_all:
        hR = sol.R.reshape(b, 4 * H, 3, 3)
        ht = sol.t.reshape(b, 4 * H, 3)
        hvalid = valid.reshape(b, 4 * H)
    else:
        x4 = (sol.R @ sp[..., 3, None, :, None]).squeeze(-1) + sol.t  # (b, H, 4, 3)
        res4 = 1.0 - (F.normalize(x4, dim=-1) * sb[..., 3, None, :]).sum(-1)
        res4 = torch.where(valid, res4, torch.full_like(res4, math.inf))
        pick = res4.argmin(-1)  # first valid solution when the 4th point is useless
        hR = torch.gather(sol.R, 2, pick[..., None, None, None].expand(b, H, 1, 3, 3)).squeeze(2)
        ht = torch.gather(sol.t, 2, pick[..., None, None].expand(b, H, 1, 3)).squeeze(2)
        hvalid = valid.any(-1)

    # ------------------------------------------------------------------ scoring
    # One cosine, or one per item ((b, 1), broadcast against the (b, K) pairs).
    cos_thr = (torch.cos(threshold.to(device=device, dtype=f64))[:, None] if isinstance(threshold, torch.Tensor)
               else math.cos(threshold))
    score, count = _angular_scores(hR.to(dtype), ht.to(dtype), bc, pc, wc.to(dtype), cos_thr)
    total_w = wc.to(dtype).sum(1, keepdim=True)
    acceptable = hvalid & (count >= min_inliers) & (score >= min_inlier_weight * total_w)
    # Rank: acceptable hypotheses first, then merely valid ones, by score; argmax takes the first.
    rank_score = torch.where(hvalid, score.to(f64), torch.full_like(score, -1.0, dtype=f64))
    rank_score = rank_score + torch.where(acceptable, 2.0 * (total_w.to(f64) + 1.0), torch.zeros_like(rank_score))
    best = rank_score.argmax(1)
    R_best = torch.gather(hR, 1, best[:, None, None, None].expand(b, 1, 3, 3)).squeeze(1)
    t_best = torch.gather(ht, 1, best[:, None, None].expand(b, 1, 3)).squeeze(1)
    any_valid = hvalid.any(1)
    found = torch.gather(acceptable, 1, best[:, None]).squeeze(1)
    score_best = torch.gather(score, 1, best[:, None]).squeeze(1)
    count_best = torch.gather(count, 1, best[:, None]).squeeze(1)

    # ------------------------------------------------------------------ local optimisation
    if refine_steps > 0:
        R_ref, t_ref = gauss_newton_angular(R_best, t_best, bc.to(f64), pc.to(f64), w64, cos_thr, refine_steps)
        s_ref, c_ref = _angular_scores(
            R_ref.unsqueeze(1).to(dtype), t_ref.unsqueeze(1).to(dtype), bc, pc, wc.to(dtype), cos_thr
        )
        s_ref, c_ref = s_ref.squeeze(1), c_ref.squeeze(1)
        finite = torch.isfinite(R_ref).flatten(1).all(1) & torch.isfinite(t_ref).all(1)
        keep = (s_ref >= score_best) & finite & any_valid
        R_best = torch.where(keep[:, None, None], R_ref, R_best)
        t_best = torch.where(keep[:, None], t_ref, t_best)
        score_best = torch.where(keep, s_ref, score_best)
        count_best = torch.where(keep, c_ref, count_best)

    # ------------------------------------------------------------------ status and fallbacks
    status = torch.full((b,), int(RansacStatus.OK), dtype=long, device=device)
    status = torch.where(found, status, torch.full_like(status, int(RansacStatus.NO_VALID_HYPOTHESIS)))
    status = torch.where(too_few, torch.full_like(status, int(RansacStatus.TOO_FEW_CORRESPONDENCES)), status)
    use_pose = any_valid & ~too_few
    R_out = torch.where(use_pose[:, None, None], R_best.to(dtype), eye)
    t_out = torch.where(use_pose[:, None], t_best.to(dtype), torch.zeros(b, 3, dtype=dtype, device=device))
    score_out = torch.where(use_pose, score_best.to(dtype), torch.zeros_like(score_best, dtype=dtype))
    count_out = torch.where(use_pose, count_best, torch.zeros_like(count_best)).long()
    R_top = t_top = None
    if top > 1:
        kk = min(top, rank_score.shape[1])
        order = rank_score.topk(kk, dim=1).indices  # (b, kk)
        R_top = torch.gather(hR, 1, order[..., None, None].expand(b, kk, 3, 3)).to(dtype)
        t_top = torch.gather(ht, 1, order[..., None].expand(b, kk, 3)).to(dtype)
        if kk < top:  # fewer hypotheses than asked: repeat the best
            R_top = torch.cat([R_top, R_top[:, :1].expand(b, top - kk, 3, 3)], 1)
            t_top = torch.cat([t_top, t_top[:, :1].expand(b, top - kk, 3)], 1)
        R_top = torch.cat([R_out[:, None], R_top[:, 1:]], 1)
        t_top = torch.cat([t_out[:, None], t_top[:, 1:]], 1)
    return RansacResult(R_out, t_out, score_out, count_out, status, hvalid.sum(1).long(), R_top, t_top)
