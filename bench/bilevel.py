"""Profiles of the lecture's bi-level experiments (lecture 3, "Profiling", "Results: Running Time /
Memory Usage"): time per upper-level iteration and memory against the problem size, the
implicit backward of the nodes against autograd through the lower-level solver.

    python bench/bilevel.py                       # both problems, about 1 minute on 1 core (67 s niced)
    python bench/bilevel.py --only ls --sizes 8 16 32 --repeats 1 --out /tmp/figs   # a quick look
    python bench/bilevel.py --from-csv            # redraw the plots and tables from the CSVs only

Writes into ``--out`` (default ``docs/figures/``):

- ``bilevel_ls_profile.csv`` / ``.png``: least squares (``bpnp.experiments.bilevel_least_squares``),
  ``A`` of size 2n x n, float64; node (QR + closed-form backward) vs autograd through
  ``torch.linalg.lstsq`` vs autograd through unrolled CGLS (until the relative normal residual is
  <= 1e-12: CG divides by vanishing residuals past convergence, so it cannot run a fixed count);
- ``bilevel_ot_profile.csv`` / ``.png``: optimal transport (``bpnp.experiments.bilevel_ot``),
  m = n, lambda = 10, a random cost in [0, 1], float64, exactly 100 Sinkhorn iterations in every
  method (as ``bench/nodes.py``; they converge to 1e-12 within at most 80 at these sizes and
  further iterations stay at the fixed point): implicit vs autograd through log-domain Sinkhorn
  vs autograd through vector-scaling Sinkhorn;
- ``bilevel_ls_loss.png`` and ``bilevel_ot_plans.png``: the examples' loss curves and plans.

One upper-level iteration = forward (lower-level solve and loss) + backward (``dL/dA`` or
``dL/dM``) + the gradient step. Per size and method the CSV has the solver's iteration count, the
median forward / backward / step time over ``--repeats`` runs (methods alternate so that machine
noise hits all alike), the bytes of the tensors autograd saves for the backward (distinct
storages, the accounting of ``bench/nodes.py``), the peak RSS above the baseline (one fresh
process per method and problem, sizes in increasing order, the peak reset through
``/proc/self/clear_refs`` before each size and glibc's mmap threshold pinned at 64 KiB so that
freed blocks go back to the system; ``peak_rss_mib`` of ``bench/nodes.py``), and the relative
difference of the gradient to the implicit one. Nothing here is a test; the numbers go to
docs/lectures.md with this command.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.nodes import peak_rss_mib  # noqa: E402
from bpnp.experiments import bilevel_least_squares as bls  # noqa: E402
from bpnp.experiments import bilevel_ot as bot  # noqa: E402
from bpnp.experiments._checks import rel_err  # noqa: E402

SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)
OT_LAM, OT_ITERS = 10.0, 100


class SavedTensors:
    """Bytes of the distinct storages autograd saves for the backward inside the context
    (the saved-tensor accounting of ``bench/nodes.py``'s ``ot_run``, as a context manager)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.saved: dict = {}

    def _pack(self, x):
        key = (x.untyped_storage().data_ptr(), x.dtype)
        self.saved[key] = max(self.saved.get(key, 0), x.untyped_storage().nbytes())
        return x

    def __enter__(self):
        if self.enabled:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.saved.values())

    def nbytes_beyond(self, *inputs: torch.Tensor) -> int:
        """Bytes saved that are not the storage of one of ``inputs``: what the backward keeps
        alive that did not exist before the forward (the caller holds its inputs anyway)."""
        skip = {(x.untyped_storage().data_ptr(), x.dtype) for x in inputs}
        return sum(v for k, v in self.saved.items() if k not in skip)


