"""BlindPnPNet end to end: geometric layers recover the pose from true-match costs, padding
never changes a result, permutations permute P and keep the pose, gradients reach the encoders."""

from __future__ import annotations

import math

import pytest
import torch

from bpnp.data.collate import collate_scenes
from bpnp.data.synthetic import SyntheticConfig, make_instance
from bpnp.geometry.metrics import pose_errors
from bpnp.models import NOT_RUN, BlindPnPNet
from bpnp.models.settings import SettingError
from bpnp.training.losses import BlindPnPLoss
from tests.tolerances import eps, gamma, marginal_rounding


def _batch(b=3, m=(40, 60), outliers_2d=0.0, outliers_3d=0.0, seed=0):
    cfg = SyntheticConfig(num_points_2d=m, outlier_frac_2d=outliers_2d, outlier_frac_3d=outliers_3d, noise_px=1.0)
    return collate_scenes([make_instance(cfg, seed, i) for i in range(b)])


def _small_net(**kw):
    """A small network: the default matcher (attention) with bins unless ``kw`` says otherwise."""
    torch.manual_seed(0)
    args = dict(feature_dim=16, depth=2, knn=4, ransac={"num_hypotheses": 128})
    args.update(kw)
    return BlindPnPNet(**args)


def _true_cost(batch):
    """M = 0 on true pairs, 2 elsewhere (and on every pair of a 2D outlier)."""
    B, m = batch["match"].shape
    n = batch["p3d"].shape[1]
    M = torch.full((B, m, n), 2.0)
    valid = batch["match"] >= 0
    b_idx, i_idx = valid.nonzero(as_tuple=True)
    M[b_idx, i_idx, batch["match"][b_idx, i_idx]] = 0.0
    return M


def _pad_garbage(batch, extra2d=7, extra3d=11, seed=5):
    """Append masked garbage points to every item (huge values, NaN in p2d)."""
    g = torch.Generator().manual_seed(seed)
    B = batch["p2d"].shape[0]
    out = dict(batch)
    out["p2d"] = torch.cat([batch["p2d"], 1e3 * torch.randn(B, extra2d, 2, generator=g)], 1)
    out["p2d"][:, -1] = float("nan")
    out["p3d"] = torch.cat([batch["p3d"], 1e3 * torch.randn(B, extra3d, 3, generator=g)], 1)
    out["mask2d"] = torch.cat([batch["mask2d"], torch.zeros(B, extra2d, dtype=torch.bool)], 1)
    out["mask3d"] = torch.cat([batch["mask3d"], torch.zeros(B, extra3d, dtype=torch.bool)], 1)
    out["match"] = torch.cat([batch["match"], torch.full((B, extra2d), -1)], 1)
    return out


