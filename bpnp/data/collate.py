"""Batching of variable-size scenes: zero padding plus boolean masks.

Batch layout (docs/INTERFACES.md), ``b`` items, ``m``/``n`` = largest set in the batch rounded up
to a multiple of ``pad_multiple``:

=============  ===============  =============================================================
key            shape, dtype     meaning
=============  ===============  =============================================================
``p2d``        (b, m, 2) f32    normalised 2D points; zeros at padding
``p3d``        (b, n, 3) f32    3D points; zeros at padding
``mask2d``     (b, m) bool      True = real 2D point
``mask3d``     (b, n) bool      True = real 3D point
``R``, ``t``   (b, 3, 3), (b, 3) f32  ground-truth world-to-camera pose
``match``      (b, m) int64     index into p3d, -1 for 2D outliers and padding
``index``      (b,) int64       dataset index of each item (``scene["index"]``, else position)
``K``          (b, 3, 3) f32    only if every item has ``K``
``image_size`` (b, 2) int64     only if every item has ``image_size``
=============  ===============  =============================================================

Padding with zeros (not copies of real points, as the original did) keeps every padded value
finite while making it obvious that masks, not values, mark padding.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["collate_scenes"]


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


_SHAPES = {"p2d": ("m", 2), "p3d": ("n", 3), "R": (3, 3), "t": (3,)}


def _check_sample(i: int, s: Mapping[str, Any]) -> None:
    """One clear ``ValueError`` naming the item and key for a malformed scene dict (a scene read
    with :func:`bpnp.data.scenes.load_scene` always passes; this guards hand-built dicts)."""
    if not isinstance(s, Mapping):
        raise ValueError(f"collate_scenes: item {i} must be a scene dict, got {type(s).__name__}")
    for key in ("p2d", "p3d", "R", "t", "match"):
        if key not in s:
            raise ValueError(f"collate_scenes: item {i} has no key '{key}'")
    for key, shape in _SHAPES.items():
        a = _np(s[key])
        ok = a.ndim == len(shape) and all(not isinstance(d, int) or d == a.shape[k] for k, d in enumerate(shape))
        if not ok:
            want = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"collate_scenes: item {i}: '{key}' must have shape {want}, got {a.shape}")
        if a.dtype.kind not in "fiu":
            raise ValueError(f"collate_scenes: item {i}: '{key}' must be numeric, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"collate_scenes: item {i}: '{key}' has {int(np.sum(~np.isfinite(a)))} NaN/Inf values")
    match = _np(s["match"])
    if match.dtype.kind not in "iu" or match.ndim != 1:
        raise ValueError(f"collate_scenes: item {i}: 'match' must be a 1-D integer array, got {match.dtype} "
                         f"of shape {match.shape}")
    n = len(_np(s["p3d"]))
    if len(match) and (match.min() < -1 or match.max() >= n):
        raise ValueError(f"collate_scenes: item {i}: 'match' has entries outside [-1, {n}) (p3d has {n} points)")


def collate_scenes(samples: Sequence[Mapping[str, Any]], pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Stack scene dicts (numpy arrays or tensors) into one padded batch.

    Args:
        samples: scene dicts with ``p2d, p3d, R, t, match`` (and optionally ``K``,
            ``image_size``, ``index``).
        pad_multiple: round ``m`` and ``n`` up to a multiple of this (fewer distinct shapes helps
            compiled kernels and cuDNN autotuning).

    Returns:
        The batch dict described in the module docstring.
    """
    if len(samples) == 0:
        raise ValueError("collate_scenes: empty list of samples")
    if int(pad_multiple) < 1:
        raise ValueError(f"collate_scenes: pad_multiple must be >= 1, got {pad_multiple}")
    b = len(samples)
    for i, s in enumerate(samples):
        _check_sample(i, s)
    p2ds = [_np(s["p2d"]).reshape(-1, 2) for s in samples]
    p3ds = [_np(s["p3d"]).reshape(-1, 3) for s in samples]
    m = _round_up(max(len(p) for p in p2ds), int(pad_multiple))
    n = _round_up(max(len(p) for p in p3ds), int(pad_multiple))

    p2d = np.zeros((b, m, 2), dtype=np.float32)
    p3d = np.zeros((b, n, 3), dtype=np.float32)
    mask2d = np.zeros((b, m), dtype=bool)
    mask3d = np.zeros((b, n), dtype=bool)
    match = np.full((b, m), -1, dtype=np.int64)
    for i, s in enumerate(samples):
        mi, ni = len(p2ds[i]), len(p3ds[i])
        p2d[i, :mi] = p2ds[i]
        p3d[i, :ni] = p3ds[i]
        mask2d[i, :mi] = True
        mask3d[i, :ni] = True
        mt = _np(s["match"]).reshape(-1)
        if len(mt) != mi:
            raise ValueError(f"collate_scenes: item {i} has {mi} 2D points but {len(mt)} matches")
        match[i, :mi] = mt
    batch = {
        "p2d": torch.from_numpy(p2d),
        "p3d": torch.from_numpy(p3d),
        "mask2d": torch.from_numpy(mask2d),
        "mask3d": torch.from_numpy(mask3d),
        "R": torch.from_numpy(np.stack([_np(s["R"]).reshape(3, 3) for s in samples]).astype(np.float32)),
        "t": torch.from_numpy(np.stack([_np(s["t"]).reshape(3) for s in samples]).astype(np.float32)),
        "match": torch.from_numpy(match),
        "index": torch.tensor([int(s.get("index", i)) for i, s in enumerate(samples)], dtype=torch.int64),
    }
    if all(s.get("K") is not None for s in samples):
        batch["K"] = torch.from_numpy(np.stack([_np(s["K"]).reshape(3, 3) for s in samples]).astype(np.float32))
    if all(s.get("image_size") is not None for s in samples):
        batch["image_size"] = torch.from_numpy(
            np.stack([_np(s["image_size"]).reshape(2) for s in samples]).astype(np.int64)
        )
    return batch
