"""Whether two trees' forwards give the same outputs: dump them in each tree, then compare.

    git worktree add /tmp/head 3dbdca6 && ln -s $PWD/scenes /tmp/head/scenes
    python bench/forward_outputs.py dump /tmp/before.pt --tree /tmp/head
    python bench/forward_outputs.py dump /tmp/after.pt
    python bench/forward_outputs.py compare /tmp/before.pt /tmp/after.pt

``dump`` runs the shipped checkpoints' forward (eval mode, b = 1, RANSAC seeded per instance as
evaluate.py seeds it, one thread) with the ``bpnp`` package of ``--tree`` (default: this one) on a
fixed list of scenes: 5 each of ``scenes/timing_1000``, ``timing_1000_out50`` and ``timing_256``,
8 of ``val_shift/camera_far_val_out0.5``, 6 of the hard real validation and 2 of the 2,000-point
shift set (31 instances; the folders of docs/results.md and docs/benchmarks.md), and saves the
poses, plans, costs, the search's matches and the second-pass flags. ``compare`` prints per
checkpoint how many instances are bit-equal in every output, how many differ by rounding only
(poses within ``--pose-tol``, the same second-pass flag) and which moved. Not a timing; a check
that a rewrite is exact, or where it is not.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

CHECKPOINTS = ("checkpoints/bpnp_synthetic.pt", "checkpoints/bpnp_real.pt")
SETS = (("timing_1000", 5), ("timing_1000_out50", 5), ("timing_256", 5), ("val_shift/camera_far_val_out0.5", 8),
        ("real_val_hard/*", 6), ("shift/points_2000_out0.5", 2))


def _files(root: Path) -> list[str]:
    out = []
    for pattern, count in SETS:
        found = sorted(glob.glob(str(root / "scenes" / pattern / "*.npz")))[:count]
        if len(found) < count:
            raise SystemExit(f"forward_outputs: scenes/{pattern} holds {len(found)} scenes, need {count} "
                             f"(docs/results.md and docs/benchmarks.md export them)")
        out += [str(Path(f).relative_to(root)) for f in found]
    return out


def dump(path: str, tree: Path) -> None:
    sys.path.insert(0, str(tree))
    import numpy as np
    import torch

    from bpnp.data.collate import collate_scenes
    from bpnp.geometry.ransac import seeded_generator
    from bpnp.runtime.checkpoint import load_network

    torch.set_num_threads(1)
    files = _files(tree)
    res = {}
    for ck in CHECKPOINTS:
        net = load_network(str(tree / ck))
        with torch.no_grad():
            for i, f in enumerate(files):
                o = net(collate_scenes([dict(np.load(tree / f))]), generator=seeded_generator(0, i, "cpu"))
                res[(ck, f)] = dict(R=o.R, t=o.t, P=o.P, M=o.M, search_matches=o.search_matches,
                                    second_pass=o.second_pass)
    torch.save(res, path)
    print(f"{len(res)} forwards of {tree} -> {path}")


def compare(a_path: str, b_path: str, pose_tol: float) -> None:
    import torch

    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    if a.keys() != b.keys():
        raise SystemExit("forward_outputs: the two dumps hold different instances")
    for ck in CHECKPOINTS:
        keys = [k for k in a if k[0] == ck]
        equal, rounding, moved = 0, 0, []
        for k in keys:
            x, y = a[k], b[k]
            if all((x[f] is None and y[f] is None) or torch.equal(x[f], y[f]) for f in x):
                equal += 1
                continue
            d = float((x["R"].double() - y["R"].double()).abs().max())
            same_flag = (x["second_pass"] is None and y["second_pass"] is None) or torch.equal(x["second_pass"],
                                                                                               y["second_pass"])
            if d <= pose_tol and same_flag:
                rounding += 1
            else:
                moved.append(f"{k[1]} (max |dR| {d:.3g})")
        print(f"{ck}: {len(keys)} instances, {equal} bit-equal, {rounding} within rounding (|dR| <= {pose_tol:g}), "
              f"{len(moved)} moved" + ("".join(f"\n  {m}" for m in moved)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]), help="the tree whose bpnp runs")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--pose-tol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.out, Path(args.tree).resolve())
    else:
        compare(args.before, args.after, args.pose_tol)


if __name__ == "__main__":
    main()
