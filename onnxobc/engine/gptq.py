"""The fast modes for large layers (ALGORITHMS.md sec. 6): GPTQ, and the loop SparseGPT shares with it.

Exact OBS/OBQ (sec. 1-4) choose, per row, which weight to fix next: O(rows C^3). The fast modes fix the columns
in one order shared by every row, so one inverse Hessian serves all rows and the updates become matrix
products: with U the upper Cholesky factor of Hinv (Hinv = U^T U), fixing column i at its target t_i is

    err = (w_i - t_i) / U_ii,   w_j -= err * U_ij   for the later columns j > i,

which is exactly the OBS update of column i against the inverse Hessian of the columns not yet fixed (the rows
of U are the rows of those successive inverses, scaled). The loss of the step is err^2 / 2, so the total loss
is 1/2 (W - W') H (W - W')^T with H the damped Hessian, as for the exact engine.

Lazy block updates: the columns run in blocks of ``blocksize`` (128); inside a block the updates go to the
block's own columns only (in sub-blocks of 16 columns with rank-1 updates, the sub-block's errors then applied
to the rest of the block as one product), and after the block its errors reach all later columns at once
(rows x B times B x C': BLAS-3). Cost O(C^3) for the factorisations plus O(rows C^2) in matrix products.

Quantization targets come from a grid fitted once up front on the original weights (per row, or static groups
of ``group_size`` consecutive columns in the ORIGINAL column order: what blocked DequantizeLinear /
MatMulNBits store). ``act_order`` processes the columns by decreasing Hessian diagonal; the grid stays in the
original order (each column keeps its own group's scale), so the result lies on the stored grid.

Pruning (SparseGPT, :mod:`.sparsegpt`) chooses the mask inside the same loop: at the start of each block for
unstructured sparsity (the smallest w^2 / U_ii^2 over the block's rows x columns, with the block's share of the
layer's zero count, so the total is exact), at the first column of each group of M for N:M. Pruned weights
are targets 0; with ``bits`` the kept ones are quantized in the same pass (joint, not two stages).

All arrays are (groups, rows, C): a grouped layer's matrices are handled in one vectorised pass. NumPy or
CuPy, inferred from the inputs.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ..backend import xp_of
from ..errors import NumericalError
from . import _greedy as G
from ._blas import blas_threads
from .common import check_layer, check_sparsity, finish
from .grid import Grid, fit_grid
from .hessian import _linalg_error, dead_inputs
from .result import EngineResult
from .sparsegpt import block_mask, nm_mask

__all__ = ["fast_obs", "quantize_gptq", "prune_sparsegpt", "BLOCKSIZE"]

BLOCKSIZE = 128  # columns per lazy block (GPTQ / SparseGPT)
SUBBLOCK = 16  # columns per rank-1 sub-block inside a block


def _chol_inv(xp: Any, H: Any, base: int = 256) -> tuple[Any, Any]:
    """(L, L^-1) with H = L L^T, L lower triangular, by recursive 2 x 2 blocking so that the work is in matrix
    products (LAPACK's potrf ran at a tenth of dgemm's rate on the development machine):
    L11 = chol(A), L21 = B L11^-T, L22 = chol(D - L21 L21^T), (L^-1)21 = -L22^-1 L21 L11^-1."""
    L = xp.zeros_like(H)
    Li = xp.zeros_like(H)
    _chol_inv_into(xp, H, L, Li, base)
    return L, Li


def _chol_inv_into(xp: Any, H: Any, L: Any, Li: Any, base: int) -> None:
    n = H.shape[0]
    if n <= base:  # on a contiguous copy: LAPACK on a strided view of a large array ran up to 40x slower here
        Lb = xp.linalg.cholesky(xp.ascontiguousarray(H))
        L[...] = Lb
        Li[...] = xp.tril(xp.linalg.inv(Lb))
        return
    h = n // 2
    _chol_inv_into(xp, H[:h, :h], L[:h, :h], Li[:h, :h], base)
    L[h:, :h] = H[h:, :h] @ Li[:h, :h].T
    L21 = L[h:, :h]
    _chol_inv_into(xp, H[h:, h:] - L21 @ L21.T, L[h:, h:], Li[h:, h:], base)
    Li[h:, :h] = -(Li[h:, h:] @ (L21 @ Li[:h, :h]))


def _factor(xp: Any, Hd: Any) -> Any | None:
    """U, upper triangular with Hd^-1 = U^T U (float64), or None when Hd is not numerically positive definite.

    With J the flip (reversal) permutation and J Hd J = L L^T: Hd = M M^T for the upper-triangular M = J L J,
    so Hd^-1 = (M^-1)^T M^-1 and U = M^-1 = J L^-1 J. One blocked Cholesky with its triangular inverse;
    Hd^-1 itself is never formed."""
    c = Hd.shape[0]
    J = xp.ascontiguousarray(Hd[::-1, ::-1])
    try:
        L, Li = _chol_inv(xp, J)
    except _linalg_error(xp):
        return None
    ok = lambda a: bool(xp.all(xp.isfinite(a))) and bool(xp.all(xp.diagonal(a) > 0))  # noqa: E731
    if not (ok(L) and ok(Li)):
        return None
    # the exact engine's test (hessian.prepare: max |L L^T - Hd| < 1e-8 max |Hd|), on a probe vector so that it
    # costs O(C^2): CuPy may return a partial factor instead of raising
    v = xp.asarray(np.random.default_rng(0).standard_normal(c))
    if float(xp.max(xp.abs(L @ (L.T @ v) - J @ v))) > 1e-8 * float(xp.max(xp.abs(J))) * float(xp.sum(xp.abs(v))):
        return None
    U = xp.ascontiguousarray(Li[::-1, ::-1])
    return U


def _prepare_fast(xp: Any, H: Any, w: Any, damp: float, name: str, order: Any, max_tries: int = 5):
    """Dead inputs and damping exactly as :func:`~onnxobc.engine.hessian.prepare` (sec. 0: H_jj = 1 and
    W[:, j] = 0 for dead inputs; ``damp * mean(diag H)`` on the diagonal, x10 while the Cholesky factorisation
    fails, up to ``max_tries`` levels, then a NumericalError), returning ``(w, U, dead, damp used)`` with U the
    upper Cholesky factor of the inverse of the damped Hessian in the column ``order`` (None: as stored)."""
    c = H.shape[0]
    H, w, dead, mean_diag = dead_inputs(xp, H, w, name)
    if order is not None:
        H = H[order][:, order]
    lam = float(damp)
    ar = xp.arange(c)
    for _ in range(max_tries):
        Hd = H.copy()
        Hd[ar, ar] += lam * mean_diag
        U = _factor(xp, Hd)
        if U is not None:
            return w, U, dead, lam
        lam *= 10.0
    raise NumericalError(
        f"{name}: the Hessian ({c} x {c}) is not positive definite even with damping {lam / 10:g} "
        f"(tried {max_tries} levels from {damp:g}); raise --damp or use more calibration data")


def _block_sizes(blocksize: int, m: int | None) -> tuple[int, int]:
    """(block, sub-block) column counts; both multiples of M for N:M so no group of M straddles them."""
    sub = min(SUBBLOCK, blocksize)
    if m:
        sub = max(m, sub - sub % m)
        blocksize = max(sub, blocksize - blocksize % sub)
    else:
        blocksize = max(sub, blocksize - blocksize % sub)
    return blocksize, sub


def fast_obs(ws: Any, Hs: Any, *, bits: int | None = None, sparsity: float | None = None,
             nm: tuple[int, int] | None = None, sym: bool = False, grid_method: str = "minmax",
             group_size: int | None = None, act_order: bool = False, damp: float = 0.01,
             blocksize: int = BLOCKSIZE, name: str = "layer", dtype: str = "float32") -> list[EngineResult]:
    """GPTQ / SparseGPT on the matrices ``ws[g]`` (rows x C) with Hessians ``Hs[g]`` (C x C); one
    :class:`EngineResult` per matrix (see the module docstring for the algorithm).

    ``bits``: quantize (grid fitted up front on the original weights, per row or per ``group_size`` columns);
    ``sparsity`` (unstructured, mask per block over all matrices' rows: the layer's zero count is exact) or
    ``nm=(n, m)`` (N:M along the columns): prune; both: joint. ``act_order`` (quantization alone): columns by
    decreasing diag(H) per matrix. Matrices must share their shape.
    """
    ws, Hs = list(ws), list(Hs)
    if not ws or len(ws) != len(Hs):
        raise ValueError(f"{name}: need one Hessian per matrix, got {len(ws)} matrices and {len(Hs)} Hessians")
    for w, H in zip(ws, Hs):
        rows, c = check_layer(w, H, name)
        if tuple(w.shape) != tuple(ws[0].shape):
            raise ValueError(f"{name}: all matrices must share one shape, got {tuple(w.shape)} and "
                             f"{tuple(ws[0].shape)}")
    if bits is None and sparsity is None and nm is None:
        raise ValueError(f"{name}: nothing to do: give bits, sparsity and/or nm")
    if sparsity is not None and nm is not None:
        raise ValueError(f"{name}: sparsity and nm are exclusive")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    if nm is not None:
        n_keep, m = (int(v) for v in nm)
        if not 0 < n_keep < m:
            raise ValueError(f"{name}: nm needs 0 < N < M, got {nm}")
        if c % m:
            raise ValueError(f"{name}: C={c} is not a multiple of M={m}")
    else:
        n_keep = m = None
    if act_order and (sparsity is not None or nm is not None):
        raise ValueError(f"{name}: act_order applies to quantization alone (a pruning pattern keeps the column order)")
    if blocksize < 1:
        raise ValueError(f"{name}: blocksize must be >= 1, got {blocksize}")
    xp = xp_of(ws[0], Hs[0])
    G.working_dtype(dtype)
    with blas_threads(1) if xp is np else contextlib.nullcontext():
        return _fast_obs(xp, ws, Hs, bits, sparsity, nm, n_keep, m, sym, grid_method, group_size, act_order, damp,
                         blocksize, name, dtype, rows, c)


def _fast_obs(xp, ws, Hs, bits, sparsity, nm, n_keep, m, sym, grid_method, group_size, act_order, damp, blocksize,
              name, dtype, rows, c) -> list[EngineResult]:
    # One BLAS thread on a CPU (ONNXOBC_BLAS_THREADS overrides, see _blas): on the shared 2-vCPU development
    # machine the factorisation of a 2304 x 2304 Hessian took 1.0-1.6 s with one thread and 3.0-6.3 s with two
    # (thread synchronisation under load), and the lazy updates are products of a few hundred columns.
    work = G.working_dtype(dtype)
    clock = G.Clock(xp)
    ng = len(ws)

    order = None
    if act_order:  # by the Hessian diagonal (dead inputs last: their diagonal is 0), stable for ties
        order = [xp.argsort(-xp.diagonal(xp.asarray(H, dtype=xp.float64)), kind="stable") for H in Hs]
    preps = [_prepare_fast(xp, H, w, damp, name, None if order is None else order[g])
             for g, (w, H) in enumerate(zip(ws, Hs))]
    U = xp.stack([p[1] for p in preps])
    clock.lap("prepare")

    W = xp.stack([xp.asarray(p[0], dtype=work) for p in preps])  # (G, R, C), dead columns zeroed
    grids: list[Grid] = []
    if bits is not None:
        # fitted on the original weights in the original order: static groups (sec. 6), as OBQ and RTN fit
        grids = [fit_grid(w, bits, sym=sym, method=grid_method, group_size=group_size) for w in ws]
        # per weight (G, R, C) for group-wise grids; per row (G, R) otherwise (the same for every column)
        exp = [g.expand(c) for g in grids]
        S = xp.stack([xp.asarray(s, dtype=work) for s, _ in exp])
        Z = xp.stack([xp.asarray(z, dtype=work) for _, z in exp])
        per_row = S.shape[2] == 1
        if per_row:
            S, Z = S[:, :, 0], Z[:, :, 0]
        maxq = grids[0].maxq
    if order is not None:
        perm = xp.stack(order)[:, None, :]
        W = xp.take_along_axis(W, perm, axis=2)
        if bits is not None and not per_row:
            S = xp.take_along_axis(S, perm, axis=2)
            Z = xp.take_along_axis(Z, perm, axis=2)
    Uw = U.astype(work)
    # outputs in the processing order: integer codes (bits) or values (pruning alone), written block by block
    if bits is not None:
        codes = xp.empty_like(W)
    else:
        vals = xp.empty_like(W)
    B, sub = _block_sizes(int(blocksize), m)
    loss = xp.zeros(ng, dtype=xp.float64)

    T = lambda a: xp.ascontiguousarray(xp.swapaxes(a, 1, 2))  # noqa: E731  (G, R, n) <-> (G, n, R)
    for i1 in range(0, c, B):
        i2 = min(i1 + B, c)
        nb = i2 - i1
        # the block with its columns contiguous (G, nb, R): a column is one contiguous vector over the rows
        W1 = T(W[:, :, i1:i2])
        U1 = Uw[:, i1:i2, i1:i2]
        d1 = xp.diagonal(U1, axis1=1, axis2=2)  # (G, nb)
        E1 = xp.zeros_like(W1)
        if bits is not None:
            C1 = xp.empty_like(W1)
            if not per_row:
                S1, Z1 = T(S[:, :, i1:i2]), T(Z[:, :, i1:i2])
        else:
            V1 = xp.empty_like(W1)
        P1 = None
        if sparsity is not None:
            k = int(round(sparsity * ng * rows * i2)) - int(round(sparsity * ng * rows * i1))
            P1 = T(block_mask(xp.swapaxes(W1, 1, 2), d1, k))
        elif nm is not None:
            P1 = xp.zeros(W1.shape, dtype=bool)
        for j1 in range(0, nb, sub):
            j2 = min(j1 + sub, nb)
            for j in range(j1, j2):
                w = W1[:, j]
                if nm is not None and j % m == 0:
                    P1[:, j:j + m] = xp.swapaxes(nm_mask(xp.swapaxes(W1[:, j:j + m], 1, 2), d1[:, j:j + m], n_keep),
                                                 1, 2)
                if bits is not None:
                    s, z = (S, Z) if per_row else (S1[:, j], Z1[:, j])
                    code = xp.rint(w / s)
                    code += z
                    xp.clip(code, 0, maxq, out=code)
                    if P1 is not None:
                        code = xp.where(P1[:, j], z, code)
                    C1[:, j] = code
                    q = (code - z) * s
                elif P1 is not None:
                    q = xp.where(P1[:, j], 0, w)
                    V1[:, j] = q
                err = w - q
                err /= d1[:, j][:, None]
                E1[:, j] = err
                if j + 1 < j2:
                    W1[:, j + 1:j2] -= U1[:, j, j + 1:j2][:, :, None] * err[:, None, :]
            if j2 < nb:
                W1[:, j2:] -= xp.matmul(xp.swapaxes(U1[:, j1:j2, j2:], 1, 2), E1[:, j1:j2])
        if bits is not None:
            codes[:, :, i1:i2] = xp.swapaxes(C1, 1, 2)
        else:
            vals[:, :, i1:i2] = xp.swapaxes(V1, 1, 2)
        loss += 0.5 * xp.sum(E1.astype(xp.float64) ** 2, axis=(1, 2))
        if i2 < c:
            W[:, :, i2:] -= xp.matmul(T(E1), Uw[:, i1:i2, i2:])

    if order is not None:  # back to the original column order
        inv = xp.argsort(xp.stack(order), axis=1)[:, None, :]
        if bits is not None:
            codes = xp.take_along_axis(codes, inv, axis=2)
        else:
            vals = xp.take_along_axis(vals, inv, axis=2)
    clock.lap("trace")
    out = []
    loss_h = [float(v) for v in (loss.get() if hasattr(loss, "get") else loss)]
    for g in range(ng):
        if bits is not None:
            s_c, z_c = grids[g].expand(c)
            new = s_c * (codes[g].astype(s_c.dtype) - z_c)  # exactly the grid's dequantization, as OBQ builds it
        else:
            new = vals[g]
        new = finish(xp, ws[g], new, name)
        _, _, dead, lam = preps[g]
        info = {"damp": lam, "dead": int(dead.sum()), "steps": c, "blocksize": B, "act_order": bool(act_order),
                "zeros": int((new == 0).sum()), "seconds": clock.laps}
        if bits is not None:
            info["bits"] = int(bits)
        out.append(EngineResult(new, grids[g] if bits is not None else None, loss_h[g], info))
    return out


def quantize_gptq(w: Any, H: Any, bits: int, *, sym: bool = False, grid_method: str = "minmax",
                  group_size: int | None = None, act_order: bool = False, damp: float = 0.01,
                  blocksize: int = BLOCKSIZE, name: str = "layer", dtype: str = "float32") -> EngineResult:
    """GPTQ of one matrix (rows x C): fixed column order (or act-order), lazy block updates, Cholesky of Hinv."""
    return fast_obs([w], [H], bits=bits, sym=sym, grid_method=grid_method, group_size=group_size,
                    act_order=act_order, damp=damp, blocksize=blocksize, name=name, dtype=dtype)[0]


def prune_sparsegpt(w: Any, H: Any, *, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    bits: int | None = None, sym: bool = False, grid_method: str = "minmax",
                    group_size: int | None = None, damp: float = 0.01, blocksize: int = BLOCKSIZE,
                    name: str = "layer", dtype: str = "float32") -> EngineResult:
    """SparseGPT of one matrix: unstructured (``sparsity``, mask per block) or N:M pruning, jointly quantized
    when ``bits`` is given (see :mod:`.sparsegpt`)."""
    if sparsity is None and nm is None:
        raise ValueError(f"{name}: SparseGPT prunes: give sparsity or nm")
    return fast_obs([w], [H], bits=bits, sparsity=sparsity, nm=nm, sym=sym, grid_method=grid_method,
                    group_size=group_size, damp=damp, blocksize=blocksize, name=name, dtype=dtype)[0]
