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

Resume: ``ckpt_path=<run>/checkpoints/last.ckpt`` reopens ``<run>`` as the run directory (the
``bpnp_run_dir`` resolver below), Lightning restores epoch, step, optimizer and scheduler, the CSV
logger appends to the same ``metrics.csv`` and W&B resumes the same run id. ``last.ckpt`` is
rewritten every N steps and at every epoch end (``LastCheckpoint``), atomically
(``AtomicCheckpointIO``), and a resume continues exactly where the checkpoint was taken, also
mid-epoch (data order and training RANSAC are functions of seed, epoch and batch; the datamodule
skips the batches already trained): ``tests/reliability/test_resume.py``.
``ckpt_path=last`` picks the most recent run of ``task_name`` that has a ``last.ckpt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "register_resolvers", "find_last_checkpoint", "resolve_ckpt_path", "run_dir_for", "instantiate_group",
    "WANDB_ID_FILE", "TrainConfigError", "config_error", "one_line", "check_writable_dir", "state_dict_mismatch",
]

WANDB_ID_FILE = "wandb_run_id"


class TrainConfigError(ValueError):
    """A training setting cannot be used as given (bad value, unwritable directory, a checkpoint
    that does not fit the model); ``train.py`` prints it as one ``error:`` line, exit code 2."""


_NOISE = ("full_key:", "object_type=", "reference_type=", "Config search path", "provider=",
          "Set the environment variable HYDRA_FULL_ERROR")


def one_line(exc: BaseException | str) -> str:
    """A (possibly multi-line, Hydra/OmegaConf style) error message as one line: Hydra's hints
    about HYDRA_FULL_ERROR, search paths and OmegaConf's ``full_key``/``object_type`` lines are
    dropped, a listing after a ``...:`` line is joined with commas."""
    keep = [ln.strip() for ln in str(exc).splitlines()]
    keep = [ln for ln in keep if ln and not ln.startswith(_NOISE)]
    if not keep:
        return type(exc).__name__ if isinstance(exc, BaseException) else "error"
    out, listing = keep[0], keep[0].endswith(":")
    for ln in keep[1:]:
        if listing and " " not in ln:
            out += (" " if out.endswith(":") else ", ") + ln
            continue
        listing = ln.endswith(":")
        out += (" " if out[-1] in ".:;," else "; ") + ln
    return out


def config_error(config_dir: str | Path, config_name: str, argv: list[str]) -> str | None:
    """Compose ``config_name`` with the command-line overrides ``argv`` (Hydra's compose API, no
    side effects) and return a one-line message if they do not compose (an unknown key such as
    ``foo.bar=1``, an unknown group option such as ``data=synthtic``, a malformed override), else
    None. Command lines with Hydra flags (``--multirun``, ``--cfg``, ``-h``...) are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in argv):
        return None
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            compose(config_name, overrides=list(argv), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        import re

        message = one_line(exc)
        detail = one_line(exc.__cause__) if exc.__cause__ is not None else ""
        m = re.match(r"Could not override '(.+?)'\. To append to your config use (\S+)", message)
        k = re.match(r"Key '(.+?)' is not in struct", detail)
        if m and k:  # the common typo: a key that does not exist
            return (f"could not override '{m.group(1)}': key '{k.group(1)}' does not exist in the config "
                    f"(to add a new key on purpose, use {m.group(2)})")
        if detail and detail not in message:
            message = f"{message}; {detail}"
        return message
    return None


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and write-test it; :class:`TrainConfigError` naming ``what``
    otherwise (checked before training, so a bad logger or checkpoint directory fails at once
    instead of losing logs: W&B silently falls back to the system temp directory)."""
    import tempfile

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise TrainConfigError(f"{what}={p}: not a writable directory ({exc.strerror or exc})") from exc
    return p


def state_dict_mismatch(model_state: dict, ckpt_state: dict, limit: int = 3) -> str | None:
    """None if ``ckpt_state`` fits ``model_state`` exactly (same keys and shapes), else a short
    description of the first differences."""
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    shapes = [f"{k} {tuple(ckpt_state[k].shape)} vs {tuple(model_state[k].shape)}"
              for k in model_state if k in ckpt_state and hasattr(ckpt_state[k], "shape")
              and tuple(ckpt_state[k].shape) != tuple(model_state[k].shape)]

    def few(xs: list[str]) -> str:
        return ", ".join(xs[:limit]) + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")

    parts = []
    if shapes:
        parts.append(f"shape mismatch (checkpoint vs model) {few(shapes)}")
    if missing:
        parts.append(f"missing weights {few(missing)}")
    if unexpected:
        parts.append(f"unexpected weights {few(unexpected)}")
    return "; ".join(parts) or None


#: Network settings that change what the weights compute without changing their shapes, so that
#: a weights-only load cannot notice a mismatch (keys and shapes are checked separately).
WEIGHT_MEANING_KEYS = ("knn_scale", "normalize_3d", "cn_eps")


def net_config_mismatch(model_net: Any, ckpt_net: Any) -> str | None:
    """None if the network settings of :data:`WEIGHT_MEANING_KEYS` agree between the model's
    config and a checkpoint's (a key absent on either side is the ``BlindPnPNet`` default; the
    stem's scale only matters with a stem), else a short description naming the override that
    would make them agree."""
    import inspect

    from bpnp.models.network import BlindPnPNet

    defaults = {k: p.default for k, p in inspect.signature(BlindPnPNet).parameters.items()}
    model_net, ckpt_net = dict(model_net or {}), dict(ckpt_net or {})

    def get(cfg: dict, key: str) -> Any:
        return cfg.get(key, defaults.get(key))

    diffs = []
    for key in WEIGHT_MEANING_KEYS:
        if key == "knn_scale" and not (get(model_net, "knn") and get(ckpt_net, "knn")):
            continue
        ours, theirs = get(model_net, key), get(ckpt_net, key)
        if ours != theirs:
            diffs.append(f"model.net.{key}={ours!r} but the checkpoint's network has {theirs!r} "
                         f"(override model.net.{key}={theirs})")
    return "; ".join(diffs) or None


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


def register_resolvers() -> None:
    """Register ``${bpnp_run_dir:ckpt_path,runs_dir,stamp}`` (idempotent)."""
    if not OmegaConf.has_resolver("bpnp_run_dir"):
        OmegaConf.register_new_resolver("bpnp_run_dir", lambda c, r, s: run_dir_for(c, str(r), str(s)))


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group mapping (callbacks, loggers)."""
    from hydra.utils import instantiate

    out: list[Any] = []
    if not cfg:
        return out
    for _, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            out.append(instantiate(node))
    return out


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
