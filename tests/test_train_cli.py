"""train.py end to end in subprocesses (the CLI is the thing under test): run-dir contents,
resume from last.ckpt, and DDP on CPU with two gloo processes. Tiny data and network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=bpnp_synthetic", "debug=limit", "data.batch_size=2", "data.synthetic.num_points_2d=[12,16]",
    "data.val_length=4", "data.test_length=4", "model.net.feature_dim=8", "model.net.depth=1",
    "model.net.ransac.num_hypotheses=32", "model.net.refine.max_iter=10", "model.loss.pose_start_epoch=1",
]


def _train(log_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"paths.log_dir={log_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_then_resume(tmp_path):
    proc = _train(tmp_path, "trainer.max_epochs=1", "test=true")
    runs = list((tmp_path / "debug_limit" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    resolved = (run / ".hydra" / "config.yaml").read_text()
    assert "${" not in resolved and "batch_size: 2" in resolved and "task_name: debug_limit" in resolved
    last = run / "checkpoints" / "last.ckpt"
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert last.is_file() and len(best) == 1
    first = _ckpt(last)
    assert first["epoch"] == 0 and first["global_step"] == 4
    assert first["bpnp_run"] == {"task_name": "debug_limit", "experiment": "bpnp_synthetic", "debug": "limit"}
    # the console: the resolved config first, the run dir and the checkpoints last ...
    out = proc.stdout
    assert "[train.py] config (resolved" in out and "  batch_size: 2" in out
    assert out.index("config (resolved") < out.index("Trainer.fit") < out.index(f"[train.py] best checkpoint: {best[0]}")
    assert f"[train.py] run dir: {run}" in out.split("Trainer.fit")[-1]
    assert f"[train.py] last checkpoint: {last}" in out
    # ... and train.log holds the same lines (ours, Lightning's, warnings), with times
    log = (run / "train.log").read_text()
    for line in ("config (resolved", "Trainer.fit", f"best checkpoint: {best[0]}", f"last checkpoint: {last}"):
        assert line in log, line
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/rot_err_deg", "val/rot_err_deg", "val/rot_err_deg_median", "val/success",
                "val/center_err_rel", "val/t_err", "train/skipped_steps", "lr-Adam", "test/success"):
        assert key in header, key
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    images = list(wandb_runs[0].glob("files/media/images/**/*.png"))
    assert images, "no image logged to W&B"
    assert list((run / "plots").glob("val_epoch000_sample0_correspondences.png"))
    assert list((run / "plots").glob("test_epoch*_error_cdf.png"))

    # Resume: the same run dir continues from the saved epoch; ckpt_path=last says which it picked.
    proc = _train(tmp_path, "trainer.max_epochs=2", "ckpt_path=last")
    assert f"ckpt_path=last picked {last}: resuming epoch 0, step 4" in proc.stdout
    assert list((tmp_path / "debug_limit" / "runs").iterdir()) == [run]
    second = _ckpt(last)
    assert second["epoch"] > first["epoch"] and second["global_step"] == 8 > first["global_step"]
    rows = (run / "csv" / "metrics.csv").read_text().splitlines()
    epochs = {r.split(",")[0] for r in rows[1:]}
    assert {"0", "1"} <= epochs  # old rows kept, new rows appended
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1  # same W&B run id


class RankDump(pl.Callback):
    """Used by the DDP test through the CLI: each rank writes its synced metrics and a checksum
    of its weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"world": trainer.world_size, "metrics": metrics, "checksum": checksum}))


@pytest.mark.slow
def test_ddp_cpu_two_processes_agree(tmp_path):
    dump = tmp_path / "ranks"
    proc = _train(tmp_path, "trainer=ddp_cpu", "logger=csv", "trainer.max_epochs=1", "data.val_length=8",
                  "data.eval_batch_size=2", "trainer.limit_val_batches=2",
                  "+callbacks.rank_dump._target_=tests.test_train_cli.RankDump", f"+callbacks.rank_dump.out_dir={dump}",
                  timeout=420)
    # the epoch means are torchmetrics (synchronised): Lightning's sync_dist advice is silenced, as
    # are Lightning's own deprecated torch calls; warnings that matter are kept (train.py KNOWN_WARNINGS)
    assert "sync_dist" not in proc.stdout + proc.stderr and "all_gather is deprecated" not in proc.stderr
    r0, r1 = (json.loads((dump / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["metrics"] and set(r0["metrics"]) == set(r1["metrics"])
    for key in ("val/rot_err_deg", "val/rot_err_deg_median", "val/success", "val/loss"):
        assert key in r0["metrics"]
    for key, value in r0["metrics"].items():
        # NaN (an inlier precision with no predicted inlier on any rank) must be NaN on both
        assert value == pytest.approx(r1["metrics"][key], rel=1e-6, abs=1e-6, nan_ok=True), key
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9)  # weights stayed in sync
