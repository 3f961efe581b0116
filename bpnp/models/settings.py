"""The network's settings: one owner, one default and one validation for each.

``configs/model/bpnp.yaml`` ``net:`` and a checkpoint's network config are the keyword arguments
of :class:`bpnp.models.network.BlindPnPNet`: the matcher's own keys (``configs/model/net/``) at the
top level, and the geometric layers' settings in groups named after the node they configure
and using its argument names:

==============  ==========================================================================
``sinkhorn``    :class:`SinkhornSettings`: the OT node (``lam``, ``max_iter``, ``tol``,
                ``bins``, ``bin_init``)
``ransac``      :class:`RansacSettings`: :func:`bpnp.geometry.ransac_pnp` (``num_hypotheses``,
                ``top_k``, ``threshold``, ``refine_steps``, ``guided``, ``guided_neighbours``,
                ``sample_power``)
``refine``      :class:`RefineSettings`: :class:`bpnp.nodes.PnPRefine` (``robust``,
                ``robust_scale``, ``max_iter``) and which pairs it weighs (``gate``, ``top_k``)
                and when it runs (``in_training``)
``search``      :class:`SearchSettings`: :func:`bpnp.geometry.pose_search.pose_search`
``gates``       :class:`GateSettings`: the three groups' angular gates relative to the
                keypoints' spread (:mod:`bpnp.geometry.angular_scale`)
==============  ==========================================================================

Every path that sets them goes through :func:`check_net_config` (train.py before any work,
checkpoint loading) or :func:`merge_overrides` (``evaluate.py net_overrides``, ``export_weights
--set``, ``tune_robust_scale``), which name the offending key in one line
(:class:`SettingError`). Checkpoints written before the groups existed hold the flat names
(``lam``, ``robust_scale``, ``ransac_hypotheses``...): :func:`upgrade_flat_config` moves them
into their groups when such a checkpoint is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

from bpnp import values as checks
from bpnp.values import Check

__all__ = ["SettingError", "SinkhornSettings", "RansacSettings", "RefineSettings", "SearchSettings", "GateSettings", "GROUPS", "MATCHERS", "BINS",
           "KERNELS", "check_net_config", "merge_overrides", "upgrade_flat_config", "LEGACY_KEYS"]

MATCHERS = ("attention", "bpnpnet")
BINS = ("none", "shared", "per_side")
KERNELS = ("none", "huber", "geman_mcclure", "tanh")  # bpnp.nodes.robust.KERNELS (checked in a test)
BACKWARDS = ("implicit", "unrolled")
REFINE_DTYPES = ("float64", "input")
SCHUR_SOLVERS = ("cg", "cholesky")  # bpnp.nodes.sinkhorn.SCHUR_SOLVERS (checked in a test)


class SettingError(ValueError):
    """A network setting with a bad value or an unknown name; the message starts with the full
    dotted key (``model.net.sinkhorn.lam: expected a number > 0, got 'abc'``)."""


# -- value checks (bpnp.values, shared with the entry points' config checks); normalised on the way
def _number(*, integer: bool = False, low: float | None = None, high: float | None = None, open_low: bool = False,
            open_high: bool = True, none: bool = False) -> Check:
    """A setting's number (the upper bound open unless ``open_high=False``; ints take none),
    returned as an int or a float."""
    if integer:
        assert high is None and not open_low, "integer settings take an inclusive lower bound only"
        return checks.integer(lo=low, none=none, coerce=True)
    return checks.number(lo=low, hi=high, lo_open=open_low, hi_open=open_high, none=none, coerce=True)


def _choice(options: tuple[str, ...]) -> Check:
    return checks.choice(*options)


_flag = checks.flag()


def _checked(check: Check, key: str, value: Any) -> Any:
    try:
        return check(key, value)
    except checks.ValueCheckError as exc:
        raise SettingError(str(exc)) from None


class _Group:
    """A frozen dataclass of one node's settings: ``from_mapping`` validates and names keys."""

    CHECKS: dict[str, Check] = {}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, prefix: str) -> "_Group":
        values = dict(values or {})
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = [k for k in values if k not in known]
        if unknown:
            raise SettingError(f"{prefix}.{unknown[0]}: unknown setting (known: {', '.join(known)})")
        return cls(**{k: _checked(cls.CHECKS[k], f"{prefix}.{k}", v) for k, v in values.items()})  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class SinkhornSettings(_Group):
    """The OT node (:class:`bpnp.nodes.SinkhornOT`, or :class:`~bpnp.nodes.SinkhornOTWithBins`).

    lam: inverse temperature (1 / entropic regularisation), > 0.
    max_iter, tol: per-item stopping rule (iterations; marginal error).
    bins: outlier bins, ``none`` (uniform marginals, the original), ``shared`` (one learnable bin
        cost) or ``per_side``.
    bin_init: initial bin cost (feature costs lie in [0, 2]; unrelated unit features ~1.4).
    overrelax: over-relaxation factor of the Sinkhorn scaling forward, 1 <= w < 2 (1 = plain
        Sinkhorn). Same plan to ``tol``, fewer iterations. With ``balance_bins``, 1.2: the
        slowest item of a batch needs 11 iterations on the trained network's costs and 7 on a
        random network's (16 and 33 at the former default, 1.4 without the balance step;
        docs/benchmarks.md).
    balance_bins: with bins, the forward's exact dual step along the bins' exchange direction
        per iteration (:func:`bpnp.nodes.sinkhorn_with_bins` ``balance``): same plan to ``tol``,
        on a random network's costs the plain problem's iteration count instead of ~10x it.
    schur: the implicit backward's Schur solve, ``cg`` (preconditioned conjugate gradients to
        ``tol``, dense fallback per item) or ``cholesky`` (dense).
    """

    lam: float = 10.0
    max_iter: int = 100
    tol: float = 1e-6
    bins: str = "shared"
    bin_init: float = 1.0
    overrelax: float = 1.2
    balance_bins: bool = True
    schur: str = "cg"

    CHECKS = {"lam": _number(low=0, open_low=True), "max_iter": _number(integer=True, low=1),
              "tol": _number(low=0, open_low=True), "bins": _choice(BINS), "bin_init": _number(),
              "overrelax": _number(low=1, high=2), "balance_bins": _flag,
              "schur": _choice(SCHUR_SOLVERS)}


