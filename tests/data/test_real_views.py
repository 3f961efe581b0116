"""New views of the embedded real COLMAP models (bpnp.data.real_views) and the COLMAP training mix
(bpnp.data.mixing, BlindPnPDataModule(train_views=..., train_synthetic=...))."""

from __future__ import annotations

import numpy as np
import pytest

from bpnp.data.colmap import read_model
from bpnp.data.datamodule import BlindPnPDataModule
from bpnp.data.datasets import ColmapDataset
from bpnp.data.embedded import MESH_ROOT, REAL_ROOT
from bpnp.data.mixing import MixedDataset, RealViewsDataset, mix_counts
from bpnp.data.real_views import RealViews, ViewConfig, main
from bpnp.data.scenes import validate_scene

MODELS = ("lund_door", "maupertuis")


@pytest.fixture(scope="module")
def models():
    return {name: read_model(REAL_ROOT / name) for name in MODELS}


def _pixel_residuals(scene) -> np.ndarray:
    """Pixel distance between each true pair's 2D point and the projection of its 3D point."""
    match, K = scene["match"], scene["K"]
    ok = match >= 0
    X = scene["p3d"][match[ok]] @ scene["R"].T + scene["t"]
    return np.linalg.norm((X[:, :2] / X[:, 2:3] - scene["p2d"][ok]) * np.diag(K)[:2], axis=1)


def _angular_residuals(scene) -> np.ndarray:
    match = scene["match"]
    ok = match >= 0
    X = scene["p3d"][match[ok]] @ scene["R"].T + scene["t"]
    b = np.concatenate([scene["p2d"][ok], np.ones((ok.sum(), 1))], axis=1)
    cos = np.sum(X * b, axis=1) / np.linalg.norm(X, axis=1) / np.linalg.norm(b, axis=1)
    return np.arccos(np.clip(cos, -1.0, 1.0))


@pytest.mark.parametrize("name", MODELS)
def test_views_validate_and_reproject_at_the_noise_level(models, name):
    noise = 1.0
    views = RealViews(models[name], noise_px=noise)
    for i in range(6):
        scene = views.instance(0, i)
        out = validate_scene(scene, f"{name} view {i}")
        assert out["match"].max() < len(out["p3d"]) and np.sum(out["match"] >= 0) >= 16
        assert len(np.unique(out["match"][out["match"] >= 0])) == np.sum(out["match"] >= 0)
        # Gaussian noise of sigma px per coordinate: |n| is Rayleigh, median sigma sqrt(2 ln 2).
        px = _pixel_residuals(scene)
        assert np.median(px) == pytest.approx(noise * np.sqrt(2 * np.log(2)), rel=0.15)
        # Angular residual: at most |n| / f (less off-centre).
        f = scene["K"][0, 0]
        ang = np.median(_angular_residuals(scene)) * f
        assert 0.6 * noise < ang < 1.3 * noise
        w, h = scene["image_size"]
        assert 8 <= w <= models[name].cameras[1].width and 8 <= h <= models[name].cameras[1].height
    exact = RealViews(models[name], noise_px=0.0).instance(0, 0)
    assert np.max(_pixel_residuals(exact)) < 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_views_differ_from_every_registered_pose(models, name):
    model = models[name]
    views = RealViews(model, similarity=False)  # poses in the model's own world frame
    reg_c = np.stack([-im.R.T @ im.tvec for im in model.images.values()])
    reg_R = np.stack([im.R for im in model.images.values()])
    lo = views.cfg.offset_frac[0]
    for i in range(8):
        scene, info = views.instance(1, i, return_info=True)
        R, c = scene["R"], -scene["R"].T @ scene["t"]
        anchor = model.images[info["anchor_id"]]
        # By construction the centre leaves the anchor's by >= offset_frac[0] of its depth.
        d_anchor = np.linalg.norm(c - (-anchor.R.T @ anchor.tvec))
        assert d_anchor >= lo * info["depth"] * (1 - 1e-9) and info["offset_rel"] >= lo > 0
        dc = np.linalg.norm(reg_c - c, axis=1) / info["depth"]
        dR = np.degrees(np.arccos(np.clip((np.einsum("kij,ij->k", reg_R, R) - 1) / 2, -1, 1)))
        assert np.min(dc) > 1e-3 and np.all((dc > 1e-2) | (dR > 0.1))


