"""The two baselines every real method must beat: magnitude pruning and round-to-nearest."""
from __future__ import annotations

from typing import Any

from ..backend import xp_of
from .grid import Grid, apply_grid, fit_grid


def magnitude_prune(w: Any, sparsity: float) -> Any:
    """Zero the ``round(sparsity * numel)`` smallest-magnitude weights of the layer (one global threshold
    over the whole layer, ties broken by position so the count is exact)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    xp = xp_of(w)
    k = int(round(sparsity * w.size))
    if k == 0:
        return w.copy()
    flat = xp.abs(w).ravel()
    idx = xp.argsort(flat, kind="stable")[:k]
    out = w.copy().ravel()
    out[idx] = 0
    return out.reshape(w.shape)


def magnitude_prune_nm(w: Any, n: int, m: int) -> Any:
    """Keep the ``n`` largest-magnitude weights in every group of ``m`` consecutive columns."""
    xp = xp_of(w)
    rows, c = w.shape
    if c % m:
        raise ValueError(f"C={c} is not a multiple of M={m}")
    g = w.reshape(rows, c // m, m)
    order = xp.argsort(xp.abs(g), axis=2, kind="stable")
    drop = order[:, :, : m - n]
    out = g.copy()
    xp.put_along_axis(out, drop, 0, axis=2)
    return out.reshape(rows, c)


def rtn_quantize(w: Any, bits: int, *, sym: bool = False, grid_method: str = "minmax", mask: Any = None,
                 group_size: int | None = None) -> tuple[Any, Grid]:
    """Round-to-nearest on per-output-channel grids (or per group of ``group_size`` columns of a row);
    returns the fake-quantized weights and the grid."""
    grid = fit_grid(w, bits, sym=sym, method=grid_method, mask=mask, group_size=group_size)
    q = apply_grid(w, grid)
    if mask is not None:
        q = xp_of(w).where(mask, q, 0)
    return q, grid
