"""Delayed-update greedy OBS over a batch of rows (ALGORITHMS.md sec. 4).

Every exact greedy method (ExactOBS, N:M, block OBS, OBQ) is the same loop per row: pick a free weight (or a
block of weights), fix it at a target value (0 when pruning, a grid point when quantizing), compensate the
remaining free weights with the row of the current inverse Hessian, and remove that weight's row and column
from the inverse Hessian (sec. 0):

    dw = -((w_q - target) / Hinv_qq) Hinv[q, :],   loss = (w_q - target)^2 / (2 Hinv_qq),
    Hinv <- Hinv - Hinv[:, q] Hinv[q, :] / Hinv_qq.

Applied naively, the last line rewrites C x C numbers per step and per row (memory bound). Here it is delayed
(sec. 4): each row keeps a *base* matrix and the last k <= b update vectors u_t = Hinv[q_t, :] / sqrt(Hinv_qq),
so the current row q is ``base[q, :] - U[:, q]^T U`` (O(C b)) and the diagonal, which is all the scores need,
is updated incrementally (``d -= u^2``). Every b steps ``base -= U^T U`` is applied as one matrix product per
row. Flushes also *compact* the batch: the fixed columns are dropped from every array, so later products
shrink with the number of free weights (a full trace costs about 2/3 C^3 instead of 2 C^3 flops per row).
All rows of a batch fix the same number of columns per step, so the compacted arrays stay rectangular. On
a CPU a compaction costs about as much as a flush's product, so it waits until COMPACT_FRACTION of the
columns are stale (fixed columns are inert meanwhile: their rows of the inverse Hessian are zero).

Per step the whole row batch is handled with vectorised fancy indexing; Python loops run per step and, in
the flush, per row (O(C / b) times per row), never per row inside a step. On a CPU, independent row batches
run on a few threads (NumPy releases the GIL in its kernels) with single-threaded BLAS each.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import NumericalError

# b: update vectors kept before a flush (sec. 4). Per step the current row costs O(C b); a flush costs a
# rank-b product whose efficiency grows with b. None = chosen per layer by ``nbuf_for`` (tests pin it).
NBUF: int | None = None
# Rows per batch (at most) and bytes for one copy of a batch's inverse Hessians. On a CPU the batch should
# stay near cache size (measured on 2 cores: about 48 MB per batch is best from 576 to 2304 columns, i.e.
# 32, 9 and 2 rows), while more rows amortise the per-step Python overhead of narrow layers. A GPU needs
# large batches to fill the device.
MAX_ROWS = {"cpu": 32, "gpu": 1024}
BATCH_BYTES = {"cpu": 48 << 20, "gpu": 8 << 30}
# On a CPU, compaction (two gathers per row) costs about as much as a flush's product, so fixed columns are
# dropped only once they make up this fraction of the batch's columns.
COMPACT_FRACTION = 0.2


def working_dtype(dtype: Any) -> np.dtype:
    """The loop precision ('float32' or 'float64')."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt


def rows_per_batch(xp: Any, K: int, dtype: np.dtype, rows: int) -> int:
    """How many rows share a batch: as many as fit ``BATCH_BYTES`` (at most ``MAX_ROWS``, at least 1).

    On a GPU the budget is also capped at 1/6 of the free device memory: a compacting flush holds about four
    copies of the batch's matrices at once.
    """
    dev = "cpu" if is_numpy(xp) else "gpu"
    budget = BATCH_BYTES[dev]
    if dev == "gpu":
        try:
            budget = min(budget, int(xp.cuda.Device().mem_info[0]) // 6)
        except Exception:  # pragma: no cover - exotic CuPy builds
            budget = min(budget, 1 << 30)
    per = max(K, 1) ** 2 * np.dtype(dtype).itemsize
    return int(max(1, min(rows, MAX_ROWS[dev], budget // per)))


def nbuf_for(xp: Any, K: int, multiple: int = 1) -> int:
    """The update-buffer length b for a batch of K columns, a multiple of ``multiple`` (the block size).

    Measured on a 2-core CPU: b = 64 is best up to ~1000 columns, 96-128 above (within 10%).
    """
    b = NBUF if NBUF is not None else (64 if (is_numpy(xp) and K < 1024) else 128)
    return multiple * max(1, b // multiple)


def is_numpy(xp: Any) -> bool:
    return xp is np


MAX_THREADS = 4  # worker threads over row batches on a CPU (the per-step Python work holds the GIL)


def n_workers(xp: Any, n_items: int) -> int:
    """Worker threads for ``n_items`` independent batches: the usable CPUs (at most MAX_THREADS), 1 on a GPU.

    ``ONNXOBC_THREADS`` overrides. Each worker runs BLAS single-threaded (see _blas.py): independent batches
    on independent threads have no synchronisation points, so a busy neighbour slows them down instead of
    stalling every product as a multi-threaded BLAS does.
    """
    if not is_numpy(xp) or n_items <= 1:
        return 1
    env = os.environ.get("ONNXOBC_THREADS")
    if env:
        try:
            return max(1, min(int(env), n_items))
        except ValueError:
            pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_THREADS, n_items))


def run_batches(xp: Any, items: Sequence[Any], body: Callable[[Any, Any], None],
                ws_args: tuple[Any, int, np.dtype] | None = None) -> None:
    """Call ``body(item, workspace)`` for every item (row batch), in a thread pool on a CPU.

    ``ws_args = (shapes, nbuf, dtype)`` gives each thread its own :class:`Workspace` (None: no workspace).
    Items must write disjoint outputs; the result never depends on the number of threads, because the
    batches themselves do not.
    """
    def make_ws() -> Any:
        return None if ws_args is None else Workspace(xp, *ws_args)

    workers = n_workers(xp, len(items))
    if workers == 1:
        ws = make_ws()
        for it in items:
            body(it, ws)
        return
    local = threading.local()

    def task(it: Any) -> None:
        if not hasattr(local, "ws"):
            local.ws = make_ws()
        body(it, local.ws)

    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(task, it) for it in items]
        for f in futures:
            f.result()


class Clock:
    """Wall-clock seconds per phase, for ``EngineResult.info['seconds']`` (synchronises a GPU at each lap)."""

    def __init__(self, xp: Any):
        self.xp = xp
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        if not is_numpy(self.xp):
            self.xp.cuda.Stream.null.synchronize()
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.t, 4)
        self.t = now


class Workspace:
    """Buffers reused across batches and flushes.

    With NumPy, large fresh allocations are page-faulted in on every use (glibc maps them anew), which cost
    as much as the arithmetic; two ping-pong buffers for the batch's base matrices and per-row temporaries
    avoid that. CuPy's memory pool already recycles device memory, so there plain allocation is used.
    """

    def __init__(self, xp: Any, shapes: Any, nbuf: int, dtype: np.dtype):
        """``shapes``: the (R, K) batch shapes this workspace will serve (it is sized for the largest)."""
        self.xp, self.dtype, self.nbuf = xp, dtype, nbuf
        shapes = list(shapes)
        if is_numpy(xp):
            nb = max(r * k * k for r, k in shapes)
            nu = max(r * nbuf * k for r, k in shapes)
            kk = max(k for _, k in shapes) ** 2
            self._bufs = [np.empty(nb, dtype), np.empty(nb, dtype)]
            self._u = np.empty(nu, dtype)
            self.rowbuf = np.empty(kk, dtype)
            self.tmp = np.empty(kk, dtype)
            self._cur = 0

    def base(self, R: int, K: int) -> Any:
        """A fresh (R, K, K) array for a batch's base matrices."""
        if is_numpy(self.xp):
            assert R * K * K <= self._bufs[0].size
            self._cur = 0
            return self._bufs[0][: R * K * K].reshape(R, K, K)
        return self.xp.empty((R, K, K), self.dtype)

    def other(self, R: int, K: int) -> Any:
        """The buffer not holding the current base (NumPy), as (R, K, K); flips the roles."""
        self._cur ^= 1
        return self._bufs[self._cur][: R * K * K].reshape(R, K, K)

    def ubuf(self, R: int, K: int) -> Any:
        if is_numpy(self.xp):
            return self._u[: R * self.nbuf * K].reshape(R, self.nbuf, K)
        return self.xp.empty((R, self.nbuf, K), self.dtype)


class Trace:
    """The greedy state of a batch of R rows over K local columns (see module docstring).

    ``cols`` maps local to global column indices; ``pen`` marks fixed columns (+inf); ``aux`` holds extra
    per-column arrays (R x K) that must follow the compaction (N:M group ids...).
    """

    def __init__(self, ws: Workspace, w: Any, cols: Any, hinv: Any):
        xp = self.xp = ws.xp
        self.ws = ws
        R, K = w.shape
        self.R, self.K = R, K
        self.dtype = ws.dtype
        self.ar = xp.arange(R)
        self.base = ws.base(R, K)
        self.base[...] = hinv  # hinv is (K, K) shared or (R, K, K) per row
        self.w = xp.array(w, dtype=self.dtype, copy=True)
        self.cols = xp.array(cols, copy=True)
        # pen: 0 = free and selectable, finite (>= 2 cap) = free but chosen only after every selectable
        # weight (padding, blocked N:M groups), +inf = fixed. Scores are w^2/d (<= cap) + pen.
        self.pen = xp.zeros((R, K), dtype=self.dtype)
        self.d = xp.diagonal(self.base, axis1=1, axis2=2).copy()
        self.U = ws.ubuf(R, K)
        self.k = 0
        self.stale = 0
        self.flushes = 0
        self.aux: dict[str, Any] = {}
        self.tiny = float(np.finfo(self.dtype).tiny)
        self.cap = cap(self.dtype)

    # ----------------------------------------------------------------------------------------- rank-1 steps
    def row(self, q: Any) -> Any:
        """Current inverse-Hessian rows Hinv[q_r, :] of every row (R x K): base row minus the pending updates."""
        h = self.base[self.ar, q]
        if self.k:
            c = self.U[self.ar, : self.k, q]  # (R, k): u_t[q] of every pending update
            h -= self.xp.matmul(c[:, None, :], self.U[:, : self.k, :])[:, 0, :]
        return h

    def fix(self, q: Any, target: Any = None) -> Any:
        """Fix column q_r of every row r at ``target`` (0 when None); returns e / sqrt(Hinv_qq) (R,).

        Sec. 0: loss = e^2 / (2 Hinv_qq) with e = w_q - target, w -= (e / Hinv_qq) Hinv[q, :], and the
        rank-1 downdate of Hinv recorded as u = Hinv[q, :] / sqrt(Hinv_qq) (sec. 4), so that
        w -= (e / sqrt(Hinv_qq)) u and diag(Hinv) -= u^2. The caller records the returned value and squares
        it later (loss = value^2 / 2) for all steps at once: two array operations fewer per step.
        """
        xp, ar = self.xp, self.ar
        h = self.row(q)
        rs = h[ar, q]
        xp.maximum(rs, self.tiny, out=rs)
        xp.sqrt(rs, out=rs)
        xp.divide(1.0, rs, out=rs)  # 1 / sqrt(Hinv_qq)
        e = self.w[ar, q]
        if target is not None:
            e -= target
        e *= rs  # e / sqrt(Hinv_qq)
        u = self.U[:, self.k, :]
        xp.multiply(h, rs[:, None], out=u)
        h = xp.multiply(u, e[:, None], out=h)
        self.w -= h  # w_q itself becomes target up to rounding; fixed columns are only read through pen
        self.d -= xp.multiply(u, u, out=h)
        xp.maximum(self.d, self.tiny, out=self.d)  # guard: scores divide by d
        self.pen[ar, q] = xp.inf
        self.k += 1
        if self.k == self.ws.nbuf:
            self.flush()
        return e

    def scores(self, e2: Any = None) -> Any:
        """e^2 / Hinv_qq + pen for every local column, e = w (pruning) or the rounding error ``e2`` = e^2."""
        xp = self.xp
        s = self.w * self.w if e2 is None else e2 / self.d
        if e2 is None:
            s /= self.d
        xp.fmin(s, self.cap, out=s)  # fmin: a NaN (0/0 on a fixed column) never wins the argmin
        s += self.pen
        return s

    # ------------------------------------------------------------------------------------------ block steps
    def fix_block(self, j: Any, bs: int) -> Any:
        """Zero local block j_r (columns j_r*bs ... j_r*bs+bs-1) of every row r; returns losses (R,), float64.

        Sec. 2: with M = Hinv_BB = L L^T and V = L^-1 Hinv[B, :], y = L^-1 w_B:
        loss = |y|^2 / 2, w -= y^T V (= (w_B^T M^-1) Hinv[B, :]) and Hinv -= V^T V (a rank-bs downdate,
        delayed exactly like the rank-1 case: V's rows join U).
        """
        xp, ar = self.xp, self.ar
        B = j[:, None] * bs + xp.arange(bs)[None, :]
        HB = self.base[ar[:, None], B]  # (R, bs, K)
        if self.k:
            c = self.U[ar[:, None], : self.k, B]  # (R, bs, k)
            HB -= xp.matmul(c, self.U[:, : self.k, :])
        M = xp.take_along_axis(HB, B[:, None, :], axis=2)
        M = (M + M.transpose(0, 2, 1)) * 0.5
        try:
            L = xp.linalg.cholesky(M)
        except np.linalg.LinAlgError as e:  # pragma: no cover - needs a broken inverse
            raise NumericalError("block OBS: a diagonal block of the inverse Hessian is not positive definite; "
                                 "raise the damping or use dtype='float64'") from e
        wB = xp.take_along_axis(self.w, B, axis=1)
        V = xp.linalg.solve(L, HB)
        y = xp.linalg.solve(L, wB[:, :, None])[:, :, 0]
        loss = 0.5 * xp.sum(y.astype(np.float64) ** 2, axis=1)
        self.w -= xp.matmul(y[:, None, :], V)[:, 0, :]
        self.w[ar[:, None], B] = 0
        self.U[:, self.k: self.k + bs, :] = V
        self.pen[ar[:, None], B] = xp.inf
        self.k += bs
        if self.k + bs > self.ws.nbuf:
            self.flush()
        return loss

    # ---------------------------------------------------------------------------------------------- flush
    def flush(self) -> None:
        """Apply the pending downdates (base -= U^T U); drop the fixed columns (compaction) when enough of
        them have accumulated (always on a GPU, where the gathers are cheap)."""
        xp = self.xp
        k = self.k
        if k == 0:
            return
        R, K = self.R, self.K
        self.stale += k  # fixed columns still present in the arrays (the same count in every row)
        numpy = is_numpy(xp)
        if numpy and self.stale < COMPACT_FRACTION * K:
            U = self.U[:, :k, :]
            tmp = self.ws.tmp[: K * K].reshape(K, K)
            for r in range(R):  # in place, one rank-k product per row; fixed columns ride along (zero rows)
                np.matmul(np.ascontiguousarray(U[r].T), U[r], out=tmp)
                self.base[r] -= tmp
            self._after_flush()
            return
        Kn = K - self.stale
        idx = xp.nonzero(self.pen != xp.inf)[1].reshape(R, Kn)
        Uc = xp.take_along_axis(self.U[:, :k, :], idx[:, None, :], axis=2)  # (R, k, Kn)
        if numpy:
            ws = self.ws
            dst = ws.other(R, Kn)
            rows = ws.rowbuf[: Kn * K].reshape(Kn, K)
            tmp = ws.tmp[: Kn * Kn].reshape(Kn, Kn)
            for r in range(R):  # per row: gather the surviving block, then one rank-k product (cache sized)
                ir = idx[r]
                np.take(self.base[r], ir, axis=0, out=rows, mode="clip")
                np.take(rows, ir, axis=1, out=dst[r], mode="clip")
                np.matmul(np.ascontiguousarray(Uc[r].T), Uc[r], out=tmp)  # both operands contiguous: faster
                dst[r] -= tmp
        else:
            dst = xp.take_along_axis(xp.take_along_axis(self.base, idx[:, :, None], axis=1), idx[:, None, :], axis=2)
            dst -= xp.matmul(Uc.transpose(0, 2, 1), Uc)
        self.base = dst
        self.w = xp.take_along_axis(self.w, idx, axis=1)
        self.cols = xp.take_along_axis(self.cols, idx, axis=1)
        for name, a in self.aux.items():
            self.aux[name] = xp.take_along_axis(a, idx, axis=1)
        self.pen = xp.take_along_axis(self.pen, idx, axis=1)
        self.K = Kn
        self.stale = 0
        self.U = self.ws.ubuf(R, Kn)
        self._after_flush()

    def _after_flush(self) -> None:
        xp = self.xp
        self.d = xp.diagonal(self.base, axis1=1, axis2=2).copy()  # fresh diagonal: no drift across flushes
        xp.maximum(self.d, self.tiny, out=self.d)
        self.k = 0
        self.flushes += 1

    # ------------------------------------------------------------------------------------------- results
    def scatter(self, C: int) -> Any:
        """The batch's current weights as R x C (global columns), fixed columns exactly 0."""
        xp = self.xp
        out = xp.zeros((self.R, C), dtype=self.dtype)
        out[self.ar[:, None], self.cols] = xp.where(self.pen != xp.inf, self.w, 0)
        return out

    def block_diag(self, bs: int) -> Any:
        """The bs x bs diagonal blocks of the current inverse Hessians, (R, K/bs, bs, bs)."""
        xp = self.xp
        R, K = self.R, self.K
        nb = K // bs
        D = xp.diagonal(self.base.reshape(R, nb, bs, nb, bs), axis1=1, axis2=3)  # (R, bs, bs, nb)
        D = xp.moveaxis(D, 3, 1).copy()
        if self.k:  # pending updates (only right after construction is k == 0 guaranteed)
            Ur = self.U[:, : self.k, :].reshape(R, self.k, nb, bs)
            D -= xp.einsum("rtni,rtnj->rnij", Ur, Ur)
        fixed = self.pen[:, ::bs] == xp.inf  # fixed blocks not compacted yet: identity keeps the solves finite
        D = xp.where(fixed[:, :, None, None], xp.eye(bs, dtype=D.dtype), D)
        return D


def cap(dtype: np.dtype) -> float:
    """Largest score a free weight may have: finite scores stay below fixed (+inf) and padding columns."""
    return float(np.finfo(dtype).max) / 8.0


def block_quadratic(xp: Any, D: Any, v: Any) -> Any:
    """v^T D^-1 v over leading dims for SPD D (..., bs, bs) and v (..., bs).

    Small blocks use an unrolled Cholesky (vectorised over all blocks of all rows, fast for bs <= 8);
    larger ones a batched solve.
    """
    bs = D.shape[-1]
    if bs > 8:
        z = xp.linalg.solve(D, v[..., None])[..., 0]
        return xp.sum(v * z, axis=-1)
    tiny = float(np.finfo(D.dtype).tiny)
    L: dict[tuple[int, int], Any] = {}
    y: list[Any] = []
    total = 0
    for j in range(bs):
        s = D[..., j, j]
        for p in range(j):
            s = s - L[j, p] * L[j, p]
        ljj = xp.sqrt(xp.fmax(s, tiny))
        for i in range(j + 1, bs):
            t = D[..., i, j]
            for p in range(j):
                t = t - L[i, p] * L[j, p]
            L[i, j] = t / ljj
        t = v[..., j]
        for p in range(j):
            t = t - L[j, p] * y[p]
        yj = t / ljj
        y.append(yj)
        total = total + yj * yj
    return total
