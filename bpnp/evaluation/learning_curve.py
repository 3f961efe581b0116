"""Learning curve of a training run: validation metrics against minutes of training.

    python -m bpnp.evaluation.learning_curve logs/bpnp_synthetic/runs/<run> --console train_console.log \\
        --out docs/figures/learning_curve.png

The validation metrics (``val/success``, ``val/ransac_success``, ``val/match_acc``) come from
the run's ``csv/metrics.csv``. The time axis comes from the console output of ``train.py`` (what
it printed to the terminal, saved with ``> file 2>&1``): the progress bar's elapsed time at the
end of each epoch (training and that epoch's validation), summed over the epochs, i.e. minutes of
the run itself, without start-up. Prints the points and writes the plot.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["epoch_minutes", "validation_points", "main"]

_BAR = re.compile(r"Epoch (\d+):\s+\d+%\|[^|]*\|\s*\d+/\d+ \[(?:(\d+):)?(\d+):(\d+)")


def epoch_minutes(console: str) -> dict[int, float]:
    """Minutes of each epoch: the longest elapsed time its progress bar showed (``[MM:SS`` or
    ``[H:MM:SS``; the longest, because the bar is reset to 0 under the old epoch's name before it
    is renamed for the next)."""
    longest: dict[int, float] = {}
    for m in _BAR.finditer(console):
        h, mm, ss = int(m.group(2) or 0), int(m.group(3)), int(m.group(4))
        e = int(m.group(1))
        longest[e] = max(longest.get(e, 0.0), h * 60 + mm + ss / 60)
    return longest


def validation_points(metrics_csv: str | Path, minutes: dict[int, float],
                      keys: Sequence[str] = ("val/success", "val/ransac_success", "val/match_acc")
                      ) -> list[dict[str, float]]:
    """One point per validated epoch: ``{"epoch", "minutes" (cumulative at its end), key: value}``."""
    rows = list(csv.DictReader(open(metrics_csv)))
    points = []
    for r in rows:
        if not r.get(keys[0]):
            continue
        epoch = int(float(r["epoch"]))
        cum = sum(v for e, v in minutes.items() if e <= epoch)
        points.append({"epoch": epoch, "minutes": cum, **{k: float(r[k]) for k in keys if r.get(k)}})
    return points


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--console", required=True, help="the console output of the train.py run")
    ap.add_argument("--out", default=None, help="PNG to write (default <run_dir>/plots/learning_curve.png)")
    args = ap.parse_args(argv)
    run, console = Path(args.run_dir), Path(args.console)
    for p in (run / "csv" / "metrics.csv", console):
        if not p.is_file():
            print(f"error: {p}: no such file", file=sys.stderr)
            return 2
    points = validation_points(run / "csv" / "metrics.csv", epoch_minutes(console.read_text(errors="replace")))
    if not points:
        print(f"error: {run}: no validation metrics in csv/metrics.csv", file=sys.stderr)
        return 2
    for p in points:
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"val/success": "success (refined)", "val/ransac_success": "success (RANSAC only)",
              "val/match_acc": "match accuracy"}
    for key, label in labels.items():
        xs = [p["minutes"] for p in points if key in p]
        ax.plot(xs, [100 * p[key] for p in points if key in p], marker="o", label=label)
    ax.set_xlabel("minutes of training (2-core CPU)")
    ax.set_ylabel("validation, %")
    ax.set_title(f"{run.parent.parent.name}: validation split")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(args.out) if args.out else run / "plots" / "learning_curve.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
