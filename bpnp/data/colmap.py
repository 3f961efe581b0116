"""Reader for COLMAP sparse models (``cameras``, ``images``, ``points3D``; ``.txt`` or ``.bin``).

The format is COLMAP's own (``src/colmap/scene/reconstruction_io``); this is an independent
implementation. Binary files are little-endian:

- ``cameras.bin``: uint64 count; per camera int32 id, int32 model id, uint64 width, uint64 height,
  then float64 params (count fixed by the model, see :data:`bpnp.data.cameras.CAMERA_MODELS`).
- ``images.bin``: uint64 count; per image int32 id, 4 float64 qvec (w, x, y, z), 3 float64 tvec,
  int32 camera id, a NUL-terminated name, uint64 number of keypoints, then per keypoint
  float64 x, float64 y, int64 point3D id (-1 if none).
- ``points3D.bin``: uint64 count; per point uint64 id, 3 float64 xyz, 3 uint8 rgb, float64 error,
  uint64 track length, then per track element int32 image id, int32 keypoint index.

Poses are world-to-camera: ``x_cam = R(qvec) X + tvec``. Keypoints are in pixels with the centre
of the top-left pixel at (0.5, 0.5) (COLMAP's convention, consistent with its principal points).

Every problem in a file (truncated, corrupt, inconsistent) raises :class:`ColmapFormatError`
naming the file and the line (text) or byte offset (binary).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bpnp.data.cameras import CAMERA_MODELS, NUM_PARAMS, Camera

__all__ = [
    "ColmapFormatError",
    "ColmapImage",
    "ColmapModel",
    "qvec_to_rotmat",
    "read_model",
    "find_model_files",
]


class ColmapFormatError(ValueError):
    """A COLMAP model file is missing, truncated, corrupt or inconsistent."""


def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> (3, 3) rotation matrix (Hamilton convention, COLMAP's).

    The quaternion is normalised first, so a slightly non-unit one (text files keep ~6 digits)
    still gives a proper rotation.

    >>> np.allclose(qvec_to_rotmat(np.array([1.0, 0, 0, 0])), np.eye(3))
    True
    """
    q = np.asarray(qvec, dtype=np.float64)
    if q.shape != (4,) or not np.all(np.isfinite(q)) or np.linalg.norm(q) == 0:
        raise ValueError(f"qvec must be a finite non-zero (4,) array, got {q!r}")
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass
class ColmapImage:
    """One registered image.

    Attributes:
        id: COLMAP image id.
        qvec: (4,) world-to-camera rotation quaternion (w, x, y, z).
        tvec: (3,) world-to-camera translation.
        camera_id: id of its :class:`~bpnp.data.cameras.Camera`.
        name: file name of the image (the image itself is not needed).
        xys: (k, 2) float64 keypoints in pixels (distorted, as detected).
        point3D_ids: (k,) int64 id of the observed 3D point, -1 for unmatched keypoints.
    """

    id: int
    qvec: np.ndarray
    tvec: np.ndarray
    camera_id: int
    name: str
    xys: np.ndarray
    point3D_ids: np.ndarray

    @property
    def R(self) -> np.ndarray:
        """(3, 3) world-to-camera rotation."""
        return qvec_to_rotmat(self.qvec)


@dataclass
class ColmapModel:
    """A COLMAP sparse model held in memory.

    Attributes:
        path: the folder it was read from.
        cameras: camera id -> :class:`~bpnp.data.cameras.Camera`.
        images: image id -> :class:`ColmapImage`.
        point_ids: (N,) int64 3D point ids, sorted ascending.
        xyz: (N, 3) float64 world coordinates, rows aligned with ``point_ids``.
        rgb: (N, 3) uint8 colours.
        error: (N,) float64 mean reprojection error in pixels (as stored by COLMAP).
    """

    path: Path
    cameras: dict[int, Camera]
    images: dict[int, ColmapImage]
    point_ids: np.ndarray
    xyz: np.ndarray
    rgb: np.ndarray = field(repr=False)
    error: np.ndarray = field(repr=False)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row indices into ``xyz`` for (k,) 3D point ids; -1 for ids the model does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.point_ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.point_ids, ids), 0, len(self.point_ids) - 1)
        ok = self.point_ids[pos] == ids
        return np.where(ok, pos, -1)

    @property
    def image_ids(self) -> list[int]:
        """Sorted image ids."""
        return sorted(self.images)


# ---------------------------------------------------------------------------------------------
# Locating the files
# ---------------------------------------------------------------------------------------------

_PARTS = ("cameras", "images", "points3D")


