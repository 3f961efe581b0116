"""Where the repository's embedded data lives: ``<repo>/data`` (meshes and COLMAP models that may
be redistributed; ``data/meshes/MANIFEST.md`` and ``data/real/README.md`` list source and licence).

The Hydra configs own the run-time setting (``paths.data_dir``, default ``${paths.root_dir}/data``;
``paths.data_dir=../shared/data`` switches to the project's full shared set). These constants are
the same default for the command-line tools that run without Hydra (``python -m
bpnp.data.export``, ``python -m bpnp.data.synthetic``, ``python -m bpnp.data.meshes``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "MESH_ROOT", "REAL_ROOT"]

#: ``<repo>/data`` (the package sits at ``<repo>/bpnp``).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
#: The embedded meshes: one folder per category (bpnp.data.meshes.CATEGORIES).
MESH_ROOT = DATA_DIR / "meshes"
#: The embedded COLMAP models, one folder each.
REAL_ROOT = DATA_DIR / "real"
