"""``BlindPnPModule``: the LightningModule that trains :class:`~bpnp.models.BlindPnPNet`.

Constructed from plain mappings (Hydra passes them from ``configs/model/bpnp.yaml``), so that
``BlindPnPModule.load_from_checkpoint(path)`` rebuilds the network without Hydra configs:

- ``net``: keyword arguments of :class:`~bpnp.models.BlindPnPNet` (a ``_target_`` key, if any,
  selects another network class).
- ``loss``: keyword arguments of :class:`~bpnp.training.losses.BlindPnPLoss`.
- ``optimizer``: ``_target_`` (default ``torch.optim.Adam``) and its keyword arguments.
- ``scheduler``: None, or ``_target_`` and its arguments plus Lightning's ``interval``,
  ``frequency``, ``monitor``.

Metrics (names and definitions: docs/metrics.md): ``{stage}/rot_err_deg``, ``t_err``,
``center_err_rel``, ``success`` (means over the epoch, torchmetrics ``MeanMetric``, synchronised
under DDP) and ``{stage}/{name}_median`` (torchmetrics ``CatMetric``, gathered from every rank
before the median), for ``stage`` in train / val / test; the RANSAC pose's ``ransac_success`` and
``ransac_rot_err_deg_median`` show what the refinement adds; ``match_acc`` is the fraction of
true pairs that are their row's maximum of P; with outlier bins, ``inlier_precision_2d`` etc.
rate the bins' inlier decision (inlier probability > 0.5) on each side. Losses: ``{stage}/loss``, ``loss_corr``,
``loss_pose``.

Non-finite guard: a training step whose loss is not finite (on any rank) returns ``None``
(Lightning skips backward; the optimizer sees no gradient), and a step whose gradients are not
all finite (checked in ``on_before_optimizer_step``, after the DDP all-reduce, so every rank
decides the same) has every gradient set to ``None``, so the optimizer skips every parameter
(no Adam moment update, no weight decay). Both count in ``train/skipped_steps``, which is saved
in checkpoints. One bad batch therefore never writes NaN weights or kills a run.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric

from bpnp.geometry.metrics import pose_errors
from bpnp.geometry.ransac import seeded_generator
from bpnp.models.network import BlindPnPNet, BlindPnPOutput
from bpnp.runtime.checkpoint import build_net
from bpnp.nodes import Status
from bpnp.geometry.correspondences import inlier_precision_recall, match_accuracy
from bpnp.training.losses import BlindPnPLoss

__all__ = ["BlindPnPModule", "METRICS", "MEDIAN_METRICS"]

METRICS = ("rot_err_deg", "t_err", "center_err_rel", "success")
MEDIAN_METRICS = ("rot_err_deg", "t_err", "center_err_rel")
#: Precision / recall of the outlier bins' inlier decision (inlier probability > 0.5), per side;
#: logged only by networks with bins.
INLIER_METRICS = ("inlier_precision_2d", "inlier_recall_2d", "inlier_precision_3d", "inlier_recall_3d")
_EXTRA_MEANS = ("loss", "loss_corr", "loss_pose", "match_acc", "ransac_success", "pnp_ok", "sinkhorn_iterations",
                *INLIER_METRICS)
STAGES = ("train", "val", "test")


def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain Python (so hparams and checkpoints hold no DictConfig)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _instantiate(cfg: Mapping[str, Any], default_target: str, **kwargs: Any) -> Any:
    from hydra.utils import get_class

    cfg = dict(cfg)
    target = cfg.pop("_target_", default_target)
    cfg.pop("_partial_", None)
    return get_class(target)(**kwargs, **cfg)


class BlindPnPModule(pl.LightningModule):
    """Training, validation and test of BlindPnPNet; see the module docstring.

    Args:
        net: network keyword arguments (see :class:`~bpnp.models.BlindPnPNet`).
        loss: :class:`~bpnp.training.losses.BlindPnPLoss` keyword arguments.
        optimizer: optimizer ``_target_`` and keyword arguments (Adam, lr 1e-3 by default).
        scheduler: optional LR scheduler config (see the module docstring).
        eval_seed: seed of the RANSAC random numbers in validation/test (per batch index), so
            that evaluating a checkpoint twice gives the same numbers.
        num_viz: validation samples drawn by the plotting callback (returned by the first
            validation batch).
        train_seed: seed of the RANSAC random numbers in training; step ``(epoch, batch_idx)``
            on rank ``r`` draws from a generator seeded by ``(train_seed, epoch, batch_idx, r)``
            (never the global RNG), so a run resumed from a checkpoint draws exactly what the
            uninterrupted run would have (``configs/model/bpnp.yaml`` sets it to ``${seed}``).
        train_pose_every_n_steps: while the refinement is off in training (no pose loss), the
            RANSAC pose serves only the logged ``train/`` pose metrics, so it is computed on every
            n-th batch of an epoch only (``batch_idx % n == 0``; the same batches on every rank
            and after a resume); the other steps stop after Sinkhorn. ``train/`` pose metrics are
            then means over those batches; ``match_acc`` and the losses still use every batch.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        eval_seed: int = 0,
        num_viz: int = 4,
        train_seed: int = 0,
        train_pose_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        net, loss = _plain(net) or {}, _plain(loss) or {}
        optimizer = _plain(optimizer) or {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": 1e-3}
        scheduler = _plain(scheduler)
        self.save_hyperparameters({"net": net, "loss": loss, "optimizer": optimizer, "scheduler": scheduler,
                                   "eval_seed": eval_seed, "num_viz": num_viz, "train_seed": train_seed,
                                   "train_pose_every_n_steps": train_pose_every_n_steps})
        if int(train_pose_every_n_steps) < 1:
            raise ValueError(f"train_pose_every_n_steps must be >= 1, got {train_pose_every_n_steps}")
        self.net = build_net(net)
        self.criterion = BlindPnPLoss(**loss)
        self.means = nn.ModuleDict({f"{s}_{k}": MeanMetric(nan_strategy="ignore") for s in STAGES for k in (*METRICS, *_EXTRA_MEANS)})
        self.cats = nn.ModuleDict({f"{s}_{k}": CatMetric(nan_strategy="ignore") for s in STAGES for k in (*MEDIAN_METRICS, "ransac_rot_err_deg")})
        self.skipped_steps = 0
        #: Per-instance errors of the last completed epoch of each stage (all ranks), for plots.
        self.last_errors: dict[str, dict[str, torch.Tensor]] = {}

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor], **kwargs: Any) -> BlindPnPOutput:
        return self.net(batch, **kwargs)

    def _refine_in_training(self) -> bool:
        return bool(getattr(self.net, "refine_in_training", False)) or self.criterion.pose_active(self.current_epoch)

    def _train_generator(self, batch_idx: int) -> torch.Generator:
        rank = int(self.trainer.global_rank) if self._trainer is not None else 0
        key = (int(self.hparams.get("train_seed", 0)), int(self.current_epoch), int(batch_idx), rank)
        seed = 0
        for k in key:  # a fixed mix of the key (Python's hash() of ints is not a good mixer)
            seed = (seed * 6364136223846793005 + k + 1442695040888963407) % (1 << 63)
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def _eval_generator(self, batch_idx: int) -> torch.Generator:
        return seeded_generator(int(self.hparams.eval_seed), batch_idx, self.device)

    # -- shared step ------------------------------------------------------------------------------
    def _errors(self, out: BlindPnPOutput, batch: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        args = (batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch.get("mask3d"))
        final = pose_errors(out.R.detach(), out.t.detach(), *args)
        initial = pose_errors(out.R0.detach(), out.t0.detach(), *args)
        return final, initial

    def _update_metrics(self, stage: str, out: BlindPnPOutput, batch, terms,
                        final: dict | None = None, initial: dict | None = None) -> None:
        """Accumulate a batch; pose metrics only when ``final`` / ``initial`` errors are given."""
        B = out.P.shape[0]
        if final is not None:
            for k in METRICS:
                self.means[f"{stage}_{k}"].update(final[k].float())
            for k in MEDIAN_METRICS:
                self.cats[f"{stage}_{k}"].update(final[k].float())
        if initial is not None:
            self.cats[f"{stage}_ransac_rot_err_deg"].update(initial["rot_err_deg"].float())
            self.means[f"{stage}_ransac_success"].update(initial["success"].float())
        if out.refined:
            self.means[f"{stage}_pnp_ok"].update((out.pnp_status == int(Status.OK)).float())
        self.means[f"{stage}_sinkhorn_iterations"].update(out.sinkhorn_iterations.float())
        self.means[f"{stage}_match_acc"].update(match_accuracy(out.P, batch["match"], batch.get("mask2d"), batch.get("mask3d")).float())
        if getattr(out, "inlier2d", None) is not None:
            pr = inlier_precision_recall(out.inlier2d, out.inlier3d, batch["match"], batch.get("mask2d"), batch.get("mask3d"))
            for side in ("2d", "3d"):
                for k in ("precision", "recall"):
                    self.means[f"{stage}_inlier_{k}_{side}"].update(pr[f"{k}_{side}"].float())
        self.means[f"{stage}_loss"].update(terms.loss.detach(), weight=B)
        self.means[f"{stage}_loss_corr"].update(terms.corr.detach(), weight=B)
        if terms.pose is not None:
            self.means[f"{stage}_loss_pose"].update(terms.pose.detach(), weight=B)

    def _log_means(self, stage: str) -> None:
        for k in (*METRICS, *_EXTRA_MEANS):
            metric = self.means[f"{stage}_{k}"]
            if metric.update_called:
                self.log(f"{stage}/{k}", metric, on_step=False, on_epoch=True, prog_bar=(stage == "val" and k in ("success", "rot_err_deg")))

    def _log_medians(self, stage: str) -> None:
        errors: dict[str, torch.Tensor] = {}
        for k in (*MEDIAN_METRICS, "ransac_rot_err_deg"):
            metric = self.cats[f"{stage}_{k}"]
            if metric.update_called:
                values = metric.compute()
                values = values.reshape(-1) if isinstance(values, torch.Tensor) else torch.cat([v.reshape(-1) for v in values])
                if values.numel():
                    errors[k] = values.detach().cpu()
                    self.log(f"{stage}/{k}_median", values.median(), on_step=False, on_epoch=True, sync_dist=True)
            metric.reset()
        if errors:
            self.last_errors[stage] = errors

    # -- training ---------------------------------------------------------------------------------
    def _pose_in_training(self, batch_idx: int, refine: bool) -> bool:
        """Whether this training batch runs RANSAC: always while refining, else every n-th."""
        every = int(self.hparams.get("train_pose_every_n_steps", 1))
        return refine or batch_idx % every == 0

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int):
        refine = self._refine_in_training()
        pose = self._pose_in_training(batch_idx, refine)
        kwargs = {} if pose else {"pose": False}  # stand-in networks need not know the switch
        out = self.net(batch, refine=refine, generator=self._train_generator(batch_idx), **kwargs)
        terms = self.criterion(out, batch, self.current_epoch)
        bad = ~torch.isfinite(terms.loss.detach())
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.all_gather(bad.float()).amax() > 0  # every rank skips together (no DDP hang)
        if bool(bad):
            self._count_skip()
            return None
        B = out.P.shape[0]
        if pose:
            final, initial = self._errors(out, batch)
            self._update_metrics("train", out, batch, terms, final, initial)
            # the progress bar keeps showing the last logged rotation error between pose steps
            self.log("train/rot_err_deg", final["rot_err_deg"].float().mean(), on_step=True, on_epoch=False, prog_bar=True, batch_size=B)
            self.log("train/success", final["success"].float().mean(), on_step=True, on_epoch=False, batch_size=B)
        else:
            self._update_metrics("train", out, batch, terms)
        self.log("train/loss", terms.loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=B)
        self.log("train/loss_corr", terms.corr.detach(), on_step=True, on_epoch=False, batch_size=B)
        if terms.pose is not None:
            self.log("train/loss_pose", terms.pose.detach(), on_step=True, on_epoch=False, batch_size=B)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=B)
        return terms.loss

    def _count_skip(self) -> None:
        self.skipped_steps += 1
        if self._trainer is not None:
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if not bool(finite):
            for p in self.parameters():
                p.grad = None
            self._count_skip()

    def on_train_epoch_end(self) -> None:
        for k in ("match_acc", "ransac_success", "pnp_ok", "sinkhorn_iterations", "loss", "loss_corr", "loss_pose", *INLIER_METRICS, *METRICS):
            metric = self.means[f"train_{k}"]
            if metric.update_called:
                self.log(f"train/{k}_epoch", metric.compute(), on_step=False, on_epoch=True, sync_dist=False)
            metric.reset()
        self._log_medians("train")

    # -- evaluation -------------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch, batch_idx: int):
        out = self.net(batch, refine=True, generator=self._eval_generator(batch_idx))
        terms = self.criterion(out, batch, self.current_epoch)
        final, initial = self._errors(out, batch)
        self._update_metrics(stage, out, batch, terms, final, initial)
        self._log_means(stage)
        if batch_idx == 0:
            return {"out": out, "errors": final}
        return None

    def validation_step(self, batch, batch_idx: int):
        return self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int):
        return self._eval_step("test", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_medians("val")

    def on_test_epoch_end(self) -> None:
        self._log_medians("test")

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = _instantiate(self.hparams.optimizer, "torch.optim.Adam", params=self.parameters())
        sched_cfg = self.hparams.scheduler
        if not sched_cfg:
            return opt
        sched_cfg = dict(sched_cfg)
        lightning_keys = {k: sched_cfg.pop(k) for k in ("interval", "frequency", "monitor") if k in sched_cfg}
        if lightning_keys.get("monitor") is None:
            lightning_keys.pop("monitor", None)
        scheduler = _instantiate(sched_cfg, "torch.optim.lr_scheduler.StepLR", optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, **lightning_keys}}

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_steps"] = int(self.skipped_steps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
