"""Shared pieces of the reliability tests: tiny scenes and COLMAP models built from scratch, the
two CLI modules loaded in-process, Hydra compose of the real configs."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

#: Smallest real network (same class and code path as a trained one).
TINY_NET = dict(feature_dim=8, depth=1, ransac={"num_hypotheses": 32}, refine={"max_iter": 10})

#: Overrides that make ``train.py`` tiny and quick on CPU (no W&B).
TINY_TRAIN = [
    "experiment=bpnp_synthetic", "logger=csv", "data.batch_size=2", "data.synthetic.num_points_2d=[12,16]",
    "data.train_length=8", "data.val_length=4", "data.test_length=4", "model.net.feature_dim=8",
    "model.net.depth=1", "model.net.ransac.num_hypotheses=32", "model.net.refine.max_iter=10",
    "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0", "trainer.check_val_every_n_epoch=1", "~callbacks.progress_bar",
    "trainer.log_every_n_steps=1", "callbacks.pose_plots.num_samples=0",
]


def load_cli(name: str):
    """``train.py`` / ``evaluate.py`` as a module (their functions are the CLI's, in-process)."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def composing(config_name: str):
    """Yield ``compose(*overrides)`` over the real configs (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bpnp.training.utils import register_resolvers

    os.environ.setdefault("BPNP_ROOT", str(ROOT))
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda *ov, hydra=False: compose(config_name, overrides=list(ov), return_hydra_config=hydra)
    GlobalHydra.instance().clear()


def pinhole_scene(X: np.ndarray, R: np.ndarray | None = None, t: np.ndarray | None = None, seed: int = 1) -> dict:
    """A noise-free scene dict of the 3D points ``X`` (every point observed once, in order): a
    random rotation and a camera ``4 x extent`` in front of the centroid unless given."""
    X = np.asarray(X, dtype=np.float64)
    if R is None:
        q = np.random.default_rng(seed).normal(size=4)
        w, x, y, z = q / np.linalg.norm(q)
        R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    if t is None:
        c = X.mean(0)
        t = -R @ c + np.array([0.0, 0.0, np.abs(X - c).max() * 4 + 1e-9])
    xc = X @ R.T + t
    return {"p2d": xc[:, :2] / xc[:, 2:3], "p3d": X, "R": R, "t": np.asarray(t, dtype=np.float64),
            "match": np.arange(len(X))}


def true_cost(batch: dict) -> torch.Tensor:
    """``M = 0`` on true pairs, 2 elsewhere: the geometric layers alone, with perfect matching."""
    B, m = batch["match"].shape
    n = batch["p3d"].shape[1]
    M = torch.full((B, m, n), 2.0, dtype=batch["p2d"].dtype)
    b, i = torch.nonzero(batch["match"] >= 0, as_tuple=True)
    M[b, i, batch["match"][b, i]] = 0.0
    return M


def write_colmap_text(folder: Path, num_points: int = 40, num_images: int = 2, seed: int = 0) -> Path:
    """A small consistent COLMAP text model (PINHOLE camera, every point seen by every image)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    X = rng.normal(size=(num_points, 3))
    f, cx, cy = 500.0, 320.0, 240.0
    (folder / "cameras.txt").write_text(f"# Number of cameras: 1\n1 PINHOLE 640 480 {f} {f} {cx} {cy}\n")
    lines, tracks = [], {j: [] for j in range(num_points)}
    for i in range(1, num_images + 1):
        t = np.array([0.1 * i, 0.0, 6.0])
        xc = X + t
        uv = xc[:, :2] / xc[:, 2:3] * f + np.array([cx, cy])
        lines.append(f"{i} 1 0 0 0 {t[0]} {t[1]} {t[2]} 1 img{i}.jpg")
        lines.append(" ".join(f"{u:.6f} {v:.6f} {j + 1}" for j, (u, v) in enumerate(uv)))
        for j in range(num_points):
            tracks[j].append(f"{i} {j}")
    (folder / "images.txt").write_text(f"# Number of images: {num_images}\n" + "\n".join(lines) + "\n")
    pts = [f"{j + 1} {x:.6f} {y:.6f} {z:.6f} 128 128 128 0.5 " + " ".join(tracks[j])
           for j, (x, y, z) in enumerate(X)]
    (folder / "points3D.txt").write_text("\n".join(pts) + "\n")
    return folder
