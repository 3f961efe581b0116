"""Real triangle meshes for the synthetic generator's ``mesh`` family: listing, honest splits,
a per-process cache of normalised arrays, and area-weighted surface sampling.

The default meshes are the repository's embedded set (``${paths.data_dir}/meshes`` =
``data/meshes``, one folder per category: ``CAD building furniture organic_scan other room
terrain vehicle``; ``data/meshes/MANIFEST.md`` gives source and licence per file); any folder of
that shape works (``paths.data_dir=../shared/data`` reads the project's 115 shared meshes).

**Splits** (:func:`split_meshes`, a pure function of the sorted file list): one whole category
(``heldout_category``, default ``vehicle``) is never used for training or validation; it is the
``test_unseen_category`` split. Of every other category, ``heldout_mesh_frac`` of the meshes
(at least one for val and one for test when the category has three or more) are held out: the
files are ranked by a SHA-256 hash of their path relative to the root (``"CAD/fandisk.obj"``; not
Python's salted ``hash``), the first ``ceil(h / 2)`` go to ``val``, the next ``floor(h / 2)`` to
``test_unseen_meshes``, the rest to ``train``. ``all`` is every file. A file's split depends
only on its name and on how many files its category holds. ``python -m bpnp.data.meshes --root
data/meshes`` prints the counts per category and split (``--list`` every file).

Why ``vehicle`` is the default held-out category: it is object-like (the camera model of
objects, not the room/street/aerial views that the scene-like categories need, so holding it
out removes no camera mode from training), it has 14 meshes of distinct shapes (cars, a bus,
trucks, a plane, a boat, a bicycle, a rover), enough for a test of its own, and it is not
needed to cover the training distribution: ``CAD``, ``furniture``, ``organic_scan`` and
``other`` keep 79 % of the object meshes.

**Normalisation** (:func:`load_mesh`): the vertices that faces use are centred on their
bounding-box centre and scaled to a unit bounding-sphere radius (max distance to the centre =
1). Scene-like categories are also turned upright (their up axis becomes +z): ``room`` and
``building`` meshes come from Gazebo / AWS RoboMaker worlds, which are z-up; ``terrain``'s up is
the axis (and sign) of the largest component of the area-weighted mean face normal (height maps
face up; ``mountain.obj`` is y-up). Degenerate faces are dropped. Face normals are used for
back-face culling only when the mesh is closed with consistent winding (watertight); a closed
mesh with negative volume has its normals flipped; every other mesh is treated as two-sided
(the z-buffer of :mod:`bpnp.data.occlusion` still hides its far side).

**Cache**: :func:`load_mesh` keeps one :class:`MeshData` (numpy arrays only) per resolved path
and process (an LRU cache), so each dataloader worker parses a file once, never per instance.
:func:`clear_mesh_cache` empties it (tests use it to show that instances do not depend on it).

**Sampling** (:meth:`MeshData.sample`) is our own: faces by area through the caller's numpy
``Generator`` (inverse CDF), then uniform barycentric coordinates; trimesh's random state is
never used, so instances stay a function of ``(seed, index)``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from bpnp.data.embedded import MESH_ROOT

__all__ = [
    "CATEGORIES",
    "OBJECT_CATEGORIES",
    "SCENE_CATEGORIES",
    "MESH_SPLITS",
    "MESH_SUFFIXES",
    "MeshData",
    "list_meshes",
    "split_meshes",
    "mesh_choices",
    "load_mesh",
    "clear_mesh_cache",
    "view_mode",
]

CATEGORIES = ("CAD", "building", "furniture", "organic_scan", "other", "room", "terrain", "vehicle")
#: Scene-like categories and their camera: inside a room; street/aerial views of a building;
#: aerial/oblique views of a terrain. Every other category is viewed as an object.
SCENE_CATEGORIES = {"room": "inside", "building": "street", "terrain": "aerial"}
OBJECT_CATEGORIES = tuple(c for c in CATEGORIES if c not in SCENE_CATEGORIES)
MESH_SPLITS = ("train", "val", "test_unseen_meshes", "test_unseen_category", "all")
MESH_SUFFIXES = (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")


def view_mode(category: str) -> str:
    """``object``, ``inside``, ``street`` or ``aerial``: how the generator places the camera."""
    return SCENE_CATEGORIES.get(category, "object")


# ---------------------------------------------------------------------------------------------
# Listing and splits
# ---------------------------------------------------------------------------------------------


def list_meshes(root: str | Path) -> list[str]:
    """Sorted paths ``"<category>/<file>"`` (POSIX, relative to ``root``) of the mesh files in the
    category folders directly under ``root`` (folders not in :data:`CATEGORIES` are ignored).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"mesh root {root} is not a directory")
    out = []
    for cat in CATEGORIES:
        folder = root / cat
        if folder.is_dir():
            out += [f"{cat}/{p.name}" for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in MESH_SUFFIXES]
    return sorted(out)