@dataclass(frozen=True)
class RansacSettings(_Group):
    """Batched RANSAC (:func:`bpnp.geometry.ransac_pnp`).

    num_hypotheses: minimal samples per item.
    top_k: candidate pairs sampled from (``None``: ``min(1000, ceil(1.5 m))`` per item).
    threshold: inlier angle, radians.
    refine_steps: Gauss-Newton steps on the best hypothesis' inliers.
    guided: fraction of the hypotheses drawn by guided sampling (a P-drawn pair and three of its
        consistent neighbours in 2D and 3D; :func:`bpnp.geometry.ransac_pnp`); 0 = off.
    guided_neighbours: nearest neighbours per side that define a consistent neighbour.
    sample_power: exponent of the sampling weights ``P^sample_power`` (both samplers; scoring
        stays P-weighted); 1 = proportional to ``P``.
    """

    num_hypotheses: int = 512
    top_k: int | None = None
    threshold: float = 0.01
    refine_steps: int = 5
    guided: float = 0.0
    guided_neighbours: int = 16
    sample_power: float = 1.0

    CHECKS = {"num_hypotheses": _number(integer=True, low=1), "top_k": _number(integer=True, low=1, none=True),
              "threshold": _number(low=0, open_low=True, high=math.pi), "refine_steps": _number(integer=True, low=0),
              "guided": _number(low=0, high=1, open_high=False), "guided_neighbours": _number(integer=True, low=3),
              "sample_power": _number(low=0, open_low=True)}


