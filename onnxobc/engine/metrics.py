"""Layer-level error measures computed from the Hessian alone."""
from __future__ import annotations

from typing import Any

from ..backend import xp_of


def error_terms(w: Any, w_new: Any, H: Any, den: float | None = None) -> tuple[float, float]:
    """(tr(dW H dW^T), tr(W H W^T)) in float64: the output error and the output energy up to a constant.
    ``den``: the energy when already known (it depends on ``w`` and ``H`` only; a ladder of variants of one layer
    computes it once)."""
    xp = xp_of(w, w_new, H)
    H = xp.asarray(H, dtype=xp.float64)
    w = xp.asarray(w, dtype=xp.float64)
    d = w - xp.asarray(w_new, dtype=xp.float64)
    num = float(xp.sum((d @ H) * d))
    if den is None:
        den = float(xp.sum((w @ H) * w))
    return num, den


def layer_error(w: Any, w_new: Any, H: Any) -> float:
    """Relative output error ||W X - W' X||^2 / ||W X||^2 of one layer.

    With H = 2 X X^T / n both norms are traces against H, so the ratio is exact without X:
    tr(dW H dW^T) / tr(W H W^T).
    """
    num, den = error_terms(w, w_new, H)
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return max(num, 0.0) / den
