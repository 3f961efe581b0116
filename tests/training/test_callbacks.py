"""Plot callback (files on rank zero, skipped in sanity checks) and the progress bar names."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from bpnp.data.datamodule import BlindPnPDataModule
from bpnp.training.callbacks import BPnPProgressBar, PoseVisualisation, draw_P, draw_correspondences
from bpnp.training.module import BlindPnPModule


def test_draw_P_puts_true_matches_on_the_diagonal(tmp_path):
    n = 6
    match = np.array([3, -1, 0, 5])
    P = np.zeros((4, n))
    P[[0, 2, 3], [3, 0, 5]] = 1.0
    fig = draw_P(P, match)
    img = fig.axes[0].images[0].get_array()
    assert np.allclose(np.diag(np.asarray(img)[:3, :3]), 4.0)  # P * m on the diagonal
    fig.savefig(tmp_path / "p.png")
    R = np.eye(3, dtype=np.float32)
    t = np.array([0, 0, 5], dtype=np.float32)
    p3d = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    p2d = (p3d[:4, :2] / (p3d[:4, 2:] + 5)).astype(np.float32)
    f2 = draw_correspondences(p2d, p3d, match, P, R, t, R, t)
    assert "precision" in f2.axes[0].get_title()


def test_pose_visualisation_writes_plots_and_bar_shows_short_names(tmp_path):
    torch.manual_seed(0)
    module = BlindPnPModule(net={"feature_dim": 8, "depth": 1, "ransac_hypotheses": 32})
    dm = BlindPnPDataModule(source="synthetic", batch_size=2, synthetic={"num_points_2d": [12, 16]}, train_length=2,
                            val_length=2, test_length=2)
    viz, bar = PoseVisualisation(dirpath=str(tmp_path / "plots"), num_samples=2), BPnPProgressBar()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[viz, bar],
                         default_root_dir=str(tmp_path), enable_model_summary=False)
    trainer.validate(module, datamodule=dm)
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["val_epoch000_error_cdf.png", "val_epoch000_sample0_P.png", "val_epoch000_sample0_correspondences.png",
                     "val_epoch000_sample1_P.png", "val_epoch000_sample1_correspondences.png"]
    shown = bar.get_metrics(trainer, module)
    assert "val_rot" in shown and "val_succ" in shown and "v_num" not in shown
