"""Reliability, round two (issue 26): each case a user found gives exit 0 with a correct result, or
one ``error:`` line naming the file or key with exit 2 (130 / 143 on a signal), no traceback, and
nothing finished is lost. In-process on the real configs (``evaluate.run``, ``train.check_command_line``);
docs/reliability.md "Round two" lists what the user sees."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bpnp.data.scenes import save_scene
from bpnp.data.synthetic import SyntheticConfig, make_instance
from tests.evaluation.conftest import GroundTruthCostNet, lightning_ckpt  # noqa: F401  (fixture)
from tests.reliability.helpers import ROOT, composing, load_cli, write_colmap_text

FAST = ("baselines=[ransac]", "sweep.enabled=false", "plots.enabled=false", "progress_every=0", "warmup=0")


@pytest.fixture(scope="module")
def evaluate_cli():
    return load_cli("evaluate")


@pytest.fixture(scope="module")
def train_cli():
    return load_cli("train")


def _scenes(d: Path, count: int, points: int = 12) -> Path:
    for i in range(count):
        save_scene(d / f"{i:03d}.npz", make_instance(SyntheticConfig(num_points_2d=points), 0, i))
    return d


def _one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def _run(cli, cfg, out_dir) -> int:
    try:
        return cli.run(cfg, out_dir)
    except KeyboardInterrupt:  # before the fix: the traceback (and the finished instances lost)
        pytest.fail("KeyboardInterrupt escaped evaluate.run")


# ------------------------------------------------------------------------------------------------
# 1. an interrupted evaluation keeps its work
# ------------------------------------------------------------------------------------------------
class _StopAfter(GroundTruthCostNet):
    """The geometric layers on the true cost; on forward number ``k + 1`` it does ``action()``."""

    def __init__(self, k: int, action) -> None:
        super().__init__()
        self.k, self.action, self.calls = k, action, 0

    def forward(self, batch, generator=None, refine=None):
        self.calls += 1
        if self.calls == self.k + 1:
            self.action()
        return super().forward(batch, generator=generator, refine=refine)


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _send_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs here, in the main thread


class _Escaped(Exception):
    pass


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_interrupted_evaluation_keeps_finished_instances(evaluate_cli, capsys, tmp_path, monkeypatch, how):
    import bpnp.evaluation.app as app
    from bpnp.evaluation.summary import summary_table

    def escaped(signum, frame):  # before the fix SIGTERM would end the test process itself
        raise _Escaped("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, escaped)
    torch.manual_seed(0)
    model = _StopAfter(2, _raise_keyboard_interrupt if how == "SIGINT" else _send_sigterm)
    monkeypatch.setattr(app, "load_network", lambda *a, **k: model)
    d = _scenes(tmp_path / "scenes", 6)
    run = tmp_path / "run"
    with composing("evaluate") as compose:
        cfg = compose("ckpt_path=stand-in.ckpt", f"data.path={d}", *FAST)
    try:
        code = _run(evaluate_cli, cfg, run)
    except _Escaped as exc:
        pytest.fail(str(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == (130 if how == "SIGINT" else 143), err
    assert err == [f"interrupted: kept 2 of 6 instances in {run} (metrics.json complete: false)"], err
    rows = list(csv.DictReader((run / "instances.csv").open()))
    assert [(r["scene"], r["method"]) for r in rows] == [("000", "model"), ("000", "ransac"),
                                                         ("001", "model"), ("001", "ransac")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["instances_done"] == 2 and metrics["n"] == 2
    assert metrics["meta"]["num_instances"] == 6 and metrics["success_rate"] == 1.0
    assert "(partial 2/6)" in summary_table([run]).splitlines()[-1]
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


# ------------------------------------------------------------------------------------------------
# 2. checkpoints are checked on load
# ------------------------------------------------------------------------------------------------
def _corrupt(src: Path, dst: Path, value: float) -> str:
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    key = next(k for k, v in ckpt["state_dict"].items() if k.startswith("net.") and v.is_floating_point() and v.numel() > 3)
    ckpt["state_dict"][key] = ckpt["state_dict"][key].clone()
    ckpt["state_dict"][key].view(-1)[3] = value
    torch.save(ckpt, dst)
    return key[len("net."):]


@pytest.mark.parametrize("value, pattern", [
    (2.4e24, r"has \|w\| up to 2\.4e\+24 \(bound 1e4\)"),
    (float("nan"), r"holds non-finite values"),
])
def test_corrupt_checkpoint_weights_are_refused(evaluate_cli, capsys, tmp_path, lightning_ckpt, value, pattern):  # noqa: F811
    bad = tmp_path / "flipped.ckpt"
    key = _corrupt(Path(lightning_ckpt), bad, value)
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={bad}", f"data.path={_scenes(tmp_path / 'scenes', 1)}", *FAST)
    assert _run(evaluate_cli, cfg, tmp_path / "run") == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: {bad}: weight '{key}' ") and re.search(pattern, line), line


def test_shipped_checkpoints_pass_the_weight_bound_by_a_wide_margin():
    from bpnp.runtime.checkpoint import WEIGHT_BOUND, check_weights

    shipped = sorted((ROOT / "checkpoints").glob("*.pt"))
    assert shipped, "no shipped weights-only checkpoint"
    for path in shipped:
        name = path.name
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        check_weights(state, name)
        top = max(float(v.abs().max()) for v in state.values() if v.is_floating_point() and v.numel())
        assert top < WEIGHT_BOUND / 1000, (name, top)


# ------------------------------------------------------------------------------------------------
# 3. exports are atomic; an unfinished export is refused, a hand-made folder is not
# ------------------------------------------------------------------------------------------------
def test_failed_export_leaves_nothing_and_an_unfinished_one_is_refused(evaluate_cli, capsys, tmp_path, monkeypatch,
                                                                        lightning_ckpt):  # noqa: F811
    import bpnp.data.instances as instances
    from bpnp.data.export import main

    model = write_colmap_text(tmp_path / "model", num_images=5)
    real = instances.instance_from_image
    calls = {"n": 0}

    def fail_on_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("injected failure while building image 4")
        return real(*args, **kwargs)

    monkeypatch.setattr(instances, "instance_from_image", fail_on_the_fourth)
    out = tmp_path / "exported"
    assert main(["colmap", "--model", str(model), "--out", str(out), "--quiet"]) == 2
    assert "injected failure" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("exported.tmp-*"))  # no partial folder anywhere
    # an earlier export, overwritten by one that fails, stays whole
    monkeypatch.setattr(instances, "instance_from_image", real)
    assert main(["colmap", "--model", str(model), "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 6 and "index.json" in before
    calls["n"] = 0
    monkeypatch.setattr(instances, "instance_from_image", fail_on_the_fourth)
    assert main(["colmap", "--model", str(model), "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not list(tmp_path.glob("exported.tmp-*"))
    capsys.readouterr()
    # a folder caught half-way (the marker is still there) is refused naming it ...
    from bpnp.data.scenes import EXPORT_INCOMPLETE_MARKER

    (out / EXPORT_INCOMPLETE_MARKER).write_text("")
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={lightning_ckpt}", f"data.path={out}", *FAST)
    assert _run(evaluate_cli, cfg, tmp_path / "run") == 2
    assert re.fullmatch(rf"error: {re.escape(str(out))}: an unfinished export .*run the export again", _one_error(capsys))
    # ... a hand-made folder without index.json is evaluated
    hand = _scenes(tmp_path / "hand", 2)
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={lightning_ckpt}", f"data.path={hand}", *FAST)
    assert _run(evaluate_cli, cfg, tmp_path / "run2") == 0


# ------------------------------------------------------------------------------------------------
# 4. COLMAP input is checked before any work
# ------------------------------------------------------------------------------------------------
def _colmap_with_fov_camera(folder: Path) -> Path:
    model = write_colmap_text(folder, num_images=7)
    cams = model / "cameras.txt"
    cams.write_text(cams.read_text().replace("# Number of cameras: 1", "# Number of cameras: 2")
                    + "2 FOV 640 480 500 500 320 240 0.1\n")
    images = model / "images.txt"
    images.write_text(images.read_text().replace(" 1 img3.jpg", " 2 img3.jpg"))
    return model


def test_colmap_unsupported_camera_is_named_before_any_work(evaluate_cli, capsys, tmp_path, lightning_ckpt):  # noqa: F811
    model = _colmap_with_fov_camera(tmp_path / "model")
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={lightning_ckpt}", "data=colmap", f"data.path={model}", *FAST)
    assert _run(evaluate_cli, cfg, tmp_path / "run") == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: {model / 'images.txt'}: image 'img3.jpg' (id 3) uses camera 2 of model FOV"), line
    assert "cannot undistort" in line
    assert not (tmp_path / "run" / "instances.csv").exists()  # before any instance
    from bpnp.data.export import main

    assert main(["colmap", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "image 'img3.jpg' (id 3) uses camera 2 of model FOV" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_colmap_dropped_images_are_named_in_one_warning(evaluate_cli, caplog, tmp_path, lightning_ckpt):  # noqa: F811
    model = write_colmap_text(tmp_path / "model", num_images=7)
    lines = (model / "images.txt").read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.endswith(" img5.jpg"))
    lines[at + 1] = " ".join(v if k % 3 != 2 else "-1" for k, v in enumerate(lines[at + 1].split()))
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={lightning_ckpt}", "data=colmap", f"data.path={model}", *FAST)
    with caplog.at_level("WARNING", logger="bpnp.data"):
        assert _run(evaluate_cli, cfg, tmp_path / "run") == 0
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning:")]
    assert warned == [f"warning: {model}: dropped 1 of 7 images (image 'img5.jpg' id 5: no matched keypoints)"], warned
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] == 6


# ------------------------------------------------------------------------------------------------
# 5. ground truth that cannot be true is refused
# ------------------------------------------------------------------------------------------------
def _to_pixels(s):
    K = s["K"]
    s["p2d"] = s["p2d"] * np.diag(K)[:2] + K[:2, 2]


def _to_pixels_no_K(s):
    _to_pixels(s)
    del s["K"]


def _points_on(s, X):
    """The scene's pose, 3D points ``X`` (each seen once) and their exact projections."""
    xc = X @ s["R"].T + s["t"]
    s.update(p3d=X, p2d=xc[:, :2] / xc[:, 2:3], match=np.arange(len(X)))


