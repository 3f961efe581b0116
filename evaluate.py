"""Evaluate a checkpoint on held-out blind-PnP instances, on one device.

    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt data=scenes data.path=DIR
    python evaluate.py ckpt_path=<ckpt> data=synthetic data.test_length=100
    python evaluate.py ckpt_path=<ckpt> data=colmap data.path=../shared/data/real/lund_door
    python evaluate.py ckpt_path=<ckpt> data=scenes data.path=DIR device=cuda logger=wandb

Composes ``configs/evaluate.yaml`` and hands it to :func:`bpnp.evaluation.app.run_evaluation`,
which writes ``metrics.json``, ``instances.csv``, ``sweep_instances.csv`` and ``plots/`` to the
run directory (``logs/eval/runs/<time>``, printed). Bad inputs (a missing file, a scene file
missing a key, a truncated COLMAP model, an incompatible checkpoint, an override of a config key
that does not exist) print one line ``error: <message>`` to stderr and exit with code 2; an I/O
failure while running (a full disk, an unwritable run directory) prints one line and exits with 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BPNP_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

#: Exit code for bad inputs (argparse's convention for usage errors).
EXIT_USER_ERROR = 2


def run(cfg: DictConfig, out_dir: str | Path | None = None) -> int:
    """Evaluate; return 0, or print ``error: <message>`` and return 2 for a user error."""
    from bpnp.evaluation.app import USER_ERRORS, run_evaluation

    try:
        run_evaluation(cfg, out_dir)
    except USER_ERRORS as exc:
        message = " ".join(str(exc).split("\n")).strip() or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # disk full or a failed write of the results: one line, exit code 1
        detail = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"error: I/O error: {detail}", file=sys.stderr)
        return 1
    return 0


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        # SystemExit is not an Exception, so Hydra lets it through without a traceback.
        sys.exit(code)


def check_command_line(argv: list[str]) -> str | None:
    """One-line message if the overrides do not compose with configs/evaluate.yaml, else None."""
    from bpnp.training.utils import config_error

    return config_error(ROOT / "configs", "evaluate", list(argv))


def cli(argv: list[str] | None = None) -> None:
    """``python evaluate.py ...``: an override of a key that does not exist (or any override that
    does not compose) is one ``error:`` line and exit code 2, like every other bad input."""
    message = check_command_line(sys.argv[1:] if argv is None else argv)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()


if __name__ == "__main__":
    cli()
