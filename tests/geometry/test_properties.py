"""Property-based tests (hypothesis) of the geometry layer and of gradients through the whole
network: rotations stay rotations, bearings stay unit, metrics stay defined, RANSAC on garbage
returns finite poses with valid statuses, and gradients stay finite across scales and dtypes."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bpnp.data.collate import collate_scenes
from bpnp.data.datasets import add_outliers
from bpnp.geometry.bearings import project, to_bearings
from bpnp.geometry.metrics import pose_errors
from bpnp.geometry.ransac import RansacStatus, ransac_pnp
from bpnp.geometry.rotations import project_to_so3, random_rotation, geodesic_angle, so3_exp, so3_log
from bpnp.models.network import BlindPnPNet
from bpnp.training.losses import BlindPnPLoss
from tests.tolerances import eps, gamma, orthonormality_bounds, so3_exp_entry_error, svd_orthogonality

# derandomize: CI draws the same examples on every run (a failure is reproducible, never flaky).
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64])
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def _is_rotation(R: torch.Tensor, tol: float, tol_det: float | None = None) -> bool:
    """Finite, ``max |R R^T - I| <= tol`` and ``|det R - 1| <= tol_det`` (default ``tol``)."""
    eye = torch.eye(3, dtype=R.dtype)
    tol_det = tol if tol_det is None else tol_det
    return (bool(torch.isfinite(R).all())
            and bool(torch.allclose(R @ R.transpose(-1, -2), eye.expand_as(R), atol=tol, rtol=0))
            and bool(torch.allclose(torch.linalg.det(R), torch.ones((), dtype=R.dtype), atol=tol_det, rtol=0)))


@SETTINGS
@given(w=st.lists(st.lists(st.floats(-20, 20, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=8),
       tiny=st.booleans(), dtype=DTYPES)
def test_so3_exp_is_a_rotation_and_log_inverts_it(w, tiny, dtype):
    omega = torch.tensor(w, dtype=dtype) * (1e-7 if tiny else 1.0)  # also right at the identity
    R = so3_exp(omega)
    theta = float(omega.double().norm(dim=-1).max())
    # Rodrigues' rounding at the largest angle (tests/tolerances.py), through R R^T and det R.
    assert _is_rotation(R, *orthonormality_bounds(so3_exp_entry_error(theta, dtype), dtype))
    log = so3_log(R)
    # The angle is 2 atan2(.) of a half-angle in [0, pi/2] (1 ulp) times |q_vec| / sin: a few eps.
    assert torch.isfinite(log).all() and bool((log.norm(dim=-1) <= math.pi * (1 + 8 * eps(dtype))).all())
    back = so3_exp(log)
    # exp(log R) differs from R by R's own rounding, kornia's quaternion extraction (Shepperd's
    # branch on the largest radicand >= 1: ~8 eps in q, times 4 in the quadratic map q -> R) and
    # the second exp's rounding at an angle <= pi.
    tol = so3_exp_entry_error(theta, dtype) + so3_exp_entry_error(math.pi, dtype) + 32 * eps(dtype)
    assert torch.allclose(back, R, atol=tol, rtol=0)
    # The angle between R and itself is 0; between R and exp(log R) too (geodesic_angle is atan2
    # of the skew part of R^T back, which entry errors tol reach at most 3 tol, plus gamma_3).
    assert float(geodesic_angle(R, back).max()) <= 3 * tol + gamma(3, dtype)


@SETTINGS
@given(m=st.lists(finite, min_size=9, max_size=9), rank=st.sampled_from([3, 2, 1, 0]), dtype=DTYPES,
       scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_project_to_so3_gives_a_rotation_even_for_singular_input(m, rank, dtype, scale):
    M = torch.tensor(m, dtype=torch.float64).view(3, 3)
    U, S, Vh = torch.linalg.svd(M)
    S[rank:] = 0  # rank-deficient (rank 0 = the zero matrix)
    M = ((U * S) @ Vh * scale).to(dtype)
    R = project_to_so3(M)
    # U diag(1, 1, d) V^T: the SVD's orthogonal factors (orthogonal to gamma_(10 n^2) whatever the
    # rank or scale of M, tests/tolerances.py) and one 3-term product.
    assert _is_rotation(R, *orthonormality_bounds(2 * svd_orthogonality(3, dtype) + gamma(3, dtype), dtype))


@SETTINGS
@given(p=st.lists(st.lists(st.floats(-1, 1), min_size=2, max_size=2), min_size=1, max_size=16),
       scale=st.sampled_from([0.0, 1e-3, 1.0, 1e2, 1e4]), dtype=DTYPES)
def test_bearings_are_unit_with_positive_z_and_project_back(p, scale, dtype):
    p2d = torch.tensor(p, dtype=dtype) * scale
    b = to_bearings(p2d)
    assert torch.isfinite(b).all()
    # normalize: a 3-term norm (gamma_3), sqrt and the division; the test's norm again: gamma_10.
    assert torch.allclose(b.norm(dim=-1), torch.ones(len(p), dtype=dtype), atol=gamma(10, dtype), rtol=0)
    assert bool((b[..., 2] > 0).all())
    back = project(b)
    # b_x / b_z = (p_x / |v|) / (1 / |v|): the common norm cancels, leaving 4 roundings (the two
    # divisions of normalize, kornia's 1 / z and its product), relative; a subnormal p_x rounds
    # absolutely, below float32's smallest normal number.
    assert torch.allclose(back, p2d, rtol=4 * eps(dtype), atol=torch.finfo(dtype).tiny)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), unmatched=st.booleans(), behind=st.booleans(),
       same=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e4]), dtype=DTYPES)
def test_pose_errors_are_defined_for_any_pose_and_scene(seed, n, unmatched, behind, same, scale, dtype):
    g = torch.Generator().manual_seed(seed)
    R_gt = random_rotation(1, generator=g, dtype=dtype)
    t_gt = torch.randn(1, 3, generator=g, dtype=dtype) * scale
    p3d = torch.randn(1, n, 3, generator=g, dtype=dtype) * scale
    if behind:  # the true camera sees the points from behind: depth <= 0
        p3d = p3d - (R_gt[0, 2] * (10 * scale + p3d.abs().max()))
    match = torch.full((1, n), -1) if unmatched else torch.randperm(n, generator=g)[None]
    R, t = (R_gt, t_gt) if same else (random_rotation(1, generator=g, dtype=dtype), torch.randn(1, 3, generator=g, dtype=dtype))
    out = pose_errors(R, t, R_gt, t_gt, p3d, match, torch.ones(1, n, dtype=torch.bool))
    rot, te, cr, ok = (out[k][0] for k in ("rot_err_deg", "t_err", "center_err_rel", "success"))
    assert math.isfinite(float(rot)) and 0.0 <= float(rot) <= 180.0
    assert math.isfinite(float(te)) and float(te) >= 0.0
    assert not math.isnan(float(cr)) and float(cr) >= 0.0  # +inf when the depth scale is undefined
    assert bool(ok) == (float(rot) < 5 and float(cr) < 0.05)
    if same:
        # acos of the trace of R^T R (in float64) for R rounded once to dtype: tr = 3 + d with |d|
        # <= 3 sqrt(3) eps (each entry within eps / 2), plus float64's own few eps, so the angle
        # is at most acos(1 - |d| / 2) = sqrt(|d|); t - t_gt is exactly 0.
        d = 3 * math.sqrt(3) * eps(dtype) + 16 * eps(torch.float64)
        assert float(rot) <= math.degrees(math.sqrt(d)) and float(te) == 0.0


@st.composite
def garbage(draw):
    b, m, n = draw(st.integers(1, 3)), draw(st.integers(0, 10)), draw(st.integers(0, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["uniform", "zeros", "negative", "nan", "inf", "huge", "one_hot", "sparse"]))
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(b, m, n, generator=g, dtype=torch.float64)
    if kind == "zeros":
        P.zero_()
    elif kind == "negative":
        P = P - 0.5
    elif kind in ("nan", "inf") and P.numel():
        P.view(-1)[:: max(1, P.numel() // 5)] = float(kind)
    elif kind == "huge":
        P = P * 1e300
    elif kind == "one_hot":
        P = (P == P.amax(-1, keepdim=True)).double() if P.numel() else P
    elif kind == "sparse":
        P = P * (P > 0.9)
    bearings = to_bearings(torch.randn(b, m, 2, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3])))
    points = torch.randn(b, n, 3, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e4]))
    if draw(st.booleans()) and n:
        points[..., :] = points[:, :1]  # every 3D point the same
    mask2d = torch.rand(b, m, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    mask3d = torch.rand(b, n, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    dtype = draw(DTYPES)
    return P.to(dtype), bearings.to(dtype), points.to(dtype), mask2d, mask3d, seed


@SETTINGS
@given(args=garbage(), refine=st.sampled_from([0, 5]))
def test_ransac_on_garbage_returns_finite_poses_and_valid_statuses(args, refine):
    P, bearings, points, mask2d, mask3d, seed = args
    out = ransac_pnp(P, bearings, points, mask2d, mask3d, num_hypotheses=16, refine_steps=refine,
                     generator=torch.Generator().manual_seed(seed))
    b = P.shape[0]
    assert out.R.shape == (b, 3, 3) and out.t.shape == (b, 3)
    assert _is_rotation(out.R.double(), 1e-4)
    assert torch.isfinite(out.t).all() and torch.isfinite(out.score).all()
    assert set(out.status.tolist()) <= {s.value for s in RansacStatus}
    assert bool((out.num_inliers >= 0).all())
    too_few = (mask2d.sum(1) < 4) | (mask3d.sum(1) < 4)
    assert bool((out.status[too_few] != RansacStatus.OK).all())


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1e-1, 1.0, 1e2, 1e4]), dtype=DTYPES,
       m=st.integers(4, 10), outliers=st.sampled_from([0.0, 0.5]), backward=st.sampled_from(["implicit", "unrolled"]))
def test_gradients_through_the_whole_network_stay_finite(seed, scale, dtype, m, outliers, backward):
    """Tiny random scenes at any scale, float32 or float64, with refinement and both losses: every
    parameter gradient is finite."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, 3))
    R = project_to_so3(torch.tensor(rng.normal(size=(3, 3)))).numpy()
    t = -R @ X.mean(0) + np.array([0.0, 0.0, 4.0 * np.abs(X).max()])
    xc = X @ R.T + t
    assume(bool((xc[:, 2] > 1e-6).all()))
    scene = {"p2d": xc[:, :2] / xc[:, 2:], "p3d": X * scale, "R": R, "t": t * scale, "match": np.arange(m)}
    if outliers:
        scene = add_outliers(scene, outliers, outliers, rng)
    batch = collate_scenes([scene, scene])
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    torch.manual_seed(seed % 1000)
    net = BlindPnPNet(feature_dim=8, depth=1, ransac={"num_hypotheses": 16}, refine={"max_iter": 10}, backward=backward).to(dtype)
    net.train()
    out = net(batch, refine=True, generator=torch.Generator().manual_seed(seed))
    terms = BlindPnPLoss(pose_start_epoch=0)(out, batch, 0)
    assert torch.isfinite(terms.loss)
    terms.loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
