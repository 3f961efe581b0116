"""Evaluate a checkpoint on held-out blind-PnP instances, on one device.

    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt data=scenes data.path=DIR
    python evaluate.py ckpt_path=<ckpt> data=synthetic data.test_length=100
    python evaluate.py ckpt_path=<ckpt> data=colmap data.path=data/real/lund_door
    python evaluate.py ckpt_path=<ckpt> data=scenes data.path=DIR device=cuda logger=wandb

Composes ``configs/evaluate.yaml`` and hands it to :func:`bpnp.evaluation.app.run_evaluation`,
which writes ``metrics.json``, ``instances.csv``, ``sweep_instances.csv`` and ``plots/`` to the
run directory (``logs/eval/runs/<time>``, printed). Bad inputs (a missing file, a scene file
missing a key, a truncated COLMAP model, an incompatible checkpoint, an override of a config key
that does not exist) print one line ``error: <message>`` to stderr and exit with code 2; an I/O
failure while running (a full disk, an unwritable run directory) prints one line and exits with 1.
Ctrl-C (SIGINT) or SIGTERM keeps the finished instances (``instances.csv`` is written as they
finish, and a partial ``metrics.json`` with ``"complete": false``), prints one line
``interrupted: kept 15 of 40 instances in <run dir> (metrics.json complete: false)`` and exits
with 130 / 143. ``ckpt_path=last`` evaluates the newest ``last.ckpt`` of any task under
``paths.log_dir`` (``logs/*/runs/*/checkpoints/last.ckpt``) and prints which one it picked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BPNP_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

def run(cfg: DictConfig, out_dir: str | Path | None = None) -> int:
    """Evaluate; return 0, or print one ``error:`` line and return the exit code of
    the shared error policy (:mod:`bpnp.runtime.cli`: 2 for bad input, 1 for a failed write;
    one ``interrupted:`` line and 130 / 143 for SIGINT / SIGTERM).
    Every config value is checked first (:func:`bpnp.runtime.config.check_eval_config`), and
    that the run directory can be written; a run directory that a failed run left holding
    nothing but Hydra's files is removed."""
    from bpnp.evaluation.app import run_evaluation
    from bpnp.runtime.cli import (check_writable_dir, console, interrupt_signals, is_unused_run_dir, remove_unused_run_dir,
                                  run_with_error_policy)
    from bpnp.runtime.config import check_eval_config

    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    fresh = is_unused_run_dir(out_dir)
    log = console("bpnp.evaluate").info

    def work():
        check_eval_config(cfg)
        check_writable_dir(out_dir, "run directory")  # now, not after the evaluation has run
        return run_evaluation(cfg, out_dir, log=log)

    with interrupt_signals():  # SIGTERM, like Ctrl-C, keeps the finished instances (exit 143 / 130)
        code, _ = run_with_error_policy(work)
    if code and fresh:
        remove_unused_run_dir(out_dir)
    return code


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    import logging

    logging.captureWarnings(True)  # warnings reach evaluate.log too (configs/hydra/job_logging/bpnp.yaml)
    code = run(cfg)
    if code:
        # SystemExit is not an Exception, so Hydra lets it through without a traceback.
        sys.exit(code)


def check_command_line(argv: list[str]) -> str | None:
    """One-line message if the overrides do not compose with configs/evaluate.yaml or give a bad
    value (:func:`bpnp.runtime.config.check_eval_config`), else None."""
    from bpnp.runtime.cli import config_error
    from bpnp.runtime.config import check_eval_config

    return config_error(ROOT / "configs", "evaluate", list(argv), validate=check_eval_config)


def cli(argv: list[str] | None = None) -> None:
    """``python evaluate.py ...``: an override of a key that does not exist, any override that
    does not compose, or a bad value is one ``error:`` line and exit code 2 (like every other bad
    input), before Hydra creates the run directory."""
    message = check_command_line(sys.argv[1:] if argv is None else argv)
    if message:
        from bpnp.runtime.cli import EXIT_USER_ERROR

        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()


if __name__ == "__main__":
    cli()
