"""Declarative nodes: layers defined by an optimisation problem, differentiated implicitly.

Pure PyTorch (no Lightning, no Hydra); usable by someone who has never heard of blind PnP.
"""

from bpnp.nodes.implicit import ImplicitNode, dense_hessian, implicit_vjp
from bpnp.nodes.status import Status, status_counts

__all__ = ["ImplicitNode", "Status", "dense_hessian", "implicit_vjp", "status_counts"]
