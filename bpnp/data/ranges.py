"""Per-instance ranges of the data generators (:mod:`bpnp.data.synthetic`, :mod:`bpnp.data.real_views`):
a setting is a number (fixed) or a ``(lo, hi)`` pair drawn uniformly per instance, and the
generators' config dataclasses are built from plain mappings (YAML / Hydra) the same way."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

import numpy as np

__all__ = ["lo", "hi", "draw", "draw_int", "config_kwargs", "parse_set_items"]


def lo(v) -> float:
    """Lower end of a range (the number itself when fixed)."""
    return v[0] if isinstance(v, tuple) else v


def hi(v) -> float:
    """Upper end of a range (the number itself when fixed)."""
    return v[1] if isinstance(v, tuple) else v


def draw(rng: np.random.Generator, v) -> float:
    """A uniform draw from a ``(lo, hi)`` range, or the fixed number (no draw consumed)."""
    return float(rng.uniform(v[0], v[1])) if isinstance(v, tuple) else float(v)


def draw_int(rng: np.random.Generator, v) -> int:
    """A uniform integer in ``[lo, hi]`` (inclusive), or the fixed integer (no draw consumed)."""
    return int(rng.integers(int(v[0]), int(v[1]) + 1)) if isinstance(v, tuple) else int(v)


def parse_set_items(items: list[str], strict: bool = False) -> dict[str, Any]:
    """``["key=value", ...]`` (the data tools' ``--set``) -> ``{key: YAML value}``.

    Raises:
        ValueError: with ``strict``, an item without ``=`` (``--set 'x': expected KEY=VALUE``).
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if strict and not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def config_kwargs(cls: type, d: Mapping[str, Any], mappings: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments of the dataclass ``cls`` from a mapping: sequences become tuples (ranges),
    the fields named in ``mappings`` plain dicts.

    Raises:
        ValueError: a key that is not a field of ``cls`` (all of them named).
    """
    d = dict(d)
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    out = {}
    for k, v in d.items():
        if k in mappings:
            out[k] = dict(v)
        elif not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):
            out[k] = tuple(v)
        else:
            out[k] = v
    return out
