"""bpnp.BlindPnPSolver (bpnp/runtime/solver.py) and its command line, python -m bpnp.solve: one call
from arrays to a pose with the shipped checkpoint; numpy/torch in and out; pixels with K; lists;
the input checks (one line naming the argument); the CLI's JSON and error policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bpnp
from bpnp.data.scenes import save_scene
from bpnp.models.settings import SettingError
from bpnp.nodes import Status
from bpnp.runtime.checkpoint import CheckpointError, load_network
from bpnp.runtime.solver import BlindPnPSolver, PnPSolution, SolverInputError
from bpnp.so3 import geodesic_angle, so3_exp

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "bpnp_synthetic.pt"
K = np.array([[600.0, 0.0, 320.0], [0.0, 620.0, 240.0], [0.0, 0.0, 1.0]])


def sphere_instance(seed: int = 0, n: int = 100, outliers: int = 10, omega=(0.3, -0.8, 0.4)):
    """``n`` points of a unit sphere's side that faces the camera, projected noise-free (camera-
    normalised) and shuffled, plus ``outliers`` random points on each side; the true pose and the
    true match of each keypoint (-1 for the 2D outliers)."""
    rng = np.random.default_rng(seed)
    R = so3_exp(torch.tensor(omega, dtype=torch.float64)).numpy()
    t = np.array([0.1, -0.2, 3.0])
    X = rng.normal(size=(4 * n, 3))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X = X[(X * (-R.T @ t - X)).sum(1) > 0][:n]
    x = X @ R.T + t
    perm = rng.permutation(n + outliers)
    p2d = np.concatenate([x[:, :2] / x[:, 2:], rng.uniform(-0.3, 0.3, (outliers, 2))])[perm]
    match = np.concatenate([np.arange(n), -np.ones(outliers, dtype=np.int64)])[perm]
    p3d = np.concatenate([X, rng.normal(size=(outliers, 3))])
    return p2d, p3d, R, t, match


def rot_err_deg(R_est, R_true) -> float:
    to = lambda R: torch.as_tensor(np.asarray(R.cpu() if isinstance(R, torch.Tensor) else R), dtype=torch.float64)
    return float(torch.rad2deg(geodesic_angle(to(R_est), to(R_true))))


@pytest.fixture(scope="module")
def solver() -> BlindPnPSolver:
    torch.set_num_threads(1)
    return BlindPnPSolver.from_checkpoint(CKPT)


@pytest.fixture(scope="module")
def easy():
    return sphere_instance()


@pytest.fixture(scope="module")
def easy_solution(solver, easy):
    p2d, p3d, *_ = easy
    return solver(p2d, p3d)


# -- solving ----------------------------------------------------------------------------------------
def test_solves_an_easy_noise_free_instance(easy, easy_solution):
    p2d, p3d, R, t, match = easy
    sol = easy_solution
    assert rot_err_deg(sol.R, R) < 1.0
    assert np.linalg.norm(sol.t - t) < 0.05 * np.linalg.norm(t)
    assert sol.status == Status.OK and sol.status.name == "OK" and int(sol.ransac_status) == 0
    # The pose-confirmed correspondences are the true ones; the soft ones are a subset of candidates.
    found = sol.pose_matches >= 0
    assert found.sum() >= 90 and np.mean(sol.pose_matches[found] == match[found]) >= 0.9
    assert set(np.unique(sol.matches)) <= set(range(-1, len(p3d)))


def test_numpy_in_numpy_out(easy, easy_solution):
    p2d, p3d, *_ = easy
    sol, m = easy_solution, len(p2d)
    assert isinstance(sol, PnPSolution)
    for name, shape in (("R", (3, 3)), ("t", (3,)), ("inlier_prob", (m,))):
        value = getattr(sol, name)
        assert isinstance(value, np.ndarray) and value.shape == shape and value.dtype == np.float64, name
    for name in ("matches", "pose_matches"):
        value = getattr(sol, name)
        assert isinstance(value, np.ndarray) and value.shape == (m,) and value.dtype == np.int64, name
    assert np.all((sol.inlier_prob >= 0) & (sol.inlier_prob <= 1))
    assert sol.time_s > 0
    with pytest.raises(AttributeError):  # frozen
        sol.R = None


def test_torch_in_torch_out_same_pose(solver, easy, easy_solution):
    p2d, p3d, *_ = easy
    for dtype in (torch.float64, torch.float32):
        sol = solver(torch.tensor(p2d, dtype=dtype), torch.tensor(p3d, dtype=dtype))
        assert isinstance(sol.R, torch.Tensor) and sol.R.dtype == dtype and sol.R.shape == (3, 3)
        assert sol.t.dtype == dtype and sol.inlier_prob.dtype == dtype and sol.matches.dtype == torch.long
        assert sol.R.device == torch.device("cpu")
        np.testing.assert_allclose(sol.R.double().numpy(), easy_solution.R, atol=1e-5)
    f32 = solver(p2d.astype(np.float32), p3d.astype(np.float32))
    assert f32.R.dtype == np.float32 and f32.matches.dtype == np.int64


def test_pixels_with_K_give_the_pose_of_normalised_points(solver, easy, easy_solution):
    p2d, p3d, *_ = easy
    uv = p2d @ K[:2, :2].T + K[:2, 2]
    sol = solver(uv, p3d, K=K)
    assert rot_err_deg(sol.R, easy_solution.R) < 1e-3
    np.testing.assert_allclose(sol.t, easy_solution.t, atol=1e-5)


def test_lists_of_instances_are_each_solved_alone(solver, easy, easy_solution):
    p2d, p3d, *_ = easy
    q2d, q3d, R2, _, _ = sphere_instance(seed=1, n=60, outliers=5, omega=(-0.2, 0.5, 0.1))
    sols = solver([p2d, q2d], [p3d, q3d])
    assert isinstance(sols, list) and len(sols) == 2
    np.testing.assert_allclose(sols[0].R, easy_solution.R, atol=1e-6)  # as solved alone: same seed, own generator
    assert rot_err_deg(sols[1].R, R2) < 1.0
    uv, vw = (x @ K[:2, :2].T + K[:2, 2] for x in (p2d, q2d))
    for Ks in (K, [K, K]):  # one K for all, or one per instance
        with_k = solver([uv, vw], [p3d, q3d], K=Ks)
        assert [rot_err_deg(a.R, b.R) < 1e-3 for a, b in zip(with_k, sols)] == [True, True]


def test_deterministic_given_the_seed(solver, easy, easy_solution):
    p2d, p3d, *_ = easy
    again = solver(p2d, p3d, seed=0)
    np.testing.assert_array_equal(again.R, easy_solution.R)
    np.testing.assert_array_equal(again.matches, easy_solution.matches)


# -- input checks ----------------------------------------------------------------------------------
def _bad_inputs():
    p2d, p3d, *_ = sphere_instance(n=20, outliers=0)
    nan3d = p3d.copy()
    nan3d[3, 1] = np.nan
    singular = np.array([[500.0, 500.0, 320.0], [500.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
    return {  # case -> (args, kwargs, words the one line must hold)
        "shape 2d": ((p2d[:, :1], p3d), {}, ["'points_2d'", "shape (m, 2)", "(20, 1)"]),
        "shape 3d": ((p2d, p3d.T), {}, ["'points_3d'", "shape (n, 3)"]),
        "nan": ((p2d, nan3d), {}, ["'points_3d'", "1 non-finite values (NaN/Inf)"]),
        "nan torch": ((torch.tensor(p2d), torch.tensor(nan3d)), {}, ["'points_3d'", "non-finite"]),
        "few 2d": ((p2d[:3], p3d), {}, ["'points_2d'", "holds 3 point(s) (need at least 4)"]),
        "few 3d": ((p2d, p3d[:2]), {}, ["'points_3d'", "need at least 4"]),
        "not numeric": ((np.array([["a", "b"]] * 5), p3d), {}, ["'points_2d'", "must be numeric"]),
        "singular K": ((p2d, p3d), {"K": singular}, ["'K'", "singular"]),
        "focal K": ((p2d, p3d), {"K": np.diag([-500.0, 500.0, 1.0])}, ["'K'", "positive focal lengths"]),
        "K shape": ((p2d, p3d), {"K": np.eye(2)}, ["'K'", "shape (3, 3)"]),
        "K row": ((p2d, p3d), {"K": np.diag([500.0, 500.0, 2.0])}, ["'K'", "last row (0, 0, 1)"]),
        "list lengths": (([p2d, p2d], [p3d]), {}, ["'points_2d'", "'points_3d'", "2 instances"]),
        "list K": (([p2d, p2d], [p3d, p3d]), {"K": [K, K, K]}, ["'K'", "3 matrices for 2"]),
        "list item": (([p2d, p2d[:2]], [p3d, p3d]), {}, ["instance 1", "'points_2d'", "need at least 4"]),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_is_one_line_naming_the_argument(solver, case):
    args, kwargs, words = _bad_inputs()[case]
    with pytest.raises(SolverInputError) as info:
        solver(*args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith("BlindPnPSolver")
    for word in words:
        assert word in message, (word, message)


def test_bad_overrides_and_checkpoints_give_load_networks_messages(tmp_path):
    for overrides in ({"ransac": {"num_hypotheses": -1}}, {"refine.bogus": 1}):
        with pytest.raises(SettingError) as ours:
            BlindPnPSolver.from_checkpoint(CKPT, **overrides)
        with pytest.raises(SettingError) as theirs:
            load_network(CKPT, overrides=overrides)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        BlindPnPSolver.from_checkpoint(tmp_path / "none.pt")


def test_overrides_reach_the_network():
    s = BlindPnPSolver.from_checkpoint(CKPT, ransac={"num_hypotheses": 64}, **{"refine.robust_scale": 1e-4}, seed=3)
    assert s.net.ransac_kwargs["num_hypotheses"] == 64 and s.net.refine_settings.robust_scale == 1e-4
    assert s.seed == 3 and not s.net.training


def test_top_level_export_is_lazy():
    code = ("import sys, bpnp; assert 'torch' not in sys.modules, 'import bpnp imported torch'; "
            "assert bpnp.BlindPnPSolver.__module__ == 'bpnp.runtime.solver'; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert bpnp.BlindPnPSolver is BlindPnPSolver and "BlindPnPSolver" in dir(bpnp)
    with pytest.raises(AttributeError):
        bpnp.NoSuchThing  # noqa: B018


# -- python -m bpnp.solve ---------------------------------------------------------------------------
def test_cli_prints_json(tmp_path, capsys, easy):
    from bpnp.solve import main

    p2d, p3d, R, t, match = easy
    full = save_scene(tmp_path / "full.npz", dict(p2d=p2d, p3d=p3d, R=R, t=t, match=match))
    partial = tmp_path / "partial.npz"
    np.savez(partial, p2d=p2d, p3d=p3d)  # no ground truth: still solvable
    assert main(["--ckpt", str(CKPT), str(full)]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["file"] == str(full) and one["status"] == "OK" and one["rot_err_deg"] < 1.0
    assert np.asarray(one["R"]).shape == (3, 3) and len(one["t"]) == 3
    assert one["num_matches"] >= 0 and one["time_s"] > 0
    assert main(["--ckpt", str(CKPT), str(full), str(partial), "--set", "ransac.num_hypotheses=512"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in both] == [str(full), str(partial)] and "rot_err_deg" not in both[1]


@pytest.mark.parametrize("case", ["missing file", "missing key", "too few", "bad set", "bad ckpt", "no args"])
def test_cli_bad_input_is_one_error_line_exit_2(tmp_path, capsys, case, easy):
    from bpnp.solve import main

    p2d, p3d, *_ = easy
    good = tmp_path / "good.npz"
    np.savez(good, p2d=p2d, p3d=p3d)
    bad = tmp_path / "bad.npz"
    argv, words = {
        "missing file": ([str(good), str(tmp_path / "nope.npz")], ["nope.npz", "no such file"]),
        "missing key": ([str(bad)], ["bad.npz", "missing key 'p3d'"]),
        "too few": ([str(bad)], ["bad.npz", "key 'p2d' holds 2 point(s)"]),
        "bad set": ([str(good), "--set", "ransac.bogus=1"], ["ransac.bogus", "unknown setting"]),
        "bad ckpt": ([str(good), "--ckpt", str(tmp_path / "none.pt")], ["none.pt", "checkpoint not found"]),
        "no args": ([], ["required"]),
    }[case]
    if case == "missing key":
        np.savez(bad, p2d=p2d)
    elif case == "too few":
        np.savez(bad, p2d=p2d[:2], p3d=p3d)
    assert main(["--ckpt", str(CKPT), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err, (word, err)
