"""Train BlindPnPNet: ``python train.py experiment=bpnp_synthetic``.

Composes ``configs/train.yaml`` (groups data/model/trainer/logger/callbacks/experiment/paths/
debug), seeds everything, instantiates datamodule, model, callbacks, loggers and trainer, fits,
then tests if ``test=true``. The run directory and its contents are described in
:mod:`bpnp.training.utils`. Examples::

    python train.py experiment=bpnp_synthetic                      # the main job (CPU, ~1 h)
    python train.py experiment=bpnp_synthetic debug=fast_dev_run   # smoke test
    python train.py experiment=bpnp_synthetic trainer=ddp_cpu      # 2 CPU processes, gloo
    python train.py experiment=bpnp_synthetic ckpt_path=last       # resume the latest run
    python train.py experiment=bpnp_real init_ckpt=<synthetic run>/checkpoints/last.ckpt  # fine-tune
    python train.py experiment=bpnp_real init_ckpt=last    # latest bpnp_synthetic run's last.ckpt
    python train.py logger=wandb logger.wandb.offline=false        # W&B online
    wandb sync logs/train/runs/<run>/wandb/offline-run-*           # upload an offline run later

The console shows the resolved config (compact) first and the run dir, the best and the last
checkpoint at the end; ``<run dir>/train.log`` keeps the same lines with times (Hydra's job
logging, configs/hydra/job_logging/bpnp.yaml), the progress bar aside. ``ckpt_path=last`` says
which checkpoint it picked and refuses one written by another experiment or debug preset unless
``resume_foreign=true`` (each debug preset has its own ``task_name``, and ``debug=fast_dev_run``
writes no checkpoint).

Errors print one line ``error: <message>`` to stderr instead of a traceback (set
``HYDRA_FULL_ERROR=1`` for the traceback; the policy is :mod:`bpnp.runtime.cli`'s): exit code 2 for
bad input found before training starts (an override of a key that does not exist, a bad value:
every value is checked, types and ranges, naming its key, by
:func:`bpnp.runtime.config.check_train_config` before Hydra creates the run directory; a missing
data path or checkpoint, a checkpoint that does not fit the model or comes from another preset,
more CPU processes than cores, a GPU trainer without a GPU, a log or checkpoint directory that
cannot be written, a bad scene/COLMAP/pickle file), exit code 1 when the run fails while running
because the disk is full or a write fails (checkpoints are written atomically, so ``last.ckpt``
is the last complete one: resume from it). A run that fails before any work leaves no run
directory behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BPNP_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from bpnp.runtime.cli import (EXIT_USER_ERROR, ConfigError, config_error, console, is_unused_run_dir,  # noqa: E402
                              one_line, remove_unused_run_dir, run_with_error_policy, user_errors)
from bpnp.runtime.config import check_train_config, compact_yaml, instantiate_group  # noqa: E402
from bpnp.training.utils import register_resolvers  # noqa: E402

register_resolvers()

CONFIG_DIR = ROOT / "configs"


def _instantiate(node, what: str, **kwargs):
    """``hydra.utils.instantiate``; a constructor that rejects its config becomes one
    :class:`ConfigError` naming the config group (data errors pass through as they are)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, user_errors()) and not isinstance(cause, FileNotFoundError):
            raise cause from None
        raise ConfigError(f"{what}: {one_line(cause)}") from exc


def _checkpoint_state(ckpt: dict, path: str, what: str, model, need_training_state: bool) -> dict:
    """Check that the weights of a checkpoint (read by ``load_checkpoint_dict``) fit ``model``
    before Lightning touches it (a mismatch would otherwise surface as a long ``load_state_dict``
    traceback); return its state dict."""
    from bpnp.runtime.checkpoint import CheckpointError, net_config_mismatch, network_config, state_dict_mismatch

    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{what}={path}: incompatible checkpoint: no 'state_dict' with weights")
    if need_training_state and not {"optimizer_states", "loops", "global_step"} <= set(ckpt):
        raise CheckpointError(f"{what}={path}: not a training checkpoint of train.py (no optimizer/loop state); "
                              "to start from its weights only, use init_ckpt=<file>")
    problem = state_dict_mismatch(model.state_dict(), state)
    try:
        ckpt_net = network_config(ckpt)
    except CheckpointError:  # weights without a network config: only keys and shapes can be checked
        ckpt_net = None
    if not problem and ckpt_net is not None:
        problem = net_config_mismatch(model.hparams.get("net"), ckpt_net)
    if problem:
        raise CheckpointError(f"{what}={path}: incompatible checkpoint for this model config: {problem}")
    return state


