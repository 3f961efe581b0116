"""evaluate.py end to end: one subprocess for a full run, one for a user error; the other error
paths and the other data sources in-process on ``evaluate.run`` (Hydra compose of the real
configs), since each new Python process pays ~12 s of imports."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bpnp.data.scenes import save_scene
from bpnp.runtime.checkpoint import save_weights_only
from bpnp.evaluation.report import CSV_COLUMNS
from bpnp.models.network import BlindPnPNet

from tests.evaluation.conftest import REAL_DATA, ROOT, TINY_NET, lightning_ckpt, noise_free_scenes  # noqa: F401

CONTRACT = ("n", "success_rate", "median_rot_err_deg", "median_t_err", "median_center_err_rel", "mean_time_s")
BASELINES = ("oracle", "ransac", "hungarian")


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scenes")
    for i, s in enumerate(noise_free_scenes(3)):
        save_scene(d / f"scene_{i:03d}.npz", s)
    return d


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subprocess(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def _check_contract(summary: dict) -> None:
    for k in CONTRACT:
        assert k in summary, k
    assert set(summary["success_rate_at"]) == {"1deg_1pct", "2deg_2pct", "5deg_5pct", "10deg_10pct"}
    for T in (5, 10, 20):
        assert 0.0 <= summary[f"auc_rot_{T}deg"] <= 1.0


def test_end_to_end(tmp_path, scene_dir, lightning_ckpt):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = _subprocess(f"ckpt_path={lightning_ckpt}", "data=scenes", f"data.path={scene_dir}",
                       f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(run_dir) in proc.stdout and "[evaluate] config (resolved)" in proc.stdout
    log = (run_dir / "evaluate.log").read_text()  # the console log, kept in the run dir
    assert "[evaluate] config (resolved)" in log and f"[evaluate] run dir: {run_dir}" in log and "wrote" in log

    metrics = json.loads((run_dir / "metrics.json").read_text())
    _check_contract(metrics)
    assert metrics["n"] == 3 and metrics["mean_time_s"] > 0
    assert set(metrics["baselines"]) == set(BASELINES)
    for name in BASELINES:
        _check_contract(metrics["baselines"][name])
    # Noise-free scenes: the oracle (true pairs -> RANSAC -> refinement) is exact.
    assert metrics["baselines"]["oracle"]["success_rate"] == 1.0
    assert metrics["baselines"]["oracle"]["median_rot_err_deg"] < 1e-4
    sweep = metrics["sweep"]
    assert sweep["fractions"] == [[0.0, 0.0], [0.25, 0.25], [0.5, 0.5]]
    for res in sweep["results"]:
        _check_contract(res)
        assert set(res["baselines"]) == set(BASELINES)

    with (run_dir / "instances.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 3 * 4
    assert sorted({r["scene"] for r in rows}) == ["scene_000", "scene_001", "scene_002"]
    assert (run_dir / "sweep_instances.csv").is_file()
    plots = run_dir / "plots"
    assert (plots / "error_cdf.png").is_file() and (plots / "sweep_success.png").is_file()
    assert len(list(plots.glob("overlay_*.png"))) == 3


def test_wrong_checkpoint_path_is_one_line(tmp_path, scene_dir):
    proc = _subprocess(f"ckpt_path={tmp_path / 'missing.ckpt'}", "data=scenes", f"data.path={scene_dir}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: checkpoint not found: {tmp_path / 'missing.ckpt'}"], proc.stderr
    assert not (tmp_path / "run").exists()  # the failed run leaves no (empty) run directory behind


def _run_error(cli, capsys, tmp_path, *overrides) -> str:
    code = cli.run(_compose(*overrides), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_scene_missing_a_key(cli, capsys, tmp_path, scene_dir, lightning_ckpt):  # noqa: F811
    bad = tmp_path / "bad"
    shutil.copytree(scene_dir, bad)
    scene = dict(np.load(bad / "scene_001.npz"))
    del scene["match"]
    np.savez(bad / "scene_001.npz", **scene)
    line = _run_error(cli, capsys, tmp_path, f"ckpt_path={lightning_ckpt}", f"data.path={bad}")
    assert "scene_001.npz" in line and "missing key 'match'" in line


def test_incompatible_checkpoint(cli, capsys, tmp_path, scene_dir):
    path = save_weights_only(tmp_path / "w.pt", BlindPnPNet(**TINY_NET), {**TINY_NET, "depth": 2})
    line = _run_error(cli, capsys, tmp_path, f"ckpt_path={path}", f"data.path={scene_dir}")
    assert "incompatible checkpoint" in line and "missing weights" in line


def test_bad_paths_and_device(cli, capsys, tmp_path, lightning_ckpt):  # noqa: F811
    line = _run_error(cli, capsys, tmp_path, f"ckpt_path={lightning_ckpt}", f"data.path={tmp_path / 'nowhere'}")
    assert "nowhere" in line
    line = _run_error(cli, capsys, tmp_path, f"data.path={tmp_path}")
    assert "ckpt_path is required" in line
    if not torch.cuda.is_available():
        line = _run_error(cli, capsys, tmp_path, f"ckpt_path={lightning_ckpt}", f"data.path={tmp_path}", "device=cuda")
        assert "CUDA is not available" in line


def test_truncated_colmap_model(cli, capsys, tmp_path, lightning_ckpt):  # noqa: F811
    model = tmp_path / "maupertuis"
    shutil.copytree(REAL_DATA / "maupertuis", model)
    for p in model.iterdir():
        p.chmod(0o644)  # a read-only checkout stays untouched
    images = next(model.glob("images.*"))
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    line = _run_error(cli, capsys, tmp_path, f"ckpt_path={lightning_ckpt}", "data=colmap", f"data.path={model}")
    assert "images" in line


def test_synthetic_and_colmap_sources(cli, tmp_path, lightning_ckpt):  # noqa: F811
    common = (f"ckpt_path={lightning_ckpt}", "sweep.enabled=false", "plots.num_overlays=1", "progress_every=0")
    cfg = _compose(*common, "data=synthetic", "data.test_length=2", "data.synthetic.num_points_2d=[30,40]",
                   "logger=csv")
    assert cli.run(cfg, tmp_path / "syn") == 0
    with (tmp_path / "syn" / "csv" / "metrics.csv").open() as f:  # the summary, logged by logger=csv
        assert "eval/success_rate" in next(csv.reader(f))
    metrics = json.loads((tmp_path / "syn" / "metrics.json").read_text())
    assert metrics["n"] == 2 and "sweep" not in metrics and metrics["meta"]["data"]["source"] == "synthetic"
    cfg = _compose(*common, "data=colmap", f"data.path={REAL_DATA / 'maupertuis'}", "data.max_points_2d=64",
                   "data.max_points_3d=64", "max_instances=2", "baselines=[oracle]")
    assert cli.run(cfg, tmp_path / "colmap") == 0
    metrics = json.loads((tmp_path / "colmap" / "metrics.json").read_text())
    assert metrics["n"] == 2 and list(metrics["baselines"]) == ["oracle"]
    with (tmp_path / "colmap" / "instances.csv").open() as f:
        assert {r["scene"].split("/")[0] for r in csv.DictReader(f)} == {"maupertuis"}


def test_net_overrides_reach_the_network(cli, capsys, tmp_path, scene_dir, lightning_ckpt):  # noqa: F811
    """`net_overrides={...}` (the README's form) replaces inference settings; a setting the network
    does not have is one clear error line, exit 2."""
    common = (f"ckpt_path={lightning_ckpt}", "data=scenes", f"data.path={scene_dir}", "sweep.enabled=false",
              "baselines=[]", "plots.enabled=false")
    code = cli.run(_compose(*common, "net_overrides={refine: {robust_scale: 1.0e-4}, ransac: {num_hypotheses: 64}}"), tmp_path / "run")
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "metrics.json").read_text())["meta"]
    assert meta["net_overrides"] == {"refine": {"robust_scale": 1.0e-4}, "ransac": {"num_hypotheses": 64}}
    err = _run_error(cli, capsys, tmp_path, *common, "net_overrides={no_such_knob: 1}")
    assert "no_such_knob" in err
    err = _run_error(cli, capsys, tmp_path, *common, "net_overrides={robust_scal: 1.0e-4}")  # a typo is a typo,
    assert err.startswith("error: net_overrides.robust_scal: unknown network setting")  # not "incompatible checkpoint"
    assert cli.check_command_line([*common, "net_overrides={robust_scal: 1.0e-4}"]) == err[len("error: "):]