@dataclass(frozen=True)
class RefineSettings(_Group):
    """The pose-refinement node (:class:`bpnp.nodes.PnPRefine`) and the pairs it weighs.

    robust, robust_scale: kernel and its scale in units of ``1 - cos(angle)`` (1e-3 ~ 2.6 deg).
        Geman-McClure by default: a soft ``P`` spreads mass over wrong pairs, and with the
        original's plain weighted error (``none``) that mass biases the pose.
    max_iter: Levenberg-Marquardt iterations per item.
    gate: ``None`` (weigh every pair by ``P``) or an angle in ``(0, pi/2)`` radians: weigh only the
        pairs within it of the RANSAC pose (choose on validation: ``tune_robust_scale --gates``).
    top_k: ``None`` (dense, O(mn) per iteration) or ``k``: keep the ``k`` largest entries of each
        row of the (gated) ``P``, chosen once before the iterations, and solve those ``m k`` pairs.
        4 chosen on validation (docs/benchmarks.md, bench/refine_pairs.py).
    dtype: the refinement's working precision, ``float64`` or ``input`` (the network's, float32):
        with the narrow kernel of the shipped checkpoints (scale 5e-5) float32 needs a median of
        22 LM iterations where float64 needs 4, for the same poses (bench/refine_pairs.py).
    in_training: also refine in training steps that do not ask for it (always on in eval).
    """

    robust: str = "geman_mcclure"
    robust_scale: float = 1e-3
    max_iter: int = 50
    gate: float | None = None
    top_k: int | None = 4
    dtype: str = "float64"
    in_training: bool = False

    CHECKS = {"robust": _choice(KERNELS), "robust_scale": _number(low=0, open_low=True),
              "max_iter": _number(integer=True, low=1), "gate": _number(low=0, open_low=True, high=math.pi / 2, none=True),
              "top_k": _number(integer=True, low=1, none=True), "dtype": _choice(REFINE_DTYPES), "in_training": _flag}


@dataclass(frozen=True)
class SearchSettings(_Group):
    """Pose search after RANSAC (:func:`bpnp.geometry.pose_search.pose_search`; inference only,
    never in training steps): re-match from the pose, re-solve, repeat, keep the largest consensus.

    enabled: run it (eval / inference forwards only).
    hypotheses: how many of RANSAC's poses to search from (without re-ranking its best-ranked
        ones, slot 0 = RANSAC's pose).
    rerank_pool: when larger than ``hypotheses``, RANSAC's ``rerank_pool`` best-ranked poses are
        re-ranked by row support (:func:`bpnp.geometry.pose_search.rerank_by_row_support`, gate
        ``threshold``) and the best ``hypotheses`` are searched from; 0 (or <= hypotheses) = off.
    rerank_partners: the 3D points of largest ``P`` per 2D point that row support tests.
    iterations: re-match / re-solve rounds per hypothesis.
    threshold, start_threshold: final and first matching gate, radians (the gate shrinks
        geometrically between them).
    prior_weight: weight of ``log P`` (the learned matches) in the matching score; 0 = geometry only.
    solve_steps: Gauss-Newton steps per round.
    refine_on_matches: the refinement node weighs the search's matches (one-to-one, weight 1)
        instead of ``P``.
    second_pass: after the search, run the matcher, RANSAC and the search again on the points
        its outlier bins call likeliest inliers, and keep whichever of the two poses has the larger
        consensus on *all* points under the first pass's ``P``
        (:func:`bpnp.geometry.pose_search.select_by_consensus`); needs ``sinkhorn.bins``.
    second_keep_2d, second_keep_3d: the fraction of each item's real 2D / 3D points the second
        pass keeps (those of largest ``inlier2d`` / ``inlier3d``), in (0, 1].
    second_below: run the second pass only for items whose first consensus is below this
        fraction of their real 2D points; null = for every item.
    second_hypotheses: RANSAC hypotheses of the second pass; null = ``ransac.num_hypotheses``.
    second_refine: which soft matches the refinement weighs where the second pass's pose is kept:
        ``first`` (the first pass's ``P``, as elsewhere) or ``own`` (its plan on the kept points;
        no better on validation, docs/experiments.md "Session 16").
    """

    enabled: bool = False
    hypotheses: int = 4
    rerank_pool: int = 0
    rerank_partners: int = 16
    iterations: int = 3
    threshold: float = 0.01
    start_threshold: float = 0.04
    prior_weight: float = 1.0
    solve_steps: int = 5
    refine_on_matches: bool = False
    second_pass: bool = False
    second_keep_2d: float = 0.6
    second_keep_3d: float = 0.8
    second_below: float | None = None
    second_hypotheses: int | None = None
    second_refine: str = "first"

    CHECKS = {"enabled": _flag, "hypotheses": _number(integer=True, low=1), "rerank_pool": _number(integer=True, low=0),
              "rerank_partners": _number(integer=True, low=1), "iterations": _number(integer=True, low=1),
              "threshold": _number(low=0, open_low=True, high=math.pi / 2),
              "start_threshold": _number(low=0, open_low=True, high=math.pi / 2),
              "prior_weight": _number(low=0), "solve_steps": _number(integer=True, low=0),
              "refine_on_matches": _flag, "second_pass": _flag,
              "second_keep_2d": _number(low=0, open_low=True, high=1, open_high=False),
              "second_keep_3d": _number(low=0, open_low=True, high=1, open_high=False),
              "second_below": _number(low=0, open_low=True, high=1, open_high=False, none=True),
              "second_hypotheses": _number(integer=True, low=1, none=True),
              "second_refine": _choice(("own", "first"))}