def _resume_checkpoint(cfg: DictConfig, path: str | None) -> dict | None:
    """Read the checkpoint to resume from, say which one it is, and refuse one written by another
    experiment or debug preset (``resume_foreign=true`` allows it)."""
    if path is None:
        return None
    from bpnp.runtime.checkpoint import load_checkpoint_dict
    from bpnp.training import utils

    ckpt = load_checkpoint_dict(path)
    current = utils.run_identity(cfg)
    problem = utils.identity_mismatch(ckpt.get(utils.RUN_IDENTITY_KEY), current)
    given = f"ckpt_path={cfg.ckpt_path}" + (f" picked {path}" if str(cfg.ckpt_path) == "last" else "")
    if problem and not cfg.get("resume_foreign", False):
        raise ConfigError(f"{given}: {problem}; to resume it anyway set resume_foreign=true (or start a new run "
                          "without ckpt_path)")
    _say(f"[train.py] {given}: resuming epoch {ckpt.get('epoch', '?')}, step {ckpt.get('global_step', '?')}"
         + (f" (written by {utils.describe_identity(ckpt[utils.RUN_IDENTITY_KEY])})" if ckpt.get(utils.RUN_IDENTITY_KEY) else "")
         + (f"; {problem}, resumed because resume_foreign=true" if problem else ""))
    return ckpt


def _check_directories(cfg: DictConfig) -> None:
    """Every directory the run will write (logger save dirs, W&B's, checkpoint dirs) must be
    writable now: found later, it would lose logs (W&B silently falls back to /tmp) or work."""
    from bpnp.runtime.cli import check_writable_dir

    for key, node in (cfg.get("logger") or {}).items():
        if isinstance(node, DictConfig) and node.get("save_dir"):
            base = check_writable_dir(node.save_dir, f"logger.{key}.save_dir")
            if "Wandb" in str(node.get("_target_", "")):
                check_writable_dir(base / "wandb", f"logger.{key}.save_dir (its wandb/ folder)")
    for key, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("dirpath"):
            check_writable_dir(node.dirpath, f"callbacks.{key}.dirpath")


def _say(message: str) -> None:
    """One console line (rank zero only); under Hydra it also lands in the run's train.log."""
    from bpnp.training.utils import is_rank_zero

    if is_rank_zero():
        console("bpnp.train").info(message)


#: Warnings Lightning prints for things this project does on purpose (regex on the message).
KNOWN_WARNINGS = (
    # train/*_epoch means come from torchmetrics' compute(), which already synchronises the ranks;
    # Lightning cannot tell and asks for sync_dist=True once per key and rank.
    r"It is recommended to use `self\.log\('train/[^']*_epoch', \.\.\., sync_dist=True\)`",
    # Lightning 2.6's own use of a torch API that torch 2.14 deprecates (pytorch_lightning/utilities/
    # _pytree.py), printed at every fit: nothing a user of this project can or needs to change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the same for Lightning's all_gather under DDP (lightning_fabric/utilities/distributed.py)
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
)
# Kept on purpose: e.g. DDP's "Grad strides do not match bucket view strides" (a copy per step).