def _name_key(rel: str) -> tuple[str, str]:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest(), rel


def split_meshes(files: Sequence[str], heldout_category: str | None = "vehicle",
                 heldout_mesh_frac: float = 0.2) -> dict[str, list[str]]:
    """Partition ``"<category>/<file>"`` paths into the mesh splits (see the module docstring).

    Returns:
        ``{split: sorted paths}`` for every split in :data:`MESH_SPLITS`. ``train``, ``val``,
        ``test_unseen_meshes`` and ``test_unseen_category`` are disjoint and cover ``all``.
    """
    if not 0.0 <= float(heldout_mesh_frac) < 1.0:
        raise ValueError(f"heldout_mesh_frac must lie in [0, 1), got {heldout_mesh_frac!r}")
    files = sorted(set(files))
    out: dict[str, list[str]] = {s: [] for s in MESH_SPLITS}
    out["all"] = list(files)
    by_cat: dict[str, list[str]] = {}
    for f in files:
        by_cat.setdefault(f.split("/", 1)[0], []).append(f)
    for cat, names in by_cat.items():
        if cat == heldout_category:
            out["test_unseen_category"] += names
            continue
        n = len(names)
        held = int(round(heldout_mesh_frac * n))
        if heldout_mesh_frac > 0 and n >= 3:
            held = max(held, 2)  # one for val and one for test
        held = min(held, n - 1)  # at least one mesh of the category stays in train
        ranked = sorted(names, key=_name_key)
        n_val = (held + 1) // 2
        out["val"] += ranked[:n_val]
        out["test_unseen_meshes"] += ranked[n_val:held]
        out["train"] += ranked[held:]
    return {k: sorted(v) for k, v in out.items()}


@lru_cache(maxsize=64)
def _listing(root: str) -> tuple[str, ...]:
    return tuple(list_meshes(root))


@lru_cache(maxsize=256)
def _choices(root: str, split: str, heldout_category: str | None, heldout_mesh_frac: float,
             weights: tuple[tuple[str, float], ...]) -> tuple[tuple[str, ...], np.ndarray]:
    files = split_meshes(_listing(root), heldout_category, heldout_mesh_frac)[split]
    w = dict(weights)
    counts: dict[str, int] = {}
    for f in files:
        counts[f.split("/", 1)[0]] = counts.get(f.split("/", 1)[0], 0) + 1
    # Each category's weight is spread evenly over its meshes in this split.
    p = np.array([w.get(f.split("/", 1)[0], 0.0) / counts[f.split("/", 1)[0]] for f in files])
    keep = p > 0
    files = tuple(f for f, k in zip(files, keep) if k)
    p = p[keep]
    if len(files) == 0:
        raise ValueError(
            f"SyntheticConfig.mesh_split={split!r}: no mesh with a positive category weight "
            f"under {root} (heldout_category={heldout_category!r}, weights={w})")
    return files, p / p.sum()


