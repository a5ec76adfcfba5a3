"""OBQ: greedy quantization with OBS compensation (ALGORITHMS.md sec. 3).

Per row: score every free weight by (w_q - q(w_q))^2 / Hinv_qq, fix the argmin at its grid value, compensate
the other free weights, drop it from the inverse Hessian. The loop is the delayed-update trace of
:mod:`onnxobc.engine._greedy` (sec. 4) with a grid point as the target instead of 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import to_numpy, xp_of
from . import _greedy as G
from ._blas import blas_threads
from .grid import fit_grid
from .hessian import masked_inverses, prepare
from .common import check_layer, finish, info
from .result import EngineResult

__all__ = ["quantize_obq"]


def quantize_obq(w: Any, H: Any, bits: int, *, sym: bool = False, grid_method: str = "minmax", mask: Any = None,
                 damp: float = 0.01, name: str = "layer", dtype: str = "float32",
                 group_size: int | None = None) -> EngineResult:
    """Quantize every row of ``w`` to its own ``bits``-bit grid with the OBQ greedy order (sec. 3).

    The grid comes from :func:`fit_grid` on the (masked) input row and never changes. Order: the free weight
    of least (w_q - q(w_q))^2 / Hinv_qq, except that a free weight whose rounding error exceeds half a step
    (it has been pushed outside the clipping range by earlier compensations) is fixed first, the one with the
    largest error among them (heuristic of the reference implementation).

    ``mask`` (bool rows x C, True = kept): masked weights are frozen at exactly 0 and, per row, their rows and
    columns are removed from H (the row's inverse Hessian is (H_FF)^-1 over its kept set F). The output lies
    exactly on the grid: ``weight == quantize(weight, scale, zero, maxq)`` bit for bit, because it is built as
    ``scale * (code - zero)`` from integer codes in the grid's own dtype.

    ``group_size``: group-wise grids (one scale and zero point per row and group of ``group_size``
    consecutive columns, see :class:`~onnxobc.engine.grid.Grid`), fitted once up front like the per-row
    grid (static groups); each weight is rounded on its own group's grid, the greedy order is unchanged.
    """
    rows, c = check_layer(w, H, name)
    work = G.working_dtype(dtype)
    xp = xp_of(w, H)
    if mask is not None:
        mask = xp.asarray(mask, dtype=bool)
        if tuple(mask.shape) != (rows, c):
            raise ValueError(f"{name}: mask must have the weight's shape {(rows, c)}, got {tuple(mask.shape)}")
    clock = G.Clock(xp)
    grid = fit_grid(w, bits, sym=sym, method=grid_method, mask=mask, group_size=group_size)
    grouped = grid.group_size is not None
    prep = prepare(H, w, damp, name=name)
    clock.lap("prepare")
    maxq = grid.maxq
    scale_c, zero_c = grid.expand(c)  # (rows, 1) per row, (rows, C) per column with groups
    scale_w = xp.asarray(scale_c, dtype=work)
    zero_w = xp.asarray(zero_c, dtype=work)
    codes = xp.empty((rows, c), dtype=work)
    codes[...] = zero_w  # code z is the value 0: frozen (masked) weights
    cap = G.cap(work)

    # Batch plan: rows in decreasing order of kept count, so that padding to a batch's largest row is small.
    if mask is None:
        row_order = np.arange(rows)
        kept = np.full(rows, c)
    else:
        kept_all = to_numpy(mask.sum(axis=1)).astype(np.int64)
        row_order = np.argsort(-kept_all, kind="stable")
        kept = kept_all[row_order]
    plan: list[tuple[np.ndarray, int]] = []
    start = 0
    while start < rows:
        K = max(int(kept[start]), 1)
        # masked rows also hold a float64 copy of their inverses while it is formed
        R = G.rows_per_batch(xp, K, np.dtype(np.float64) if mask is not None else work, rows - start)
        plan.append((row_order[start: start + R], K))
        start += R
    hinv_shared = prep.Hinv.astype(work) if mask is None else None
    totals = [0.0] * len(plan)

    def batch(ib: int, ws: G.Workspace) -> None:
        ridx_h = plan[ib][0]
        ridx = xp.asarray(ridx_h)
        n = len(ridx_h)
        if mask is None:
            cols = xp.broadcast_to(xp.arange(c), (n, c))
            hinv, wb, real = hinv_shared, prep.w[ridx], None
        else:
            hinv, cols, real = masked_inverses(prep, mask, ridx)
            wb = xp.where(real, xp.take_along_axis(prep.w[ridx], cols, axis=1), 0)
        tr = G.Trace(ws, wb, cols, hinv)
        if real is not None:  # padding columns (masked weights) are fixed last, at 0 with zero loss
            tr.pen[...] = xp.where(real, 0.0, 2.0 * cap)
        K = tr.K
        s = scale_w[ridx]  # (n, 1): one grid per row
        z = zero_w[ridx]
        if grouped:  # per local column, in the trace's column order; they follow its compaction (aux)
            tr.aux["s"] = s = xp.take_along_axis(s, cols, axis=1)
            tr.aux["z"] = z = xp.take_along_axis(z, cols, axis=1)
        thr = 0.25 * s * s
        if grouped:
            tr.aux["thr"] = thr
        order = xp.empty((n, K), dtype=xp.int64)
        chosen = xp.empty((n, K), dtype=work)
        errs = xp.empty((n, K), dtype=xp.float64)
        for t in range(K):
            if grouped:  # a flush may have compacted the columns
                s, z, thr = tr.aux["s"], tr.aux["z"], tr.aux["thr"]
            wv = tr.w
            code = xp.rint(wv / s)
            code += z
            xp.clip(code, 0, maxq, out=code)
            qv = code - z
            qv *= s
            e2 = wv - qv
            e2 *= e2
            q = xp.argmin(tr.scores(e2), axis=1)
            # outlier rule (sec. 3): a free weight off the grid by more than half a step goes first
            e2 -= tr.pen  # fixed: -inf, padding: far below any threshold
            q = xp.where(xp.any(e2 > thr, axis=1), xp.argmax(e2, axis=1), q)
            order[:, t] = tr.cols[tr.ar, q]
            chosen[:, t] = code[tr.ar, q]
            errs[:, t] = tr.fix(q, qv[tr.ar, q])  # (w_q - q(w_q)) / sqrt(Hinv_qq)
        codes[ridx[:, None], order] = chosen  # rows of different batches are disjoint
        totals[ib] = 0.5 * float(xp.sum(errs ** 2))

    with blas_threads(1):
        G.run_batches(xp, list(range(len(plan))), batch,
                      ([(len(r), K) for r, K in plan], G.nbuf_for(xp, plan[0][1]), work))
    total = sum(totals)
    out = scale_c * (codes.astype(scale_c.dtype) - zero_c)  # exactly the grid's dequantization (see docstring)
    out = finish(xp, w, out, name)
    clock.lap("trace")
    return EngineResult(out, grid, total, info(prep, steps=c, bits=int(bits), zeros=int((out == 0).sum()),
                                                seconds=clock.laps))
