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

Errors print one line ``error: <message>`` to stderr instead of a traceback (set
``HYDRA_FULL_ERROR=1`` for the traceback): exit code 2 for bad input found before training starts
(an override of a key that does not exist, a bad value, a missing data path or checkpoint, a
checkpoint that does not fit the model, a log or checkpoint directory that cannot be written, a
bad scene/COLMAP/pickle file), exit code 1 when the run fails while running because the disk is
full or a write fails (checkpoints are written atomically, so ``last.ckpt`` is the last complete
one: resume from it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BPNP_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from bpnp.training.utils import TrainConfigError, config_error, one_line, register_resolvers  # noqa: E402

register_resolvers()

CONFIG_DIR = ROOT / "configs"
#: Exit code for bad input or configuration, found before training starts.
EXIT_USER_ERROR = 2
#: Exit code for a run that failed while running (disk full, a write failed).
EXIT_RUN_FAILED = 1


def _user_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    from bpnp.data.bpnpnet_pickles import PickleFormatError
    from bpnp.data.cameras import UnsupportedCameraError
    from bpnp.data.colmap import ColmapFormatError
    from bpnp.data.scenes import SceneFileError
    from bpnp.evaluation.checkpoint import CheckpointError

    return (TrainConfigError, CheckpointError, SceneFileError, ColmapFormatError, UnsupportedCameraError,
            PickleFormatError, FileNotFoundError, NotADirectoryError, OmegaConfBaseException)


def _instantiate(node, what: str, **kwargs):
    """``hydra.utils.instantiate``; a constructor that rejects its config becomes one
    :class:`TrainConfigError` naming the config group (data errors pass through as they are)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, _user_errors()) and not isinstance(cause, FileNotFoundError):
            raise cause from None
        raise TrainConfigError(f"{what}: {one_line(cause)}") from exc


def _checkpoint_state(path: str, what: str, model, need_training_state: bool) -> dict:
    """Read a checkpoint and check that its weights fit ``model`` before Lightning touches it
    (a mismatch would otherwise surface as a long ``load_state_dict`` traceback)."""
    from bpnp.evaluation.checkpoint import CheckpointError, load_checkpoint_dict, network_config
    from bpnp.training.utils import net_config_mismatch, state_dict_mismatch

    ckpt = load_checkpoint_dict(path)
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


def _check_directories(cfg: DictConfig) -> None:
    """Every directory the run will write (logger save dirs, W&B's, checkpoint dirs) must be
    writable now: found later, it would lose logs (W&B silently falls back to /tmp) or work."""
    from bpnp.training.utils import check_writable_dir

    for key, node in (cfg.get("logger") or {}).items():
        if isinstance(node, DictConfig) and node.get("save_dir"):
            base = check_writable_dir(node.save_dir, f"logger.{key}.save_dir")
            if "Wandb" in str(node.get("_target_", "")):
                check_writable_dir(base / "wandb", f"logger.{key}.save_dir (its wandb/ folder)")
    for key, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("dirpath"):
            check_writable_dir(node.dirpath, f"callbacks.{key}.dirpath")


def run(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.utilities import rank_zero_info

    from bpnp.training import utils

    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = utils.resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name / "runs")
    _check_directories(cfg)
    utils.write_text_rank_zero(out_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)
    # Gradients reaching the encoders are scaled by P ~ 1/(m n) and go denormal at ~1000 points;
    # denormal arithmetic makes the CPU backward ~20x slower (bench/train_step.py --keep-denormals).
    torch.set_flush_denormal(bool(cfg.get("flush_denormal", True)))

    datamodule = _instantiate(cfg.data, "data")
    model = _instantiate(cfg.model, "model")
    if cfg.get("init_ckpt"):  # fine-tuning: weights only (epochs, optimizer and schedule start afresh)
        init = utils.resolve_ckpt_path(cfg.init_ckpt, Path(cfg.paths.log_dir) / "bpnp_synthetic" / "runs")
        model.load_state_dict(_checkpoint_state(init, "init_ckpt", model, need_training_state=False))
        rank_zero_info(f"[train.py] initialised the weights from {cfg.init_ckpt}")
    if ckpt_path is not None:
        _checkpoint_state(ckpt_path, "ckpt_path", model, need_training_state=True)
    try:
        callbacks = utils.instantiate_group(cfg.get("callbacks"))
    except Exception as exc:  # hydra's InstantiationException
        raise TrainConfigError(f"callbacks: {one_line(exc.__cause__ or exc)}") from exc
    wandb_key = next((k for k, v in (cfg.get("logger") or {}).items() if "Wandb" in str(v.get("_target_", ""))), None)
    if wandb_key is not None and ckpt_path is not None and cfg.logger[wandb_key].get("id") is None:
        with open_dict(cfg):
            cfg.logger[wandb_key].id = utils.read_wandb_id(out_dir)  # resume the same W&B run
            cfg.logger[wandb_key].resume = "allow"
    try:
        loggers = utils.instantiate_group(cfg.get("logger"))
    except Exception as exc:
        raise TrainConfigError(f"logger: {one_line(exc.__cause__ or exc)}") from exc
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)

    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            if wandb_key is not None and type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
                utils.write_text_rank_zero(out_dir / utils.WANDB_ID_FILE, str(lg.experiment.id))

        if cfg.get("train", True):
            rank_zero_info(f"[train.py] run dir: {out_dir}" + (f"; resuming from {ckpt_path}" if ckpt_path else ""))
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
        rank_zero_info(f"[train.py] {model.skipped_steps} training step(s) skipped for non-finite loss or "
                       "gradients (train/skipped_steps)")
    return metrics


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and len(exc.args) > 1:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = one_line(exc)
    return text or type(exc).__name__


def run_cli(cfg: DictConfig) -> tuple[int, dict]:
    """``run`` with the command-line error policy (module docstring): returns ``(exit code,
    metrics)`` and prints one ``error:`` line instead of raising for bad input and failed writes."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the traceback too, for debugging
    try:
        return 0, run(cfg)
    except _user_errors() as exc:
        print(f"error: {_message(exc)}", file=sys.stderr)
        if full:
            raise
        return EXIT_USER_ERROR, {}
    except OSError as exc:  # disk full, quota, read-only filesystem... while running
        print(f"error: {_message(exc)}", file=sys.stderr)
        if full:
            raise
        return EXIT_RUN_FAILED, {}


def check_command_line(argv: list[str]) -> str | None:
    """One-line message if the overrides do not compose with configs/train.yaml, else None."""
    return config_error(CONFIG_DIR, "train", list(argv))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    code, metrics = run_cli(cfg)
    if code:
        sys.exit(code)  # SystemExit passes through Hydra without a traceback
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def cli(argv: list[str] | None = None) -> None:
    """``python train.py ...``: reject overrides that do not compose with one ``error:`` line
    (Hydra's own report is several lines and exit code 1), then hand over to Hydra."""
    message = check_command_line(sys.argv[1:] if argv is None else argv)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()


if __name__ == "__main__":
    cli()
