"""BPnPNet pickles: a fixture in the original layout is written here, loaded and compared."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from bpnp.data.bpnpnet_pickles import PICKLE_KEYS, PickleFormatError, bpnpnet_to_scene, load_bpnpnet_split
from bpnp.data.datamodule import BlindPnPDataModule
from bpnp.data.datasets import PickleDataset


def _originals(num=5, seed=0):
    """Inlier-only samples as BPnPNet stores them: p3d shuffled, W_gt[j] = 2D index of 3D j."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        k = int(rng.integers(6, 12))
        p2d = rng.normal(size=(k, 2))
        perm = rng.permutation(k)  # p3d_new = p3d_old[perm]  ->  W_gt = perm
        p3d = rng.normal(size=(k, 3))[perm]
        R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        R *= np.linalg.det(R)
        out.append(dict(p2d=p2d, p3d=p3d, R_gt=R, t_gt=rng.normal(size=(3, 1)), W_gt=perm,
                        num_points_2d=np.array([k]), num_points_3d=np.array([k])))
    # Sample 1 is padded to a fixed size by replication, as the original training set is.
    s = out[1]
    reps = 3
    s["p2d"], s["p3d"], s["W_gt"] = np.tile(s["p2d"], (reps, 1)), np.tile(s["p3d"], (reps, 1)), np.tile(s["W_gt"], reps)
    # Sample 2 has one unmatched 3D point (W_gt = m), to check the outlier convention.
    # Dropping the last 2D point leaves its 3D point with W_gt = m - 1, which is now m.
    s = out[2]
    m = len(s["p2d"]) - 1
    s["p2d"] = s["p2d"][:m]
    s["num_points_2d"] = np.array([m])
    assert np.sum(s["W_gt"] == m) == 1
    return out


def _write(root, dataset, split, samples, container):
    folder = root / f"{dataset}_{split}" / "preprocessed"
    folder.mkdir(parents=True)
    for key in PICKLE_KEYS:
        values = [s[key] for s in samples]
        if container == "dict":  # what the original pre-processing script wrote
            obj = {i: v for i, v in enumerate(values)}
        elif container == "object_array":
            obj = np.empty(len(values), dtype=object)
            obj[:] = values
        else:
            obj = values
        with open(folder / f"{key}.pkl", "wb") as f:
            pickle.dump(obj, f)
    return folder


@pytest.mark.parametrize("container", ["list", "dict", "object_array"])
def test_round_trip(tmp_path, container):
    originals = _originals()
    _write(tmp_path, "modelnet40", "test", originals, container)
    ds = PickleDataset(tmp_path, "modelnet40", "test")
    assert len(ds) == len(originals)
    for i, o in enumerate(originals):
        scene = ds[i]
        m, n = int(o["num_points_2d"][0]), int(o["num_points_3d"][0])
        np.testing.assert_array_equal(scene["p2d"], o["p2d"][:m])
        np.testing.assert_array_equal(scene["p3d"], o["p3d"][:n])
        np.testing.assert_array_equal(scene["R"], o["R_gt"])
        np.testing.assert_array_equal(scene["t"], o["t_gt"].ravel())
        # match[i] = j with W_gt[j] == i; replicas beyond num_points are gone.
        W = o["W_gt"][:n]
        for j in range(n):
            if W[j] < m:
                assert scene["match"][W[j]] == j
        assert np.sum(scene["match"] >= 0) == np.sum(W < m)
        assert scene["index"] == i
    # Sample 2: the 3D point with W_gt = m is unmatched, and p2d[i] still pairs with p3d[match[i]].
    assert np.sum(ds[2]["match"] >= 0) == len(ds[2]["p2d"])
    assert len(ds[2]["p3d"]) == len(ds[2]["p2d"]) + 1


def test_pairs_are_geometrically_consistent(tmp_path):
    """Pairs built from a real projection survive the W_gt encoding."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(8, 3)) + [0, 0, 6]
    x = X[:, :2] / X[:, 2:]
    perm = rng.permutation(8)
    sample = dict(p2d=x, p3d=X[perm], R_gt=np.eye(3), t_gt=np.zeros(3), W_gt=perm,
                  num_points_2d=8, num_points_3d=np.array([8]))
    scene = bpnpnet_to_scene(sample, "s")
    P = scene["p3d"][scene["match"]]
    np.testing.assert_allclose(P[:, :2] / P[:, 2:], scene["p2d"])


def test_data61_inverted_w_gt(tmp_path):
    o = _originals(3)
    for s in o[:1]:
        s["W_gt"] = np.argsort(s["W_gt"])  # per 2D point: the 3D index
    _write(tmp_path, "data61_2d3d", "test", o[:1], "list")
    ds = PickleDataset(tmp_path, "data61_2d3d", "test")
    assert ds.w_gt_per == "2d"
    scene = ds[0]
    np.testing.assert_array_equal(scene["match"], o[0]["W_gt"])


def test_errors_name_the_file(tmp_path):
    with pytest.raises(PickleFormatError, match="no such directory"):
        load_bpnpnet_split(tmp_path, "modelnet40", "train")
    folder = _write(tmp_path, "modelnet40", "train", _originals(3), "list")
    data = (folder / "p3d.pkl").read_bytes()
    (folder / "p3d.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(PickleFormatError, match=re.escape(str(folder / "p3d.pkl")) + ": unreadable or truncated"):
        load_bpnpnet_split(tmp_path, "modelnet40", "train")
    with open(folder / "p3d.pkl", "wb") as f:
        pickle.dump([np.zeros((3, 3))] * 2, f)
    with pytest.raises(PickleFormatError, match="different sample counts"):
        load_bpnpnet_split(tmp_path, "modelnet40", "train")
    (folder / "W_gt.pkl").unlink()
    with pytest.raises(PickleFormatError, match=re.escape(str(folder / "W_gt.pkl")) + ": missing"):
        load_bpnpnet_split(tmp_path, "modelnet40", "train")


def test_datamodule_pickles_split_val_from_train(tmp_path):
    _write(tmp_path, "megadepth", "train", _originals(10, seed=1), "dict")
    _write(tmp_path, "megadepth", "test", _originals(4, seed=2), "dict")
    dm = BlindPnPDataModule(source="pickles", root=str(tmp_path), dataset="megadepth",
                            val_fraction=0.3, batch_size=2)
    dm.setup()
    train, val, test = dm.dataset("train"), dm.dataset("val"), dm.dataset("test")
    assert (len(train), len(val), len(test)) == (7, 3, 4)
    assert not set(train.indices) & set(val.indices)
    batch = next(iter(dm.test_dataloader()))
    assert batch["p2d"].shape[0] == 2 and batch["match"].dtype.is_floating_point is False
    with pytest.raises(FileNotFoundError, match="neither"):
        BlindPnPDataModule(source="pickles", root=str(tmp_path), dataset="modelnet40")
