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


def test_draw_P_is_readable_for_large_instances():
    """400 x 600 entries used to be squeezed into ~280 x 200 px (moire): now a sample of rows and
    columns, each entry several pixels, true matches still on the diagonal."""
    rng = np.random.default_rng(0)
    m, n = 400, 600
    match = np.where(rng.random(m) < 0.7, rng.permutation(n)[:m], -1)
    P = rng.random((m, n)) * 1e-4
    P[np.flatnonzero(match >= 0), match[match >= 0]] = 1.0 / m
    fig = draw_P(P, match)
    fig.canvas.draw()
    img = np.asarray(fig.axes[0].images[0].get_array())
    rows, cols = img.shape
    assert rows <= 64 and cols <= 96
    box = fig.axes[0].get_window_extent()
    assert box.height / rows >= 4 and box.width / cols >= 3  # pixels per entry
    k = int(np.sum(np.diag(img) > 0.5))  # the inlier rows' true matches on the diagonal (P x m = 1)
    assert k >= 0.6 * rows and np.allclose(np.diag(img)[:k], 1.0)


def test_correspondence_overlays_have_a_legend_of_pair_kinds(tmp_path):
    from bpnp.evaluation.plots import overlay_figure, plot_overlay
    from bpnp.evaluation.runner import Overlay
    from bpnp.training.callbacks import pair_kinds

    rng = np.random.default_rng(1)
    n = 12
    p3d = rng.normal(size=(n, 3)).astype(np.float32)
    R, t = np.eye(3, dtype=np.float32), np.array([0, 0, 6], dtype=np.float32)
    match = np.array([0, 1, 2, 3, -1, -1])
    p2d = (p3d[:6, :2] / (p3d[:6, 2:] + 6)).astype(np.float32)
    P = np.zeros((6, n))
    P[[0, 1, 2, 3, 4, 5], [0, 1, 5, 6, 7, 8]] = 1.0  # 2 true, 2 wrong, 2 outliers matched
    assert pair_kinds(match, np.arange(6), P.argmax(1)).tolist() == ["true", "true", "wrong", "wrong", "outlier", "outlier"]
    fig = draw_correspondences(p2d, p3d, match, P, R, t, R, t)
    labels = [tx.get_text() for tx in fig.axes[0].get_legend().get_texts()]
    for want in ("true (2)", "wrong (2)", "outlier (2)", "2D inliers (4)", "2D outliers (2)"):
        assert want in labels, labels
    ov = Overlay(name="s", p2d=p2d.astype(float), p3d=p3d.astype(float), R_gt=R.astype(float), t_gt=t.astype(float),
                 match=match, pairs=np.stack([np.arange(6), P.argmax(1)], 1), weights=np.ones(6), R=R.astype(float),
                 t=t.astype(float))
    import matplotlib.pyplot as plt

    fig = overlay_figure(ov)
    labels = [tx.get_text() for tx in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    plot_overlay(ov, tmp_path / "o.png")
    assert {"true pairs (2)", "wrong pairs (2D inlier) (2)", "outlier pairs (2D outlier) (2)"} <= set(labels), labels


def test_pose_visualisation_writes_plots_and_bar_shows_short_names(tmp_path):
    torch.manual_seed(0)
    module = BlindPnPModule(net={"feature_dim": 8, "depth": 1, "ransac": {"num_hypotheses": 32}})
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
    assert "val_succ" in shown and "v_num" not in shown
    # the bar's rotation error is the MEDIAN (the checkpoint metric), not the mean, and says so
    assert "val_rot" not in shown and shown["val_rot_med"] == float(trainer.callback_metrics["val/rot_err_deg_median"])
