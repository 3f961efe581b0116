"""Every config group option and every experiment composes (Hydra compose API on the real
configs/) and instantiates; run-dir / resume resolution."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bpnp.runtime.checkpoint import net_config_mismatch
from bpnp.runtime.config import instantiate_group
from bpnp.training.utils import find_last_checkpoint, register_resolvers, resolve_ckpt_path, run_dir_for

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
#: The project's full shared data (20 COLMAP models): only the bpnp_real experiment needs it.
SHARED_DATA = ROOT.parent / "shared" / "data"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture()
def compose_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("BPNP_ROOT", str(ROOT))
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        def _compose(*overrides: str):
            ov = [f"paths.output_dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}", *overrides]
            return compose("train", overrides=ov, return_hydra_config=True)

        yield _compose
    GlobalHydra.instance().clear()


def _scene_dir(tmp_path: Path) -> Path:
    from bpnp.data.scenes import save_scene
    from bpnp.data.synthetic import SyntheticConfig, make_instance

    d = tmp_path / "scenes"
    d.mkdir()
    cfg = SyntheticConfig(num_points_2d=12)
    for i in range(3):
        save_scene(d / f"s{i}.npz", make_instance(cfg, 0, i))
    return d


def _pickle_root(tmp_path: Path) -> Path:
    """Tiny BPnPNet pickles (list containers, inliers only, W_gt[j] = 2D index of 3D point j)."""
    from bpnp.data.bpnpnet_pickles import PICKLE_KEYS

    rng = np.random.default_rng(0)
    for split, num in (("train", 10), ("test", 3)):
        folder = tmp_path / "bpnpnet" / f"modelnet40_{split}" / "preprocessed"
        folder.mkdir(parents=True)
        samples = []
        for _ in range(num):
            k = 8
            perm = rng.permutation(k)
            R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
            R *= np.linalg.det(R)
            samples.append(dict(p2d=rng.normal(size=(k, 2)), p3d=rng.normal(size=(k, 3)), R_gt=R, t_gt=rng.normal(size=(3, 1)),
                                W_gt=perm, num_points_2d=np.array([k]), num_points_3d=np.array([k])))
        for key in PICKLE_KEYS:
            with open(folder / f"{key}.pkl", "wb") as f:
                pickle.dump([s[key] for s in samples], f)
    return tmp_path / "bpnpnet"


def test_every_data_config_instantiates_and_loads_a_batch(compose_cfg, tmp_path):
    assert _options("data") == ["colmap", "pickles", "scenes", "synthetic"]
    extra = {
        "synthetic": ["data.synthetic.num_points_2d=[10,12]"],
        "scenes": [f"data.path={_scene_dir(tmp_path)}", f"data.train_path={tmp_path / 'scenes'}"],
        "colmap": ["data.max_points_2d=50", "data.max_points_3d=50"],
        "pickles": [f"data.root={_pickle_root(tmp_path)}"],
    }
    for name in _options("data"):
        cfg = compose_cfg(f"data={name}", "data.batch_size=2", *extra[name])
        assert "per device" in (CONFIGS / "data" / f"{name}.yaml").read_text().lower()
        dm = instantiate(cfg.data)
        dm.setup("test" if name == "scenes" else "fit")
        loader = dm.test_dataloader() if name == "scenes" else dm.train_dataloader()
        batch = next(iter(loader))
        assert batch["p2d"].shape[0] == 2 and batch["mask2d"].dtype == torch.bool
        assert set(batch) >= {"p2d", "p3d", "mask2d", "mask3d", "R", "t", "match"}


def test_model_callbacks_loggers_and_cpu_trainers_instantiate(compose_cfg):
    cfg = compose_cfg()
    model = instantiate(cfg.model)
    # the default matcher is the attention network with outlier bins; model/net=bpnpnet the original
    assert model.net.matcher_name == "attention" and model.net.bins == "shared" and model.net.stn is None
    assert model.net.matcher.width == 128 and len(model.net.matcher.blocks) == 3
    assert _options("model/net") == ["attention", "bpnpnet"]
    original = instantiate(compose_cfg("model/net=bpnpnet").model)
    assert original.net.encoder2d.width == 128 and original.net.encoder2d.depth == 12 and original.net.stn is not None
    callbacks = instantiate_group(cfg.callbacks)
    kinds = {type(c).__name__ for c in callbacks}
    assert kinds == {"ModelCheckpoint", "LastCheckpoint", "LearningRateMonitor", "BPnPProgressBar", "PoseVisualisation"}
    ckpt = next(c for c in callbacks if type(c).__name__ == "ModelCheckpoint")
    assert ckpt.save_last and ckpt.monitor == "val/rot_err_deg_median"
    assert _options("logger") == ["csv", "many", "none", "wandb"]
    expected = {"csv": {"ResumableCSVLogger"}, "wandb": {"WandbLogger"}, "many": {"ResumableCSVLogger", "WandbLogger"}, "none": set()}
    for name in _options("logger"):
        loggers = instantiate_group(compose_cfg(f"logger={name}").logger)
        assert {type(lg).__name__ for lg in loggers} == expected[name], name
    assert compose_cfg().logger.wandb.offline is True  # W&B offline by default
    assert compose_cfg("logger=wandb", "logger.wandb.offline=false").logger.wandb.offline is False
    assert _options("trainer") == ["cpu", "ddp", "ddp_cpu", "default", "gpu", "slurm"]
    for name in ("cpu", "default", "ddp_cpu"):
        cfg = compose_cfg(f"trainer={name}")
        trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert isinstance(trainer, pl.Trainer) and trainer.gradient_clip_val == 1.0
    ddp_cpu = compose_cfg("trainer=ddp_cpu")
    assert ddp_cpu.trainer.devices == 2 and ddp_cpu.trainer.strategy.process_group_backend == "gloo"
    ddp_original = compose_cfg("trainer=ddp_cpu", "model/net=bpnpnet")
    assert instantiate(ddp_original.model).net.stn.conv_bns[0].sync  # masked BN follows trainer.sync_batchnorm
    for name in ("gpu", "ddp", "slurm"):
        t = compose_cfg(f"trainer={name}").trainer
        assert t.accelerator == "gpu"
        assert name == "gpu" or t.sync_batchnorm is True
    assert compose_cfg("trainer=slurm").trainer.num_nodes == 2
    assert "sbatch" in (CONFIGS / "trainer" / "slurm.yaml").read_text()


def _compose_and_instantiate(compose_cfg, name, *extra):
    cfg = compose_cfg(f"experiment={name}", "data.batch_size=2", *extra)
    assert cfg.task_name == name
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    OmegaConf.to_container(OmegaConf.create(plain), resolve=True)  # every interpolation resolves
    instantiate(cfg.data)
    instantiate(cfg.model)
    instantiate(cfg.trainer, logger=False)
    return cfg


@pytest.mark.skipif(not (SHARED_DATA / "real").is_dir(), reason=f"experiment=bpnp_real trains on 10 of the "
                    f"project's shared COLMAP models, not found under {SHARED_DATA} (paths.data_dir)")
def test_real_experiment_composes_on_the_shared_data(compose_cfg):
    cfg = _compose_and_instantiate(compose_cfg, "bpnp_real", f"paths.data_dir={SHARED_DATA}")
    assert cfg.data.source == "colmap" and cfg.data.root == f"{SHARED_DATA}/real"


def test_experiments_and_debug_presets(compose_cfg):
    assert _options("experiment") == ["bpnp_real", "bpnp_real_hard", "bpnp_synthetic", "bpnp_synthetic_continue",
                                      "bpnp_synthetic_heavy"]
    _compose_and_instantiate(compose_cfg, "bpnp_synthetic")
    more = _compose_and_instantiate(compose_cfg, "bpnp_synthetic_continue")
    assert Path(more.init_ckpt).is_file()  # continues from the committed full checkpoint
    assert more.data.synthetic.other_shape_prob_2d > 0 and more.trainer.max_epochs > more.model.loss.pose_start_epoch
    heavy = _compose_and_instantiate(compose_cfg, "bpnp_synthetic_heavy")
    assert heavy.init_ckpt == more.init_ckpt and heavy.trainer.max_epochs > heavy.model.loss.pose_start_epoch
    assert list(heavy.data.synthetic.outlier_frac_2d) == [0.3, 0.7]  # over the continuation's other ranges
    assert heavy.data.synthetic.fov_deg == more.data.synthetic.fov_deg
    real = compose_cfg("experiment=bpnp_real")  # composes anywhere; its data is one setting away
    assert real.data.source == "colmap" and real.data.root.endswith("data/real")
    hard = compose_cfg("experiment=bpnp_real_hard")  # the same fine-tune, its views at heavier 2D outliers
    assert hard.data.train_scenes == real.data.train_scenes and hard.data.val_scenes == real.data.val_scenes
    assert list(hard.data.train_views.outlier_frac_2d) == [0.3, 0.9] and hard.data.train_views.mix == real.data.train_views.mix
    assert hard.init_ckpt == more.init_ckpt and hard.trainer.max_epochs > hard.model.loss.pose_start_epoch
    assert _options("debug") == ["fast_dev_run", "limit", "overfit"]
    for name in _options("debug"):
        cfg = compose_cfg("experiment=bpnp_synthetic", f"debug={name}")
        trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        if name == "fast_dev_run":
            assert trainer.fast_dev_run
        elif name == "limit":
            assert trainer.limit_train_batches == 4 and trainer.max_epochs <= 2
            assert trainer.check_val_every_n_epoch == 1  # the main job validates every 3rd epoch only
        else:
            assert trainer.overfit_batches == 1


def test_run_dir_and_resume_resolution(tmp_path, compose_cfg):
    runs = tmp_path / "logs" / "train" / "runs"
    assert run_dir_for(None, str(runs), "2020-01-01_00-00-00") == str(runs / "2020-01-01_00-00-00")
    assert find_last_checkpoint(runs) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        resolve_ckpt_path("last", runs)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), runs)
    old, new = runs / "a" / "checkpoints" / "last.ckpt", runs / "b" / "checkpoints" / "last.ckpt"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert resolve_ckpt_path("last", runs) == str(new)
    assert run_dir_for("last", str(runs), "stamp") == str(runs / "b")
    assert run_dir_for(str(old), str(runs), "stamp") == str(runs / "a")  # an explicit checkpoint reopens its run
    cfg = compose_cfg(f"ckpt_path={old}")
    assert cfg.hydra.run.dir == str(runs / "a")
    fresh = compose_cfg().hydra.run.dir
    assert fresh.startswith(str(runs)) and Path(fresh).name[:2] == "20"


def test_net_config_mismatch_names_settings_the_weights_cannot_show():
    stem = {"knn": 16, "knn_scale": "radius"}
    assert net_config_mismatch(stem, {"knn": 16}) is None  # absent = BlindPnPNet's default (radius)
    assert net_config_mismatch({"knn": 0, "knn_scale": "neighbour"}, {"knn": 0}) is None  # no stem: no scale
    msg = net_config_mismatch({**stem, "knn_scale": "neighbour"}, stem)
    assert msg == ("model.net.knn_scale='neighbour' but the checkpoint's network has 'radius' "
                   "(override model.net.knn_scale=radius)")
    msg = net_config_mismatch({"normalize_3d": False, "cn_eps": 1e-3}, {"cn_eps": 1e-4})
    assert "model.net.normalize_3d=False" in msg and "model.net.cn_eps=0.001" in msg
