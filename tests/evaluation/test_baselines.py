"""Baselines: oracle (true pairs), Hungarian assignment, pose from pairs."""

from __future__ import annotations

import numpy as np
import torch

from bpnp.data.datasets import add_outliers
from bpnp.evaluation.baselines import hungarian_pairs, hungarian_pose, oracle_pose, pose_from_pairs, true_pairs
from bpnp.evaluation.runner import instance_errors
from bpnp.geometry.ransac import RansacStatus
from bpnp.nodes import PnPRefine

from tests.evaluation.conftest import noise_free_scenes

KW = dict(refine=PnPRefine(), ransac_kwargs=dict(num_hypotheses=64))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_true_pairs():
    i, j = true_pairs(np.array([3, -1, 0, -1, 2]))
    assert i.tolist() == [0, 2, 4] and j.tolist() == [3, 0, 2]


def test_hungarian_recovers_a_permutation_from_a_noisy_cost():
    rng = np.random.default_rng(0)
    perm = rng.permutation(20)
    M = rng.uniform(0.5, 2.0, size=(20, 25))
    M[np.arange(20), perm] = rng.uniform(0.0, 0.4, size=20)
    i, j = hungarian_pairs(M)
    assert i.tolist() == list(range(20)) and j.tolist() == perm.tolist()
    i, j = hungarian_pairs(M.T)  # rectangular the other way: one pair per column
    assert len(i) == 20


def test_oracle_is_exact_on_noise_free_scenes():
    for scene in noise_free_scenes(3):
        pose = oracle_pose(scene, generator=_gen(), **KW)
        err = instance_errors(pose.R, pose.t, scene)
        assert pose.ransac_status == 0 and pose.pnp_status == 0
        assert err["rot_err_deg"] < 1e-4 and err["center_err_rel"] < 1e-6, err


def test_oracle_ignores_added_outliers():
    scene = add_outliers(noise_free_scenes(1)[0], 0.5, 0.5, np.random.default_rng(1))
    pose = oracle_pose(scene, generator=_gen(), **KW)
    assert instance_errors(pose.R, pose.t, scene)["rot_err_deg"] < 1e-4


def test_hungarian_on_a_true_cost_is_exact():
    scene = noise_free_scenes(1)[0]
    m, n = len(scene["p2d"]), len(scene["p3d"])
    M = np.full((m, n), 2.0)
    i, j = true_pairs(scene["match"])
    M[i, j] = 0.0
    for weights in ("P", "uniform"):
        pose = hungarian_pose(scene, M, np.exp(-10 * M) / np.exp(-10 * M).sum(), weights=weights, generator=_gen(), **KW)
        assert instance_errors(pose.R, pose.t, scene)["rot_err_deg"] < 1e-4


def test_too_few_pairs_is_a_finite_failure():
    scene = noise_free_scenes(1)[0]
    i, j = true_pairs(scene["match"])
    pose = pose_from_pairs(scene["p2d"], scene["p3d"], i[:3], j[:3], None, generator=_gen(), **KW)
    assert pose.ransac_status == int(RansacStatus.TOO_FEW_CORRESPONDENCES) and pose.pnp_status == -1
    assert np.all(np.isfinite(pose.R)) and np.all(np.isfinite(pose.t))
