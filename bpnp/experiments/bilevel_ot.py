r"""Bi-level optimal transport (lecture 3, "Experiment", "Results: Running Time / Memory Usage").

Upper level over the cost :math:`M \in \mathbb{R}^{m\times n}`, lower level the entropic OT node
(:func:`bpnp.nodes.sinkhorn`, inverse temperature :math:`\lambda`):

.. math::
    \min_M \tfrac12 \|P^\star(M) - P_\text{target}\|_F^2, \qquad
    P^\star(M) = \arg\min_{P \ge 0,\ P\mathbf 1 = r,\ P^\top\mathbf 1 = c}
        \langle M, P\rangle + \tfrac1\lambda \langle P, \log P - 1\rangle,

with uniform marginals :math:`r = \mathbf 1/m`, :math:`c = \mathbf 1/n` (the lecture's
:math:`\langle P, \log P\rangle` has the same minimiser under the mass constraint).
:math:`P_\text{target} = P^\star(M_\text{true})` for another random cost, so a zero loss is
attainable (:math:`M` itself is only identifiable up to :math:`M + a\mathbf 1^\top + \mathbf 1 b^\top`).

The gradient :math:`\mathrm{d}L/\mathrm{d}M` comes from one of (``METHODS``):

- ``"implicit"``: the node's implicit backward (Schur complement of the lecture's
  :math:`\Lambda` block, one Cholesky solve; nothing of the iterations is kept);
- ``"unrolled_log"``: autograd through :func:`sinkhorn_log`, our log-domain Sinkhorn (the stable
  form deep-learning code uses, e.g. SuperGlue): every iteration keeps (m, n) tensors;
- ``"unrolled_scaling"``: autograd through :func:`sinkhorn_scaling`, the lecture's algorithm slide
  (:math:`\alpha \leftarrow r \oslash K\beta`, :math:`\beta \leftarrow c \oslash K^\top\alpha`):
  every iteration keeps only vectors, so unrolling it costs little memory.

All three stop on the node's rule: L1 row-marginal error (relative to the mass) <= ``tol``.
Gradient descent :math:`M \leftarrow M - \eta\, \mathrm{d}L/\mathrm{d}M` with
:math:`\eta = \mathrm{lr} / (\lambda \max P_\text{target})^2`: since
:math:`\mathrm{d}P/\mathrm{d}M = O(\lambda P)`, the upper loss's curvature is
:math:`O((\lambda \max P)^2)` and one ``lr`` works across sizes. ``M0`` is small (near the
uniform plan): an entry of :math:`P` far below its target has a gradient proportional to itself
and recovers only slowly. Shapes: ``M`` (m, n), ``P`` (m, n).

Run ``python -m bpnp.experiments.bilevel_ot`` (m = n = 8, 100 steps, float64, seconds). It prints
the three gradients at the initial ``M`` against each other and against central finite
differences, the loss curves' largest relative disagreement, the learned plan's distance to the
target, PASS/FAIL per check (exit status 1 on a failure); ``--plot PATH`` saves the initial,
learned and target plans with the loss curves. ``bench/bilevel.py`` profiles time and memory
against ``m = n``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bpnp.experiments._checks import Checks, rel_err
from bpnp.nodes import sinkhorn, uniform_marginals

METHODS = ("implicit", "unrolled_log", "unrolled_scaling")
LABELS = {
    "implicit": "implicit backward (node)",
    "unrolled_log": "autograd through log-domain Sinkhorn",
    "unrolled_scaling": "autograd through vector-scaling Sinkhorn",
}


def marginals(m: int, n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform ``r`` (m,) = 1/m and ``c`` (n,) = 1/n, from the node's :func:`uniform_marginals`."""
    r, c = uniform_marginals(torch.ones(1, m, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), dtype)
    return r[0], c[0]


