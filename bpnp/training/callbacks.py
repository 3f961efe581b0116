"""Callbacks: plots of validation/test samples and error distributions (saved to the run dir and
logged to W&B), and a progress bar that shows the loss and the rotation error.

Everything that draws or writes runs on global rank zero only. Figures use matplotlib's
object API with the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import WandbLogger

from bpnp.geometry.bearings import project, transform

__all__ = ["PoseVisualisation", "BPnPProgressBar", "LastCheckpoint", "draw_correspondences", "draw_P", "draw_error_cdfs"]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def draw_correspondences(p2d: np.ndarray, p3d: np.ndarray, match: np.ndarray, P: np.ndarray, R_gt: np.ndarray,
                         t_gt: np.ndarray, R: np.ndarray, t: np.ndarray, max_lines: int = 60, title: str = ""):
    """Figure of one instance in the (camera-normalised) image plane.

    Keypoints (grey), the 3D points projected with the estimated pose (orange x), and for the
    ``max_lines`` most confident rows of ``P`` a line from the keypoint to the true projection of
    the 3D point it is matched to: green if that is its true match, red otherwise. Inputs are the
    real (unpadded) points of the instance.
    """
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(p2d[:, 0], p2d[:, 1], s=6, c="0.55", label="keypoints")
    est = project(transform(torch.from_numpy(R)[None], torch.from_numpy(t)[None], torch.from_numpy(p3d)[None]))[0].numpy()
    gt = project(transform(torch.from_numpy(R_gt)[None], torch.from_numpy(t_gt)[None], torch.from_numpy(p3d)[None]))[0].numpy()
    lo, hi = p2d.min(0) - 0.05, p2d.max(0) + 0.05
    inside = np.all((est > lo) & (est < hi), axis=1)
    ax.scatter(est[inside, 0], est[inside, 1], s=8, marker="x", c="tab:orange", linewidths=0.7, label="3D @ estimate")
    if P.size:
        j = P.argmax(1)
        conf = P.max(1)
        rows = np.argsort(-conf)[:max_lines]
        for i in rows:
            ok = match[i] == j[i]
            ax.plot([p2d[i, 0], gt[j[i], 0]], [p2d[i, 1], gt[j[i], 1]], lw=0.8, c="tab:green" if ok else "tab:red", alpha=0.8)
        acc = float(np.mean(match[rows] == j[rows])) if len(rows) else float("nan")
        title = f"{title}  top-{len(rows)} match precision {acc:.2f}"
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])  # image y points down
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def draw_P(P: np.ndarray, match: np.ndarray, title: str = ""):
    """Image of the joint probability matrix (times m) with its columns reordered so that the
    ground-truth matches of the rows lie on the diagonal (unmatched rows/columns last)."""
    m, n = P.shape
    rows = np.concatenate([np.flatnonzero(match >= 0), np.flatnonzero(match < 0)])
    matched_cols = match[match >= 0]
    rest = np.setdiff1d(np.arange(n), matched_cols, assume_unique=False)
    cols = np.concatenate([matched_cols, rest])
    fig = _figure(4.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(P[rows][:, cols] * m, cmap="viridis", interpolation="nearest", vmin=0.0)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel("3D points (true matches first)")
    ax.set_ylabel("2D points")
    ax.set_title(title or "P x m", fontsize=8)
    fig.tight_layout()
    return fig


def draw_error_cdfs(errors: Mapping[str, torch.Tensor], title: str = ""):
    """Cumulative distributions of the rotation error (final and RANSAC) and the relative
    camera-centre error."""
    fig = _figure(8.0, 3.2)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, label in (("rot_err_deg", "refined"), ("ransac_rot_err_deg", "RANSAC")):
        if key in errors and errors[key].numel():
            v = np.sort(np.clip(errors[key].numpy(), 0, 180))
            ax1.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    ax1.set_xscale("symlog", linthresh=1.0)
    ax1.set_xlabel("rotation error (deg)")
    ax1.set_ylabel("fraction")
    ax1.axvline(5.0, c="0.6", ls="--", lw=0.8)
    ax1.legend(fontsize=7)
    if "center_err_rel" in errors and errors["center_err_rel"].numel():
        v = np.sort(np.nan_to_num(errors["center_err_rel"].numpy(), posinf=1e3))
        ax2.plot(v, np.arange(1, len(v) + 1) / len(v))
    ax2.set_xscale("log")
    ax2.axvline(0.05, c="0.6", ls="--", lw=0.8)
    ax2.set_xlabel("relative camera-centre error")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


class PoseVisualisation(pl.Callback):
    """Draws the first ``num_samples`` items of the first validation (and test) batch, and the
    error CDFs at the end of each validation/test epoch; saves PNGs under ``dirpath`` and logs
    them (plus ``wandb.Histogram``s of the errors) to every :class:`WandbLogger`. Rank zero only.

    Args:
        dirpath: where PNGs go (``<run dir>/plots`` in the configs); None = ``<default_root_dir>/plots``.
        num_samples: items drawn per epoch.
        every_n_epochs: draw every n-th validation epoch.
        max_lines: correspondence lines per sample.
    """

    def __init__(self, dirpath: str | None = None, num_samples: int = 3, every_n_epochs: int = 1, max_lines: int = 60) -> None:
        super().__init__()
        self.dirpath, self.num_samples, self.every_n_epochs, self.max_lines = dirpath, int(num_samples), int(every_n_epochs), int(max_lines)
        self.saved: list[Path] = []

    def _dir(self, trainer: pl.Trainer) -> Path:
        d = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "plots"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _active(self, trainer: pl.Trainer, stage: str) -> bool:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return False
        return stage == "test" or trainer.current_epoch % max(self.every_n_epochs, 1) == 0

    @staticmethod
    def _wandb(trainer: pl.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _save(self, trainer, fig, name: str) -> Path:
        path = self._dir(trainer) / name
        fig.savefig(path)
        self.saved.append(path)
        return path

    def _samples(self, trainer, stage: str, outputs: Any, batch: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(outputs, Mapping) or "out" not in outputs:
            return
        out = outputs["out"]
        tag = f"{stage}_epoch{trainer.current_epoch:03d}"
        corr, mats = [], []
        B = out.P.shape[0]
        for k in range(min(self.num_samples, B)):
            m2, m3 = batch["mask2d"][k].cpu().numpy(), batch["mask3d"][k].cpu().numpy()
            P = out.P[k].detach().float().cpu().numpy()[m2][:, m3]
            cols = np.cumsum(m3) - 1  # original 3D index -> index among real points
            match = batch["match"][k].cpu().numpy()[m2]
            match = np.where(match >= 0, cols[np.clip(match, 0, len(cols) - 1)], -1)
            p2d = batch["p2d"][k].cpu().numpy()[m2]
            p3d = batch["p3d"][k].cpu().numpy()[m3].astype(np.float32)
            errs = {key: float(v[k]) for key, v in outputs.get("errors", {}).items() if key in ("rot_err_deg", "center_err_rel")}
            title = f"{tag} #{int(batch['index'][k]) if 'index' in batch else k}: rot {errs.get('rot_err_deg', math.nan):.1f} deg"
            f1 = draw_correspondences(p2d, p3d, match, P, batch["R"][k].cpu().numpy().astype(np.float32), batch["t"][k].cpu().numpy().astype(np.float32),
                                      out.R[k].detach().float().cpu().numpy(), out.t[k].detach().float().cpu().numpy(), self.max_lines, title)
            corr.append(self._save(trainer, f1, f"{tag}_sample{k}_correspondences.png"))
            f2 = draw_P(P, match, title=f"{tag} sample {k}: P x m")
            mats.append(self._save(trainer, f2, f"{tag}_sample{k}_P.png"))
        for lg in self._wandb(trainer):
            lg.log_image(key=f"{stage}/correspondences", images=[str(p) for p in corr], step=trainer.global_step)
            lg.log_image(key=f"{stage}/P", images=[str(p) for p in mats], step=trainer.global_step)

    def _distributions(self, trainer, pl_module, stage: str) -> None:
        errors = getattr(pl_module, "last_errors", {}).get(stage)
        if not errors:
            return
        tag = f"{stage}_epoch{trainer.current_epoch:03d}"
        path = self._save(trainer, draw_error_cdfs(errors, title=tag), f"{tag}_error_cdf.png")
        for lg in self._wandb(trainer):
            import wandb

            hists = {f"{stage}/{k}_hist": wandb.Histogram(np.nan_to_num(v.numpy(), posinf=1e3)) for k, v in errors.items()}
            hists[f"{stage}/error_cdf"] = wandb.Image(str(path))
            lg.log_metrics(hists, step=trainer.global_step)

    # -- hooks ------------------------------------------------------------------------------------
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._active(trainer, "val"):
            self._samples(trainer, "val", outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._active(trainer, "test"):
            self._samples(trainer, "test", outputs, batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._active(trainer, "val"):
            self._distributions(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        if self._active(trainer, "test"):
            self._distributions(trainer, pl_module, "test")


class BPnPProgressBar(TQDMProgressBar):
    """TQDM bar with short names: ``loss``, ``rot`` (training batch mean rotation error, deg),
    ``val_rot``/``val_succ`` once validation has run; drops ``v_num``."""

    RENAME = {"train/loss": "loss", "train/rot_err_deg": "rot", "val/rot_err_deg": "val_rot", "val/success": "val_succ",
              "train/skipped_steps": "skipped"}

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        out = {}
        for k, v in items.items():
            out[self.RENAME.get(k, k)] = v
        return out


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` current: written every ``every_n_train_steps`` optimizer steps
    (mid-epoch, so a killed run loses at most that many steps; the resume is exact, see
    :class:`bpnp.data.datamodule.EpochSampler`) and at the end of every training epoch, after its
    validation.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` alone is not enough: since
    Lightning 2.6 it refreshes ``last.ckpt`` only in a step where it also saved a top-k
    checkpoint, i.e. only when the monitored metric improved, so after a run of epochs without
    improvement ``last.ckpt`` is stale and a resume silently repeats them. Writes go through the
    trainer's checkpoint IO (:class:`bpnp.training.checkpoint_io.AtomicCheckpointIO`: atomic).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = 50) -> None:
        steps = int(every_n_train_steps) if every_n_train_steps else None
        if steps is not None and steps < 1:
            raise ValueError(f"LastCheckpoint: every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, every_n_train_steps=steps,
                         every_n_epochs=None if steps else 1, enable_version_counter=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Also when this step was saved already: that save came before the epoch's validation,
        # whose results (best scores of the other checkpoint callback) belong in last.ckpt.
        if not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit"):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
