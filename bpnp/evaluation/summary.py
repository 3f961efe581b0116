"""One markdown table from the ``metrics.json`` of several ``evaluate.py`` runs.

    python -m bpnp.evaluation.summary logs/eval_unseen_meshes_out0.25/runs/<time> ...
    python -m bpnp.evaluation.summary --latest logs/eval_*        # the newest run of each task dir

One row per run: its task name (``task_name`` of ``evaluate.py``, e.g. ``eval_unseen_meshes_out0.25``;
for a run directory outside ``<task>/runs/`` the test set's name), the test set's size, and for
the network, the RANSAC pose alone (``ransac`` baseline) and the true matches (``oracle``
baseline): success rate (docs/metrics.md definition), median rotation error in degrees, and the
network's match accuracy (true pairs that are their row's maximum of P); then the network with its
pose search off (``nosearch`` baseline: success, median rotation error; ``n/a`` when the search did
not run) and the network's mean seconds per instance (``mean_time_s``). This is how the result
tables of docs/results.md are made; it reads the files only. A run that was interrupted
(``"complete": false`` in its ``metrics.json``) is marked in its name, e.g.
``eval_unseen (partial 15/40)``: its numbers cover the finished instances only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["summary_row", "summary_table", "partial_note", "main"]

HEADER = ("| run | n | network success | median rot. err. | match acc. | RANSAC-only success | "
          "RANSAC-only median rot. err. | true matches success | without pose search | time per instance |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100.0 * float(x):.1f} %"


def _deg(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.2f} deg"


def _set_name(metrics: Mapping[str, Any], fallback: str) -> str:
    data = (metrics.get("meta") or {}).get("data") or {}
    path = data.get("path") or (",".join(data["test_scenes"]) if data.get("test_scenes") else None)
    return Path(str(path)).name if path else fallback


def partial_note(metrics: Mapping[str, Any]) -> str:
    """``" (partial 15/40)"`` for an interrupted run's metrics (``"complete": false``), else ``""``."""
    if metrics.get("complete", True) is not False:
        return ""
    done = metrics.get("instances_done", metrics.get("n", 0))
    total = (metrics.get("meta") or {}).get("num_instances", "?")
    return f" (partial {done}/{total})"


def summary_row(metrics: Mapping[str, Any], name: str) -> str:
    """One markdown row of :data:`HEADER` from an ``evaluate.py`` metrics dict (an interrupted
    run's name carries :func:`partial_note`)."""
    name = name + partial_note(metrics)
    base = metrics.get("baselines") or {}
    ransac, oracle = base.get("ransac") or {}, base.get("oracle") or {}
    plain = base.get("nosearch") or {}
    nosearch = "n/a" if not plain else f"{_pct(plain.get('success_rate'))}, {_deg(plain.get('median_rot_err_deg'))}"
    t = metrics.get("mean_time_s")
    return (f"| {name} | {metrics.get('n', 0)} | {_pct(metrics.get('success_rate'))} | "
            f"{_deg(metrics.get('median_rot_err_deg'))} | {_pct(metrics.get('match_acc'))} | "
            f"{_pct(ransac.get('success_rate'))} | {_deg(ransac.get('median_rot_err_deg'))} | "
            f"{_pct(oracle.get('success_rate'))} | {nosearch} | {'n/a' if t is None else f'{float(t):.3f} s'} |")


def summary_table(run_dirs: Sequence[str | Path]) -> str:
    """:data:`HEADER` and one row per run directory (each holding a ``metrics.json``)."""
    rows = []
    for run in run_dirs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no metrics.json (pass evaluate.py run directories)")
        metrics = json.loads(path.read_text())
        run = Path(run)
        name = run.parent.parent.name if run.parent.name == "runs" else _set_name(metrics, run.name)
        rows.append(summary_row(metrics, name))
    return "\n".join([HEADER, *rows])


def _newest_run(task_dir: Path) -> Path | None:
    runs = sorted(p for p in (task_dir / "runs").glob("*") if (p / "metrics.json").is_file())
    return runs[-1] if runs else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="evaluate.py run directories (or task directories with --latest)")
    ap.add_argument("--latest", action="store_true", help="each argument is a task dir: take its newest run")
    args = ap.parse_args(argv)
    runs: list[Path] = []
    for d in map(Path, args.dirs):
        run = _newest_run(d) if args.latest else d
        if run is None:
            print(f"error: {d}: no run with a metrics.json under {d / 'runs'}", file=sys.stderr)
            return 2
        runs.append(run)
    try:
        print(summary_table(runs))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
