"""Value checks for settings and configs: one vocabulary for the network's settings
(:mod:`bpnp.models.settings`) and the entry points' config checks (:mod:`bpnp.runtime.config`).

A check is ``check(key, value) -> value``: it returns the value (normalised where it says so) or
raises :class:`ValueCheckError` whose one-line message starts with the full key, e.g.
``model.optimizer.lr: expected a number > 0, got 'abc'``. Callers turn it into their own error
type (``SettingError``, ``ConfigError``) with the same message.

Example:
    >>> positive = number(lo=0, lo_open=True)
    >>> positive("model.optimizer.lr", 3e-4)
    0.0003
    >>> integer(lo=1, coerce=True)("model.net.depth", 3.0)
    3
    >>> try:
    ...     integer(lo=1)("data.batch_size", -4)
    ... except ValueCheckError as exc:
    ...     print(exc)
    data.batch_size: expected an integer >= 1, got -4
"""

from __future__ import annotations

import math
from typing import Any, Callable

Check = Callable[[str, Any], Any]

__all__ = ["ValueCheckError", "Check", "is_int", "integer", "number", "flag", "choice", "text", "either"]


class ValueCheckError(ValueError):
    """A value that fails its check; the message starts with the full key."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _bound_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def show(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {show(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {show(hi)}")
    return " " + " and ".join(parts) if parts else ""


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    if hi is not None and (v >= hi if hi_open else v > hi):
        return False
    return True


def integer(lo: int | None = None, hi: int | None = None, none: bool = False, note: str = "",
            coerce: bool = False) -> Check:
    """An int in ``[lo, hi]`` (or None with ``none``). ``coerce``: also accept an integral float
    and return it as an int (for settings that are normalised before use; configs handed to
    constructors as they are keep ``coerce=False``)."""
    def check(key: str, v: Any) -> Any:
        if v is None and none:
            return None
        if coerce and _is_number(v) and float(v) == int(v):
            v = int(v)
        if not is_int(v) or not _in_range(v, lo, hi, False, False):
            want = "an integer" + _bound_text(lo, hi, False, False) + (" or null" if none else "") + note
            raise ValueCheckError(f"{key}: expected {want}, got {v!r}")
        return v
    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           none: bool = False, note: str = "", coerce: bool = False) -> Check:
    """A finite number in the range (or None with ``none``); ``coerce`` returns it as a float."""
    def check(key: str, v: Any) -> Any:
        if v is None and none:
            return None
        if not _is_number(v) or not _in_range(float(v), lo, hi, lo_open, hi_open):
            want = "a number" + _bound_text(lo, hi, lo_open, hi_open) + (" or null" if none else "") + note
            raise ValueCheckError(f"{key}: expected {want}, got {v!r}")
        return float(v) if coerce else v
    return check


def flag(none: bool = False) -> Check:
    def check(key: str, v: Any) -> Any:
        if not (isinstance(v, bool) or (v is None and none)):
            raise ValueCheckError(f"{key}: expected true or false{' or null' if none else ''}, got {v!r}")
        return v
    return check


def choice(*options: Any, none: bool = False) -> Check:
    def check(key: str, v: Any) -> Any:
        if not ((v is None and none) or (not isinstance(v, bool) and v in options)):
            shown = ", ".join(str(o) for o in options) + (", null" if none else "")
            raise ValueCheckError(f"{key}: expected one of {shown}, got {v!r}")
        return v
    return check


def text(none: bool = False) -> Check:
    def check(key: str, v: Any) -> Any:
        if not ((v is None and none) or (isinstance(v, str) and v)):
            raise ValueCheckError(f"{key}: expected a non-empty string{' or null' if none else ''}, got {v!r}")
        return v
    return check


def either(*checks: Check, want: str) -> Check:
    """The first of ``checks`` that accepts the value; else one message saying what is wanted."""
    def check(key: str, v: Any) -> Any:
        for c in checks:
            try:
                return c(key, v)
            except ValueCheckError:
                pass
        raise ValueCheckError(f"{key}: expected {want}, got {v!r}")
    return check
