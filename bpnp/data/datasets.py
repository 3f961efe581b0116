"""Map-style datasets of scene dicts, one per data source, plus an outlier-augmentation wrapper.

Every item is a scene dict (the scene-file keys of docs/data.md, numpy arrays) with an extra ``"index"`` (int), the
item's position in its dataset, which :func:`bpnp.data.collate.collate_scenes` turns into
``batch["index"]``. Each dataset has ``names``: a human-readable name per item for reports.

All randomness is keyed by ``(seed, item, [epoch])`` through ``numpy.random.default_rng``, never
global state, so items are identical across DDP ranks, dataloader workers and reruns.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from bpnp.data.bpnpnet_pickles import bpnpnet_to_scene, default_w_gt_per, load_bpnpnet_split, split_dir
from bpnp.data.colmap import read_model
from bpnp.data.instances import dropped_images_warning, instance_from_image, screen_images
from bpnp.data.scenes import SceneDirectory
from bpnp.data.shuffle import shuffle_sets
from bpnp.data.synthetic import SyntheticConfig, make_instance

__all__ = [
    "add_outliers",
    "subsample_scene",
    "SyntheticDataset",
    "SceneDataset",
    "ColmapDataset",
    "PickleDataset",
    "OutlierAugmented",
]


def add_outliers(
    scene: Mapping[str, Any], frac_2d: float, frac_3d: float, rng: np.random.Generator | int
) -> dict[str, Any]:
    """Add uniform outliers to a scene (used for outlier sweeps and augmentation).

    ``round(f / (1 - f) * size)`` points are added to each set, so the *added* points make up a
    fraction ``f`` of the result (BPnPNet's ``--frac_outliers r`` adds ``r * size`` points, i.e.
    ``f = r / (1 + r)``). 2D outliers are uniform in the bounding box of the inlier 2D points,
    3D outliers uniform in the bounding box of the matched 3D points (all points when there are
    no inliers). Both sets are then shuffled.

    Args:
        scene: scene dict (numpy arrays); not modified.
        frac_2d, frac_3d: fractions in [0, 1).
        rng: generator or seed; the result is a deterministic function of it.

    Returns:
        A new scene dict (other keys such as ``K``, ``index`` are carried over).
    """
    for name, f in (("frac_2d", frac_2d), ("frac_3d", frac_3d)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"add_outliers: {name} must lie in [0, 1), got {f}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    p2d = np.asarray(scene["p2d"], dtype=np.float64)
    p3d = np.asarray(scene["p3d"], dtype=np.float64)
    match = np.asarray(scene["match"], dtype=np.int64)
    inl = match >= 0
    ref2 = p2d[inl] if inl.any() else p2d
    ref3 = p3d[np.unique(match[inl])] if inl.any() else p3d
    n2 = int(round(frac_2d / (1.0 - frac_2d) * len(p2d)))
    n3 = int(round(frac_3d / (1.0 - frac_3d) * len(p3d)))
    new2 = rng.uniform(ref2.min(0), ref2.max(0), size=(n2, 2))
    new3 = rng.uniform(ref3.min(0), ref3.max(0), size=(n3, 3))
    p2d, p3d, match = shuffle_sets(
        np.concatenate([p2d, new2]), np.concatenate([p3d, new3]),
        np.concatenate([match, np.full(n2, -1, dtype=np.int64)]), rng,
    )
    out = dict(scene)
    out.update(p2d=p2d, p3d=p3d, match=match)
    return out


class SyntheticDataset(Dataset):
    """Item ``i`` = :func:`~bpnp.data.synthetic.make_instance` ``(cfg, seed, i)``.

    With ``resample_each_epoch``, item ``i`` at epoch ``e`` is instance ``e * length + i`` of the
    same stream (fresh data every epoch; call :meth:`set_epoch`). ``schedule`` maps a first
    epoch to the config used from that epoch on (a curriculum, e.g. larger sets later); before
    its smallest key, ``cfg`` is used.
    """

    def __init__(self, cfg: SyntheticConfig | Mapping | None, seed: int, length: int,
                 resample_each_epoch: bool = False,
                 schedule: Mapping[int, SyntheticConfig | Mapping] | None = None):
        if int(length) <= 0:
            raise ValueError(f"SyntheticDataset: length must be > 0, got {length}")
        if int(seed) < 0:
            raise ValueError(f"SyntheticDataset: seed must be >= 0, got {seed}")
        self.base_cfg = self.cfg = SyntheticConfig.from_dict(cfg)
        self.schedule = {int(e): SyntheticConfig.from_dict(c) for e, c in dict(schedule or {}).items()}
        if any(e < 0 for e in self.schedule):
            raise ValueError(f"SyntheticDataset: schedule epochs must be >= 0, got {sorted(self.schedule)}")
        self.seed, self.length = int(seed), int(length)
        self.resample_each_epoch = bool(resample_each_epoch)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        started = [e for e in self.schedule if e <= self.epoch]
        self.cfg = self.schedule[max(started)] if started else self.base_cfg

    def preload_meshes(self) -> int:
        """Read every mesh that this dataset's configs (base and schedule) can draw into this
        process's cache, and return how many. Called before DataLoader workers are forked, so
        that each worker inherits the meshes instead of reading them again every epoch."""
        from pathlib import Path

        from bpnp.data.meshes import load_mesh, mesh_choices

        files = set()
        for cfg in (self.base_cfg, *self.schedule.values()):
            if cfg.shape_weights.get("mesh", 0.0) > 0 and cfg.mesh_root:
                rels, _ = mesh_choices(cfg.mesh_root, cfg.mesh_split, cfg.heldout_category, cfg.heldout_mesh_frac,
                                       cfg.mesh_category_weights)
                files.update(str(Path(cfg.mesh_root) / rel) for rel in rels)
        for path in sorted(files):
            load_mesh(path)
        return len(files)

    @property
    def names(self) -> list[str]:
        return [f"synthetic_s{self.seed}_{i:06d}" for i in range(self.length)]

    def __len__(self) -> int:
        return self.length

    def size_bound(self, index: int) -> tuple[int, int]:
        """Upper bounds of ``(m, n)`` of item ``index`` from the config alone (its largest
        ``num_points_2d``; the inliers plus the largest 3D outlier fraction), without drawing it:
        what ``evaluate.py`` checks memory against before any work."""
        def hi(v: Any) -> float:
            return float(v[1]) if isinstance(v, (tuple, list)) else float(v)

        m = int(hi(self.cfg.num_points_2d))
        f3 = min(hi(self.cfg.outlier_frac_3d), 0.999)
        return m, m + int(round(f3 / (1.0 - f3) * m))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        offset = self.epoch * self.length if self.resample_each_epoch else 0
        scene = make_instance(self.cfg, self.seed, offset + int(index))
        scene["index"] = int(index)
        return scene


def subsample_scene(scene: Mapping[str, Any], max_points_2d: int | None, max_points_3d: int | None,
                    rng: np.random.Generator | int) -> dict[str, Any]:
    """At most ``max_points_2d`` 2D and ``max_points_3d`` 3D points of a scene, drawn as the
    COLMAP instances are (:func:`bpnp.data.instances.instance_from_image`): inlier and outlier
    2D points in proportion (at least 4 inliers), every 3D point a kept 2D point observes, then
    other 3D points up to the cap; the order of each set is kept. A scene within both caps is
    returned unchanged."""
    m, n = len(scene["p2d"]), len(scene["p3d"])
    if (max_points_2d is None or m <= max_points_2d) and (max_points_3d is None or n <= max_points_3d):
        return dict(scene)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    match = np.asarray(scene["match"], dtype=np.int64)
    inl, out = np.flatnonzero(match >= 0), np.flatnonzero(match < 0)
    k, j = len(inl), len(out)
    if max_points_2d is not None and k + j > max_points_2d:
        k = min(len(inl), max(4, int(round(max_points_2d * len(inl) / (len(inl) + len(out))))))
        j = max_points_2d - k
    if max_points_3d is not None:
        seen_frac = len(np.unique(match[inl])) / max(n, 1)  # the scene's 3D inlier fraction
        k_cap = max(4, int(np.floor(max_points_3d * seen_frac)))
        if k > k_cap:
            j = int(round(k_cap * j / max(k, 1)))
            k = k_cap
    keep2 = np.sort(np.concatenate([rng.choice(inl, size=min(k, len(inl)), replace=False),
                                    rng.choice(out, size=min(j, len(out)), replace=False)]))
    seen = np.unique(match[keep2][match[keep2] >= 0])
    others = np.setdiff1d(np.arange(n), seen, assume_unique=True)
    n_out = len(others) if max_points_3d is None else min(len(others), max(max_points_3d - len(seen), 0))
    keep3 = np.sort(np.concatenate([seen, rng.choice(others, size=n_out, replace=False)])).astype(np.int64)
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[keep3] = np.arange(len(keep3))
    sub = match[keep2]
    out_scene = dict(scene)
    out_scene.update(p2d=np.asarray(scene["p2d"])[keep2], p3d=np.asarray(scene["p3d"])[keep3],
                     match=np.where(sub >= 0, new_index[np.maximum(sub, 0)], -1))
    return out_scene


class SceneDataset(SceneDirectory):
    """A directory of scene files (see :class:`bpnp.data.scenes.SceneDirectory`), optionally
    subsampled to at most ``max_points_2d`` / ``max_points_3d`` points per scene
    (:func:`subsample_scene`, item ``i`` drawn with ``default_rng([seed, i])``): how an instance
    too large for memory is evaluated (``evaluate.py data.max_points_2d=...``)."""

    def __init__(self, directory: str | Path, max_points_2d: int | None = None, max_points_3d: int | None = None,
                 seed: int = 0):
        for name, v in (("max_points_2d", max_points_2d), ("max_points_3d", max_points_3d)):
            if v is not None and int(v) < 8:
                raise ValueError(f"SceneDataset: {name} must be >= 8 (or null), got {v}")
        super().__init__(directory)
        self.max_points = (None if max_points_2d is None else int(max_points_2d),
                           None if max_points_3d is None else int(max_points_3d))
        self.seed = int(seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = super().__getitem__(index)
        if self.max_points == (None, None):
            return scene
        return subsample_scene(scene, *self.max_points, np.random.default_rng([self.seed, int(index)]))


class ColmapDataset(Dataset):
    """One instance per registered image of one or more COLMAP models.

    Models are read once here (``ColmapFormatError`` on a bad file). Item randomness (subsampling,
    3D outliers) uses ``default_rng([seed, crc32(folder name), image_id])``, plus the epoch when
    ``resample_each_epoch`` (call :meth:`set_epoch`), so an item does not depend on the order of
    ``model_dirs``.

    Args:
        model_dirs: folders of COLMAP sparse models.
        max_points_2d, max_points_3d, outlier_frac_3d, outliers_per_inlier_2d: see
            :func:`bpnp.data.instances.instance_from_image`.
        seed: base seed.
        resample_each_epoch: draw a new subsample every epoch.
        min_inliers: images with fewer matched keypoints are skipped.
    """

    def __init__(self, model_dirs: Sequence[str | Path], max_points_2d: int | None = None,
                 max_points_3d: int | None = None, outlier_frac_3d: float = 0.5, seed: int = 0,
                 resample_each_epoch: bool = False, min_inliers: int = 4,
                 outliers_per_inlier_2d: float | None = None):
        if isinstance(model_dirs, (str, Path)):
            model_dirs = [model_dirs]
        if not model_dirs:
            raise ValueError("ColmapDataset: model_dirs is empty")
        self.model_dirs = [Path(d) for d in model_dirs]
        self.models = [read_model(d) for d in self.model_dirs]
        self.kw = dict(max_points_2d=max_points_2d, max_points_3d=max_points_3d,
                       outlier_frac_3d=outlier_frac_3d, outliers_per_inlier_2d=outliers_per_inlier_2d)
        self.seed, self.resample_each_epoch, self.epoch = int(seed), bool(resample_each_epoch), 0
        self.items: list[tuple[int, int]] = []
        #: ``(model folder, image id, name, reason)`` of every image left out (said in one warning line per model)
        self.dropped: list[tuple[str, int, str, str]] = []
        for mi, model in enumerate(self.models):
            # Every camera and image now, before any instance: an unsupported camera fails here,
            # naming the image, and images that cannot give an instance are named, never silently left out.
            usable, dropped = screen_images(model, min_inliers)
            self.items.extend((mi, image_id) for image_id in usable)
            if dropped:
                self.dropped.extend((str(model.path), i, name, why) for i, name, why in dropped)
                logging.getLogger("bpnp.data").warning(dropped_images_warning(model, dropped))
        if not self.items:
            raise ValueError(f"ColmapDataset: no usable image in {[str(d) for d in self.model_dirs]}")
        self._keys = [zlib.crc32(d.resolve().name.encode()) for d in self.model_dirs]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def names(self) -> list[str]:
        return [f"{self.model_dirs[mi].name}/{self.models[mi].images[i].name}" for mi, i in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def size_bound(self, index: int) -> tuple[int, int]:
        """Upper bounds of ``(m, n)`` of item ``index`` without building it (its keypoints and the
        3D points they can bring, after the ``max_points_*`` caps): what ``evaluate.py`` checks
        memory against before any work."""
        mi, image_id = self.items[index]
        model, image = self.models[mi], self.models[mi].images[image_id]
        cap2, cap3, f3 = self.kw["max_points_2d"], self.kw["max_points_3d"], float(self.kw["outlier_frac_3d"])
        m = len(image.xys) if cap2 is None else min(len(image.xys), int(cap2))
        n_in = min(len(np.unique(image.point3D_ids[image.point3D_ids >= 0])), m)
        n = n_in + int(round(f3 / (1.0 - f3) * n_in))
        n = min(n, len(model.point_ids)) if cap3 is None else min(n, len(model.point_ids), int(cap3))
        return m, n

    def __getitem__(self, index: int) -> dict[str, Any]:
        mi, image_id = self.items[index]
        key = [self.seed, self._keys[mi], image_id] + ([self.epoch] if self.resample_each_epoch else [])
        scene = instance_from_image(self.models[mi], image_id, rng=np.random.default_rng(key), **self.kw)
        scene["index"] = int(index)
        return scene


class PickleDataset(Dataset):
    """BPnPNet pickles of ``<root>/<dataset>_<split>/preprocessed`` (see
    :mod:`bpnp.data.bpnpnet_pickles`), optionally restricted to ``indices`` of the split."""

    def __init__(self, root: str | Path, dataset: str, split: str, w_gt_per: str | None = None,
                 indices: Sequence[int] | None = None):
        self.folder = split_dir(root, dataset, split)
        self.data = load_bpnpnet_split(root, dataset, split)
        self.w_gt_per = w_gt_per or default_w_gt_per(dataset)
        total = len(self.data["t_gt"])
        self.indices = list(range(total)) if indices is None else [int(i) for i in indices]
        if any(not 0 <= i < total for i in self.indices):
            raise IndexError(f"PickleDataset: indices out of range [0, {total}) for {self.folder}")

    @property
    def names(self) -> list[str]:
        return [f"{self.folder.parent.name}_{i:06d}" for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        j = self.indices[index]
        sample = {k: v[j] for k, v in self.data.items()}
        scene = bpnpnet_to_scene(sample, f"{self.folder} sample {j}", self.w_gt_per)
        scene["index"] = int(index)
        return scene


class OutlierAugmented(Dataset):
    """Wraps a dataset: item ``i`` = :func:`add_outliers` ``(base[i], frac_2d, frac_3d,
    default_rng([seed, i]))``."""

    def __init__(self, base: Dataset, frac_2d: float = 0.0, frac_3d: float = 0.0, seed: int = 0):
        for name, f in (("frac_2d", frac_2d), ("frac_3d", frac_3d)):
            if not 0.0 <= f < 1.0:
                raise ValueError(f"OutlierAugmented: {name} must lie in [0, 1), got {f}")
        self.base, self.frac_2d, self.frac_3d, self.seed = base, float(frac_2d), float(frac_3d), int(seed)

    @property
    def names(self) -> list[str]:
        return list(getattr(self.base, "names", [str(i) for i in range(len(self))]))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.base[index]
        if self.frac_2d == 0.0 and self.frac_3d == 0.0:
            return scene
        return add_outliers(scene, self.frac_2d, self.frac_3d, self.rng(index))

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index``'s outliers (a function of the seed and the index)."""
        return np.random.default_rng([self.seed, int(index)])
