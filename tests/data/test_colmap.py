"""COLMAP reader (text and binary), camera models and undistortion, image -> instance."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bpnp.data.cameras import CAMERA_MODELS, Camera, UnsupportedCameraError
from bpnp.data.colmap import ColmapFormatError, qvec_to_rotmat, read_model
from bpnp.data.instances import instance_from_image, instances_from_model

from bpnp.data.embedded import REAL_ROOT

#: The embedded models (data/real, always present) and the project's full shared set.
REAL = REAL_ROOT
SHARED_REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"

# From data/real/README.md and ../shared/data/real/README.md: images, 3D points, model, median
# matched / unmatched keypoints, median reprojection error (px).
EXPECTED = {
    "lund_door": (12, 11384, "SIMPLE_RADIAL", ".txt", 6278, 1657, 0.23),
    "maupertuis": (4, 1039, "SIMPLE_PINHOLE", ".txt", 877, 5205, 0.25),
}
#: A binary model of the shared set (the embedded two are text; the binary reader is also
#: covered on the embedded data by writing maupertuis as binary, below).
SHARED_EXPECTED = {"fountain_p11": (11, 14073, "SIMPLE_RADIAL", ".bin", 6786, 2992, 0.38)}


@pytest.fixture(scope="module")
def models():
    return {name: read_model(REAL / name) for name in EXPECTED}


def _reprojection_px(model, image):
    cam = model.cameras[image.camera_id]
    sel = image.point3D_ids >= 0
    X = model.xyz[model.rows_of(image.point3D_ids[sel])] @ image.R.T + image.tvec
    uv = cam.normalised_to_pixels(X[:, :2] / X[:, 2:3])
    return np.linalg.norm(uv - image.xys[sel], axis=1)


def _check_against_readme(model, folder, expected):
    n_img, n_pts, cam_model, ext, matched, unmatched, reproj = expected
    assert (folder / f"images{ext}").is_file()
    assert len(model.images) == n_img and len(model.point_ids) == n_pts
    assert {c.model for c in model.cameras.values()} == {cam_model}
    assert abs(np.median([np.sum(i.point3D_ids >= 0) for i in model.images.values()]) - matched) <= 1
    assert abs(np.median([np.sum(i.point3D_ids < 0) for i in model.images.values()]) - unmatched) <= 1
    err = np.concatenate([_reprojection_px(model, i) for i in model.images.values()])
    assert np.median(err) < 1.0
    assert np.median(err) == pytest.approx(reproj, abs=0.02)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_embedded_models_match_the_data_readme(models, name):
    _check_against_readme(models[name], REAL / name, EXPECTED[name])


@pytest.mark.skipif(not SHARED_REAL.is_dir(), reason=f"needs the project's full shared set of COLMAP "
                    f"models, not found at {SHARED_REAL} (the embedded models are tested)")
@pytest.mark.parametrize("name", list(SHARED_EXPECTED))
def test_shared_binary_model_matches_the_data_readme(name):
    _check_against_readme(read_model(SHARED_REAL / name), SHARED_REAL / name, SHARED_EXPECTED[name])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_instances_reproject_below_one_pixel(models, name):
    model = models[name]
    for image_id, scene in instances_from_model(model, max_points_2d=3000, max_points_3d=4000, seed=1):
        sel = scene["match"] >= 0
        X = scene["p3d"][scene["match"][sel]] @ scene["R"].T + scene["t"]
        err = np.linalg.norm(X[:, :2] / X[:, 2:3] - scene["p2d"][sel], axis=1) * scene["K"][0, 0]
        assert np.median(err) < 1.0, (name, image_id)
        assert len(scene["p2d"]) <= 3000 and len(scene["p3d"]) <= 4000
        w, h = scene["image_size"]
        assert (w, h) == (model.cameras[model.images[image_id].camera_id].width,
                          model.cameras[model.images[image_id].camera_id].height)


def test_instance_keeps_inlier_ratio_and_is_seeded(models):
    model = models["lund_door"]
    image = model.images[1]
    ratio = np.mean(image.point3D_ids >= 0)
    a = instance_from_image(model, 1, max_points_2d=1000, max_points_3d=1200, outlier_frac_3d=0.4, rng=5)
    b = instance_from_image(model, 1, max_points_2d=1000, max_points_3d=1200, outlier_frac_3d=0.4, rng=5)
    c = instance_from_image(model, 1, max_points_2d=1000, max_points_3d=1200, outlier_frac_3d=0.4, rng=6)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["p2d"], c["p2d"])
    assert len(a["p2d"]) == 1000
    assert np.mean(a["match"] >= 0) == pytest.approx(ratio, abs=0.002)
    n_in = len(np.unique(a["match"][a["match"] >= 0]))
    assert (len(a["p3d"]) - n_in) / len(a["p3d"]) == pytest.approx(0.4, abs=0.01)
    # All keypoints, no cap: every keypoint kept, real outliers are -1.
    full = instance_from_image(model, 1, rng=0)
    assert len(full["p2d"]) == len(image.xys)
    assert np.sum(full["match"] < 0) == np.sum(image.point3D_ids < 0)


def test_instance_errors(models):
    with pytest.raises(KeyError, match="no image with id 999"):
        instance_from_image(models["maupertuis"], 999)
    with pytest.raises(ValueError, match="outlier_frac_3d"):
        instance_from_image(models["maupertuis"], 4, outlier_frac_3d=1.0)


# --- corrupt and truncated files -------------------------------------------------------------


def _copy_model(name, tmp_path):
    """A writable copy of an embedded model; ``maupertuis_bin`` is maupertuis written as a
    binary model (``_write_bin``), for the binary reader's error paths."""
    dst = tmp_path / name
    if name == "maupertuis_bin":
        dst.mkdir()
        _write_bin(read_model(REAL / "maupertuis"), dst)
        return dst
    shutil.copytree(REAL / name, dst)
    for p in dst.iterdir():
        p.chmod(0o644)  # a read-only checkout stays untouched
    return dst


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "name, part, keep, pattern",
    [
        ("maupertuis", "images.txt", 0.5, r"images\.txt:\d+: POINTS2D needs triples|images\.txt: header declares"),
        ("maupertuis", "points3D.txt", 0.5, r"points3D\.txt(:\d+)?: "),
        ("maupertuis_bin", "images.bin", 0.5, r"images\.bin: byte \d+: .*truncated"),
        ("maupertuis_bin", "points3D.bin", 0.7, r"points3D\.bin: byte \d+: "),
        ("maupertuis_bin", "cameras.bin", 0.9, r"cameras\.bin: byte \d+: .*truncated"),
    ],
)
def test_truncated_files_raise_naming_file_and_position(tmp_path, name, part, keep, pattern):
    d = _copy_model(name, tmp_path)
    _truncate(d / part, keep)
    with pytest.raises(ColmapFormatError, match=re.escape(str(d) + "/") + pattern):
        read_model(d)


