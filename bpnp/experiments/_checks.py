"""Printed checks shared by the lecture examples: each is a number against a tolerance.

Every example's ``main`` returns a :class:`Checks`; run as a module it exits with status 1 when a
check fails, so ``python -m bpnp.experiments.<name>`` is itself a test.
"""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` (Frobenius), with ``||ref||`` floored at the dtype's tiny."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))


class Checks:
    """Collects ``(name, value, tolerance)``; each check is printed as it is added.

    A check passes when ``value <= tol`` (``value >= tol`` with ``at_least=True``).
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, float, float, bool]] = []

    def add(self, name: str, value: float, tol: float, at_least: bool = False) -> bool:
        ok = bool(value >= tol) if at_least else bool(value <= tol)
        self.items.append((name, float(value), float(tol), ok))
        sign = ">=" if at_least else "<="
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value:.3g} ({sign} {tol:.3g})")
        return ok

    @property
    def ok(self) -> bool:
        return all(item[3] for item in self.items)

    def __getitem__(self, name: str) -> float:
        for item in self.items:
            if item[0] == name:
                return item[1]
        raise KeyError(name)

    def summary(self) -> str:
        failed = [item[0] for item in self.items if not item[3]]
        return f"{len(self.items) - len(failed)}/{len(self.items)} checks passed" + (
            f"; failed: {', '.join(failed)}" if failed else ""
        )
