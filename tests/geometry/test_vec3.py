"""The unrolled 3-vector helpers of :mod:`bpnp.geometry.vec3` against torch's reductions."""

import torch

from bpnp.geometry.vec3 import dot3, norm3


def test_dot3_and_norm3_are_torchs_up_to_rounding():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(5, 7, 3, generator=g, dtype=dtype)
        b = torch.randn(1, 7, 3, generator=g, dtype=dtype)  # broadcast over the first dimension
        eps = torch.finfo(dtype).eps
        # Three products and two additions: a few eps of the sum of the terms' magnitudes.
        scale = (a.abs() * b.abs()).sum(-1)
        assert dot3(a, b).shape == (5, 7)
        assert ((dot3(a, b) - (a * b).sum(-1)).abs() <= 4 * eps * scale).all()
        assert ((norm3(a) - a.norm(dim=-1)).abs() <= 4 * eps * a.norm(dim=-1)).all()