def test_text_file_truncated_at_a_line_boundary(tmp_path):
    d = _copy_model("maupertuis", tmp_path)
    lines = (d / "points3D.txt").read_text().splitlines(keepends=True)
    (d / "points3D.txt").write_text("".join(lines[:-10]))
    with pytest.raises(ColmapFormatError, match=r"points3D\.txt: header declares 1039 points but 1029"):
        read_model(d)
    # Without the header, the missing points are caught through the images that observe them.
    (d / "points3D.txt").write_text("".join(l for l in lines[:-10] if not l.startswith("#")))
    with pytest.raises(ColmapFormatError, match=r"images\.txt: image \d+ observes 3D point \d+, absent"):
        read_model(d)


def test_corrupt_binary_camera_model_and_trailing_bytes(tmp_path):
    d = _copy_model("maupertuis_bin", tmp_path)
    good = (d / "cameras.bin").read_bytes()
    data = bytearray(good)
    struct.pack_into("<i", data, 8 + 4, 99)  # model id of the first camera
    (d / "cameras.bin").write_bytes(bytes(data))
    with pytest.raises(ColmapFormatError, match=r"cameras\.bin: byte 8: camera 1: unknown camera model id 99"):
        read_model(d)
    (d / "cameras.bin").write_bytes(good)
    with open(d / "cameras.bin", "ab") as f:
        f.write(b"\x00\x01")
    with pytest.raises(ColmapFormatError, match="2 unexpected trailing bytes"):
        read_model(d)


def test_missing_parts(tmp_path):
    with pytest.raises(ColmapFormatError, match="not a directory"):
        read_model(tmp_path / "nope")
    (tmp_path / "cameras.txt").write_text("")
    with pytest.raises(ColmapFormatError, match="missing images.bin or images.txt"):
        read_model(tmp_path)


# --- binary reader against the text reader: write a text model as binary and read both -------


