"""AttentionMatcher: output contract, the local attention against a brute-force reference,
permutation equivariance, padding invariance (values and gradients), similarity invariance of
the 3D side, gradcheck, finite gradients with any padding, input validation."""

from __future__ import annotations

import math

import pytest
import torch

from bpnp.models.attention import AttentionMatcher, _Neighbourhood
from bpnp.models.local_geometry import masked_knn
from tests.tolerances import gamma

F64 = torch.float64


def _net(width=16, blocks=2, heads=2, knn=4, **kw) -> AttentionMatcher:
    torch.manual_seed(0)
    net = AttentionMatcher(width=width, blocks=blocks, heads=heads, knn=knn, **kw).double()
    # Non-trivial LayerNorm affines and biases (the defaults 1 / 0 would hide some bugs).
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _points(B, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    p2d = 0.4 * torch.randn(B, m, 2, generator=g, dtype=F64) + 0.1
    p3d = 2.0 * torch.randn(B, n, 3, generator=g, dtype=F64) + torch.tensor([1.0, -3.0, 8.0], dtype=F64)
    return p2d, p3d


def _pad(x, total, fill):
    """(B, N, D) -> (B, total, D), the new slots holding ``fill``."""
    extra = torch.full((x.shape[0], total - x.shape[1], x.shape[2]), fill, dtype=x.dtype)
    return torch.cat([x, extra], 1)


def _mask(B, total, real):
    mask = torch.zeros(B, total, dtype=torch.bool)
    for b, r in enumerate(real):
        mask[b, :r] = True
    return mask


def test_shapes_unit_norm_and_zero_padding():
    net = _net()
    p2d, p3d = _points(3, 9, 11)
    mask2d = _mask(3, 9, [9, 6, 1])
    mask3d = _mask(3, 11, [11, 3, 0])  # item 1: fewer 3D points than k; item 2: no 3D point at all
    f2d, f3d = net(p2d, p3d, mask2d, mask3d)
    assert f2d.shape == (3, 16, 9) and f3d.shape == (3, 16, 11)
    assert f2d.dtype == F64 and torch.isfinite(f2d).all() and torch.isfinite(f3d).all()
    assert torch.allclose(f2d.norm(dim=1)[mask2d], torch.ones((), dtype=F64), atol=1e-12)
    assert torch.allclose(f3d.norm(dim=1)[mask3d], torch.ones((), dtype=F64), atol=1e-12)
    assert torch.all(f2d.transpose(1, 2)[~mask2d] == 0) and torch.all(f3d.transpose(1, 2)[~mask3d] == 0)
    # the defaults build and run in float32; no mask = all real
    torch.manual_seed(0)
    g2, g3 = AttentionMatcher()(p2d[:1, :5].float(), p3d[:1, :7].float())
    assert g2.shape == (1, 128, 5) and g3.shape == (1, 128, 7)
    # F.normalize over 128 channels and the test's own norm: gamma_(2 * 128 + 3)
    assert torch.allclose(g2.norm(dim=1), torch.ones(1, 5), atol=gamma(2 * 128 + 3, torch.float32), rtol=0)
    # blocks = 0: embeddings and output layer only
    h2, h3 = _net(blocks=0)(p2d, p3d, mask2d, mask3d)
    assert torch.allclose(h3.norm(dim=1)[mask3d], torch.ones((), dtype=F64), atol=1e-12)


def test_local_self_attention_matches_brute_force():
    """The concatenation trick equals the textbook formula ``softmax_j(q_i . (k_j + A g_ij) /
    sqrt(d))`` and ``sum_j a_ij (v_j + B g_ij)`` over the valid neighbours, per head."""
    net = _net(width=12, heads=3, knn=4, local_dim=6, local_heads=3, pos_dim=5)
    layer = net.blocks[0].self_attn[1]
    torch.manual_seed(3)
    B, N, C = 2, 7, 12
    x = torch.randn(B, N, 3, dtype=F64)
    mask = _mask(B, N, [7, 3])  # item 1: 3 real points < k
    feats = torch.randn(B, N, C, dtype=F64)
    nb = _Neighbourhood(x, mask, 4)
    g = torch.randn(B * N, nb.k, 5, dtype=F64)
    out = layer(feats, g, nb)

    h, d, L = layer.heads, layer.head_dim, layer.local_dim
    idx, valid = masked_knn(x.transpose(1, 2), mask, 4)
    qkv = layer.qkv(feats)
    q, k, v = qkv[..., :L], qkv[..., L:2 * L], qkv[..., 2 * L:]
    for b in range(B):
        for i in range(N):
            if not mask[b, i]:
                continue
            gi = g[b * N + i]  # (k, P)
            heads = []
            for hh in range(h):
                sl = slice(hh * d, (hh + 1) * d)
                keys = k[b, idx[b, i], sl] + gi @ layer.pos_key[hh].T  # (k, d)
                vals = v[b, idx[b, i], sl] + gi @ layer.pos_value[hh].T
                logits = (keys @ q[b, i, sl]) / math.sqrt(d)
                logits = logits.masked_fill(~valid[b, i], float("-inf"))
                heads.append(torch.softmax(logits, 0) @ vals)
            ref = layer.out(torch.cat(heads))
            assert torch.allclose(out[b, i], ref, atol=1e-12), (b, i)


@pytest.mark.parametrize("side", ["2d", "3d"])
def test_permutation_equivariance(side):
    net = _net()
    p2d, p3d = _points(2, 10, 12, seed=1)
    mask2d, mask3d = _mask(2, 10, [10, 7]), _mask(2, 12, [12, 9])
    f2d, f3d = net(p2d, p3d, mask2d, mask3d)
    g = torch.Generator().manual_seed(5)
    if side == "2d":
        perm = torch.randperm(10, generator=g)
        q2d, q3d = net(p2d[:, perm], p3d, mask2d[:, perm], mask3d)
        assert torch.allclose(q2d, f2d[:, :, perm], atol=1e-10, rtol=0)
        assert torch.allclose(q3d, f3d, atol=1e-10, rtol=0)
    else:
        perm = torch.randperm(12, generator=g)
        q2d, q3d = net(p2d, p3d[:, perm], mask2d, mask3d[:, perm])
        assert torch.allclose(q3d, f3d[:, :, perm], atol=1e-10, rtol=0)
        assert torch.allclose(q2d, f2d, atol=1e-10, rtol=0)
    assert not torch.allclose(f2d[0, :, 0], f2d[0, :, 1], atol=1e-3)  # features differ between points


@pytest.mark.parametrize("fill", [1e6, float("nan")])
def test_padding_invariance_of_values_and_gradients(fill):
    """Item 0 alone and unpadded vs the same item padded with garbage next to another item: the
    same features, the same gradients w.r.t. its real points and w.r.t. the parameters, exactly 0
    gradient w.r.t. the padded coordinates (even when they hold NaN)."""
    m, n = 6, 3  # n < k: the kNN has invalid slots in both runs
    net = _net()
    p2d, p3d = _points(1, m, n, seed=2)
    g = torch.Generator().manual_seed(7)
    G2, G3 = torch.randn(1, 16, m, generator=g, dtype=F64), torch.randn(1, 16, n, generator=g, dtype=F64)

    def run(p2d, p3d, mask2d=None, mask3d=None):
        p2d, p3d = p2d.clone().requires_grad_(), p3d.clone().requires_grad_()
        net.zero_grad()
        f2d, f3d = net(p2d, p3d, mask2d, mask3d)
        ((f2d[:1, :, :m] * G2).sum() + (f3d[:1, :, :n] * G3).sum()).backward()
        return f2d, f3d, p2d.grad, p3d.grad, [p.grad.clone() for p in net.parameters()]

    ref = run(p2d, p3d)
    other2d, other3d = _points(1, 11, 14, seed=3)
    q2d = torch.cat([_pad(p2d, 11, fill), other2d])
    q3d = torch.cat([_pad(p3d, 14, fill), other3d])
    mask2d, mask3d = _mask(2, 11, [m, 8]), _mask(2, 14, [n, 14])
    out = run(q2d, q3d, mask2d, mask3d)

    assert torch.allclose(out[0][:1, :, :m], ref[0], atol=1e-12, rtol=0)
    assert torch.allclose(out[1][:1, :, :n], ref[1], atol=1e-12, rtol=0)
    assert torch.allclose(out[2][:1, :m], ref[2], atol=1e-12, rtol=0)
    assert torch.allclose(out[3][:1, :n], ref[3], atol=1e-12, rtol=0)
    assert float(ref[3].abs().sum()) > 0
    assert torch.all(out[2][0, m:] == 0) and torch.all(out[3][0, n:] == 0)
    assert torch.all(out[2][1] == 0) and torch.all(out[3][1] == 0)  # item 1 is not in the loss
    for a, b in zip(out[4], ref[4]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_fewer_real_points_than_k_and_single_points():
    net = _net(knn=6)
    p2d, p3d = _points(1, 1, 2, seed=4)  # one 2D point, two 3D points, k = 6
    f2d, f3d = net(p2d, p3d)
    q2d, q3d = net(_pad(p2d, 5, 3.0), _pad(p3d, 9, -7.0), _mask(1, 5, [1]), _mask(1, 9, [2]))
    assert torch.allclose(q2d[:, :, :1], f2d, atol=1e-12) and torch.allclose(q3d[:, :, :2], f3d, atol=1e-12)
    assert torch.allclose(f3d.norm(dim=1), torch.ones((), dtype=F64), atol=1e-12)


def test_3d_side_is_translation_and_scale_invariant_but_not_rotation_invariant():
    net = _net()
    p2d, p3d = _points(2, 8, 10, seed=6)
    mask2d, mask3d = _mask(2, 8, [8, 5]), _mask(2, 10, [10, 6])
    f2d, f3d = net(p2d, p3d, mask2d, mask3d)
    moved = 7.5 * p3d + torch.tensor([100.0, -20.0, 3.0], dtype=F64)
    g2d, g3d = net(p2d, moved, mask2d, mask3d)
    assert torch.allclose(g3d, f3d, atol=1e-10, rtol=0) and torch.allclose(g2d, f2d, atol=1e-10, rtol=0)
    c, s = math.cos(0.7), math.sin(0.7)
    R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    _, r3d = net(p2d, p3d @ R.T, mask2d, mask3d)
    assert not torch.allclose(r3d, f3d, atol=1e-3)  # documented: rotation is not normalised away


def test_neighbour_offsets_are_in_units_of_the_neighbour_distance():
    """The same square sampled as a 5x5 and a 9x9 lattice: the offsets fed to the position MLP
    have the same lengths (the nearest neighbour at 1, the point itself at 0), although the
    lattice spacing in RMS-normalised coordinates differs by 2x."""
    for n in (5, 9):
        grid = torch.linspace(0.0, 1.0, n, dtype=F64)
        x = torch.cartesian_prod(grid, grid)[None]  # (1, n^2, 2)
        x = (x - x.mean(1, keepdim=True)) / x.var(1, unbiased=False).sum().sqrt()
        nb = _Neighbourhood(x, torch.ones(1, n * n, dtype=torch.bool), 2)
        lengths = nb.offsets.norm(dim=-1)  # (n^2, 2)
        assert torch.allclose(lengths.min(1).values, torch.zeros((), dtype=F64), atol=1e-12)
        assert torch.allclose(lengths.max(1).values, torch.ones((), dtype=F64), atol=1e-9)


def test_gradcheck_tiny_matcher():
    net = _net(width=8, blocks=1, heads=2, knn=3)
    p2d, p3d = _points(1, 5, 6, seed=8)
    mask2d, mask3d = _mask(1, 5, [5]), _mask(1, 6, [5])  # one padded 3D slot

    def fn(p3d, p2d):
        f2d, f3d = net(p2d, p3d, mask2d, mask3d)
        return f2d, f3d

    assert torch.autograd.gradcheck(fn, (p3d.clone().requires_grad_(), p2d.clone().requires_grad_()))


def test_gradients_finite_with_any_padding_in_training_mode():
    net = _net(dropout=0.1).train()
    p2d, p3d = _points(4, 7, 9, seed=9)
    mask2d = _mask(4, 7, [7, 1, 0, 4])  # item 2: no 2D point
    mask3d = _mask(4, 9, [9, 2, 5, 0])  # item 3: no 3D point
    p2d = torch.where(mask2d[..., None], p2d, torch.tensor(float("nan"), dtype=F64)).requires_grad_()
    p3d = torch.where(mask3d[..., None], p3d, torch.tensor(float("inf"), dtype=F64)).requires_grad_()
    f2d, f3d = net(p2d, p3d, mask2d, mask3d)
    assert torch.isfinite(f2d).all() and torch.isfinite(f3d).all()
    (f2d.sum(1).square().sum() + f3d.sum(1).square().sum()).backward()
    assert torch.isfinite(p2d.grad).all() and torch.isfinite(p3d.grad).all()
    assert torch.all(p2d.grad[~mask2d] == 0) and torch.all(p3d.grad[~mask3d] == 0)
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(p3d.grad[1].abs().sum()) > 0  # two real 3D points still get a gradient


def test_input_validation():
    with pytest.raises(ValueError, match="heads"):
        AttentionMatcher(width=10, heads=4)
    with pytest.raises(ValueError, match="knn"):
        AttentionMatcher(knn=0)
    with pytest.raises(ValueError, match="blocks"):
        AttentionMatcher(blocks=-1)
    with pytest.raises(ValueError, match="local_dim"):
        AttentionMatcher(width=16, local_dim=6, local_heads=4)
    with pytest.raises(ValueError, match="local_heads"):
        AttentionMatcher(local_heads=0)
    with pytest.raises(ValueError, match="cross_dim"):
        AttentionMatcher(cross_dim=30)
    net = _net()
    p2d, p3d = _points(2, 4, 5)
    with pytest.raises(ValueError, match="p2d"):
        net(p2d[..., :1], p3d)
    with pytest.raises(ValueError, match="p3d"):
        net(p2d, p3d[:1])
    with pytest.raises(ValueError, match="p3d"):
        net(p2d, p3d[:, :0])
    with pytest.raises(ValueError, match="mask2d"):
        net(p2d, p3d, torch.ones(2, 4), None)
    with pytest.raises(ValueError, match="mask3d"):
        net(p2d, p3d, None, torch.ones(2, 4, dtype=torch.bool))


def test_every_attention_row_has_a_key_and_blocks_zero_the_padding(monkeypatch):
    """torch 2.14's CPU SDPA returns 0 for a query row whose keys are all masked, but other
    kernels (CUDA, older releases) return NaN there, in the forward and the backward: no row may
    be empty, in either attention, for padded queries and items with an empty side included.
    The blocks' outputs are exactly 0 at padding."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        assert attn_mask is not None and attn_mask.dtype == torch.bool
        calls.append(bool(attn_mask.expand(*q.shape[:-1], k.shape[-2]).any(-1).all()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    net = _net()
    outputs = []
    for block in net.blocks:
        block.register_forward_hook(lambda mod, args, out: outputs.append(out))
    p2d, p3d = _points(3, 6, 8, seed=10)
    mask2d, mask3d = _mask(3, 6, [6, 0, 2]), _mask(3, 8, [3, 8, 0])
    with torch.no_grad():
        net(p2d, p3d, mask2d, mask3d)
    assert len(calls) == 2 * 2 * len(net.blocks) and all(calls)
    assert len(outputs) == len(net.blocks)
    for h2, h3 in outputs:
        assert torch.all(h2[~mask2d] == 0) and torch.all(h3[~mask3d] == 0)
