"""What every engine routine returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .grid import Grid


@dataclass
class EngineResult:
    """Compressed weights of one layer.

    ``weight``: rows x C, same dtype and array module as the input weights.
    ``grid``: the per-row grid when the weights were quantized (None for pure pruning).
    ``loss``: the greedy objective, the sum of the OBS losses (sec. 0) of the steps actually taken; it equals
    1/2 (W - W') H (W - W')^T summed over rows, with H the damped Hessian.
    ``info``: bookkeeping, e.g. ``damp`` (relative damping actually used), ``dead`` (number of dead inputs),
    ``steps`` (greedy steps traced), ``zeros`` (number of zero weights in the output).
    """

    weight: Any
    grid: Grid | None
    loss: float
    info: dict = field(default_factory=dict)
