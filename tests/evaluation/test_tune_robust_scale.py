"""Choosing the refinement's robust scale on a run's validation split."""

from __future__ import annotations

from omegaconf import OmegaConf

from bpnp.data.datamodule import BlindPnPDataModule
from bpnp.runtime.checkpoint import save_weights_only
from bpnp.evaluation.tune_robust_scale import main, validation_success

from tests.evaluation.conftest import GroundTruthCostNet, TINY_NET


def _dm(**kw):
    return BlindPnPDataModule(source="synthetic", synthetic={"num_points_2d": [30, 50], "noise_px": 0.0},
                              batch_size=2, train_length=4, val_length=4, test_length=2, seed=5, **kw)


def test_validation_success_per_scale():
    """With exact correspondences every scale solves the noise-free validation instances; the
    network's kernel is set to each scale in turn."""
    dm = _dm()
    dm.setup("validate")
    net = GroundTruthCostNet().eval()
    success, ransac, match_acc = validation_success(net, dm.val_dataloader(), [1e-3, 1e-4])
    assert success == {1e-3: 1.0, 1e-4: 1.0} and ransac == 1.0
    assert match_acc == 1.0  # the cost of the true matches puts every row's maximum on its match
    assert net.pnp.kernel.scale == 1e-4


def test_cli_reads_the_run_config(tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    data = {"_target_": "bpnp.data.datamodule.BlindPnPDataModule", "source": "synthetic", "batch_size": 2,
            "train_length": 4, "val_length": 2, "test_length": 2, "seed": 5,
            "synthetic": {"num_points_2d": [30, 40]}}
    OmegaConf.save(OmegaConf.create({"data": data, "model": {"eval_seed": 0}}), run / ".hydra" / "config.yaml")
    from bpnp.models.network import BlindPnPNet

    ckpt = save_weights_only(tmp_path / "w.pt", BlindPnPNet(**TINY_NET), TINY_NET)
    assert main([str(run), "--ckpt", str(ckpt), "--scales", "1e-3", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "validation split: 2 instances; match accuracy " in out and "refine.robust_scale 0.0001: success" in out and "best: refine.robust_scale=" in out
    assert main([str(run), "--ckpt", str(ckpt), "--scales", "1e-4", "--set", "ransac.num_hypotheses=64"]) == 0
    assert "robust_scale 0.0001: success" in capsys.readouterr().out
    assert main([str(run), "--ckpt", str(ckpt), "--scales", "1e-4", "--gates", "none", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "refine.gate None refine.robust_scale 0.0001: success" in out and "refine.gate 0.02 refine.robust_scale 0.0001: success" in out
    assert "best: refine.gate=" in out
    assert main([str(run), "--ckpt", str(ckpt), "--gates", "wide"]) == 2
    assert "--gates: expected angles" in capsys.readouterr().err
    assert main([str(run), "--ckpt", str(ckpt), "--set", "ransac.num_hypotheses"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