def find_model_files(model_dir: str | Path) -> dict[str, Path]:
    """Paths of ``cameras``, ``images``, ``points3D`` in ``model_dir``, ``.bin`` preferred.

    Each part is looked up separately, so a folder mixing ``.bin`` and ``.txt`` still reads.

    Raises:
        ColmapFormatError: if the folder or any of the three parts is missing.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ColmapFormatError(f"{model_dir}: not a directory (expected a COLMAP sparse model)")
    found: dict[str, Path] = {}
    for part in _PARTS:
        for ext in (".bin", ".txt"):
            p = model_dir / f"{part}{ext}"
            if p.is_file():
                found[part] = p
                break
        else:
            raise ColmapFormatError(
                f"{model_dir}: missing {part}.bin or {part}.txt "
                "(a COLMAP model needs cameras, images and points3D)"
            )
    return found


def read_model(model_dir: str | Path, check_consistency: bool = True) -> ColmapModel:
    """Read a COLMAP sparse model, text or binary (auto-detected per file).

    Args:
        model_dir: folder holding ``cameras``, ``images`` and ``points3D`` (``.bin`` or ``.txt``).
        check_consistency: check that every image's camera exists and every observed 3D point id
            is in ``points3D``, which also catches a text file truncated at a line boundary.

    Raises:
        ColmapFormatError: naming the file and the line or byte offset of the problem.
    """
    files = find_model_files(model_dir)
    readers = {".bin": (_read_cameras_bin, _read_images_bin, _read_points_bin),
               ".txt": (_read_cameras_txt, _read_images_txt, _read_points_txt)}
    cameras = readers[files["cameras"].suffix][0](files["cameras"])
    images = readers[files["images"].suffix][1](files["images"])
    point_ids, xyz, rgb, error = readers[files["points3D"].suffix][2](files["points3D"])
    order = np.argsort(point_ids, kind="stable")
    point_ids, xyz, rgb, error = point_ids[order], xyz[order], rgb[order], error[order]
    if len(point_ids) > 1 and np.any(point_ids[1:] == point_ids[:-1]):
        dup = point_ids[1:][point_ids[1:] == point_ids[:-1]][0]
        raise ColmapFormatError(f"{files['points3D']}: duplicate 3D point id {dup}")
    model = ColmapModel(Path(model_dir), cameras, images, point_ids, xyz, rgb, error)
    if check_consistency:
        _check_consistency(model, files)
    return model


def _check_consistency(model: ColmapModel, files: dict[str, Path]) -> None:
    for image in model.images.values():
        if image.camera_id not in model.cameras:
            raise ColmapFormatError(
                f"{files['images']}: image {image.id} refers to camera {image.camera_id}, "
                f"absent from {files['cameras']}"
            )
        ids = image.point3D_ids[image.point3D_ids >= 0]
        rows = model.rows_of(ids)
        if np.any(rows < 0):
            missing = ids[rows < 0][0]
            raise ColmapFormatError(
                f"{files['images']}: image {image.id} observes 3D point {missing}, absent from "
                f"{files['points3D']} ({int(np.sum(rows < 0))} such observations; truncated file?)"
            )


# ---------------------------------------------------------------------------------------------
# Text format
# ---------------------------------------------------------------------------------------------

_COUNT_RE = re.compile(r"#\s*Number of (cameras|images|points):\s*(\d+)")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ColmapFormatError(f"{path}: unreadable ({exc})") from exc


def _declared_count(lines: list[str]) -> int | None:
    """The ``# Number of ...: N`` header COLMAP writes, used to detect truncation."""
    for line in lines[:10]:
        m = _COUNT_RE.match(line.strip())
        if m:
            return int(m.group(2))
    return None


def _check_count(path: Path, declared: int | None, got: int, what: str) -> None:
    if declared is not None and declared != got:
        raise ColmapFormatError(
            f"{path}: header declares {declared} {what} but {got} were read (truncated file?)"
        )


def _read_cameras_txt(path: Path) -> dict[int, Camera]:
    lines = _read_lines(path)
    cameras: dict[int, Camera] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tok = line.split()
        where = f"{path}:{lineno}"
        if len(tok) < 4:
            raise ColmapFormatError(f"{where}: expected 'ID MODEL WIDTH HEIGHT PARAMS...'")
        model = tok[1]
        if model not in NUM_PARAMS:
            raise ColmapFormatError(f"{where}: unknown camera model {model!r}")
        if len(tok) != 4 + NUM_PARAMS[model]:
            raise ColmapFormatError(
                f"{where}: {model} needs {NUM_PARAMS[model]} params, got {len(tok) - 4}"
            )
        try:
            cam_id, width, height = int(tok[0]), int(tok[2]), int(tok[3])
            params = np.array([float(v) for v in tok[4:]])
        except ValueError as exc:
            raise ColmapFormatError(f"{where}: bad number ({exc})") from exc
        if not np.all(np.isfinite(params)):
            raise ColmapFormatError(f"{where}: non-finite camera parameter")
        cameras[cam_id] = Camera(cam_id, model, width, height, params)
    _check_count(path, _declared_count(lines), len(cameras), "cameras")
    return cameras


