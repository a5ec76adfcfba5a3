"""Naive reference implementations of the engine's algorithms (ALGORITHMS.md sec. 0-3), by the letter.

They re-invert the Hessian restricted to the free weights at every step (no delayed updates, no compaction,
no batching), in float64, one row at a time: far too slow for real layers, and exactly what the fast engine
(and any future fast mode) must reproduce on tiny ones. The tests and ``tools/bench_engine.py`` check against
them.
"""
from __future__ import annotations

import numpy as np

from .grid import fit_grid

DAMP = 0.01


def damped(H: np.ndarray, w: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Sec. 0 by the letter: dead inputs, then relative damping (float64)."""
    H = H.copy()
    w = w.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    return H + damp * np.mean(np.diag(H)) * np.eye(len(H)), w


def naive_obs(Hd: np.ndarray, w: np.ndarray, allowed=None, steps: int | None = None):
    """Greedy OBS on one row, re-inverting H_FF at every step. ``allowed(pruned, j)`` may forbid a weight."""
    c = len(w)
    w = w.copy()
    free = np.ones(c, bool)
    order, losses, states = [], [], [w.copy()]
    for _ in range(c if steps is None else steps):
        F = np.nonzero(free)[0]
        Hi = np.linalg.inv(Hd[np.ix_(F, F)])
        sc = w[F] ** 2 / np.diag(Hi)
        if allowed is not None:
            sc = np.where([allowed(~free, j) for j in F], sc, np.inf)
        i = int(np.argmin(sc))
        q = F[i]
        order.append(q)
        losses.append(sc[i] / 2)
        w[F] -= w[q] / Hi[i, i] * Hi[i]
        w[q] = 0.0
        free[q] = False
        states.append(w.copy())
    return np.array(order), np.array(losses), states


def naive_blocks(Hd: np.ndarray, w: np.ndarray, bs: int):
    """Greedy block OBS on one row (sec. 2), re-inverting H_FF at every step."""
    c = len(w)
    w = w.copy()
    free = np.ones(c // bs, bool)
    order, losses, states = [], [], [w.copy()]
    for _ in range(c // bs):
        F = np.nonzero(np.repeat(free, bs))[0]
        Hi = np.linalg.inv(Hd[np.ix_(F, F)])
        wf = w[F]
        best = None
        for bi, b in enumerate(np.nonzero(free)[0]):
            loc = np.arange(bi * bs, bi * bs + bs)
            sc = 0.5 * wf[loc] @ np.linalg.solve(Hi[np.ix_(loc, loc)], wf[loc])
            if best is None or sc < best[0]:
                best = (sc, b, loc)
        sc, b, loc = best
        coef = np.linalg.solve(Hi[np.ix_(loc, loc)], wf[loc])
        w[F] = wf - coef @ Hi[loc]
        w[b * bs:(b + 1) * bs] = 0.0
        free[b] = False
        order.append(b)
        losses.append(sc)
        states.append(w.copy())
    return np.array(order), np.array(losses), states


def naive_obq(Hd: np.ndarray, w: np.ndarray, s, z, maxq: int, kept: np.ndarray | None = None):
    """Greedy OBQ on one row with the outlier rule (sec. 3); masked weights frozen at 0 and out of H.

    ``s`` and ``z``: the row's scale and zero point, scalars or one per column (group-wise grids)."""
    c = len(w)
    w = w.copy()
    s = np.broadcast_to(np.asarray(s, np.float64), (c,))
    z = np.broadcast_to(np.asarray(z, np.float64), (c,))
    fixed = np.zeros(c, bool) if kept is None else ~kept
    w[fixed] = 0.0
    order, losses = [], []
    while not fixed.all():
        F = np.nonzero(~fixed)[0]
        Hi = np.linalg.inv(Hd[np.ix_(F, F)])
        wf = w[F]
        sf, zf = s[F], z[F]
        qv = sf * (np.clip(np.rint(wf / sf) + zf, 0, maxq) - zf)
        e2 = (wf - qv) ** 2
        i = int(np.argmax(e2)) if np.any(e2 > 0.25 * sf * sf) else int(np.argmin(e2 / np.diag(Hi)))
        q = F[i]
        order.append(q)
        losses.append(e2[i] / Hi[i, i] / 2)
        w[F] -= (wf[i] - qv[i]) / Hi[i, i] * Hi[i]
        w[q] = qv[i]
        fixed[q] = True
    return np.array(order), np.array(losses), w


def global_states(traces, k: int):
    """Sec. 1 global selection over naive traces: (final weights, total loss)."""
    L = np.array([t[1] for t in traces])
    rows, steps = L.shape
    counts = np.bincount(np.argsort(L.ravel(), kind="stable")[:k] // steps, minlength=rows)
    W = np.array([traces[r][2][counts[r]] for r in range(rows)])
    return W, sum(L[r, :counts[r]].sum() for r in range(rows))


def naive_group_grid(w: np.ndarray, bits: int, gs: int, *, sym: bool = False, method: str = "minmax",
                     mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-group loop: every group of ``gs`` columns (the last may be partial) fitted as a matrix of its own."""
    c = w.shape[1]
    scales, zeros = [], []
    for j0 in range(0, c, gs):
        sl = slice(j0, min(j0 + gs, c))
        g = fit_grid(w[:, sl], bits, sym=sym, method=method, mask=None if mask is None else mask[:, sl])
        scales.append(g.scale)
        zeros.append(g.zero_point)
    return np.stack(scales, axis=1), np.stack(zeros, axis=1)


def naive_minmax_params(x: np.ndarray, bits: int, sym: bool) -> tuple[float, float]:
    """Sec. 3 by the letter for one group: range including 0, scale = range / maxq, z = round(-min / s)."""
    maxq = 2 ** bits - 1
    lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    if sym:
        hi = max(-lo, hi)
        lo = -hi
    if hi == lo:
        lo, hi = -1.0, 1.0
    s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(maxq))
    z = float((maxq + 1) // 2) if sym else float(np.rint(-np.float32(lo) / s))
    return float(s), z


def naive_fixed_order(Hd: np.ndarray, W: np.ndarray, *, order=None, s=None, z=None, maxq: int | None = None,
                      sparsity: float | None = None, nm: tuple[int, int] | None = None, blocksize: int = 128):
    """GPTQ / SparseGPT by the letter (sec. 6), float64, all rows at once, the inverse re-formed at every step.

    Columns are fixed one at a time in ``order`` (default: as stored). At step t, with F the columns not yet
    fixed (column order[t] first), Hi = (Hd_FF)^-1: err = (w_j - target_j) / Hi[j, j], w_F -= err Hi[j, F]
    (the OBS update), w_j = target_j. Targets: 0 for pruned weights, else the grid value on ``s``, ``z``
    (rows x C, per weight, original order) when given, else the weight itself. Masks (sec. 6): unstructured,
    at the start of each ``blocksize`` block, the block's share of round(sparsity * rows * C) smallest
    w^2 / Hi[j, j] (the OBS loss, with each column's Hi[j, j] at the time it is fixed) over the block's rows x columns; N:M,
    at every M-th column, the M - N smallest of each row's next M columns by the same score.
    Returns (weights, loss) with loss = sum of err^2 Hi[j, j] / 2.
    """
    W = W.astype(np.float64).copy()
    rows, c = W.shape
    order = np.arange(c) if order is None else np.asarray(order)
    pos = np.empty(c, int)
    pos[order] = np.arange(c)
    dj = np.empty(c)  # Hi[j, j] at the time column j is fixed
    for t in range(c):
        F = order[t:]
        dj[order[t]] = np.linalg.inv(Hd[np.ix_(F, F)])[0, 0]
    pruned = np.zeros((rows, c), bool)
    loss = 0.0
    for t in range(c):
        j = order[t]
        if sparsity is not None and t % blocksize == 0:
            t2 = min(t + blocksize, c)
            cols = order[t:t2]
            k = int(round(sparsity * rows * t2)) - int(round(sparsity * rows * t))
            sc = W[:, cols] ** 2 / dj[cols]
            pruned[:, cols] = False
            sel = np.argsort(sc.ravel(), kind="stable")[:k]
            blk = np.zeros(sc.size, bool)
            blk[sel] = True
            pruned[:, cols] = blk.reshape(sc.shape)
        if nm is not None and t % nm[1] == 0:
            cols = order[t:t + nm[1]]
            sc = W[:, cols] ** 2 / dj[cols]
            drop = np.argsort(sc, axis=1, kind="stable")[:, : nm[1] - nm[0]]
            for r in range(rows):
                pruned[r, cols[drop[r]]] = True
        F = order[t:]
        Hi = np.linalg.inv(Hd[np.ix_(F, F)])
        w = W[:, j]
        if s is not None:
            tgt = s[:, j] * (np.clip(np.rint(w / s[:, j]) + z[:, j], 0, maxq) - z[:, j])
        else:
            tgt = w.copy()
        tgt = np.where(pruned[:, j], 0.0, tgt)
        err = (w - tgt) / Hi[0, 0]
        loss += float(np.sum(err ** 2) * Hi[0, 0] / 2)
        W[:, F] -= err[:, None] * Hi[0][None, :]
        W[:, j] = tgt
    return W, loss