@dataclass(frozen=True)
class GateSettings(_Group):
    """Angular gates relative to the keypoints' angular spread (:mod:`bpnp.geometry.angular_scale`).

    relative: scale every angular gate of an item (``ransac.threshold``, ``search.threshold`` and
        ``start_threshold``, ``refine.gate``; ``refine.robust_scale`` by the square) by
        ``clamp(spread / reference, min_factor, max_factor)``; off = the configured angles as they are.
    reference: radians, the keypoint spread at which the configured gates hold (the median of the
        validation split they were chosen on).
    min_factor, max_factor: bounds of the factor.
    """

    relative: bool = False
    reference: float = 0.317
    min_factor: float = 0.25
    max_factor: float = 4.0

    CHECKS = {"relative": _flag, "reference": _number(low=0, open_low=True),
              "min_factor": _number(low=0, open_low=True), "max_factor": _number(low=0, open_low=True)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, prefix: str) -> "GateSettings":
        group = super().from_mapping(values, prefix)
        if group.min_factor > group.max_factor:  # type: ignore[attr-defined]
            raise SettingError(f"{prefix}.min_factor: {group.min_factor} exceeds max_factor "  # type: ignore[attr-defined]
                               f"{group.max_factor}")  # type: ignore[attr-defined]
        return group  # type: ignore[return-value]


GROUPS: dict[str, type[_Group]] = {"sinkhorn": SinkhornSettings, "ransac": RansacSettings, "refine": RefineSettings,
                                   "search": SearchSettings, "gates": GateSettings}

#: The matcher's and the network's own (non-group) keys.
TOP_LEVEL: dict[str, Check] = {
    "matcher": _choice(MATCHERS),
    "feature_dim": _number(integer=True, low=1),
    "depth": _number(integer=True, low=1),
    "knn": _number(integer=True, low=0),
    "heads": _number(integer=True, low=1),
    "knn_scale": _choice(("radius", "neighbour")),
    "cn_eps": _number(low=0, open_low=True),
    "use_stn": _flag,
    "normalize_3d": _flag,
    "sync_batchnorm": _flag,
    "backward": _choice(BACKWARDS),
}

#: Flat names of checkpoints written before the groups existed -> (group, name).
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "lam": ("sinkhorn", "lam"), "sinkhorn_max_iter": ("sinkhorn", "max_iter"), "sinkhorn_tol": ("sinkhorn", "tol"),
    "bins": ("sinkhorn", "bins"), "bin_init": ("sinkhorn", "bin_init"),
    "ransac_hypotheses": ("ransac", "num_hypotheses"), "ransac_top_k": ("ransac", "top_k"),
    "ransac_threshold": ("ransac", "threshold"), "ransac_refine_steps": ("ransac", "refine_steps"),
    "robust": ("refine", "robust"), "robust_scale": ("refine", "robust_scale"), "pnp_max_iter": ("refine", "max_iter"),
    "refine_gate": ("refine", "gate"), "refine_top_k": ("refine", "top_k"), "refine_in_training": ("refine", "in_training"),
}


