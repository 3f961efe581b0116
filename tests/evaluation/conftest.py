"""Shared fixtures of the evaluation tests: tiny scenes, a stand-in model, tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bpnp.data.embedded import REAL_ROOT
from bpnp.data.scenes import save_scene
from bpnp.data.synthetic import SyntheticConfig, make_instance
from bpnp.models.network import BlindPnPNet

ROOT = Path(__file__).resolve().parents[2]
REAL_DATA = REAL_ROOT  # the embedded COLMAP models (data/real)

#: Smallest real network: fast on CPU, same class and code path as a trained one.
TINY_NET = dict(feature_dim=8, depth=1, ransac={"num_hypotheses": 64})


def noise_free_scenes(count: int = 3, seed: int = 0) -> list[dict]:
    """Small noise-free synthetic instances (30-60 points, no outliers)."""
    cfg = SyntheticConfig(num_points_2d=(30, 60), noise_px=0.0)
    return [make_instance(cfg, seed, i) for i in range(count)]


class GroundTruthCostNet(nn.Module):
    """Stand-in model: BlindPnPNet's geometric layers (Sinkhorn, RANSAC, refinement) on a cost
    built from the true matches (0 on true pairs, 2 elsewhere), so it should solve every
    noise-free instance. Exposes the narrow interface the runner uses."""

    def __init__(self) -> None:
        super().__init__()
        self.net = BlindPnPNet(**TINY_NET)

    @property
    def pnp(self):
        return self.net.pnp

    @property
    def ransac_kwargs(self):
        return self.net.ransac_kwargs

    def configure(self, **settings):
        self.net.configure(**settings)

    def settings(self):
        return self.net.settings()

    def forward(self, batch, generator=None, refine=None):
        match = batch["match"]
        B, m = match.shape
        n = batch["p3d"].shape[1]
        M = torch.full((B, m, n), 2.0, dtype=batch["p2d"].dtype, device=match.device)
        b, i = torch.nonzero(match >= 0, as_tuple=True)
        M[b, i, match[b, i]] = 0.0
        return self.net(batch, generator=generator, cost_override=M, refine=refine)

    def refine_pose(self, out, batch):
        return self.net.refine_pose(out, batch)


@pytest.fixture
def scenes():
    return noise_free_scenes()


@pytest.fixture
def scenes_dir(tmp_path, scenes) -> Path:
    d = tmp_path / "scenes"
    for i, s in enumerate(scenes):
        save_scene(d / f"{i:04d}.npz", s)
    return d


@pytest.fixture
def gt_model():
    torch.manual_seed(0)
    return GroundTruthCostNet()


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of BlindPnPModule with random weights, written by a Trainer."""
    import pytorch_lightning as pl

    from bpnp.training.module import BlindPnPModule

    torch.manual_seed(0)
    module = BlindPnPModule(net=dict(TINY_NET))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def names_of(dataset) -> list[str]:
    return [f"s{i}" for i in range(len(dataset))]


__all__ = ["ROOT", "REAL_DATA", "TINY_NET", "GroundTruthCostNet", "noise_free_scenes", "names_of"]
