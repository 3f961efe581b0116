"""Masked context normalisation and masked batch norm: statistics over real points only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpnp.models.context_norm import MaskedBatchNorm, context_norm, masked_mean_var
from tests.tolerances import eps, gamma, normalise_bound


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
    # Float32 rounding of the normalisation (tests/tolerances.py: normalise_bound), b per channel;
    # the test's own mean and variance of y are 17-term sums again (gamma_18 of max|y|, gamma_20
    # of max y^2).
    f32 = torch.float32
    b = normalise_bound(x, f32)
    ymax = y.abs().amax(-1).double()
    assert (y.mean(-1).abs().double() <= b + gamma(18, f32) * ymax).all()
    assert ((y.var(-1, unbiased=False).double() - 1).abs() <= 2 * ymax * b + b ** 2 + gamma(20, f32) * ymax ** 2).all()
    for value in (1e6, float("nan"), float("inf")):
        xp, mask = _pad(x, 9, value)
        yp = context_norm(xp, mask)
        # two evaluations (26-term sums with the padded zeros, 17-term sums), each within its
        # bound of the exact normalisation
        both = float((normalise_bound(x, f32, 26) + normalise_bound(x, f32)).max())
        assert torch.allclose(yp[..., :17], context_norm(x), atol=both, rtol=0)
        assert torch.all(yp[..., 17:] == 0)
    # Different padding per item: item 1 has 4 real points only.
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[1, 4:] = False
    mean, var = masked_mean_var(x, mask)
    # Two evaluations of a mean (17 terms with the zeros, 4) and of a two-pass variance:
    # gamma_(n+1) mean|x| and gamma_(n+3) var each.
    x4 = x[1, :, :4].double()
    f32 = torch.float32
    tol_mean = float(((gamma(18, f32) + gamma(5, f32)) * x4.abs().mean(-1)).max())
    tol_var = float(((gamma(20, f32) + gamma(7, f32)) * x4.var(-1, unbiased=False)).max())
    assert torch.allclose(mean[1, :, 0], x[1, :, :4].mean(-1), atol=tol_mean, rtol=0)
    assert torch.allclose(var[1, :, 0], x[1, :, :4].var(-1, unbiased=False), atol=tol_var, rtol=0)


def _bn_tolerances(x, weight, bias, n_a, n_b, momentum=0.1):
    """Tolerances for two batch norms of ``x`` ((B, C, N) or (B, C)) in float32 whose statistics
    over the batch are sums of ``n_a`` and ``n_b`` terms: each within its rounding bound of the
    exact result (tests/tolerances.py: normalise_bound for the normalised values, times |weight|,
    plus the affine map's two roundings of |out|; momentum times the mean's gamma_(n+1) mean|x|
    and the unbiased variance's gamma_(n+3) var for the running statistics, plus their update's
    two roundings). Returns (output, running mean, running var) absolute tolerances."""
    f32 = torch.float32
    xc = (x.transpose(0, 1) if x.ndim == 2 else x.transpose(0, 1).flatten(1)).double()  # (C, n)
    n = xc.shape[1]
    w, bb = weight.detach().double().abs(), bias.detach().double().abs()
    ymax = ((xc - xc.mean(1, keepdim=True)).abs().amax(1) / xc.std(1, unbiased=False))
    norm = normalise_bound(xc[None], f32, n_a)[0] + normalise_bound(xc[None], f32, n_b)[0]
    out = float((w * norm + 4 * eps(f32) * (w * ymax + bb)).max())
    rm = float((momentum * (gamma(n_a + 1, f32) + gamma(n_b + 1, f32)) * xc.abs().mean(1)).max())
    rm += 4 * eps(f32) * float(xc.mean(1).abs().max())
    var_u = xc.var(1, unbiased=True)
    rv = float((momentum * (gamma(n_a + 3, f32) + gamma(n_b + 3, f32)) * var_u).max())
    rv += 4 * eps(f32) * float((1 + var_u).max())
    return out, rm, rv


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
    tol_out, tol_rm, tol_rv = _bn_tolerances(x, ours.weight, ours.bias, 44, 44)
    assert torch.allclose(ours(x), ref(x), atol=tol_out, rtol=0)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=tol_rm, rtol=0)
    assert torch.allclose(ours.running_var, ref.running_var, atol=tol_rv, rtol=0)
    ours.eval(), ref.eval()
    # eval: the same affine map of x with running statistics that differ by tol_rm, tol_rv
    # (their effect: |weight| (tol_rm + |y| tol_rv / 2) / sqrt(var)), and its own roundings
    w = ours.weight.detach().double().abs()
    rs = ours.running_var.double().clamp_min(1e-5)
    yrun = ((x.double() - ours.running_mean.double()[None, :, None]).abs() / rs.sqrt()[None, :, None]).amax((0, 2))
    tol_eval = float((w * (tol_rm + yrun * tol_rv / (2 * rs)) / rs.sqrt()).max()) + 8 * eps(torch.float32) * float(
        (w * yrun + ours.bias.detach().double().abs()).max())
    assert torch.allclose(ours(x), ref(x), atol=tol_eval, rtol=0)
    # (B, C) inputs (the STN's fully connected layers)
    v = torch.randn(5, 6)
    ours.train(), ref.train()
    assert torch.allclose(ours(v), ref(v), atol=_bn_tolerances(v, ours.weight, ours.bias, 5, 5)[0], rtol=0)


def test_masked_batchnorm_ignores_padding_and_nonfinite_batches():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8)
    a, b = MaskedBatchNorm(3), MaskedBatchNorm(3)
    xp, mask = _pad(x, 5, 1e4)
    ya, yb = a(x), b(xp, mask)
    tol_out, tol_rm, tol_rv = _bn_tolerances(x, a.weight, a.bias, 16, 26)  # 2 x 8 real, 2 x 13 with the zeros
    assert torch.allclose(ya, yb[..., :8], atol=tol_out, rtol=0)
    assert torch.all(yb[..., 8:] == 0)
    assert torch.allclose(a.running_mean, b.running_mean, atol=tol_rm, rtol=0)
    assert torch.allclose(a.running_var, b.running_var, atol=tol_rv, rtol=0)
    # A batch with NaN in a real point must not poison the running statistics.
    before = (b.running_mean.clone(), b.running_var.clone())
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    b(bad)
    assert torch.equal(b.running_mean, before[0]) and torch.equal(b.running_var, before[1])
