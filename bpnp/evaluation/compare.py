"""Pair the rows of two result tables (``bpnp.evaluation.summary`` markdown) by run name: before
and after a change, e.g. two checkpoints on the same scene sets.

    git show 55ac349:docs/results.md > before.md
    python -m bpnp.evaluation.summary --latest logs/eval_* > after.md
    python -m bpnp.evaluation.compare before.md after.md

Reads every summary-table row of both files (a markdown file may hold several tables: only rows
with the summary's ten columns count) and prints, for each run of ``after``: the success, the
RANSAC-only success and the match accuracy of both, and ``after``'s time per instance. Runs only
in ``after`` get "-" for ``before``; ``--rename OLD=NEW`` maps a run name prefix of ``before``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["read_rows", "compare_rows", "main"]

#: Columns of a bpnp.evaluation.summary row that this table uses.
_SUCCESS, _MATCH, _RANSAC, _TIME = 2, 4, 5, 9


def read_rows(text: str) -> dict[str, list[str]]:
    """Run name -> cells of every summary-table row in a markdown text (header and rule skipped)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or not cells[0] or cells[0] == "run" or set(cells[0]) <= set("-: "):
            continue
        rows[cells[0]] = cells
    return rows


def compare_rows(before: dict[str, list[str]], after: dict[str, list[str]],
                 rename: dict[str, str] | None = None) -> str:
    """The paired markdown table (one row per run of ``after``, sorted by name)."""
    mapped = {}
    for name, cells in before.items():
        for old, new in (rename or {}).items():
            if name.startswith(old):
                name = new + name[len(old):]
        mapped[name] = cells
    lines = ["| run | success before | success after | RANSAC only (before / after) | "
             "match acc. (before / after) | time per instance after |", "|---|---|---|---|---|---|"]
    for name in sorted(after):
        a, b = after[name], mapped.get(name)
        if b is None:
            lines.append(f"| {name} | - | {a[_SUCCESS]} | - / {a[_RANSAC]} | - / {a[_MATCH]} | {a[_TIME]} |")
        else:
            lines.append(f"| {name} | {b[_SUCCESS]} | **{a[_SUCCESS]}** | {b[_RANSAC]} / {a[_RANSAC]} | "
                         f"{b[_MATCH]} / {a[_MATCH]} | {a[_TIME]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bpnp.evaluation.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="map a run-name prefix of BEFORE to AFTER's (repeatable)")
    args = ap.parse_args(argv)
    rename = {}
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old:
            print(f"error: --rename {item!r}: expected OLD=NEW", file=sys.stderr)
            return 2
        rename[old] = new
    for path in (args.before, args.after):
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    after = read_rows(args.after.read_text())
    if not after:
        print(f"error: {args.after}: no summary-table rows (python -m bpnp.evaluation.summary writes them)",
              file=sys.stderr)
        return 2
    print(compare_rows(read_rows(args.before.read_text()), after, rename))
    return 0


if __name__ == "__main__":
    sys.exit(main())
