r"""BlindPnPNet: unmatched 2D keypoints + 3D point cloud -> soft correspondences -> camera pose.

Pipeline per batch (all items at once, everything masked):

1. Per-point features, by one of two matchers (``matcher``):

   - ``"attention"`` (the default): :class:`~bpnp.models.attention.AttentionMatcher`, GoMatch-style
     per-point embeddings (bearings for 2D, similarity-normalised coordinates for 3D) and
     ``depth`` blocks of kNN self-attention within each set and 2D<->3D cross-attention.
   - ``"bpnpnet"`` (the original): two :class:`~bpnp.models.encoders.PointEncoder` (context-
     normalised residual blocks) that never see each other. 3D branch: optional similarity
     normalisation (masked centroid and RMS radius; matching is invariant to it and the
     geometric layers use the raw points), optional PointNet STN (``p' = p T``); the 2D branch
     sees the raw camera-normalised ``(x, y)``. With ``knn > 0`` both encoders add a learned
     encoding of each point's k nearest neighbours (:mod:`bpnp.models.local_geometry`).
2. Features are L2-normalised, the cost is ``M_ij = ||f2d_i - f3d_j||`` in ``[0, 2]``.
3. Optimal transport (implicit backward) gives the joint probability matrix ``P``. With
   ``sinkhorn.bins="none"``: :class:`~bpnp.nodes.SinkhornOT` with uniform marginals over the real points,
   so every point is forced into matches. With ``"shared"`` / ``"per_side"``: a learnable
   outlier bin row and column (:func:`~bpnp.nodes.sinkhorn_with_bins`); ``P`` is then the
   real-by-real block renormalised to sum 1, and ``inlier2d`` / ``inlier3d`` (one minus each
   point's bin mass) are the points' inlier probabilities. Because a likely outlier's row keeps
   little real mass, RANSAC's P-weighted candidate choice and sampling (step 4) and the
   refinement's weights (step 5) follow the inlier scores without a separate head.
4. :func:`~bpnp.geometry.ransac.ransac_pnp` on ``P`` gives the initial pose ``(R0, t0)``
   (not differentiated).
5. :class:`~bpnp.nodes.PnPRefine` minimises the ``P``-weighted robust angular error from
   ``(R0, t0)``; ``(R, t)`` is differentiable w.r.t. ``P`` by the implicit function theorem.
   In training it runs only when asked (``refine.in_training`` or the caller's ``refine=True``,
   which the LightningModule sets once the pose loss is on); otherwise ``(R, t) = (R0, t0)``.

Padding never changes a result and permuting the 2D (3D) points permutes the rows (columns)
of ``P`` and leaves the pose unchanged (tests/models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch
from torch import nn

from bpnp.geometry.angular_scale import gate_factor
from bpnp.geometry.bearings import to_bearings
from bpnp.geometry.pose_search import PoseSearchResult, pose_search, rerank_by_row_support, select_by_consensus
from bpnp.geometry.ransac import ransac_pnp
from bpnp.models.attention import AttentionMatcher
from bpnp.models.context_norm import masked_rms_radius
from bpnp.models.encoders import PointEncoder
from bpnp.models.stn import STN3d
from bpnp.nodes import PnPRefine, SinkhornOT, SinkhornOTWithBins, split_bins, uniform_marginals
from bpnp.models.settings import (BINS, MATCHERS, GateSettings, RansacSettings, RefineSettings, SearchSettings,
                                  SettingError, SinkhornSettings, check_net_config)
from bpnp.nodes.pnp import gather_pairs

__all__ = ["BlindPnPNet", "BlindPnPOutput", "NOT_RUN", "MATCHERS", "BINS", "feature_cost", "likeliest_points"]

#: ``pnp_status`` of items whose refinement did not run (training without refinement).
NOT_RUN = -1

#: Widest angular gate a relative gate may reach (radians): the gate tests need cos(gate) > 0.
_MAX_GATE = 1.5


@dataclass
class BlindPnPOutput:
    """Everything one forward pass produces. Tensors have batch size B.

    Differentiable: ``P``, ``M`` and (when refined) ``R``, ``t``. Diagnostics are detached.
    """

    P: torch.Tensor
    """(B, m, n) joint probability matrix (sums to 1 per item; 0 on padding)."""
    M: torch.Tensor
    """(B, m, n) cost matrix in [0, 2] (padded entries hold 0)."""
    R0: torch.Tensor
    """(B, 3, 3) RANSAC rotation (detached)."""
    t0: torch.Tensor
    """(B, 3) RANSAC translation (detached)."""
    R: torch.Tensor
    """(B, 3, 3) final rotation: refined if ``refined``, else ``R0``."""
    t: torch.Tensor
    """(B, 3) final translation."""
    ransac_status: torch.Tensor
    """(B,) int64 :class:`bpnp.geometry.ransac.RansacStatus` (0 = ok), or ``NOT_RUN`` (-1) when the
    forward was asked for ``P`` only (``pose=False``; then ``R0``, ``t0``, ``R``, ``t`` are NaN)."""
    ransac_inliers: torch.Tensor
    """(B,) int64 inlier pairs of the RANSAC pose."""
    pnp_status: torch.Tensor
    """(B,) int64 :class:`bpnp.nodes.Status` of the refinement, or ``NOT_RUN`` (-1)."""
    pnp_iterations: torch.Tensor
    """(B,) int64 refinement iterations (0 when not run)."""
    sinkhorn_iterations: torch.Tensor
    """(B,) int64 Sinkhorn iterations."""
    sinkhorn_converged: torch.Tensor
    """(B,) bool."""
    sinkhorn_status: torch.Tensor
    """(B,) int64 :class:`bpnp.nodes.Status` of the OT forward."""
    refined: bool
    """Whether the refinement node ran."""
    P_aug: torch.Tensor | None = None
    """(B, m + 1, n + 1) plan with the outlier bins as last row and column (mass 1 in all), or
    None without bins."""
    inlier2d: torch.Tensor | None = None
    """(B, m) probability that each 2D point has a match (1 - its bin mass), None without bins."""
    inlier3d: torch.Tensor | None = None
    """(B, n) probability that each 3D point is observed, None without bins."""
    R_ransac: torch.Tensor | None = None
    """(B, 3, 3) RANSAC's own pose when the pose search ran (then ``R0`` is the search's), else None."""
    t_ransac: torch.Tensor | None = None
    """(B, 3) its translation, or None."""
    search_matches: torch.Tensor | None = None
    """(B, m) int64 3D index per 2D point under the searched pose (-1 = none), None without search."""
    second_pass: torch.Tensor | None = None
    """(B,) int64 with ``search.second_pass``: 1 = the pose came from the second pass, 0 = the
    first pass's pose was kept, -1 = the second pass did not run for the item; else None."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __getitem__(self, key: str) -> Any:  # dict-style access for convenience
        return getattr(self, key)


