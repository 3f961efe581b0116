r"""Robust kernels on the angular error ``e = 1 - cos(angle)`` in ``[0, 2]``.

Each kernel is a concave, increasing function of ``e`` with :math:`\rho(e) \approx e` for small
``e`` and one scale ``sigma`` (in units of ``e``; an angle of ``a`` radians gives
``e ~= a^2 / 2``). Concavity in ``e`` makes iteratively reweighted steps majorise-minimise the
robust objective, since :math:`\rho(e) \le \rho(e_0) + \rho'(e_0)(e - e_0)`.

=================  =====================================  ==================================
name               rho(e)                                 rho'(e)
=================  =====================================  ==================================
``none``           e                                      1
``huber``          e if e <= s else 2 sqrt(s e) - s       1 or sqrt(s / e)
``geman_mcclure``  s e / (s + e)                          s^2 / (s + e)^2
``tanh``           s tanh(e / s)  (the original BPnPNet)  1 - tanh^2(e / s)
=================  =====================================  ==================================
"""

from __future__ import annotations

import torch

KERNELS = ("none", "huber", "geman_mcclure", "tanh")


class RobustKernel:
    """A robust kernel with its first two derivatives, elementwise on tensors of errors ``e``.

    Args:
        name: one of :data:`KERNELS`.
        scale: ``sigma > 0`` in units of ``1 - cos(angle)``; or a (B,) tensor, one per batch item
            (:meth:`per_item`; the errors then have the batch first).

    Example:
        >>> k = RobustKernel("geman_mcclure", 0.01)
        >>> round(float(k.rho(torch.tensor(0.01))), 6)  # s e / (s + e) at e = s: s / 2 (rounded: float32)
        0.005
    """

    def __init__(self, name: str = "none", scale: float | torch.Tensor = 1e-3) -> None:
        if name not in KERNELS:
            raise ValueError(f"robust kernel must be one of {KERNELS}, got {name!r}")
        if isinstance(scale, torch.Tensor):
            if scale.ndim != 1 or not scale.is_floating_point() or not bool((scale > 0).all()):
                raise ValueError(f"a per-item robust scale must be a positive floating (B,) tensor, got "
                                 f"{scale.dtype} of shape {tuple(scale.shape)}")
            self.name, self.scale = name, scale
            return
        if not scale > 0:
            raise ValueError(f"robust scale must be positive, got {scale}")
        self.name, self.scale = name, float(scale)

    def per_item(self, factor: torch.Tensor) -> "RobustKernel":
        """The same kernel with scale ``scale * factor[b]`` for batch item ``b`` (``factor`` a
        positive (B,) tensor): every method then takes errors of shape (B, ...)."""
        return RobustKernel(self.name, self.scale * factor)

    def select(self, index: torch.Tensor) -> "RobustKernel":
        """The kernel of the batch items ``index`` (itself when the scale is one number)."""
        if not isinstance(self.scale, torch.Tensor):
            return self
        return RobustKernel(self.name, self.scale.index_select(0, index))

    def _s(self, e: torch.Tensor) -> float | torch.Tensor:
        """The scale, shaped to broadcast against errors ``e`` (B, ...) when it is per item."""
        if isinstance(self.scale, torch.Tensor):
            return self.scale.to(e.dtype).view(-1, *([1] * (e.ndim - 1)))
        return self.scale

    def rho(self, e: torch.Tensor) -> torch.Tensor:
        # No clamping of e at 0: at an exact fit half the errors round to tiny negatives, and a
        # clamp would zero their derivatives (a wrong Hessian). Each formula is smooth there.
        s = self._s(e)
        if self.name == "none":
            return e
        if self.name == "huber":
            # sqrt only where it is taken (where() would still differentiate the other branch).
            big = e > s
            root = torch.sqrt(torch.where(big, e, s * torch.ones_like(e)) * s)
            return torch.where(big, 2 * root - s, e)
        if self.name == "geman_mcclure":
            return s * e / (s + e)
        return s * torch.tanh(e / s)

    def d1(self, e: torch.Tensor) -> torch.Tensor:
        s = self._s(e)
        if self.name == "none":
            return torch.ones_like(e)
        if self.name == "huber":
            big = e > s
            return torch.where(big, torch.sqrt(s / torch.where(big, e, s * torch.ones_like(e))), torch.ones_like(e))
        if self.name == "geman_mcclure":
            return s * s / (s + e) ** 2
        return 1 - torch.tanh(e / s) ** 2

    def d2(self, e: torch.Tensor) -> torch.Tensor:
        s = self._s(e)
        if self.name == "none":
            return torch.zeros_like(e)
        if self.name == "huber":
            big = e > s
            eb = torch.where(big, e, s * torch.ones_like(e))
            return torch.where(big, -0.5 * torch.sqrt(s * torch.ones_like(e)) * eb ** -1.5, torch.zeros_like(e))
        if self.name == "geman_mcclure":
            return -2 * s * s / (s + e) ** 3
        th = torch.tanh(e / s)
        return -2 * th * (1 - th * th) / s

    def all(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rho, rho', rho'')`` at once, sharing intermediates (one pass fewer per term over
        the (B, m, n) error matrix in the refinement's inner loop)."""
        s = self._s(e)
        if self.name == "geman_mcclure":
            inv = 1.0 / (s + e)
            d1 = (s * inv) ** 2
            return s * e * inv, d1, -2 * d1 * inv
        if self.name == "tanh":
            th = torch.tanh(e / s)
            d1 = 1 - th * th
            return s * th, d1, (-2 / s) * th * d1
        return self.rho(e), self.d1(e), self.d2(e)

    @property
    def is_identity(self) -> bool:
        return self.name == "none"

    def __repr__(self) -> str:
        return f"RobustKernel({self.name!r}, scale={self.scale})"
