"""Exact greedy pruning with Optimal Brain Surgeon updates (ALGORITHMS.md sec. 1-2).

All routines are pure: arrays in (NumPy or CuPy, inferred from the inputs), an :class:`EngineResult` out.
The greedy loops themselves live in :mod:`onnxobc.engine._greedy` (delayed updates, sec. 4).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import xp_of
from . import _greedy as G
from ._blas import blas_threads
from .common import check_layer, check_sparsity, finish, global_counts, info, row_batches
from .hessian import Prepared, prepare, reconstruct
from .result import EngineResult

__all__ = ["EngineResult", "prune_unstructured", "prune_nm", "prune_blocks", "global_prune", "global_prune_levels"]


# ------------------------------------------------------------------------------------------------ traces
def trace_unstructured(prep: Prepared, work: np.dtype) -> tuple[Any, Any]:
    """ExactOBS trace of every row (sec. 1): the global column removed at each step and its loss.

    Returns ``(order, losses)``, both rows x C (int64, float64). The trace runs to the end because greedy
    losses are not monotone in the step, so no depth bound is sound in general; compaction (sec. 4) makes
    the second half of a trace cost 1/8 of the first.
    """
    xp = xp_of(prep.Hinv)
    rows, c = prep.w.shape
    R = G.rows_per_batch(xp, c, work, rows)
    hinv = prep.Hinv.astype(work)
    order = xp.empty((rows, c), dtype=xp.int64)
    losses = xp.empty((rows, c), dtype=xp.float64)

    def batch(rr: slice, ws: G.Workspace) -> None:
        n = rr.stop - rr.start
        tr = G.Trace(ws, prep.w[rr], xp.broadcast_to(xp.arange(c), (n, c)), hinv)
        for t in range(c):
            q = xp.argmin(tr.scores(), axis=1)
            order[rr, t] = tr.cols[tr.ar, q]
            losses[rr, t] = tr.fix(q)  # e / sqrt(Hinv_qq); squared below
        losses[rr] = 0.5 * losses[rr] ** 2

    with blas_threads(1):
        G.run_batches(xp, list(row_batches(rows, R)), batch, ([(R, c)], G.nbuf_for(xp, c), work))
    return order, losses


def global_prune(ws: list, Hs: list, sparsity: float, bs: int | None, *, damp: float, name: str,
                 dtype: str) -> list[EngineResult]:
    """Shared body of unstructured (``bs=None``) and block pruning over one or more groups with one global
    selection (sec. 1): every row of every group is traced, the k = round(sparsity * units) cheapest
    (row, step) losses of the whole layer decide each row's depth c_r, and each row ends in the state
    reached after its first c_r steps: the least-squares optimum for the removed set, recomputed in float64
    by :func:`hessian.reconstruct` (one solve per row: cheaper than re-running c_r steps and far smaller than
    storing every state). Grouped convolutions therefore get one mask over all their groups."""
    return global_prune_levels(ws, Hs, [sparsity], bs, damp=damp, name=name, dtype=dtype)[0]


def global_prune_levels(ws: list, Hs: list, sparsities: list[float], bs: int | None, *, damp: float, name: str,
                        dtype: str) -> list[list[EngineResult]]:
    """:func:`global_prune` at several sparsities from ONE trace per row (sec. 5.1: the whole ladder of a
    layer's database costs one trace plus one reconstruction per level). Returns one list per sparsity."""
    levels = [check_sparsity(s) for s in sparsities]
    work = G.working_dtype(dtype)
    xp = xp_of(ws[0], Hs[0])
    names = [name if len(ws) == 1 else f"{name}[group {g}]" for g in range(len(ws))]
    dims = [check_layer(w, H, nm) for w, H, nm in zip(ws, Hs, names)]
    for (rows, c), nm in zip(dims, names):
        if bs is not None and c % bs:
            raise ValueError(f"{nm}: C={c} is not a multiple of block_size={bs}")
    clock = G.Clock(xp)
    preps = [prepare(H, w, damp, name=nm) for w, H, nm in zip(ws, Hs, names)]
    clock.lap("prepare")
    units = [rows * (c if bs is None else c // bs) for rows, c in dims]
    ks = [int(round(s * sum(units))) for s in levels]
    traces = None
    out_levels = []
    for k in ks:
        if k == 0:
            outs = []
            for w, prep, nm in zip(ws, preps, names):
                out = finish(xp, w, prep.w, nm)
                outs.append(EngineResult(out, None, 0.0, info(prep, steps=0, zeros=int((out == 0).sum()),
                                                              seconds=clock.laps)))
            out_levels.append(outs)
            continue
        if traces is None:
            traces = [trace_unstructured(p, work) if bs is None else trace_blocks(p, bs, work) for p in preps]
            clock.lap("trace")
        out_levels.append(_select(xp, ws, preps, traces, dims, names, k, bs, clock))
    return out_levels


def _select(xp, ws, preps, traces, dims, names, k: int, bs: int | None, clock) -> list[EngineResult]:
    """The state of every row after the k globally cheapest steps of the traces (sec. 1)."""
    steps = {t[1].shape[1] for t in traces}
    if len(steps) == 1:
        counts_all = global_counts(xp, xp.concatenate([t[1] for t in traces]), k)
    else:  # groups of different sizes cannot happen for one ONNX node; pad losses with +inf to be general
        width = max(steps)
        padded = [xp.pad(t[1], ((0, 0), (0, width - t[1].shape[1])), constant_values=np.inf) for t in traces]
        counts_all = global_counts(xp, xp.concatenate(padded), k)
    results = []
    r0 = 0
    for w, prep, (order, losses), (rows, c), nm in zip(ws, preps, traces, dims, names):
        counts = counts_all[r0:r0 + rows]
        r0 += rows
        nsteps = losses.shape[1]
        taken = xp.arange(nsteps)[None, :] < counts[:, None]
        pruned_u = xp.zeros((rows, nsteps), dtype=bool)
        pruned_u[xp.arange(rows)[:, None], order] = taken
        pruned = pruned_u if bs is None else xp.repeat(pruned_u, bs, axis=1)
        out = finish(xp, w, reconstruct(prep, pruned), nm)
        loss = float(xp.sum(xp.where(taken, losses, 0.0)))
        extra = {"pruned": int(xp.sum(counts))} if bs is None else {"block_size": bs, "pruned_blocks": int(xp.sum(counts))}
        results.append(EngineResult(out, None, loss, info(prep, steps=nsteps, zeros=int((out == 0).sum()),
                                                          seconds=clock.laps, **extra)))
    clock.lap("final")
    return results


def prune_unstructured(w: Any, H: Any, sparsity: float, *, damp: float = 0.01, name: str = "layer",
                       dtype: str = "float32") -> EngineResult:
    """ExactOBS with one global mask over the layer (sec. 1).

    Each row is traced greedily (remove the weight of least loss w_q^2 / (2 Hinv_qq), compensate the rest);
    the k = round(sparsity * numel) smallest losses over all (row, step) pairs decide how many steps c_r each
    row keeps (see :func:`global_prune`).
    """
    return global_prune([w], [H], sparsity, None, damp=damp, name=name, dtype=dtype)[0]


def prune_nm(w: Any, H: Any, n: int, m: int, *, damp: float = 0.01, name: str = "layer",
             dtype: str = "float32") -> EngineResult:
    """N:M semi-structured pruning (sec. 2): at most ``n`` non-zeros in every group of ``m`` consecutive columns.

    The ExactOBS loop where a weight whose group already holds m - n zeros scores +inf, for C (m - n) / m
    steps per row; every group then holds exactly m - n pruned weights. No global selection: the final
    weights are the greedy state itself. The caller orders the columns so that groups are consecutive.
    """
    rows, c = check_layer(w, H, name)
    n, m = int(n), int(m)
    if not (m >= 2 and 1 <= n < m):
        raise ValueError(f"{name}: N:M needs 1 <= N < M, got {n}:{m}")
    if c % m:
        raise ValueError(f"{name}: C={c} is not a multiple of M={m}; N:M pruning needs whole groups")
    work = G.working_dtype(dtype)
    xp = xp_of(w, H)
    clock = G.Clock(xp)
    prep = prepare(H, w, damp, name=name)
    clock.lap("prepare")
    steps = c * (m - n) // m
    R = G.rows_per_batch(xp, c, work, rows)
    hinv = prep.Hinv.astype(work)
    out = xp.empty((rows, c), dtype=work)
    blocked = 4.0 * G.cap(work)  # free but not selectable: its group already holds m - n zeros
    batches = list(row_batches(rows, R))
    totals = [0.0] * len(batches)

    def batch(ib: int, ws: G.Workspace) -> None:
        rr = batches[ib]
        nr = rr.stop - rr.start
        cols = xp.broadcast_to(xp.arange(c), (nr, c))
        tr = G.Trace(ws, prep.w[rr], cols, hinv)
        tr.aux["grp"] = cols // m
        zeros = xp.zeros((nr, c // m), dtype=xp.int64)
        errs = xp.empty((nr, steps), dtype=xp.float64)
        for t in range(steps):
            q = xp.argmin(tr.scores(), axis=1)
            g = tr.aux["grp"][tr.ar, q]
            errs[:, t] = tr.fix(q)
            zeros[tr.ar, g] += 1
            full = zeros[tr.ar, g] >= (m - n)
            hit = (tr.aux["grp"] == g[:, None]) & full[:, None]
            tr.pen += xp.where(hit, blocked, 0.0).astype(work)  # a group fills once; fixed stay +inf
        out[rr] = tr.scatter(c)
        totals[ib] = 0.5 * float(xp.sum(errs ** 2))

    with blas_threads(1):
        G.run_batches(xp, list(range(len(batches))), batch, ([(R, c)], G.nbuf_for(xp, c), work))
    total = sum(totals)
    res = finish(xp, w, out, name)
    clock.lap("trace")
    return EngineResult(res, None, total, info(prep, steps=steps, pattern=f"{n}:{m}", zeros=int((res == 0).sum()),
                                                seconds=clock.laps))


def trace_blocks(prep: Prepared, bs: int, work: np.dtype) -> tuple[Any, Any]:
    """Block OBS trace of every row (sec. 2): the global block removed at each step and its loss.

    Scores of all blocks need the bs x bs diagonal blocks of the current inverse Hessian; they are updated
    with every rank-bs downdate and recomputed from the base after each flush. Removed blocks are held at
    the identity so the batched small solves stay well defined.
    """
    xp = xp_of(prep.Hinv)
    rows, c = prep.w.shape
    nb = c // bs
    nbuf = G.nbuf_for(xp, c, bs)
    R = G.rows_per_batch(xp, c, work, rows)
    hinv = prep.Hinv.astype(work)
    order = xp.empty((rows, nb), dtype=xp.int64)
    losses = xp.empty((rows, nb), dtype=xp.float64)
    cap = G.cap(work)
    eye = xp.eye(bs, dtype=work)

    def batch(rr: slice, ws: G.Workspace) -> None:
        n = rr.stop - rr.start
        tr = G.Trace(ws, prep.w[rr], xp.broadcast_to(xp.arange(c), (n, c)), hinv)
        D = tr.block_diag(bs)
        for t in range(nb):
            nbc = tr.K // bs
            sc = G.block_quadratic(xp, D, tr.w.reshape(n, nbc, bs))
            sc = xp.fmin(sc, cap) + tr.pen[:, ::bs]
            j = xp.argmin(sc, axis=1)
            order[rr, t] = tr.cols[tr.ar, j * bs] // bs
            before = tr.flushes
            losses[rr, t] = tr.fix_block(j, bs)
            if tr.flushes != before:
                D = tr.block_diag(bs)
            else:
                V = tr.U[:, tr.k - bs: tr.k, :].reshape(n, bs, nbc, bs)
                D -= xp.einsum("rtni,rtnj->rnij", V, V)
                D[tr.ar, j] = eye

    with blas_threads(1):
        G.run_batches(xp, list(row_batches(rows, R)), batch, ([(R, c)], nbuf, work))
    return order, losses


def prune_blocks(w: Any, H: Any, block_size: int, sparsity: float, *, damp: float = 0.01, name: str = "layer",
                 dtype: str = "float32") -> EngineResult:
    """Block sparsity (sec. 2): zeros in blocks of ``block_size`` consecutive columns of a row.

    Greedy block OBS per row (score 1/2 w_B^T (Hinv_BB)^-1 w_B), then the round(sparsity * rows * C / bs)
    cheapest block steps of the layer are kept (global selection as in sec. 1) and each row's weights are
    the optimum for its removed blocks.
    """
    bs = int(block_size)
    if bs < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")
    return global_prune([w], [H], sparsity, bs, damp=damp, name=name, dtype=dtype)[0]