def make_problem(m: int, n: int | None = None, lam: float = 10.0, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Random instance: ``M0`` (m, n) uniform in [0, 0.1] (a near-uniform plan), ``M_true``
    uniform in [0, 1], ``P_target = P*(M_true)``."""
    n = m if n is None else n
    g = torch.Generator().manual_seed(seed)
    M0 = (0.1 * torch.rand(m, n, generator=g, dtype=torch.float64)).to(dtype)
    M_true = torch.rand(m, n, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        P_target = plan(M_true, "implicit", lam)
    return M0, P_target


def sinkhorn_log(M, r, c, lam=10.0, max_iter=1000, tol=1e-12):
    r"""Log-domain Sinkhorn in differentiable torch ops (the unrolled contender), one problem.

    Potentials :math:`f` (m,), :math:`g` (n,) with :math:`P = \exp(f_i - \lambda M_{ij} + g_j)`;
    alternately :math:`f \leftarrow \log r - \mathrm{lse}_j(-\lambda M + g)`,
    :math:`g \leftarrow \log c - \mathrm{lse}_i(-\lambda M + f)`. After each ``g`` update the
    columns are exact, and the next ``f`` update reveals the row sums for free,
    :math:`P\mathbf 1 = r \odot e^{f - f_\text{new}}`; stop when their L1 error (relative to the
    mass) is <= ``tol`` or after ``max_iter`` iterations.

    Returns ``(P (m, n), iterations)``.
    """
    logK = -lam * M
    log_r, log_c = torch.log(r), torch.log(c)
    mass = r.sum()
    f = torch.zeros_like(r)
    g = log_c - torch.logsumexp(logK + f[:, None], dim=0)
    k = 0
    while k < max_iter:
        f_new = log_r - torch.logsumexp(logK + g[None, :], dim=1)
        if float((r * (torch.exp(f - f_new) - 1).abs()).sum().detach() / mass) <= tol:
            break
        f = f_new
        g = log_c - torch.logsumexp(logK + f[:, None], dim=0)
        k += 1
    return torch.exp(f[:, None] + logK + g[None, :]), k


def sinkhorn_scaling(M, r, c, lam=10.0, max_iter=1000, tol=1e-12):
    r"""The lecture's Sinkhorn (linear domain, vector scaling) in differentiable torch ops.

    :math:`K = e^{-\lambda M}`, :math:`\alpha \leftarrow r \oslash K\beta`,
    :math:`\beta \leftarrow c \oslash K^\top\alpha`, :math:`P = \mathrm{diag}(\alpha)\,K\,
    \mathrm{diag}(\beta)`; same stopping rule as :func:`sinkhorn_log`. Safe for
    :math:`\lambda\,(\max M - \min M)` up to a few hundred in float64 (``K`` must not underflow).

    Returns ``(P (m, n), iterations)``.
    """
    K = torch.exp(-lam * M)
    mass = r.sum()
    alpha = torch.ones_like(r)
    beta = c / (K.T @ alpha)
    k = 0
    while k < max_iter:
        Kb = K @ beta
        if float((alpha * Kb - r).abs().sum().detach() / mass) <= tol:
            break
        alpha = r / Kb
        beta = c / (K.T @ alpha)
        k += 1
    return alpha[:, None] * K * beta[None, :], k


def plan(M, method, lam=10.0, max_iter=1000, tol=1e-12, return_iterations=False):
    """``P*(M)`` (m, n) for one (m, n) cost by ``method`` (one of :data:`METHODS`)."""
    m, n = M.shape
    r, c = marginals(m, n, M.dtype)
    if method == "implicit":
        P, info = sinkhorn(M.unsqueeze(0), r.unsqueeze(0), c.unsqueeze(0), lam, max_iter, tol, backward="implicit")
        P, k = P.squeeze(0), int(info.iterations[0])
    elif method == "unrolled_log":
        P, k = sinkhorn_log(M, r, c, lam, max_iter, tol)
    elif method == "unrolled_scaling":
        P, k = sinkhorn_scaling(M, r, c, lam, max_iter, tol)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return (P, k) if return_iterations else P


def upper_loss(M, P_target, method, lam=10.0, max_iter=1000, tol=1e-12):
    """``1/2 ||P*(M) - P_target||_F^2`` (0-dim, differentiable in ``M``)."""
    return 0.5 * ((plan(M, method, lam, max_iter, tol) - P_target) ** 2).sum()


def gradient(M, P_target, method, lam=10.0, max_iter=1000, tol=1e-12):
    """``(L(M), dL/dM)`` by ``method``, both detached; the gradient (m, n)."""
    M = M.detach().requires_grad_(True)
    loss = upper_loss(M, P_target, method, lam, max_iter, tol)
    (g,) = torch.autograd.grad(loss, M)
    return loss.detach(), g


def step_size(lr: float, lam: float, P_target: torch.Tensor) -> float:
    """Gradient-descent step ``lr / (lam max P_target)^2`` (see the module docstring)."""
    return lr / (lam * float(P_target.max())) ** 2


def descend(M0, P_target, method, steps, lr=2.0, lam=10.0, max_iter=1000, tol=1e-12):
    """Gradient descent on ``M``. Returns ``(losses (steps + 1,), M_final)``."""
    M = M0.clone()
    eta = step_size(lr, lam, P_target)
    losses = []
    for _ in range(steps):
        loss, g = gradient(M, P_target, method, lam, max_iter, tol)
        losses.append(float(loss))
        M = M - eta * g
    with torch.no_grad():
        losses.append(float(upper_loss(M, P_target, method, lam, max_iter, tol)))
    return torch.tensor(losses, dtype=torch.float64), M


def finite_difference(M, P_target, lam=10.0, directions=3, eps=1e-6, seed=0):
    """Central differences of the loss along random unit directions: (directions, 2) pairs
    ``(<dL/dM by the node, D>, (L(M + eps D) - L(M - eps D)) / (2 eps))``."""
    g = torch.Generator().manual_seed(seed)
    _, grad = gradient(M, P_target, "implicit", lam)
    out = []
    for _ in range(directions):
        D = torch.randn(M.shape, generator=g, dtype=M.dtype)
        D = D / D.norm()
        with torch.no_grad():
            up = upper_loss(M + eps * D, P_target, "implicit", lam)
            down = upper_loss(M - eps * D, P_target, "implicit", lam)
            fd = (up - down) / (2 * eps)
        out.append(torch.stack([(grad * D).sum(), fd]))
    return torch.stack(out)


def plot_plans(P0, P_learned, P_target, curves: dict, path: str, title: str) -> None:
    """Three heat maps (initial, learned, target plan) and the loss curves, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1.4]})
    vmax = float(max(P0.max(), P_learned.max(), P_target.max()))
    for ax, P, name in zip(axes[:3], (P0, P_learned, P_target), ("P*(M0), initial", "P*(M), learned", "P_target")):
        im = ax.imshow(P.numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[:3].tolist(), shrink=0.8)
    ax = axes[3]
    for (label, losses), style in zip(curves.items(), ["-", "--", ":"]):
        ax.semilogy(losses.numpy(), style, label=label, linewidth=2)
    ax.set_xlabel("gradient-descent step on M")
    ax.set_ylabel("1/2 ||P - P_target||^2")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> Checks:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=8, help="rows = columns of M")
    ap.add_argument("--lam", type=float, default=10.0, help="inverse temperature lambda")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2.0, help="step size in units of 1 / (lambda max P_target)^2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="save the plans and loss curves to this PNG")
    args = ap.parse_args(argv)
    M0, P_target = make_problem(args.m, lam=args.lam, seed=args.seed)
    m, n = M0.shape
    print(f"bi-level optimal transport: m = n = {m}, lambda = {args.lam}, float64; {args.steps} gradient-descent "
          f"steps of size lr / (lambda max P_target)^2 = {step_size(args.lr, args.lam, P_target):.4g}")
    checks = Checks()
    grads = {k: gradient(M0, P_target, k, args.lam)[1] for k in METHODS}
    iters = {k: plan(M0, k, args.lam, return_iterations=True)[1] for k in METHODS}
    print("gradient dL/dM at M0 (Sinkhorn iterations to tol 1e-12: "
          + ", ".join(f"{k} {v}" for k, v in iters.items()) + "):")
    for k in ("unrolled_log", "unrolled_scaling"):
        checks.add(f"implicit vs {k}: relative difference", rel_err(grads[k], grads["implicit"]), 1e-6)
    fd = finite_difference(M0, P_target, args.lam)
    checks.add("directional derivative, implicit vs central differences (3 directions): max relative error",
               float(((fd[:, 0] - fd[:, 1]).abs() / fd[:, 1].abs()).max()), 1e-6)
    row_sum = grads["implicit"].sum(1).abs().max() / grads["implicit"].abs().max()
    checks.add("dL/dM has zero row sums (adding a constant to a row of M leaves P unchanged)", float(row_sum), 1e-8)

    runs = {k: descend(M0, P_target, k, args.steps, args.lr, args.lam) for k in METHODS}
    base = runs["implicit"][0]
    print(f"loss: initial {float(base[0]):.4e}, after {args.steps} steps {float(base[-1]):.4e} (implicit)")
    checks.add("loss decreased by a factor", float(base[0] / base[-1]), 10.0, at_least=True)
    for k in ("unrolled_log", "unrolled_scaling"):
        checks.add(f"loss curve {k} vs implicit: max relative difference",
                   float(((runs[k][0] - base).abs() / base.abs()).max()), 1e-6)
    with torch.no_grad():
        P0 = plan(M0, "implicit", args.lam)
        P1 = plan(runs["implicit"][1], "implicit", args.lam)
    e0, e1 = rel_err(P0, P_target), rel_err(P1, P_target)
    print(f"||P - P_target|| / ||P_target||: initial {e0:.3e}, learned {e1:.3e}")
    checks.add("learned plan closer to the target by a factor", e0 / e1, 3.0, at_least=True)
    if args.plot:
        plot_plans(P0, P1, P_target, {LABELS[k]: v[0] for k, v in runs.items()}, args.plot,
                   f"bi-level OT, m = n = {m}, lambda = {args.lam}: relative plan error {e0:.2f} -> {e1:.1e}")
        print(f"plans and loss curves saved to {args.plot}")
    print(checks.summary())
    return checks


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
