"""The layering rules of docs/INTERFACES.md, checked on the source: every ``bpnp`` import
(module level or inside a function) points downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Each layer and the layers it may import (itself always allowed).
ALLOWED = {
    "so3": set(),
    "values": set(),
    "nodes": {"so3"},
    "geometry": {"so3", "nodes"},
    "data": {"so3", "nodes", "geometry"},
    "models": {"so3", "values", "nodes", "geometry"},
    "experiments": {"so3", "nodes", "geometry"},
    "runtime": {"so3", "values", "nodes", "geometry", "data", "models"},
    "training": {"so3", "values", "nodes", "geometry", "data", "models", "runtime"},
    "evaluation": {"so3", "values", "nodes", "geometry", "data", "models", "runtime"},
    "solve": {"so3", "values", "nodes", "geometry", "data", "models", "runtime"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_downwards_only(layer):
    base = ROOT / "bpnp" / (f"{layer}.py" if (ROOT / "bpnp" / f"{layer}.py").exists() else layer)
    files = [base] if base.is_file() else sorted(base.rglob("*.py"))
    assert files, base
    bad = []
    for path in files:
        for line, module in _imports(path):
            if module.startswith("bpnp.") and _layer(module) not in ALLOWED[layer] | {layer}:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_every_layer_is_listed():
    found = {p.stem if p.is_file() else p.name for p in (ROOT / "bpnp").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert found == set(ALLOWED), found ^ set(ALLOWED)
