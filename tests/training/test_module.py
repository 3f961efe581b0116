"""BlindPnPModule in-process: metrics are the contract's, the non-finite guard skips and counts a
bad step without touching the weights, checkpoints round-trip, optimizer/scheduler config."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from bpnp.data.datamodule import BlindPnPDataModule
from bpnp.geometry.metrics import pose_errors
from bpnp.training.losses import BlindPnPLoss
from bpnp.training.module import BlindPnPModule
from tests.tolerances import gamma

NET = {"feature_dim": 8, "depth": 1, "ransac": {"num_hypotheses": 32}, "refine": {"max_iter": 10}}


def _dm(**kw):
    args = dict(source="synthetic", batch_size=2, synthetic={"num_points_2d": [12, 16]}, train_length=4, val_length=4,
                test_length=2, seed=3)
    args.update(kw)
    return BlindPnPDataModule(**args)


def _trainer(**kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def test_validation_metrics_match_pose_errors():
    torch.manual_seed(0)
    module = BlindPnPModule(net=NET, loss={"pose_start_epoch": 0})
    dm = _dm()
    trainer = _trainer()
    trainer.validate(module, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("rot_err_deg", "t_err", "center_err_rel", "success", "loss", "loss_corr", "loss_pose", "ransac_success"):
        assert f"val/{key}" in logged, key
    for key in ("rot_err_deg", "t_err", "center_err_rel", "ransac_rot_err_deg"):
        assert f"val/{key}_median" in logged, key
    # Recompute from scratch with the same RANSAC generators.
    module.eval()
    errs = []
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            out = module.net(batch, refine=True, generator=module._eval_generator(i))
            errs.append(pose_errors(out.R, out.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"]))
    rot = torch.cat([e["rot_err_deg"] for e in errs]).float()
    succ = torch.cat([e["success"] for e in errs]).float()
    # float32 means of the same float32 values, summed in another grouping: each within
    # gamma_(k+1) of the exact mean (k values, plus the division); the median is one of the
    # values (the lower middle one for both); the success rate k/4 is exact in float32.
    f32 = torch.float32
    assert math.isclose(logged["val/rot_err_deg"], float(rot.mean()), rel_tol=2 * gamma(rot.numel() + 1, f32), abs_tol=0.0)
    assert logged["val/rot_err_deg_median"] == float(rot.median())
    assert logged["val/success"] == float(succ.mean())
    assert module.last_errors["val"]["rot_err_deg"].numel() == 4
    trainer.test(module, datamodule=dm)
    assert "test/rot_err_deg_median" in trainer.callback_metrics and "test/success" in trainer.callback_metrics


class _Snapshot(pl.Callback):
    def __init__(self):
        self.after_first = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.after_first = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(where):
    torch.manual_seed(0)
    module = BlindPnPModule(net=NET, loss={"pose_start_epoch": 0})
    initial = {k: v.detach().clone() for k, v in module.named_parameters()}
    calls = {"n": 0}

    class Poisoned(BlindPnPLoss):
        def __call__(self, out, batch, epoch):
            terms = super().__call__(out, batch, epoch)
            calls["n"] += 1
            if calls["n"] == 1:
                if where == "loss":
                    terms.loss = terms.loss * float("nan")
                else:  # finite loss, NaN gradient: where() differentiates the unused sqrt(-x) branch
                    w = next(module.net.parameters())
                    terms.loss = terms.loss + torch.where(torch.tensor(False), torch.sqrt(-(w.abs().sum() + 1)), torch.tensor(0.0))
                    assert torch.isfinite(terms.loss)
            return terms

    module.criterion = Poisoned(**vars(module.criterion))
    snap = _Snapshot()
    trainer = _trainer(max_steps=2, limit_val_batches=0, callbacks=[snap], gradient_clip_val=1.0)
    trainer.fit(module, datamodule=_dm())
    assert module.skipped_steps == 1
    for k, v in snap.after_first.items():  # the bad step changed nothing
        assert torch.equal(v, initial[k]), k
    params = dict(module.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(params[k], initial[k]) for k in initial)  # the next step trained
    steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {1}  # Adam stepped once (the bad step left no moment update)
    assert float(trainer.logged_metrics["train/skipped_steps"]) == 1.0


class _CountPoses(pl.Callback):
    def __init__(self):
        self.posed = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.posed.append(int(pl_module.means["train_ransac_success"].update_count))


def test_training_pose_only_every_n_steps():
    """Without the pose loss RANSAC runs on batches 0, 2, ... only; match accuracy on every batch."""
    torch.manual_seed(0)
    module = BlindPnPModule(net=NET, train_pose_every_n_steps=2)
    calls = []
    forward = module.net.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pose", True))
        return forward(*args, **kwargs)

    module.net.forward = spy
    counter = _CountPoses()
    trainer = _trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[counter])
    trainer.fit(module, datamodule=_dm(train_length=6))
    assert calls == [True, False, True]
    assert counter.posed == [1, 1, 2]  # ransac_success updated on batches 0 and 2 only
    assert "train/match_acc_epoch" in trainer.logged_metrics and "train/rot_err_deg_epoch" in trainer.logged_metrics
    # With the pose loss on, every step needs the (refined) pose.
    module = BlindPnPModule(net=NET, loss={"pose_start_epoch": 0}, train_pose_every_n_steps=2)
    assert module._refine_in_training() and all(module._pose_in_training(i, refine=True) for i in range(4))
    with pytest.raises(ValueError, match="train_pose_every_n_steps"):
        BlindPnPModule(net=NET, train_pose_every_n_steps=0)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    module = BlindPnPModule(net=NET, loss={"pose_start_epoch": 1}, optimizer={"_target_": "torch.optim.Adam", "lr": 2e-3, "weight_decay": 0.0})
    dm = _dm()
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    module.skipped_steps = 3
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    loaded = BlindPnPModule.load_from_checkpoint(path)
    assert loaded.skipped_steps == 3 and loaded.criterion.pose_start_epoch == 1
    batch = next(iter(dm.val_dataloader()))
    module.eval(), loaded.eval()
    a = module(batch, generator=torch.Generator().manual_seed(0))
    b = loaded(batch, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.P, b.P) and torch.allclose(a.R, b.R)


def test_optimizer_and_scheduler_config():
    module = BlindPnPModule(net=NET, optimizer={"_target_": "torch.optim.AdamW", "lr": 5e-4, "weight_decay": 0.01},
                            scheduler={"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "gamma": 0.5, "interval": "epoch"})
    conf = module.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.AdamW) and conf["optimizer"].defaults["lr"] == 5e-4
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert conf["lr_scheduler"]["interval"] == "epoch"
    plain = BlindPnPModule(net=NET).configure_optimizers()
    assert isinstance(plain, torch.optim.Adam) and plain.defaults["lr"] == 1e-3 and plain.defaults["weight_decay"] == 1e-3
