"""BlindPnPDataModule and datasets: loaders per source, seeding, splits, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from bpnp.data.datamodule import BlindPnPDataModule
from bpnp.data.datasets import OutlierAugmented, SyntheticDataset, add_outliers
from bpnp.data.scenes import save_scene
from bpnp.data.synthetic import SyntheticConfig, make_instance

TINY = {"num_points_2d": [20, 40], "outlier_frac_2d": 0.2, "outlier_frac_3d": 0.2}


def _dm(**kw):
    args = dict(source="synthetic", synthetic=TINY, batch_size=4, train_length=12, val_length=4,
                test_length=4, seed=3)
    args.update(kw)
    return BlindPnPDataModule(**args)


def _first(loader):
    return next(iter(loader))


def test_synthetic_loaders_and_identical_first_batches():
    a, b = _dm(), _dm()
    a.setup("fit"), b.setup("fit")
    ba, bb = _first(a.train_dataloader()), _first(b.train_dataloader())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k
    assert ba["p2d"].shape[0] == 4 and ba["p2d"].dtype == torch.float32
    assert not torch.equal(ba["index"], torch.arange(4)), "train loader should shuffle"
    assert len(a.train_dataloader()) == 3 and len(a.val_dataloader()) == 1
    other = _first(_dm(seed=4).train_dataloader())
    assert ba["p2d"].shape != other["p2d"].shape or not torch.equal(ba["p2d"], other["p2d"])


def test_synthetic_splits_use_disjoint_seeds():
    dm = _dm()
    assert dm.seeds == {"train": 3, "val": 4, "test": 5}
    firsts = [dm.dataset(s)[0]["p3d"] for s in ("train", "val", "test")]
    assert not any(np.array_equal(firsts[i], firsts[j]) for i in range(3) for j in range(i + 1, 3))
    np.testing.assert_array_equal(firsts[1], make_instance(SyntheticConfig.from_dict(TINY), 4, 0)["p3d"])
    with pytest.raises(ValueError, match="seeds must differ"):
        _dm(val_seed=3)


def test_split_config_overrides_and_outlier_augmentation():
    dm = _dm(test_synthetic={"outlier_frac_2d": 0.5}, add_outlier_frac_3d=0.5)
    test = dm.dataset("test")
    assert isinstance(test, OutlierAugmented)
    scene = test[0]
    m, n = len(scene["p2d"]), len(scene["p3d"])
    assert np.mean(scene["match"] < 0) == pytest.approx(0.5, abs=1.0 / m)
    assert not isinstance(dm.dataset("train"), OutlierAugmented)
    np.testing.assert_array_equal(test[0]["p3d"], scene["p3d"])  # deterministic
    assert n > len(np.unique(scene["match"][scene["match"] >= 0])) * 2 - 2


def test_add_outliers():
    scene = make_instance(SyntheticConfig(num_points_2d=100), 0, 0)
    out = add_outliers(scene, 0.5, 0.25, np.random.default_rng(1))
    assert len(out["p2d"]) == 200 and len(out["p3d"]) == round(100 + 100 / 3)
    assert np.sum(out["match"] >= 0) == 100
    # Pairs survive the shuffle.
    sel = out["match"] >= 0
    X = out["p3d"][out["match"][sel]] @ out["R"].T + out["t"]
    err = np.linalg.norm(X[:, :2] / X[:, 2:3] - out["p2d"][sel], axis=1)
    assert np.max(err) < 10 / 800
    again = add_outliers(scene, 0.5, 0.25, 1)
    np.testing.assert_array_equal(again["p2d"], out["p2d"])
    assert not np.all(out["match"][:100] >= 0), "added outliers must not sit at the end"
    with pytest.raises(ValueError, match="frac_2d"):
        add_outliers(scene, 1.0, 0.0, 0)


def test_resample_each_epoch():
    ds = SyntheticDataset(TINY, seed=0, length=5, resample_each_epoch=True)
    first = ds[2]["p3d"]
    ds.set_epoch(1)
    assert not np.array_equal(ds[2]["p3d"], first)
    np.testing.assert_array_equal(ds[2]["p3d"], make_instance(ds.cfg, 0, 7)["p3d"])
    fixed = SyntheticDataset(TINY, seed=0, length=5)
    fixed.set_epoch(3)
    np.testing.assert_array_equal(fixed[2]["p3d"], first)


def test_synthetic_schedule_switches_training_sizes_by_epoch():
    dm = _dm(resample_each_epoch=True, synthetic_schedule={2: {"num_points_2d": [60, 60]}, "4": {"outlier_frac_2d": 0.0}})
    dm.setup("fit")
    ds = dm.dataset("train")
    sizes = {}
    for epoch in range(6):
        ds.set_epoch(epoch)
        sizes[epoch] = {len(ds[i]["p2d"]) for i in range(4)}
    assert all(20 <= s <= 40 for e in (0, 1) for s in sizes[e])
    assert sizes[2] == sizes[3] == {60}
    # Each stage overrides the base `synthetic`, not the previous stage: epoch 4 is back to 20-40
    # points, without outliers.
    assert all(20 <= s <= 40 for e in (4, 5) for s in sizes[e])
    ds.set_epoch(4)
    assert (ds[0]["match"] >= 0).all() and ds.cfg.num_points_2d == (20, 40)
    assert dm.dataset("val").cfg.num_points_2d == (20, 40)  # the schedule is for training only
    ds.set_epoch(0)
    again = _dm(resample_each_epoch=True, synthetic_schedule={2: {"num_points_2d": [60, 60]}})
    again.setup("fit")
    np.testing.assert_array_equal(ds[1]["p2d"], again.dataset("train")[1]["p2d"])  # same stream before epoch 2
    with pytest.raises(ValueError, match="synthetic_schedule"):
        _dm(synthetic_schedule={"later": {"num_points_2d": 10}})


def test_scenes_source(tmp_path):
    for i in range(5):
        save_scene(tmp_path / f"{i:04d}.npz", make_instance(SyntheticConfig.from_dict(TINY), 9, i))
    dm = BlindPnPDataModule(source="scenes", path=str(tmp_path), batch_size=2)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert dm.names("test") == ["0000", "0001", "0002", "0003", "0004"]
    assert dm.train_dataloader() == [] and dm.val_dataloader() == []
    np.testing.assert_allclose(batches[1]["R"][1].numpy(), make_instance(SyntheticConfig.from_dict(TINY), 9, 3)["R"], atol=1e-6)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'imagenet'"):
        BlindPnPDataModule(source="imagenet")
    with pytest.raises(FileNotFoundError, match="path=.*missing"):
        BlindPnPDataModule(source="scenes", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="set path"):
        BlindPnPDataModule(source="scenes")
    with pytest.raises(ValueError, match="unknown keys"):
        BlindPnPDataModule(synthetic={"bogus": 1})
    with pytest.raises(ValueError, match="add_outlier_frac_2d"):
        BlindPnPDataModule(add_outlier_frac_2d=1.5)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for part in ("cameras", "images", "points3D"):
            (tmp_path / name / f"{part}.txt").write_text("")
    with pytest.raises(ValueError, match="in both the train and test splits"):
        BlindPnPDataModule(source="colmap", root=str(tmp_path), train_scenes=["a", "b"], test_scenes=["b"])
    with pytest.raises(FileNotFoundError, match="train_scenes: COLMAP model folder .*missing_dir does not"):
        BlindPnPDataModule(source="colmap", root=str(tmp_path), train_scenes=["missing_dir"])
    (tmp_path / "a" / "images.txt").unlink()
    with pytest.raises(ValueError, match="missing images.bin or images.txt"):
        BlindPnPDataModule(source="colmap", root=str(tmp_path), test_scenes=["a"])


class _Dummy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, _):
        self.seen.append(batch["p2d"].shape)
        real = batch["p2d"][batch["mask2d"]]
        return (self.w - real.mean()).pow(2).sum()

    def validation_step(self, batch, _):
        self.log("val", batch["p3d"].sum(), batch_size=batch["p3d"].shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_runs_in_a_trainer():
    model = _Dummy()
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=_dm())
    assert len(model.seen) == 2 and model.seen[0][0] == 4