def _quiet_known_warnings() -> None:
    import warnings

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _summary(trainer, out_dir: Path) -> str:
    """The closing lines: where the run is and which checkpoints it has."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    lines = [f"[train.py] run dir: {out_dir}"]
    best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    if best is not None and best.best_model_path:
        score = best.best_model_score
        lines.append(f"[train.py] best checkpoint: {best.best_model_path}"
                     + (f" ({best.monitor} = {float(score):.4g})" if score is not None else ""))
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        lines.append(f"[train.py] last checkpoint: {last} (resume: ckpt_path=<this file>)")
    if len(lines) == 1:
        lines.append("[train.py] no checkpoint written" + (" (fast_dev_run)" if trainer.fast_dev_run else ""))
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    check_train_config(cfg)  # every value, before anything is created (cli() checked it before Hydra too)
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import LearningRateMonitor

    from bpnp.training import utils
    from bpnp.training.callbacks import RunIdentity

    _quiet_known_warnings()
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = utils.resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name / "runs")
    resume = _resume_checkpoint(cfg, ckpt_path)
    init = None
    if cfg.get("init_ckpt"):  # fine-tuning: weights only (epochs, optimizer and schedule start afresh)
        init = utils.resolve_ckpt_path(cfg.init_ckpt, Path(cfg.paths.log_dir) / "bpnp_synthetic" / "runs")
    _check_directories(cfg)
    _say("[train.py] config (resolved; all of it in <run dir>/.hydra/config.yaml):\n"
         + compact_yaml(cfg, ["task_name", "seed", "ckpt_path", "init_ckpt", "data", "model", "trainer"]))
    utils.write_text_rank_zero(out_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)
    # Gradients reaching the encoders are scaled by P ~ 1/(m n) and go denormal at ~1000 points;
    # denormal arithmetic makes the CPU backward ~20x slower (bench/train_step.py --keep-denormals).
    torch.set_flush_denormal(bool(cfg.get("flush_denormal", True)))

    datamodule = _instantiate(cfg.data, "data")
    model = _instantiate(cfg.model, "model")
    if init is not None:
        from bpnp.runtime.checkpoint import load_checkpoint_dict

        model.load_state_dict(_checkpoint_state(load_checkpoint_dict(init), init, "init_ckpt", model,
                                                need_training_state=False))
        _say(f"[train.py] initialised the weights from {init}")
    if resume is not None:
        _checkpoint_state(resume, ckpt_path, "ckpt_path", model, need_training_state=True)
        del resume  # Lightning reads the file itself
    try:
        callbacks = instantiate_group(cfg.get("callbacks"))
    except Exception as exc:  # hydra's InstantiationException
        raise ConfigError(f"callbacks: {one_line(exc.__cause__ or exc)}") from exc
    callbacks.append(RunIdentity(utils.run_identity(cfg)))
    wandb_key = next((k for k, v in (cfg.get("logger") or {}).items() if "Wandb" in str(v.get("_target_", ""))), None)
    if wandb_key is not None and ckpt_path is not None and cfg.logger[wandb_key].get("id") is None:
        with open_dict(cfg):
            cfg.logger[wandb_key].id = utils.read_wandb_id(out_dir)  # resume the same W&B run
            cfg.logger[wandb_key].resume = "allow"
    try:
        loggers = instantiate_group(cfg.get("logger"))
    except Exception as exc:
        raise ConfigError(f"logger: {one_line(exc.__cause__ or exc)}") from exc
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)

    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            if wandb_key is not None and type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
                utils.write_text_rank_zero(out_dir / utils.WANDB_ID_FILE, str(lg.experiment.id))

        if cfg.get("train", True):
            _say(f"[train.py] run dir: {out_dir}" + (f"; resuming from {ckpt_path}" if ckpt_path else ""))
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if cfg.get("test", False):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") if cfg.get("train", True) else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or (None if cfg.get("train", True) else ckpt_path))
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    finally:
        if wandb_key is not None and trainer.is_global_zero:
            import wandb

            wandb.finish()  # flush the offline run files before the process ends (also after an error)
    if getattr(model, "skipped_steps", 0):
        _say(f"[train.py] {model.skipped_steps} training step(s) skipped for non-finite loss or "
             "gradients (train/skipped_steps)")
    for line in _summary(trainer, out_dir).splitlines():
        _say(line)
    return metrics


def run_cli(cfg: DictConfig) -> tuple[int, dict]:
    """``run`` with the command-line error policy (:mod:`bpnp.runtime.cli`): returns ``(exit
    code, metrics)`` and prints one ``error:`` line instead of raising for bad input and failed
    writes. A run directory that the failed run left holding nothing but Hydra's files is
    removed (a resumed run's directory never is: it holds its checkpoints)."""
    try:
        out_dir = Path(cfg.paths.output_dir)
    except Exception:  # reported by run() itself
        out_dir = None
    fresh = out_dir is not None and is_unused_run_dir(out_dir)
    code, metrics = run_with_error_policy(lambda: run(cfg))
    if code and fresh:
        remove_unused_run_dir(out_dir)
    return code, metrics or {}


def check_command_line(argv: list[str]) -> str | None:
    """One-line message if the overrides do not compose with configs/train.yaml or give a bad
    value (:func:`bpnp.runtime.config.check_train_config`), else None."""
    return config_error(CONFIG_DIR, "train", list(argv), validate=check_train_config)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    import logging

    logging.captureWarnings(True)  # warnings reach train.log too (configs/hydra/job_logging/bpnp.yaml)
    code, metrics = run_cli(cfg)
    if code:
        sys.exit(code)  # SystemExit passes through Hydra without a traceback
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def cli(argv: list[str] | None = None) -> None:
    """``python train.py ...``: reject overrides that do not compose or give a bad value with one
    ``error:`` line (Hydra's own report is several lines and exit code 1) before Hydra creates
    the run directory, then hand over to Hydra."""
    message = check_command_line(sys.argv[1:] if argv is None else argv)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()


if __name__ == "__main__":
    cli()
