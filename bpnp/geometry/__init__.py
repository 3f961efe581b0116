"""Geometry of blind PnP: rotations, bearings and projection, P3P, batched
RANSAC and the pose-error metrics of the evaluation contract.

Conventions: ``x_cam = R X + t`` (world to camera), camera-normalised 2D points, unit bearings
``normalize([x, y, 1])``, boolean masks with True = real point. This layer imports torch,
kornia and numpy only (never models, training, data or evaluation).
"""

from bpnp.geometry.bearings import (
    bearings_to_normalised,
    denormalise_keypoints,
    normalise_keypoints,
    project,
    to_bearings,
    transform,
)
from bpnp.geometry.metrics import auc, error_auc, median_matched_depth, pose_errors, success_rate_at
from bpnp.geometry.p3p import P3PSolutions, p3p
from bpnp.geometry.ransac import RansacResult, RansacStatus, default_top_k, ransac_pnp
from bpnp.geometry.rotations import (
    chordal_distance,
    geodesic_angle,
    project_to_so3,
    random_rotation,
    skew,
    so3_exp,
    so3_log,
)

__all__ = [
    "P3PSolutions",
    "RansacResult",
    "RansacStatus",
    "auc",
    "bearings_to_normalised",
    "chordal_distance",
    "default_top_k",
    "denormalise_keypoints",
    "error_auc",
    "geodesic_angle",
    "median_matched_depth",
    "normalise_keypoints",
    "p3p",
    "pose_errors",
    "project",
    "project_to_so3",
    "random_rotation",
    "ransac_pnp",
    "skew",
    "so3_exp",
    "so3_log",
    "success_rate_at",
    "to_bearings",
    "transform",
]
