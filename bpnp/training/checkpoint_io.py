"""Crash-safe checkpoint writing: :class:`AtomicCheckpointIO` (``configs/trainer/default.yaml``
installs it as a Trainer plugin).

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction whose local temporary file
is created by ``tempfile.mkstemp()`` in the *system* temp directory and then ``shutil.move``-d
onto the target. When ``$TMPDIR`` (often a node-local ``/tmp``) and the run directory are on
different filesystems, as on most clusters, that move is a copy: a process killed during the
copy leaves a truncated ``last.ckpt``, and each kill leaves a whole checkpoint-sized file
behind in ``/tmp``. It also never ``fsync``-s, so a node crash can leave a renamed but empty
file. ``tests/reliability/test_checkpoint_atomic.py`` kills savers at random moments with
``TMPDIR`` on another filesystem to show both.

:class:`AtomicCheckpointIO` writes the checkpoint to ``.<name>.partial`` **in the target's own
directory**, flushes and ``fsync``-s it, ``os.replace``-s it onto the target (atomic on POSIX
within one filesystem) and ``fsync``-s the directory. At every instant the target is either the
complete previous checkpoint or the complete new one. The partial name is fixed per target, so a
killed save leaves at most one stale partial, overwritten by the next save. Non-local paths
(``s3://`` and the like) are handed to Lightning's implementation.

A failed write (disk full, quota, read-only filesystem...) raises :class:`CheckpointWriteError`
(an ``OSError`` with the original ``errno``) whose message names the file, the reason, and says
that the previous checkpoint at that path is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "atomic_torch_save", "partial_path"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at that path (if any) is intact."""


def partial_path(path: str | Path) -> Path:
    """The temporary file a save of ``path`` writes before renaming it onto ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


#: How the partial file is opened (a seam for tests that inject write failures such as ENOSPC).
_open = open


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` such that ``path`` is never seen half-written.

    Raises:
        CheckpointWriteError: the write failed (the message names ``path`` and the reason); the
            partial file is removed and the previous ``path`` is untouched.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        # torch.save reports a failed write of its zip stream as a RuntimeError ("unexpected
        # pos ...") raised while handling the OSError of the file; report the OSError.
        cause = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        exc = cause
        reason = exc.strerror or str(exc)
        previous = "the previous checkpoint at that path is unchanged" if path.is_file() else "no previous checkpoint there"
        raise CheckpointWriteError(exc.errno, f"could not write checkpoint {path}: {reason} ({previous})") from exc
    _fsync_dir(path.parent)


def _is_local(path: str | Path) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (see the module docstring).

    Loading and removing are Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        local = str(path)[len("file://"):] if str(path).startswith("file://") else path
        atomic_torch_save(checkpoint, local)
