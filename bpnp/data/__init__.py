"""Data layer: synthetic generator, scene files, COLMAP reader, BPnPNet pickles, batching and the
LightningDataModule.

Public names are importable from here; they load lazily so that ``from bpnp.data import
load_scene`` does not import PyTorch Lightning.

================================  =========================================================
module                            job
================================  =========================================================
``bpnp.data.synthetic``           ``SyntheticConfig``, ``make_instance(cfg, seed, index)``
``bpnp.data.scenes``              scene ``.npz`` files: ``save_scene``, ``load_scene``, ...
``bpnp.data.cameras``             COLMAP camera models, distortion and undistortion
``bpnp.data.colmap``              ``read_model`` (text and binary COLMAP models)
``bpnp.data.instances``           COLMAP image -> blind-PnP instance
``bpnp.data.bpnpnet_pickles``     the original BPnPNet pre-processed pickles
``bpnp.data.collate``             ``collate_scenes``: padding and masks
``bpnp.data.datasets``            map-style datasets per source, ``add_outliers``
``bpnp.data.datamodule``          ``BlindPnPDataModule``
``bpnp.data.export``              ``python -m bpnp.data.export``: write scene sets
================================  =========================================================
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SyntheticConfig": "synthetic",
    "make_instance": "synthetic",
    "SceneFileError": "scenes",
    "save_scene": "scenes",
    "load_scene": "scenes",
    "validate_scene": "scenes",
    "list_scenes": "scenes",
    "SceneDirectory": "scenes",
    "Camera": "cameras",
    "UnsupportedCameraError": "cameras",
    "ColmapFormatError": "colmap",
    "ColmapModel": "colmap",
    "read_model": "colmap",
    "instance_from_image": "instances",
    "instances_from_model": "instances",
    "PickleFormatError": "bpnpnet_pickles",
    "collate_scenes": "collate",
    "add_outliers": "datasets",
    "SyntheticDataset": "datasets",
    "SceneDataset": "datasets",
    "ColmapDataset": "datasets",
    "PickleDataset": "datasets",
    "OutlierAugmented": "datasets",
    "BlindPnPDataModule": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"bpnp.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'bpnp.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
