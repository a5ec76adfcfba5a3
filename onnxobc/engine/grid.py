"""Per-output-channel uniform quantization grids (ALGORITHMS.md section 3).

q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z), the range always includes 0 so that 0 is exact, and
rounding is half to even, as ONNX QuantizeLinear does: the error minimised here is the error ONNX Runtime
produces when the grid is exported as QuantizeLinear/DequantizeLinear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backend import xp_of

# Shrink factors searched by the MSE grid: the range is scaled by 1 - i/100 (reference code: 100 steps,
# 80% max shrink, norm 2.4).
_MSE_NORM = 2.4
_MSE_STEPS = 100
_MSE_MAX_SHRINK = 0.8


@dataclass
class Grid:
    """A per-row grid: ``scale`` and ``zero_point`` have one entry per row (zero_point holds integers
    stored as floats, in [0, 2^bits - 1])."""

    scale: Any
    zero_point: Any
    bits: int
    sym: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def rows(self, idx: Any) -> "Grid":
        """The grid restricted to some rows (index or slice)."""
        return Grid(self.scale[idx], self.zero_point[idx], self.bits, self.sym)


def _params_from_range(xmin: Any, xmax: Any, bits: int, sym: bool) -> tuple[Any, Any]:
    xp = xp_of(xmin)
    maxq = (1 << bits) - 1
    xmin = xp.minimum(xmin, 0)
    xmax = xp.maximum(xmax, 0)
    if sym:
        xmax = xp.maximum(xp.abs(xmin), xmax)
        xmin = -xmax
    degenerate = (xmax - xmin) == 0
    xmin = xp.where(degenerate, -1.0, xmin)
    xmax = xp.where(degenerate, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = xp.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = xp.rint(-xmin / scale)
    return scale, zero


def quantize(x: Any, scale: Any, zero: Any, maxq: int) -> Any:
    """Fake-quantize ``x`` with broadcastable ``scale``/``zero`` (round half to even, clamp)."""
    xp = xp_of(x)
    q = xp.clip(xp.rint(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def quantize_int(x: Any, scale: Any, zero: Any, maxq: int) -> Any:
    """Integer codes in [0, maxq] of ``x`` (as the float grid's QuantizeLinear would give)."""
    xp = xp_of(x)
    return xp.clip(xp.rint(x / scale) + zero, 0, maxq)


def fit_grid(w: Any, bits: int, *, sym: bool = False, method: str = "minmax", mask: Any = None) -> Grid:
    """Fit one grid per row of ``w`` (rows x C).

    method 'minmax' spans the row's range; 'mse' searches shrink factors of that range minimising
    sum |q(x) - x|^2.4 per row. ``mask`` (bool, True = weight kept) restricts the fit to surviving weights
    (compound compression: pruned zeros stay exact because the range always contains 0).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if method not in ("minmax", "mse"):
        raise ValueError(f"grid method must be 'minmax' or 'mse', got {method!r}")
    xp = xp_of(w)
    w = xp.asarray(w)
    if mask is not None:
        wmin = xp.where(mask, w, 0).min(axis=1)
        wmax = xp.where(mask, w, 0).max(axis=1)
    else:
        wmin = w.min(axis=1)
        wmax = w.max(axis=1)
    scale, zero = _params_from_range(wmin, wmax, bits, sym)
    if method == "mse":
        maxq = (1 << bits) - 1
        best = xp.full(w.shape[0], xp.inf, dtype=w.dtype)
        wm = w if mask is None else xp.where(mask, w, 0)
        for i in range(int(_MSE_STEPS * _MSE_MAX_SHRINK)):
            p = 1 - i / _MSE_STEPS
            s1, z1 = _params_from_range(p * wmin, p * wmax, bits, sym)
            err = xp.sum(xp.abs(quantize(wm, s1[:, None], z1[:, None], maxq) - wm) ** _MSE_NORM, axis=1)
            better = err < best
            best = xp.where(better, err, best)
            scale = xp.where(better, s1, scale)
            zero = xp.where(better, z1, zero)
    return Grid(scale, zero, bits, sym)


def apply_grid(w: Any, grid: Grid) -> Any:
    """Round-to-nearest of every weight of ``w`` on its row's grid."""
    return quantize(w, grid.scale[:, None], grid.zero_point[:, None], grid.maxq)
