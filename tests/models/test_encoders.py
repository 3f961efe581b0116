"""Encoders and STN: shapes, unit features, parameter counts, permutation and padding."""

from __future__ import annotations

import pytest
import torch

from bpnp.models import BlindPnPNet, PointEncoder, STN3d
from bpnp.models.local_geometry import KNNStem, masked_knn
from tests.tolerances import gamma


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_original():
    net = BlindPnPNet(matcher="bpnpnet", depth=12, knn=0, sinkhorn={"bins": "none"})
    # Original: about 2.0 M (two encoders of 12 blocks at width 128, STN 3-64-128-1024 / 512-256-9).
    assert 1.95e6 < _n_params(net) < 2.05e6
    assert 590_000 < _n_params(net.encoder2d) < 600_000
    assert 800_000 < _n_params(net.stn) < 810_000
    small = BlindPnPNet(matcher="bpnpnet", feature_dim=32, depth=2, knn=0, use_stn=False)
    assert small.stn is None and _n_params(small) < 20_000


@pytest.mark.parametrize("knn", [0, 4])
def test_encoder_unit_features_permutation_and_padding(knn):
    torch.manual_seed(0)
    enc = PointEncoder(3, width=16, depth=3, knn=knn)
    x = torch.randn(2, 3, 20)
    f = enc(x)
    assert f.shape == (2, 16, 20)
    # F.normalize over 16 channels (a 16-term norm, sqrt, division) and the test's own 16-term
    # norm: gamma_35.
    assert torch.allclose(f.norm(dim=1), torch.ones(2, 20), atol=gamma(2 * 16 + 3, torch.float32), rtol=0)
    perm = torch.randperm(20)
    assert torch.allclose(enc(x[:, :, perm]), f[:, :, perm], atol=1e-5)
    xp = torch.cat([x, torch.full((2, 3, 7), 1e5)], dim=2)
    xp[1, :, -1] = float("nan")
    mask = torch.zeros(2, 27, dtype=torch.bool)
    mask[:, :20] = True
    fp = enc(xp, mask)
    assert torch.allclose(fp[:, :, :20], f, atol=1e-5)
    assert torch.all(fp[:, :, 20:] == 0)


def test_stn_identity_at_init_and_masked_pooling():
    torch.manual_seed(0)
    stn = STN3d()
    x = torch.randn(3, 3, 30)
    T = stn(x)
    assert torch.allclose(T, torch.eye(3).expand(3, 3, 3))
    with torch.no_grad():
        stn.out.weight.normal_(0, 0.1)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[:, 30:] = False
    xp = torch.cat([x, torch.full((3, 3, 10), 50.0)], dim=2)  # huge padded values would win a max-pool
    stn.train()
    T1 = stn(x)
    T2 = stn(xp, mask)
    assert torch.allclose(T1, T2, atol=1e-5)
    assert not torch.allclose(T1, torch.eye(3).expand(3, 3, 3))


def test_masked_knn_brute_force_and_short_items():
    torch.manual_seed(1)
    x = torch.randn(2, 2, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 3:] = False  # item 1 has 3 real points, fewer than k
    idx, valid = masked_knn(x, mask, k=4)
    for i in range(9):
        d = (x[0, :, :] - x[0, :, i:i + 1]).norm(dim=0)
        assert set(idx[0, i].tolist()) == set(d.argsort()[:4].tolist())
    assert valid[0].all()
    assert valid[1, :, :3].all() and not valid[1, :, 3].any()
    assert set(idx[1, 0, :3].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("scale", KNNStem.SCALES)
def test_knn_stem_is_translation_and_scale_invariant_with_finite_gradients(scale):
    torch.manual_seed(2)
    stem = KNNStem(2, width=8, k=5, scale=scale).double()
    x = torch.randn(2, 2, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 2:] = False  # two real points, k = 5
    out = stem(x, mask)
    moved = stem(3.0 * x + torch.tensor([0.5, -2.0], dtype=torch.float64)[None, :, None], mask)
    assert torch.allclose(out, moved, atol=1e-10)
    assert torch.all(out[1, :, 2:] == 0)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad[0].abs().sum()) > 0
    assert torch.autograd.gradcheck(lambda z: stem(z, mask), (x.detach().clone().requires_grad_(),))


def test_knn_stem_neighbour_scale_follows_the_density():
    """The same square sampled as a 5x5 and a 9x9 lattice: the RMS radius barely changes, the
    nearest-neighbour distance (k = 2: the point and its nearest) is the lattice spacing."""
    def lattice(n):
        g = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        return torch.cartesian_prod(g, g).T[None]  # (1, 2, n^2)

    lengths = {}
    for scale in KNNStem.SCALES:
        stem = KNNStem(2, width=4, k=2, scale=scale).double()
        for n in (5, 9):
            x = lattice(n)
            mask = torch.ones(1, x.shape[2], dtype=torch.bool)
            idx, valid = masked_knn(x, mask, 2)
            offset = torch.gather(x, 2, idx.reshape(1, 1, -1).expand(1, 2, -1)).reshape(1, 2, -1, 2) - x[..., None]
            lengths[scale, n] = float(stem._set_length(x, mask, offset, valid))
    assert lengths["neighbour", 5] == pytest.approx(0.25) and lengths["neighbour", 9] == pytest.approx(0.125)
    assert lengths["radius", 9] / lengths["radius", 5] == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="scale must be one of"):
        KNNStem(2, width=4, scale="kth")
    with pytest.raises(ValueError, match="knn_scale must be one of"):
        PointEncoder(2, width=4, knn=0, knn_scale="kth")