r"""Bi-level least squares (lecture 3, "Example" and "Profiling"): learn the design matrix.

Upper level over :math:`A \in \mathbb{R}^{m\times n}` (:math:`m = 2n`), lower level the
least-squares node:

.. math::
    \min_A \; L(A) = \tfrac12 \|x^\star(A) - x_\text{target}\|^2, \qquad
    x^\star(A) = \arg\min_x \|A x - b\|^2 = (A^\top A)^{-1} A^\top b .

The lecture's closed form of the gradient, with :math:`v = x^\star - x_\text{target}`,
:math:`w = (A^\top A)^{-1} v` and :math:`r = b - A x^\star`, is

.. math::
    \frac{\mathrm{d}L}{\mathrm{d}A} = r\, w^\top - (A w)\, x^{\star\top} .

Gradient descent :math:`A \leftarrow A - (\eta / n)\, \mathrm{d}L/\mathrm{d}A` is run with the gradient
from one of four routes (``METHODS``):

- ``"node"``: :func:`bpnp.nodes.least_squares` (QR forward, R cached, the closed-form backward
  above; nothing of the solver is differentiated);
- ``"node_cg"``: the same node with ``solver="cg"``: CGLS forward without a graph, ``w`` by
  conjugate gradient in the backward, the same closed form; it keeps two n-vectors, no ``R``;
- ``"lstsq"``: autograd through ``torch.linalg.lstsq``;
- ``"unrolled"``: autograd through :func:`cgls`, conjugate gradient on the normal equations with
  at most ``iters`` iterations (the node's own CGLS, every iteration in the autograd graph): the
  same forward iterations as ``node_cg``, so the two differ only in how the gradient is got.

``b`` is fixed; ``x_target = x*(A_true)`` for another random ``A_true``, so a zero loss is
attainable. Shapes: ``A`` (m, n), ``b`` (m,), ``x`` (n,).

Run ``python -m bpnp.experiments.bilevel_least_squares`` (n = 16, 60 steps, float64, a few
seconds). It prints the four gradients at the initial ``A`` against the closed form (evaluated
independently with the normal equations) and against central finite differences, the loss
curves' largest relative disagreement, and PASS/FAIL per check (exit status 1 on a failure);
``--plot PATH`` saves the four loss curves. ``bench/bilevel.py`` profiles time and memory
against ``n``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bpnp.experiments._checks import Checks, rel_err
from bpnp.nodes import least_squares
from bpnp.nodes.linalg import cgls as linalg_cgls

METHODS = ("node", "node_cg", "lstsq", "unrolled")
LABELS = {
    "node": "node (QR, closed-form backward)",
    "node_cg": "node, matrix-free (CGLS forward, CG backward)",
    "lstsq": "autograd through torch.linalg.lstsq",
    "unrolled": "autograd through unrolled CGLS",
}


def make_problem(n: int, m: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Random instance: ``A0`` (m, n) and ``A_true`` with N(0, 1/m) entries, ``b`` (m,) N(0, 1),
    ``x_target = x*(A_true)`` (n,). ``m`` defaults to ``2 n`` as in the lecture."""
    m = 2 * n if m is None else m
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(m, n, generator=g, dtype=torch.float64) / m**0.5
    A_true = torch.randn(m, n, generator=g, dtype=torch.float64) / m**0.5
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x_target = torch.linalg.lstsq(A_true, b.unsqueeze(-1)).solution.squeeze(-1)
    return A0.to(dtype), b.to(dtype), x_target.to(dtype)


def cgls(A: torch.Tensor, b: torch.Tensor, iters: int = 200, tol: float | None = None) -> tuple[torch.Tensor, int]:
    r"""The unrolled solver: :func:`bpnp.nodes.linalg.cgls` (CGLS, conjugate gradient on the normal
    equations :math:`A^\top A x = A^\top b`) with autograd on, so every iteration is kept in the
    graph; an item stops once its normal residual is ``tol`` (default ``1e-12`` in float64,
    ``1e-6`` in float32) times its initial value, or after ``iters`` iterations.

    Args:
        A: (B, m, n) or (m, n), full column rank; b: (B, m) or (m,).

    Returns:
        ``(x, k)``: (B, n) or (n,) solution and the largest number of iterations an item ran.
    """
    squeeze = A.ndim == 2
    if squeeze:
        A, b = A.unsqueeze(0), b.unsqueeze(0)
    tol = (1e-12 if A.dtype == torch.float64 else 1e-6) if tol is None else tol
    x, iterations, _ = linalg_cgls(A, b, tol=tol, max_iter=iters)
    return (x.squeeze(0) if squeeze else x), int(iterations.max())


def solve(A: torch.Tensor, b: torch.Tensor, method: str, iters: int = 200) -> torch.Tensor:
    """``x*(A)`` (n,) for one (m, n) problem by ``method`` (one of :data:`METHODS`)."""
    if method == "node":
        return least_squares(A.unsqueeze(0), b.unsqueeze(0))[0].squeeze(0)
    if method == "node_cg":
        tol = 1e-12 if A.dtype == torch.float64 else 1e-6  # the unrolled CGLS's tolerance
        return least_squares(A.unsqueeze(0), b.unsqueeze(0), solver="cg", tol=tol, max_iter=iters)[0].squeeze(0)
    if method == "lstsq":
        return torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    if method == "unrolled":
        return cgls(A, b, iters)[0]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def upper_loss(A, b, x_target, method, iters=200):
    """``L(A) = 1/2 ||x*(A) - x_target||^2`` (a 0-dim tensor, differentiable in ``A``)."""
    x = solve(A, b, method, iters)
    return 0.5 * ((x - x_target) ** 2).sum()


