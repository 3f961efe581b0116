"""Scene files: round trip and every validation error, each naming the file."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bpnp.data.scenes import (SceneDirectory, SceneFileError, list_scenes, load_scene, save_scene,
                              validate_scene)


def _scene(m=6, n=5, optional=True):
    rng = np.random.default_rng(0)
    s = {
        "p2d": rng.normal(size=(m, 2)),
        "p3d": rng.normal(size=(n, 3)),
        "R": np.eye(3),
        "t": np.array([0.0, 0.0, 4.0]),
        "match": np.array([0, 1, 2, -1, 4, -1][:m]),
    }
    if optional:
        s["K"] = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
        s["image_size"] = np.array([640, 480])
    return s


@pytest.mark.parametrize("optional", [True, False])
def test_round_trip(tmp_path, optional):
    scene = _scene(optional=optional)
    path = save_scene(tmp_path / "0001.npz", scene)
    back = load_scene(path)
    assert set(back) == set(scene)
    for k in scene:
        np.testing.assert_array_equal(back[k], scene[k], err_msg=k)
    assert back["p2d"].dtype == np.float64 and back["match"].dtype == np.int64
    assert not list(tmp_path.glob(".tmp_*")), "temporary file left behind"


def test_save_appends_suffix_and_normalises_dtypes(tmp_path):
    scene = _scene()
    scene["p2d"] = scene["p2d"].astype(np.float32)
    scene["match"] = scene["match"].astype(np.int32)
    path = save_scene(tmp_path / "a", scene)
    assert path.name == "a.npz"
    back = load_scene(path)
    assert back["p2d"].dtype == np.float64 and back["match"].dtype == np.int64


def _write_raw(path, **arrays):
    np.savez(path, **arrays)
    return path


def _bad(scene, **changes):
    out = dict(scene)
    for k, v in changes.items():
        if v is None:
            del out[k]
        else:
            out[k] = v
    return out


BAD_CASES = [
    ("missing", dict(match=None), "missing key 'match'"),
    ("shape", dict(p2d=np.zeros((6, 3))), "'p2d' must have shape (k, 2), got (6, 3)"),
    ("match_len", dict(match=np.zeros(5, dtype=int)), "'match' must have shape (m,) = (6,) like 'p2d', got (5,)"),
    ("nan", dict(p3d=np.array([[np.nan, 0, 0]] * 5)), "'p3d' has 5 non-finite values"),
    ("range", dict(match=np.array([0, 1, 2, -1, 5, -1])), "match[4] = 5 not in [-1, 5)"),
    ("negative", dict(match=np.array([0, 1, 2, -2, 4, -1])), "out of range"),
    ("float_match", dict(match=np.array([0.5] * 6)), "'match' must hold integers"),
    ("empty", dict(p2d=np.zeros((0, 2)), match=np.zeros(0, dtype=int)), "'p2d' holds no points"),
    ("rotation", dict(R=2 * np.eye(3)), "'R' is not a rotation"),
    ("reflection", dict(R=np.diag([1.0, 1.0, -1.0])), "'R' is not a rotation"),
    ("K", dict(K=np.eye(2)), "'K' must have shape (3, 3)"),
    ("size", dict(image_size=np.array([640, 0])), "'image_size' must be positive"),
    ("string", dict(t=np.array(["a", "b", "c"])), "'t' must be numeric"),
]


@pytest.mark.parametrize("name, changes, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_load_rejects_bad_files_naming_them(tmp_path, name, changes, message):
    path = _write_raw(tmp_path / f"{name}.npz", **_bad(_scene(), **changes))
    with pytest.raises(SceneFileError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        load_scene(path)


@pytest.mark.parametrize("name, changes, message", BAD_CASES[:4], ids=[c[0] for c in BAD_CASES[:4]])
def test_save_validates_before_writing(tmp_path, name, changes, message):
    path = tmp_path / "x.npz"
    with pytest.raises(SceneFileError, match=re.escape(message)):
        save_scene(path, _bad(_scene(), **changes))
    assert not path.exists()


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_truncated_file(tmp_path, keep):
    path = save_scene(tmp_path / "0003.npz", _scene())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SceneFileError, match=re.escape(f"{path}: ")):
        load_scene(path)


def test_not_an_npz_and_missing_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_text("hello")
    with pytest.raises(SceneFileError, match=re.escape(f"{path}: unreadable")):
        load_scene(path)
    with pytest.raises(SceneFileError, match="no such file"):
        load_scene(tmp_path / "nope.npz")


def test_pickled_object_arrays_are_refused(tmp_path):
    scene = _scene()
    scene["p2d"] = np.array([object()] * 6, dtype=object)
    path = _write_raw(tmp_path / "obj.npz", **scene)
    with pytest.raises(SceneFileError, match=re.escape(str(path))):
        load_scene(path)


def test_validate_scene_names_the_scene():
    with pytest.raises(SceneFileError, match=r"^my scene: missing key 'p2d'$"):
        validate_scene({}, "my scene")


def test_list_and_directory(tmp_path):
    for name in ["b", "a", "c"]:
        save_scene(tmp_path / f"{name}.npz", _scene())
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_scenes(tmp_path)] == ["a.npz", "b.npz", "c.npz"]
    ds = SceneDirectory(tmp_path)
    assert len(ds) == 3 and ds.names == ["a", "b", "c"]
    item = ds[2]
    assert item["index"] == 2 and item["p2d"].shape == (6, 2)


def test_directory_errors(tmp_path):
    with pytest.raises(SceneFileError, match="does not exist"):
        SceneDirectory(tmp_path / "missing")
    with pytest.raises(SceneFileError, match="no .npz scene files"):
        SceneDirectory(tmp_path)
