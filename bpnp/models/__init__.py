"""The network: masked context-normalised point encoders, a masked STN, and BlindPnPNet
(encoders -> cost -> Sinkhorn OT -> RANSAC -> pose refinement).

Imports ``bpnp.nodes`` and ``bpnp.geometry`` only (never data, training or evaluation).
"""

from bpnp.models.context_norm import ContextNorm, MaskedBatchNorm, context_norm, masked_mean_var
from bpnp.models.encoders import PointEncoder, ResidualCNBlock
from bpnp.models.network import NOT_RUN, BlindPnPNet, BlindPnPOutput, feature_cost
from bpnp.models.stn import STN3d

__all__ = [
    "BlindPnPNet", "BlindPnPOutput", "ContextNorm", "MaskedBatchNorm", "NOT_RUN", "PointEncoder",
    "ResidualCNBlock", "STN3d", "context_norm", "feature_cost", "masked_mean_var",
]
