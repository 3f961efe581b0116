"""How much memory one instance of ``evaluate.py`` needs, checked before any work.

An instance with ``m`` 2D and ``n`` 3D points is evaluated alone, and its memory is dominated by
the dense ``(m, n)`` matrices: the network's cost and Sinkhorn plan (with their log-domain work
arrays, :mod:`bpnp.nodes.sinkhorn`), RANSAC's candidate selection (~20 bytes per entry of ``P``,
:mod:`bpnp.geometry.ransac`'s memory notes) and the records' top-k of ``P``. The load table of
docs/reliability.md measured 41-47 bytes per ``m * n`` entry above an idle process for the forward
pass with the ``ransac`` baseline; :data:`BYTES_PER_ENTRY` rounds that up. The ``hungarian``
baseline adds ``M`` and ``P`` as float64 arrays and the assignment's float64 cost
(:data:`HUNGARIAN_BYTES_PER_ENTRY`). The ``oracle`` baseline works on the true pairs only.

:func:`check_instance_memory` compares the largest instance (the outlier sweep's largest
fraction included) with the memory available now (``MemAvailable`` of ``/proc/meminfo`` or
psutil; the free memory of the GPU for ``device=cuda``) and refuses, with one line giving the
estimate, the memory available and the setting that would fit, an instance that does not fit:
a 20,000 x 20,000 instance otherwise runs for minutes and dies in RANSAC with ``std::bad_alloc``.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

from bpnp.runtime.cli import ConfigError

__all__ = ["BYTES_PER_ENTRY", "HUNGARIAN_BYTES_PER_ENTRY", "FIXED_BYTES", "estimate_bytes", "available_bytes",
           "check_instance_memory"]

#: Peak bytes per entry of the (m, n) matrices: the forward pass and its RANSAC (measured 41-47).
BYTES_PER_ENTRY = 48
#: Extra bytes per entry of the ``hungarian`` baseline (float64 ``M``, ``P`` and cost copies).
HUNGARIAN_BYTES_PER_ENTRY = 32
#: Head room on top of the matrices (per-point arrays, the allocator, the plots).
FIXED_BYTES = 256 * 2**20
#: Share of the available memory an instance may use.
USABLE_FRACTION = 0.8

GIB = 2.0**30


def estimate_bytes(m: int, n: int, baselines: Sequence[str] = ()) -> int:
    """Peak memory of one ``m x n`` instance (see the module docstring)."""
    per_entry = BYTES_PER_ENTRY + (HUNGARIAN_BYTES_PER_ENTRY if "hungarian" in baselines else 0)
    return int(per_entry * int(m) * int(n) + FIXED_BYTES)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: str = "cpu") -> int | None:
    """Memory available to a new allocation now: the GPU's free memory for a CUDA device; else
    psutil's ``available``, ``/proc/meminfo``'s ``MemAvailable``, or free pages (sysconf); None
    when none of them can be read (the check is then skipped)."""
    if str(device).startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:
            return None
    try:
        import psutil  # optional

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    found = _meminfo_available()
    if found is not None:
        return found
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(x: float) -> str:
    g = x / GIB
    return f"{g:.2g} GiB" if g < 10 else f"{g:.0f} GiB"


def _round_down(x: float) -> int:
    """A readable cap: two significant digits, rounded down, at least 8."""
    if x < 8:
        return 8
    step = 10 ** max(int(math.floor(math.log10(x))) - 1, 0)
    return max(8, int(x // step * step))


def check_instance_memory(sizes: Iterable[tuple[str, int, int]], device: str, baselines: Sequence[str] = (),
                          sweep_growth: tuple[float, float] = (1.0, 1.0), source: str = "scenes",
                          available: int | None = None) -> None:
    """Refuse, before any work, an instance that does not fit in memory.

    Args:
        sizes: ``(name, m, n)`` of every instance to evaluate.
        device: where it runs (``cpu``, ``cuda[:i]``).
        baselines: the baselines that run (``hungarian`` needs more).
        sweep_growth: factors by which the outlier sweep's largest fraction grows ``m`` and ``n``
            (``1 / (1 - f)``; ``(1, 1)`` without a sweep).
        source: the data source, for the setting named in the message.
        available: bytes available (default :func:`available_bytes`).

    Raises:
        ConfigError: ``"<name>: 20000 x 20000 points need about 18 GiB (available 16 GiB);
        subsample with data.max_points_2d=16000 data.max_points_3d=16000"``.
    """
    worst = None
    for name, m, n in sizes:
        mm, nn = int(math.ceil(m * sweep_growth[0])), int(math.ceil(n * sweep_growth[1]))
        if worst is None or mm * nn > worst[3] * worst[4]:
            worst = (name, m, n, mm, nn)
    if worst is None:
        return
    name, m, n, mm, nn = worst
    need = estimate_bytes(mm, nn, baselines)
    if available is None:
        available = available_bytes(device)
    if available is None or need <= USABLE_FRACTION * available:
        return
    per_entry = (need - FIXED_BYTES) / max(mm * nn, 1)
    budget = max(USABLE_FRACTION * available - FIXED_BYTES, 0.0)
    scale = math.sqrt(budget / per_entry / max(mm * nn, 1))  # shrink both sides by this
    cap2, cap3 = _round_down(m * scale), _round_down(n * scale)
    grown = f" ({mm} x {nn} with the outlier sweep's added points)" if (mm, nn) != (m, n) else ""
    where = "the GPU's free memory" if str(device).startswith("cuda") else "available"
    if source == "synthetic":
        fix = f"use fewer points, e.g. data.synthetic.num_points_2d={cap2}"
    elif source in ("scenes", "colmap"):
        fix = f"subsample with data.max_points_2d={cap2} data.max_points_3d={cap3}"
    else:
        fix = f"evaluate smaller instances (at most about {cap2} x {cap3} points)"
    if grown:
        fix += " (or a smaller sweep.fractions)"
    room = "" if need > available else f", of which an instance may use {USABLE_FRACTION:.0%}"
    raise ConfigError(f"{name}: {m} x {n} points{grown} need about {_gib(need)} ({where} {_gib(available)}{room}); "
                      f"{fix}")
