"""Scene files: one blind-PnP instance per ``.npz`` (the contract of docs/data.md), and directories of them.

Keys (``K`` and ``image_size`` optional):

=============  ===============  =============================================================
key            shape, dtype     meaning
=============  ===============  =============================================================
``p2d``        (m, 2) float     camera-normalised, undistorted 2D keypoints
``p3d``        (n, 3) float     3D points, world frame
``R``, ``t``   (3, 3), (3,)     ground-truth world-to-camera pose, ``x_cam = R X + t``
``match``      (m,) int         index into ``p3d`` of the point each 2D point observes, or -1
``K``          (3, 3) float     intrinsics (pixel-unit reports only)
``image_size`` (2,) int         width, height in pixels
=============  ===============  =============================================================

:func:`load_scene` returns float64 arrays, ``match`` and ``image_size`` as int64, whatever
precision the file holds, so every consumer sees one dtype. Unknown keys in a file are ignored.
Every problem raises :class:`SceneFileError` naming the file, e.g.
``SceneFileError: scenes/0003.npz: missing key 'match'``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset

__all__ = [
    "SceneFileError",
    "REQUIRED_KEYS",
    "OPTIONAL_KEYS",
    "validate_scene",
    "save_scene",
    "load_scene",
    "list_scenes",
    "SceneDirectory",
]

REQUIRED_KEYS = ("p2d", "p3d", "R", "t", "match")
OPTIONAL_KEYS = ("K", "image_size")


class SceneFileError(ValueError):
    """A scene (file or dict) violates the scene-file contract; the message names it."""


def _float_array(scene: Mapping[str, Any], key: str, shape: tuple, name: str) -> np.ndarray:
    """``scene[key]`` as float64 with the given shape (-1 = any length >= 1), finite."""
    a = np.asarray(scene[key])
    if a.dtype.kind not in "fiu":
        raise SceneFileError(f"{name}: key '{key}' must be numeric, got dtype {a.dtype}")
    ok = a.ndim == len(shape) and all(s == -1 or s == d for s, d in zip(shape, a.shape))
    if not ok:
        want = "(" + ", ".join("k" if s == -1 else str(s) for s in shape) + ")"
        raise SceneFileError(f"{name}: key '{key}' must have shape {want}, got {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise SceneFileError(
            f"{name}: key '{key}' has {int(np.sum(~np.isfinite(a)))} non-finite values (NaN/Inf)"
        )
    return a


def _int_array(scene: Mapping[str, Any], key: str, shape: tuple, name: str) -> np.ndarray:
    a = np.asarray(scene[key])
    if a.dtype.kind not in "iu" and not (
        a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a))
    ):
        raise SceneFileError(f"{name}: key '{key}' must hold integers, got dtype {a.dtype}")
    if a.ndim != len(shape) or any(s != -1 and s != d for s, d in zip(shape, a.shape)):
        raise SceneFileError(f"{name}: key '{key}' must have shape {tuple(shape)}, got {a.shape}")
    return a.astype(np.int64)


def validate_scene(scene: Mapping[str, Any], name: str = "<scene>") -> dict[str, np.ndarray]:
    """Check a scene dict against the contract and return it normalised (float64 / int64 copies).

    Args:
        scene: mapping with at least ``p2d, p3d, R, t, match``.
        name: how to name the scene in errors (usually its file path).

    Returns:
        A new dict with exactly the contract's keys that are present.

    Raises:
        SceneFileError: missing key, wrong shape or dtype, NaN/Inf, no points, ``match`` out of
            range [-1, n), ``R`` not a rotation (|R^T R - I| > 1e-4 or det < 0), more than half of
            the matched 3D points behind the true camera (a camera-to-world pose), image size <= 0.
    """
    for key in REQUIRED_KEYS:
        if key not in scene:
            raise SceneFileError(f"{name}: missing key '{key}'")
    out = {
        "p2d": _float_array(scene, "p2d", (-1, 2), name),
        "p3d": _float_array(scene, "p3d", (-1, 3), name),
        "R": _float_array(scene, "R", (3, 3), name),
        "t": _float_array(scene, "t", (3,), name),
    }
    m, n = len(out["p2d"]), len(out["p3d"])
    if m == 0:
        raise SceneFileError(f"{name}: key 'p2d' holds no points (need at least 1)")
    if n == 0:
        raise SceneFileError(f"{name}: key 'p3d' holds no points (need at least 1)")
    if np.shape(scene["match"]) != (m,):
        raise SceneFileError(
            f"{name}: key 'match' must have shape (m,) = ({m},) like 'p2d', "
            f"got {np.shape(scene['match'])}"
        )
    match = _int_array(scene, "match", (m,), name)
    bad = (match < -1) | (match >= n)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise SceneFileError(
            f"{name}: key 'match' out of range: match[{i}] = {match[i]} not in [-1, {n}) "
            f"({int(bad.sum())} bad entries)"
        )
    out["match"] = match
    R = out["R"]
    if np.max(np.abs(R.T @ R - np.eye(3))) > 1e-4 or np.linalg.det(R) < 0:
        raise SceneFileError(f"{name}: key 'R' is not a rotation matrix (R^T R != I or det < 0)")
    matched = match[match >= 0]
    if len(matched):
        depth = out["p3d"][matched] @ R[2] + out["t"][2]
        behind = int(np.sum(depth <= 0))
        if 2 * behind > len(matched):
            # A camera sees nothing behind it: the usual cause is a camera-to-world pose.
            raise SceneFileError(
                f"{name}: keys 'R', 't' put {behind} of the {len(matched)} matched 3D points behind the camera "
                "(depth <= 0); the contract's pose is world-to-camera, x_cam = R X + t (was a camera-to-world "
                "pose stored? then store R^T and -R^T t)")
    if "K" in scene and scene["K"] is not None:
        out["K"] = _float_array(scene, "K", (3, 3), name)
    if "image_size" in scene and scene["image_size"] is not None:
        size = _int_array(scene, "image_size", (2,), name)
        if np.any(size <= 0):
            raise SceneFileError(f"{name}: key 'image_size' must be positive, got {size.tolist()}")
        out["image_size"] = size
    return out


def save_scene(path: str | Path, scene: Mapping[str, Any]) -> Path:
    """Validate ``scene`` and write it as an uncompressed ``.npz`` (contract keys only).

    The file is written to a temporary name and renamed, so an interrupted run never leaves a
    truncated scene behind. ``.npz`` is appended if the path lacks it.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    clean = validate_scene(scene, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **clean)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_scene(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate one scene file.

    Returns:
        dict with ``p2d`` (m, 2), ``p3d`` (n, 3), ``R`` (3, 3), ``t`` (3,) float64, ``match``
        (m,) int64 and, when stored, ``K`` (3, 3) float64 and ``image_size`` (2,) int64.

    Raises:
        SceneFileError: unreadable, truncated or not an npz file, or any :func:`validate_scene`
            problem; the message starts with the path.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise SceneFileError(f"{name}: no such file")
    try:
        # allow_pickle=False: scene files hold plain arrays; never execute pickled code.
        with np.load(path, allow_pickle=False) as npz:
            # Read every array now: NpzFile is lazy, and a truncated member only fails on access.
            raw = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile) as exc:
        raise SceneFileError(f"{name}: unreadable, truncated or not an .npz file ({exc})") from exc
    except Exception as exc:  # zlib.error, struct.error and the like from a corrupt archive
        raise SceneFileError(f"{name}: unreadable, corrupt .npz file ({exc!r})") from exc
    return validate_scene(raw, name)


def list_scenes(directory: str | Path) -> list[Path]:
    """The ``.npz`` files directly in ``directory``, sorted by name.

    Raises:
        SceneFileError: if ``directory`` is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SceneFileError(f"{directory}: scene directory does not exist")
    return sorted(p for p in directory.iterdir() if p.suffix == ".npz" and p.is_file()
                  and not p.name.startswith(".tmp_"))


class SceneDirectory(Dataset):
    """A scene set: item ``i`` is :func:`load_scene` of the ``i``-th file by name, plus ``index``.

    Attributes:
        files: sorted list of scene paths.
        names: their stems (e.g. ``"0003"``), for per-instance reports: ``names[batch["index"]]``.

    Raises:
        SceneFileError: if the directory is missing or holds no ``.npz`` file.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = list_scenes(self.directory)
        if not self.files:
            raise SceneFileError(f"{self.directory}: no .npz scene files in this directory")
        self.names = [p.stem for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = load_scene(self.files[index])
        scene["index"] = int(index)
        return scene
