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
    "float_array",
    "save_scene",
    "read_scene_file",
    "load_scene",
    "list_scenes",
    "SceneDirectory",
    "EXPORT_INCOMPLETE_MARKER",
    "GT_RESIDUAL_BOUND_RAD",
    "MIN_TRUE_PAIRS",
    "check_ground_truth",
]

REQUIRED_KEYS = ("p2d", "p3d", "R", "t", "match")
OPTIONAL_KEYS = ("K", "image_size")


class SceneFileError(ValueError):
    """A scene (file or dict) violates the scene-file contract; the message names it."""


def float_array(value: Any, key: str, shape: tuple, name: str, what: str = "key") -> np.ndarray:
    """``value`` as a finite float64 array of ``shape`` (``-1`` or a letter such as ``"m"``: any
    length), or :class:`SceneFileError` ``"<name>: <what> '<key>' ..."``: the scene-file checks of
    one array, for callers that take arrays rather than files (:mod:`bpnp.runtime.solver`)."""
    a = np.asarray(value)
    label = f"{what} '{key}'"
    if a.dtype.kind not in "fiu":
        raise SceneFileError(f"{name}: {label} must be numeric, got dtype {a.dtype}")
    ok = a.ndim == len(shape) and all(s == -1 or isinstance(s, str) or s == d for s, d in zip(shape, a.shape))
    if not ok:
        want = "(" + ", ".join("k" if s == -1 else str(s) for s in shape) + ")"
        raise SceneFileError(f"{name}: {label} must have shape {want}, got {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise SceneFileError(
            f"{name}: {label} has {int(np.sum(~np.isfinite(a)))} non-finite values (NaN/Inf)"
        )
    return a


def _float_array(scene: Mapping[str, Any], key: str, shape: tuple, name: str) -> np.ndarray:
    """``scene[key]`` as float64 with the given shape (-1 = any length >= 1), finite."""
    return float_array(scene[key], key, shape, name)


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


def read_scene_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a scene file as stored, not validated (:func:`load_scene` validates; a
    tool that needs only some keys, such as ``python -m bpnp.solve``, checks those).

    Raises:
        SceneFileError: no such file, or unreadable, truncated or not an npz file; the message
            starts with the path.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise SceneFileError(f"{name}: no such file")
    try:
        # allow_pickle=False: scene files hold plain arrays; never execute pickled code.
        with np.load(path, allow_pickle=False) as npz:
            # Read every array now: NpzFile is lazy, and a truncated member only fails on access.
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile) as exc:
        raise SceneFileError(f"{name}: unreadable, truncated or not an .npz file ({exc})") from exc
    except Exception as exc:  # zlib.error, struct.error and the like from a corrupt archive
        raise SceneFileError(f"{name}: unreadable, corrupt .npz file ({exc!r})") from exc


