"""The lecture notes' worked examples and bi-level experiments, each the shortest way into one of
:mod:`bpnp.nodes` (layers import downwards: this package uses ``bpnp.nodes``, torch, numpy and
matplotlib only).

Each module runs as ``python -m bpnp.experiments.<name>`` at a small default size (seconds on a
CPU, float64), prints its checks against closed forms / finite differences as ``[PASS]`` /
``[FAIL]`` lines, and exits with status 1 if one fails; ``main(argv)`` returns the
:class:`~bpnp.experiments._checks.Checks`.

=========================  ====================================================================
module                     what it shows
=========================  ====================================================================
``bilevel_least_squares``  lecture 3: learn ``A`` so that ``argmin_x ||Ax - b||^2`` hits a target;
                           gradient by the least-squares node, by autograd through
                           ``torch.linalg.lstsq``, by autograd through unrolled CGLS
``bilevel_ot``             lecture 3: learn the cost ``M`` so that the entropic OT plan hits a
                           target; implicit backward of the Sinkhorn node vs autograd through
                           log-domain and vector-scaling Sinkhorn
``babylonian``             lecture 2: Babylonian square root, unrolled vs implicit derivative
                           (:class:`~bpnp.nodes.ImplicitNode`)
``circle_projection``      lecture 2: unit circle (Dini) and projection onto the sphere through
                           ``ImplicitNode`` with an equality constraint
``robust_pooling``         lecture 2: average and robust (Huber, pseudo-Huber, Welsch) pooling as
                           declarative nodes
``curve_fitting``          lecture 1: polynomial curve fitting as least squares
=========================  ====================================================================

Profiles of the two bi-level problems (time per iteration and memory against the size):
``python bench/bilevel.py``; results and commands in ``docs/lectures.md``.
"""
