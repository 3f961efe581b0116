"""Comparing inference settings on a run's validation split (bpnp.evaluation.ablate)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from bpnp.data.datamodule import BlindPnPDataModule
from bpnp.evaluation.ablate import ablate, main, parse_variant
from bpnp.runtime.checkpoint import save_weights_only
from tests.evaluation.conftest import TINY_NET, GroundTruthCostNet


def test_parse_variant():
    assert parse_variant("off:") == ("off", {})
    assert parse_variant("s:search.enabled=true,search.prior_weight=0") == (
        "s", {"search.enabled": True, "search.prior_weight": 0})
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        parse_variant("search.enabled=true")


def test_ablate_rows_on_exact_costs():
    """On exact correspondences every variant solves the noise-free instances, the search finds
    the true matches, and the network's own settings are restored afterwards."""
    dm = BlindPnPDataModule(source="synthetic", synthetic={"num_points_2d": [30, 50], "noise_px": 0.0},
                            batch_size=2, train_length=4, val_length=3, test_length=2, seed=5)
    dm.setup("validate")
    net = GroundTruthCostNet()
    before = net.settings()
    rows = ablate(net, dm.dataset("val"), [("off", {}), ("search", {"search.enabled": True})])
    assert [r["name"] for r in rows] == ["off", "search"]
    for r in rows:
        assert r["n"] == 3 and r["success"] == 1.0 and r["ransac_success"] == 1.0 and r["time_s"] > 0
    assert rows[1]["match_acc"] > 0.95
    assert net.settings() == before
    with pytest.raises(ValueError, match="only the inference groups"):
        ablate(net, dm.dataset("val"), [("bad", {"sinkhorn.lam": 5.0})])


def test_cli(tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    data = {"_target_": "bpnp.data.datamodule.BlindPnPDataModule", "source": "synthetic", "batch_size": 2,
            "train_length": 4, "val_length": 2, "test_length": 2, "seed": 5, "synthetic": {"num_points_2d": [30, 40]}}
    OmegaConf.save(OmegaConf.create({"data": data, "model": {"eval_seed": 0}}), run / ".hydra" / "config.yaml")
    from bpnp.models.network import BlindPnPNet

    ckpt = save_weights_only(tmp_path / "w.pt", BlindPnPNet(**TINY_NET), TINY_NET)
    assert main([str(run), "--ckpt", str(ckpt), "--variant", "off:", "--variant", "s:search.enabled=true",
                 "--length", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 instances" in out and "| off | 3 |" in out and "| s | 3 |" in out and "two standard errors" in out
    from bpnp.data.scenes import save_scene
    from tests.evaluation.conftest import noise_free_scenes

    scenes = tmp_path / "val_scenes"
    scenes.mkdir()
    for i, sc in enumerate(noise_free_scenes(2)):
        save_scene(scenes / f"{i:03d}.npz", sc)
    assert main(["--scenes", str(scenes), "--ckpt", str(ckpt), "--variant", "off:"]) == 0
    assert "1 scene folders: 2 instances" in capsys.readouterr().out
    assert main(["--scenes", str(scenes), "--variant", "off:"]) == 2
    assert "--scenes needs --ckpt" in capsys.readouterr().err
    other = save_weights_only(tmp_path / "other.pt", BlindPnPNet(**TINY_NET), TINY_NET)
    assert main(["--scenes", str(scenes), "--ckpt", str(ckpt), "--ckpt", str(other), "--variant", "off:"]) == 0
    out = capsys.readouterr().out
    # Both checkpoints on the same instances, the second paired against the first.
    assert "| w / off | 2 |" in out and "| other / off | 2 |" in out and "p = " in out.split("| other / off")[1]
    assert main(["--scenes", str(scenes), "--ckpt", str(ckpt), "--ckpt", str(tmp_path / "missing.pt"),
                 "--variant", "off:"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main([str(run), "--ckpt", str(ckpt), "--variant", "x:sinkhorn.lam=3"]) == 2
    assert "only the inference groups" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--variant", "a:"]) == 2


def test_paired_sign_test():
    from bpnp.evaluation.ablate import paired_test

    ref = [True] * 10 + [False] * 10
    # 6 solved only by the variant, none only by the reference: p = 2 / 2^6
    other = [True] * 10 + [True] * 6 + [False] * 4
    assert paired_test(ref, other) == (6, 0, 2 / 64)
    # Symmetric: 3 each way is no evidence at all.
    mixed = [True] * 7 + [False] * 3 + [True] * 3 + [False] * 7
    w, l_, p = paired_test(ref, mixed)
    assert (w, l_) == (3, 3) and p == 1.0
    assert paired_test(ref, ref) == (0, 0, 1.0)