def load_scene(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate one scene file.

    Returns:
        dict with ``p2d`` (m, 2), ``p3d`` (n, 3), ``R`` (3, 3), ``t`` (3,) float64, ``match``
        (m,) int64 and, when stored, ``K`` (3, 3) float64 and ``image_size`` (2,) int64.

    Raises:
        SceneFileError: unreadable, truncated or not an npz file, or any :func:`validate_scene`
            problem; the message starts with the path.
    """
    return validate_scene(read_scene_file(path), str(Path(path)))


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


#: File that ``python -m bpnp.data.export`` writes into a scene folder before its first scene and
#: removes after ``index.json``, its last file: a folder holding it is an unfinished export.
EXPORT_INCOMPLETE_MARKER = ".bpnp_export_incomplete"

#: Median angle (radians) between the true pairs' 2D bearings and their 3D points under the
#: scene's ``R, t`` above which the ground truth cannot be true (docs/reliability.md): 0.05 rad =
#: 2.9 deg, i.e. 40 px of error at an 800 px focal length, far above any keypoint noise.
GT_RESIDUAL_BOUND_RAD = 0.05
#: Fewest true pairs with which an instance can be solved (and its success scored): P3P + 1.
MIN_TRUE_PAIRS = 4


def _median_residual(p2d: np.ndarray, X: np.ndarray, R: np.ndarray, t: np.ndarray) -> float:
    """Median angle between the bearings of ``p2d`` (camera-normalised) and ``R X + t``."""
    b = np.concatenate([p2d, np.ones((len(p2d), 1))], axis=1)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    xc = X @ R.T + t
    norm = np.linalg.norm(xc, axis=1)
    cos = np.einsum("ij,ij->i", b, xc) / np.where(norm > 0, norm, 1.0)
    cos = np.where(norm > 0, cos, -1.0)
    return float(np.median(np.arccos(np.clip(cos, -1.0, 1.0))))


def check_ground_truth(scene: Mapping[str, Any], name: str = "<scene>",
                       bound: float = GT_RESIDUAL_BOUND_RAD) -> None:
    """Refuse an instance whose ground truth cannot be true, or that no method can solve, so that
    a success rate is never taken over such instances (``evaluate.py`` calls it on every scene
    file before any instance is evaluated). ``scene`` is a :func:`validate_scene` result.

    Raises:
        SceneFileError: fewer than :data:`MIN_TRUE_PAIRS` true pairs (``match >= 0``); the 3D
            points of the true pairs all identical or collinear (rank of the centred points
            < 2); or a median angular residual of the true pairs under ``R, t`` above ``bound``
            (with the fix when ``p2d`` looks like pixels: ``K`` given and ``K^-1`` fixes it, or
            ``|p2d|`` far above any camera-normalised coordinate).
    """
    match = np.asarray(scene["match"])
    sel = match >= 0
    k = int(sel.sum())
    if k < MIN_TRUE_PAIRS:
        raise SceneFileError(
            f"{name}: only {k} true pair(s) (entries of 'match' >= 0); a pose needs at least {MIN_TRUE_PAIRS}, "
            "so the instance can be neither solved nor scored: drop the file (or fix 'match')")
    p2d = np.asarray(scene["p2d"], dtype=np.float64)[sel]
    X = np.asarray(scene["p3d"], dtype=np.float64)[match[sel]]
    sv = np.linalg.svd(X - X.mean(0), compute_uv=False)
    scale = max(float(np.abs(X).max()), 1e-300)
    if sv[0] <= 1e-9 * scale or sv[1] <= 1e-6 * sv[0]:
        kind = "all identical" if sv[0] <= 1e-9 * scale else "collinear"
        raise SceneFileError(
            f"{name}: the 3D points of its {k} true pairs are {kind} (rank of the centred points < 2), "
            "so the pose is not determined: drop the file")
    R, t = np.asarray(scene["R"], dtype=np.float64), np.asarray(scene["t"], dtype=np.float64)
    residual = _median_residual(p2d, X, R, t)
    if residual <= bound:
        return
    head = (f"{name}: the true pairs do not reproject under 'R', 't': median angular residual "
            f"{residual:.3g} rad over {k} pairs (bound {bound:g} rad)")
    K = scene.get("K")
    if K is not None:
        K = np.asarray(K, dtype=np.float64)
        if abs(np.linalg.det(K)) > 0:
            uv1 = np.concatenate([p2d, np.ones((len(p2d), 1))], axis=1) @ np.linalg.inv(K).T
            fixed = _median_residual(uv1[:, :2] / uv1[:, 2:3], X, R, t)
            if fixed <= bound:
                raise SceneFileError(
                    f"{head}; p2d looks like pixels: divide by K (store ((u - cx) / fx, (v - cy) / fy); the true "
                    f"pairs then reproject within {fixed:.2g} rad)")
    size = float(np.median(np.abs(p2d)))
    if size > 10.0:  # tan(84 deg): no camera-normalised keypoint is that far off the axis
        raise SceneFileError(
            f"{head}; p2d looks like pixels (median |p2d| = {size:.3g}; camera-normalised coordinates are "
            "tangents of view angles, far below 10): divide by K (store K^-1 [u, v, 1])")
    raise SceneFileError(
        f"{head}; check that 'p2d' is camera-normalised, that 'R', 't' is the world-to-camera pose and that "
        "'match' indexes 'p3d'")


class SceneDirectory(Dataset):
    """A scene set: item ``i`` is :func:`load_scene` of the ``i``-th file by name, plus ``index``.

    Attributes:
        files: sorted list of scene paths.
        names: their stems (e.g. ``"0003"``), for per-instance reports: ``names[batch["index"]]``.

    Raises:
        SceneFileError: if the directory is missing, holds no ``.npz`` file, or is an unfinished
            export (it holds :data:`EXPORT_INCOMPLETE_MARKER`). A folder without ``index.json``
            is fine (hand-made scene sets need none).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if (self.directory / EXPORT_INCOMPLETE_MARKER).exists():
            raise SceneFileError(
                f"{self.directory}: an unfinished export (it holds {EXPORT_INCOMPLETE_MARKER}, which "
                "python -m bpnp.data.export removes once its index.json is written): run the export again")
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