def _read_images_txt(path: Path) -> dict[int, ColmapImage]:
    lines = _read_lines(path)
    images: dict[int, ColmapImage] = {}
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("#"):
            i += 1
            continue
        where = f"{path}:{i + 1}"
        tok = line.split()
        if len(tok) < 10:
            raise ColmapFormatError(
                f"{where}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', "
                f"got {len(tok)} fields"
            )
        try:
            image_id = int(tok[0])
            q = np.array([float(v) for v in tok[1:5]])
            t = np.array([float(v) for v in tok[5:8]])
            cam_id = int(tok[8])
        except ValueError as exc:
            raise ColmapFormatError(f"{where}: bad number ({exc})") from exc
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))) or np.linalg.norm(q) == 0:
            raise ColmapFormatError(f"{where}: invalid pose (non-finite or zero quaternion)")
        name = " ".join(tok[9:])  # names with spaces are kept whole
        # The keypoint line follows directly (it may be empty: an image without keypoints).
        if i + 1 >= len(lines):
            raise ColmapFormatError(
                f"{path}:{i + 2}: missing POINTS2D line of image {image_id} (truncated file?)"
            )
        xys, ids = _parse_points2d(lines[i + 1], f"{path}:{i + 2}")
        images[image_id] = ColmapImage(image_id, q, t, cam_id, name, xys, ids)
        i += 2
    _check_count(path, _declared_count(lines), len(images), "images")
    return images


def _parse_points2d(line: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    tok = line.split()
    if len(tok) % 3 != 0:
        raise ColmapFormatError(
            f"{where}: POINTS2D needs triples (X Y POINT3D_ID), got {len(tok)} values "
            "(truncated line?)"
        )
    if not tok:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    arr = np.array(tok).reshape(-1, 3)
    try:
        xys = arr[:, :2].astype(np.float64)
        ids = arr[:, 2].astype(np.int64)
    except ValueError as exc:
        raise ColmapFormatError(f"{where}: bad number in POINTS2D ({exc})") from exc
    if not np.all(np.isfinite(xys)):
        raise ColmapFormatError(f"{where}: non-finite keypoint coordinate")
    return xys, ids


def _read_points_txt(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lines = _read_lines(path)
    ids, xyz, rgb, err = [], [], [], []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tok = line.split()
        where = f"{path}:{lineno}"
        if len(tok) < 8 or (len(tok) - 8) % 2 != 0:
            raise ColmapFormatError(
                f"{where}: expected 'POINT3D_ID X Y Z R G B ERROR TRACK[] as (IMAGE_ID, "
                f"POINT2D_IDX)', got {len(tok)} fields (truncated line?)"
            )
        try:
            ids.append(int(tok[0]))
            xyz.append((float(tok[1]), float(tok[2]), float(tok[3])))
            rgb.append((int(tok[4]), int(tok[5]), int(tok[6])))
            err.append(float(tok[7]))
        except ValueError as exc:
            raise ColmapFormatError(f"{where}: bad number ({exc})") from exc
    _check_count(path, _declared_count(lines), len(ids), "points")
    xyz_a = np.array(xyz, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(xyz_a)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(xyz_a), axis=1))[0])
        raise ColmapFormatError(f"{path}: non-finite coordinates for 3D point {ids[bad]}")
    return (
        np.array(ids, dtype=np.int64),
        xyz_a,
        np.array(rgb, dtype=np.uint8).reshape(-1, 3),
        np.array(err, dtype=np.float64),
    )


# ---------------------------------------------------------------------------------------------
# Binary format
# ---------------------------------------------------------------------------------------------


