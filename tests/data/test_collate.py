"""Collation: zero padding, masks, dtypes, optional keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bpnp.data.collate import collate_scenes


def _scene(m, n, seed, index=None, K=True):
    rng = np.random.default_rng(seed)
    match = np.full(m, -1)
    k = min(m, n) - 1
    match[:k] = rng.permutation(n)[:k]
    s = {"p2d": rng.normal(size=(m, 2)), "p3d": rng.normal(size=(n, 3)), "R": np.eye(3),
         "t": rng.normal(size=3), "match": match}
    if K:
        s["K"] = np.diag([500.0, 500.0, 1.0])
        s["image_size"] = np.array([640, 480])
    if index is not None:
        s["index"] = index
    return s


def test_padding_and_masks():
    a, b = _scene(5, 7, 0, index=10), _scene(3, 9, 1, index=4)
    batch = collate_scenes([a, b])
    assert batch["p2d"].shape == (2, 5, 2) and batch["p3d"].shape == (2, 9, 3)
    assert batch["p2d"].dtype == torch.float32 and batch["R"].dtype == torch.float32
    assert batch["mask2d"].dtype == torch.bool and batch["match"].dtype == torch.int64
    assert batch["mask2d"].sum(1).tolist() == [5, 3] and batch["mask3d"].sum(1).tolist() == [7, 9]
    # Real entries first, padding zeros, padded matches -1.
    # the same float64 values rounded once to float32 (round to nearest) either way: bitwise equal
    np.testing.assert_array_equal(batch["p2d"][1, :3].numpy(), b["p2d"].astype(np.float32))
    assert torch.all(batch["p2d"][1, 3:] == 0) and torch.all(batch["p3d"][0, 7:] == 0)
    assert batch["match"][1, 3:].tolist() == [-1, -1]
    np.testing.assert_array_equal(batch["match"][0].numpy(), a["match"])
    assert batch["index"].tolist() == [10, 4]
    assert batch["K"].shape == (2, 3, 3) and batch["image_size"].tolist() == [[640, 480]] * 2
    # Matches of real points index real (unpadded) 3D points.
    valid = batch["match"] >= 0
    idx = batch["match"].clamp(min=0)
    assert torch.all(torch.gather(batch["mask3d"], 1, idx)[valid])


def test_pad_multiple_and_index_default():
    batch = collate_scenes([_scene(5, 7, 0), _scene(3, 9, 1)], pad_multiple=8)
    assert batch["p2d"].shape[1] == 8 and batch["p3d"].shape[1] == 16
    assert batch["mask2d"].sum().item() == 8 and batch["index"].tolist() == [0, 1]


def test_optional_keys_only_when_all_items_have_them():
    batch = collate_scenes([_scene(4, 4, 0), _scene(4, 4, 1, K=False)])
    assert "K" not in batch and "image_size" not in batch


def test_accepts_tensors_and_rejects_bad_input():
    s = {k: torch.as_tensor(v) for k, v in _scene(4, 5, 2).items()}
    batch = collate_scenes([s])
    assert batch["p3d"].shape == (1, 5, 3)
    with pytest.raises(ValueError, match="empty"):
        collate_scenes([])
    bad = _scene(4, 5, 0)
    bad["match"] = bad["match"][:3]
    with pytest.raises(ValueError, match="item 0 has 4 2D points but 3 matches"):
        collate_scenes([bad])
    with pytest.raises(ValueError, match="pad_multiple"):
        collate_scenes([_scene(4, 5, 0)], pad_multiple=0)
