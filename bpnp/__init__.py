"""bpnp: blind Perspective-n-Point solved end to end with declarative nodes.

Layers import downwards only: ``nodes`` <- ``geometry`` <- ``models`` <- ``training`` /
``evaluation`` <- entry points (``train.py``, ``evaluate.py``).
"""

from __future__ import annotations


def _version() -> str:
    """The package version from its metadata, never a second copy: ``pyproject.toml`` beside the
    package in a source checkout (where an installed copy's metadata may be stale), else the
    installed distribution's metadata."""
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    from importlib.metadata import version

    return version("bpnp")


__version__ = _version()

#: Names of ``bpnp`` itself, imported from their module on first access, so that ``import bpnp``
#: stays cheap (no torch): ``bpnp.BlindPnPSolver`` imports :mod:`bpnp.runtime.solver`.
_LAZY = {"BlindPnPSolver": "bpnp.runtime.solver", "PnPSolution": "bpnp.runtime.solver"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bpnp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