class _BinaryReader:
    """Sequential little-endian reader over a whole file, reporting the byte offset on errors."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.buf = path.read_bytes()
        except OSError as exc:
            raise ColmapFormatError(f"{path}: unreadable ({exc})") from exc
        self.pos = 0

    def error(self, msg: str, pos: int | None = None) -> ColmapFormatError:
        return ColmapFormatError(f"{self.path}: byte {self.pos if pos is None else pos}: {msg}")

    def _need(self, nbytes: int, what: str) -> None:
        left = len(self.buf) - self.pos
        if nbytes > left:
            raise self.error(
                f"truncated: {what} needs {nbytes} bytes, only {left} left "
                f"(file size {len(self.buf)})"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct("<" + fmt)
        self._need(s.size, what)
        out = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return out

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        dtype = np.dtype(dtype)
        self._need(dtype.itemsize * count, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += dtype.itemsize * count
        return out

    def cstring(self, what: str) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise self.error(f"truncated: {what} has no terminating NUL byte")
        try:
            s = self.buf[self.pos : end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(f"{what} is not valid UTF-8 ({exc})") from exc
        self.pos = end + 1
        return s

    def count(self, what: str, min_record_bytes: int) -> int:
        """A uint64 element count, sanity-checked against the bytes left (corrupt counts would
        otherwise ask for absurd allocations)."""
        start = self.pos
        (n,) = self.unpack("Q", f"number of {what}")
        if n * min_record_bytes > len(self.buf) - self.pos:
            raise self.error(
                f"corrupt or truncated: {n} {what} need at least {n * min_record_bytes} bytes, "
                f"only {len(self.buf) - self.pos} left",
                start,
            )
        return int(n)

    def finish(self) -> None:
        if self.pos != len(self.buf):
            raise self.error(f"{len(self.buf) - self.pos} unexpected trailing bytes (corrupt file?)")


def _read_cameras_bin(path: Path) -> dict[int, Camera]:
    r = _BinaryReader(path)
    n = r.count("cameras", 24)
    cameras: dict[int, Camera] = {}
    for k in range(n):
        start = r.pos
        cam_id, model_id, width, height = r.unpack("iiQQ", f"camera {k} header")
        if model_id not in CAMERA_MODELS:
            raise r.error(f"camera {cam_id}: unknown camera model id {model_id}", start)
        name, nparams = CAMERA_MODELS[model_id]
        params = r.array("<f8", nparams, f"camera {cam_id} params").astype(np.float64)
        if not np.all(np.isfinite(params)):
            raise r.error(f"camera {cam_id}: non-finite parameter", start)
        cameras[cam_id] = Camera(cam_id, name, int(width), int(height), params)
    r.finish()
    return cameras


_POINT2D_DTYPE = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])


def _read_images_bin(path: Path) -> dict[int, ColmapImage]:
    r = _BinaryReader(path)
    n = r.count("images", 64 + 1 + 8)
    images: dict[int, ColmapImage] = {}
    for k in range(n):
        start = r.pos
        rec = r.unpack("idddddddi", f"image {k} header")
        image_id, q, t, cam_id = rec[0], np.array(rec[1:5]), np.array(rec[5:8]), rec[8]
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))) or np.linalg.norm(q) == 0:
            raise r.error(f"image {image_id}: invalid pose (non-finite or zero quaternion)", start)
        name = r.cstring(f"image {image_id} name")
        npts = r.count(f"keypoints of image {image_id}", _POINT2D_DTYPE.itemsize)
        pts = r.array(_POINT2D_DTYPE, npts, f"keypoints of image {image_id}")
        xys = np.stack([pts["x"], pts["y"]], axis=1).astype(np.float64)
        if not np.all(np.isfinite(xys)):
            raise r.error(f"image {image_id}: non-finite keypoint coordinate", start)
        images[image_id] = ColmapImage(
            image_id, q, t, cam_id, name, xys, pts["id"].astype(np.int64)
        )
    r.finish()
    return images


def _read_points_bin(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = _BinaryReader(path)
    n = r.count("3D points", 51)
    ids = np.empty(n, dtype=np.int64)
    xyz = np.empty((n, 3), dtype=np.float64)
    rgb = np.empty((n, 3), dtype=np.uint8)
    err = np.empty(n, dtype=np.float64)
    head = struct.Struct("<QdddBBBdQ")
    buf = r.buf
    # A Python loop over points is needed because tracks have variable length; struct on the
    # shared buffer keeps it at ~1 us per point.
    for k in range(n):
        r._need(head.size, f"3D point {k} header")
        pid, x, y, z, cr, cg, cb, e, tlen = head.unpack_from(buf, r.pos)
        r.pos += head.size
        r._need(8 * tlen, f"track of 3D point {pid} ({tlen} elements)")
        r.pos += 8 * tlen
        ids[k] = pid
        xyz[k] = (x, y, z)
        rgb[k] = (cr, cg, cb)
        err[k] = e
    r.finish()
    if not np.all(np.isfinite(xyz)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(xyz), axis=1))[0])
        raise ColmapFormatError(f"{path}: non-finite coordinates for 3D point {ids[bad]}")
    return ids, xyz, rgb, err
