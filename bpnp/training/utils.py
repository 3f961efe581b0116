"""Helpers of the ``train.py`` entry point: run directories, resume, instantiation of config
groups, rank-zero file writing. Kept here so that ``train.py`` stays a thin script and tests can
use the same functions in-process.

Run directory layout (``hydra.run.dir``)::

    ${paths.log_dir}/${task_name}/runs/<YYYY-MM-DD_HH-MM-SS>/
        .hydra/config.yaml         resolved config of the latest invocation (hydra's own files beside)
        checkpoints/last.ckpt      + best-*.ckpt (best validation pose metric)
        csv/metrics.csv            CSVLogger
        wandb/offline-run-*/       W&B offline run (``wandb sync <that dir>``)
        plots/                     correspondence / P-matrix / error-CDF PNGs
        wandb_run_id               W&B run id, reused when the run is resumed
        train.log                  the console log (Hydra's job logging; not the progress bar)

Resume: ``ckpt_path=<run>/checkpoints/last.ckpt`` reopens ``<run>`` as the run directory (the
``bpnp_run_dir`` resolver below), Lightning restores epoch, step, optimizer and scheduler, the CSV
logger appends to the same ``metrics.csv`` and W&B resumes the same run id. ``last.ckpt`` is
rewritten every N steps and at every epoch end (``LastCheckpoint``), atomically
(``AtomicCheckpointIO``), and a resume continues exactly where the checkpoint was taken, also
mid-epoch (data order and training RANSAC are functions of seed, epoch and batch; the datamodule
skips the batches already trained): ``tests/reliability/test_resume.py``.
``ckpt_path=last`` picks the most recent run of ``task_name`` that has a ``last.ckpt`` (each
debug preset has its own ``task_name``), and ``train.py`` prints which one it picked. Every
checkpoint records the run that wrote it (:func:`run_identity`: task name, experiment and debug
preset, under :data:`RUN_IDENTITY_KEY`); resuming one of another experiment or preset is refused
unless ``resume_foreign=true`` (:func:`identity_mismatch`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


__all__ = [
    "register_resolvers", "find_last_checkpoint", "resolve_ckpt_path", "run_dir_for", "WANDB_ID_FILE",
    "RUN_IDENTITY_KEY", "run_identity", "identity_mismatch", "describe_identity",
]

WANDB_ID_FILE = "wandb_run_id"


def find_last_checkpoint(runs_dir: str | Path) -> Path | None:
    """The ``checkpoints/last.ckpt`` of the most recent run under ``runs_dir`` (by modification
    time of the checkpoint), or None."""
    runs = Path(runs_dir)
    if not runs.is_dir():
        return None
    found = [p for p in runs.glob("*/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))) if found else None


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str | Path) -> str | None:
    """``None`` stays None; ``"last"`` becomes the latest run's ``last.ckpt`` (error if none);
    anything else must be an existing file."""
    if ckpt_path in (None, "", "null", "None"):
        return None
    if str(ckpt_path) == "last":
        found = find_last_checkpoint(runs_dir)
        if found is None:
            raise FileNotFoundError(f"ckpt_path=last: no run with checkpoints/last.ckpt under {runs_dir}")
        return str(found)
    p = Path(str(ckpt_path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(p.resolve())


def run_dir_for(ckpt_path: str | None, runs_dir: str, stamp: str) -> str:
    """Run directory of an invocation: the checkpoint's own run when resuming from
    ``<run>/checkpoints/*.ckpt`` (or ``last``), else ``<runs_dir>/<stamp>``."""
    if ckpt_path not in (None, "", "null", "None"):
        try:
            ckpt = Path(resolve_ckpt_path(str(ckpt_path), runs_dir))
        except FileNotFoundError:
            ckpt = None  # train.py reports the error with a clear message
        if ckpt is not None and ckpt.parent.name == "checkpoints":
            return str(ckpt.parent.parent)
    return str(Path(runs_dir) / stamp)


#: Checkpoint entry holding :func:`run_identity` of the run that wrote it (callbacks.RunIdentity).
RUN_IDENTITY_KEY = "bpnp_run"
_IDENTITY_KEYS = ("task_name", "experiment", "debug")


def run_identity(cfg: Any) -> dict[str, str | None]:
    """What kind of run this is: ``task_name``, and under Hydra the ``experiment`` and ``debug``
    presets chosen on the command line (None = none chosen). Stored in every checkpoint."""
    ident: dict[str, str | None] = {"task_name": str(cfg.get("task_name"))}
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else None
    except Exception:  # not under Hydra (in-process callers): the task name alone
        choices = None
    if choices is not None:
        for group in ("experiment", "debug"):
            value = choices.get(group)
            ident[group] = None if value in (None, "null", "None") else str(value)
    return ident


def describe_identity(ident: Any) -> str:
    ident = dict(ident or {})
    parts = [f"{k}={ident[k] if ident[k] is not None else 'none'}" for k in ("experiment", "debug") if k in ident]
    return " ".join(parts + [f"task_name={ident.get('task_name')}"])


def identity_mismatch(saved: Any, current: Any) -> str | None:
    """None if a checkpoint's :func:`run_identity` (``saved``; None for checkpoints written before
    it was recorded) agrees with this run's on every key both know, else the difference."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return None
    differ = [k for k in _IDENTITY_KEYS if k in saved and k in current and saved[k] != current[k]]
    if not differ:
        return None
    return (f"it was written by a run of {describe_identity(saved)}, this run is "
            f"{describe_identity(current)}")


def register_resolvers() -> None:
    """Register ``${bpnp_run_dir:ckpt_path,runs_dir,stamp}`` (idempotent)."""
    if not OmegaConf.has_resolver("bpnp_run_dir"):
        OmegaConf.register_new_resolver("bpnp_run_dir", lambda c, r, s: run_dir_for(c, str(r), str(s)))


def read_wandb_id(run_dir: str | Path) -> str | None:
    p = Path(run_dir) / WANDB_ID_FILE
    return p.read_text().strip() or None if p.is_file() else None


def write_text_rank_zero(path: str | Path, text: str) -> None:
    from pytorch_lightning.utilities import rank_zero_only

    @rank_zero_only
    def _write() -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)

    _write()


def is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))) == 0


# -- CSV logger that appends on resume --------------------------------------------------------------
from pytorch_lightning.loggers import CSVLogger as _PLCSVLogger  # noqa: E402
from pytorch_lightning.loggers.csv_logs import ExperimentWriter as _PLExperimentWriter  # noqa: E402
from pytorch_lightning.loggers.logger import rank_zero_experiment  # noqa: E402


class _AppendingWriter(_PLExperimentWriter):
    """Keeps an existing ``metrics.csv`` (Lightning's writer deletes it) and merges its header."""

    def _check_log_dir_exists(self) -> None:
        import csv

        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))


class ResumableCSVLogger(_PLCSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` when a run is resumed into the same
    directory (Lightning's own deletes the old file), so the file holds the whole history."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _PLExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
