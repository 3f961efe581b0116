"""Training mixes for the COLMAP source: real registered images, new views of the same models
(:mod:`bpnp.data.real_views`) and synthetic mesh instances (:mod:`bpnp.data.synthetic`).

- :class:`RealViewsDataset`: item ``i`` is a new view of one of the models, its anchor image and
  every draw a function of ``(seed, i)`` (plus the epoch with ``resample_each_epoch``).
- :class:`MixedDataset`: concatenates parts with a number of slots each; a part shorter than its
  slots (the real images under a fixed ``length``) is cycled through seeded permutations.
- :func:`colmap_train_mix`: what ``BlindPnPDataModule(source="colmap", train_views=...,
  train_synthetic=...)`` builds for its training split (validation and test stay real images).

Counts: with fractions ``f_v`` (``train_views.mix``) and ``f_s`` (``train_synthetic.mix``) and an
epoch of ``L`` items, ``round(f_v L)`` are views, ``round(f_s L)`` synthetic and the rest real
registered images. ``L`` is ``length`` (either block; they must agree) or, by default,
``round(R / (1 - f_v - f_s))`` for the ``R`` usable registered images, so that every real image
appears once per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from bpnp.data.colmap import ColmapModel, read_model
from bpnp.data.embedded import MESH_ROOT
from bpnp.data.real_views import RealViews, ViewConfig
from bpnp.data.synthetic import SyntheticConfig

__all__ = ["RealViewsDataset", "MixedDataset", "colmap_train_mix", "mix_counts"]


class RealViewsDataset(Dataset):
    """New views of one or more COLMAP models (:class:`bpnp.data.real_views.RealViews`).

    Item ``i`` uses ``default_rng([seed, i])`` (``[seed, i, epoch]`` with ``resample_each_epoch``;
    call :meth:`set_epoch`): it draws the anchor uniformly from every model's anchors (or a model
    uniformly first, then its anchor, with ``balance_models``), then the view. A draw that fails
    (too few inliers in ``max_tries``) moves on to another anchor from the same stream.

    Args:
        model_dirs: folders of COLMAP sparse models (read once here).
        length: number of items.
        seed: base seed (>= 0).
        resample_each_epoch: new views every epoch.
        balance_models: draw the model uniformly (default: in proportion to its anchors).
        models: already-read models for ``model_dirs`` (same order), to avoid reading them twice.
        **ranges: :class:`~bpnp.data.real_views.ViewConfig` fields.
    """

    def __init__(self, model_dirs: Sequence[str | Path] | str | Path, length: int, seed: int = 0,
                 resample_each_epoch: bool = False, balance_models: bool = False,
                 models: Sequence[ColmapModel] | None = None, **ranges: Any):
        if isinstance(model_dirs, (str, Path)):
            model_dirs = [model_dirs]
        if not model_dirs:
            raise ValueError("RealViewsDataset: model_dirs is empty")
        if int(length) <= 0 or int(seed) < 0:
            raise ValueError(f"RealViewsDataset: need length > 0 and seed >= 0, got {length}, {seed}")
        self.model_dirs = [Path(d) for d in model_dirs]
        models = list(models) if models is not None else [read_model(d) for d in self.model_dirs]
        if len(models) != len(self.model_dirs):
            raise ValueError("RealViewsDataset: models and model_dirs differ in length")
        self.cfg = ViewConfig.from_dict(ranges)
        self.views = [RealViews(m, self.cfg) for m in models]
        self.anchors = [(mi, a) for mi, v in enumerate(self.views) for a in v.anchors]
        if not self.anchors:
            raise ValueError(f"RealViewsDataset: no image can anchor a view in "
                             f"{[str(d) for d in self.model_dirs]}")
        self.length, self.seed = int(length), int(seed)
        self.resample_each_epoch, self.balance_models, self.epoch = bool(resample_each_epoch), bool(balance_models), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def names(self) -> list[str]:
        return [f"{self.model_dirs[0].name if len(self.model_dirs) == 1 else 'views'}/view_s{self.seed}_{i:06d}"
                for i in range(self.length)]

    def __len__(self) -> int:
        return self.length

    def _pick(self, rng: np.random.Generator) -> tuple[int, int]:
        if self.balance_models:
            usable = [mi for mi, v in enumerate(self.views) if v.anchors]
            mi = usable[int(rng.integers(len(usable)))]
            return mi, self.views[mi].anchors[int(rng.integers(len(self.views[mi].anchors)))]
        return self.anchors[int(rng.integers(len(self.anchors)))]

    def item(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(scene, info)`` of item ``index`` (info: model folder, anchor, perturbation)."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        key = [self.seed, int(index)] + ([self.epoch] if self.resample_each_epoch else [])
        rng = np.random.default_rng(key)
        for attempt in range(10):
            mi, anchor = self._pick(rng)
            try:
                scene, info = self.views[mi].view(anchor, rng, return_info=True)
                break
            except ValueError:
                if attempt == 9:
                    raise
        info["model"] = self.model_dirs[mi].name
        return scene, info

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, _ = self.item(index)
        scene["index"] = int(index)
        return scene


class MixedDataset(Dataset):
    """Parts laid end to end: slots ``[o_p, o_p + counts[p])`` belong to part ``p``.

    Slot ``j`` of a part maps to item ``j`` when the part holds at least ``counts[p]`` items, and
    otherwise to ``perm_c[j % len]`` with ``perm_c`` a permutation drawn from
    ``default_rng([seed, p, c, epoch])`` for cycle ``c = j // len`` (epoch 0 without
    ``resample_each_epoch``), so a short part repeats in a shuffled order. Items get ``index`` =
    their slot. :meth:`set_epoch` is passed on to every part.

    Args:
        parts: ``(name, dataset, count)`` triples; ``count`` may be 0.
        seed: seed of the cycling permutations.
        resample_each_epoch: new permutations every epoch.
    """

    def __init__(self, parts: Sequence[tuple[str, Dataset, int]], seed: int = 0,
                 resample_each_epoch: bool = False):
        self.parts = [(str(n), ds, int(c)) for n, ds, c in parts if int(c) > 0]
        if not self.parts:
            raise ValueError("MixedDataset: no part has a positive count")
        for name, ds, c in self.parts:
            if len(ds) == 0:
                raise ValueError(f"MixedDataset: part {name!r} is empty but has {c} slots")
        self.offsets = np.cumsum([0] + [c for _, _, c in self.parts])
        self.seed, self.resample_each_epoch, self.epoch = int(seed), bool(resample_each_epoch), 0

    @property
    def counts(self) -> dict[str, int]:
        """Slots per part name."""
        return {name: c for name, _, c in self.parts}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for _, ds, _ in self.parts:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def preload_meshes(self) -> int:
        """Forwarded to the parts that have it (synthetic mesh instances)."""
        return sum(ds.preload_meshes() for _, ds, _ in self.parts if hasattr(ds, "preload_meshes"))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(part position, item index in that part)`` of slot ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        p = int(np.searchsorted(self.offsets, index, side="right")) - 1
        j = int(index - self.offsets[p])
        n = len(self.parts[p][1])
        if n == self.parts[p][2]:
            return p, j
        cycle = j // n
        perm = np.random.default_rng(
            [self.seed, p, cycle, self.epoch if self.resample_each_epoch else 0]).permutation(n)
        return p, int(perm[j % n])

    @property
    def names(self) -> list[str]:
        out = []
        for index in range(len(self)):
            p, j = self.locate(index)
            ds = self.parts[p][1]
            names = getattr(ds, "names", None)
            out.append(f"{self.parts[p][0]}:{names[j] if names is not None else j}")
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        p, j = self.locate(int(index))
        scene = dict(self.parts[p][1][j])
        scene["index"] = int(index)
        return scene


def mix_counts(n_real: int, mix_views: float, mix_synthetic: float, length: int | None) -> dict[str, int]:
    """Slots of the three parts of a training epoch (see the module docstring)."""
    total = mix_views + mix_synthetic
    if length is None:
        if total >= 1.0:
            raise ValueError("colmap training mix: train_views.mix + train_synthetic.mix must be "
                             "< 1 unless a length is given")
        length = int(round(n_real / (1.0 - total)))
    views, synth = int(round(mix_views * length)), int(round(mix_synthetic * length))
    return {"real": int(length) - views - synth, "views": views, "synthetic": synth}


def _frac(block: str, d: dict) -> float:
    mix = d.pop("mix", None)
    if mix is None or isinstance(mix, bool) or not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"BlindPnPDataModule: {block}.mix must be a fraction in [0, 1], got {mix!r}")
    return float(mix)


def colmap_train_mix(real_builder: Callable[[], Any], train_views: Mapping[str, Any] | None,
                     train_synthetic: Mapping[str, Any] | None, seed: int,
                     resample_each_epoch: bool, max_points_2d: int | None,
                     max_points_3d: int | None) -> Callable[[], MixedDataset]:
    """Validate the ``train_views`` / ``train_synthetic`` blocks now and return the builder of the
    mixed training split.

    Args:
        real_builder: builds the real :class:`~bpnp.data.datasets.ColmapDataset` of the training
            scenes (its models are reused by the views).
        train_views: ``{mix, length (optional), balance_models (optional), **ViewConfig fields}``
            or None; ``max_points_2d/3d`` default to the COLMAP block's.
        train_synthetic: ``{mix, length (optional), **SyntheticConfig overrides}`` or None; the
            base is the realistic preset :data:`bpnp.data.synthetic.WORLD` with the embedded
            meshes (``mesh_root`` overrides it), training mesh split only.
        seed: the training seed (views and synthetic streams use it).
        resample_each_epoch: passed to every part.
    """
    views = dict(train_views or {})
    synth = dict(train_synthetic or {})
    f_v = _frac("train_views", views) if train_views is not None else 0.0
    f_s = _frac("train_synthetic", synth) if train_synthetic is not None else 0.0
    lengths = {b: d.pop("length", None) for b, d in (("train_views", views), ("train_synthetic", synth))}
    given = {v for v in lengths.values() if v is not None}
    if len(given) > 1:
        raise ValueError(f"BlindPnPDataModule: train_views.length and train_synthetic.length differ "
                         f"({lengths}); the training split has one length")
    length = given.pop() if given else None
    if length is not None and (isinstance(length, bool) or int(length) != length or int(length) <= 0):
        raise ValueError(f"BlindPnPDataModule: the training mix length must be a positive integer, got {length!r}")
    if f_v + f_s > 1.0 or (length is None and f_v + f_s >= 1.0):
        raise ValueError(f"BlindPnPDataModule: train_views.mix + train_synthetic.mix = {f_v + f_s} "
                         "must be < 1 (<= 1 with a length)")
    balance = bool(views.pop("balance_models", False))
    view_cfg = ViewConfig.from_dict({"max_points_2d": max_points_2d, "max_points_3d": max_points_3d, **views})
    synth_cfg = None
    if f_s > 0:
        root = synth.pop("mesh_root", str(MESH_ROOT) if MESH_ROOT.is_dir() else None)
        synth_cfg = SyntheticConfig.world(root, **synth)
        if synth_cfg.mesh_split != "train":
            raise ValueError(f"BlindPnPDataModule: train_synthetic.mesh_split must be 'train', got "
                             f"{synth_cfg.mesh_split!r}")

    def build() -> MixedDataset:
        from bpnp.data.datasets import SyntheticDataset

        real = real_builder()
        counts = mix_counts(len(real), f_v, f_s, None if length is None else int(length))
        parts: list[tuple[str, Dataset, int]] = [("real", real, counts["real"])]
        if counts["views"] > 0:
            parts.append(("views", RealViewsDataset(
                real.model_dirs, counts["views"], seed, resample_each_epoch=resample_each_epoch,
                balance_models=balance, models=real.models, **view_cfg.to_dict()), counts["views"]))
        if counts["synthetic"] > 0:
            parts.append(("synthetic", SyntheticDataset(
                synth_cfg, seed, counts["synthetic"], resample_each_epoch=resample_each_epoch),
                counts["synthetic"]))
        return MixedDataset(parts, seed=seed, resample_each_epoch=resample_each_epoch)

    return build
