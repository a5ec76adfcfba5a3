"""Uniform quantization grids per output channel or per group of columns (ALGORITHMS.md section 3).

q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z), the range always includes 0 so that 0 is exact, and
rounding is half to even, as ONNX QuantizeLinear does: the error minimised here is the error ONNX Runtime
produces when the grid is exported as QuantizeLinear/DequantizeLinear.

A grid is either per row (one scale and zero point per output channel) or group-wise: with ``group_size``
g, row r has one scale and zero point per group j of consecutive columns [j g, min((j + 1) g, C)) (the
last group may be partial), exported as blocked DequantizeLinear (opset 21) or MatMulNBits blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import xp_of

# Shrink factors searched by the MSE grid: the range is scaled by 1 - i/100 (reference code: 100 steps,
# 80% max shrink, norm 2.4).
_MSE_NORM = 2.4
_MSE_STEPS = 100
_MSE_MAX_SHRINK = 0.8


@dataclass
class Grid:
    """A per-row or group-wise grid (zero_point holds integers stored as floats, in [0, 2^bits - 1]).

    ``group_size=None``: ``scale`` and ``zero_point`` have shape (rows,). ``group_size=g``: shape
    (rows, ceil(C / g)), entry (r, j) serving columns [j g, min((j + 1) g, C)) of row r. The shape is kept
    as given even when g >= C (one group, (rows, 1)): such a grid quantizes exactly like the per-row one.
    """

    scale: Any
    zero_point: Any
    bits: int
    sym: bool = False
    group_size: int | None = None

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def rows(self, idx: Any) -> "Grid":
        """The grid restricted to some rows (index or slice)."""
        return Grid(self.scale[idx], self.zero_point[idx], self.bits, self.sym, self.group_size)

    def expand(self, c: int) -> tuple[Any, Any]:
        """(scale, zero_point) of every weight of a rows x ``c`` matrix, broadcastable against it.

        Per-row grids give (rows, 1) views; group-wise grids give (rows, c) arrays, column k holding the
        parameters of its group k // group_size.
        """
        if self.group_size is None:
            return self.scale[:, None], self.zero_point[:, None]
        ng = -(-c // self.group_size)
        if self.scale.ndim != 2 or self.scale.shape[1] != ng:
            raise ValueError(f"a grid with group_size={self.group_size} over {c} columns needs {ng} groups per row, "
                             f"got scale of shape {tuple(self.scale.shape)}")
        xp = xp_of(self.scale)
        g = xp.arange(c) // self.group_size
        return self.scale[:, g], self.zero_point[:, g]


def check_group_size(group_size: int | None) -> int | None:
    """``group_size`` as an int >= 1 (None stays None: per-row grids); ValueError otherwise."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or int(group_size) != group_size or int(group_size) < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    return int(group_size)


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


def shrink_factors(steps: int) -> list[float]:
    """Range shrink factors searched by MSE clipping: 1.00, 0.99, ... (``steps`` of them), for weight grids
    (:func:`fit_grid`) and activation ranges alike."""
    return [1 - i / 100 for i in range(steps)]


def tensor_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """(scale, zero point) of ONE asymmetric ``bits``-bit grid spanning [lo, hi] widened to contain 0: the
    per-tensor grid of an activation (QuantizeLinear with a scalar scale, a float32 and an integer zero point)."""
    qmax = (1 << bits) - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0 or not np.isfinite(hi - lo):
        return 1.0, 0
    # a range of a few denormals (a tensor that is all but zero) must not give a zero or denormal scale
    scale = max(float(np.float32((hi - lo) / qmax)), float(np.finfo(np.float32).tiny))
    zp = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return scale, zp


def quantize(x: Any, scale: Any, zero: Any, maxq: int) -> Any:
    """Fake-quantize ``x`` with broadcastable ``scale``/``zero`` (round half to even, clamp)."""
    xp = xp_of(x)
    q = xp.clip(xp.rint(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def quantize_int(x: Any, scale: Any, zero: Any, maxq: int) -> Any:
    """Integer codes in [0, maxq] of ``x`` (as the float grid's QuantizeLinear would give)."""
    xp = xp_of(x)
    return xp.clip(xp.rint(x / scale) + zero, 0, maxq)


def fit_grid(w: Any, bits: int, *, sym: bool = False, method: str = "minmax", mask: Any = None,
             group_size: int | None = None) -> Grid:
    """Fit one grid per row of ``w`` (rows x C), or per (row, group of ``group_size`` columns).

    method 'minmax' spans the row's (group's) range; 'mse' searches shrink factors of that range minimising
    sum |q(x) - x|^2.4 per row (per group). ``mask`` (bool, True = weight kept) restricts the fit to surviving
    weights (compound compression: pruned zeros stay exact because the range always contains 0).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if method not in ("minmax", "mse"):
        raise ValueError(f"grid method must be 'minmax' or 'mse', got {method!r}")
    group_size = check_group_size(group_size)
    xp = xp_of(w)
    w = xp.asarray(w)
    if group_size is not None:
        # Every group becomes a row of its own. Masked weights and the padding of a partial last group are
        # zeros, which change neither the range (it always contains 0) nor the mse error (0 is exact).
        rows, c = w.shape
        ng = -(-c // group_size)
        wm = w if mask is None else xp.where(mask, w, 0)
        if ng * group_size != c:
            wm = xp.pad(wm, ((0, 0), (0, ng * group_size - c)))
        g = fit_grid(wm.reshape(rows * ng, group_size), bits, sym=sym, method=method)
        return Grid(g.scale.reshape(rows, ng), g.zero_point.reshape(rows, ng), bits, sym, group_size)
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
        for p in shrink_factors(int(_MSE_STEPS * _MSE_MAX_SHRINK)):
            s1, z1 = _params_from_range(p * wmin, p * wmax, bits, sym)
            err = xp.sum(xp.abs(quantize(wm, s1[:, None], z1[:, None], maxq) - wm) ** _MSE_NORM, axis=1)
            better = err < best
            best = xp.where(better, err, best)
            scale = xp.where(better, s1, scale)
            zero = xp.where(better, z1, zero)
    return Grid(scale, zero, bits, sym)


def apply_grid(w: Any, grid: Grid) -> Any:
    """Round-to-nearest of every weight of ``w`` on its row's (group's) grid."""
    scale, zero = grid.expand(w.shape[1])
    return quantize(w, scale, zero, grid.maxq)
