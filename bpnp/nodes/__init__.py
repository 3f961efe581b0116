"""Declarative nodes: layers defined by an optimisation problem, differentiated implicitly.

Pure PyTorch (no Lightning, no Hydra); usable by someone who has never heard of blind PnP.

- :class:`ImplicitNode` / :func:`implicit_vjp`: generic node (objective, optional equality
  constraints) with an implicit-function-theorem backward.
- :func:`least_squares`: batched weighted / ridge least squares, by QR or matrix-free (CGLS).
- :func:`sinkhorn` / :class:`SinkhornOT`: entropic optimal transport, log domain;
  :func:`sinkhorn_with_bins` / :class:`SinkhornOTWithBins` / :func:`split_bins`: the same with
  outlier bins (dustbins) and a learnable bin cost.
- :class:`PnPRefine`: robust weighted angular pose refinement on SO(3) x R^3.
"""

from bpnp.nodes.implicit import ImplicitNode, dense_hessian, implicit_vjp
from bpnp.nodes.least_squares import LeastSquares, least_squares
from bpnp.nodes.pnp import PnPRefine, PnPResult, pnp_objective, so3_exp
from bpnp.nodes.robust import KERNELS, RobustKernel
from bpnp.nodes.sinkhorn import (
    BinSplit, SinkhornInfo, SinkhornOT, SinkhornOTWithBins, bin_marginals, sinkhorn, sinkhorn_with_bins, split_bins,
    uniform_marginals,
)
from bpnp.nodes.status import Status, status_counts

__all__ = [
    "ImplicitNode", "dense_hessian", "implicit_vjp", "LeastSquares", "least_squares", "PnPRefine",
    "PnPResult", "pnp_objective", "so3_exp", "KERNELS", "RobustKernel", "SinkhornInfo", "SinkhornOT",
    "sinkhorn", "uniform_marginals", "BinSplit", "SinkhornOTWithBins", "bin_marginals", "sinkhorn_with_bins",
    "split_bins", "Status", "status_counts",
]
