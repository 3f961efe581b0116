"""Scene-set export: the CLI once in a subprocess, the rest in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bpnp.data.embedded import MESH_ROOT, REAL_ROOT
from bpnp.data.export import main
from bpnp.data.scenes import SceneDirectory, load_scene
from bpnp.data.synthetic import SyntheticConfig, make_instance

REPO = Path(__file__).resolve().parents[2]
REAL = REAL_ROOT


def test_cli_synthetic_subprocess(tmp_path):
    out = tmp_path / "synth"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "bpnp.data.export", "synthetic", "--out", str(out), "--num", "3",
         "--seed", "4", "--min-points", "30", "--max-points", "50", "--outlier-frac-2d", "0.2",
         "--outlier-frac-3d", "0.1", "--noise-px", "0.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 scenes" in proc.stdout
    files = sorted(p.name for p in out.glob("*.npz"))
    assert files == ["000000.npz", "000001.npz", "000002.npz"]
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "synthetic" and index["count"] == 3 and index["seed"] == 4
    assert [f["file"] for f in index["files"]] == files
    cfg = SyntheticConfig.from_dict(index["config"])
    assert cfg.num_points_2d == (30, 50) and cfg.noise_px == 0.5
    for i, name in enumerate(files):  # the files are exactly the generator's instances
        ref, got = make_instance(cfg, 4, i), load_scene(out / name)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_refuses_to_overwrite_and_help(tmp_path, capsys):
    args = ["synthetic", "--out", str(tmp_path), "--num", "2", "--min-points", "20",
            "--max-points", "20", "--quiet"]
    assert main(args) == 0
    with pytest.raises(SystemExit, match="already holds 2 .npz files"):
        main(args)
    assert main(args + ["--overwrite", "--num", "1"]) == 0
    assert len(list(tmp_path.glob("*.npz"))) == 1
    with pytest.raises(SystemExit) as exc:
        main(["synthetic", "--help"])
    assert exc.value.code == 0 and "--outlier-frac-2d" in capsys.readouterr().out


def test_bad_values_give_one_line_error(tmp_path, capsys):
    rc = main(["synthetic", "--out", str(tmp_path), "--num", "1", "--outlier-frac-2d", "1.5"])
    assert rc == 2 and "outlier_frac_2d must lie in [0, 1)" in capsys.readouterr().err
    rc = main(["colmap", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a directory" in capsys.readouterr().err


def test_colmap_export(tmp_path):
    out = tmp_path / "maup"
    assert main(["colmap", "--model", str(REAL / "maupertuis"), "--out", str(out),
                 "--max-points-2d", "500", "--max-points-3d", "600", "--seed", "2", "--quiet"]) == 0
    ds = SceneDirectory(out)
    assert len(ds) == 4
    index = json.loads((out / "index.json").read_text())
    assert [f["image_id"] for f in index["files"]] == [1, 2, 3, 4]
    for i in range(4):
        scene = ds[i]
        assert len(scene["p2d"]) <= 500 and len(scene["p3d"]) <= 600
        sel = scene["match"] >= 0
        X = scene["p3d"][scene["match"][sel]] @ scene["R"].T + scene["t"]
        err = np.linalg.norm(X[:, :2] / X[:, 2:3] - scene["p2d"][sel], axis=1) * scene["K"][0, 0]
        assert np.median(err) < 1.0


MESHES = MESH_ROOT


def test_world_preset_mesh_only_export_finds_the_embedded_meshes(tmp_path):
    """``--shapes mesh`` with no --set mesh_root: the embedded meshes (data/meshes) are used
    (the held-out test sets of docs/results.md are written this way)."""
    out = tmp_path / "cat"
    assert main(["synthetic", "--preset", "world", "--out", str(out), "--num", "2", "--min-points", "40",
                 "--max-points", "60", "--shapes", "mesh", "--set", "mesh_split=test_unseen_category", "--quiet"]) == 0
    cfg = SyntheticConfig.from_dict(json.loads((out / "index.json").read_text())["config"])
    assert cfg.shape_weights.get("mesh") == 1.0 and sum(cfg.shape_weights.values()) == 1.0
    assert cfg.mesh_split == "test_unseen_category" and Path(cfg.mesh_root).resolve() == MESHES.resolve()
    assert len(list(out.glob("*.npz"))) == 2
