r"""Angular gates relative to the image's angular extent (zoom invariance of the inference gates).

RANSAC's inlier angle, the pose search's gates and the refinement's gate and robust scale are
angles (radians) or ``1 - cos`` of one. A fixed angle means different things for different
lenses: 0.01 rad is about 9 px of a 1024-px image with a 65 degree field of view, but 29 px with
a 20 degree one, where it admits three times the wrong partners in each direction. Pixel noise,
point spacing and the gate all shrink together when only the focal length changes, so a gate in
units of the keypoints' angular spread keeps its meaning in pixels.

The spread of a keypoint set is the RMS distance of its unit bearings from their centroid
(chordal; for the spreads of ordinary lenses, within a few per cent of the RMS angle in radians):

.. math::
    \sigma = \Big(\frac1m \sum_i \|b_i - \bar b\|^2\Big)^{1/2}, \qquad \bar b = \frac1m \sum_i b_i .

It counts every keypoint, outliers included (they are spread over the image, so it follows the
image's extent rather than the object's). Item ``b``'s gates are the configured ones times

.. math::
    f_b = \mathrm{clamp}(\sigma_b / \sigma_\mathrm{ref},\ f_\mathrm{min},\ f_\mathrm{max}),

angles scale with ``f``, ``1 - cos`` quantities (the refinement's robust scale) with ``f^2``.
``sigma_ref`` is the median spread of the validation split the gates were chosen on, so the
configured values hold there (:class:`bpnp.models.settings.GateSettings`; ``python -m
bpnp.evaluation.ablate`` prints the median spread of the set it runs on).
"""

from __future__ import annotations

import math

import torch

__all__ = ["keypoint_spread", "gate_factor", "check_angle"]


def keypoint_spread(bearings: torch.Tensor, mask2d: torch.Tensor) -> torch.Tensor:
    """RMS angular distance (radians, chordal) of the real bearings from their mean.

    Args:
        bearings: (b, m, 3) unit bearings; mask2d: (b, m) bool, real points.

    Returns:
        (b,) spread, 0 for an item with no real point.
    """
    w = mask2d.to(bearings.dtype)
    count = w.sum(1).clamp_min(1.0)
    zero = torch.zeros((), dtype=bearings.dtype, device=bearings.device)
    b = torch.where(mask2d[..., None], bearings, zero)  # padding may hold anything
    mean = b.sum(1) / count[:, None]
    sq = ((b - mean[:, None, :]).square().sum(-1) * w).sum(1)
    return (sq / count).sqrt()


def check_angle(value: float | torch.Tensor, batch: int, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an angle in (0, pi/2) radians, or a floating
    ``(batch,)`` tensor of such angles, one per item (the gates' tests need ``cos > 0``).
    ``name`` opens the message (the argument, e.g. ``"threshold"``)."""
    if isinstance(value, torch.Tensor):
        if (tuple(value.shape) != (batch,) or not value.is_floating_point()
                or not bool(((value > 0) & (value < math.pi / 2)).all())):
            raise ValueError(f"{name}: a per-item angle must be a floating tensor of shape {(batch,)} with angles "
                             f"in (0, pi/2) radians, got {value.dtype} of shape {tuple(value.shape)}")
    elif not 0.0 < value < math.pi / 2:
        raise ValueError(f"{name} must lie in (0, pi/2) radians, got {value!r}")


def gate_factor(bearings: torch.Tensor, mask2d: torch.Tensor, reference: float, low: float,
                high: float) -> torch.Tensor:
    """(b,) factor ``clamp(spread / reference, low, high)`` of each item's angular gates (module
    docstring), float64 (float32 on "mps", which has none); ``low`` for an item with fewer than
    two real points."""
    wide = torch.float64 if bearings.device.type != "mps" else torch.float32
    f = keypoint_spread(bearings.detach().to(wide), mask2d) / float(reference)
    return f.clamp(float(low), float(high))
