r"""Equality-constrained declarative nodes through the generic :class:`bpnp.nodes.ImplicitNode`
(lecture 2, "Unit Circle Example" and "Differentiating Equality Constrained Optimisation
Problems").

1. **Unit circle.** For :math:`x \in (-1, 1)` and a branch :math:`s = \pm 1`,

   .. math::
       y(x) = \arg\min_u \; -s\,u \quad \text{subject to} \quad h(x, u) = x^2 + u^2 - 1 = 0,

   i.e. :math:`y = s\sqrt{1 - x^2}`, the point of the circle above (:math:`s = 1`) or below
   (:math:`s = -1`) :math:`x`. The objective is linear, so all curvature comes from the
   constraint (:math:`H = 2\nu`, :math:`\nu = s/(2y) > 0`); the node's KKT backward must give the
   lecture's Dini result :math:`\mathrm{d}y/\mathrm{d}x = -(\partial h/\partial y)^{-1}
   \partial h/\partial x = -x/y`.

2. **Projection onto the unit sphere** in :math:`\mathbb{R}^d` (the circle for :math:`d = 2`),

   .. math::
       y(z) = \arg\min_u \tfrac12 \|u - z\|^2 \quad \text{subject to} \quad \|u\|^2 = 1,
       \qquad y = z / \|z\|,
       \qquad \frac{\mathrm{d}y}{\mathrm{d}z} = \frac{I - y y^\top}{\|z\|}.

Shapes: ``x`` (B,), ``y`` (B,); ``z`` (B, d), ``y`` (B, d).

Run ``python -m bpnp.experiments.circle_projection``: it prints ``dy/dx`` of both branches at a
few ``x`` against ``-x/y``, the projection's vector-Jacobian products against the closed form
for random ``z`` and ``v``, and PASS/FAIL per check (exit status 1 on a failure).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bpnp.experiments._checks import Checks, rel_err
from bpnp.nodes import ImplicitNode


class UnitCircle(ImplicitNode):
    """``y(x) = argmin_u -s u  s.t.  x^2 + u^2 = 1`` (``s = branch``), so ``y = s sqrt(1 - x^2)``.

    Args:
        branch: ``+1`` (upper semicircle) or ``-1`` (lower).
    """

    def __init__(self, branch: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if branch not in (1, -1):
            raise ValueError(f"branch must be +1 or -1, got {branch}")
        self.branch = branch

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch * torch.sqrt(1 - x**2)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.branch * y

    def equality_constraints(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x**2 + y**2 - 1).unsqueeze(-1)


class SphereProjection(ImplicitNode):
    """``y(z) = argmin_u 1/2 ||u - z||^2  s.t.  ||u||^2 = 1``, i.e. ``z / ||z||`` (``z`` (B, d))."""

    def solve(self, z: torch.Tensor) -> torch.Tensor:
        return z / z.norm(dim=-1, keepdim=True)

    def objective(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - z) ** 2).sum(-1)

    def equality_constraints(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y * y).sum(-1, keepdim=True) - 1


def circle_derivative(x: torch.Tensor, branch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, dy/dx)`` (B,) through :class:`UnitCircle` (implicit backward)."""
    xg = x.detach().clone().requires_grad_(True)
    y = UnitCircle(branch)(xg)
    (g,) = torch.autograd.grad(y.sum(), xg)
    return y.detach(), g


def projection_vjp(z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v^T dy/dz by the node, by the closed form (I - y y^T) v / ||z||)``, each (B, d)."""
    zg = z.detach().clone().requires_grad_(True)
    y = SphereProjection()(zg)
    (g,) = torch.autograd.grad((y * v).sum(), zg)
    yd = y.detach()
    closed = (v - (yd * v).sum(-1, keepdim=True) * yd) / z.norm(dim=-1, keepdim=True)
    return g, closed


def main(argv: list[str] | None = None) -> Checks:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=3, help="dimension of the sphere projection")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    checks = Checks()
    x = torch.tensor([-0.9, -0.5, 0.0, 0.3, 0.8], dtype=torch.float64)
    print("unit circle y(x) = argmin_u -s u s.t. x^2 + u^2 = 1 (ImplicitNode with one equality constraint), float64")
    print(f"{'branch':>6} {'x':>6} {'y':>10} {'node dy/dx':>12} {'-x/y':>12}")
    worst = 0.0
    for s in (1, -1):
        y, g = circle_derivative(x, s)
        ref = -x / y
        for xi, yi, gi, ri in zip(x.tolist(), y.tolist(), g.tolist(), ref.tolist()):
            print(f"{s:>6} {xi:>6.2f} {yi:>10.6f} {gi:>12.8f} {ri:>12.8f}")
        worst = max(worst, float(((g - ref).abs() / ref.abs().clamp_min(1.0)).max()))
    checks.add("unit circle: max error of dy/dx against -x/y (relative, floor 1)", worst, 1e-10)

    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(6, args.d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(6, args.d, generator=g, dtype=torch.float64)
    node, closed = projection_vjp(z, v)
    print(f"projection onto the unit sphere in R^{args.d}: 6 random z, v")
    checks.add("sphere projection: v^T dy/dz, node vs (I - y y^T) v / ||z||, relative error",
               rel_err(node, closed), 1e-10)
    zc = torch.randn(6, 2, generator=g, dtype=torch.float64)
    node2, closed2 = projection_vjp(zc, torch.randn(6, 2, generator=g, dtype=torch.float64))
    checks.add("circle projection (d = 2): same check", rel_err(node2, closed2), 1e-10)
    print(checks.summary())
    return checks


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")  # torch's forward-AD import
    sys.exit(0 if main().ok else 1)
