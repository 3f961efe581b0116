"""Outlier sweep: the same scenes with added 2D and 3D outliers at several fractions.

For each fraction pair ``(f2, f3)``, item ``i`` becomes
``bpnp.data.datasets.add_outliers(scene_i, f2, f3, default_rng([seed, i, round(1e6 f2), round(1e6 f3)]))``:
``f`` is the fraction of *added* points in the resulting set (uniform in the bounding box of the
inliers), on top of whatever outliers the scene already has. The seed makes a sweep reproducible
and the same outliers are added for every method. ``(0, 0)`` reuses the main evaluation's records
when given (the scenes unchanged).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bpnp.data.datasets import OutlierAugmented
from bpnp.evaluation.report import summarize_methods
from bpnp.evaluation.runner import EvalSettings, evaluate_instances

__all__ = ["parse_fractions", "OutlierDataset", "run_sweep"]


def parse_fractions(fractions: Sequence[Any]) -> list[tuple[float, float]]:
    """Normalise a config list: a number ``f`` means ``(f, f)``, a pair means ``(f2d, f3d)``.

    Raises:
        ValueError: on an entry outside [0, 1) or a malformed one.
    """
    out: list[tuple[float, float]] = []
    for f in fractions:
        pair = (float(f), float(f)) if isinstance(f, (int, float)) else tuple(float(x) for x in f)
        if len(pair) != 2 or not all(0.0 <= x < 1.0 for x in pair):
            raise ValueError(f"sweep.fractions: each entry must be a fraction in [0, 1) or a "
                             f"[frac_2d, frac_3d] pair of them, got {f!r}")
        out.append(pair)  # type: ignore[arg-type]
    return out


class OutlierDataset(OutlierAugmented):
    """``base`` with outliers added per item (see the module docstring); indexable like it.

    The data layer's wrapper, with the fractions in the seed key so that each sweep level draws
    its own outliers."""

    def rng(self, index: int) -> np.random.Generator:
        key = [self.seed, int(index), int(round(1e6 * self.frac_2d)), int(round(1e6 * self.frac_3d))]
        return np.random.default_rng(key)


def run_sweep(
    model: Any,
    dataset: Any,
    names: Sequence[str],
    settings: EvalSettings,
    fractions: Sequence[Any],
    *,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    reuse: Sequence[Mapping[str, Any]] | None = None,
    summary_kwargs: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
    on_records: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate every fraction pair.

    Args:
        model, dataset, names, settings, indices: as for
            :func:`bpnp.evaluation.runner.evaluate_instances`.
        fractions: config list (see :func:`parse_fractions`).
        seed: outlier seed.
        reuse: records of the unchanged scenes (used for the ``(0, 0)`` entry when given).
        summary_kwargs: thresholds for :func:`bpnp.evaluation.report.summarize`.
        log: progress printer.
        on_records: called with the records of each finished instance (the reused ``(0, 0)``
            records at once), e.g. to append them to ``sweep_instances.csv`` as they come.

    Returns:
        ``(sweep, records)``: ``sweep = {"seed", "fractions": [[f2, f3], ...], "results": [
        {"frac_2d", "frac_3d", **summary (model at the top, "baselines")}, ...]}`` and every
        per-instance record of the sweep (with ``frac_2d``/``frac_3d`` set).
    """
    pairs = parse_fractions(fractions)
    summary_kwargs = dict(summary_kwargs or {})
    all_records: list[dict[str, Any]] = []
    results = []
    for f2, f3 in pairs:
        if f2 == 0.0 and f3 == 0.0 and reuse is not None:
            recs = [dict(r) for r in reuse]
            if on_records is not None:
                on_records(recs)
        else:
            if log is not None:
                log(f"[evaluate] outlier sweep: adding {f2:g} 2D / {f3:g} 3D outliers")
            ds = OutlierDataset(dataset, f2, f3, seed)
            quiet = EvalSettings(**{**settings.__dict__, "num_overlays": 0, "warmup": 0})
            recs, _ = evaluate_instances(model, ds, names, quiet, frac=(f2, f3), indices=indices, log=log,
                                         on_instance=on_records)
        all_records.extend(recs)
        results.append({"frac_2d": f2, "frac_3d": f3, **summarize_methods(recs, **summary_kwargs)})
    return {"seed": int(seed), "fractions": [list(p) for p in pairs], "results": results}, all_records