def _same_pose(a, b, rtol=1e-4):
    """Same pose up to float32 solver noise: rotations to rtol, translations relative to |t|."""
    dt = (a.t - b.t).norm(dim=-1) / b.t.norm(dim=-1).clamp_min(1e-6)
    return bool(torch.allclose(a.R, b.R, atol=rtol)) and bool(torch.all(dt < rtol))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_true_match_costs_recover_the_pose():
    batch = _batch(b=4, m=(50, 80), outliers_2d=0.2, outliers_3d=0.3)
    net = _small_net().eval()
    out = net(batch, cost_override=_true_cost(batch), generator=_gen())
    assert out.refined
    assert torch.all(out.ransac_status == 0)
    errs = pose_errors(out.R, out.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert torch.all(errs["rot_err_deg"] < 1.0), errs["rot_err_deg"]
    assert torch.all(errs["success"])
    # Refinement on the P-weighted angular error is at least as good as RANSAC's pose (noise 1 px).
    e0 = pose_errors(out.R0, out.t0, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert errs["rot_err_deg"].mean() <= e0["rot_err_deg"].mean() + 0.05
    # Without bins, the original's unweighted-robust refinement (rho = identity) is biased by the
    # mass uniform marginals force onto wrong pairs when there are outliers; the outlier bins
    # take that mass off the real pairs, so with them even rho = identity is accurate.
    plain = _small_net(refine={"robust": "none"}, sinkhorn={"bins": "none"}).eval()(batch, cost_override=_true_cost(batch), generator=_gen())
    e_plain = pose_errors(plain.R, plain.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert e_plain["rot_err_deg"].mean() > 3 * errs["rot_err_deg"].mean()
    binned = _small_net(refine={"robust": "none"}, sinkhorn={"bin_init": 1.0}).eval()(batch, cost_override=_true_cost(batch), generator=_gen())
    e_binned = pose_errors(binned.R, binned.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert e_binned["rot_err_deg"].mean() < 0.5 * e_plain["rot_err_deg"].mean()
    assert torch.all(e_binned["success"])
    clean = _batch(b=2, m=(50, 60))
    out = _small_net(refine={"robust": "none"}, sinkhorn={"bins": "none"}).eval()(clean, cost_override=_true_cost(clean), generator=_gen())
    e_clean = pose_errors(out.R, out.t, clean["R"], clean["t"], clean["p3d"], clean["match"], clean["mask2d"], clean["mask3d"])
    assert torch.all(e_clean["rot_err_deg"] < 0.5)
    # A wrong cost (true pairs made expensive) must not "recover" it: the test can fail.
    bad = _small_net(sinkhorn={"bins": "none"}).eval()(batch, cost_override=2.0 - _true_cost(batch), generator=_gen())
    e_bad = pose_errors(bad.R, bad.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert not torch.all(e_bad["success"])


# knn = 6 in float64: with that untrained network two refinements stop at the iteration cap, where
# float32 rounding alone (P agrees to 3e-8) moves the pose by 2e-4 relative.
# The attention matcher (with bins) in float64 for the same reason.
@pytest.mark.parametrize("training,matcher,knn,knn_scale", [
    (False, "bpnpnet", 0, "radius"), (True, "bpnpnet", 0, "radius"), (True, "bpnpnet", 6, "radius"),
    (True, "bpnpnet", 6, "neighbour"), (False, "attention", 4, "radius"), (True, "attention", 4, "radius")])
def test_padding_never_changes_a_result(training, matcher, knn, knn_scale):
    dtype = torch.float64 if knn else torch.float32
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _batch(b=3).items()}
    bins = "shared" if matcher == "attention" else "none"
    net = _small_net(matcher=matcher, use_stn=True, knn=knn, knn_scale=knn_scale, sinkhorn={"bins": bins}).to(dtype).train(training)
    ref = net(batch, refine=True, generator=_gen())
    pad = net(_pad_garbage(batch), refine=True, generator=_gen())
    m, n = batch["p2d"].shape[1], batch["p3d"].shape[1]
    assert torch.allclose(pad.P[:, :m, :n], ref.P, atol=1e-6)
    assert torch.all(pad.P[:, m:, :] == 0) and torch.all(pad.P[:, :, n:] == 0)
    assert torch.allclose(pad.M[:, :m, :n], ref.M, atol=1e-6)
    assert torch.allclose(pad.R0, ref.R0, atol=1e-5) and torch.allclose(pad.t0, ref.t0, atol=1e-5)
    assert _same_pose(pad, ref)
    assert torch.all(torch.isfinite(pad.P))
    if bins != "none":
        assert torch.allclose(pad.inlier2d[:, :m], ref.inlier2d, atol=1e-6) and torch.all(pad.inlier2d[:, m:] == 0)
        assert torch.allclose(pad.inlier3d[:, :n], ref.inlier3d, atol=1e-6) and torch.all(pad.inlier3d[:, n:] == 0)
    # With the true-match cost as well (pose well determined)
    M = _true_cost(batch)
    Mp = torch.full(pad.P.shape, 7.0)
    Mp[:, :m, :n] = M
    a = net(batch, cost_override=M, generator=_gen())
    b = net(_pad_garbage(batch), cost_override=Mp, generator=_gen())
    assert _same_pose(a, b, rtol=1e-5)


@pytest.mark.parametrize("matcher,knn,knn_scale", [("bpnpnet", 0, "radius"), ("bpnpnet", 6, "radius"),
                                                   ("bpnpnet", 6, "neighbour"), ("attention", 4, "radius")])
def test_permuting_points_permutes_P_and_keeps_the_pose(matcher, knn, knn_scale):
    # float64 with the stem: the refinement of a random network's diffuse P can amplify float32
    # summation-order noise (1e-7 in P) to a different pose, which is not what this test is about
    dtype = torch.float64 if knn else torch.float32
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _batch(b=2, m=(40, 40)).items()}
    net = _small_net(matcher=matcher, knn=knn, knn_scale=knn_scale).to(dtype).eval()
    ref = net(batch, generator=_gen())
    m, n = batch["p2d"].shape[1], batch["p3d"].shape[1]
    g = torch.Generator().manual_seed(3)
    p2, p3 = torch.randperm(m, generator=g), torch.randperm(n, generator=g)
    inv3 = torch.argsort(p3)
    perm = dict(batch)
    perm["p2d"], perm["mask2d"] = batch["p2d"][:, p2], batch["mask2d"][:, p2]
    perm["match"] = torch.where(batch["match"][:, p2] >= 0, inv3[batch["match"][:, p2].clamp(min=0)], -1)
    perm["p3d"], perm["mask3d"] = batch["p3d"][:, p3], batch["mask3d"][:, p3]
    out = net(perm, generator=_gen())
    assert torch.allclose(out.P, ref.P[:, p2][:, :, p3], atol=1e-6)
    assert _same_pose(out, ref)
    # Not trivially true: a different RANSAC draw gives a (slightly) different pose.
    other = net(batch, generator=_gen(1))
    assert not torch.equal(other.R0, ref.R0)


@pytest.mark.parametrize("matcher", ["bpnpnet", "attention"])
def test_refinement_switch_and_gradients_reach_the_encoders(matcher):
    batch = _batch(b=2)
    net = _small_net(matcher=matcher).train()
    out = net(batch)  # training, refine.in_training=False: RANSAC pose only
    assert not out.refined and torch.equal(out.R, out.R0)
    assert torch.all(out.pnp_status == NOT_RUN)
    net_r = _small_net(matcher=matcher, refine={"in_training": True}).train()
    encoders = [net_r.encoder2d, net_r.encoder3d] if matcher == "bpnpnet" else [net_r.matcher]
    out = net_r(batch)
    assert out.refined and out.R.requires_grad
    loss = BlindPnPLoss(pose_start_epoch=0)(out, batch, epoch=0)
    loss.loss.backward()
    grads = [p.grad for e in encoders for p in e.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # The pose term alone reaches the network through the refinement node and the OT node.
    net_r.zero_grad()
    out = net_r(batch)
    from bpnp.training.losses import pose_loss

    # uncapped: an untrained network's pose may be beyond the default caps, where the loss is flat
    pose_loss(out.R, out.t, batch["R"], batch["t"], rot_cap=math.pi, t_cap=math.inf).mean().backward()
    grads = [p.grad for e in encoders for p in e.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if net_r.bins != "none":
        assert net_r.sinkhorn.bin_cost.grad is not None and float(net_r.sinkhorn.bin_cost.grad.abs()) > 0


def test_pose_false_stops_after_sinkhorn():
    batch = _batch(b=2)
    net = _small_net().train()
    full = net(batch, generator=_gen())
    only_p = net(batch, pose=False)
    assert torch.equal(full.P, only_p.P)  # the same P; only the geometry is left out
    for pose in (only_p.R0, only_p.t0, only_p.R, only_p.t):
        assert torch.isnan(pose).all()
    assert torch.all(only_p.ransac_status == NOT_RUN) and torch.all(only_p.pnp_status == NOT_RUN)
    assert torch.isfinite(full.R0).all() and torch.all(full.ransac_status != NOT_RUN)
    with pytest.raises(ValueError, match="refine=True needs pose=True"):
        net(batch, refine=True, pose=False)


def test_refine_pose_alone_equals_a_refined_forward():
    """Refinement-only from an unrefined output, at two robust scales, gives what a refined forward
    with the same RANSAC random numbers gives at that scale (what tune_robust_scale relies on)."""
    batch = _batch(b=3, outliers_2d=0.2, outliers_3d=0.2)
    net = _small_net().eval()
    with torch.no_grad():
        base = net(batch, generator=_gen(), refine=False)
        assert not base.refined and torch.all(base.pnp_status == NOT_RUN)
        for scale in (1e-3, 1e-4):
            net.pnp.kernel.scale = scale
            full = net(batch, generator=_gen())
            alone = net.refine_pose(base, batch)
            assert alone.refined and torch.equal(alone.P, base.P) and torch.equal(alone.R0, base.R0)
            assert torch.equal(alone.R, full.R) and torch.equal(alone.t, full.t)
            assert torch.equal(alone.pnp_status, full.pnp_status)
        assert not base.refined  # the earlier output is not modified
        with pytest.raises(ValueError, match="pose=False"):
            net.refine_pose(net(batch, pose=False), batch)
        with pytest.raises(ValueError, match="pass the batch the output came from"):
            net.refine_pose(base, _batch(b=2))


@pytest.mark.parametrize("kw", [dict(backward="unrolled"), dict(refine={"robust": "huber", "robust_scale": 0.02}), dict(use_stn=False, normalize_3d=False),
                                dict(sinkhorn={"lam": 20.0, "max_iter": 5, "tol": 1e-3}, ransac={"top_k": 30, "threshold": 0.02})])
def test_config_switches(kw):
    batch = _batch(b=2, m=(20, 30))
    net = _small_net(**{**kw, "refine": {**kw.get("refine", {}), "in_training": True}}).train()
    out = net(batch, generator=_gen())
    # P (the plan, or its real block renormalised) sums to 1: two m n-term sums of the same
    # entries (gamma_(mn) each, whatever the order) and a division.
    mn = out.P.shape[1] * out.P.shape[2]
    assert torch.allclose(out.P.sum((1, 2)), torch.ones(2), atol=2 * gamma(mn, torch.float32) + eps(torch.float32), rtol=0)
    assert torch.isfinite(out.R).all() and torch.isfinite(out.t).all()
    (out.P.sum() + out.R.sum() + out.t.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    if "sinkhorn" in kw:
        assert int(out.sinkhorn_iterations.max()) <= 5


def test_keyword_inputs_and_validation():
    batch = _batch(b=1, m=(10, 10))
    net = _small_net().eval()
    a = net(batch, generator=_gen())
    b = net(p2d=batch["p2d"], p3d=batch["p3d"], generator=_gen())  # masks default to all-real
    assert torch.allclose(a.P, b.P)
    with pytest.raises(ValueError, match="p2d"):
        net(p2d=batch["p3d"], p3d=batch["p3d"])
    with pytest.raises(ValueError, match="cost_override"):
        net(batch, cost_override=torch.zeros(1, 3, 3))
    assert math.isclose(float(a.P.detach().sum()), 1.0, rel_tol=2 * gamma(a.P.numel(), torch.float32) + eps(torch.float32))


def test_bins_put_each_points_inlier_probability_into_what_ransac_samples():
    """With bins, the P that RANSAC samples from (and the refinement weighs) is the real block of
    the augmented plan, renormalised: each row's mass is proportional to that 2D point's inlier
    probability (each column's to the 3D point's), so likely outliers are rarely sampled."""
    batch = _batch(b=2, outliers_2d=0.3, outliers_3d=0.3)
    net = _small_net(sinkhorn={"bins": "shared"}).eval()
    with torch.no_grad():
        out = net(batch, refine=False, generator=_gen())
    rows = out.P.sum(2)
    cols = out.P.sum(1)
    # Equal up to the plan's marginal error and rounding: the inlier probability is the real part
    # of a row over its total, which is 1 / (m' + n') only up to the row's share of the measured
    # L1 marginal error, at most err (m' + n') relative; rounding: the row sums (n terms), the
    # renormalising mass (m n terms) and the sum of the probabilities (m terms), each gamma_k.
    f32 = torch.float32
    m, n = out.P.shape[1:]
    err = net.sinkhorn.last_info.marginal_error.double()[:, None]
    k = (batch["mask2d"].sum(1) + batch["mask3d"].sum(1)).double()[:, None]
    rel = gamma(n, f32) + gamma(m, f32) + 2 * gamma(m * n, f32) + 5 * eps(f32) + 2 * err * k
    gap2d = (rows - out.inlier2d / out.inlier2d.sum(1, keepdim=True)).abs().double()
    gap3d = (cols - out.inlier3d / out.inlier3d.sum(1, keepdim=True)).abs().double()
    assert (gap2d <= rel * rows.double().amax(1, keepdim=True)).all()
    assert (gap3d <= rel * cols.double().amax(1, keepdim=True)).all()
    # not trivially uniform: the inlier probabilities (and so the sampling weights) differ by point
    assert float(out.inlier2d.std(1).min()) > 0
    # the plain node instead gives every real row the same mass, outlier or not
    plain_net = _small_net(sinkhorn={"bins": "none"}).eval()
    plain = plain_net(batch, refine=False, generator=_gen())
    m_real = batch["mask2d"].sum(1, keepdim=True).float()
    # every row within the plan's measured L1 marginal error, plus this evaluation's rounding
    err = float(plain_net.sinkhorn.last_info.marginal_error.max())
    atol = err + 2 * marginal_rounding(*plain.P.shape[1:], torch.float32)
    assert torch.allclose(plain.P.sum(2), batch["mask2d"].float() / m_real, atol=atol, rtol=0)


def test_refine_gate_keeps_the_pairs_near_the_ransac_pose():
    """Without bins the plain refinement (rho = identity) is biased by the mass P puts on wrong
    pairs; weighing only the pairs within the gate of the RANSAC pose removes that bias, and the
    gradient still reaches the kept entries of P."""
    batch = _batch(b=4, m=(50, 80), outliers_2d=0.2, outliers_3d=0.3)
    M = _true_cost(batch)
    args = (batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    plain = _small_net(refine={"robust": "none"}, sinkhorn={"bins": "none"}).eval()(batch, cost_override=M, generator=_gen())
    gated = _small_net(refine={"robust": "none", "gate": 0.01}, sinkhorn={"bins": "none"}).eval()(batch, cost_override=M, generator=_gen())
    e_plain, e_gated = pose_errors(plain.R, plain.t, *args), pose_errors(gated.R, gated.t, *args)
    assert torch.equal(plain.R0, gated.R0)  # same RANSAC pose
    assert e_gated["rot_err_deg"].mean() < 0.3 * e_plain["rot_err_deg"].mean()
    assert torch.all(e_gated["success"])
    Mg = M.clone().requires_grad_(True)
    out = _small_net(sinkhorn={"bins": "none"}, refine={"gate": 0.01}).train()(batch, cost_override=Mg, refine=True, generator=_gen())
    from bpnp.training.losses import pose_loss

    pose_loss(out.R, out.t, batch["R"], batch["t"], rot_cap=math.pi, t_cap=math.inf).sum().backward()
    assert torch.isfinite(Mg.grad).all() and float(Mg.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="refine.gate: expected a number > 0 and < 1.5708"):
        _small_net(refine={"gate": 2.0})


def test_refine_top_k_is_the_dense_refinement_on_the_kept_entries():
    """The sparse refinement (top-k entries of each row of the gated P, solved as pairs) gives the
    pose and the gradient to P of the dense refinement whose W is P on those entries and 0
    elsewhere (float64 network), and with true-match costs recovers the pose."""
    from dataclasses import replace

    batch = _batch(b=3, m=(30, 45), outliers_2d=0.2, outliers_3d=0.2)
    b64 = {**batch, "p2d": batch["p2d"].double(), "p3d": batch["p3d"].double()}
    net = _small_net(refine={"robust": "geman_mcclure", "robust_scale": 1e-3, "gate": 0.05}).double().eval()
    with torch.no_grad():
        base = net(b64, refine=False, generator=_gen(), cost_override=_true_cost(batch).double())
    k = 3
    P = base.P.detach().clone().requires_grad_(True)
    settings = net.refine_settings.to_dict()
    net.configure(refine={**settings, "top_k": k})
    sparse = net.refine_pose(replace(base, P=P), b64)
    (gs,) = torch.autograd.grad((sparse.R.square().sum() + sparse.t.sum()), P)
    # the entries the sparse refinement keeps: top-k of each row of the gated P
    from bpnp.models.network import _consensus_mask, _geometric_inputs

    bear, pts = _geometric_inputs(b64["p2d"], b64["p3d"], b64["mask2d"], b64["mask3d"])
    gated = base.P * _consensus_mask(bear, pts, base.R0, base.t0, 0.05)
    keep = torch.zeros_like(gated, dtype=torch.bool).scatter_(2, gated.topk(k, dim=2).indices, True)
    net.configure(refine={**settings, "top_k": None})
    Pd = base.P.detach().clone().requires_grad_(True)
    dense = net.refine_pose(replace(base, P=Pd * keep), b64)
    (gd,) = torch.autograd.grad((dense.R.square().sum() + dense.t.sum()), Pd)
    torch.testing.assert_close(sparse.R, dense.R, atol=1e-9, rtol=0)
    torch.testing.assert_close(sparse.t, dense.t, atol=1e-9, rtol=0)
    torch.testing.assert_close(gs, gd, atol=1e-9, rtol=1e-6)
    assert (gs[~keep] == 0).all()
    e = pose_errors(sparse.R, sparse.t, batch["R"].double(), batch["t"].double(), b64["p3d"], batch["match"],
                    batch["mask2d"], batch["mask3d"])
    assert torch.all(e["success"])
    with pytest.raises(ValueError, match="top_k"):
        _small_net(refine={"top_k": 0})


def test_refine_top_k_trains_and_keeps_float32_outputs():
    batch = _batch(b=2, m=(20, 30))
    net = _small_net(refine={"top_k": 2, "in_training": True}).train()
    out = net(batch, generator=_gen())
    assert out.R.dtype == torch.float32 and out.t.dtype == torch.float32 and out.refined
    (out.R.sum() + out.t.sum()).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("top_k", [None, 3])
def test_refine_dtype_sets_the_working_precision(top_k):
    """refine.dtype: float64 (default) solves in float64 and returns float32; "input" solves in
    the network's float32. Both recover the pose from true-match costs."""
    batch = _batch(b=2, m=(20, 30))
    net = _small_net(refine={"top_k": top_k}).eval()
    assert net.pnp.work_dtype == torch.float64
    out64 = net(batch, cost_override=_true_cost(batch), generator=_gen())
    net.configure(refine={"dtype": "input"})
    assert net.pnp.work_dtype is None and net.refine_top_k == top_k
    out32 = net(batch, cost_override=_true_cost(batch), generator=_gen())
    errs = []
    for out in (out64, out32):
        assert out.R.dtype == torch.float32 and out.refined
        errs.append(pose_errors(out.R, out.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"],
                                batch["mask3d"])["rot_err_deg"])
        assert float(errs[-1].max()) < 1.0  # noise 1 px
    assert float((errs[0] - errs[1]).abs().max()) < 0.01  # the same optimum in either precision
    with pytest.raises(SettingError, match="refine.dtype"):
        net.configure(refine={"dtype": "float16"})


def test_input_check_syncs_with_the_host_once_per_batch():
    """The NaN/Inf check of the forward's inputs reads one flag back from the device per batch (a
    host sync on an accelerator), not one per point set; bad input still gets its message."""
    from torch.overrides import TorchFunctionMode

    syncs = ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero")

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += getattr(func, "__name__", "") in syncs
            return func(*args, **(kwargs or {}))

    batch = _batch(b=2, m=(10, 12))
    net = _small_net()
    with Count() as count:
        net._check_inputs(batch["p2d"], batch["p3d"], batch["mask2d"], batch["mask3d"])
    assert count.n == 1
    bad = batch["p3d"].clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"p3d has 1 real \(unmasked\) point\(s\) with NaN/Inf coordinates, in item\(s\) 1"):
        net._check_inputs(batch["p2d"], bad, batch["mask2d"], batch["mask3d"])


def test_pose_search_runs_at_inference_only_and_keeps_ransacs_pose():
    batch = _batch(b=3, m=(50, 80), outliers_2d=0.3, outliers_3d=0.3)
    M = _true_cost(batch)
    base = _small_net().eval()(batch, cost_override=M, generator=_gen())
    assert base.R_ransac is None and base.search_matches is None
    net = _small_net(search={"enabled": True, "hypotheses": 3}).eval()
    out = net(batch, cost_override=M, generator=_gen())
    torch.testing.assert_close(out.R_ransac, base.R0)  # same RANSAC draw
    assert out.search_matches.shape == batch["match"].shape
    found = out.search_matches >= 0
    # With the true costs the searched matches are the true ones where it keeps one.
    assert (out.search_matches[found] == batch["match"][found]).float().mean() > 0.95
    errs = pose_errors(out.R, out.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert torch.all(errs["success"])
    assert net.settings()["search"]["hypotheses"] == 3
    net.train()
    trained = net(batch, cost_override=M, generator=_gen(), refine=True)
    assert trained.R_ransac is None  # never in training steps
    on_matches = _small_net(search={"enabled": True, "refine_on_matches": True}).eval()(batch, cost_override=M, generator=_gen())
    e2 = pose_errors(on_matches.R, on_matches.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert torch.all(e2["success"])
    with pytest.raises(Exception, match="search.hypotheses"):
        _small_net(search={"hypotheses": 0})


def test_rerank_pool_reorders_the_search_starts_only_when_larger_than_the_starts():
    """``search.rerank_pool`` <= ``hypotheses`` is off (the same forward); a larger pool searches
    from RANSAC's poses re-ranked by row support and still finds the true-match pose."""
    from bpnp.models.settings import SettingError

    batch = _batch(b=2, m=(50, 60), outliers_2d=0.3, outliers_3d=0.3, seed=4)
    M = _true_cost(batch)
    settings = dict(ransac={"num_hypotheses": 64})
    with torch.no_grad():
        off = _small_net(**settings, search={"enabled": True, "hypotheses": 3}).eval()(batch, cost_override=M, generator=_gen())
        small = _small_net(**settings, search={"enabled": True, "hypotheses": 3, "rerank_pool": 3}).eval()(
            batch, cost_override=M, generator=_gen())
        pooled = _small_net(**settings, search={"enabled": True, "hypotheses": 3, "rerank_pool": 32}).eval()(
            batch, cost_override=M, generator=_gen())
    assert torch.equal(off.R, small.R) and torch.equal(off.search_matches, small.search_matches)
    torch.testing.assert_close(pooled.R_ransac, off.R_ransac)  # RANSAC's own pose is unchanged
    errs = pose_errors(pooled.R, pooled.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert torch.all(errs["success"])
    for key, value in (("rerank_pool", -1), ("rerank_partners", 0)):
        with pytest.raises(SettingError, match=f"search.{key}"):
            _small_net(search={key: value})


def test_guided_ransac_setting_reaches_ransac_and_finds_the_true_match_pose():
    """``ransac.guided`` and ``ransac.sample_power`` are passed to RANSAC; with the true-match
    cost and every hypothesis guided (and tempered), the RANSAC pose is still the true one."""
    batch = _batch(b=2, m=(40, 50))
    net = _small_net(ransac={"num_hypotheses": 64, "guided": 1.0, "guided_neighbours": 8, "sample_power": 3.0}).eval()
    assert net.ransac_kwargs["guided"] == 1.0 and net.ransac_kwargs["guided_neighbours"] == 8
    assert net.ransac_kwargs["sample_power"] == 3.0
    with torch.no_grad():
        out = net(batch, cost_override=_true_cost(batch), generator=_gen())
    err = pose_errors(out.R0, out.t0, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"])
    assert (err["rot_err_deg"] < 1.0).all()


def test_relative_gates_at_the_reference_spread_change_nothing_and_scale_with_it():
    """``gates.relative`` with the reference at each item's own spread (factor exactly 1) gives
    the fixed gates' result; elsewhere every gate is the configured one times the factor."""
    from bpnp.geometry.angular_scale import keypoint_spread
    from bpnp.models.network import _geometric_inputs

    batch = _batch(b=1, m=(50, 50), outliers_2d=0.3, outliers_3d=0.3, seed=3)
    settings = dict(ransac={"num_hypotheses": 64}, search={"enabled": True}, refine={"gate": 0.05})
    fixed = _small_net(**settings).eval()
    bearings, _ = _geometric_inputs(batch["p2d"], batch["p3d"], batch["mask2d"], batch["mask3d"])
    spread = float(keypoint_spread(bearings.double(), batch["mask2d"])[0])
    at_ref = _small_net(**settings, gates={"relative": True, "reference": spread}).eval()
    with torch.no_grad():
        a, b = fixed(batch, generator=_gen()), at_ref(batch, generator=_gen())
    assert torch.equal(a.R0, b.R0) and torch.equal(a.search_matches, b.search_matches)
    torch.testing.assert_close(a.R, b.R, rtol=0, atol=8 * torch.finfo(torch.float32).eps)  # same maths, float32 out
    half = _small_net(**settings, gates={"relative": True, "reference": 2 * spread, "min_factor": 0.1})
    torch.testing.assert_close(half._gate_factor(bearings, batch["mask2d"]), torch.tensor([0.5], dtype=torch.float64))
    assert fixed._gate_factor(bearings, batch["mask2d"]) is None
    assert _small_net(gates={"relative": True})._gate_factor(bearings, batch["mask2d"]) is not None


def test_likeliest_keeps_the_top_share_of_real_points_in_their_order():
    from bpnp.models.network import likeliest_points

    score = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6],
                          [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]])
    mask = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    idx, keep = likeliest_points(score, mask, 0.5)
    # item 0: ceil(0.5 x 8) = 4 of the largest (1, 5, 3, 7) in index order; item 1: at least 4 of its 6 real
    # points (0, 2, 4, 5: the padding's 0.6 and 0.4 never count), padded to the same width
    assert idx.tolist() == [[1, 3, 5, 7], [0, 2, 4, 5]] and keep.all()
    idx, keep = likeliest_points(score, mask, 1.0)
    assert idx[0].tolist() == list(range(8)) and keep[0].all()
    assert idx[1, :6].tolist() == list(range(6)) and keep[1].tolist() == [True] * 6 + [False] * 2
    assert (idx[1, 6:] == 0).all()  # padding points at a valid index


def test_second_pass_keeps_the_first_pose_unless_its_own_has_more_consensus():
    """``search.second_pass``: RANSAC's pose is untouched, an item keeps the first pass's pose
    exactly (0) or takes the second's (1; that choice is :func:`select_by_consensus`'s, tested in
    tests/geometry/test_pose_search.py); ``second_below`` small enough runs it for no item
    (-1, the same output as without it); with the true costs both passes solve every item."""
    batch = _batch(b=3, m=(50, 70), outliers_2d=0.4, outliers_3d=0.4, seed=2)
    settings = dict(ransac={"num_hypotheses": 64}, refine={"gate": 0.05})
    with torch.no_grad():
        first = _small_net(**settings, search={"enabled": True}).eval()(batch, generator=_gen())
        both = _small_net(**settings, search={"enabled": True, "second_pass": True}).eval()(batch, generator=_gen())
        none = _small_net(**settings, search={"enabled": True, "second_pass": True, "second_below": 1e-9}).eval()(
            batch, generator=_gen())
    assert first.second_pass is None and none.second_pass.tolist() == [-1, -1, -1]
    assert torch.equal(none.R, first.R) and torch.equal(none.search_matches, first.search_matches)
    assert set(both.second_pass.tolist()) <= {0, 1}
    torch.testing.assert_close(both.R_ransac, first.R_ransac, rtol=0, atol=0)
    kept = both.second_pass == 0
    assert torch.equal(both.R0[kept], first.R0[kept]) and torch.equal(both.search_matches[kept], first.search_matches[kept])
    M = _true_cost(batch)
    with torch.no_grad():
        true = _small_net(**settings, search={"enabled": True, "second_pass": True}).eval()(batch, cost_override=M,
                                                                                           generator=_gen())
    errs = pose_errors(true.R, true.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"], batch["mask3d"])
    assert torch.all(errs["success"])
    with pytest.raises(SettingError, match="search.second_pass: needs outlier bins"):
        _small_net(sinkhorn={"bins": "none"}, search={"second_pass": True})
    for key, value in (("second_keep_2d", 0.0), ("second_keep_3d", 1.5), ("second_below", 0.0), ("second_hypotheses", 0)):
        with pytest.raises(SettingError, match=f"search.{key}"):
            _small_net(search={key: value})


def test_second_pass_pose_replaces_a_failed_first_pose():
    """Costs with a decoy at 0 per row beside the true pair: one RANSAC hypothesis finds the pose
    with probability 1/8, the second pass's 256 (``second_hypotheses``) almost surely; on all points
    its pose has the larger consensus, so it is taken (1) where the first failed, and solves it."""
    batch = _batch(b=4, m=(60, 60), outliers_2d=0.0, outliers_3d=0.0, seed=6)
    M = _true_cost(batch)
    g = torch.Generator().manual_seed(1)
    B, m, n = M.shape
    decoys = torch.randint(0, n, (B, m, 1), generator=g)
    M.scatter_(2, decoys, 0.0)
    settings = dict(ransac={"num_hypotheses": 1}, refine={"gate": 0.05})
    with torch.no_grad():
        first = _small_net(**settings, search={"enabled": True, "hypotheses": 1}).eval()(
            batch, cost_override=M, generator=_gen())
        both = _small_net(**settings, search={"enabled": True, "hypotheses": 1, "second_pass": True,
                                              "second_hypotheses": 256}).eval()(batch, cost_override=M, generator=_gen())
    ok = lambda o: pose_errors(o.R, o.t, batch["R"], batch["t"], batch["p3d"], batch["match"], batch["mask2d"],
                               batch["mask3d"])["success"]
    failed = ~ok(first)
    assert failed.any(), "the decoys should defeat one hypothesis on some item"
    assert (both.second_pass[failed] == 1).all() and ok(both).all()
    # second_refine: the same search poses, the refinement from the second pass's own plan solves them too.
    with torch.no_grad():
        own = _small_net(**settings, search={"enabled": True, "hypotheses": 1, "second_pass": True,
                                                 "second_hypotheses": 256, "second_refine": "own"}).eval()(
            batch, cost_override=M, generator=_gen())
    assert torch.equal(own.R0, both.R0) and ok(own).all()


def test_second_pass_plan_lies_on_the_kept_points_in_the_full_indices():
    """The second pass's plan (``second_refine: own``), scattered back into the full indices: zero
    outside the kept rows and columns, positive on every kept pair."""
    from bpnp.geometry.pose_search import PoseSearchResult
    from bpnp.models.network import _geometric_inputs, likeliest_points

    batch = _batch(b=2, m=(30, 40), outliers_2d=0.3, outliers_3d=0.3, seed=1)
    net = _small_net(search={"enabled": True, "second_pass": True, "second_keep_2d": 0.5, "second_keep_3d": 0.7,
                             "second_refine": "own"}).eval()
    p2d, p3d, m2, m3 = batch["p2d"], batch["p3d"], batch["mask2d"], batch["mask3d"]
    with torch.no_grad():
        out = net(batch, generator=_gen())
        bearings, points = _geometric_inputs(p2d, p3d, m2, m3)
        B, m = m2.shape
        fake = PoseSearchResult(out.R0.double(), out.t0.double(), torch.full((B, m), -1), torch.zeros(B, dtype=torch.long),
                                torch.zeros(B, dtype=torch.long))
        _, which, P_second = net._second_pass(out.P, out.inlier2d, out.inlier3d, p2d, p3d, m2, m3, bearings, points,
                                              fake, None, _gen())
        i2, k2 = likeliest_points(out.inlier2d, m2, 0.5)
        i3, k3 = likeliest_points(out.inlier3d, m3, 0.7)
    for b in range(B):
        rows, cols = i2[b][k2[b]], i3[b][k3[b]]
        inside = torch.zeros_like(P_second[b], dtype=torch.bool)
        inside[rows[:, None], cols[None, :]] = True
        assert (P_second[b][~inside] == 0).all() and (P_second[b][inside] > 0).all()
    assert set(which.tolist()) <= {0, 1}
    net.configure(search={"second_refine": "first"})  # the plan is only formed for the refinement that weighs it
    with torch.no_grad():
        assert net._second_pass(out.P, out.inlier2d, out.inlier3d, p2d, p3d, m2, m3, bearings, points, fake, None,
                                _gen())[2] is None
