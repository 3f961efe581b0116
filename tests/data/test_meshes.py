"""The mesh family: splits, loading/normalisation, determinism, occlusion against ray casting,
detection rate, the data module's split plumbing and export. Most tests use tiny meshes written
to a temporary folder; the rest read the embedded meshes of ``data/meshes`` (always present), and
one reads the project's full shared set (``../shared/data/meshes``) and skips without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh", reason="trimesh (requirements.txt) is needed by the mesh family")

from bpnp.data import meshes as M  # noqa: E402
from bpnp.data.embedded import MESH_ROOT  # noqa: E402
from bpnp.data.scenes import validate_scene  # noqa: E402
from bpnp.data.synthetic import SyntheticConfig, make_instance  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = MESH_ROOT
SHARED = REPO.parent / "shared" / "data" / "meshes"
shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the project's full shared mesh set, "
                                                       f"not found at {SHARED} (the embedded set is tested)")


def _two_boxes() -> trimesh.Trimesh:
    """Two separate unit-ish boxes side by side (parts occlude each other from many views)."""
    a = trimesh.creation.box(extents=[1.0, 1.0, 1.0])
    b = trimesh.creation.box(extents=[0.6, 1.4, 0.8])
    b.apply_translation([1.3, 0.2, 0.1])
    return trimesh.util.concatenate([a, b])


def _open_room() -> trimesh.Trimesh:
    """A 6 x 4 x 2.5 box without its ceiling, plus a table-like block inside (not watertight)."""
    room = trimesh.creation.box(extents=[6.0, 4.0, 2.5])
    up = room.face_normals[:, 2] > 0.9
    room.update_faces(~up)
    room.remove_unreferenced_vertices()
    block = trimesh.creation.box(extents=[1.0, 0.8, 0.8])
    block.apply_translation([1.5, 0.5, -0.85])
    return trimesh.util.concatenate([room, block])


def _terrain() -> trimesh.Trimesh:
    n = 21
    x, y = np.meshgrid(np.linspace(-5, 5, n), np.linspace(-5, 5, n))
    zz = 0.6 * np.sin(x) * np.cos(0.7 * y)
    verts = np.c_[x.ravel(), y.ravel(), zz.ravel()]
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.r_[np.c_[a, b, d], np.c_[a, d, c]]
    return trimesh.Trimesh(verts, faces, process=False)


@pytest.fixture(scope="module")
def mesh_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meshes")
    files = {
        "CAD/two_boxes.ply": _two_boxes(),
        "CAD/sphere.ply": trimesh.creation.icosphere(subdivisions=2, radius=50.0),
        "CAD/cyl.stl": trimesh.creation.cylinder(radius=0.3, height=2.0),
        "CAD/capsule.off": trimesh.creation.capsule(height=1.0, radius=0.4),
        "furniture/table.obj": trimesh.creation.box(extents=[1.2, 0.8, 0.1]),
        "room/room.ply": _open_room(),
        "terrain/hills.ply": _terrain(),
        "building/tower.ply": trimesh.creation.box(extents=[10.0, 10.0, 30.0]),
        "vehicle/car.ply": trimesh.creation.box(extents=[4.0, 1.8, 1.4]),
        "vehicle/bus.ply": trimesh.creation.box(extents=[12.0, 2.5, 3.0]),
    }
    for rel, mesh in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        mesh.export(root / rel)
    (root / "CAD" / "notes.txt").write_text("not a mesh")
    return root


def _cfg(root, **kw) -> SyntheticConfig:
    base = dict(shape_weights={"mesh": 1.0}, mesh_root=str(root), num_points_2d=(60, 100),
                occlusion_px=4.0, image_width=640, fov_deg=(40.0, 80.0), noise_px=0.0,
                outliers_3d="surface", outliers_2d="image", detection_rate=(0.3, 0.9),
                outlier_frac_2d=(0.0, 0.4), outlier_frac_3d=(0.0, 0.4), occlusion_samples=8000,
                heldout_mesh_frac=0.0)
    base.update(kw)
    return SyntheticConfig(**base)


def _only(category: str) -> dict[str, float]:
    return {c: float(c == category) for c in M.CATEGORIES}


# --- splits -----------------------------------------------------------------------------------


def _fake_files():
    counts = {"CAD": 15, "building": 12, "furniture": 16, "organic_scan": 28, "other": 20,
              "room": 6, "terrain": 4, "vehicle": 14}
    return [f"{c}/m{i:02d}.obj" for c, n in counts.items() for i in range(n)]


def test_split_is_a_disjoint_deterministic_cover():
    files = _fake_files()
    s = M.split_meshes(files, "vehicle", 0.2)
    parts = [set(s[k]) for k in ("train", "val", "test_unseen_meshes", "test_unseen_category")]
    assert sum(len(p) for p in parts) == len(files) and set().union(*parts) == set(files)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not parts[i] & parts[j]
    assert s["all"] == sorted(files)
    assert all(f.startswith("vehicle/") for f in s["test_unseen_category"]) and len(s["test_unseen_category"]) == 14
    assert not any(f.startswith("vehicle/") for f in s["train"] + s["val"] + s["test_unseen_meshes"])
    for cat in ("CAD", "building", "furniture", "organic_scan", "other", "room", "terrain"):
        n = {k: sum(f.startswith(cat + "/") for f in s[k]) for k in ("train", "val", "test_unseen_meshes")}
        assert n["val"] >= 1 and n["test_unseen_meshes"] >= 1 and n["train"] >= 1, (cat, n)
    # Deterministic and independent of the input order (a name hash, not Python's salted hash).
    assert M.split_meshes(list(reversed(files)), "vehicle", 0.2) == s
    again = M.split_meshes([f for f in files if f != "CAD/m00.obj"] + ["CAD/m00.obj"], "vehicle", 0.2)
    assert again == s
    other = M.split_meshes(files, "furniture", 0.2)
    assert set(other["test_unseen_category"]) == {f for f in files if f.startswith("furniture/")}


def test_split_frac_zero_and_none_category():
    files = _fake_files()
    s = M.split_meshes(files, None, 0.0)
    assert s["train"] == sorted(files) and not s["val"] and not s["test_unseen_category"]
    with pytest.raises(ValueError, match="heldout_mesh_frac"):
        M.split_meshes(files, "vehicle", 1.0)


@shared
def test_shared_split_counts_and_cli(capsys):
    files = M.list_meshes(SHARED)
    assert len(files) == 115
    s = M.split_meshes(files, "vehicle", 0.2)
    assert {k: len(v) for k, v in s.items()} == {"train": 79, "val": 12, "test_unseen_meshes": 10,
                                                 "test_unseen_category": 14, "all": 115}
    assert M.main(["--root", str(SHARED)]) == 0
    out = capsys.readouterr().out
    assert "vehicle" in out and "79" in out and "test_unseen_category" in out


def test_embedded_split_counts_and_cli(capsys):
    """The embedded set (data/meshes) and its splits, as docs/data.md lists them; the CLI's
    default root is the embedded set."""
    files = M.list_meshes(EMBEDDED)
    assert len(files) == 88
    s = M.split_meshes(files, "vehicle", 0.2)
    assert {k: len(v) for k, v in s.items()} == {"train": 60, "val": 9, "test_unseen_meshes": 7,
                                                 "test_unseen_category": 12, "all": 88}
    assert all(f.startswith("vehicle/") for f in s["test_unseen_category"])
    assert M.main([]) == 0
    out = capsys.readouterr().out
    assert f"88 meshes under {EMBEDDED}" in out and "60" in out


def test_embedded_manifest_lists_every_file_with_a_redistributable_licence():
    """Every embedded mesh has a MANIFEST row (source, licence) and no row names a licence that
    forbids copying it here."""
    rows = [line for line in (EMBEDDED / "MANIFEST.md").read_text().splitlines() if line.startswith("| `")]
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    assert sorted(c[0].strip("`") for c in cells) == M.list_meshes(EMBEDDED)
    for c in cells:
        licence = c[5]
        assert any(k in licence for k in ("CC BY 3.0", "CC BY 4.0", "MIT", "public domain")), c[0]
        assert not any(k in licence for k in ("no repo licence", "GPL", "BY-SA")), c[0]
    assert {p.name for p in (EMBEDDED / "LICENSES").iterdir()} >= {"MIT.txt", "MIT-0.txt"}


def test_cli_lists_a_folder_and_reports_errors(mesh_root, capsys):
    assert M.main(["--root", str(mesh_root), "--list", "--heldout-mesh-frac", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "CAD/two_boxes.ply" in out and "notes.txt" not in out
    assert M.main(["--root", str(mesh_root / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --- loading, normalisation, cache ----------------------------------------------------------


def test_normalisation_unit_radius_centred_and_upright(mesh_root):
    m = M.load_mesh(mesh_root / "CAD" / "sphere.ply")  # radius 50 in the file
    r = np.linalg.norm(m.vertices[np.unique(m.faces)], axis=1)
    assert r.max() == pytest.approx(1.0, abs=1e-12)
    lo, hi = m.bounds
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-12)
    assert not m.two_sided  # closed: normals used for culling
    assert M.load_mesh(mesh_root / "room" / "room.ply").two_sided  # open: two-sided
    assert m.area == pytest.approx(m.areas.sum())
    tower = M.load_mesh(mesh_root / "building" / "tower.ply")
    assert np.ptp(tower.vertices[:, 2]) > np.ptp(tower.vertices[:, 0])  # z stays up


def test_sampling_is_on_the_surface_and_area_weighted(mesh_root):
    m = M.load_mesh(mesh_root / "CAD" / "sphere.ply")
    p, n = m.sample(np.random.default_rng(0), 5000)
    r = np.linalg.norm(p, axis=1)
    assert r.max() <= 1.0 + 1e-9 and r.min() > 0.9  # on the icosphere's facets
    assert np.all(np.einsum("ij,ij->i", n, p) > 0)  # outward normals
    box = M.load_mesh(mesh_root / "furniture" / "table.obj")  # 1.2 x 0.8 x 0.1 slab
    p, n = box.sample(np.random.default_rng(1), 20000)
    top_bottom = np.abs(n[:, 2]) > 0.9
    expected = 2 * 1.2 * 0.8 / (2 * (1.2 * 0.8 + 1.2 * 0.1 + 0.8 * 0.1))
    assert top_bottom.mean() == pytest.approx(expected, abs=0.02)


def test_instances_are_deterministic_across_a_fresh_cache(mesh_root):
    cfg = _cfg(mesh_root)
    a = [make_instance(cfg, 9, i) for i in range(4)]
    M.clear_mesh_cache()
    b = [make_instance(cfg, 9, i) for i in range(4)]
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert not np.array_equal(a[0]["R"], a[1]["R"])


@pytest.mark.parametrize("category", ["CAD", "furniture", "room", "terrain", "building"])
def test_each_view_mode_gives_valid_instances(mesh_root, category):
    cfg = _cfg(mesh_root, mesh_category_weights=_only(category))
    for i in range(3):
        s = make_instance(cfg, 1, i)
        validate_scene(s, f"{category}/{i}")
        sel = s["match"] >= 0
        X = s["p3d"][s["match"][sel]] @ s["R"].T + s["t"]
        np.testing.assert_allclose(X[:, :2] / X[:, 2:3], s["p2d"][sel], atol=1e-12)  # noise-free
        assert np.all(X[:, 2] > 0)
        out = s["p2d"][~sel] * s["K"][0, 0] + s["K"][:2, 2]
        assert np.all((out >= 0) & (out <= s["image_size"]))
    if category == "room":  # the camera is inside the room's bounding box
        lo, hi = s["p3d"].min(0), s["p3d"].max(0)
        c = -s["R"].T @ s["t"]
        assert np.all((c > lo) & (c < hi))


def test_mesh_split_selects_the_meshes(mesh_root):
    files, p = M.mesh_choices(mesh_root, "test_unseen_category", "vehicle", 0.0)
    assert set(files) == {"vehicle/bus.ply", "vehicle/car.ply"} and p.sum() == pytest.approx(1.0)
    files, _ = M.mesh_choices(mesh_root, "train", "vehicle", 0.0)
    assert not any(f.startswith("vehicle/") for f in files)
    files, p = M.mesh_choices(mesh_root, "train", "vehicle", 0.0, {"CAD": 3.0, "room": 1.0})
    assert {f.split("/")[0] for f in files} == {"CAD", "room"}
    assert p[[f.startswith("room/") for f in files]].sum() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no mesh"):
        _cfg(mesh_root, mesh_split="val")  # frac 0: nothing held out


# --- occlusion and detection against ground truth ---------------------------------------------


def _ray_blocked(origin, points, V, F, eps=1e-3):
    """Brute force: does the segment origin -> point hit a triangle before (1 - eps) of the way?"""
    tri = V[F]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    d = points - origin
    p = np.cross(d[:, None, :], e2[None])
    det = np.einsum("fk,rfk->rf", e1, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / det
        tv = origin - tri[:, 0]
        u = np.einsum("fk,rfk->rf", tv, p) * inv
        q = np.cross(tv, e1)
        v = np.einsum("rk,fk->rf", d, q) * inv
        t = np.einsum("fk,fk->f", e2, q)[None] * inv
        hit = (np.abs(det) > 1e-14) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6) & (t < 1 - eps)
    return hit.any(1)


@pytest.fixture(scope="module")
def boxes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("boxes")
    (root / "CAD").mkdir()
    _two_boxes().export(root / "CAD" / "two_boxes.ply")
    return root


def _leak_rate(root, monkeypatch, **kw):
    """(occluded, total) matched 3D points of two-box instances, by ray casting."""
    import bpnp.data.synthetic as S

    made = []
    real = S._make_mesh
    monkeypatch.setattr(S, "_make_mesh", lambda rng, cfg: made.append(real(rng, cfg)) or made[-1])
    cfg = _cfg(root, outlier_frac_3d=0.0, **kw)
    mesh = M.load_mesh(root / "CAD" / "two_boxes.ply")
    blocked = total = 0
    for i in range(30):
        s = make_instance(cfg, 2, i)
        P = s["p3d"][s["match"][s["match"] >= 0]]
        b = _ray_blocked(-s["R"].T @ s["t"], P, mesh.vertices * made[-1].radius, mesh.faces)
        blocked += int(b.sum())
        total += len(b)
    return blocked, total


def test_matched_points_are_not_occluded_by_ray_casting(boxes_root, monkeypatch):
    blocked, total = _leak_rate(boxes_root, monkeypatch)
    assert total > 300, "too few two-box instances drawn"
    assert blocked / total < 0.01, f"{blocked} of {total} matched points are occluded"


def test_without_occlusion_some_matched_points_are_occluded(boxes_root, monkeypatch):
    # The brute-force check above can fail: without the z-buffer it finds occluded matches.
    blocked, total = _leak_rate(boxes_root, monkeypatch, occlusion_px=0.0)
    assert total > 300 and blocked / total > 0.02


def test_detection_rate_sets_the_visible_share_of_3d_outliers(tmp_path):
    # A closed sphere without occlusion: a point is visible iff it faces the camera and is in view
    # (the whole sphere is in view), so facing 3D outliers are visible-undetected ones.
    (tmp_path / "CAD").mkdir()
    trimesh.creation.icosphere(subdivisions=3).export(tmp_path / "CAD" / "ball.ply")

    def facing_share(rate):
        cfg = _cfg(tmp_path, detection_rate=rate, outlier_frac_3d=0.5, occlusion_px=0.0, num_points_2d=80)
        shares = []
        for i in range(10):
            s = make_instance(cfg, 3, i)
            used = np.zeros(len(s["p3d"]), dtype=bool)
            used[s["match"][s["match"] >= 0]] = True
            P, c = s["p3d"][~used], -s["R"].T @ s["t"]
            view = (c - P) / np.linalg.norm(c - P, axis=1, keepdims=True)
            # clearly facing (facets differ from the radial direction near the silhouette)
            shares.append(np.mean(np.einsum("ij,ij->i", P / np.linalg.norm(P, axis=1, keepdims=True), view) > 0.1))
        return float(np.mean(shares))

    assert facing_share(1.0) == 0.0  # every 3D outlier is hidden (back-facing)
    assert 0.15 < facing_share(0.3) < 0.9  # many visible points had no keypoint (~ 0.7 / (0.7 + H / V))


# --- plumbing: data module and export -----------------------------------------------------------


def test_datamodule_uses_honest_mesh_splits(mesh_root):
    from bpnp.data.datamodule import BlindPnPDataModule

    syn = dict(shape_weights={"mesh": 1.0}, mesh_root=str(mesh_root), num_points_2d=[20, 30],
               heldout_mesh_frac=0.5, occlusion_px=4.0, occlusion_samples=2000)
    dm = BlindPnPDataModule(source="synthetic", synthetic=syn, batch_size=2, train_length=4,
                            val_length=2, test_length=2, seed=0)
    splits = {s: dm.dataset(s).cfg.mesh_split for s in ("train", "val", "test")}
    assert splits == {"train": "train", "val": "val", "test": "test_unseen_meshes"}
    dm2 = BlindPnPDataModule(source="synthetic", synthetic=syn, test_synthetic={"mesh_split": "test_unseen_category"},
                             batch_size=2, train_length=4, val_length=2, test_length=2, seed=0)
    assert dm2.dataset("test").cfg.mesh_split == "test_unseen_category"
    assert len(dm2.dataset("test")[0]["p2d"]) >= 20
    with pytest.raises(ValueError, match="mesh_split must be 'train'"):
        BlindPnPDataModule(source="synthetic", synthetic={**syn, "mesh_split": "all"})
    with pytest.raises(ValueError, match="mesh_split must be 'train'"):
        BlindPnPDataModule(source="synthetic", synthetic=syn, synthetic_schedule={3: {"mesh_split": "val"}})
    with pytest.raises(ValueError, match="heldout_mesh_frac differs"):
        BlindPnPDataModule(source="synthetic", synthetic=syn, val_synthetic={"heldout_mesh_frac": 0.2})


def test_export_writes_a_split_of_unseen_category(mesh_root, tmp_path):
    from bpnp.data.export import main
    from bpnp.data.scenes import load_scene

    out = tmp_path / "unseen"
    rc = main(["synthetic", "--preset", "world", "--out", str(out), "--num", "2", "--seed", "1",
               "--min-points", "30", "--max-points", "40", "--quiet", "--set", f"mesh_root={mesh_root}",
               "--set", "mesh_split=test_unseen_category", "--set", "shape_weights={mesh: 1.0}",
               "--set", "occlusion_samples=3000"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    cfg = SyntheticConfig.from_dict(index["config"])
    assert cfg.mesh_split == "test_unseen_category" and cfg.outliers_3d == "surface"
    ref = make_instance(cfg, 1, 1)
    got = load_scene(out / "000001.npz")
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


# --- the embedded meshes --------------------------------------------------------------------------


def test_embedded_meshes_load_normalised_one_per_category():
    files = M.list_meshes(EMBEDDED)
    for cat in M.CATEGORIES:
        rel = min((f for f in files if f.startswith(cat + "/")), key=lambda f: (EMBEDDED / f).stat().st_size)
        m = M.load_mesh(EMBEDDED / rel)
        assert m.category == cat
        assert np.linalg.norm(m.vertices[np.unique(m.faces)], axis=1).max() == pytest.approx(1.0)
        assert m.area > 0 and len(m.faces) > 0


def test_embedded_world_instances_are_deterministic_and_valid():
    cfg = SyntheticConfig.world(EMBEDDED, num_points_2d=(60, 100), occlusion_samples=5000)
    a = [make_instance(cfg, 0, i) for i in range(3)]
    M.clear_mesh_cache()
    for i, x in enumerate(a):
        validate_scene(x, f"embedded/{i}")
        y = make_instance(cfg, 0, i)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_preload_reads_every_mesh_of_the_split_once():
    """What the data module calls before forking DataLoader workers: every mesh the training
    split can draw lands in the process cache, so workers never read one again."""
    from bpnp.data.datasets import SyntheticDataset

    M.clear_mesh_cache()
    cfg = SyntheticConfig.world(mesh_root=str(EMBEDDED))
    ds = SyntheticDataset(cfg, seed=0, length=4, schedule={3: {**cfg.to_dict(), "mesh_split": "train"}})
    files, _ = M.mesh_choices(EMBEDDED, "train")
    assert ds.preload_meshes() == len(files) > 0
    assert M._load.cache_info().currsize == len(files)
    misses = M._load.cache_info().misses
    for i in range(4):
        ds[i]
    assert M._load.cache_info().misses == misses  # instances read no file
