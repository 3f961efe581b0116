"""Loader for the original BPnPNet pre-processed pickles (ModelNet40, MegaDepth, Data61/2D3D).

Layout (as published with the paper's code): ``<root>/<dataset>_<split>/preprocessed/`` holds
seven pickles ``p2d.pkl, p3d.pkl, R_gt.pkl, t_gt.pkl, W_gt.pkl, num_points_2d.pkl,
num_points_3d.pkl`` (``split`` is ``train`` or ``test``). Each pickle is one container with one
entry per sample. Accepted containers: a list or tuple, a dict keyed ``0 .. N-1`` (what the
original pre-processing script writes), or a numpy array (object array of per-sample arrays, or
a stacked array when all samples have one size). Per sample:

- ``p2d`` (m', 2) camera-normalised 2D points, ``p3d`` (n', 3) 3D points, ``R_gt`` (3, 3),
  ``t_gt`` (3,) or (3, 1): world-to-camera pose.
- ``num_points_2d``, ``num_points_3d``: the real counts m <= m', n <= n' (a number or a (1,)
  array); rows beyond them are replicas the original added to reach a fixed training size, and
  are dropped here.
- ``W_gt`` (n',) int: ``W_gt[j]`` is the index of the 2D point matched to 3D point j, or ``m``
  (any value outside [0, m)) for an unmatched 3D point. For Data61/2D3D the original notes that
  ``W_gt`` is *inverted* (an m-vector: the 3D index matched to each 2D point);
  ``w_gt_per="2d"`` (chosen automatically for dataset names starting with ``data61``) reads it so.

The stored data are inliers only; add outliers with :func:`bpnp.data.datasets.add_outliers`.
Pickles are loaded with ``encoding="latin1"`` so Python-2 pickles of numpy arrays also load.
Only load pickles you trust: unpickling can execute code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PICKLE_KEYS", "PickleFormatError", "load_bpnpnet_split", "bpnpnet_to_scene",
           "split_dir", "default_w_gt_per"]

PICKLE_KEYS = ("p2d", "p3d", "R_gt", "t_gt", "W_gt", "num_points_2d", "num_points_3d")


class PickleFormatError(ValueError):
    """A BPnPNet pickle is missing, unreadable or inconsistent; the message names the file."""


def split_dir(root: str | Path, dataset: str, split: str) -> Path:
    """``<root>/<dataset>_<split>/preprocessed``."""
    return Path(root) / f"{dataset}_{split}" / "preprocessed"


def _as_list(obj: Any, path: Path) -> list:
    """A per-sample sequence from any of the accepted containers."""
    if isinstance(obj, dict):
        try:
            keys = sorted(obj, key=int)
        except (TypeError, ValueError) as exc:
            raise PickleFormatError(f"{path}: dict container must be keyed by sample index") from exc
        if [int(k) for k in keys] != list(range(len(keys))):
            raise PickleFormatError(f"{path}: dict container keys are not 0..{len(keys) - 1}")
        return [obj[k] for k in keys]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, np.ndarray):
        return list(obj) if obj.ndim > 0 else [obj.item()]
    raise PickleFormatError(f"{path}: expected a list, dict or array of samples, got {type(obj).__name__}")


def load_bpnpnet_split(root: str | Path, dataset: str, split: str) -> dict[str, list]:
    """Read the seven pickles of one split.

    Returns:
        dict key -> list of per-sample objects (same length for every key).

    Raises:
        PickleFormatError: a missing/unreadable pickle or mismatched sample counts.
    """
    folder = split_dir(root, dataset, split)
    if not folder.is_dir():
        raise PickleFormatError(f"{folder}: no such directory (expected BPnPNet pickles "
                                f"{', '.join(k + '.pkl' for k in PICKLE_KEYS)})")
    data: dict[str, list] = {}
    for key in PICKLE_KEYS:
        path = folder / f"{key}.pkl"
        if not path.is_file():
            raise PickleFormatError(f"{path}: missing pickle '{key}.pkl'")
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f, encoding="latin1")
        except Exception as exc:  # truncated or corrupt pickles raise many different types
            raise PickleFormatError(f"{path}: unreadable or truncated pickle ({exc!r})") from exc
        data[key] = _as_list(obj, path)
    sizes = {k: len(v) for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise PickleFormatError(f"{folder}: pickles hold different sample counts: {sizes}")
    return data


def _count(v: Any, what: str, where: str) -> int:
    a = np.asarray(v).reshape(-1)
    if a.size != 1:
        raise PickleFormatError(f"{where}: {what} must be one number, got shape {np.shape(v)}")
    return int(a[0])


def bpnpnet_to_scene(sample: dict[str, Any], where: str, w_gt_per: str = "3d") -> dict[str, np.ndarray]:
    """Convert one BPnPNet sample (dict with :data:`PICKLE_KEYS`) to a scene dict.

    Args:
        sample: the seven per-sample entries.
        where: name for errors (e.g. ``".../preprocessed sample 12"``).
        w_gt_per: ``"3d"`` (W_gt[j] = 2D index of 3D point j, or m) or ``"2d"``
            (W_gt[i] = 3D index of 2D point i, or n).

    Returns:
        Scene dict: ``p2d`` (m, 2), ``p3d`` (n, 3), ``R``, ``t`` float64, ``match`` (m,) int64
        with ``match[i] = j`` where ``W_gt[j] == i`` (``"3d"``), else -1.
    """
    m = _count(sample["num_points_2d"], "num_points_2d", where)
    n = _count(sample["num_points_3d"], "num_points_3d", where)
    p2d = np.asarray(sample["p2d"], dtype=np.float64).reshape(-1, 2)
    p3d = np.asarray(sample["p3d"], dtype=np.float64).reshape(-1, 3)
    if len(p2d) < m or len(p3d) < n:
        raise PickleFormatError(f"{where}: num_points_2d/3d = {m}/{n} exceed the stored "
                                f"{len(p2d)}/{len(p3d)} points")
    W = np.asarray(sample["W_gt"]).reshape(-1).astype(np.int64)
    match = np.full(m, -1, dtype=np.int64)
    if w_gt_per == "3d":
        if len(W) < n:
            raise PickleFormatError(f"{where}: W_gt has {len(W)} entries, need num_points_3d={n}")
        W = W[:n]
        j = np.flatnonzero((W >= 0) & (W < m))
        match[W[j]] = j  # a 2D index claimed twice keeps the last 3D point (never in the data)
    elif w_gt_per == "2d":
        if len(W) < m:
            raise PickleFormatError(f"{where}: W_gt has {len(W)} entries, need num_points_2d={m}")
        W = W[:m]
        match = np.where((W >= 0) & (W < n), W, -1).astype(np.int64)
    else:
        raise ValueError(f"w_gt_per must be '3d' or '2d', got {w_gt_per!r}")
    return {
        "p2d": p2d[:m],
        "p3d": p3d[:n],
        "R": np.asarray(sample["R_gt"], dtype=np.float64).reshape(3, 3),
        "t": np.asarray(sample["t_gt"], dtype=np.float64).reshape(3),
        "match": match,
    }


def default_w_gt_per(dataset: str) -> str:
    """``"2d"`` for Data61/2D3D (its W_gt is inverted in the original), else ``"3d"``."""
    return "2d" if dataset.lower().startswith("data61") else "3d"
