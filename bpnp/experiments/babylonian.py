r"""The Babylonian square root (lecture 2, "Toy Example: Babylonian Algorithm"), differentiated
by unrolling and implicitly.

Forward (the lecture's ``FwdFcn``): :math:`y_0 = x/2`,
:math:`y_t = \tfrac12 (y_{t-1} + x / y_{t-1})` for :math:`t = 1..T`, so :math:`y_T \to \sqrt x`.

- **Unrolled**: autograd through the :math:`T` iterations; this is the lecture's ``BckFcn``,
  also written out by hand in :func:`unrolled_backward`. It is the derivative of the
  :math:`T`-th iterate, which is :math:`1/(2\sqrt x)` only once the iteration has converged.
- **Implicit**: :math:`\sqrt x` is the minimiser over :math:`y > 0` of
  :math:`f(x, y) = y^3/3 - x y` (stationary exactly where :math:`y^2 = x`, with
  :math:`\partial^2 f/\partial y^2 = 2y > 0`), so the generic
  :class:`bpnp.nodes.ImplicitNode` gives
  :math:`\mathrm{d}y/\mathrm{d}x = -(\partial^2 f/\partial y^2)^{-1}\, \partial^2 f/\partial x \partial y
  = -(2y)^{-1}(-1) = 1/(2y)`, evaluated at the solution the forward returned.

Closed form: :math:`\mathrm{d}\sqrt x/\mathrm{d}x = 1/(2\sqrt x)`. Shapes: ``x`` (B,) positive,
``y`` (B,).

Run ``python -m bpnp.experiments.babylonian``: it prints, for ``x = 2`` and ``T = 0..6``, the
iterate and both derivatives against the closed form (the unrolled one lags until the iteration
has converged; the implicit one is exact for the iterate it is given), then checks on a grid of
``x`` in [0.01, 100] at ``T = 12`` that unrolled, implicit, the hand-written ``BckFcn`` and the
closed form agree to 1e-12, and exits with status 1 on a failed check.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bpnp.experiments._checks import Checks
from bpnp.nodes import ImplicitNode


def babylonian(x: torch.Tensor, T: int) -> torch.Tensor:
    """``y_T`` of the Babylonian iteration from ``y_0 = x / 2`` (differentiable torch ops)."""
    y = 0.5 * x
    for _ in range(T):
        y = 0.5 * (y + x / y)
    return y


def unrolled_backward(x: torch.Tensor, T: int, dL_dyT: torch.Tensor) -> torch.Tensor:
    """The lecture's ``BckFcn``: reverse-mode derivative of :func:`babylonian`, written out.

    Replays the forward to keep ``y_0 .. y_{T-1}`` (what autograd stores), then
    ``dL/dx += dL/dy_t * 1/(2 y_{t-1})`` and ``dL/dy_{t-1} = dL/dy_t * (1/2 - x/(2 y_{t-1}^2))``
    for ``t = T..1``, and finally ``dL/dx += dL/dy_0 * 1/2``.
    """
    ys = [0.5 * x]
    for _ in range(T):
        ys.append(0.5 * (ys[-1] + x / ys[-1]))
    dx = torch.zeros_like(x)
    dy = dL_dyT
    for t in range(T, 0, -1):
        y_prev = ys[t - 1]
        dx = dx + dy / (2 * y_prev)
        dy = dy * (0.5 - x / (2 * y_prev**2))
    return dx + 0.5 * dy


class BabylonianSqrt(ImplicitNode):
    r"""``y = sqrt(x)`` as a declarative node: ``argmin_{y > 0} y^3/3 - x y``, solved by ``T``
    Babylonian iterations; ``backward="implicit"`` (default) or ``"unrolled"``.

    Args:
        T: number of iterations of the forward solver.
    """

    def __init__(self, T: int = 12, **kwargs) -> None:
        super().__init__(**kwargs)
        self.T = T

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        return babylonian(x, self.T)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y**3 / 3 - x * y


def derivatives(x: torch.Tensor, T: int) -> dict[str, torch.Tensor]:
    """``y_T`` and ``dy_T/dx`` (B,) by unrolling, implicitly, by the hand-written ``BckFcn``,
    and the closed form ``1 / (2 sqrt(x))``."""
    out = {}
    for mode in ("unrolled", "implicit"):
        xg = x.detach().clone().requires_grad_(True)
        y = BabylonianSqrt(T, backward=mode)(xg)
        (out[mode],) = torch.autograd.grad(y.sum(), xg)
        out["y"] = y.detach()
    out["bckfcn"] = unrolled_backward(x, T, torch.ones_like(x))
    out["closed_form"] = 0.5 / torch.sqrt(x)
    return out


def main(argv: list[str] | None = None) -> Checks:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--x", type=float, default=2.0, help="input of the table")
    ap.add_argument("--T", type=int, default=12, help="iterations for the converged checks")
    args = ap.parse_args(argv)
    x = torch.tensor([args.x], dtype=torch.float64)
    exact = float(torch.sqrt(x))
    print(f"Babylonian square root of x = {args.x} (sqrt = {exact:.15f}, d sqrt/dx = {0.5 / exact:.15f}), float64")
    print(f"{'T':>3} {'y_T':>20} {'unrolled dy/dx':>20} {'implicit 1/(2 y_T)':>20} "
          f"{'|unrolled - exact|':>19} {'|implicit - exact|':>19}")
    for T in range(7):
        d = derivatives(x, T)
        print(f"{T:>3} {float(d['y']):>20.15f} {float(d['unrolled']):>20.15f} {float(d['implicit']):>20.15f} "
              f"{abs(float(d['unrolled']) - 0.5 / exact):>19.3e} {abs(float(d['implicit']) - 0.5 / exact):>19.3e}")
    checks = Checks()
    grid = torch.logspace(-2, 2, 41, dtype=torch.float64)
    d = derivatives(grid, args.T)
    print(f"x on 41 points in [0.01, 100], T = {args.T}:")
    checks.add("max |y_T - sqrt(x)| / sqrt(x)", float(((d["y"] - grid.sqrt()).abs() / grid.sqrt()).max()), 1e-14)
    for k in ("unrolled", "implicit", "bckfcn"):
        checks.add(f"{k}: max relative error against 1/(2 sqrt(x))",
                   float(((d[k] - d["closed_form"]).abs() / d["closed_form"]).max()), 1e-12)
    d3 = derivatives(grid, 3)
    checks.add("hand-written BckFcn equals autograd's unrolled derivative at T = 3 (not converged)",
               float(((d3["bckfcn"] - d3["unrolled"]).abs() / d3["unrolled"].abs()).max()), 1e-14)
    print(checks.summary())
    return checks


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")  # torch's forward-AD import
    sys.exit(0 if main().ok else 1)