def check_net_config(net: Mapping[str, Any] | None, prefix: str = "model.net") -> dict[str, Any]:
    """Validate a network config (``BlindPnPNet`` keyword arguments, groups nested) and return it
    normalised (ints as ints, groups as plain dicts holding only what was given).

    Raises:
        SettingError: the first unknown key or bad value, named with ``prefix``.
    """
    out: dict[str, Any] = {}
    for key, value in dict(net or {}).items():
        name = f"{prefix}.{key}"
        if key in ("_target_", "_recursive_"):
            out[key] = value
        elif key in GROUPS:
            if value is not None and not isinstance(value, Mapping):
                raise SettingError(f"{name}: expected a mapping of {GROUPS[key].__name__} settings, got {value!r}")
            group = GROUPS[key].from_mapping(value, name)
            out[key] = {k: getattr(group, k) for k in dict(value or {})}
        elif key in TOP_LEVEL:
            out[key] = _checked(TOP_LEVEL[key], name, value)
        elif key in LEGACY_KEYS:
            group, new = LEGACY_KEYS[key]
            raise SettingError(f"{name}: renamed, use {prefix}.{group}.{new}")
        else:
            known = ", ".join([*TOP_LEVEL, *GROUPS])
            raise SettingError(f"{name}: unknown network setting (known: {known})")
    return out


def upgrade_flat_config(net: Mapping[str, Any]) -> dict[str, Any]:
    """A network config of a checkpoint written before the groups existed, with its flat keys
    (:data:`LEGACY_KEYS`) moved into their groups; a config without them is returned as is."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {g: dict(net.get(g) or {}) for g in GROUPS if g in net}
    for key, value in net.items():
        if key in LEGACY_KEYS:
            group, new = LEGACY_KEYS[key]
            groups.setdefault(group, {}).setdefault(new, value)
        elif key not in GROUPS:
            out[key] = value
    out.update(groups)
    return out


def merge_overrides(net: Mapping[str, Any], overrides: Mapping[str, Any] | None,
                    prefix: str = "overrides") -> dict[str, Any]:
    """``net`` with ``overrides`` applied and the result validated: the one path for inference
    settings over a checkpoint's (``evaluate.py net_overrides``, ``export_weights --set``,
    ``tune_robust_scale --set``).

    Override keys are dotted (``refine.robust_scale``) or nested mappings (``{"refine":
    {"robust_scale": 1e-4}}``). Raises :class:`SettingError` naming the key (``prefix.key``).

    Example:
        >>> merge_overrides({"sinkhorn": {"lam": 10.0}}, {"refine.gate": 0.05, "ransac": {"num_hypotheses": 2048}})
        {'sinkhorn': {'lam': 10.0}, 'refine': {'gate': 0.05}, 'ransac': {'num_hypotheses': 2048}}
    """
    out = {k: (dict(v) if k in GROUPS and isinstance(v, Mapping) else v) for k, v in net.items()}
    flat: list[tuple[str, Any]] = []
    for key, value in dict(overrides or {}).items():
        if key in GROUPS and isinstance(value, Mapping):
            flat.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            flat.append((str(key), value))
    for key, value in flat:
        group, dot, name = key.partition(".")
        if dot:
            if group not in GROUPS:
                raise SettingError(f"{prefix}.{key}: unknown group {group!r} (groups: {', '.join(GROUPS)})")
            GROUPS[group].from_mapping({name: value}, f"{prefix}.{group}")
            out.setdefault(group, {})
            out[group] = {**(out[group] or {}), name: value}
        else:
            check_net_config({key: value}, prefix)
            out[key] = value
    check_net_config(out, prefix)
    return out
