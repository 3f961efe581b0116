"""Masked context normalisation and masked batch norm: statistics over real points only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpnp.models.context_norm import MaskedBatchNorm, context_norm, masked_mean_var


def _pad(x: torch.Tensor, extra: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, N = x.shape
    xp = torch.cat([x, torch.full((B, C, extra), value)], dim=2)
    mask = torch.zeros(B, N + extra, dtype=torch.bool)
    mask[:, :N] = True
    return xp, mask


def test_context_norm_statistics_and_padding():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 17) * 4 + 2
    y = context_norm(x, None, eps=0.0)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-4)
    for value in (1e6, float("nan"), float("inf")):
        xp, mask = _pad(x, 9, value)
        yp = context_norm(xp, mask)
        assert torch.allclose(yp[..., :17], context_norm(x), atol=1e-5)
        assert torch.all(yp[..., 17:] == 0)
    # Different padding per item: item 1 has 4 real points only.
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 4:] = False
    mean, var = masked_mean_var(x, mask)
    assert torch.allclose(mean[1, :, 0], x[1, :, :4].mean(-1), atol=1e-5)
    assert torch.allclose(var[1, :, 0], x[1, :, :4].var(-1, unbiased=False), atol=1e-4)


def test_context_norm_validates_input():
    with pytest.raises(ValueError, match="mask"):
        context_norm(torch.randn(2, 3, 4), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError):
        context_norm(torch.ones(2, 3, 4, dtype=torch.long))


def test_masked_batchnorm_matches_batchnorm_without_padding():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 11) * 3 + 1
    ours, ref = MaskedBatchNorm(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    # (B, C) inputs (the STN's fully connected layers)
    v = torch.randn(5, 6)
    ours.train(), ref.train()
    assert torch.allclose(ours(v), ref(v), atol=1e-5)


def test_masked_batchnorm_ignores_padding_and_nonfinite_batches():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8)
    a, b = MaskedBatchNorm(3), MaskedBatchNorm(3)
    xp, mask = _pad(x, 5, 1e4)
    ya, yb = a(x), b(xp, mask)
    assert torch.allclose(ya, yb[..., :8], atol=1e-5)
    assert torch.all(yb[..., 8:] == 0)
    assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
    assert torch.allclose(a.running_var, b.running_var, atol=1e-5)
    # A batch with NaN in a real point must not poison the running statistics.
    before = (b.running_mean.clone(), b.running_var.clone())
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    b(bad)
    assert torch.equal(b.running_mean, before[0]) and torch.equal(b.running_var, before[1])
