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

__all__ = ["PoseVisualisation", "BPnPProgressBar", "LastCheckpoint", "RunIdentity", "draw_correspondences", "draw_P",
           "draw_error_cdfs", "pair_kinds", "PAIR_STYLES"]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


#: Line colours of a pair (2D keypoint -> 3D point) by what it is, shared by the overlays.
PAIR_STYLES = {"true": dict(c="tab:green", ls="-"), "wrong": dict(c="tab:red", ls="-"),
               "outlier": dict(c="tab:purple", ls=":")}


def pair_kinds(match: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``"true"`` (the 3D point is the keypoint's true match), ``"wrong"`` (a 2D inlier matched to
    another 3D point) or ``"outlier"`` (a 2D outlier, which has no true match, given one)."""
    match, rows, cols = np.asarray(match), np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    truth = match[rows]
    return np.where(truth < 0, "outlier", np.where(truth == cols, "true", "wrong"))


def draw_correspondences(p2d: np.ndarray, p3d: np.ndarray, match: np.ndarray, P: np.ndarray, R_gt: np.ndarray,
                         t_gt: np.ndarray, R: np.ndarray, t: np.ndarray, max_lines: int = 60, title: str = ""):
    """Figure of one instance in the (camera-normalised) image plane.

    Keypoints (grey: 2D inliers, purple: 2D outliers), the 3D points projected with the
    estimated pose (orange x), and for the ``max_lines`` most confident rows of ``P`` a line from
    the keypoint to the true projection of the 3D point it is matched to, coloured by
    :data:`PAIR_STYLES`: green when that is its true match, red when a 2D inlier is matched to a
    wrong 3D point, dotted purple when a 2D outlier is given a match. The legend counts each.
    Inputs are the real (unpadded) points of the instance.
    """
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    inl = np.asarray(match) >= 0
    ax.scatter(p2d[inl, 0], p2d[inl, 1], s=6, c="0.55", label=f"2D inliers ({int(inl.sum())})")
    if (~inl).any():
        ax.scatter(p2d[~inl, 0], p2d[~inl, 1], s=6, c="tab:purple", alpha=0.5, label=f"2D outliers ({int((~inl).sum())})")
    est = project(transform(torch.from_numpy(R)[None], torch.from_numpy(t)[None], torch.from_numpy(p3d)[None]))[0].numpy()
    gt = project(transform(torch.from_numpy(R_gt)[None], torch.from_numpy(t_gt)[None], torch.from_numpy(p3d)[None]))[0].numpy()
    lo, hi = p2d.min(0) - 0.05, p2d.max(0) + 0.05
    inside = np.all((est > lo) & (est < hi), axis=1)
    ax.scatter(est[inside, 0], est[inside, 1], s=8, marker="x", c="tab:orange", linewidths=0.7, label="3D @ estimate")
    if P.size:
        j = P.argmax(1)
        conf = P.max(1)
        rows = np.argsort(-conf)[:max_lines]
        kinds = pair_kinds(match, rows, j[rows])
        for kind, style in PAIR_STYLES.items():
            sel = rows[kinds == kind]
            for i in sel:
                ax.plot([p2d[i, 0], gt[j[i], 0]], [p2d[i, 1], gt[j[i], 1]], lw=0.8, alpha=0.8, **style)
            ax.plot([], [], lw=1.0, label=f"{kind} ({len(sel)})", **style)
        acc = float(np.mean(kinds == "true")) if len(rows) else float("nan")
        title = f"{title}  top-{len(rows)} match precision {acc:.2f}"
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])  # image y points down
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="lower right", title="line: keypoint -> matched 3D point (true pose)", title_fontsize=6)
    fig.tight_layout()
    return fig


def _spread(idx: np.ndarray, k: int) -> np.ndarray:
    """``k`` entries of ``idx`` evenly spread over it (all of them if it has no more)."""
    if len(idx) <= k:
        return idx
    return idx[np.unique(np.linspace(0, len(idx) - 1, k).round().astype(np.int64))]


def draw_P(P: np.ndarray, match: np.ndarray, title: str = "", max_rows: int = 64, max_cols: int = 96):
    """Image of the joint probability matrix (times m), at a resolution where every entry is a
    few pixels: at most ``max_rows`` 2D points (evenly spread over the inliers, sorted by their
    true match, then over the outliers, in proportion) and ``max_cols`` 3D points: the true matches
    of the rows shown first, so that correct mass lies on the diagonal, then the columns where
    the rows put their largest entry, then others. White lines separate inlier from outlier rows
    and true-match columns from the rest."""
    m, n = P.shape
    match = np.asarray(match)
    inliers = np.flatnonzero(match >= 0)
    inliers = inliers[np.argsort(match[inliers], kind="stable")]
    outliers = np.flatnonzero(match < 0)
    k_in = min(len(inliers), max(1, round(max_rows * len(inliers) / max(m, 1)))) if len(inliers) else 0
    rows = np.concatenate([_spread(inliers, k_in), _spread(outliers, max_rows - k_in)]).astype(np.int64)
    diag = match[rows][match[rows] >= 0][:max_cols]
    chosen = list(dict.fromkeys(diag.tolist()))
    if rows.size and P.size:
        for j in P[rows].argmax(1):
            if len(chosen) >= max_cols:
                break
            if j not in chosen:
                chosen.append(int(j))
    rest = np.setdiff1d(np.arange(n), chosen)
    cols = np.array(chosen + _spread(rest, max(0, max_cols - len(chosen))).tolist(), dtype=np.int64)
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(P[rows][:, cols] * m if rows.size and cols.size else np.zeros((1, 1)), cmap="viridis",
                   interpolation="nearest", vmin=0.0, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if 0 < k_in < len(rows):
        ax.axhline(k_in - 0.5, c="w", lw=0.6)
    if 0 < len(diag) < len(cols):
        ax.axvline(len(diag) - 0.5, c="w", lw=0.6)
    ax.set_xlabel(f"{len(cols)} of {n} 3D points (the rows' true matches first, then their argmax, then others)", fontsize=7)
    ax.set_ylabel(f"{len(rows)} of {m} 2D points ({k_in} inliers by true match, then outliers)", fontsize=7)
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
    and once validation has run ``val_rot_med`` (MEDIAN validation rotation error, deg: the
    metric the best checkpoint is chosen on, ``val/rot_err_deg_median``) and ``val_succ``
    (validation success rate); drops ``v_num``. The validation mean (``val/rot_err_deg``, one
    failure at 180 degrees outweighs many successes) is in the logs, not on the bar."""

    RENAME = {"train/loss": "loss", "train/rot_err_deg": "rot", "val/success": "val_succ",
              "train/skipped_steps": "skipped"}
    #: Shown from ``trainer.callback_metrics`` (logged without ``prog_bar``), under these names.
    EXTRA = {"val/rot_err_deg_median": "val_rot_med"}
    #: Logged with ``prog_bar`` but not shown.
    HIDE = ("v_num", "val/rot_err_deg")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        out = {self.RENAME.get(k, k): v for k, v in items.items() if k not in self.HIDE}
        for key, name in self.EXTRA.items():
            value = trainer.callback_metrics.get(key)
            if value is not None and getattr(value, "numel", lambda: 1)() == 1:
                out[name] = float(value)
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


class RunIdentity(pl.Callback):
    """Records which run wrote a checkpoint (:func:`bpnp.training.utils.run_identity`: task name,
    experiment, debug preset) under ``checkpoint["bpnp_run"]``, so that ``train.py`` can refuse
    to resume a checkpoint of another experiment or preset. Added by ``train.py`` itself."""

    def __init__(self, identity: Mapping[str, Any]) -> None:
        self.identity = dict(identity)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        from bpnp.training.utils import RUN_IDENTITY_KEY

        checkpoint[RUN_IDENTITY_KEY] = dict(self.identity)
