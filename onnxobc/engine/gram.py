"""Gram products X X^T of a layer's input columns, at the speed of the machine's float32 GEMM.

H = 2 X X^T / n (ALGORITHMS.md section 0) needs only the sums of x x^T over the columns of one batch. The
columns are formed exactly as the node computes them (im2col for Conv, rows for Gemm / MatMul), but:

* in float32 (the activations ONNX Runtime returns are float32: converting them to float64 doubles the bytes
  moved and runs the products at half the rate) and in tiles of a bounded number of columns, each tile's
  product (numpy uses BLAS syrk for ``a @ a.T``: only one triangle is computed) added to a float64 sum, so
  rounding grows with the tile length, not with the dataset;
* without unfolding where none is needed: a 1x1 stride-1 unpadded Conv is a product on the reshaped input;
  other convs unfold one tile of samples at a time, taps written straight into the (groups, C, columns)
  layout the product reads (for a depthwise conv each channel's k^2 x k^2 Gram is one small product in a
  batch over channels);
* tiles side by side on a few threads (numpy's copies and BLAS release the GIL; ``collect_hessians`` holds
  BLAS to one thread per call meanwhile).

Every function returns ``(sums, columns)``: ``sums`` a (groups, C, C) float64 array, ``columns`` the number of
columns summed. ``gram_reference`` is the previous float64 im2col path, kept for tests and benchmarks.

Pure functions: arrays and geometry in, arrays out; no ONNX, no ONNX Runtime.
"""
from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence

import numpy as np

# Float32 bytes of one unfolded tile (bounds the im2col buffers: memory stays one batch's activations plus
# this per worker thread).
TILE_BYTES = 32 << 20
# Columns summed by one float32 product before it is added to the float64 sum (bounds float32 rounding).
TILE_COLUMNS = 4096


_POOL: dict[int, ThreadPoolExecutor] = {}


def _workers(workers: int | None) -> int:
    if workers is not None:
        return max(1, int(workers))
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _pool(n: int) -> ThreadPoolExecutor:
    """One lazily created pool per size, reused across calls (threads are cheap to keep, slow to start)."""
    if n not in _POOL:
        _POOL[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="onnxobc-gram")
    return _POOL[n]


def _work_dtype(x: np.ndarray, dtype: np.dtype | type | None) -> np.dtype:
    """float32 unless asked otherwise; float64 inputs keep float64 (no precision is thrown away)."""
    if dtype is not None:
        return np.dtype(dtype)
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _accumulate(acc: np.ndarray, cols: np.ndarray, tile_columns: int) -> None:
    """acc (g, C, C) float64 += cols @ cols^T for cols (g, C, n), ``tile_columns`` columns per product."""
    n = cols.shape[-1]
    step = max(1, int(tile_columns))
    for s in range(0, n, step):
        t = cols[..., s:s + step]
        if t.shape[0] == 1:
            acc[0] += t[0] @ t[0].T  # 2-D a @ a.T: numpy calls BLAS syrk
        else:
            acc += np.matmul(t, t.transpose(0, 2, 1))


