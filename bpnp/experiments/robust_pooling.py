r"""Average and robust pooling as declarative nodes (lecture 2, "Average Pooling Example").

Pooling :math:`n` feature vectors :math:`x_i \in \mathbb{R}^d` into one,

.. math::
    y = \arg\min_u \sum_{i=1}^n \sum_{k=1}^d \phi(u_k - x_{ik}),

with a penalty :math:`\phi` (scale :math:`\alpha`, all :math:`\approx z^2/2` near 0):

=================  ==================================================  ==============================
name               :math:`\phi(z)`                                     :math:`\phi''(z)`
=================  ==================================================  ==============================
``quadratic``      :math:`z^2/2` (average pooling, :math:`y` = mean)    1
``huber``          :math:`z^2/2` if :math:`|z|\le\alpha` else           1 if :math:`|z| \le \alpha` else 0
                   :math:`\alpha(|z| - \alpha/2)`
``pseudo_huber``   :math:`\alpha^2(\sqrt{1 + (z/\alpha)^2} - 1)`        :math:`(1 + (z/\alpha)^2)^{-3/2}`
``welsch``         :math:`\tfrac{\alpha^2}{2}(1 - e^{-(z/\alpha)^2})`   :math:`(1 - 2z^2/\alpha^2)\,e^{-(z/\alpha)^2}`
=================  ==================================================  ==============================

The problem separates over coordinates, so the implicit function theorem gives the closed form

.. math::
    \frac{\partial y_k}{\partial x_{ik}} = \frac{\phi''(y_k - x_{ik})}{\sum_j \phi''(y_k - x_{jk})},

(:math:`1/n` for average pooling): a point's influence is its share of the curvature, zero for
a Huber outlier, nearly zero for a Welsch one. :class:`RobustPool` is a
:class:`bpnp.nodes.ImplicitNode` whose forward is iteratively reweighted least squares from the
coordinate-wise median (a local minimum for the non-convex Welsch penalty) and whose backward is
the node's generic one; this module checks it against the closed form.

Shapes: ``x`` (B, n, d) -> ``y`` (B, d).

Run ``python -m bpnp.experiments.robust_pooling``: ten points near 0 and one outlier at 10
(d = 2), pooled by each penalty; printed are the pooled values, the outlier's influence
:math:`\partial y_1/\partial x_{\text{outlier},1}`, and checks of the node's gradient against the
closed form and of average pooling against the mean (exit status 1 on a failure).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bpnp.experiments._checks import Checks, rel_err
from bpnp.nodes import ImplicitNode

PENALTIES = ("quadratic", "huber", "pseudo_huber", "welsch")


def phi(z: torch.Tensor, name: str, alpha: float) -> torch.Tensor:
    """The penalty, elementwise."""
    if name == "quadratic":
        return 0.5 * z**2
    if name == "huber":
        a = z.abs()
        return torch.where(a <= alpha, 0.5 * z**2, alpha * (a - 0.5 * alpha))
    if name == "pseudo_huber":
        return alpha**2 * (torch.sqrt(1 + (z / alpha) ** 2) - 1)
    if name == "welsch":
        return 0.5 * alpha**2 * (1 - torch.exp(-((z / alpha) ** 2)))
    raise ValueError(f"penalty must be one of {PENALTIES}, got {name!r}")


def irls_weight(z: torch.Tensor, name: str, alpha: float) -> torch.Tensor:
    """``phi'(z) / z``, the weight of iteratively reweighted least squares."""
    if name == "quadratic":
        return torch.ones_like(z)
    if name == "huber":
        return torch.clamp(alpha / z.abs().clamp_min(torch.finfo(z.dtype).tiny), max=1.0)
    if name == "pseudo_huber":
        return 1 / torch.sqrt(1 + (z / alpha) ** 2)
    return torch.exp(-((z / alpha) ** 2))


def phi_second(z: torch.Tensor, name: str, alpha: float) -> torch.Tensor:
    """``phi''(z)``, for the closed-form gradient."""
    if name == "quadratic":
        return torch.ones_like(z)
    if name == "huber":
        return (z.abs() <= alpha).to(z.dtype)
    if name == "pseudo_huber":
        return (1 + (z / alpha) ** 2) ** -1.5
    e = (z / alpha) ** 2
    return (1 - 2 * e) * torch.exp(-e)