def test_determinism_in_seed_and_index(models):
    model = models["lund_door"]
    a, b = RealViews(model), RealViews(model)
    for i in (0, 3):
        sa, sb = a.instance(5, i), b.instance(5, i)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    s0, s1, s2 = a.instance(5, 0), a.instance(5, 1), a.instance(6, 0)
    assert not np.array_equal(s0["R"], s1["R"]) and not np.array_equal(s0["R"], s2["R"])


def test_similarity_transform_leaves_reprojection_intact(models):
    model = models["maupertuis"]
    on, off = RealViews(model, noise_px=1.0), RealViews(model, noise_px=1.0, similarity=False)
    for i in range(3):
        a, b = on.instance(2, i), off.instance(2, i)
        for k in ("p2d", "match", "K", "image_size"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert not np.allclose(a["p3d"], b["p3d"])
        np.testing.assert_allclose(_pixel_residuals(a), _pixel_residuals(b), atol=1e-6)
        # The same similarity maps b's 3D points onto a's: distance ratios are constant.
        da = np.linalg.norm(a["p3d"][1:] - a["p3d"][:-1], axis=1)
        db = np.linalg.norm(b["p3d"][1:] - b["p3d"][:-1], axis=1)
        ratio = da / db
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
        assert 0.5 <= ratio[0] <= 2.0
        # All points in front of the camera project the same way (the camera frame scales by s).
        Xa = a["p3d"] @ a["R"].T + a["t"]
        Xb = b["p3d"] @ b["R"].T + b["t"]
        np.testing.assert_allclose(Xa, ratio[0] * Xb, rtol=1e-8, atol=1e-8 * np.abs(Xa).max())


@pytest.mark.parametrize("caps", [(200, 300), (1000, 150)])
def test_caps_and_outlier_fractions(models, caps):
    f2, f3 = 0.3, 0.4
    views = RealViews(models["lund_door"], max_points_2d=caps[0], max_points_3d=caps[1],
                      outlier_frac_2d=f2, outlier_frac_3d=f3)
    for i in range(5):
        scene = views.instance(0, i)
        m, n, k = len(scene["p2d"]), len(scene["p3d"]), int(np.sum(scene["match"] >= 0))
        assert m <= caps[0] and n <= caps[1]
        assert abs((m - k) / m - f2) < 0.02 and abs((n - k) / n - f3) < 0.02


def test_2d_outliers_come_from_real_keypoints_inside_the_window(models):
    views = RealViews(models["lund_door"], similarity=False, outlier_frac_2d=0.3)
    for i in range(3):
        scene, info = views.instance(0, i, return_info=True)
        assert info["outliers_2d_from_keypoints"] == np.sum(scene["match"] < 0)
        K, (w, h) = scene["K"], scene["image_size"]
        uv = scene["p2d"][scene["match"] < 0] * np.diag(K)[:2] + K[:2, 2]
        assert np.all((uv >= 0) & (uv <= [w, h]))
    # Far more outliers than the anchor's unmatched keypoints hold: topped up uniformly.
    many = RealViews(models["maupertuis"], outlier_frac_2d=0.95, max_points_2d=None, max_points_3d=None,
                     similarity=False)
    scene, info = many.instance(0, 0, return_info=True)
    assert info["outliers_2d_uniform"] > 0
    assert abs(np.mean(scene["match"] < 0) - 0.95) < 0.01


def test_config_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        ViewConfig.from_dict({"zoom_range": 1.0})
    with pytest.raises(ValueError, match="crop"):
        ViewConfig(crop=(0.5, 1.5))
    with pytest.raises(ValueError, match="outlier_frac_2d"):
        ViewConfig(outlier_frac_2d=1.0)


def test_dataset_determinism_and_epochs():
    dirs = [REAL_ROOT / n for n in MODELS]
    a = RealViewsDataset(dirs, length=6, seed=3, resample_each_epoch=True, noise_px=1.0)
    b = RealViewsDataset(dirs, length=6, seed=3, resample_each_epoch=True, noise_px=1.0)
    assert len(a) == 6 and a[2]["index"] == 2
    np.testing.assert_array_equal(a[2]["p2d"], b[2]["p2d"])
    first = a[2]["p2d"]
    a.set_epoch(1)
    assert not np.array_equal(a[2]["p2d"], first)
    a.set_epoch(0)
    np.testing.assert_array_equal(a[2]["p2d"], first)
    picked = {a.item(i)[1]["model"] for i in range(6)}
    assert picked <= set(MODELS)


def test_mixed_dataset_cycles_a_short_part():
    dirs = [REAL_ROOT / "maupertuis"]
    real = ColmapDataset(dirs, max_points_2d=100, max_points_3d=100)
    mix = MixedDataset([("real", real, 10)], seed=0)
    located = [mix.locate(i)[1] for i in range(10)]
    assert sorted(located[:4]) == [0, 1, 2, 3] and sorted(located[4:8]) == [0, 1, 2, 3]
    assert mix_counts(12, 0.5, 0.0, None) == {"real": 12, "views": 12, "synthetic": 0}
    assert mix_counts(12, 0.25, 0.25, 40) == {"real": 20, "views": 10, "synthetic": 10}


def _colmap_dm(**kw):
    return BlindPnPDataModule(source="colmap", root=str(REAL_ROOT), train_scenes=["lund_door"],
                              val_scenes=["maupertuis"], max_points_2d=200, max_points_3d=200,
                              batch_size=4, seed=0, resample_each_epoch=True, **kw)


def test_datamodule_mix_lengths_and_proportions():
    plain = _colmap_dm()
    real_len = len(plain.dataset("train"))
    assert real_len == 12
    dm = _colmap_dm(train_views={"mix": 0.5, "noise_px": 1.0},
                    train_synthetic={"mix": 0.25, "num_points_2d": [50, 100], "mesh_root": str(MESH_ROOT)})
    train = dm.dataset("train")
    assert isinstance(train, MixedDataset)
    assert len(train) == 48 and train.counts == {"real": 12, "views": 24, "synthetic": 12}
    kinds = [n.split(":")[0] for n in dm.names("train")]
    assert kinds.count("views") == 24 and kinds.count("synthetic") == 12 and kinds.count("real") == 12
    # The real slots are the real registered images, each once.
    assert sorted(n.split(":", 1)[1] for n in dm.names("train") if n.startswith("real:")) == sorted(plain.names("train"))
    # Validation is unchanged: the real registered images of maupertuis.
    assert dm.names("val") == plain.names("val")
    for i in range(len(dm.dataset("val"))):
        np.testing.assert_array_equal(dm.dataset("val")[i]["p2d"], plain.dataset("val")[i]["p2d"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["p2d"].shape[0] == 4 and "K" in batch
    for i in (12, 40):  # a view and a synthetic instance validate
        validate_scene(train[i], f"train item {i}")
    # A fixed length: real images subsampled to the remaining slots.
    fixed = _colmap_dm(train_views={"mix": 0.75, "length": 16})
    assert fixed.dataset("train").counts == {"real": 4, "views": 12}


def test_datamodule_mix_config_errors():
    with pytest.raises(ValueError, match="mix"):
        _colmap_dm(train_views={"noise_px": 1.0})
    with pytest.raises(ValueError, match="must be < 1"):
        _colmap_dm(train_views={"mix": 0.6}, train_synthetic={"mix": 0.4})
    with pytest.raises(ValueError, match="unknown keys"):
        _colmap_dm(train_views={"mix": 0.5, "zoom_range": [1, 2]})
    with pytest.raises(ValueError, match="mesh_split"):
        _colmap_dm(train_synthetic={"mix": 0.5, "mesh_split": "val"})


def test_cli_prints_statistics(capsys):
    assert main(["--model", str(REAL_ROOT / "lund_door"), "--num", "3"]) == 0
    out = capsys.readouterr().out
    assert "inliers k" in out and "focal length" in out
