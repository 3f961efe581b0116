"""Checkpoint loading: Lightning .ckpt, weights-only files, and clear errors."""

from __future__ import annotations

import pytest
import torch

from bpnp.runtime.checkpoint import CheckpointError, load_network, save_weights_only
from bpnp.models.network import BlindPnPNet
from bpnp.models.settings import SettingError

from tests.evaluation.conftest import TINY_NET, lightning_ckpt  # noqa: F401  (fixture)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lightning_checkpoint(lightning_ckpt):
    from bpnp.training.module import BlindPnPModule

    net = load_network(lightning_ckpt)
    assert isinstance(net, BlindPnPNet) and not net.training
    assert _same_weights(net, BlindPnPModule.load_from_checkpoint(lightning_ckpt, map_location="cpu").net)


def test_weights_only_round_trip(tmp_path):
    net = BlindPnPNet(**TINY_NET)
    path = save_weights_only(tmp_path / "w.pt", net, TINY_NET)
    assert _same_weights(load_network(path), net)
    # Also accepted: the LightningModule's prefixed keys and a {"net": ...} config.
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "config": {"net": TINY_NET}},
               tmp_path / "w2.pt")
    assert _same_weights(load_network(tmp_path / "w2.pt"), net)


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_network(tmp_path / "nope.ckpt")
    assert "checkpoint not found" in _one_line(e) and "nope.ckpt" in str(e.value)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_network(bad)
    assert "not a PyTorch checkpoint file (it starts with b'this is not a checkpoint')" in _one_line(e)


def test_incompatible_weights(tmp_path):
    net = BlindPnPNet(**TINY_NET)
    path = save_weights_only(tmp_path / "w.pt", net, {**TINY_NET, "feature_dim": 16})
    with pytest.raises(CheckpointError) as e:
        load_network(path)
    assert "incompatible checkpoint" in _one_line(e) and "size mismatch" in str(e.value)
    path = save_weights_only(tmp_path / "w3.pt", net, {**TINY_NET, "sinkhorn": {"bins": "none"}})
    with pytest.raises(CheckpointError, match="unexpected weights sinkhorn.bin_cost"):
        load_network(path)
    original = BlindPnPNet(**TINY_NET, matcher="bpnpnet")
    path = save_weights_only(tmp_path / "w4.pt", original, {**TINY_NET, "matcher": "bpnpnet", "use_stn": False})
    with pytest.raises(CheckpointError, match="unexpected weights stn"):
        load_network(path)


def test_checkpoints_from_before_the_matcher_option_load_as_the_original_network(tmp_path):
    """A config without ``matcher`` / ``bins`` over the original encoders' weights (the files
    written before those options existed) rebuilds the original network without bins."""
    legacy = {"feature_dim": 8, "depth": 1, "knn": 0, "ransac_hypotheses": 64}
    net = BlindPnPNet(feature_dim=8, depth=1, knn=0, matcher="bpnpnet", sinkhorn={"bins": "none"})
    loaded = load_network(save_weights_only(tmp_path / "old.pt", net, legacy))
    assert loaded.matcher_name == "bpnpnet" and loaded.bins == "none"
    assert loaded.ransac_settings.num_hypotheses == 64  # the flat name of its era, moved into its group
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_bad_config(tmp_path):
    net = BlindPnPNet(**TINY_NET)
    with pytest.raises(CheckpointError, match="cannot build the network"):
        load_network(save_weights_only(tmp_path / "w.pt", net, {**TINY_NET, "no_such_knob": 1}))
    torch.save({"state_dict": net.state_dict()}, tmp_path / "noconf.pt")
    with pytest.raises(CheckpointError, match="no network config"):
        load_network(tmp_path / "noconf.pt")


def test_export_weights_cli_roundtrip(tmp_path):
    """export_weights turns a checkpoint into a weights-only file that loads to the same network."""
    import torch

    from bpnp.runtime.checkpoint import load_network, save_weights_only
    from bpnp.evaluation.export_weights import main
    from bpnp.runtime.checkpoint import build_net

    cfg = {"feature_dim": 16, "depth": 1}
    net = build_net(cfg)
    src = save_weights_only(tmp_path / "src.pt", net, cfg)
    assert main([str(src), str(tmp_path / "out.pt")]) == 0
    loaded = load_network(tmp_path / "out.pt")
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")]) == 2


def test_inference_overrides_on_load_and_export(tmp_path, capsys):
    """Inference settings can replace the checkpoint's (evaluate.py net_overrides, export --set);
    the weights stay the same, a setting that does not exist is a clear error."""
    from bpnp.runtime.checkpoint import load_checkpoint_dict
    from bpnp.evaluation.export_weights import main

    net = BlindPnPNet(**TINY_NET)
    path = save_weights_only(tmp_path / "w.pt", net, TINY_NET)
    tuned = load_network(path, overrides={"refine.robust_scale": 1e-4, "ransac": {"num_hypotheses": 64}})
    assert tuned.pnp.kernel.scale == 1e-4 and tuned.ransac_kwargs["num_hypotheses"] == 64
    assert _same_weights(tuned, net)
    with pytest.raises(SettingError, match=r"^net_overrides\.no_such_knob: unknown network setting"):
        load_network(path, overrides={"no_such_knob": 1})
    with pytest.raises(SettingError, match=r"^net_overrides\.refine\.robust_scal: unknown setting \(known: robust, "):
        load_network(path, overrides={"refine.robust_scal": 1e-4})  # a typo is named, not "incompatible"
    with pytest.raises(SettingError, match=r"^net_overrides\.robust_scale: renamed, use net_overrides\.refine\.robust_scale"):
        load_network(path, overrides={"robust_scale": 1e-4})
    with pytest.raises(SettingError, match=r"^net_overrides\.refine\.robust_scale: expected a number > 0, got 'abc'"):
        load_network(path, overrides={"refine.robust_scale": "abc"})

    out = tmp_path / "tuned.pt"
    assert main([str(path), str(out), "--set", "refine.robust_scale=1e-4", "--set", "ransac.num_hypotheses=64"]) == 0
    assert load_checkpoint_dict(out)["config"]["refine"]["robust_scale"] == 1e-4
    assert load_network(out).ransac_kwargs["num_hypotheses"] == 64
    assert main([str(path), str(tmp_path / "bad.pt"), "--set", "refine.robust_scale"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([str(path), str(tmp_path / "bad.pt"), "--set", "refine.gate=3"]) == 2
    assert "--set.refine.gate: expected a number > 0 and < 1.5708" in capsys.readouterr().err