class RobustPool(ImplicitNode):
    """``y = argmin_u sum_ik phi(u_k - x_ik)``: (B, n, d) -> (B, d), implicit backward.

    Args:
        penalty: one of :data:`PENALTIES`.
        alpha: scale of the penalty (> 0).
        max_iter, tol: IRLS limit and the stopping threshold on ``max |y_new - y|``.
    """

    def __init__(self, penalty: str = "huber", alpha: float = 1.0, max_iter: int = 500, tol: float = 1e-14, **kwargs):
        super().__init__(**kwargs)
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.penalty, self.alpha, self.max_iter, self.tol = penalty, float(alpha), max_iter, tol

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        if self.penalty == "quadratic":
            return x.mean(1)
        y = x.median(1).values
        for _ in range(self.max_iter):
            w = irls_weight(y[:, None, :] - x, self.penalty, self.alpha)
            y_new = (w * x).sum(1) / w.sum(1)
            done = float((y_new - y).abs().max()) <= self.tol * (1 + float(y.abs().max()))
            y = y_new
            if done:
                break
        return y

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return phi(y[:, None, :] - x, self.penalty, self.alpha).sum((1, 2))


def closed_form_vjp(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, penalty: str, alpha: float) -> torch.Tensor:
    """``v^T dy/dx`` (B, n, d) from ``dy_k/dx_ik = phi''_ik / sum_j phi''_jk``."""
    h = phi_second(y[:, None, :] - x, penalty, alpha)
    return v[:, None, :] * h / h.sum(1, keepdim=True)


def node_vjp(x: torch.Tensor, v: torch.Tensor, penalty: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, v^T dy/dx)`` through :class:`RobustPool`."""
    xg = x.detach().clone().requires_grad_(True)
    y = RobustPool(penalty, alpha)(xg)
    (g,) = torch.autograd.grad((y * v).sum(), xg)
    return y.detach(), g


def example_points(n_inliers: int = 10, d: int = 2, outlier: float = 10.0, seed: int = 0) -> torch.Tensor:
    """(1, n_inliers + 1, d): standard normal inliers scaled by 0.5, then one point at ``outlier``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(1, n_inliers + 1, d, generator=g, dtype=torch.float64)
    x[0, -1] = outlier
    return x


def main(argv: list[str] | None = None) -> Checks:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--outlier", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    checks = Checks()
    x = example_points(outlier=args.outlier, seed=args.seed)
    n = x.shape[1]
    print(f"pooling {n} points in R^2 (10 inliers ~ N(0, 0.25), one outlier at {args.outlier}), "
          f"alpha = {args.alpha}, float64")
    print(f"{'penalty':>13} {'y':>24} {'outlier influence dy1/dx_out,1':>32} {'max |dL/dx node - closed form|':>32}")
    g = torch.Generator().manual_seed(args.seed + 1)
    v = torch.randn(1, 2, generator=g, dtype=torch.float64)
    errs = {}
    for name in PENALTIES:
        y, gx = node_vjp(x, v, name, args.alpha)
        ref = closed_form_vjp(x, y, v, name, args.alpha)
        errs[name] = rel_err(gx, ref)
        infl = float(closed_form_vjp(x, y, torch.tensor([[1.0, 0.0]], dtype=torch.float64), name, args.alpha)[0, -1, 0])
        y_str = "[" + ", ".join(f"{t:+.5f}" for t in y[0].tolist()) + "]"
        print(f"{name:>13} {y_str:>24} {infl:>32.3e} {float((gx - ref).abs().max()):>32.3e}")
    for name in PENALTIES:
        checks.add(f"{name}: node gradient vs closed form, relative error", errs[name], 1e-8)
    xg = x.clone().requires_grad_(True)
    (g_mean,) = torch.autograd.grad((xg.mean(1) * v).sum(), xg)
    y_avg, g_avg = node_vjp(x, v, "quadratic", args.alpha)
    checks.add("average pooling: y equals the mean", rel_err(y_avg, x.mean(1)), 1e-14)
    checks.add("average pooling: node gradient equals that of torch.mean (1/n)", rel_err(g_avg, g_mean), 1e-12)
    y_h, _ = node_vjp(x, v, "huber", args.alpha)
    y_w, _ = node_vjp(x, v, "welsch", args.alpha)
    inl = x[:, :-1].mean(1)
    checks.add("robust pooling is closer to the inlier mean than average pooling (Huber, ratio of distances)",
               float((y_h - inl).norm() / (y_avg - inl).norm()), 0.5)
    checks.add("Welsch ignores the outlier: |y - inlier mean| / |mean - inlier mean|",
               float((y_w - inl).norm() / (y_avg - inl).norm()), 0.1)
    print(checks.summary())
    return checks


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")  # torch's forward-AD import
    sys.exit(0 if main().ok else 1)
