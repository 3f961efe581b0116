"""The command-line layer shared by train.py and evaluate.py (bpnp.runtime.cli / config): every
config value is checked on the composed command line, before Hydra creates a run directory,
with one line naming the key; failed runs leave no empty run directory; the console logger."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.reliability.helpers import load_cli


@pytest.fixture(scope="module")
def train_cli():
    return load_cli("train")


@pytest.fixture(scope="module")
def evaluate_cli():
    return load_cli("evaluate")


TRAIN_VALUES = {  # override -> the one line (the reproductions first)
    "model.optimizer.lr=abc": "model.optimizer.lr: expected a number > 0, got 'abc'",
    "model.net.sinkhorn.lam=abc": "model.net.sinkhorn.lam: expected a number > 0, got 'abc'",
    "trainer.max_epochs=abc": "trainer.max_epochs: expected an integer >= -1 (-1 = no limit), got 'abc'",
    "model.optimizer.lr=-1": "model.optimizer.lr: expected a number > 0, got -1",
    "data.batch_size=-4": "data.batch_size: expected an integer >= 1 (per device), got -4",
    "data.num_workers=-1": "data.num_workers: expected an integer >= 0, got -1",
    "seed=abc": "seed: expected an integer >= 0 and <= 4294967295, got 'abc'",
    "trainer.limit_train_batches=1.5": "trainer.limit_train_batches: expected an integer >= 0 (batches) or a number in "
                                       "[0, 1] (fraction), got 1.5",
    "model.loss.corr_kind=l2": "model.loss.corr_kind: expected one of nll, linear, got 'l2'",
    "+model.optimizer.betas=[2,0.9]": "model.optimizer: Invalid beta parameter at index 0: 2",
    "callbacks.pose_plots.num_samples=-1": "callbacks.pose_plots.num_samples: expected an integer >= 0, got -1",
    "ckpt_path=3": "ckpt_path: expected a non-empty string or null, got 3",
}


@pytest.mark.parametrize("override", list(TRAIN_VALUES))
def test_train_values_are_checked_before_the_run_dir_exists(train_cli, override):
    assert train_cli.check_command_line(["experiment=bpnp_synthetic", override]) == TRAIN_VALUES[override]


def test_train_devices_against_this_machine(train_cli):
    from bpnp.runtime.config import usable_cpu_cores

    cores = usable_cpu_cores()
    message = train_cli.check_command_line([f"trainer.devices={cores + 1}"])
    assert message == (f"trainer.devices={cores + 1}: this machine has {cores} CPU core(s) and each CPU device is one "
                       f"training process; use trainer.devices<={cores}")
    assert train_cli.check_command_line([f"trainer.devices={cores}"]) is None
    if not torch.cuda.is_available():
        for trainer in ("gpu", "ddp"):
            message = train_cli.check_command_line([f"trainer={trainer}"])
            assert message.startswith("trainer.accelerator=gpu: no CUDA GPU") and "trainer=ddp_cpu" in message
    for good in (["experiment=bpnp_synthetic"], ["experiment=bpnp_synthetic", "debug=limit"], ["model/net=bpnpnet"]):
        assert train_cli.check_command_line(good) is None, good


def test_train_run_checks_values_before_creating_anything(train_cli, capsys, tmp_path):
    """In-process (train.run_cli): the same check, before the run dir, loggers or the model exist
    (model.net.lam=abc used to fail at the first forward pass, after the W&B run existed)."""
    from tests.reliability.helpers import TINY_TRAIN, composing

    with composing("train") as compose:
        cfg = compose(*TINY_TRAIN, "model.net.sinkhorn.lam=abc", f"paths.log_dir={tmp_path / 'logs'}",
                      f"paths.output_dir={tmp_path / 'run'}")
    code, _ = train_cli.run_cli(cfg)
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: model.net.sinkhorn.lam: expected a number > 0, got 'abc'"
    assert not (tmp_path / "run").exists() and not (tmp_path / "logs").exists()


EVAL_VALUES = {
    "max_instances=0": "max_instances: expected an integer >= 1 or null, got 0",
    "progress_every=abc": "progress_every: expected an integer >= 0, got 'abc'",
    "baselines=[oracle,ransacc]": "baselines: expected a list of oracle, ransac, hungarian, nosearch (any subset), got ['oracle', 'ransacc']",
    "data.batch_size=0": "data.batch_size: expected an integer >= 1 (per device), got 0",
    "net_overrides={refine: {robust_scale: -1}}": "net_overrides.refine.robust_scale: expected a number > 0, got -1",
}


@pytest.mark.parametrize("override", list(EVAL_VALUES))
def test_evaluate_values_are_checked_before_the_run_dir_exists(evaluate_cli, override):
    assert evaluate_cli.check_command_line(["ckpt_path=x.ckpt", override]) == EVAL_VALUES[override]


def test_unused_run_dirs_are_removed_and_used_ones_never(tmp_path):
    from bpnp.runtime.cli import is_unused_run_dir, remove_unused_run_dir

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("a: 1")
    (run / "train.log").write_text("[...] error: ...")
    (run / "checkpoints").mkdir()
    assert is_unused_run_dir(run) and is_unused_run_dir(tmp_path / "nowhere")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not is_unused_run_dir(run) and not remove_unused_run_dir(run) and run.is_dir()
    (run / "checkpoints" / "last.ckpt").unlink()
    assert remove_unused_run_dir(run) and not run.exists()


def test_console_and_compact_config(capsys):
    from omegaconf import OmegaConf

    from bpnp.runtime.cli import console
    from bpnp.runtime.config import compact_yaml

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # no logging configured (pytest installs its own capture handlers)
    try:
        log = console("bpnp.test_console")
        log.info("hello")
    finally:
        root.handlers[:] = saved
    assert capsys.readouterr().out == "hello\n"
    cfg = OmegaConf.create({"a": 1, "data": {"sizes": [1, 2], "nested": {"x": "${a}"}, "b": 2}, "paths": {"out": "${hydra:x}"}})
    assert compact_yaml(cfg, ["data", "a"]) == "data:\n  sizes: [1, 2]\n  nested: {x: 1}\n  b: 2\na: 1"  # paths unresolved