def mesh_choices(root: str | Path, split: str, heldout_category: str | None = "vehicle",
                 heldout_mesh_frac: float = 0.2,
                 category_weights: dict[str, float] | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """The meshes of ``split`` with a positive category weight and their probabilities (each
    category's weight split evenly over its meshes in the split). Cached per process.

    Raises:
        FileNotFoundError: no such root; ValueError: nothing to draw from.
    """
    if split not in MESH_SPLITS:
        raise ValueError(f"unknown mesh split {split!r} (known: {', '.join(MESH_SPLITS)})")
    weights = {c: 1.0 for c in CATEGORIES} if category_weights is None else category_weights
    key = tuple(sorted((str(k), float(v)) for k, v in weights.items()))
    return _choices(str(Path(root).resolve()), split, heldout_category, float(heldout_mesh_frac), key)


# ---------------------------------------------------------------------------------------------
# Loading, normalisation, sampling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MeshData:
    """A normalised mesh: unit bounding-sphere radius about the bounding-box centre (the origin);
    scene-like categories upright (+z up). Arrays only, so a worker holds it cheaply.

    Attributes:
        path, category: the file and its category folder.
        vertices (V, 3) float64, faces (F, 3) int64 (non-degenerate), areas (F,) float64,
        normals (F, 3) unit face normals, cum_areas (F,) cumulative areas (for sampling),
        two_sided: the normals are not trusted for back-face culling.
    """

    path: str
    category: str
    vertices: np.ndarray
    faces: np.ndarray
    areas: np.ndarray
    normals: np.ndarray
    cum_areas: np.ndarray
    two_sided: bool

    @property
    def area(self) -> float:
        """Total surface area (normalised units)."""
        return float(self.cum_areas[-1])

    @property
    def bounds(self) -> np.ndarray:
        """(2, 3): min and max corner of the normalised vertices."""
        return np.stack([self.vertices.min(0), self.vertices.max(0)])

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` points uniform on the surface (faces by area, then barycentric) and their face
        normals, both (n, 3), drawn from ``rng`` only."""
        n = int(n)
        face = np.searchsorted(self.cum_areas, rng.random(n) * self.cum_areas[-1], side="right")
        face = np.minimum(face, len(self.faces) - 1)
        r = rng.random((2, n))
        s = np.sqrt(r[0])
        a, b = 1.0 - s, s * (1.0 - r[1])
        tri = self.faces[face]
        v = self.vertices
        pts = a[:, None] * v[tri[:, 0]] + b[:, None] * v[tri[:, 1]] + (1.0 - a - b)[:, None] * v[tri[:, 2]]
        return pts, self.normals[face]


def _up_rotation(axis: int, sign: float) -> np.ndarray:
    """A proper rotation (rows: new x, y, z in old coordinates) taking ``sign * e_axis`` to +z."""
    z = np.zeros(3)
    z[axis] = sign
    x = np.zeros(3)
    x[(axis + 1) % 3] = 1.0
    return np.stack([x, np.cross(z, x), z])


@lru_cache(maxsize=None)
def _load(path: str) -> MeshData:
    import trimesh  # a run-time dependency of the mesh family only

    mesh = trimesh.load(path, force="mesh")
    faces = np.asarray(mesh.faces, dtype=np.int64)
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    if len(faces) == 0:
        raise ValueError(f"{path}: mesh has no faces")
    two_sided = True
    flip = False
    try:
        if mesh.is_watertight and mesh.is_winding_consistent:
            two_sided = False
            flip = float(mesh.volume) < 0
    except Exception:  # noqa: BLE001 - any failure of trimesh's checks: do not trust normals
        two_sided = True
    category = Path(path).parent.name
    used = np.unique(faces)
    lo, hi = verts[used].min(0), verts[used].max(0)
    centre = (lo + hi) / 2.0
    v = verts - centre
    scale = float(np.max(np.linalg.norm(v[used], axis=1)))
    if not scale > 0:
        raise ValueError(f"{path}: mesh has zero extent")
    v = v / scale
    tri = v[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    ok = double_area > 1e-12 * max(float(np.max(double_area)), 1e-300)
    faces, cross, double_area = faces[ok], cross[ok], double_area[ok]
    normals = cross / double_area[:, None]
    if flip:
        normals = -normals
    areas = double_area / 2.0
    mode = view_mode(category)
    if mode != "object":
        if mode == "aerial":  # terrain: the area-weighted mean normal points up
            mean_n = (normals * areas[:, None]).sum(0)
            axis = int(np.argmax(np.abs(mean_n)))
            sign = 1.0 if mean_n[axis] >= 0 else -1.0
        else:  # room, building: Gazebo / RoboMaker worlds are z-up
            axis, sign = 2, 1.0
        R = _up_rotation(axis, sign)
        v = v @ R.T
        normals = normals @ R.T
    v.setflags(write=False)
    for arr in (faces, normals, areas):
        arr.setflags(write=False)
    cum = np.cumsum(areas)
    cum.setflags(write=False)
    return MeshData(path=path, category=category, vertices=v, faces=faces, areas=areas,
                    normals=normals, cum_areas=cum, two_sided=two_sided)


def load_mesh(path: str | Path) -> MeshData:
    """The normalised :class:`MeshData` of a mesh file (category = its folder name), loaded
    with ``trimesh.load(path, force="mesh")`` once per process and path."""
    return _load(str(Path(path).resolve()))


def clear_mesh_cache() -> None:
    """Forget every loaded mesh and listing (the next use reloads them)."""
    _load.cache_clear()
    _listing.cache_clear()
    _choices.cache_clear()


# ---------------------------------------------------------------------------------------------
# CLI: python -m bpnp.data.meshes --root data/meshes
# ---------------------------------------------------------------------------------------------


def format_split_table(splits: dict[str, list[str]]) -> str:
    """Counts per category (rows) and split (columns) as aligned text."""
    cols = ["train", "val", "test_unseen_meshes", "test_unseen_category", "all"]
    cats = sorted({f.split("/", 1)[0] for f in splits["all"]}, key=lambda c: (c not in CATEGORIES, c))
    width = max([len("category"), len("total")] + [len(c) for c in cats])
    lines = ["category".ljust(width) + "".join(f"  {c:>{len(c)}}" for c in cols)]
    for cat in cats + ["total"]:
        row = cat.ljust(width)
        for c in cols:
            n = sum(1 for f in splits[c] if cat == "total" or f.split("/", 1)[0] == cat)
            row += f"  {n:>{len(c)}}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bpnp.data.meshes",
        description="Print the mesh splits of the synthetic generator's mesh family "
                    "(counts per category and split).")
    parser.add_argument("--root", type=Path, default=MESH_ROOT,
                        help="mesh folder (category subfolders; default: the embedded data/meshes)")
    parser.add_argument("--heldout-category", default="vehicle",
                        help="category held out for test_unseen_category ('none' for none)")
    parser.add_argument("--heldout-mesh-frac", type=float, default=0.2,
                        help="fraction of every other category held out for val + test")
    parser.add_argument("--list", action="store_true", help="also list every file with its split")
    args = parser.parse_args(argv)
    held = None if args.heldout_category.lower() in ("none", "null", "") else args.heldout_category
    try:
        files = list_meshes(args.root)
        if held is not None and held not in CATEGORIES:
            raise ValueError(f"unknown category {held!r} (known: {', '.join(CATEGORIES)})")
        splits = split_meshes(files, held, args.heldout_mesh_frac)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(files)} meshes under {args.root}; held-out category: {held}; "
          f"heldout_mesh_frac: {args.heldout_mesh_frac}")
    print(format_split_table(splits))
    if args.list:
        where = {f: s for s in MESH_SPLITS[:4] for f in splits[s]}
        for f in files:
            print(f"{where[f]:<22s} {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
