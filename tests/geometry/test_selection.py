"""bpnp.geometry.selection.top_k: the values of torch.topk and a valid top-k's indices, by groups,
padded or as torch.topk itself."""

import math

import pytest
import torch

from bpnp.geometry.selection import group_size, padded_length, top_k


def _check(x, k, largest):
    values, idx = top_k(x, k, largest=largest)
    ref = torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    assert values.shape == idx.shape == ref.values.shape
    assert torch.equal(values, ref.values)  # NaN-free inputs: equal values, best first
    n = x.shape[-1]
    assert ((idx >= 0) & (idx < n)).all()
    assert torch.equal(torch.gather(x, -1, idx), values)  # the indices hold those values ...
    if k > 1:  # ... each entry once
        s = idx.sort(-1).values
        assert (s[..., 1:] != s[..., :-1]).all()
    return values, idx


def test_padded_length_pads_only_just_below_torchs_switch():
    assert padded_length(1000, 16) == 1024
    assert padded_length(640, 16) == 1024
    assert padded_length(639, 16) == 639
    assert padded_length(1024, 16) == 1024
    assert padded_length(2000, 16) == 2000
    assert padded_length(10**6, 1000) == 10**6
    assert padded_length(5, 0) == 5


def test_group_size_from_long_rows_on():
    assert group_size(10**6, 1000) == 32
    assert group_size(65536, 384) == 13
    assert group_size(16383, 16) == 0  # below 2^14 entries: no groups
    assert group_size(1 << 14, 16) == 32
    assert group_size(1 << 14, 1 << 13) == 0  # fewer than 2 columns per group
    assert group_size(1 << 14, 0) == 0


@pytest.mark.parametrize("n", [50, 639, 700, 1000, 1100, 1 << 14, 65536 + 7, 250_001])
@pytest.mark.parametrize("largest", [True, False])
def test_values_and_indices_of_random_rows(n, largest):
    g = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 17, n, generator=g, dtype=dtype)
        if n > 10_000:
            x = x[:1, :3]  # long rows: three are enough
        for k in (1, 4, 16) if n < 10_000 else (1, 16, 384, 1000):
            values, idx = _check(x, k, largest)
            # Rows without a tie among their selected values or at the k-th: the very same indices.
            distinct = (values[..., 1:] != values[..., :-1]).all(-1) & ((x == values[..., -1:]).sum(-1) == 1)
            assert distinct.any()  # the check below is not vacuous
            ref = torch.topk(x, k, dim=-1, largest=largest).indices
            assert torch.equal(idx[distinct], ref[distinct])


@pytest.mark.parametrize("largest", [True, False])
def test_ties_infinities_and_masked_rows(largest):
    g = torch.Generator().manual_seed(1)
    worst = -math.inf if largest else math.inf
    x = torch.randint(0, 20, (4, 50, 1000), generator=g).to(torch.float32)  # many exact ties
    x[0, :, 500:] = worst  # half of every row masked
    x[1, 3, :] = worst  # a fully masked row: the padding would be selected, so torch.topk unpadded
    x[2, 7, 10:] = worst  # 10 real entries only
    x[3, :, ::2] = -worst  # the best value, tied many times
    for k in (16, 20):
        _check(x, k, largest)


@pytest.mark.parametrize("largest", [True, False])
def test_long_rows_with_ties_masks_and_few_real_entries(largest):
    g = torch.Generator().manual_seed(3)
    worst = -math.inf if largest else math.inf
    x = torch.randint(0, 50, (4, 100_003), generator=g).to(torch.float64)  # exact ties everywhere
    x[1, 1000:] = worst  # most of the row masked
    x[2, 5:] = worst  # fewer real entries than k
    x[3, :] = worst
    for k in (1, 16, 1000):
        _check(x, k, largest)


def test_nan_is_ranked_as_torch_ranks_it():
    g = torch.Generator().manual_seed(2)
    for x in (torch.randn(2, 30, 1000, generator=g), torch.randn(2, 1, 70_000, generator=g)):  # padded, by groups
        x[0, 0, 5] = float("nan")
        x[1, :, :x.shape[-1] - 5] = float("nan")  # fewer than k numbers in every row of item 1
        for largest in (True, False):
            values, idx = top_k(x, 16, largest=largest)
            ref = torch.topk(x, 16, dim=-1, largest=largest)
            assert torch.equal(values.isnan(), ref.values.isnan())
            ok = ~values.isnan()
            assert torch.equal(values[ok], ref.values[ok])
            assert torch.equal(torch.gather(x, -1, idx).isnan(), values.isnan())


def test_edge_cases_and_errors():
    x = torch.randn(2, 1000)
    assert top_k(x, 0)[0].shape == (2, 0)
    _check(x, 1000, True)
    xi = torch.randint(0, 5, (2, 1000))
    assert torch.equal(top_k(xi, 16)[0], torch.topk(xi, 16).values)  # integers: torch.topk itself
    with pytest.raises(ValueError, match="k must be in"):
        top_k(x, 1001)
    with pytest.raises(ValueError, match="k must be in"):
        top_k(x, -1)