def rss_mib() -> float:
    """Current resident set size of this process (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# The two problems: inputs of one size, and one upper-level iteration
# --------------------------------------------------------------------------------------------
def ls_inputs(n):
    return bls.make_problem(n, seed=0)


def ls_iterations(method, inputs):
    A, b, _ = inputs
    return bls.cgls(A, b)[1] if method in ("unrolled", "node_cg") else 0  # node_cg runs the same CGLS forward


def ls_step(method, inputs, account=True):
    A, b, x_target = inputs
    A = A.clone().requires_grad_(True)
    with SavedTensors(account) as saved:
        t0 = time.perf_counter()
        loss = bls.upper_loss(A, b, x_target, method)
        t1 = time.perf_counter()
    (g,) = torch.autograd.grad(loss, A)
    A_next = A.detach() - (0.25 / A.shape[1]) * g
    t2 = time.perf_counter()
    del A_next
    return t1 - t0, t2 - t1, saved.nbytes, saved.nbytes_beyond(A, b, x_target), g


def ot_inputs(n):
    g = torch.Generator().manual_seed(0)
    M = torch.rand(n, n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        P_target = bot.plan(torch.rand(n, n, generator=g, dtype=torch.float64), "implicit", OT_LAM)
    return M, P_target


def ot_iterations(method, inputs):
    M, _ = inputs
    with torch.no_grad():
        return bot.plan(M, method, OT_LAM, OT_ITERS, -1.0, return_iterations=True)[1]


def ot_step(method, inputs, account=True):
    M, P_target = inputs
    M = M.clone().requires_grad_(True)
    with SavedTensors(account) as saved:
        t0 = time.perf_counter()
        loss = bot.upper_loss(M, P_target, method, OT_LAM, OT_ITERS, -1.0)
        t1 = time.perf_counter()
    (g,) = torch.autograd.grad(loss, M)
    M_next = M.detach() - bot.step_size(2.0, OT_LAM, P_target) * g
    t2 = time.perf_counter()
    del M_next
    return t1 - t0, t2 - t1, saved.nbytes, saved.nbytes_beyond(M, P_target), g


PROBLEMS = {
    "ls": dict(methods=bls.METHODS, implicit=("node", "node_cg"), labels=bls.LABELS, inputs=ls_inputs, step=ls_step, iterations=ls_iterations,
               title="bi-level least squares, A: 2n x n, float64", size="n (A is 2n x n)"),
    "ot": dict(methods=bot.METHODS, implicit=("implicit",), labels=bot.LABELS, inputs=ot_inputs, step=ot_step, iterations=ot_iterations,
               title=f"bi-level optimal transport, lambda = {OT_LAM:g}, {OT_ITERS} Sinkhorn iterations, float64",
               size="m = n"),
}


# --------------------------------------------------------------------------------------------
# Peak RSS: one fresh process per (problem, method)
# --------------------------------------------------------------------------------------------
def rss_worker(problem, method, sizes, threads):
    torch.set_num_threads(threads)
    spec = PROBLEMS[problem]
    spec["step"](method, spec["inputs"](4), account=False)  # lazy initialisation (LAPACK, ...) off the books
    if len(sizes) > 1 and not reset_peak_rss():
        sys.exit(3)
    for n in sizes:
        inputs = spec["inputs"](n)
        gc.collect()
        reset_peak_rss()
        base = rss_mib()
        spec["step"](method, inputs, account=False)
        print(json.dumps({"size": n, "peak_rss_mib": peak_rss_mib(), "base_rss_mib": base}), flush=True)


def measure_rss(problem, method, sizes, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))

    def run(sz):
        cmd = [sys.executable, __file__, "--rss-worker", problem, method, "--threads", str(threads), "--sizes", *map(str, sz)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env)

    out = run(sizes)
    if out.returncode == 3:  # no peak reset here: one fresh process per size instead
        outs = [run([n]) for n in sizes]
        lines = [line for o in outs for line in o.stdout.splitlines()]
    else:
        if out.returncode != 0:
            raise RuntimeError(f"RSS worker failed:\n{out.stderr}")
        lines = out.stdout.splitlines()
    res = {}
    for line in lines:
        if line.startswith("{"):
            d = json.loads(line)
            res[d["size"]] = d["peak_rss_mib"] - d["base_rss_mib"]
    return res


# --------------------------------------------------------------------------------------------
# Profile, CSV, plot
# --------------------------------------------------------------------------------------------
def profile(problem, sizes, repeats, threads, rss=True):
    """Rows of the CSV for one problem; ``rss=False`` skips the fresh-process memory runs."""
    spec = PROBLEMS[problem]
    methods, ref = spec["methods"], spec["methods"][0]
    rows = []
    for n in sizes:
        inputs = spec["inputs"](n)
        res = {k: {"fwd": [], "bwd": [], "step": []} for k in methods}
        saved, kept, grads = {}, {}, {}
        for _ in range(repeats):
            for k in methods:
                f, b, s, s_new, g = spec["step"](k, inputs)
                res[k]["fwd"].append(f)
                res[k]["bwd"].append(b)
                res[k]["step"].append(f + b)
                saved[k], kept[k], grads[k] = s, s_new, g
        for k in methods:
            rows.append({
                "problem": problem, "size": n, "method": k, "solver_iterations": spec["iterations"](k, inputs),
                "forward_s": statistics.median(res[k]["fwd"]), "backward_s": statistics.median(res[k]["bwd"]),
                "step_s": statistics.median(res[k]["step"]), "saved_mib": saved[k] / 2**20,
                "saved_beyond_inputs_mib": kept[k] / 2**20,
                "grad_rel_diff": rel_err(grads[k], grads[ref]),
            })
        print(f"  {problem} size {n}: " + ", ".join(f"{r['method']} {r['step_s']:.4f} s" for r in rows[-len(methods):]), flush=True)
    for k in methods:
        peaks = measure_rss(problem, k, list(sizes), threads) if rss else {}
        for r in rows:
            if r["method"] == k:
                r["peak_rss_above_base_mib"] = peaks.get(r["size"], float("nan"))
    return rows


def write_csv(rows, path):
    fields = ["problem", "size", "method", "solver_iterations", "forward_s", "backward_s", "step_s", "saved_mib",
              "saved_beyond_inputs_mib", "peak_rss_above_base_mib", "grad_rel_diff"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})


def plot(rows, problem, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = PROBLEMS[problem]
    panels = [("step_s", "time per upper-level iteration (s)"), ("saved_mib", "tensors saved for backward (MiB)"),
              ("saved_beyond_inputs_mib", "saved, beyond the inputs (MiB)"),
              ("peak_rss_above_base_mib", "peak RSS above baseline (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for ax, (key, ylabel) in zip(axes, panels):
        for k, marker in zip(spec["methods"], "osd^"):
            pts = [(r["size"], r[key]) for r in rows if r["method"] == k and r[key] == r[key] and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=spec["labels"][k])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(spec["size"])
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(spec["title"], fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_csv(path):
    """Rows written by :func:`write_csv`, numbers parsed back."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in ("problem", "method"):
                r[k] = int(v) if k in ("size", "solver_iterations") else float(v)
    return rows


