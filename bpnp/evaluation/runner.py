r"""The evaluation loop: one instance at a time through the model and the baselines.

Each instance is collated alone (batch 1, so no padding at all: any ``m``, ``n``, up to thousands
of points per side, gives exactly the result of the model on that instance), run through the
model under ``torch.no_grad``, and scored with :func:`bpnp.geometry.metrics.pose_errors` in
float64 against the scene's float64 ground truth.

**Model interface** (narrow on purpose; :class:`bpnp.models.BlindPnPNet` satisfies it, and tests
use stand-ins): ``model(batch, generator=g)`` on a collated batch of one returns an object with
attributes ``P`` (1, m, n), ``M`` (1, m, n), ``R0``/``R`` (1, 3, 3), ``t0``/``t`` (1, 3),
``ransac_status``, ``ransac_inliers``, ``pnp_status`` (1,). The baselines reuse the model's
``pnp`` node (:class:`bpnp.nodes.PnPRefine`) and ``ransac_kwargs`` (a dict for
:func:`~bpnp.geometry.ransac.ransac_pnp`) when it has them, defaults otherwise. When the model
has a ``profile`` flag it is switched on and ``last_timings`` (seconds per stage) splits the
forward time between the methods that share it.

**Methods and their time** (``time_s``, seconds per instance, excluding data loading and metrics):

=============  ============================================================================
``model``      the model's forward pass (encoders, Sinkhorn, RANSAC, refinement)
``ransac``     the model's RANSAC pose ``(R0, t0)``; time = forward minus its refinement stage
``oracle``     true correspondences -> RANSAC -> refinement; its own compute only
``hungarian``  Hungarian assignment on ``M`` -> RANSAC -> refinement; the cost stage of the
               forward (when profiled) plus its own compute
=============  ============================================================================

Randomness: every RANSAC call of instance ``index`` draws from ``seeded_generator(seed, index)``,
seeded with ``seed * 1_000_003 + index``, so an instance's numbers do not depend on which other instances
are evaluated, or in what order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from bpnp.data.collate import collate_scenes
from bpnp.evaluation.baselines import BaselinePose, hungarian_pose, oracle_pose
from bpnp.geometry.metrics import pose_errors
from bpnp.geometry.ransac import seeded_generator
from bpnp.geometry.correspondences import match_accuracy  # the training metric, for one instance
from bpnp.nodes import PnPRefine

__all__ = ["METHODS", "EvalSettings", "Overlay", "evaluate_instances", "instance_errors"]

#: Every method the runner knows; ``model`` always runs.
METHODS = ("model", "ransac", "oracle", "hungarian", "nosearch")

#: The network's timed stages after RANSAC (``BlindPnPNet.last_timings``): the ``ransac`` and
#: ``nosearch`` rows' times leave them out.
_AFTER_RANSAC = ("search", "second_pass", "refinement")


@dataclass
class EvalSettings:
    """Knobs of :func:`evaluate_instances` (``configs/evaluate.yaml`` maps onto these).

    Attributes:
        device: torch device for the model and the baselines.
        baselines: which of ``ransac``, ``oracle``, ``hungarian``, ``nosearch`` to run
            (``nosearch``: the network with its pose search switched off, i.e. the refinement
            from RANSAC's own pose; only where the search ran).
        baseline_dtype: working dtype of the oracle/Hungarian RANSAC and refinement.
        hungarian_weights: ``"P"`` or ``"uniform"`` (see :func:`~bpnp.evaluation.baselines.hungarian_pose`).
        seed: base seed of the RANSAC generators.
        warmup: untimed forward passes on the first instance before timing (lazy initialisation,
            allocator and kernel caches would otherwise land in the first instance's time).
        num_overlays: how many instances (the first ones) keep data for correspondence plots.
        overlay_pairs: how many top correspondences of ``P`` each overlay keeps.
        progress_every: print a progress line every this many instances (0 = never).
    """

    device: str = "cpu"
    baselines: Sequence[str] = ("oracle", "ransac", "hungarian")
    baseline_dtype: torch.dtype = torch.float64
    hungarian_weights: str = "P"
    seed: int = 0
    warmup: int = 1
    num_overlays: int = 4
    overlay_pairs: int = 50
    progress_every: int = 10

    def __post_init__(self) -> None:
        unknown = set(self.baselines) - set(METHODS[1:])
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)} (known: {list(METHODS[1:])})")


@dataclass
class Overlay:
    """Data of one instance for a correspondence plot (numpy, float64 unless stated).

    ``pairs`` (k, 2) int64 are the top-``k`` (2D index, 3D index) entries of ``P`` by value,
    ``weights`` (k,) their ``P``; ``R``/``t`` the model's estimate.
    """

    name: str
    p2d: np.ndarray
    p3d: np.ndarray
    R_gt: np.ndarray
    t_gt: np.ndarray
    match: np.ndarray
    pairs: np.ndarray
    weights: np.ndarray
    R: np.ndarray
    t: np.ndarray
    K: np.ndarray | None = None
    image_size: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def instance_errors(R: np.ndarray | torch.Tensor, t: np.ndarray | torch.Tensor, scene: Mapping[str, Any]) -> dict[str, Any]:
    """Contract errors (docs/metrics.md) of one estimate on one scene, float64 on the CPU.

    Args:
        R: (3, 3) estimated rotation; t: (3,) translation (numpy or CPU tensors).
        scene: scene dict (``R``, ``t``, ``p3d``, ``match``).

    Returns:
        ``{"rot_err_deg", "t_err", "center_err_rel": float, "success": bool}``.
    """
    f64 = torch.float64
    out = pose_errors(
        torch.as_tensor(np.asarray(R, dtype=np.float64)).reshape(1, 3, 3),
        torch.as_tensor(np.asarray(t, dtype=np.float64)).reshape(1, 3),
        torch.as_tensor(scene["R"], dtype=f64).reshape(1, 3, 3),
        torch.as_tensor(scene["t"], dtype=f64).reshape(1, 3),
        torch.as_tensor(scene["p3d"], dtype=f64)[None],
        torch.as_tensor(scene["match"], dtype=torch.int64)[None],
        torch.ones(1, len(scene["match"]), dtype=torch.bool),
    )
    return {
        "rot_err_deg": float(out["rot_err_deg"][0]),
        "t_err": float(out["t_err"][0]),
        "center_err_rel": float(out["center_err_rel"][0]),
        "success": bool(out["success"][0]),
    }


def _topk_pairs(P: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of an (m, n) matrix: (k, 2) int64 (row, col) and (k,) values."""
    n = P.shape[1]
    k = max(0, min(int(k), P.numel()))
    vals, flat = P.reshape(-1).topk(k)
    pairs = torch.stack([flat // n, flat % n], dim=1)
    return pairs.cpu().numpy().astype(np.int64), vals.double().cpu().numpy()


def _precision(pairs_2d: np.ndarray, pairs_3d: np.ndarray, match: np.ndarray) -> float:
    """Fraction of the given pairs that are true correspondences (NaN with no pair)."""
    if len(pairs_2d) == 0:
        return float("nan")
    return float(np.mean(np.asarray(match)[pairs_2d] == pairs_3d))


def _baseline_nodes(model: Any) -> tuple[PnPRefine, dict[str, Any]]:
    refine = getattr(model, "pnp", None)
    if not isinstance(refine, PnPRefine):
        refine = PnPRefine()
    ransac_kwargs = dict(getattr(model, "ransac_kwargs", None) or {})
    return refine, ransac_kwargs


def _base_record(name: str, index: int, scene: Mapping[str, Any], frac: tuple[float, float]) -> dict[str, Any]:
    match = np.asarray(scene["match"])
    return {
        "scene": name, "index": int(index), "frac_2d": float(frac[0]), "frac_3d": float(frac[1]),
        "m": int(len(scene["p2d"])), "n": int(len(scene["p3d"])),
        "num_true_inliers": int(np.sum(match >= 0)),
    }


def _forward(model: Any, scene: Mapping[str, Any], device: torch.device, generator: torch.Generator):
    batch = {k: v.to(device) for k, v in collate_scenes([scene]).items()}
    _sync(device)
    start = time.perf_counter()
    out = model(batch, generator=generator)
    _sync(device)
    return out, time.perf_counter() - start


def evaluate_instances(
    model: Any,
    dataset: Any,
    names: Sequence[str],
    settings: EvalSettings,
    *,
    frac: tuple[float, float] = (0.0, 0.0),
    indices: Sequence[int] | None = None,
    log: Callable[[str], None] | None = print,
    on_instance: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[Overlay]]:
    """Run the model and the baselines on every instance of ``dataset``.

    Args:
        model: see the module docstring; put in ``eval()`` mode here.
        dataset: indexable of scene dicts (numpy arrays, the scene-file keys of docs/data.md).
        names: a name per dataset item (CSV ``scene`` column).
        settings: :class:`EvalSettings`.
        frac: (2D, 3D) added-outlier fractions, recorded in each record (for sweeps).
        indices: which items (default all, in order).
        log: progress printer (None = silent).
        on_instance: called with the records of each instance once all its methods have run
            (``evaluate.py`` appends them to ``instances.csv`` there, so an interrupted run keeps
            every finished instance; an instance cut short leaves no record).

    Returns:
        ``(records, overlays)``: one record per (instance, method), keys of
        :data:`bpnp.evaluation.report.CSV_COLUMNS`; and up to ``settings.num_overlays``
        :class:`Overlay` of the first instances.

    Raises:
        whatever loading an item raises (e.g. ``SceneFileError`` naming a bad scene file).
    """
    device = torch.device(settings.device)
    if hasattr(model, "eval"):
        model.eval()
    if hasattr(model, "profile"):
        model.profile = True  # stage timings; costs one perf_counter per stage
    refine, ransac_kwargs = _baseline_nodes(model)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    records: list[dict[str, Any]] = []
    overlays: list[Overlay] = []
    geo_kwargs = dict(refine=refine, ransac_kwargs=ransac_kwargs, dtype=settings.baseline_dtype, device=device)

    with torch.no_grad():
        for pos, index in enumerate(indices):
            scene = dataset[index]
            name = str(names[index]) if index < len(names) else str(index)
            if pos == 0:
                for _ in range(int(settings.warmup)):
                    _forward(model, scene, device, seeded_generator(settings.seed, index, device))
            out, dt = _forward(model, scene, device, seeded_generator(settings.seed, index, device))
            timings = dict(getattr(model, "last_timings", None) or {})
            base = _base_record(name, index, scene, frac)
            done = len(records)
            records.extend(_model_records(out, dt, timings, base, scene, settings))
            if "nosearch" in settings.baselines and getattr(out, "R_ransac", None) is not None:
                records.append(_nosearch_record(model, out, scene, device, base, dt, timings))
            if "oracle" in settings.baselines:
                gen = seeded_generator(settings.seed, index, device)
                _sync(device)
                start = time.perf_counter()
                pose = oracle_pose(scene, generator=gen, **geo_kwargs)
                _sync(device)
                records.append(_baseline_record(base, "oracle", pose, scene, time.perf_counter() - start))
            if "hungarian" in settings.baselines:
                gen = seeded_generator(settings.seed, index, device)
                M = out.M[0].detach().double().cpu().numpy()
                P = out.P[0].detach().double().cpu().numpy()
                start = time.perf_counter()
                pose = hungarian_pose(scene, M, P, weights=settings.hungarian_weights, generator=gen, **geo_kwargs)
                _sync(device)
                # The cost M is part of the method: add the forward's encoder stage when known.
                own = time.perf_counter() - start + float(timings.get("encoders", 0.0))
                records.append(_baseline_record(base, "hungarian", pose, scene, own))
            if on_instance is not None:
                on_instance(records[done:])
            if len(overlays) < int(settings.num_overlays):
                overlays.append(_overlay(name, scene, out, int(settings.overlay_pairs)))
            if log is not None and settings.progress_every and ((pos + 1) % int(settings.progress_every) == 0
                                                                 or pos + 1 == len(indices)):
                rate = np.mean([r["success"] for r in records if r["method"] == "model"])
                log(f"[evaluate] {pos + 1}/{len(indices)} instances (outliers {frac[0]:g}/{frac[1]:g}): "
                    f"model success {rate:.3f}")
    return records, overlays


def _model_records(out: Any, dt: float, timings: Mapping[str, float], base: Mapping[str, Any],
                   scene: Mapping[str, Any], settings: EvalSettings) -> list[dict[str, Any]]:
    """Records of the model's final pose and (if asked) of its RANSAC pose."""
    match = np.asarray(scene["match"])
    pairs, _ = _topk_pairs(out.P[0].detach(), max(base["num_true_inliers"], 1))
    prec = _precision(pairs[:, 0], pairs[:, 1], match)
    shared = {"ransac_inliers": int(out.ransac_inliers[0]), "pair_precision": prec,
              "match_acc": float(match_accuracy(out.P[:1].detach().cpu(), torch.as_tensor(match)[None])[0]),
              "ransac_status": int(out.ransac_status[0])}
    recs = [{**base, "method": "model", **instance_errors(out.R[0].detach().cpu(), out.t[0].detach().cpu(), scene),
             **shared, "time_s": dt, "pnp_status": int(out.pnp_status[0])}]
    if "ransac" in settings.baselines:  # RANSAC's own pose (before the pose search, when it ran)
        R_r = out.R0 if getattr(out, "R_ransac", None) is None else out.R_ransac
        t_r = out.t0 if getattr(out, "t_ransac", None) is None else out.t_ransac
        spent = sum(float(timings.get(k, 0.0)) for k in _AFTER_RANSAC)
        recs.append({**base, "method": "ransac",
                     **instance_errors(R_r[0].detach().cpu(), t_r[0].detach().cpu(), scene), **shared,
                     "time_s": max(dt - spent, 0.0), "pnp_status": -1})
    return recs


def _nosearch_record(model: Any, out: Any, scene: Mapping[str, Any], device: torch.device, base: Mapping[str, Any],
                     dt: float, timings: Mapping[str, float]) -> dict[str, Any]:
    """The network without its pose search: the refinement node from RANSAC's own pose (the same
    forward otherwise), so search on / off compare on the same encoders, plan and RANSAC draw."""
    batch = {k: v.to(device) for k, v in collate_scenes([scene]).items()}
    plain = replace(out, R0=out.R_ransac, t0=out.t_ransac, R_ransac=None, t_ransac=None, search_matches=None,
                    second_pass=None)
    start = time.perf_counter()
    refined = model.refine_pose(plain, batch)
    _sync(device)
    own = max(dt - sum(float(timings.get(k, 0.0)) for k in _AFTER_RANSAC), 0.0)
    match = np.asarray(scene["match"])
    return {**base, "method": "nosearch",
            **instance_errors(refined.R[0].detach().cpu(), refined.t[0].detach().cpu(), scene),
            "ransac_inliers": int(out.ransac_inliers[0]), "ransac_status": int(out.ransac_status[0]),
            "match_acc": float(match_accuracy(out.P[:1].detach().cpu(), torch.as_tensor(match)[None])[0]),
            "time_s": own + time.perf_counter() - start, "pnp_status": int(refined.pnp_status[0])}


def _overlay(name: str, scene: Mapping[str, Any], out: Any, num_pairs: int) -> Overlay:
    P = out.P[0].detach()
    pairs, vals = _topk_pairs(P, min(num_pairs, P.numel()))
    f64 = np.float64
    return Overlay(
        name=name, p2d=np.asarray(scene["p2d"], dtype=f64), p3d=np.asarray(scene["p3d"], dtype=f64),
        R_gt=np.asarray(scene["R"], dtype=f64), t_gt=np.asarray(scene["t"], dtype=f64),
        match=np.asarray(scene["match"]).astype(np.int64), pairs=pairs, weights=vals,
        R=out.R[0].detach().double().cpu().numpy(), t=out.t[0].detach().double().cpu().numpy(),
        K=None if scene.get("K") is None else np.asarray(scene["K"], dtype=f64),
        image_size=None if scene.get("image_size") is None else np.asarray(scene["image_size"]),
    )


def _baseline_record(base: Mapping[str, Any], method: str, pose: BaselinePose, scene: Mapping[str, Any],
                     time_s: float) -> dict[str, Any]:
    return {
        **base, "method": method, **instance_errors(pose.R, pose.t, scene),
        "ransac_inliers": pose.ransac_inliers,
        "pair_precision": _precision(pose.pairs_2d, pose.pairs_3d, np.asarray(scene["match"])),
        "match_acc": float("nan"),  # no plan of its own to rate
        "time_s": time_s, "ransac_status": pose.ransac_status, "pnp_status": pose.pnp_status,
    }
