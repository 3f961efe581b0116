"""``BlindPnPDataModule``: train/val/test loaders of padded blind-PnP batches from one source.

Built from plain arguments, so Hydra can instantiate it from ``configs/data/*.yaml``
(``_target_: bpnp.data.datamodule.BlindPnPDataModule``). Sources:

- ``synthetic``: :class:`~bpnp.data.datasets.SyntheticDataset` streams with **disjoint seeds**:
  train ``seed``, val ``seed + 1``, test ``seed + 2`` unless ``train_seed``/``val_seed``/
  ``test_seed`` are given (they must differ). ``synthetic`` holds the
  :class:`~bpnp.data.synthetic.SyntheticConfig` fields; ``val_synthetic``/``test_synthetic``
  override some of them for one split (e.g. more outliers at test time). Mesh splits: the
  training config must use ``mesh_split: train``; val uses ``val`` and test
  ``test_unseen_meshes`` unless their overrides name another (``mesh_root``,
  ``heldout_category``, ``heldout_mesh_frac`` must agree across splits). ``synthetic_schedule``
  maps a first training epoch to overrides of ``synthetic`` used from then on (a curriculum,
  e.g. larger point sets in later epochs; each stage overrides the base ``synthetic``, not the
  previous stage; needs ``reload_dataloaders_every_n_epochs=1``).
- ``scenes``: directories of ``.npz`` scene files; ``path`` is the test set (what
  ``evaluate.py data=scenes data.path=DIR`` sets), ``train_path``/``val_path`` the others;
  ``max_points_2d``/``max_points_3d`` subsample each scene (seeded by split seed and item). With
  ``validate_files`` (default) :meth:`setup` reads every file of the splits it sets up once, so
  a bad file raises ``SceneFileError`` naming it before training starts.
- ``colmap``: COLMAP models, split **by scene**: ``train_scenes``/``val_scenes``/``test_scenes``
  are folder names under ``root`` (or paths); a model may appear in one split only.
  ``train_views`` / ``train_synthetic`` mix new views of the training models and synthetic mesh
  instances into the training split (:mod:`bpnp.data.mixing`; val and test stay real images).
- ``pickles``: BPnPNet pickles under ``root`` for ``dataset``; val is a seeded ``val_fraction``
  of the train split (the original validated on its test split), test is the test split.

``batch_size`` is **per device** (under DDP each rank loads ``batch_size`` items; Lightning adds
the distributed sampler). ``add_outlier_frac_2d/3d`` add uniform outliers to the splits named in
``add_outlier_splits`` (outlier sweeps). With ``resample_each_epoch`` (synthetic, colmap) the
training items change every epoch; set the trainer's ``reload_dataloaders_every_n_epochs=1`` so
that :meth:`train_dataloader` sees the new epoch (workers copy the dataset when created).
A split with no data configured gives an empty loader list (Lightning then skips that loop).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bpnp.data.bpnpnet_pickles import load_bpnpnet_split, split_dir
from bpnp.data.collate import collate_scenes
from bpnp.data.colmap import find_model_files
from bpnp.data.datasets import (ColmapDataset, OutlierAugmented, PickleDataset, SceneDataset,
                                SyntheticDataset)
from bpnp.data.synthetic import SyntheticConfig

__all__ = ["BlindPnPDataModule", "SOURCES"]

SOURCES = ("synthetic", "scenes", "colmap", "pickles")
SPLITS = ("train", "val", "test")


class EpochSampler(DistributedSampler):
    """The training order: a shuffle that is a pure function of ``(seed, epoch)``, sharded over
    ``num_replicas`` ranks (a ``DistributedSampler``, so Lightning keeps it under DDP), and able to
    skip the batches a resumed run has already trained.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so the order of epoch ``e`` is
    the same whether the loader was created at epoch 0 or at epoch ``e`` of a resumed run
    (``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from ``g``'s state, which a
    checkpoint does not hold). :meth:`skip_next` drops the first ``k`` indices of the next
    iteration only; ``len()`` stays the full per-rank length (Lightning counts the skipped batches
    as done).
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed))
        self._skip = 0

    def skip_next(self, count: int) -> None:
        self._skip = max(0, int(count))

    def __iter__(self):
        skip, self._skip = self._skip, 0
        return iter(list(super().__iter__())[skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that tells Lightning it can resume mid-epoch (Lightning otherwise warns
    that a mid-epoch resume "can cause unreliable results"). The state itself lives in the
    datamodule (:meth:`BlindPnPDataModule.state_dict`), which knows how many batches were trained;
    the loader cannot, since Lightning prefetches."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _seq(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (str, Path)):
        return [v]
    return list(v)


class BlindPnPDataModule(pl.LightningDataModule):
    """Loaders of collated batches (see :mod:`bpnp.data.collate`) for one data source.

    Raises (at construction, before any data is read): ``ValueError`` for an unknown source or
    inconsistent settings (equal synthetic seeds, a COLMAP scene in two splits), and
    ``FileNotFoundError`` naming the argument for a missing path.
    """

    def __init__(
        self,
        source: str = "synthetic",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_multiple: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle_train: bool = True,
        drop_last_train: bool = True,
        seed: int = 0,
        train_seed: int | None = None,
        val_seed: int | None = None,
        test_seed: int | None = None,
        # synthetic
        synthetic: Mapping[str, Any] | SyntheticConfig | None = None,
        val_synthetic: Mapping[str, Any] | None = None,
        test_synthetic: Mapping[str, Any] | None = None,
        synthetic_schedule: Mapping[int, Mapping[str, Any]] | None = None,
        train_length: int = 10000,
        val_length: int = 200,
        test_length: int = 500,
        resample_each_epoch: bool = False,
        # scenes
        path: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        validate_files: bool = True,
        # colmap and pickles
        root: str | None = None,
        train_scenes: Sequence[str] | None = None,
        val_scenes: Sequence[str] | None = None,
        test_scenes: Sequence[str] | None = None,
        train_views: Mapping[str, Any] | None = None,
        train_synthetic: Mapping[str, Any] | None = None,
        max_points_2d: int | None = None,
        max_points_3d: int | None = None,
        outlier_frac_3d: float = 0.5,
        outliers_per_inlier_2d: float | None = None,
        dataset: str | None = None,
        val_fraction: float = 0.1,
        w_gt_per: str | None = None,
        # outlier augmentation
        add_outlier_frac_2d: float = 0.0,
        add_outlier_frac_3d: float = 0.0,
        add_outlier_splits: Sequence[str] = ("test",),
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"BlindPnPDataModule: unknown source {source!r} (known: {', '.join(SOURCES)})")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("num_workers", num_workers),
                            ("pad_multiple", pad_multiple), ("seed", seed), ("train_length", train_length),
                            ("val_length", val_length), ("test_length", test_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"BlindPnPDataModule: {name} must be an integer, got {value!r}")
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("pad_multiple", pad_multiple, 1)):
            if int(value) < low:
                raise ValueError(f"BlindPnPDataModule: {name} must be >= {low}, got {value}")
        self.source = source
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pad_multiple = int(pad_multiple)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.shuffle_train = bool(shuffle_train)
        self.drop_last_train = bool(drop_last_train)
        self.seeds = {
            "train": int(seed if train_seed is None else train_seed),
            "val": int(seed + 1 if val_seed is None else val_seed),
            "test": int(seed + 2 if test_seed is None else test_seed),
        }
        self.resample_each_epoch = bool(resample_each_epoch)
        self.add_outliers = (float(add_outlier_frac_2d), float(add_outlier_frac_3d))
        bad = set(_seq(add_outlier_splits)) - set(SPLITS)
        if bad:
            raise ValueError(f"BlindPnPDataModule: add_outlier_splits has unknown splits {sorted(bad)}")
        self.add_outlier_splits = tuple(_seq(add_outlier_splits))
        for name, f in zip(("add_outlier_frac_2d", "add_outlier_frac_3d"), self.add_outliers):
            if not 0.0 <= f < 1.0:
                raise ValueError(f"BlindPnPDataModule: {name} must lie in [0, 1), got {f}")
        self._builders: dict[str, Any] = {}
        # Each source validates its own arguments now, so a bad config fails before any data is read.
        getattr(self, f"_configure_{source}")(locals())
        self._datasets: dict[str, Dataset | None] = {}
        self._resume: dict[str, Any] | None = None
        self.validate_files = bool(validate_files)
        self._validated: set[str] = set()

    # -- configuration per source (validation only; nothing is read yet) ------------------------

    def _configure_synthetic(self, a: dict) -> None:
        if len(set(self.seeds.values())) != 3:
            raise ValueError(f"BlindPnPDataModule: train/val/test seeds must differ, got {self.seeds}")
        base = SyntheticConfig.from_dict(a["synthetic"])
        cfgs = {"train": base}
        # Mesh splits: train draws from the train meshes only; val and test default to their own
        # held-out meshes (val_synthetic / test_synthetic may pick another, e.g.
        # test_unseen_category), and every split must use the same partition.
        for split, mesh_split in (("val", "val"), ("test", "test_unseen_meshes")):
            override = a[f"{split}_synthetic"]
            cfgs[split] = SyntheticConfig.from_dict({**base.to_dict(), "mesh_split": mesh_split,
                                                     **dict(override or {})})
        schedule = {}
        for epoch, override in dict(a["synthetic_schedule"] or {}).items():
            if not str(epoch).isdigit():
                raise ValueError(f"BlindPnPDataModule: synthetic_schedule keys are first epochs (ints >= 0), got {epoch!r}")
            schedule[int(epoch)] = SyntheticConfig.from_dict({**base.to_dict(), **dict(override or {})})
        for name, cfg in [("synthetic", base)] + [(f"synthetic_schedule[{e}]", c) for e, c in schedule.items()]:
            if cfg.mesh_split != "train":
                raise ValueError(f"BlindPnPDataModule: {name}.mesh_split must be 'train' (the training "
                                 f"split never draws val/test meshes), got {cfg.mesh_split!r}")
        partition = ("mesh_root", "heldout_category", "heldout_mesh_frac")
        for name, cfg in [("val_synthetic", cfgs["val"]), ("test_synthetic", cfgs["test"])] + \
                [(f"synthetic_schedule[{e}]", c) for e, c in schedule.items()]:
            for key in partition:
                if getattr(cfg, key) != getattr(base, key):
                    raise ValueError(f"BlindPnPDataModule: {name}.{key} differs from synthetic.{key}; "
                                     "all splits must share one mesh partition")
        lengths = {"train": a["train_length"], "val": a["val_length"], "test": a["test_length"]}
        for split in SPLITS:
            if int(lengths[split]) < 0:
                raise ValueError(f"BlindPnPDataModule: {split}_length must be >= 0")
            self._builders[split] = (
                None if int(lengths[split]) == 0 else partial(
                    SyntheticDataset, cfgs[split], self.seeds[split], int(lengths[split]),
                    resample_each_epoch=self.resample_each_epoch and split == "train",
                    schedule=schedule if split == "train" else None)
            )

    def _configure_scenes(self, a: dict) -> None:
        paths = {"train": a["train_path"], "val": a["val_path"], "test": a["test_path"] or a["path"]}
        if not any(paths.values()):
            raise ValueError("BlindPnPDataModule(source='scenes'): set path (test set) and/or "
                             "train_path, val_path, test_path")
        for split, p in paths.items():
            if p is not None and not Path(p).is_dir():
                arg = "path" if split == "test" and a["test_path"] is None else f"{split}_path"
                raise FileNotFoundError(f"BlindPnPDataModule: {arg}={p}: scene directory does not exist")
            self._builders[split] = None if p is None else partial(
                SceneDataset, p, max_points_2d=a["max_points_2d"], max_points_3d=a["max_points_3d"],
                seed=self.seeds[split])

    def _configure_colmap(self, a: dict) -> None:
        root = Path(a["root"]) if a["root"] else None
        if root is not None and not root.is_dir():
            raise FileNotFoundError(f"BlindPnPDataModule: root={root}: directory does not exist")
        resolved: dict[str, list[Path]] = {}
        owner: dict[Path, str] = {}
        for split in SPLITS:
            dirs = [root / s if root is not None and not Path(s).is_absolute() else Path(s)
                    for s in _seq(a[f"{split}_scenes"])]
            for d in dirs:
                if not d.is_dir():
                    raise FileNotFoundError(f"BlindPnPDataModule: {split}_scenes: COLMAP model "
                                            f"folder {d} does not exist (the repository embeds "
                                            f"lund_door and maupertuis; paths.data_dir=<dir> reads "
                                            f"<dir>/real, e.g. paths.data_dir=../shared/data)")
                find_model_files(d)  # raises ColmapFormatError (a ValueError) naming the folder
                key = d.resolve()
                if key in owner:
                    raise ValueError(f"BlindPnPDataModule: COLMAP scene {d} is in both the "
                                     f"{owner[key]} and {split} splits (splits must be by scene)")
                owner[key] = split
            resolved[split] = dirs
        if not owner:
            raise ValueError("BlindPnPDataModule(source='colmap'): set train_scenes, val_scenes "
                             "and/or test_scenes (model folders under root)")
        for split in SPLITS:
            self._builders[split] = None if not resolved[split] else partial(
                ColmapDataset, resolved[split], max_points_2d=a["max_points_2d"],
                max_points_3d=a["max_points_3d"], outlier_frac_3d=a["outlier_frac_3d"],
                outliers_per_inlier_2d=a["outliers_per_inlier_2d"], seed=self.seeds[split],
                resample_each_epoch=self.resample_each_epoch and split == "train")
        if a["train_views"] is not None or a["train_synthetic"] is not None:
            # Training mix (bpnp.data.mixing): real images + new views + synthetic mesh instances.
            from bpnp.data.mixing import colmap_train_mix

            if not resolved["train"]:
                raise ValueError("BlindPnPDataModule: train_views / train_synthetic need train_scenes")
            self._builders["train"] = colmap_train_mix(
                self._builders["train"], a["train_views"], a["train_synthetic"], self.seeds["train"],
                self.resample_each_epoch, a["max_points_2d"], a["max_points_3d"])

    def _configure_pickles(self, a: dict) -> None:
        if not a["root"] or not a["dataset"]:
            raise ValueError("BlindPnPDataModule(source='pickles'): set root and dataset "
                             "(e.g. dataset=modelnet40)")
        frac = float(a["val_fraction"])
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"BlindPnPDataModule: val_fraction must lie in [0, 1), got {frac}")
        root, name, w = a["root"], a["dataset"], a["w_gt_per"]
        have = {s: split_dir(root, name, s).is_dir() for s in ("train", "test")}
        if not any(have.values()):
            raise FileNotFoundError(
                f"BlindPnPDataModule: neither {split_dir(root, name, 'train')} nor "
                f"{split_dir(root, name, 'test')} exists")
        seed = self.seeds["train"]

        def split_indices(part: str) -> list[int]:
            total = len(load_bpnpnet_split(root, name, "train")["t_gt"])
            perm = np.random.default_rng([seed, 0x5EED]).permutation(total)
            n_val = int(round(frac * total))
            return sorted(perm[:n_val].tolist() if part == "val" else perm[n_val:].tolist())

        def build(part: str) -> PickleDataset:
            return PickleDataset(root, name, "train", w_gt_per=w, indices=split_indices(part))

        self._builders["train"] = partial(build, "train") if have["train"] else None
        self._builders["val"] = partial(build, "val") if have["train"] and frac > 0 else None
        self._builders["test"] = partial(PickleDataset, root, name, "test", w_gt_per=w) if have["test"] else None

    # -- Lightning hooks -------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",), None: SPLITS}.get(stage, SPLITS)
        for split in wanted:
            ds = self.dataset(split)
            if self.source == "scenes" and self.validate_files and ds is not None and split not in self._validated:
                # Read every scene file once now: a bad file fails here, naming it, not hours
                # into training when its batch comes up.
                for i in range(len(ds)):
                    ds[i]
                self._validated.add(split)

    def dataset(self, split: str) -> Dataset | None:
        """The (cached) dataset of a split, or None when none is configured."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {SPLITS})")
        if split not in self._datasets:
            build = self._builders.get(split)
            ds = None if build is None else build()
            if ds is not None and split in self.add_outlier_splits and any(self.add_outliers):
                ds = OutlierAugmented(ds, *self.add_outliers, seed=self.seeds[split] + 7_000_003)
            self._datasets[split] = ds
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool, epoch: int = 0, skip_batches: int = 0):
        ds = self.dataset(split)
        if ds is None:
            return []
        if self.num_workers > 0 and hasattr(ds, "preload_meshes"):
            ds.preload_meshes()  # once per process (cached): forked workers inherit the meshes
        train = split == "train"
        batch_size = self.batch_size if train else self.eval_batch_size
        loader_cls, sampler = DataLoader, None
        if shuffle:
            # The order is a function of (seed, epoch), never of RNG state (exact resume); sharded
            # here under DDP (Lightning keeps a DistributedSampler as it is).
            trainer = getattr(self, "trainer", None)
            world = int(getattr(trainer, "world_size", 1) or 1)
            rank = int(getattr(trainer, "global_rank", 0) or 0)
            sampler = EpochSampler(ds, self.seeds[split], shuffle=True, num_replicas=world, rank=rank)
            sampler.set_epoch(epoch)
            sampler.skip_next(skip_batches * batch_size)
            loader_cls = ResumableDataLoader
        return loader_cls(
            ds,
            batch_size=batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate_scenes, pad_multiple=self.pad_multiple),
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=train and self.drop_last_train and len(ds) >= self.batch_size,
        )

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def train_dataloader(self):
        ds = self.dataset("train")
        epoch = self._current_epoch()
        if ds is not None and hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        skip = 0
        resume, self._resume = self._resume, None
        if resume is not None and int(resume.get("epoch", -1)) == epoch:
            skip = int(resume.get("train_batches", 0))  # mid-epoch checkpoint: continue after them
        return self._loader("train", shuffle=self.shuffle_train, epoch=epoch, skip_batches=skip)

    # -- checkpoint state (exact mid-epoch resume) ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the epoch and how many of its training batches were
        trained when the checkpoint was written (Lightning's batch progress)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        try:
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        except AttributeError:  # pragma: no cover - other Lightning layouts
            return {}
        return {"epoch": int(trainer.current_epoch), "train_batches": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the next :meth:`train_dataloader` of the same epoch skips the batches that
        were already trained (the order of an epoch is a function of the seed and the epoch)."""
        self._resume = dict(state_dict) if state_dict else None

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("test", shuffle=False)

    def names(self, split: str) -> list[str]:
        """Per-item names of a split (index with ``batch["index"]``) for per-instance reports."""
        ds = self.dataset(split)
        return [] if ds is None else list(getattr(ds, "names", [str(i) for i in range(len(ds))]))