def markdown(rows, problem):
    spec = PROBLEMS[problem]
    lines = [f"\n## {spec['title']}", "",
             "| size | method | solver iterations | forward s | backward s | step s | saved MiB | saved beyond inputs MiB | peak RSS above base MiB | grad rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['method']} | {r['solver_iterations']} | {r['forward_s']:.4f} | {r['backward_s']:.4f} | "
                     f"{r['step_s']:.4f} | {r['saved_mib']:.3f} | {r['saved_beyond_inputs_mib']:.3f} | "
                     f"{r['peak_rss_above_base_mib']:.1f} | {r['grad_rel_diff']:.1e} |")
    largest = max(r["size"] for r in rows)
    at = {r["method"]: r for r in rows if r["size"] == largest}
    ref = spec["methods"][0]
    lines.append("")

    def ratio(k, i, key):
        return at[k][key] / max(at[i][key], 1e-12)

    for i in spec["implicit"]:
        for k in (k for k in spec["methods"] if k not in spec["implicit"]):
            lines.append(
                f"at size {largest}: {k} / {i}: step time {ratio(k, i, 'step_s'):.2f}x, saved tensors "
                f"{ratio(k, i, 'saved_mib'):.1f}x, beyond the inputs {ratio(k, i, 'saved_beyond_inputs_mib'):.1f}x, "
                f"peak RSS {ratio(k, i, 'peak_rss_above_base_mib'):.1f}x")
    lines.append(f"largest gradient difference to {ref} over all sizes: "
                 + ", ".join(f"{k} {max(r['grad_rel_diff'] for r in rows if r['method'] == k):.1e}" for k in spec["methods"][1:]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(PROBLEMS), action="append")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    ap.add_argument("--no-examples", action="store_true", help="skip the loss-curve and plan figures")
    ap.add_argument("--from-csv", action="store_true",
                    help="measure nothing: redraw the profile plots and tables from the CSVs in --out")
    ap.add_argument("--rss-worker", nargs=2, metavar=("PROBLEM", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_worker:
        rss_worker(*args.rss_worker, sorted(args.sizes), args.threads)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        for problem in args.only or list(PROBLEMS):
            rows = read_csv(out / f"bilevel_{problem}_profile.csv")
            plot(rows, problem, out / f"bilevel_{problem}_profile.png")
            print(markdown(rows, problem))
        return
    t0 = time.perf_counter()
    print(f"# bi-level profiles: torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"sizes {args.sizes}, median of {args.repeats}")
    for problem in args.only or list(PROBLEMS):
        rows = profile(problem, sorted(args.sizes), args.repeats, args.threads)
        write_csv(rows, out / f"bilevel_{problem}_profile.csv")
        plot(rows, problem, out / f"bilevel_{problem}_profile.png")
        print(markdown(rows, problem), flush=True)
    if not args.no_examples:
        print("\n# example figures")
        bls.main(["--n", "32", "--steps", "100", "--plot", str(out / "bilevel_ls_loss.png")])
        bot.main(["--m", "16", "--steps", "300", "--plot", str(out / "bilevel_ot_plans.png")])
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; files in {out}")


if __name__ == "__main__":
    main()