def _write_bin(model, d: Path) -> None:
    ids = {name: i for i, (name, _) in CAMERA_MODELS.items()}
    with open(d / "cameras.bin", "wb") as f:
        f.write(struct.pack("<Q", len(model.cameras)))
        for c in model.cameras.values():
            f.write(struct.pack("<iiQQ", c.id, ids[c.model], c.width, c.height))
            f.write(np.asarray(c.params, "<f8").tobytes())
    with open(d / "images.bin", "wb") as f:
        f.write(struct.pack("<Q", len(model.images)))
        for im in model.images.values():
            f.write(struct.pack("<idddddddi", im.id, *im.qvec, *im.tvec, im.camera_id))
            f.write(im.name.encode() + b"\x00")
            f.write(struct.pack("<Q", len(im.xys)))
            rec = np.zeros(len(im.xys), dtype=[("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
            rec["x"], rec["y"], rec["id"] = im.xys[:, 0], im.xys[:, 1], im.point3D_ids
            f.write(rec.tobytes())
    with open(d / "points3D.bin", "wb") as f:
        f.write(struct.pack("<Q", len(model.point_ids)))
        for k, pid in enumerate(model.point_ids):
            f.write(struct.pack("<QdddBBBdQ", pid, *model.xyz[k], *model.rgb[k], model.error[k], 2))
            f.write(struct.pack("<iiii", 1, 0, 2, 0))  # a dummy track of two elements


def test_binary_reader_agrees_with_text_reader(models, tmp_path):
    text = models["maupertuis"]
    _write_bin(text, tmp_path)
    binary = read_model(tmp_path)
    assert binary.cameras.keys() == text.cameras.keys()
    for cid, cam in text.cameras.items():
        assert binary.cameras[cid].model == cam.model
        np.testing.assert_array_equal(binary.cameras[cid].params, cam.params)
    np.testing.assert_array_equal(binary.point_ids, text.point_ids)
    np.testing.assert_array_equal(binary.xyz, text.xyz)
    np.testing.assert_array_equal(binary.rgb, text.rgb)
    for iid, im in text.images.items():
        b = binary.images[iid]
        assert b.name == im.name and b.camera_id == im.camera_id
        np.testing.assert_array_equal(b.qvec, im.qvec)
        np.testing.assert_array_equal(b.xys, im.xys)
        np.testing.assert_array_equal(b.point3D_ids, im.point3D_ids)


def test_text_model_from_scratch(tmp_path):
    """A tiny hand-written model with an OPENCV camera and an image without keypoints."""
    (tmp_path / "cameras.txt").write_text(
        "# Number of cameras: 1\n1 OPENCV 640 480 500 510 320 240 -0.1 0.01 0.001 -0.002\n")
    (tmp_path / "images.txt").write_text(
        "# Number of images: 2\n"
        "1 1 0 0 0 0 0 5 1 a b.jpg\n10 20 7 30 40 -1 50 60 9\n"
        "2 0.7071068 0.7071068 0 0 1 2 3 1 empty.jpg\n\n")
    (tmp_path / "points3D.txt").write_text(
        "7 0.1 0.2 3.0 255 0 0 0.5 1 0\n9 -0.3 0.1 4.0 0 255 0 0.2 1 2\n")
    model = read_model(tmp_path)
    assert model.images[1].name == "a b.jpg"
    np.testing.assert_array_equal(model.images[1].point3D_ids, [7, -1, 9])
    assert len(model.images[2].xys) == 0
    np.testing.assert_allclose(model.images[2].R, Rotation.from_euler("x", 90, degrees=True).as_matrix(),
                               atol=1e-6)
    assert model.cameras[1].focal == (500.0, 510.0)
    np.testing.assert_array_equal(model.rows_of(np.array([9, 7, 8])), [1, 0, -1])


def test_text_errors_name_the_line(tmp_path):
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 640 480 500 500 320\n")
    (tmp_path / "images.txt").write_text("")
    (tmp_path / "points3D.txt").write_text("")
    with pytest.raises(ColmapFormatError, match=r"cameras\.txt:1: PINHOLE needs 4 params, got 3"):
        read_model(tmp_path)
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 640 480 500 500 320 240\n")
    (tmp_path / "images.txt").write_text("# c\n1 1 0 0 0 0 0 5 1 a.jpg\n")
    with pytest.raises(ColmapFormatError, match=r"images\.txt:3: missing POINTS2D line of image 1"):
        read_model(tmp_path)
    (tmp_path / "images.txt").write_text("1 1 0 0 0 0 0 5 2 a.jpg\n1 2 -1\n")
    with pytest.raises(ColmapFormatError, match=r"images\.txt: image 1 refers to camera 2, absent"):
        read_model(tmp_path)


# --- camera models ------------------------------------------------------------------------------

CV2_CASES = {
    "SIMPLE_RADIAL": ([900.0, 320, 240, -0.08], [-0.08, 0, 0, 0]),
    "RADIAL": ([900.0, 320, 240, -0.2, 0.05], [-0.2, 0.05, 0, 0]),
    "OPENCV": ([900.0, 880, 330, 250, -0.25, 0.08, 0.001, -0.0015], [-0.25, 0.08, 0.001, -0.0015]),
    "FULL_OPENCV": ([900.0, 880, 330, 250, -0.25, 0.08, 0.001, -0.0015, 0.01, 0.02, -0.01, 0.005],
                    [-0.25, 0.08, 0.001, -0.0015, 0.01, 0.02, -0.01, 0.005]),
}


@pytest.mark.parametrize("model", list(CV2_CASES))
def test_undistortion_matches_opencv(model):
    params, dist = CV2_CASES[model]
    cam = Camera(1, model, 640, 480, np.array(params))
    rng = np.random.default_rng(0)
    uv = rng.uniform([0, 0], [640, 480], size=(500, 2))
    xy, ok = cam.pixels_to_normalised(uv)
    assert ok.all()
    ref = cv2.undistortPointsIter(
        uv.reshape(-1, 1, 2), cam.K, np.array(dist), None, None,
        (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 200, 1e-14),
    ).reshape(-1, 2)
    np.testing.assert_allclose(xy, ref, atol=1e-7)
    # And distortion forward agrees with cv2.projectPoints.
    X = np.concatenate([xy, np.ones((len(xy), 1))], axis=1)
    proj, _ = cv2.projectPoints(X, np.zeros(3), np.zeros(3), cam.K, np.array(dist))
    np.testing.assert_allclose(cam.normalised_to_pixels(xy), proj.reshape(-1, 2), atol=1e-6)
    np.testing.assert_allclose(cam.normalised_to_pixels(xy), uv, atol=1e-8)


def test_pinhole_models_and_unsupported():
    cam = Camera(1, "SIMPLE_PINHOLE", 100, 80, np.array([200.0, 50, 40]))
    xy, ok = cam.pixels_to_normalised(np.array([[250.0, 40.0]]))
    np.testing.assert_allclose(xy, [[1.0, 0.0]])
    assert ok.all() and not cam.has_distortion
    fish = Camera(2, "OPENCV_FISHEYE", 100, 80, np.zeros(8))
    with pytest.raises(UnsupportedCameraError, match="OPENCV_FISHEYE"):
        fish.pixels_to_normalised(np.zeros((1, 2)))


def test_qvec_to_rotmat_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = rng.normal(size=4)
        ref = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()  # scipy is scalar-last
        np.testing.assert_allclose(qvec_to_rotmat(q), ref, atol=1e-12)
    with pytest.raises(ValueError):
        qvec_to_rotmat(np.zeros(4))


def test_outliers_per_inlier_2d_sets_the_protocols_ratio(models):
    """The real-data protocols of docs/results.md: "easy" keeps a quarter as many unmatched
    keypoints as matched ones, then the 2D cap keeps that ratio."""
    model = models["maupertuis"]  # ~6 unmatched keypoints per matched one
    easy = instance_from_image(model, 1, outliers_per_inlier_2d=0.25, rng=0)
    k, j = int(np.sum(easy["match"] >= 0)), int(np.sum(easy["match"] < 0))
    assert j == round(0.25 * k)
    capped = instance_from_image(model, 1, outliers_per_inlier_2d=0.25, max_points_2d=300, rng=0)
    k2, j2 = int(np.sum(capped["match"] >= 0)), int(np.sum(capped["match"] < 0))
    assert k2 + j2 == 300 and abs(j2 / k2 - 0.25) < 0.02
    hard = instance_from_image(model, 1, max_points_2d=1000, rng=0)
    assert np.mean(hard["match"] < 0) > 0.7  # the image's own ratio
    with pytest.raises(ValueError, match="outliers_per_inlier_2d"):
        instance_from_image(model, 1, outliers_per_inlier_2d=-1.0)