def _centre(s):
    return -s["R"].T @ s["t"] + s["R"].T @ np.array([0.0, 0.0, 4.0])  # a point 4 units in front


GT_CASES = {
    "p2d in pixels, K given": (_to_pixels, r"p2d looks like pixels: divide by K"),
    "p2d in pixels, no K": (_to_pixels_no_K, r"p2d looks like pixels \(median \|p2d\| = "),
    "no true pair": (lambda s: s.update(match=np.full(len(s["p2d"]), -1)), r"only 0 true pair\(s\)"),
    "two points": (lambda s: _points_on(s, _centre(s) + np.array([[0.0, 0, 0], [0.1, 0, 0]])), r"only 2 true pair\(s\)"),
    "identical 3D points": (lambda s: _points_on(s, np.repeat(_centre(s)[None], 8, 0)), r"are all identical"),
    "collinear 3D points": (lambda s: _points_on(s, _centre(s) + np.outer(np.linspace(-1, 1, 8), [0.3, 0.2, 0.1])),
                            r"are collinear"),
    "wrong pose": (lambda s: s.update(R=s["R"] @ np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])),
                   r"do not reproject .* median angular residual .* \(bound 0\.05 rad\); check that 'p2d' is camera-normalised"),
}


@pytest.mark.parametrize("case", list(GT_CASES))
def test_ground_truth_that_cannot_be_true_is_refused(evaluate_cli, capsys, tmp_path, lightning_ckpt, case):  # noqa: F811
    d = _scenes(tmp_path / "scenes", 3, points=30)
    edit, pattern = GT_CASES[case]
    scene = dict(np.load(d / "001.npz"))
    edit(scene)
    np.savez(d / "001.npz", **scene)
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={lightning_ckpt}", f"data.path={d}", *FAST)
    assert _run(evaluate_cli, cfg, tmp_path / "run") == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: {d / '001.npz'}: ") and re.search(pattern, line), line
    assert not (tmp_path / "run" / "instances.csv").exists()  # before any instance