def feature_cost(f2d: torch.Tensor, f3d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``M_ij = ||f2d_i - f3d_j||`` for unit features laid out (B, C, m) and (B, C, n).

    Computed as ``sqrt(max(2 - 2 f2d_i . f3d_j, eps))``: one batched matmul; the floor keeps the
    gradient of the square root finite when two features coincide.
    """
    dots = f2d.transpose(1, 2) @ f3d
    return torch.sqrt((2.0 - 2.0 * dots).clamp_min(eps))


def _masked_similarity_normalise(x3: torch.Tensor, mask3d: torch.Tensor) -> torch.Tensor:
    """(B, 3, n) points centred on the masked centroid and scaled by the masked RMS distance to
    it; 0 at padding."""
    centre, rms = masked_rms_radius(x3, mask3d)  # (B, 3, 1), (B, 1, 1)
    real = mask3d[:, None, :]
    zero = torch.zeros((), dtype=x3.dtype, device=x3.device)
    x3 = torch.where(real, x3, zero)  # no NaN/Inf of the padding reaches a gradient
    return torch.where(real, (x3 - centre) / rms, zero)


class BlindPnPNet(nn.Module):
    """The end-to-end blind-PnP network.

    Args:
        matcher: ``"attention"`` or ``"bpnpnet"`` (module docstring).
        feature_dim: feature width of either matcher (128 in the original).
        depth: attention blocks (``attention``) or residual blocks per encoder (``bpnpnet``; 12
            in the original).
        knn: neighbours of the kNN self-attention (``attention``, >= 1) or of the
            local-geometry stem of both encoders (``bpnpnet``; 0 = none, the original;
            :mod:`bpnp.models.local_geometry`).
        heads: attention heads (``attention`` only; divides ``feature_dim``).
        knn_scale: ``bpnpnet`` only: the stem's offset scale, ``"radius"`` (the set's RMS
            radius) or ``"neighbour"`` (its mean k-th neighbour distance, density-invariant).
        cn_eps: ``bpnpnet`` only: context-normalisation epsilon.
        use_stn: ``bpnpnet`` only: PointNet STN on the 3D branch.
        normalize_3d: ``bpnpnet`` only: similarity-normalise the 3D points before the 3D branch
            (the attention matcher always does).
        sync_batchnorm: synchronise the STN's masked batch-norm statistics across DDP ranks.
        backward: ``"implicit"`` or ``"unrolled"`` for both declarative nodes.
        sinkhorn: the OT node's settings, :class:`bpnp.models.settings.SinkhornSettings`
            (``lam``, ``max_iter``, ``tol``, ``bins``, ``bin_init``), a mapping or the dataclass.
        ransac: :class:`~bpnp.models.settings.RansacSettings` (``num_hypotheses``, ``top_k``,
            ``threshold``, ``refine_steps``, ``guided``, ``guided_neighbours``, ``sample_power``).
        search: :class:`~bpnp.models.settings.SearchSettings`: pose search after RANSAC
            (inference only; :mod:`bpnp.geometry.pose_search`); its pose becomes ``R0``.
        gates: :class:`~bpnp.models.settings.GateSettings`: every angular gate of the three
            above per item relative to the keypoints' angular spread (``relative``;
            :mod:`bpnp.geometry.angular_scale`), or as configured.
        refine: :class:`~bpnp.models.settings.RefineSettings` (``robust``, ``robust_scale``,
            ``max_iter``, ``gate``, ``top_k``, ``in_training``). With ``gate`` the refinement
            weighs only the pairs whose angular residual under the RANSAC pose is below it (a
            diffuse ``P`` puts most of its mass on wrong pairs, and those within a few degrees of
            the RANSAC pose pull the refined pose off it even with a robust kernel;
            docs/experiments.md); with ``top_k`` it keeps the ``k`` largest entries of each row of
            the (gated) ``P`` and solves the paired problem over those ``m k`` pairs, O(m k) per
            iteration (:func:`bpnp.nodes.pnp.gather_pairs`). Both choices are made once and not
            differentiated; the gradient to the kept entries of ``P`` is exact, 0 elsewhere.

    Forward: ``net(batch)`` with a collated batch dict, or ``net(p2d=..., p3d=..., mask2d=...,
    mask3d=...)``; returns :class:`BlindPnPOutput`. Extra keyword arguments: ``refine`` (force on
    or off), ``pose=False`` (stop after Sinkhorn: no RANSAC, no refinement, NaN poses; for
    training steps that need only ``P``), ``generator`` (RANSAC random numbers),
    ``cost_override`` (use this (B, m, n) cost instead of the encoders', e.g. to test the
    geometric layers). :meth:`refine_pose` runs the refinement alone from an earlier output (to
    compare refinement settings without rerunning encoders, Sinkhorn and RANSAC).
    """

    def __init__(
        self,
        matcher: str = "attention",
        feature_dim: int = 128,
        depth: int = 3,
        knn: int = 16,
        heads: int = 4,
        knn_scale: str = "radius",
        cn_eps: float = 1e-3,
        use_stn: bool = True,
        normalize_3d: bool = True,
        sync_batchnorm: bool = False,
        backward: str = "implicit",
        sinkhorn: Mapping[str, Any] | SinkhornSettings | None = None,
        ransac: Mapping[str, Any] | RansacSettings | None = None,
        refine: Mapping[str, Any] | RefineSettings | None = None,
        search: Mapping[str, Any] | SearchSettings | None = None,
        gates: Mapping[str, Any] | GateSettings | None = None,
    ) -> None:
        super().__init__()
        check_net_config(dict(matcher=matcher, feature_dim=feature_dim, depth=depth, knn=knn, heads=heads,
                              knn_scale=knn_scale, cn_eps=cn_eps, use_stn=use_stn, normalize_3d=normalize_3d,
                              sync_batchnorm=sync_batchnorm, backward=backward), prefix="BlindPnPNet")
        self.sinkhorn_settings = _group(SinkhornSettings, sinkhorn, "sinkhorn")
        self.matcher_name, self.bins, self.backward = matcher, self.sinkhorn_settings.bins, backward
        self.stn = None
        if matcher == "attention":
            self.matcher = AttentionMatcher(width=feature_dim, blocks=depth, heads=heads, knn=knn)
        else:
            self.encoder2d = PointEncoder(2, feature_dim, depth, cn_eps, knn, knn_scale)
            self.encoder3d = PointEncoder(3, feature_dim, depth, cn_eps, knn, knn_scale)
            self.stn = STN3d(sync_batchnorm=sync_batchnorm) if use_stn else None
        self.normalize_3d = bool(normalize_3d)
        sk = self.sinkhorn_settings
        ot = dict(lam=sk.lam, max_iter=sk.max_iter, tol=sk.tol, backward=backward, overrelax=sk.overrelax,
                  schur=sk.schur)
        if sk.bins == "none":
            self.sinkhorn = SinkhornOT(**ot)
        else:
            self.sinkhorn = SinkhornOTWithBins(bins=sk.bins, bin_init=sk.bin_init, balance=sk.balance_bins, **ot)
        self.configure(ransac=ransac or {}, refine=refine or {}, search=search or {}, gates=gates or {})
        # Stage timings (seconds) of the last forward when ``profile`` is on (bench/train_step.py).
        self.profile = False
        self.last_timings: dict[str, float] = {}

    def configure(self, ransac: Mapping[str, Any] | RansacSettings | None = None,
                  refine: Mapping[str, Any] | RefineSettings | None = None,
                  search: Mapping[str, Any] | SearchSettings | None = None,
                  gates: Mapping[str, Any] | GateSettings | None = None) -> None:
        """Set the inference settings (RANSAC, refinement, pose search, gates) of a built network,
        validated; the weights are untouched. A mapping updates the given keys of the group's current settings
        (its defaults in the constructor).
        Used by the constructor and by tools that compare settings on one network
        (``bpnp.evaluation.tune_robust_scale``)."""
        if ransac is not None:
            self.ransac_settings = _group(RansacSettings, ransac, "ransac", getattr(self, "ransac_settings", None))
            r = self.ransac_settings
            self.ransac_kwargs = dict(num_hypotheses=r.num_hypotheses, top_k=r.top_k, threshold=r.threshold,
                                      refine_steps=r.refine_steps, guided=r.guided, guided_neighbours=r.guided_neighbours,
                                      sample_power=r.sample_power)
        if refine is not None:
            self.refine_settings = f = _group(RefineSettings, refine, "refine", getattr(self, "refine_settings", None))
            self.pnp = PnPRefine(robust=f.robust, robust_scale=f.robust_scale, max_iter=f.max_iter, backward=self.backward,
                                 work_dtype=torch.float64 if f.dtype == "float64" else None)
            self.refine_in_training, self.refine_gate, self.refine_top_k = f.in_training, f.gate, f.top_k
        if search is not None:
            settings = _group(SearchSettings, search, "search", getattr(self, "search_settings", None))
            if settings.second_pass and self.bins == "none":
                raise SettingError("model.net.search.second_pass: needs outlier bins (sinkhorn.bins shared or "
                                   "per_side) to rank the points; this network has sinkhorn.bins none")
            self.search_settings = settings
        if gates is not None:
            self.gate_settings = _group(GateSettings, gates, "gates", getattr(self, "gate_settings", None))

    def settings(self) -> dict[str, Any]:
        """The geometric layers' settings in effect, as the nested config (``sinkhorn``,
        ``ransac``, ``refine``, ``search``, ``gates``) that rebuilds them."""
        return {"sinkhorn": self.sinkhorn_settings.to_dict(), "ransac": self.ransac_settings.to_dict(),
                "refine": self.refine_settings.to_dict(), "search": self.search_settings.to_dict(),
                "gates": self.gate_settings.to_dict()}

    # -- pieces ---------------------------------------------------------------------------------
    def features(self, p2d: torch.Tensor, p3d: torch.Tensor, mask2d: torch.Tensor, mask3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit per-point features ``(B, C, m)``, ``(B, C, n)`` (0 at padding)."""
        if self.matcher_name == "attention":
            return self.matcher(p2d, p3d, mask2d, mask3d)
        x3 = p3d.transpose(1, 2)
        if self.normalize_3d:
            x3 = _masked_similarity_normalise(x3, mask3d)
        if self.stn is not None:
            T = self.stn(x3, mask3d)
            x3 = T.transpose(1, 2) @ x3  # (p T)^T = T^T p^T
        return self.encoder2d(p2d.transpose(1, 2), mask2d), self.encoder3d(x3, mask3d)

    def cost(self, p2d, p3d, mask2d, mask3d) -> torch.Tensor:
        """Cost matrix ``(B, m, n)`` in [0, 2], 0 on padded entries."""
        f2d, f3d = self.features(p2d, p3d, mask2d, mask3d)
        M = feature_cost(f2d, f3d)
        real = mask2d[:, :, None] & mask3d[:, None, :]
        return torch.where(real, M, torch.zeros((), dtype=M.dtype, device=M.device))

    # -- input validation -------------------------------------------------------------------------
    def _check_inputs(self, p2d, p3d, mask2d, mask3d) -> tuple[int, int, int]:
        """Reject malformed input with one message naming the key and the problem, before any
        compute (otherwise it surfaces as a shape/dtype error deep inside a conv layer).

        Legitimate hard instances (too few, collinear, coplanar or duplicated points, points behind
        the camera, all-padding items) are not errors: they get a finite pose and a per-item status.
        """
        ref = next(self.parameters(), None)
        for key, x in (("p2d", p2d), ("p3d", p3d), ("mask2d", mask2d), ("mask3d", mask3d)):
            if x is not None and not isinstance(x, torch.Tensor):
                raise TypeError(f"BlindPnPNet: {key} must be a torch.Tensor, got {type(x).__name__}")
        for key, x, d in (("p2d", p2d, 2), ("p3d", p3d, 3)):
            if x.ndim != 3 or x.shape[-1] != d:
                raise ValueError(f"BlindPnPNet: {key} must have shape (B, {'m' if d == 2 else 'n'}, {d}), "
                                 f"got {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"BlindPnPNet: {key} must be a floating-point tensor, got dtype {x.dtype}")
            if ref is not None and x.dtype != ref.dtype:
                raise TypeError(f"BlindPnPNet: {key} has dtype {x.dtype} but the network's weights are {ref.dtype}; "
                                f"cast the batch (e.g. .to({ref.dtype})) or the network (e.g. net.to({x.dtype}))")
            if ref is not None and x.device != ref.device:
                raise ValueError(f"BlindPnPNet: {key} is on {x.device} but the network is on {ref.device}; "
                                 f"move the batch with .to({str(ref.device)!r})")
        B, m, n = p2d.shape[0], p2d.shape[1], p3d.shape[1]
        if p3d.shape[0] != B:
            raise ValueError(f"BlindPnPNet: p2d and p3d must have the same batch size, got {tuple(p2d.shape)} "
                             f"and {tuple(p3d.shape)}")
        if B == 0:
            raise ValueError("BlindPnPNet: empty batch (B = 0)")
        for key, x, k in (("p2d", p2d, "m"), ("p3d", p3d, "n")):
            if x.shape[1] == 0:
                raise ValueError(f"BlindPnPNet: {key} holds no points ({k} = 0, shape {tuple(x.shape)}); every batch "
                                 f"needs at least one point per side (an item may be all padding: mask False)")
        for key, mask, x, size in (("mask2d", mask2d, p2d, m), ("mask3d", mask3d, p3d, n)):
            if mask is None:
                continue
            if mask.dtype != torch.bool or tuple(mask.shape) != (B, size):
                raise ValueError(f"BlindPnPNet: {key} must be a bool tensor of shape {(B, size)}, "
                                 f"got {mask.dtype} of shape {tuple(mask.shape)}")
            if mask.device != x.device:
                raise ValueError(f"BlindPnPNet: {key} is on {mask.device} but the points are on {x.device}")
        bads = []
        for key, x, mask in (("p2d", p2d, mask2d), ("p3d", p3d, mask3d)):
            bad = ~torch.isfinite(x).all(-1)
            bads.append((key, bad if mask is None else bad & mask))  # padding may hold anything
        # One host sync per batch for both sets (on an accelerator each bool() waits for the
        # device); the message is built only when something is wrong.
        if not bool(torch.stack([bad.any() for _, bad in bads]).any()):
            return B, m, n
        for key, bad in bads:
            if bool(bad.any()):
                items = bad.any(1).nonzero()[:, 0].tolist()
                shown = ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "")
                raise ValueError(f"BlindPnPNet: {key} has {int(bad.sum())} real (unmasked) point(s) with NaN/Inf "
                                 f"coordinates, in item(s) {shown}")
        return B, m, n

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        batch: Mapping[str, torch.Tensor] | None = None,
        *,
        p2d: torch.Tensor | None = None,
        p3d: torch.Tensor | None = None,
        mask2d: torch.Tensor | None = None,
        mask3d: torch.Tensor | None = None,
        refine: bool | None = None,
        pose: bool = True,
        generator: torch.Generator | None = None,
        cost_override: torch.Tensor | None = None,
    ) -> BlindPnPOutput:
        p2d, p3d, mask2d, mask3d = self._unpack(batch, p2d, p3d, mask2d, mask3d)
        B, m, n = p2d.shape[0], p2d.shape[1], p3d.shape[1]
        if refine is None:
            refine = (self.refine_in_training or not self.training) and pose
        if refine and not pose:
            raise ValueError("BlindPnPNet: refine=True needs pose=True (the refinement starts from the RANSAC pose)")
        timer = _Timer(self.profile)

        if cost_override is not None:
            if cost_override.shape != (B, m, n):
                raise ValueError(f"cost_override must have shape {(B, m, n)}, got {tuple(cost_override.shape)}")
            M = cost_override
        else:
            M = self.cost(p2d, p3d, mask2d, mask3d)
        timer.lap("encoders")
        P, P_aug, inlier2d, inlier3d = self._plan(M, mask2d, mask3d)
        info = self.sinkhorn.last_info
        timer.lap("sinkhorn")

        search = self.search_settings if (pose and self.search_settings.enabled and not self.training) else None
        R_ransac = t_ransac = search_matches = second = P_refine = None
        factor = None
        if pose:
            bearings, points = _geometric_inputs(p2d, p3d, mask2d, mask3d)
            factor = self._gate_factor(bearings, mask2d)
            pool = 1 if search is None else max(search.hypotheses, search.rerank_pool)
            rs = ransac_pnp(P.detach(), bearings, points, mask2d, mask3d, generator=generator,
                            top_hypotheses=pool, **self._ransac_call_kwargs(factor))
            R0, t0 = rs.R.to(P.dtype).detach(), rs.t.to(P.dtype).detach()
            ransac_status, ransac_inliers = rs.status, rs.num_inliers
        else:  # training steps that need only P: no pose, NaN so that no metric can mistake it for one
            R0 = torch.full((B, 3, 3), float("nan"), dtype=P.dtype, device=P.device)
            t0 = torch.full((B, 3), float("nan"), dtype=P.dtype, device=P.device)
            ransac_status = torch.full((B,), NOT_RUN, dtype=torch.long, device=P.device)
            ransac_inliers = torch.zeros(B, dtype=torch.long, device=P.device)
        timer.lap("ransac")
        if search is not None:
            ps = self._search_from(rs, P.detach(), bearings, points, mask2d, mask3d, factor)
            timer.lap("search")
            if search.second_pass:
                ps, second, P_second = self._second_pass(P.detach(), inlier2d, inlier3d, p2d, p3d, mask2d, mask3d,
                                                         bearings, points, ps, factor, generator,
                                                         None if cost_override is None else M.detach())
                if search.second_refine == "own":  # the refinement weighs the plan the kept pose came from
                    P_refine = torch.where((second == 1)[:, None, None], P_second.to(P.dtype), P)
                timer.lap("second_pass")
            R_ransac, t_ransac, search_matches = R0, t0, ps.matches
            R0, t0 = ps.R.to(P.dtype), ps.t.to(P.dtype)

        out = BlindPnPOutput(
            P=P, M=M, R0=R0, t0=t0, R=R0, t=t0,
            ransac_status=ransac_status, ransac_inliers=ransac_inliers,
            pnp_status=torch.full((B,), NOT_RUN, dtype=torch.long, device=P.device),
            pnp_iterations=torch.zeros(B, dtype=torch.long, device=P.device),
            sinkhorn_iterations=info.iterations, sinkhorn_converged=info.converged, sinkhorn_status=info.status,
            refined=False, P_aug=P_aug, inlier2d=inlier2d, inlier3d=inlier3d,
            R_ransac=R_ransac, t_ransac=t_ransac, search_matches=search_matches, second_pass=second,
        )
        if refine:
            out = self._refine(out, bearings, points, mask2d, mask3d, factor, P_refine)
        timer.lap("refinement")
        self.last_timings = timer.laps
        return out

    def refine_pose(
        self,
        out: BlindPnPOutput,
        batch: Mapping[str, torch.Tensor] | None = None,
        *,
        p2d: torch.Tensor | None = None,
        p3d: torch.Tensor | None = None,
        mask2d: torch.Tensor | None = None,
        mask3d: torch.Tensor | None = None,
    ) -> BlindPnPOutput:
        """Only the refinement node, from ``out.P`` and the RANSAC pose ``(out.R0, out.t0)`` of an
        earlier forward on the same inputs (given as in :meth:`forward`), with the current
        refinement settings (``self.pnp``). Returns a copy of ``out`` with ``R``, ``t``,
        ``pnp_status``, ``pnp_iterations`` and ``refined`` replaced; the same result as a forward
        with ``refine=True`` and the same RANSAC random numbers.

        Raises:
            ValueError: ``out`` has no RANSAC pose (a ``pose=False`` forward) or does not match
                the inputs' shape.
        """
        p2d, p3d, mask2d, mask3d = self._unpack(batch, p2d, p3d, mask2d, mask3d)
        B, m, n = p2d.shape[0], p2d.shape[1], p3d.shape[1]
        if tuple(out.P.shape) != (B, m, n):
            raise ValueError(f"BlindPnPNet.refine_pose: the output's P has shape {tuple(out.P.shape)} but the "
                             f"inputs give {(B, m, n)}; pass the batch the output came from")
        if bool((out.ransac_status == NOT_RUN).any()):
            raise ValueError("BlindPnPNet.refine_pose: the output has no RANSAC pose (it came from a pose=False "
                             "forward); run the forward with pose=True")
        bearings, points = _geometric_inputs(p2d, p3d, mask2d, mask3d)
        return self._refine(out, bearings, points, mask2d, mask3d, self._gate_factor(bearings, mask2d))

    def _gate_factor(self, bearings: torch.Tensor, mask2d: torch.Tensor) -> torch.Tensor | None:
        """(B,) float64 factor of every angular gate (``gates.relative``), else None."""
        g = self.gate_settings
        if not g.relative:
            return None
        # Capped so that the widest gate (search.start_threshold) stays below a right angle.
        high = min(g.max_factor, _MAX_GATE / max(self.search_settings.start_threshold, self.ransac_settings.threshold))
        return gate_factor(bearings, mask2d, g.reference, min(g.min_factor, high), high)

    def _ransac_call_kwargs(self, factor: torch.Tensor | None) -> dict[str, Any]:
        """:func:`ransac_pnp`'s keywords with the inlier angle scaled by ``factor`` (:meth:`_gate_factor`)."""
        if factor is None:
            return dict(self.ransac_kwargs)
        return {**self.ransac_kwargs, "threshold": self.ransac_kwargs["threshold"] * factor}

    def _search_call_kwargs(self, factor: torch.Tensor | None) -> dict[str, Any]:
        """:func:`pose_search`'s keywords from ``search`` and the gate factor."""
        s = self.search_settings
        return dict(iterations=s.iterations, threshold=s.threshold, start_threshold=max(s.start_threshold, s.threshold),
                    prior_weight=s.prior_weight, solve_steps=s.solve_steps, gate_factor=factor)

    def _plan(self, M, mask2d, mask3d):
        """The OT node on the costs ``M``: ``(P, P_aug, inlier2d, inlier3d)`` (the last three None
        without bins)."""
        if self.bins == "none":
            r, c = uniform_marginals(mask2d, mask3d, M.dtype)
            return self.sinkhorn(M, r, c), None, None, None
        split = split_bins(self.sinkhorn(M, mask2d, mask3d), mask2d, mask3d)
        return split.P, split.P_aug, split.row_inlier, split.col_inlier

    def _second_pass(self, P, inlier2d, inlier3d, p2d, p3d, mask2d, mask3d, bearings, points, first,
                     factor: torch.Tensor | None, generator: torch.Generator | None,
                     cost_override: torch.Tensor | None = None):
        """Match again on the likeliest inliers, keep the better pose (``search.second_pass``).

        Why: the attention matcher sees every point at once, so at many outliers the outliers
        blur the features of the inliers too; on the points its bins find likeliest to have a
        partner the inlier share is much higher (``python -m bpnp.evaluation.bin_ranking``) and the
        matching sharper (docs/experiments.md "Session 16"). The subset's pose is judged
        on all points under the first ``P``, so a wrong subset cannot replace a better first pose.

        Args:
            P: (B, m, n) first-pass soft matches; inlier2d, inlier3d: (B, m), (B, n) its bins'
                inlier probabilities; p2d, p3d, masks: the forward's inputs; bearings, points:
                their geometric form; first: the first pass's :class:`PoseSearchResult`;
                factor: (B,) gate factors of the full inputs (kept for the subset: same camera);
                cost_override: the forward's given costs (B, m, n), if any: the subset's costs are
                then their block of the kept points (the geometric layers' tests), not the matcher's.

        Returns:
            ``(result, which, P_second)``: the selected :class:`PoseSearchResult` per item, (B,)
            int64 (1 = the second pass's pose, 0 = the first's, -1 = not run for the item) and,
            with ``second_refine: own``, (B, m, n) the second pass's plan on the kept points in the
            full indices (0 elsewhere, and for items it did not run on), else None.
        """
        s = self.search_settings
        B = P.shape[0]
        which = torch.full((B,), -1, dtype=torch.long, device=P.device)
        run = torch.ones(B, dtype=torch.bool, device=P.device)
        if s.second_below is not None:
            run = first.consensus.to(torch.float64) < s.second_below * mask2d.sum(1).to(torch.float64)
        items = run.nonzero().flatten()
        P_second = torch.zeros_like(P) if s.second_refine == "own" else None
        if len(items) == 0:
            return first, which, P_second
        i2, k2 = likeliest_points(inlier2d[items], mask2d[items], s.second_keep_2d)
        i3, k3 = likeliest_points(inlier3d[items], mask3d[items], s.second_keep_3d)
        sub2d = torch.gather(p2d[items], 1, i2.unsqueeze(-1).expand(-1, -1, p2d.shape[-1]))
        sub3d = torch.gather(p3d[items], 1, i3.unsqueeze(-1).expand(-1, -1, 3))
        f = None if factor is None else factor[items]
        with torch.no_grad():
            if cost_override is None:
                M2 = self.cost(sub2d, sub3d, k2, k3)
            else:
                M2 = torch.gather(cost_override[items], 1, i2.unsqueeze(-1).expand(-1, -1, cost_override.shape[2]))
                M2 = torch.gather(M2, 2, i3.unsqueeze(1).expand(-1, M2.shape[1], -1))
            P2 = self._plan(M2, k2, k3)[0]
            b2, x2 = _geometric_inputs(sub2d, sub3d, k2, k3)
            kw = self._ransac_call_kwargs(f)
            if s.second_hypotheses is not None:
                kw["num_hypotheses"] = s.second_hypotheses
            pool = max(s.hypotheses, s.rerank_pool)
            rs = ransac_pnp(P2, b2, x2, k2, k3, generator=generator, top_hypotheses=pool, **kw)
            ps2 = self._search_from(rs, P2, b2, x2, k2, k3, f)
            # Both poses judged on all points of the item under the first pass's P.
            R2 = torch.stack([first.R[items], ps2.R.to(first.R.dtype)], 1)
            t2 = torch.stack([first.t[items], ps2.t.to(first.t.dtype)], 1)
            chosen = select_by_consensus(P[items], bearings[items], points[items], mask2d[items], mask3d[items],
                                         R2, t2, threshold=s.threshold, prior_weight=s.prior_weight, gate_factor=f)
        which[items] = chosen.hypothesis
        out = [x.clone() for x in first]
        for dst, src in zip(out, chosen):
            dst[items] = src.to(dst.dtype)
        if P_second is None:
            return PoseSearchResult(*out), which, None
        # P2 back into the full (m, n) indices; padded slots of the subset scatter 0 onto index 0 first.
        P2 = torch.where((k2[:, :, None] & k3[:, None, :]), P2, torch.zeros((), dtype=P2.dtype))
        full = torch.zeros(len(items), P.shape[1], P2.shape[2], dtype=P.dtype, device=P.device)
        full.scatter_add_(1, i2.unsqueeze(-1).expand(-1, -1, P2.shape[2]), P2.to(P.dtype))
        P_second[items] = torch.zeros(len(items), P.shape[1], P.shape[2], dtype=P.dtype, device=P.device).scatter_add_(
            2, i3.unsqueeze(1).expand(-1, P.shape[1], -1), full)
        return PoseSearchResult(*out), which, P_second

    def _search_from(self, rs, P, bearings, points, mask2d, mask3d, factor: torch.Tensor | None) -> PoseSearchResult:
        """The pose search from RANSAC's result ``rs`` (its ranked pool of poses, or its one pose):
        the starts of :meth:`_search_starts`, then :func:`pose_search` with the search settings."""
        R_top = rs.R_top if rs.R_top is not None else rs.R[:, None]
        t_top = rs.t_top if rs.t_top is not None else rs.t[:, None]
        R_top, t_top = self._search_starts(P, bearings, points, mask2d, mask3d, R_top, t_top, factor)
        return pose_search(P, bearings, points, mask2d, mask3d, R_top, t_top, **self._search_call_kwargs(factor))

    def _search_starts(self, P, bearings, points, mask2d, mask3d, R_pool: torch.Tensor, t_pool: torch.Tensor,
                       factor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pose search's ``search.hypotheses`` starts from RANSAC's best-ranked pool (b, k, 3, 3),
        (b, k, 3): re-ranked by row support when the pool is larger (``search.rerank_pool``), else
        the pool as it is."""
        s = self.search_settings
        if R_pool.shape[1] <= s.hypotheses:
            return R_pool, t_pool
        gate = s.threshold if factor is None else s.threshold * factor
        return rerank_by_row_support(P, bearings, points, mask2d, mask3d, R_pool, t_pool, s.hypotheses,
                                     partners=s.rerank_partners, threshold=gate)

    def _refine(self, out: BlindPnPOutput, bearings, points, mask2d, mask3d,
                factor: torch.Tensor | None, P: torch.Tensor | None = None) -> BlindPnPOutput:
        """The refinement node from ``out``'s pose; ``factor`` is :meth:`_gate_factor` of these
        inputs (computed once per forward, shared with RANSAC and the search); ``P`` the soft
        matches it weighs (default ``out.P``; the second pass's plan where its pose was kept)."""
        P = out.P if P is None else P
        bearings, points = bearings.to(P.dtype), points.to(P.dtype)
        if out.search_matches is not None and self.search_settings.refine_on_matches:
            # The search's one-to-one matches, weight 1 / m each (items with fewer than 4 keep P).
            sm = out.search_matches
            hard = torch.zeros_like(P).scatter(2, sm.clamp_min(0).unsqueeze(-1),
                                               (sm >= 0).to(P.dtype).unsqueeze(-1) / max(P.shape[1], 1))
            enough = ((sm >= 0).sum(1) >= 4)[:, None, None]
            P = torch.where(enough, hard, P)
        kernel_factor = None if factor is None else factor * factor  # the scale is in 1 - cos units
        if self.refine_gate is not None:
            gate = self.refine_gate if factor is None else (self.refine_gate * factor).clamp_max(_MAX_GATE)
            P = P * _consensus_mask(bearings, points, out.R0, out.t0, gate).to(P.dtype)
        if self.refine_top_k is None:
            res = self.pnp(P, bearings, points, out.R0, out.t0, mask2d, mask3d, scale_factor=kernel_factor)
        else:  # sparse: the top-k pairs of each row, chosen once; padding keeps weight 0
            real = mask2d[:, :, None] & mask3d[:, None, :]
            P = torch.where(real, P, torch.zeros((), dtype=P.dtype, device=P.device))
            res = self.pnp(*gather_pairs(P, bearings, points, self.refine_top_k), out.R0, out.t0,
                           scale_factor=kernel_factor)
        return replace(out, R=res.R, t=res.t, pnp_status=res.status, pnp_iterations=res.iterations, refined=True)

    def _unpack(self, batch, p2d, p3d, mask2d, mask3d):
        """Inputs from a batch dict and/or keywords (keywords win), validated, with all-True masks
        where none are given."""
        if batch is not None:
            if not isinstance(batch, Mapping):
                raise TypeError(f"BlindPnPNet: batch must be a dict of tensors (bpnp.data.collate_scenes), "
                                f"got {type(batch).__name__}")
            p2d = batch.get("p2d") if p2d is None else p2d
            p3d = batch.get("p3d") if p3d is None else p3d
            mask2d = batch.get("mask2d") if mask2d is None else mask2d
            mask3d = batch.get("mask3d") if mask3d is None else mask3d
        if p2d is None or p3d is None:
            missing = [k for k, v in (("p2d", p2d), ("p3d", p3d)) if v is None]
            raise ValueError(f"BlindPnPNet: the batch has no {' and no '.join(repr(k) for k in missing)} "
                             "(pass a collated batch dict or p2d=..., p3d=... tensors)")
        B, m, n = self._check_inputs(p2d, p3d, mask2d, mask3d)
        if mask2d is None:
            mask2d = torch.ones(B, m, dtype=torch.bool, device=p2d.device)
        if mask3d is None:
            mask3d = torch.ones(B, n, dtype=torch.bool, device=p3d.device)
        return p2d, p3d, mask2d, mask3d


@torch.no_grad()
def _group(cls, value, name: str, current=None):
    """A settings dataclass from a mapping over ``current`` (validated; ``BlindPnPNet.<name>.<key>``
    in errors), or the dataclass as given."""
    if isinstance(value, cls):
        return value
    base = current.to_dict() if current is not None else {}
    return cls.from_mapping({**base, **dict(value or {})}, f"BlindPnPNet.{name}")


def _consensus_mask(bearings: torch.Tensor, points: torch.Tensor, R: torch.Tensor, t: torch.Tensor,
                    gate: float | torch.Tensor) -> torch.Tensor:
    """(B, m, n) bool: pairs whose angle between bearing ``b_i`` (B, m, 3) and the ray to
    ``R p_j + t`` is below ``gate`` radians (one number, or (B,) per item; so also in front of the
    camera); all True for an item without such a pair (or without a finite pose), which then
    keeps its full weights."""
    x = points @ R.transpose(1, 2) + t[:, None, :]
    rays = torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
    cos_gate = torch.cos(gate).to(x.dtype)[:, None, None] if isinstance(gate, torch.Tensor) else math.cos(gate)
    keep = (bearings @ rays.transpose(1, 2)) > cos_gate
    none = ~keep.flatten(1).any(1) | ~torch.isfinite(R).flatten(1).all(1) | ~torch.isfinite(t).all(1)
    return keep | none[:, None, None]


def likeliest_points(score: torch.Tensor, mask: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item the ``ceil(keep x real count)`` real points of largest ``score`` (at least 4, at
    most all): ``(index, mask)`` (b, k) into the point dimension, padded with valid indices and
    mask False, in the points' original order."""
    real = mask.sum(1)
    count = torch.minimum(real, torch.clamp(torch.ceil(keep * real.to(torch.float64)).long(), min=4))
    k = max(int(count.max()), 1)
    ranked = torch.where(mask, score.to(torch.float64), torch.full_like(score, -math.inf, dtype=torch.float64))
    idx = ranked.topk(k, dim=1).indices
    keep_mask = torch.arange(k, device=mask.device)[None] < count[:, None]
    idx = torch.where(keep_mask, idx, torch.full_like(idx, mask.shape[1]))  # push padding last in the sort
    idx, order = idx.sort(1)
    keep_mask = torch.gather(keep_mask, 1, order)
    return torch.where(keep_mask, idx, torch.zeros_like(idx)), keep_mask


def _geometric_inputs(p2d, p3d, mask2d, mask3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit bearings ``(B, m, 3)`` of the camera-normalised 2D points and the raw 3D points
    ``(B, n, 3)``, both zero at padding (what RANSAC and the refinement see)."""
    zero = torch.zeros((), dtype=p2d.dtype, device=p2d.device)
    return to_bearings(torch.where(mask2d[..., None], p2d, zero)), torch.where(mask3d[..., None], p3d, zero)


class _Timer:
    def __init__(self, on: bool) -> None:
        self.on, self.laps = on, {}
        if on:
            import time

            self._clock = time.perf_counter
            self._t = self._clock()

    def lap(self, name: str) -> None:
        if self.on:
            now = self._clock()
            self.laps[name] = now - self._t
            self._t = now
