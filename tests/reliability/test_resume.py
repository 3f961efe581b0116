"""An interrupted run resumes exactly: ``train.py`` is SIGKILLed in the middle of an epoch (by a
callback, so the moment is reproducible), ``train.py ... ckpt_path=last`` continues from the
mid-epoch ``last.ckpt`` (written every 2 steps here by the periodic checkpoint callback), and the
final validation metrics and weights equal those of an uninterrupted run of the same length.

What makes it exact (see DESIGN notes in the README): the data order of an epoch is a function
of (seed, epoch) and the resumed epoch skips the batches already trained
(``BlindPnPDataModule.state_dict`` + ``EpochSampler``); synthetic resampling is a function of
(seed, epoch, index); training RANSAC draws from a generator seeded by (seed, epoch, batch, rank);
Lightning restores weights, optimizer, loop counters and callbacks. Subprocesses, since the
process being killed is the thing under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.reliability.helpers import ROOT, TINY_TRAIN

RUN = [*TINY_TRAIN, "~callbacks.pose_plots", "data.train_length=10", "trainer.max_epochs=3",
       "model.loss.pose_start_epoch=1", "data.synthetic.outlier_frac_2d=[0.0,0.3]",
       "callbacks.periodic_checkpoint.every_n_train_steps=2"]
KILL_AT = 7  # 5 steps per epoch: step 7 is the 2nd batch of epoch 1; the last checkpoint is step 6


class SelfKill(pl.Callback):
    """SIGKILL this process right after optimizer step ``at_step`` (no cleanup, no save)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = int(at_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


class MetricsDump(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.path.write_text(json.dumps({"metrics": metrics, "global_step": trainer.global_step,
                                         "skipped_steps": pl_module.skipped_steps}))


def _train(log_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *RUN, f"paths.log_dir={log_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    dump = "+callbacks.dump._target_=tests.reliability.test_resume.MetricsDump"
    ref = _train(tmp_path / "a", dump, f"+callbacks.dump.path={tmp_path / 'a.json'}")
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = _train(tmp_path / "b", "+callbacks.kill._target_=tests.reliability.test_resume.SelfKill",
                    f"+callbacks.kill.at_step={KILL_AT}")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    (run,) = (tmp_path / "b" / "bpnp_synthetic" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["epoch"] == 1  # mid-epoch: 1 of epoch 1's 5 batches done
    assert state["BlindPnPDataModule"] == {"epoch": 1, "train_batches": 1}

    resumed = _train(tmp_path / "b", "ckpt_path=last", dump, f"+callbacks.dump.path={tmp_path / 'b.json'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout + resumed.stderr
    assert list((tmp_path / "b" / "bpnp_synthetic" / "runs").iterdir()) == [run]  # same run dir
    assert "not resumable" not in resumed.stderr  # Lightning's warning about mid-epoch resumes

    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert a["global_step"] == b["global_step"] == 15
    assert a["metrics"] and set(a["metrics"]) == set(b["metrics"])
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    (run_a,) = (tmp_path / "a" / "bpnp_synthetic" / "runs").iterdir()
    for ckpt in (run_a / "checkpoints" / "last.ckpt", last):  # last.ckpt holds the end of training
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 15
    wa, wb = _weights(run_a / "checkpoints" / "last.ckpt"), _weights(last)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key].double(), wb[key].double(), rtol=0, atol=1e-6), key
    assert sorted(p.name for p in last.parent.iterdir() if "last" in p.name) == ["last.ckpt"]
