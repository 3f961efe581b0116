r"""Polynomial curve fitting as least squares (lecture 1, "Example: Polynomial Curve Fitting").

Fit :math:`f_a(t) = \sum_{k=0}^{p} a_k t^k` to noisy points :math:`(t_i, y_i)_{i=1..m}`:

.. math::
    a^\star = \arg\min_a \|V a - y\|^2, \qquad V_{ik} = t_i^k \ (\text{Vandermonde}, m \times (p+1)),

solved by the least-squares node :func:`bpnp.nodes.least_squares` (QR). Being a declarative
node, the fit is differentiable in the data: :math:`\partial a^\star/\partial y = V^+ =
(V^\top V)^{-1} V^\top` (the closed form), and in the abscissae :math:`t_i` through
:math:`V(t)` by the node's backward and the chain rule.

Shapes: ``t`` (B, m), ``y`` (B, m) -> ``a`` (B, p + 1), lowest degree first.

Run ``python -m bpnp.experiments.curve_fitting`` (a cubic, 20 points, noise 0.05): it prints the
true and fitted coefficients and checks the fit against ``numpy.polyfit``, the Jacobian
``da/dy`` against ``pinv(V)``, and ``da/dt`` against central finite differences (exit status 1
on a failure); ``--plot PATH`` saves the data and the fitted curve.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from bpnp.experiments._checks import Checks, rel_err
from bpnp.nodes import least_squares


def vandermonde(t: torch.Tensor, degree: int) -> torch.Tensor:
    """(B, m) -> (B, m, degree + 1) with columns ``t^0 .. t^degree``."""
    return torch.stack([t**k for k in range(degree + 1)], dim=-1)


def fit(t: torch.Tensor, y: torch.Tensor, degree: int) -> torch.Tensor:
    """Least-squares polynomial coefficients (B, degree + 1), differentiable in ``t`` and ``y``."""
    return least_squares(vandermonde(t, degree), y)[0]


def make_data(m: int = 20, coeffs=(0.5, -1.0, 0.0, 2.0), noise: float = 0.05, seed: int = 0):
    """``(t (1, m) uniform in [-1, 1], y (1, m), true coefficients (len(coeffs),))``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor(coeffs, dtype=torch.float64)
    t = 2 * torch.rand(1, m, generator=g, dtype=torch.float64) - 1
    y = (vandermonde(t, len(coeffs) - 1) @ a) + noise * torch.randn(1, m, generator=g, dtype=torch.float64)
    return t, y, a


def jacobian_wrt_y(t: torch.Tensor, y: torch.Tensor, degree: int) -> torch.Tensor:
    """``da/dy`` (p + 1, m) of the first item through the node, one backward pass per row."""
    yg = y.detach().clone().requires_grad_(True)
    a = fit(t, yg, degree)
    rows = [torch.autograd.grad(a[0, k], yg, retain_graph=True)[0][0] for k in range(degree + 1)]
    return torch.stack(rows)


def finite_difference_t(t, y, degree, v, eps=1e-6):
    """``(<v, da/dt> by the node (m,), by central differences (m,))`` for the first item."""
    tg = t.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((fit(tg, y, degree) * v).sum(), tg)
    fd = torch.zeros(t.shape[1], dtype=t.dtype)
    with torch.no_grad():
        for i in range(t.shape[1]):
            e = torch.zeros_like(t)
            e[0, i] = eps
            fd[i] = ((fit(t + e, y, degree) - fit(t - e, y, degree)) * v).sum() / (2 * eps)
    return g[0], fd


def plot_fit(t, y, a, a_true, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = torch.linspace(-1, 1, 200, dtype=torch.float64)[None]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(t[0].numpy(), y[0].numpy(), "o", label="data")
    ax.plot(s[0].numpy(), (vandermonde(s, len(a_true) - 1) @ a_true)[0].numpy(), "--", label="true")
    ax.plot(s[0].numpy(), (vandermonde(s, a.shape[1] - 1) @ a[0])[0].numpy(), label="least-squares fit")
    ax.legend()
    ax.set_xlabel("t")
    ax.set_ylabel("y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Checks:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=20, help="number of points")
    ap.add_argument("--degree", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="save the data and the fit to this PNG")
    args = ap.parse_args(argv)
    checks = Checks()
    t, y, a_true = make_data(args.m, noise=args.noise, seed=args.seed)
    a = fit(t, y, args.degree)
    print(f"polynomial fit of degree {args.degree} to {args.m} points "
          f"(true cubic {a_true.tolist()}, noise {args.noise}), float64")
    print(f"  true coefficients   {[round(c, 4) for c in a_true.tolist()]}")
    print(f"  fitted coefficients {[round(c, 4) for c in a[0].tolist()]}")
    ref = torch.from_numpy(np.polyfit(t[0].numpy(), y[0].numpy(), args.degree)[::-1].copy())
    checks.add("fit vs numpy.polyfit, relative difference", rel_err(a[0], ref), 1e-10)
    V = vandermonde(t, args.degree)[0]
    J = jacobian_wrt_y(t, y, args.degree)
    checks.add("da/dy through the node vs pinv(V), relative error", rel_err(J, torch.linalg.pinv(V)), 1e-10)
    v = torch.randn(1, args.degree + 1, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    g, fd = finite_difference_t(t, y, args.degree, v)
    checks.add("v^T da/dt through the node vs central differences, relative error", rel_err(g, fd), 1e-7)
    if args.plot:
        plot_fit(t, y, a, a_true, args.plot)
        print(f"fit saved to {args.plot}")
    print(checks.summary())
    return checks


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
