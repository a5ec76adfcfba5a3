"""Helpers shared by the engine's routines (argument checks, result checks, row batching)."""
from __future__ import annotations

from typing import Any

from ..errors import NumericalError
from .hessian import Prepared


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return s


def check_layer(w: Any, H: Any, name: str) -> tuple[int, int]:
    if getattr(w, "ndim", 0) != 2:
        raise ValueError(f"{name}: weight must be a 2-D rows x C array, got shape {getattr(w, 'shape', None)}")
    rows, c = w.shape
    if tuple(H.shape) != (c, c):
        raise ValueError(f"{name}: Hessian must be {c} x {c} for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(H.shape)}")
    return rows, c


def global_counts(xp: Any, losses: Any, k: int) -> Any:
    """Sec. 1: how many of each row's steps are among the k smallest (row, step) losses of the layer
    (ties broken by position, so the count is exact and deterministic)."""
    rows, steps = losses.shape
    sel = xp.argsort(losses.ravel(), kind="stable")[:k]
    return xp.bincount(sel // steps, minlength=rows)


def info(prep: Prepared, **more: Any) -> dict:
    info = {"damp": prep.damp, "dead": int(prep.dead.sum())}
    info.update(more)
    return info


def finish(xp: Any, w_in: Any, w_new: Any, name: str) -> Any:
    out = w_new.astype(w_in.dtype, copy=False)
    if not bool(xp.all(xp.isfinite(out))):
        raise NumericalError(f"{name}: the compressed weights are not finite; raise --damp or use dtype='float64'")
    return out


def row_batches(rows: int, R: int):
    for r0 in range(0, rows, R):
        yield slice(r0, min(rows, r0 + R))