def gradient(A, b, x_target, method, iters=200):
    """``(L(A), dL/dA)`` by ``method``; both detached, the gradient (m, n)."""
    A = A.detach().requires_grad_(True)
    loss = upper_loss(A, b, x_target, method, iters)
    (g,) = torch.autograd.grad(loss, A)
    return loss.detach(), g


def closed_form_gradient(A, b, x_target):
    """The lecture's ``dL/dA = r w^T - (A w) x*^T``, evaluated with the normal equations
    (``torch.linalg.solve`` on ``A^T A``), independently of the node's QR."""
    AtA = A.T @ A
    x = torch.linalg.solve(AtA, A.T @ b)
    w = torch.linalg.solve(AtA, x - x_target)
    r = b - A @ x
    return torch.outer(r, w) - torch.outer(A @ w, x)


def descend(A0, b, x_target, method, steps, lr=0.25, iters=200):
    """Gradient descent ``A <- A - (lr / n) dL/dA`` on the upper level (the ``1/n`` keeps one
    ``lr`` stable across sizes; larger steps drive ``A`` towards ill-conditioned matrices where
    the loss stalls). Returns ``(losses (steps + 1,), A_final)``: the loss before each step and
    after the last one."""
    A = A0.clone()
    lr = lr / A.shape[1]
    losses = []
    for _ in range(steps):
        loss, g = gradient(A, b, x_target, method, iters)
        losses.append(float(loss))
        A = A - lr * g
    with torch.no_grad():
        losses.append(float(upper_loss(A, b, x_target, method, iters)))
    return torch.tensor(losses, dtype=torch.float64), A


def finite_difference(A, b, x_target, directions=3, eps=1e-6, seed=0):
    """Central differences of ``L`` along random unit directions ``D``: returns the pairs
    ``(<dL/dA by the node, D>, (L(A + eps D) - L(A - eps D)) / (2 eps))`` stacked (directions, 2)."""
    g = torch.Generator().manual_seed(seed)
    _, grad = gradient(A, b, x_target, "node")
    out = []
    for _ in range(directions):
        D = torch.randn(A.shape, generator=g, dtype=A.dtype)
        D = D / D.norm()
        with torch.no_grad():
            up, down = upper_loss(A + eps * D, b, x_target, "lstsq"), upper_loss(A - eps * D, b, x_target, "lstsq")
            fd = (up - down) / (2 * eps)
        out.append(torch.stack([(grad * D).sum(), fd]))
    return torch.stack(out)


def plot_losses(curves: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = ["-", "--", "-.", ":"]
    for (label, losses), style in zip(curves.items(), styles):
        ax.semilogy(losses.numpy(), style, label=label, linewidth=2)
    ax.set_xlabel("gradient-descent step on the upper level")
    ax.set_ylabel("upper-level loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Checks:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="columns of A (m = 2n rows)")
    ap.add_argument("--steps", type=int, default=60, help="gradient-descent steps on the upper level")
    ap.add_argument("--lr", type=float, default=0.25, help="step size times n")
    ap.add_argument("--iters", type=int, default=200, help="iteration limit of the unrolled CGLS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="save the loss curves to this PNG")
    args = ap.parse_args(argv)
    A0, b, x_target = make_problem(args.n, seed=args.seed)
    m, n = A0.shape
    print(f"bi-level least squares: m = {m}, n = {n}, float64; {args.steps} gradient-descent steps "
          f"of size lr / n = {args.lr} / {n}")
    checks = Checks()

    ref = closed_form_gradient(A0, b, x_target)
    grads = {k: gradient(A0, b, x_target, k, args.iters)[1] for k in METHODS}
    _, used = cgls(A0, b, args.iters)
    print(f"gradient dL/dA at A0 against the closed form r w^T - (A w) x*^T (normal equations); "
          f"the unrolled CGLS ran {used} iterations:")
    for k in METHODS:
        checks.add(f"{LABELS[k]}: relative error", rel_err(grads[k], ref), 1e-6)
    for k in METHODS[1:]:
        checks.add(f"node vs {k}: relative difference", rel_err(grads[k], grads["node"]), 1e-6)
    fd = finite_difference(A0, b, x_target)
    checks.add("directional derivative, node vs central differences (3 directions): max relative error",
               float(((fd[:, 0] - fd[:, 1]).abs() / fd[:, 1].abs()).max()), 1e-6)

    curves = {k: descend(A0, b, x_target, k, args.steps, args.lr, args.iters)[0] for k in METHODS}
    base = curves["node"]
    print(f"loss: initial {float(base[0]):.4e}, after {args.steps} steps {float(base[-1]):.4e} (node)")
    checks.add("loss decreased by a factor", float(base[0] / base[-1]), 10.0, at_least=True)
    for k in METHODS[1:]:
        checks.add(f"loss curve {k} vs node: max relative difference",
                   float(((curves[k] - base).abs() / base.abs()).max()), 1e-6)
    if args.plot:
        plot_losses({LABELS[k]: v for k, v in curves.items()}, args.plot,
                    f"bi-level least squares, m = {m}, n = {n}: the four curves coincide")
        print(f"loss curves saved to {args.plot}")
    print(checks.summary())
    return checks


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
