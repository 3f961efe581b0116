"""The package installs on its own: ``pip install`` of the checkout gives an importable ``bpnp``
(the nodes are meant to be imported from other projects) and nothing else at top level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_gives_an_importable_package_from_outside_the_checkout(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")))
    assert top == ["bpnp"], top  # no tests/, bench/, configs/ ... as top-level packages
    code = ("import bpnp.nodes, torch; from bpnp.nodes import SinkhornOT, PnPRefine; "
            "print(bpnp.nodes.__file__); print(SinkhornOT()(torch.zeros(1, 3, 4), torch.full((1, 3), 1 / 3), "
            "torch.full((1, 4), 1 / 4)).sum().item()); print(bpnp.__version__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    where, total, version = run.stdout.split()
    assert Path(where).is_relative_to(target) and abs(float(total) - 1.0) < 1e-5
    assert version == _pyproject_version()  # an installed copy reads its metadata


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_is_the_package_metadata():
    """``bpnp.__version__`` is read from pyproject.toml (the metadata's source) in a checkout, so
    the two cannot drift; an installed copy reads the installed metadata (the slow test above)."""
    import bpnp

    assert bpnp.__version__ == _pyproject_version() != "0.1.0"
