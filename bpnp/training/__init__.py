"""Training: the LightningModule, losses, callbacks (plots, progress bar) and entry-point helpers.

=====================================  ==========================================================
``bpnp.training.losses``               correspondence loss, pose loss, ``BlindPnPLoss``
``bpnp.training.module``               ``BlindPnPModule`` (metrics, non-finite guard, optimizers)
``bpnp.training.callbacks``            ``PoseVisualisation`` (plots + W&B images), ``BPnPProgressBar``,
                                       ``LastCheckpoint`` (last.ckpt every N steps and every epoch)
``bpnp.training.checkpoint_io``        ``AtomicCheckpointIO`` (crash-safe checkpoint writes)
``bpnp.training.utils``                run dirs, resume, ``ResumableCSVLogger``, config groups
=====================================  ==========================================================

Names load lazily (``from bpnp.training import BlindPnPModule``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BlindPnPLoss": "losses",
    "correspondence_loss": "losses",
    "pose_loss": "losses",
    "BlindPnPModule": "module",
    "PoseVisualisation": "callbacks",
    "BPnPProgressBar": "callbacks",
    "LastCheckpoint": "callbacks",
    "AtomicCheckpointIO": "checkpoint_io",
    "ResumableCSVLogger": "utils",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"bpnp.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'bpnp.training' has no attribute {name!r}")
