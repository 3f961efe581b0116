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
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BPNP_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from bpnp.training.utils import register_resolvers  # noqa: E402

register_resolvers()


def run(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.utilities import rank_zero_info

    from bpnp.training import utils

    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = utils.resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name / "runs")
    utils.write_text_rank_zero(out_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if cfg.get("init_ckpt"):  # fine-tuning: weights only (epochs, optimizer and schedule start afresh)
        import torch

        state = torch.load(utils.resolve_ckpt_path(cfg.init_ckpt, Path(cfg.paths.log_dir) / "bpnp_synthetic" / "runs"),
                           map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(state)
        rank_zero_info(f"[train.py] initialised the weights from {cfg.init_ckpt}")
    callbacks = utils.instantiate_group(cfg.get("callbacks"))
    wandb_key = next((k for k, v in (cfg.get("logger") or {}).items() if "Wandb" in str(v.get("_target_", ""))), None)
    if wandb_key is not None and ckpt_path is not None and cfg.logger[wandb_key].get("id") is None:
        with open_dict(cfg):
            cfg.logger[wandb_key].id = utils.read_wandb_id(out_dir)  # resume the same W&B run
            cfg.logger[wandb_key].resume = "allow"
    loggers = utils.instantiate_group(cfg.get("logger"))
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

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

    if wandb_key is not None and trainer.is_global_zero:
        import wandb

        wandb.finish()  # flush the offline run files before the process ends
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
