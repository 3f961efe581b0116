"""Numerical faults never reach the weights: 200 training steps of the real BlindPnPModule (a
Lightning Trainer on CPU, tiny network with its STN, pose loss and refinement on from step 0,
untrained so RANSAC starts from random poses) on hard synthetic batches: 50 % 2D and 3D outliers,
4-6 point sets, collinear, coplanar and duplicated 3D points, scenes scaled by 1e-3 and 1e3.

Checked at every step: the loss is finite or the step is skipped; the gradients the optimizer
sees are finite; every weight, batch-norm buffer and Adam moment stays finite; skipped steps are
counted in ``train/skipped_steps`` (logged) and are few.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from bpnp.data.collate import collate_scenes
from bpnp.data.datasets import add_outliers
from bpnp.data.synthetic import SyntheticConfig, make_instance
from bpnp.training.module import BlindPnPModule
from tests.reliability.helpers import pinhole_scene

KINDS = ("outliers", "tiny", "collinear", "coplanar", "duplicated", "far", "near")
STEPS, BATCH = 200, 4


class HardScenes(Dataset):
    """Item ``i``: a deterministic hard instance of kind ``KINDS[i % 7]`` (random otherwise)."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        kind = KINDS[i % len(KINDS)]
        if kind == "outliers":
            cfg = SyntheticConfig(num_points_2d=(12, 24), outlier_frac_2d=0.5, outlier_frac_3d=0.5)
            return make_instance(cfg, self.seed, i)
        if kind == "tiny":
            return make_instance(SyntheticConfig(num_points_2d=(4, 6)), self.seed, i)
        k = int(rng.integers(8, 16))
        if kind == "collinear":
            X = np.outer(rng.normal(size=k), rng.normal(size=3)) + rng.normal(scale=1e-6, size=(k, 3))
        elif kind == "coplanar":
            X = np.c_[rng.normal(size=(k, 2)), np.zeros(k)] @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
        elif kind == "duplicated":
            X = rng.normal(size=(k, 3))
            X[k // 2:] = X[0]
        else:
            X = rng.normal(size=(k, 3))
        scene = pinhole_scene(X, seed=int(rng.integers(1 << 30)))
        if kind in ("far", "near"):
            s = 1e3 if kind == "far" else 1e-3
            scene["p3d"], scene["t"] = scene["p3d"] * s, scene["t"] * s
        return add_outliers(scene, 0.5, 0.5, rng)


class Watch(pl.Callback):
    """Counts non-finite losses and raw gradients, and fails on any non-finite parameter, buffer
    or optimizer state after a step."""

    def __init__(self) -> None:
        self.raw_bad_grads = self.bad_losses = self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # runs before the module's guard
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.raw_bad_grads += int(any(not torch.isfinite(g).all() for g in grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.bad_losses += int(loss is None)
        assert loss is None or torch.isfinite(loss), f"non-finite loss reached backward at step {batch_idx}"
        for name, t in [*pl_module.named_parameters(), *pl_module.named_buffers()]:
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{name} is not finite after step {batch_idx}"
        for state in trainer.optimizers[0].state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    assert torch.isfinite(value).all(), f"Adam {key} not finite after step {batch_idx}"


class Logged(pl.Callback):
    def __init__(self) -> None:
        self.skipped: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "train/skipped_steps" in trainer.logged_metrics:
            self.skipped.append(float(trainer.logged_metrics["train/skipped_steps"]))


@pytest.mark.slow
def test_200_hard_batches_never_poison_the_weights():
    torch.manual_seed(0)
    module = BlindPnPModule(
        net=dict(feature_dim=8, depth=1, ransac={"num_hypotheses": 32}, refine={"max_iter": 10}),
        loss={"pose_start_epoch": 0},  # pose loss and refinement on from the first step
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-2, "weight_decay": 0.0},  # aggressive on purpose
        train_seed=0,
    )
    assert module.criterion.pose_active(0)
    loader = DataLoader(HardScenes(STEPS * BATCH), batch_size=BATCH, shuffle=False, collate_fn=collate_scenes)
    watch, logged = Watch(), Logged()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, max_epochs=1, limit_val_batches=0,
                         logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, callbacks=[watch, logged], log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader)
    assert watch.steps == STEPS
    skipped = module.skipped_steps
    # Every skip is counted once: a non-finite loss (training_step returned None) or non-finite
    # gradients (zeroed by the guard before the optimizer).
    assert skipped == watch.bad_losses + watch.raw_bad_grads
    print(f"{skipped} of {STEPS} steps skipped ({watch.bad_losses} non-finite losses, "
          f"{watch.raw_bad_grads} non-finite gradients)")
    assert skipped <= STEPS // 20, f"{skipped} of {STEPS} steps skipped"
    assert logged.skipped and logged.skipped[-1] == float(skipped)  # logged as train/skipped_steps
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_hard_scene_kinds_are_what_they_claim():
    ds = HardScenes(len(KINDS))
    for i, kind in enumerate(KINDS):
        s = ds[i]
        inl = s["match"] >= 0
        X = s["p3d"][s["match"][inl]]
        if kind == "collinear":
            assert np.linalg.svd(X - X.mean(0), compute_uv=False)[1] < 1e-4
        elif kind == "coplanar":
            assert np.linalg.svd(X - X.mean(0), compute_uv=False)[2] < 1e-9
        elif kind == "tiny":
            assert 4 <= len(s["p2d"]) <= 6
        elif kind == "far":
            assert np.abs(s["p3d"]).max() > 100
        elif kind == "near":
            assert np.abs(s["p3d"]).max() < 0.1
        if kind not in ("tiny", "outliers"):
            assert (~inl).sum() > 0 and len(s["p3d"]) > inl.sum()  # 2D and 3D outliers added