# ------------------------------------------------------------------------------------------------
# 6. size and precision limits up front
# ------------------------------------------------------------------------------------------------
def test_instance_too_large_for_memory_is_refused_with_a_setting_that_fits(evaluate_cli, capsys, tmp_path, monkeypatch,
                                                                          lightning_ckpt):  # noqa: F811
    import bpnp.evaluation.memory as memory

    monkeypatch.setattr(memory, "FIXED_BYTES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10 * 2**20)  # 10 MiB "available"
    d = _scenes(tmp_path / "scenes", 1, points=600)
    with composing("evaluate") as compose:
        cfg = compose(f"ckpt_path={lightning_ckpt}", f"data.path={d}", *FAST)
    assert _run(evaluate_cli, cfg, tmp_path / "run") == 2
    line = _one_error(capsys)
    m = re.fullmatch(rf"error: {re.escape(str(d / '000.npz'))}: 600 x 600 points need about [0-9.]+ GiB "
                     r"\(available [0-9.]+ GiB[^)]*\); subsample with data\.max_points_2d=(\d+) data\.max_points_3d=(\d+)", line)
    assert m, line
    assert not (tmp_path / "run" / "instances.csv").exists()
    with composing("evaluate") as compose:  # the setting it names fits
        cfg = compose(f"ckpt_path={lightning_ckpt}", f"data.path={d}", *FAST, f"data.max_points_2d={m.group(1)}",
                      f"data.max_points_3d={m.group(2)}")
    assert _run(evaluate_cli, cfg, tmp_path / "run2") == 0
    rows = list(csv.DictReader((tmp_path / "run2" / "instances.csv").open()))
    assert int(rows[0]["m"]) == int(m.group(1)) and int(rows[0]["n"]) <= int(m.group(2))


def test_half_precision_is_refused_up_front(train_cli):
    message = train_cli.check_command_line(["experiment=bpnp_synthetic", "trainer.precision=16-mixed"])
    assert message is not None and message.startswith("trainer.precision=16-mixed: not supported"), message
    assert message.endswith("use trainer.precision=32")


def test_unwritable_log_dir_is_one_line_naming_the_key(train_cli, evaluate_cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = [f"{blocker}/logs"] + (["/proc/x"] if Path("/proc").is_dir() else [])
    for folder in bad:
        for message in (train_cli.check_command_line([f"paths.log_dir={folder}"]),
                        evaluate_cli.check_command_line(["ckpt_path=x.ckpt", f"paths.log_dir={folder}"])):
            assert message is not None and message.startswith(f"paths.log_dir={folder}: cannot create a directory there"), \
                message
    assert train_cli.check_command_line([f"paths.log_dir={tmp_path / 'new' / 'logs'}"]) is None
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind


# ------------------------------------------------------------------------------------------------
# 7. evaluate.py ckpt_path=last
# ------------------------------------------------------------------------------------------------
def test_evaluate_ckpt_path_last_picks_the_newest_run_of_any_task(evaluate_cli, capsys, caplog, tmp_path,
                                                                   lightning_ckpt):  # noqa: F811
    logs = tmp_path / "logs"
    d = _scenes(tmp_path / "scenes", 1)
    with composing("evaluate") as compose:
        cfg = compose("ckpt_path=last", f"paths.log_dir={logs}", f"data.path={d}", *FAST)
    assert _run(evaluate_cli, cfg, tmp_path / "run0") == 2
    assert _one_error(capsys).startswith(f"error: ckpt_path=last: no run with checkpoints/last.ckpt under {logs}/*/runs")
    picked = None
    for k, task in enumerate(("bpnp_synthetic", "bpnp_real")):
        picked = logs / task / "runs" / f"2026-01-0{k + 1}_00-00-00" / "checkpoints" / "last.ckpt"
        picked.parent.mkdir(parents=True)
        picked.write_bytes(Path(lightning_ckpt).read_bytes())
        os.utime(picked, (1e9 + k, 1e9 + k))
    with caplog.at_level("INFO", logger="bpnp"):
        assert _run(evaluate_cli, cfg, tmp_path / "run") == 0
    assert f"ckpt_path=last picked {picked}" in caplog.text + capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["meta"]["ckpt_path"] == str(picked) and metrics["complete"] is True
