"""Per-instance records -> summary metrics, ``metrics.json`` and a per-instance CSV.

A *record* is one (instance, method) result: a flat dict with the keys of :data:`CSV_COLUMNS`
(errors as defined in docs/metrics.md, times in seconds). :func:`summarize`
turns the records of one method into the contract summary:

==========================  ====================================================================
key                         meaning
==========================  ====================================================================
``n``                       number of instances
``success_rate``            fraction with ``rot_err_deg < 5`` and ``center_err_rel < 0.05``
``median_rot_err_deg``      median rotation error, degrees
``median_t_err``            median ``||t - t_gt||``, scene units
``median_center_err_rel``   median camera-centre error / median matched depth
``mean_time_s``             mean seconds per instance (the method's own compute, see runner)
``median_time_s``           median of the same
``mean_rot_err_deg``        mean rotation error, degrees
``success_rate_at``         ``{"1deg_1pct": rate, ...}``: success at each (rot_deg, centre) pair
``auc_rot_<T>deg``          area under the rotation-error recall curve up to T degrees, in [0, 1]
``auc_center_<T>pct``       same for ``center_err_rel`` up to T percent (scale-free)
``ransac_failure_rate``     fraction with a nonzero RANSAC status
``match_acc``               mean fraction of true pairs that are their row's maximum of P
                            (network methods only)
``pnp_status_counts``       ``{code: count}`` of refinement statuses (-1 = not run)
==========================  ====================================================================

Non-finite numbers (e.g. a median over mostly failed instances) are written to JSON as ``null``
so that the file is strict JSON any tool can parse.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from bpnp.geometry.metrics import error_auc, success_rate_at

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_SUCCESS_THRESHOLDS",
    "DEFAULT_AUC_THRESHOLDS_DEG",
    "threshold_key",
    "summarize",
    "summarize_methods",
    "to_jsonable",
    "write_metrics_json",
    "write_records_csv",
    "RecordsCsvWriter",
]

#: Columns of the per-instance CSV, in order.
CSV_COLUMNS = (
    "scene", "index", "method", "frac_2d", "frac_3d", "m", "n", "num_true_inliers",
    "rot_err_deg", "t_err", "center_err_rel", "success", "ransac_inliers", "pair_precision", "match_acc",
    "time_s", "ransac_status", "pnp_status",
)

#: (rotation degrees, relative centre error) pairs of ``success_rate_at``.
DEFAULT_SUCCESS_THRESHOLDS: tuple[tuple[float, float], ...] = ((1, 0.01), (2, 0.02), (5, 0.05), (10, 0.10))
#: Upper limits (degrees) of the rotation-error AUCs.
DEFAULT_AUC_THRESHOLDS_DEG: tuple[float, ...] = (5, 10, 20)


def threshold_key(rot_deg: float, center_rel: float) -> str:
    """Key of one success threshold, e.g. ``(5, 0.05) -> "5deg_5pct"``."""
    return f"{float(rot_deg):g}deg_{round(100.0 * float(center_rel), 6):g}pct"


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if len(x) else math.nan


def summarize(
    records: Sequence[Mapping[str, Any]],
    success_thresholds: Sequence[Sequence[float]] = DEFAULT_SUCCESS_THRESHOLDS,
    auc_thresholds_deg: Sequence[float] = DEFAULT_AUC_THRESHOLDS_DEG,
) -> dict[str, Any]:
    """Summary metrics of one method over its instances.

    Args:
        records: per-instance records (all of one method) with at least ``rot_err_deg``,
            ``t_err``, ``center_err_rel``, ``success``, ``time_s``, ``ransac_status``,
            ``pnp_status``.
        success_thresholds: ``(rot_deg, center_rel)`` pairs for ``success_rate_at``.
        auc_thresholds_deg: upper limits, degrees, of the rotation-error AUCs (also used, read
            as percent, for the centre-error AUCs).

    Returns:
        dict described in the module docstring; with no records only ``n = 0``.
    """
    n = len(records)
    if n == 0:
        return {"n": 0}
    col = {k: np.array([float(r[k]) for r in records], dtype=np.float64)
           for k in ("rot_err_deg", "t_err", "center_err_rel", "time_s")}
    success = np.array([bool(r["success"]) for r in records])
    rot_t, cen_t = torch.from_numpy(col["rot_err_deg"]), torch.from_numpy(col["center_err_rel"])
    pairs = [(float(a), float(b)) for a, b in success_thresholds]
    rates = success_rate_at(rot_t, cen_t, pairs).tolist() if pairs else []
    out: dict[str, Any] = {
        "n": n,
        "success_rate": float(success.mean()),
        "median_rot_err_deg": _median(col["rot_err_deg"]),
        "median_t_err": _median(col["t_err"]),
        "median_center_err_rel": _median(col["center_err_rel"]),
        "mean_time_s": float(col["time_s"].mean()),
        "median_time_s": _median(col["time_s"]),
        "mean_rot_err_deg": float(col["rot_err_deg"].mean()),
        "success_rate_at": {threshold_key(a, b): float(r) for (a, b), r in zip(pairs, rates)},
    }
    ths = [float(x) for x in auc_thresholds_deg]
    if ths:
        auc_r = error_auc(rot_t, ths).tolist()
        # Centre AUC in percent of the median depth, so the same T reads as "T degrees / T %".
        auc_c = error_auc(cen_t * 100.0, ths).tolist()
        for T, a in zip(ths, auc_r):
            out[f"auc_rot_{T:g}deg"] = float(a)
        for T, a in zip(ths, auc_c):
            out[f"auc_center_{T:g}pct"] = float(a)
    out["ransac_failure_rate"] = float(np.mean([int(r["ransac_status"]) != 0 for r in records]))
    acc = np.array([float(r.get("match_acc", float("nan"))) for r in records])
    if np.isfinite(acc).any():  # the network's methods (baselines have no P to rate)
        out["match_acc"] = float(np.nanmean(acc))
    counts = Counter(int(r["pnp_status"]) for r in records)
    out["pnp_status_counts"] = {str(k): int(v) for k, v in sorted(counts.items())}
    return out


def summarize_methods(
    records: Iterable[Mapping[str, Any]],
    model_method: str = "model",
    **kwargs: Any,
) -> dict[str, Any]:
    """Contract layout: the model's summary at the top level and each other method under
    ``baselines``.

    Args:
        records: records of any methods (grouped by their ``method`` key).
        model_method: name of the method reported at the top level.
        **kwargs: thresholds passed to :func:`summarize`.

    Returns:
        ``{**summarize(model), "baselines": {name: summarize(name), ...}}``; methods keep the
        order of their first record.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r["method"]), []).append(r)
    out = summarize(groups.pop(model_method, []), **kwargs)
    out["baselines"] = {name: summarize(rs, **kwargs) for name, rs in groups.items()}
    return out


def to_jsonable(x: Any) -> Any:
    """Recursively convert numpy/torch scalars and containers to JSON types; non-finite -> None."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return to_jsonable(x.tolist())
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as strict, indented JSON (see :func:`to_jsonable`). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    return path


def _csv_value(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if math.isfinite(v) else str(float(v))  # 'inf' / 'nan' read back by float()
    return v


class RecordsCsvWriter:
    """A per-instance CSV written as the records come (``evaluate.py``'s ``instances.csv``): the
    header at once, then :meth:`write` appends rows and flushes them to the file, so an
    interrupted run keeps every finished instance. Use as a context manager or :meth:`close`."""

    def __init__(self, path: str | Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.rows = 0
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()
        self._file.flush()

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        for r in records:
            self._writer.writerow({k: _csv_value(r.get(k, "")) for k in self.columns})
            self.rows += 1
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "RecordsCsvWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_records_csv(path: str | Path, records: Sequence[Mapping[str, Any]],
                      columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Write per-instance records, one row each, with a header of ``columns``.

    Missing keys are left empty; ``success`` is written 0/1. Returns the path.
    """
    with RecordsCsvWriter(path, columns) as writer:
        writer.write(records)
    return writer.path
