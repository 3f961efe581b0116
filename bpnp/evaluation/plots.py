"""Evaluation plots (matplotlib, Agg backend: no display needed), saved as PNG.

- :func:`plot_error_cdfs`: cumulative distribution of the rotation error (degrees) and of the
  relative centre error, one curve per method, log-scaled error axis (errors span from 1e-6 for
  the oracle to 180 degrees for failures).
- :func:`plot_sweep`: success rate against added-outlier fraction, one line per method.
- :func:`plot_overlay`: 2D keypoints against the 3D points projected with the *true* pose; for
  the top correspondences of ``P`` a line joins each 2D point to the projection of the 3D point
  it was matched to: green for a true pair (a short line, up to noise), red for a 2D inlier
  matched to a wrong 3D point, dotted purple for a 2D outlier given a match; the legend names
  and counts each kind. Crosses mark the 3D points projected with the estimated
  pose. Pixels when the scene has ``K``, camera-normalised units otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_error_cdfs", "plot_sweep", "plot_overlay", "overlay_figure", "PAIR_KINDS"]

#: Pairs of the overlay by kind: (kind, colour, line style, legend label).
PAIR_KINDS = (("true", "tab:green", "-", "true pairs"), ("wrong", "tab:red", "-", "wrong pairs (2D inlier)"),
              ("outlier", "tab:purple", ":", "outlier pairs (2D outlier)"))

#: Errors below this are drawn at it (log axis).
_FLOOR = {"rot_err_deg": 1e-4, "center_err_rel": 1e-6}


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_error_cdfs(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Cumulative error curves per method.

    Args:
        records: per-instance records with ``method``, ``rot_err_deg``, ``center_err_rel``.
        path: PNG to write.
        title: figure title.

    Returns:
        ``path``.
    """
    methods: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        methods.setdefault(str(r["method"]), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    specs = (("rot_err_deg", "rotation error (deg)", 5.0), ("center_err_rel", "centre error / median depth", 0.05))
    for ax, (key, label, thr) in zip(axes, specs):
        for method, rs in methods.items():
            e = np.sort(np.array([float(r[key]) for r in rs], dtype=np.float64))
            e = np.where(np.isfinite(e), e, np.inf)
            y = np.arange(1, len(e) + 1) / len(e)
            finite = np.isfinite(e)
            ax.step(np.maximum(e[finite], _FLOOR[key]), y[finite], where="post", label=f"{method} (n={len(e)})")
        ax.axvline(thr, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of instances with error <= x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sweep(sweep: Mapping[str, Any], path: str | Path, metric: str = "success_rate") -> Path:
    """Success rate (or another summary ``metric``) against the added-outlier fraction.

    Args:
        sweep: the ``sweep`` entry of metrics.json (see :func:`bpnp.evaluation.sweep.run_sweep`).
        path: PNG to write.
        metric: summary key on the y axis.

    Returns:
        ``path``.
    """
    results = list(sweep.get("results", []))
    xs = [float(r["frac_2d"]) for r in results]
    same = all(float(r["frac_2d"]) == float(r["frac_3d"]) for r in results)
    series: dict[str, list[float]] = {"model": [r.get(metric, np.nan) for r in results]}
    for r in results:
        for name in r.get("baselines", {}):
            series.setdefault(name, [])
    for name in list(series)[1:]:
        series[name] = [r.get("baselines", {}).get(name, {}).get(metric, np.nan) for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=name)
    ax.set_xlabel("added outlier fraction (2D and 3D)" if same else "added 2D outlier fraction")
    if not same:
        ax.set_xticks(xs, [f"{r['frac_2d']:g}/{r['frac_3d']:g}" for r in results])
    ax.set_ylabel(metric.replace("_", " "))
    if metric.endswith("rate"):
        ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _to_pixels(xy: np.ndarray, K: np.ndarray | None) -> np.ndarray:
    if K is None:
        return xy
    hom = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ K.T
    return hom[:, :2] / hom[:, 2:3]


def _project(R: np.ndarray, t: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = X @ R.T + t
    z = x[:, 2]
    front = z > 1e-9
    return x[:, :2] / np.where(front, z, 1.0)[:, None], front


def plot_overlay(overlay: Any, path: str | Path) -> Path:
    """Correspondence overlay of one instance (see the module docstring).

    Args:
        overlay: a :class:`bpnp.evaluation.runner.Overlay` (or anything with its attributes).
        path: PNG to write.

    Returns:
        ``path``.
    """
    return _save(overlay_figure(overlay), path)


def overlay_figure(overlay: Any):
    """The figure :func:`plot_overlay` saves (open; ``plt.close`` it when done)."""
    K = overlay.K
    p2d = _to_pixels(overlay.p2d, K)
    proj_gt, front_gt = _project(overlay.R_gt, overlay.t_gt, overlay.p3d)
    proj_gt = _to_pixels(proj_gt, K)
    proj_est, front_est = _project(overlay.R, overlay.t, overlay.p3d)
    proj_est = _to_pixels(proj_est, K)

    fig, ax = plt.subplots(figsize=(7, 6))
    inl = overlay.match >= 0
    ax.scatter(p2d[inl, 0], p2d[inl, 1], s=6, c="tab:blue", label="2D inliers")
    ax.scatter(p2d[~inl, 0], p2d[~inl, 1], s=6, c="tab:orange", label="2D outliers")
    pairs = np.asarray(overlay.pairs, dtype=np.int64).reshape(-1, 2)
    truth = overlay.match[pairs[:, 0]]
    kinds = np.where(truth < 0, "outlier", np.where(truth == pairs[:, 1], "true", "wrong"))
    correct = kinds == "true"
    for kind, color, ls, label in PAIR_KINDS:
        sel = (kinds == kind) & front_gt[pairs[:, 1]]
        if np.any(sel):
            a, b = p2d[pairs[sel, 0]], proj_gt[pairs[sel, 1]]
            segs = np.stack([a, b], axis=1)
            ax.plot(segs[:, :, 0].T, segs[:, :, 1].T, color=color, ls=ls, lw=0.8, alpha=0.8)
        ax.plot([], [], color=color, ls=ls, label=f"{label} ({int(np.sum(kinds == kind))})")
    matched = np.unique(overlay.match[inl])
    sel = matched[front_est[matched]]
    ax.scatter(proj_est[sel, 0], proj_est[sel, 1], s=10, marker="x", c="k", lw=0.6,
               label="matched 3D, estimated pose")
    if overlay.image_size is not None and K is not None:
        w, h = (float(v) for v in overlay.image_size)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    else:
        lo, hi = p2d.min(0), p2d.max(0)
        pad = 0.1 * (hi - lo + 1e-9)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(hi[1] + pad[1], lo[1] - pad[1])  # image convention: y down
    ax.set_aspect("equal")
    ax.set_xlabel("u (px)" if K is not None else "x (normalised)")
    ax.set_ylabel("v (px)" if K is not None else "y (normalised)")
    prec = float(np.mean(correct)) if len(correct) else float("nan")
    ax.set_title(f"{overlay.name}: top {len(pairs)} pairs of P, {prec:.0%} correct", fontsize=10)
    ax.legend(fontsize=7, loc="upper right", title="line: keypoint -> matched 3D point (true pose)", title_fontsize=7)
    return fig