def gram_rows(rows: np.ndarray, *, dtype: np.dtype | type | None = None, tile_columns: int = TILE_COLUMNS,
              workers: int | None = None) -> tuple[np.ndarray, int]:
    """Sum of r r^T over the rows r of a (n, K) array: (1, K, K) float64 and n (row tiles on ``workers``
    threads, as in :func:`gram_conv`)."""
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"gram_rows expects a 2-D array, got shape {rows.shape}")
    n, k = rows.shape
    wd = _work_dtype(rows, dtype)
    step = max(1, int(tile_columns))

    def part(s0: int, s1: int) -> np.ndarray:
        acc = np.zeros((k, k), dtype=np.float64)
        for s in range(s0, s1, step):
            t = np.asarray(rows[s:min(s + step, s1)], dtype=wd)
            acc += t.T @ t  # same buffer transposed: syrk
        return acc

    nw = min(_workers(workers), -(-n // step)) if n else 1
    if nw > 1:
        per = -(-(-(-n // step)) // nw) * step  # whole tiles per worker
        bounds = [(s, min(n, s + per)) for s in range(0, n, per)]
        total = np.zeros((1, k, k), dtype=np.float64)
        for p in _pool(nw).map(lambda b: part(*b), bounds):
            total[0] += p
        return total, n
    return part(0, n)[None], n


def gram_gemm(x: np.ndarray, *, trans_a: bool = False, dtype: np.dtype | type | None = None,
              tile_columns: int = TILE_COLUMNS) -> tuple[np.ndarray, int]:
    """Gemm's input A (or A^T with ``transA``): one column per row of op(A)."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if trans_a:
        # op(A) = x^T: its rows are x's columns, so the Gram is x x^T
        return _gram_cols(x[None], dtype=dtype, tile_columns=tile_columns)
    return gram_rows(x, dtype=dtype, tile_columns=tile_columns)


def gram_matmul(x: np.ndarray, k: int, *, dtype: np.dtype | type | None = None,
                tile_columns: int = TILE_COLUMNS) -> tuple[np.ndarray, int]:
    """MatMul's input [..., K] against a [K, N] weight: every leading position is one column."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if x.shape[-1] != k:
        raise ValueError(f"MatMul input has last dim {x.shape[-1]}, the weight expects {k}")
    return gram_rows(x.reshape(-1, k), dtype=dtype, tile_columns=tile_columns)


def _gram_cols(cols: np.ndarray, *, dtype: np.dtype | type | None, tile_columns: int) -> tuple[np.ndarray, int]:
    wd = _work_dtype(cols, dtype)
    g, c, n = cols.shape
    acc = np.zeros((g, c, c), dtype=np.float64)
    step = max(1, int(tile_columns))
    for s in range(0, n, step):
        _accumulate(acc, np.asarray(cols[..., s:s + step], dtype=wd), step)
    return acc, n


def conv_output_shape(spatial: Sequence[int], kernel: Sequence[int], pads_begin: Sequence[int],
                      pads_end: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> tuple[int, ...]:
    """Spatial output size of a Conv (ONNX semantics, floor division)."""
    return tuple((spatial[i] + pads_begin[i] + pads_end[i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i in range(len(kernel)))


def _unfold_tile(x: np.ndarray, g: int, kernel: tuple[int, ...], begin, end, strides, dil, out,
                 wd: np.dtype) -> np.ndarray:
    """im2col of a tile of samples straight into (g, Cin/g * k, tile * positions), C ordered like the weight
    (input channel outermost, then kernel taps)."""
    b, cin = x.shape[:2]
    nd = len(kernel)
    ksize = math.prod(kernel)
    if any(begin) or any(end):
        xp = np.zeros((b, cin) + tuple(x.shape[2 + i] + begin[i] + end[i] for i in range(nd)), dtype=wd)
        xp[(slice(None), slice(None)) + tuple(slice(begin[i], begin[i] + x.shape[2 + i]) for i in range(nd))] = x
    else:
        xp = x
    cols = np.empty((g, cin // g, ksize, b) + tuple(out), dtype=wd)
    for t, offs in enumerate(itertools.product(*[range(k) for k in kernel])):
        sl = tuple(slice(offs[i] * dil[i], offs[i] * dil[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                   for i in range(nd))
        # (b, cin, *out) -> (cin, b, *out) -> (g, cin/g, b, *out): views; the assignment is the only copy
        cols[:, :, t] = xp[(slice(None), slice(None)) + sl].swapaxes(0, 1).reshape((g, cin // g, b) + tuple(out))
    return cols.reshape(g, (cin // g) * ksize, -1)


def gram_conv(x: np.ndarray, weight_shape: Sequence[int], *, group: int = 1, pads_begin: Sequence[int] | None = None,
              pads_end: Sequence[int] | None = None, strides: Sequence[int] | None = None,
              dilations: Sequence[int] | None = None, dtype: np.dtype | type | None = None,
              tile_bytes: int = TILE_BYTES, tile_columns: int = TILE_COLUMNS,
              workers: int | None = None) -> tuple[np.ndarray, int]:
    """Conv input (batch, Cin, *spatial) with resolved geometry (auto_pad already turned into pads):
    ((group, Cin/group * prod(kernel), same) float64 sums of x x^T over all output positions, columns).

    ``workers`` threads (default: the machine's cores, at most 4) unfold and multiply tiles side by side
    (numpy's copies and BLAS release the GIL): the per-channel products of a depthwise conv are too small for
    BLAS's own threads. The sums do not depend on ``workers`` beyond float32 rounding of the tile split."""
    x = np.asarray(x)
    kernel = tuple(int(k) for k in weight_shape[2:])
    nd = len(kernel)
    if x.ndim != nd + 2:
        raise ValueError(f"Conv input has rank {x.ndim}, expected {nd + 2} for a {nd}-D kernel")
    begin = list(pads_begin) if pads_begin is not None else [0] * nd
    end = list(pads_end) if pads_end is not None else [0] * nd
    strides = list(strides) if strides is not None else [1] * nd
    dil = list(dilations) if dilations is not None else [1] * nd
    g = int(group)
    b, cin = x.shape[:2]
    if cin % g:
        raise ValueError(f"Conv input has {cin} channels, not divisible by group={g}")
    out = conv_output_shape(x.shape[2:], kernel, begin, end, strides, dil)
    if min(out, default=1) <= 0:
        raise ValueError(f"Conv output would be empty for input spatial size {tuple(x.shape[2:])}")
    wd = _work_dtype(x, dtype)
    ksize = math.prod(kernel)
    c = (cin // g) * ksize
    positions = math.prod(out)
    acc = np.zeros((g, c, c), dtype=np.float64)
    if ksize == 1 and not any(begin) and not any(end):
        # 1x1: no unfolding, only strided subsampling; columns are (batch, position) pairs
        if any(s != 1 for s in strides):
            x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
    # Tiles of (group chunk) x (sample chunk): all samples of as many groups as fit first (long products, few
    # calls: a depthwise conv has one tiny product per channel), else fewer samples of one group at a time.
    per_group = c * b * positions * wd.itemsize
    gstep = max(1, min(g, int(tile_bytes) // max(per_group, 1)))
    bstep = b if gstep > 1 or per_group <= tile_bytes else max(1, int(tile_bytes) // max(c * positions * wd.itemsize, 1))
    nw = _workers(workers)
    if nw > 1:  # enough tiles to keep every worker busy
        if -(-g // gstep) < nw and gstep > 1:
            gstep = -(-g // nw)
        elif -(-g // gstep) < nw and -(-b // bstep) < nw:
            bstep = max(1, -(-b // nw))
    cg = cin // g
    one_by_one = ksize == 1 and not any(begin) and not any(end)

    def tile(g0: int, g1: int, s: int) -> np.ndarray:
        xs = np.asarray((x[:, g0 * cg:g1 * cg] if g > 1 else x)[s:s + bstep], dtype=wd)
        if one_by_one:
            cols = xs.reshape(xs.shape[0], g1 - g0, cg, positions)
            cols = np.ascontiguousarray(cols.transpose(1, 2, 0, 3)).reshape(g1 - g0, cg, -1)
        else:
            cols = _unfold_tile(xs, g1 - g0, kernel, begin, end, strides, dil, out, wd)
        part = np.zeros((g1 - g0, c, c), dtype=np.float64)
        _accumulate(part, cols, tile_columns)
        return part

    tasks = [(g0, min(g, g0 + gstep), s) for g0 in range(0, g, gstep) for s in range(0, b, bstep)]
    if nw > 1 and len(tasks) > 1:
        for (g0, g1, _), part in zip(tasks, _pool(nw).map(lambda t: tile(*t), tasks)):
            acc[g0:g1] += part
    else:
        for g0, g1, s in tasks:
            acc[g0:g1] += tile(g0, g1, s)
    return acc, b * positions


def gram_flops(groups: int, c: int, columns: int) -> float:
    """FLOPs of the full Gram product (2 C^2 per column and group), the yardstick at GEMM rate."""
    return 2.0 * groups * c * c * columns


# ---- the float64 im2col reference (the path before issue 11) ------------------------------------------
def unfold_reference(x: np.ndarray, weight_shape: Sequence[int], *, op: str, trans_a: bool = False, group: int = 1,
                     pads_begin=None, pads_end=None, strides=None, dilations=None) -> np.ndarray:
    """Columns (groups, C, n) in float64, built the straightforward way (full im2col)."""
    x = np.asarray(x, dtype=np.float64)
    if op == "Gemm":
        x = x[None] if x.ndim == 1 else x
        return (x.T if trans_a else x).T[None]
    if op == "MatMul":
        x = x[None] if x.ndim == 1 else x
        return x.reshape(-1, weight_shape[0]).T[None]
    kernel = tuple(int(k) for k in weight_shape[2:])
    nd = len(kernel)
    begin = list(pads_begin) if pads_begin is not None else [0] * nd
    end = list(pads_end) if pads_end is not None else [0] * nd
    strides = list(strides) if strides is not None else [1] * nd
    dil = list(dilations) if dilations is not None else [1] * nd
    out = conv_output_shape(x.shape[2:], kernel, begin, end, strides, dil)
    b, cin = x.shape[:2]
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    ksize = math.prod(kernel)
    cols = np.empty((b, cin, ksize) + tuple(out), dtype=np.float64)
    for t, offs in enumerate(itertools.product(*[range(k) for k in kernel])):
        sl = tuple(slice(offs[i] * dil[i], offs[i] * dil[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                   for i in range(nd))
        cols[:, :, t] = xp[(slice(None), slice(None)) + sl]
    g = int(group)
    return cols.reshape(b, g, (cin // g) * ksize, -1).transpose(1, 2, 0, 3).reshape(g, (cin // g) * ksize, -1)


def gram_reference(x: np.ndarray, weight_shape: Sequence[int], *, op: str, **geometry) -> tuple[np.ndarray, int]:
    """Float64 im2col followed by a float64 product: the accuracy yardstick for the fast paths."""
    cols = unfold_reference(x, weight_shape, op=op, **geometry)
    return np.matmul(cols, cols.transpose(0, 2, 1)), cols.shape[2]
