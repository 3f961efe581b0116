"""A run whose W&B directory cannot be written, or whose disk fills up while it writes a
checkpoint, stops with one clear ``error:`` line, and the checkpoint written before survives
(and resumes). In-process on ``train.py``'s ``run_cli`` with the real configs; we run as root, so
an unwritable directory is made by putting a regular file where a parent directory should be,
and a full disk by a checkpoint file whose writes fail with ENOSPC after a few kilobytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import bpnp.training.checkpoint_io as checkpoint_io
from tests.reliability.helpers import TINY_TRAIN, composing, load_cli

PERIODIC = ["callbacks.periodic_checkpoint.every_n_train_steps=2", "trainer.limit_train_batches=4"]


@pytest.fixture(scope="module")
def train_cli():
    return load_cli("train")


def _cfg(base: Path, *overrides: str):
    with composing("train") as compose:
        return compose(*TINY_TRAIN, *PERIODIC, f"paths.log_dir={base / 'logs'}", f"paths.output_dir={base / 'run'}",
                       *overrides)


@pytest.fixture
def first_run(tmp_path, train_cli):
    code, _ = train_cli.run_cli(_cfg(tmp_path))
    assert code == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    return last


def _error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


class _FullDisk:
    """A file object that accepts ``budget`` bytes and then fails like a full disk."""

    def __init__(self, f, budget: int) -> None:
        self._f, self._left = f, budget

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self._left:
            self._f.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_disk_full_during_a_checkpoint_write(tmp_path, train_cli, capsys, monkeypatch, first_run):
    before = first_run.read_bytes()
    capsys.readouterr()
    real_open = checkpoint_io._open
    monkeypatch.setattr(checkpoint_io, "_open", lambda path, mode: _FullDisk(real_open(path, mode), 4096))
    code, _ = train_cli.run_cli(_cfg(tmp_path, f"ckpt_path={first_run}", "trainer.max_epochs=2"))
    assert code == 1
    assert _error_lines(capsys) == [
        f"error: I/O error: could not write checkpoint {first_run}: No space left on device "
        "(the previous checkpoint at that path is unchanged)"]
    assert first_run.read_bytes() == before  # the previous last.ckpt survives, byte for byte
    assert sorted(p.name for p in first_run.parent.glob("*last*")) == ["last.ckpt"]  # no partial, no last-v1
    # ... and resumes once space is back.
    monkeypatch.setattr(checkpoint_io, "_open", real_open)
    code, _ = train_cli.run_cli(_cfg(tmp_path, f"ckpt_path={first_run}", "trainer.max_epochs=2"))
    assert code == 0
    assert torch.load(first_run, map_location="cpu", weights_only=False)["global_step"] == 8


@pytest.mark.parametrize("where", ["parent is a file", "wandb folder is a file"])
def test_unwritable_wandb_directory(tmp_path, train_cli, capsys, first_run, where):
    before = first_run.read_bytes()
    capsys.readouterr()
    if where == "parent is a file":
        blocker = tmp_path / "not_a_dir"
        blocker.write_text("a regular file")
        save_dir, shown = blocker / "wandb_logs", f"logger.wandb.save_dir={blocker / 'wandb_logs'}"
    else:
        save_dir = tmp_path / "wb"
        save_dir.mkdir()
        (save_dir / "wandb").write_text("a regular file")
        shown = f"logger.wandb.save_dir (its wandb/ folder)={save_dir / 'wandb'}"
    code, _ = train_cli.run_cli(_cfg(tmp_path, f"ckpt_path={first_run}", "trainer.max_epochs=2", "logger=many",
                                     f"logger.wandb.save_dir={save_dir}"))
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: {shown}: not a writable directory ("), lines
    assert first_run.read_bytes() == before  # nothing was written: W&B never started (no silent /tmp fallback)


def test_atomic_save_failure_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    checkpoint_io.atomic_torch_save({"version": 1}, path)
    real_open = checkpoint_io._open
    monkeypatch.setattr(checkpoint_io, "_open", lambda p, mode: _FullDisk(real_open(p, mode), 10))
    with pytest.raises(checkpoint_io.CheckpointWriteError) as info:
        checkpoint_io.atomic_torch_save({"version": 2, "x": torch.zeros(1000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "unchanged" in str(info.value)
    assert torch.load(path, weights_only=True)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_evaluate_unwritable_run_directory_is_one_line(tmp_path, capsys):
    from bpnp.data.scenes import save_scene
    from bpnp.data.synthetic import SyntheticConfig, make_instance
    from tests.evaluation.conftest import TINY_NET
    from bpnp.runtime.checkpoint import save_weights_only
    from bpnp.models.network import BlindPnPNet

    scenes = tmp_path / "scenes"
    save_scene(scenes / "0.npz", make_instance(SyntheticConfig(num_points_2d=12), 0, 0))
    ckpt = save_weights_only(tmp_path / "w.pt", BlindPnPNet(**TINY_NET), TINY_NET)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cli = load_cli("evaluate")
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={ckpt}", f"data.path={scenes}", "sweep.enabled=false", "baselines=[]")
    code = cli.run(cfg, blocker / "run")
    err = capsys.readouterr().err.strip().splitlines()
    # found before any compute (like train.py's log and checkpoint directories): bad input, exit 2
    assert code == 2 and err == [f"error: run directory={blocker / 'run'}: not a writable directory (Not a directory)"], err
