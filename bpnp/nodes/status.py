"""Per-item status codes shared by every declarative node.

A node never raises for one bad item of a batch and never returns NaN for it: it returns a finite
answer and says what happened in a status tensor of shape (B,) with these codes. Codes are small
integers so that they can be logged, counted (``torch.bincount``) and synchronised under DDP.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Status(IntEnum):
    """What happened to one batch item in a forward solve or a backward linear solve."""

    OK = 0
    """Converged (forward) or the linear system was solved exactly (backward)."""
    MAX_ITER = 1
    """The forward solver stopped before meeting its tolerance: at its iteration limit, or
    (Sinkhorn) with a plan whose marginal error, measured on the returned plan, is above the
    tolerance at working precision (float32 with a very large ``lam``). Backward (conjugate
    gradient): the iteration limit was reached before the residual tolerance."""
    DAMPED = 2
    """Backward: the system was singular, indefinite, or (after Jacobi scaling) more
    ill-conditioned than the working precision resolves (condition number above ~1/sqrt(eps));
    a damped system was solved instead."""
    MIN_NORM = 3
    """Backward: the system was singular; the minimum-norm (pseudo-inverse) solution was used."""
    ZEROED = 4
    """Backward: the system could not be solved; the gradient of this item was set to zero."""
    DEGENERATE = 5
    """Forward: the problem is degenerate (e.g. too few weighted points), or not determined at
    working precision (e.g. a float32 pose of a very distant scene); the answer is finite but not
    unique."""
    NONFINITE = 6
    """The item's inputs or incoming gradient contained NaN or Inf; its outputs/gradients are
    zero or its initial value. (Backward statuses say it for a non-finite incoming gradient in
    every node; entries at padding, where the output is a constant 0, are ignored.)"""


def status_counts(status: torch.Tensor) -> dict[str, int]:
    """Count the items of each status, e.g. ``{"OK": 7, "DAMPED": 1}`` (zero counts omitted).

    Args:
        status: (B,) integer tensor of :class:`Status` codes.
    """
    counts = torch.bincount(status.flatten().long().cpu(), minlength=len(Status))
    return {s.name: int(counts[s.value]) for s in Status if counts[s.value] > 0}
