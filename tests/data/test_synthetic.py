"""Synthetic generator: determinism, geometry of the matches, outlier counts, visibility."""

from __future__ import annotations

import numpy as np
import pytest

from bpnp.data.scenes import validate_scene
from bpnp.data.synthetic import FAMILIES, SyntheticConfig, make_instance

SMALL = dict(num_points_2d=(60, 120))


def _reproject(scene):
    sel = scene["match"] >= 0
    X = scene["p3d"][scene["match"][sel]] @ scene["R"].T + scene["t"]
    return X, X[:, :2] / X[:, 2:3], scene["p2d"][sel]


def test_same_seed_and_index_give_identical_arrays():
    cfg = SyntheticConfig(outlier_frac_2d=0.2, outlier_frac_3d=0.3, **SMALL)
    a = make_instance(cfg, 7, 3)
    np.random.seed(123)  # global state must not matter
    b = make_instance(cfg, 7, 3)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("other", [(7, 4), (8, 3)])
def test_different_seed_or_index_give_different_instances(other):
    cfg = SyntheticConfig(**SMALL)
    a, b = make_instance(cfg, 7, 3), make_instance(cfg, *other)
    assert a["p3d"].shape != b["p3d"].shape or not np.allclose(a["p3d"], b["p3d"])
    assert not np.allclose(a["R"], b["R"])


def test_key_order_of_shape_weights_does_not_change_the_stream():
    w = {"box": 1.0, "scene": 1.0, "torus": 2.0}
    a = make_instance(SyntheticConfig(shape_weights=w, **SMALL), 1, 1)
    b = make_instance(SyntheticConfig(shape_weights=dict(reversed(list(w.items()))), **SMALL), 1, 1)
    np.testing.assert_array_equal(a["p3d"], b["p3d"])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_a_valid_noise_free_instance(family):
    cfg = SyntheticConfig(shape_weights={family: 1.0}, noise_px=0.0, outlier_frac_2d=0.25,
                          outlier_frac_3d=0.25, **SMALL)
    for index in range(3):
        scene = make_instance(cfg, 0, index)
        validate_scene(scene, f"{family}/{index}")
        X, proj, p2d = _reproject(scene)
        np.testing.assert_allclose(proj, p2d, atol=1e-12)
        assert np.all(X[:, 2] > 0), "matched points must be in front of the camera"
        # Noise-free inliers project inside the image.
        w, h = scene["image_size"]
        uv = proj @ scene["K"][:2, :2].T + scene["K"][:2, 2]
        assert np.all((uv >= 0) & (uv < [w, h]))
        np.testing.assert_allclose(scene["R"] @ scene["R"].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(scene["R"]) == pytest.approx(1.0)


def test_matches_are_within_the_configured_noise():
    cfg = SyntheticConfig(noise_px=2.0, focal_px=500.0, num_points_2d=400)
    errs = []
    for index in range(5):
        _, proj, p2d = _reproject(make_instance(cfg, 11, index))
        errs.append((proj - p2d).ravel() * cfg.focal_px)  # back to pixels
    errs = np.concatenate(errs)
    assert np.std(errs) == pytest.approx(2.0, rel=0.1)
    assert np.max(np.abs(errs)) < 6 * 2.0


def test_outlier_fractions_and_match_structure():
    cfg = SyntheticConfig(num_points_2d=500, outlier_frac_2d=0.3, outlier_frac_3d=0.4)
    scene = make_instance(cfg, 2, 0)
    match, m, n = scene["match"], len(scene["p2d"]), len(scene["p3d"])
    assert m == 500
    assert np.sum(match == -1) == 150  # round(0.3 * 500) outliers exactly
    k = m - 150
    assert len(np.unique(match[match >= 0])) == k  # one 2D point per matched 3D point
    assert n - k == round(0.4 / 0.6 * k)
    # Shuffled: neither the outliers nor the matched 3D points sit in a block at the end/start.
    assert not np.all(match[:k] >= 0)
    assert not np.array_equal(np.sort(match[match >= 0]), np.arange(k))
    # 2D outliers lie in the inliers' bounding box, 3D outliers in the 3D inliers' box.
    inl2, out2 = scene["p2d"][match >= 0], scene["p2d"][match < 0]
    assert np.all(out2 >= inl2.min(0)) and np.all(out2 <= inl2.max(0))
    used = np.zeros(n, dtype=bool)
    used[match[match >= 0]] = True
    in3, out3 = scene["p3d"][used], scene["p3d"][~used]
    assert np.all(out3 >= in3.min(0) - 1e-12) and np.all(out3 <= in3.max(0) + 1e-12)


def test_hidden_surface_points_as_3d_outliers():
    cfg = SyntheticConfig(shape_weights={"scene": 1.0}, visible_only=False, outlier_frac_3d=0.5,
                          num_points_2d=200)
    scene = make_instance(cfg, 0, 5)
    used = np.zeros(len(scene["p3d"]), dtype=bool)
    used[scene["match"][scene["match"] >= 0]] = True
    X = scene["p3d"][~used] @ scene["R"].T + scene["t"]
    w, h = scene["image_size"]
    z = np.where(X[:, 2] > 0, X[:, 2], 1.0)
    uv = X[:, :2] / z[:, None] @ scene["K"][:2, :2].T + scene["K"][:2, 2]
    outside = (X[:, 2] <= 0) | np.any((uv < 0) | (uv >= [w, h]), axis=1)
    assert used.sum() == 200 and (~used).sum() == 200
    assert outside.mean() > 0.5, "hidden outliers should mostly be out of view"


def test_point_count_range_is_respected_and_k_is_metadata_free():
    cfg = SyntheticConfig(num_points_2d=(30, 40))
    sizes = {len(make_instance(cfg, 0, i)["p2d"]) for i in range(10)}
    assert sizes <= set(range(30, 41)) and len(sizes) > 1
    scene = make_instance(cfg, 0, 0)
    assert set(scene) == {"p2d", "p3d", "R", "t", "match", "K", "image_size"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"outlier_frac_2d": 1.0}, "outlier_frac_2d"),
        ({"outlier_frac_3d": (0.1, 1.2)}, "outlier_frac_3d"),
        ({"shape_weights": {"teapot": 1.0}}, "teapot"),
        ({"num_points_2d": (10, 5)}, "lo > hi"),
        ({"num_points_2d": 4, "outlier_frac_2d": 0.5}, "fewer than 4 inliers"),
        ({"focal_px": 0.0}, "focal_px"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


def test_from_dict_accepts_lists_and_rejects_unknown_keys():
    cfg = SyntheticConfig.from_dict({"num_points_2d": [10, 20], "noise_px": 0.5})
    assert cfg.num_points_2d == (10, 20) and cfg.noise_px == 0.5
    with pytest.raises(ValueError, match="unknown keys"):
        SyntheticConfig.from_dict({"num_point": 3})
    assert SyntheticConfig.from_dict(cfg.to_dict()) == cfg


def test_negative_seed_rejected():
    with pytest.raises(ValueError, match="seed"):
        make_instance(SyntheticConfig(**SMALL), -1, 0)
