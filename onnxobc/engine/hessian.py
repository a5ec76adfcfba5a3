"""Hessian preparation and the closed-form linear algebra around it (ALGORITHMS.md sec. 0).

Everything here runs in float64: the inverse Hessian seeds every greedy loop, so its errors would be
inherited by every decision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy, xp_of
from ..errors import NumericalError
from ._blas import blas_threads
from ._greedy import run_batches

# Bytes of float64 workspace one batch of per-row systems may use, and rows per batch at most (small
# batches let the worker threads share the work of a small layer).
_SOLVE_BUDGET = 128 << 20
_SOLVE_ROWS = 16


@dataclass
class Prepared:
    """A layer's Hessian after dead-input handling and damping.

    ``H`` is the damped Hessian, ``Hinv`` its inverse (both float64, C x C), ``w`` the weights with the
    columns of dead inputs zeroed, ``dead`` the bool mask of dead inputs and ``damp`` the relative damping
    actually used.
    """

    H: Any
    Hinv: Any
    w: Any
    dead: Any
    damp: float


def _linalg_error(xp: Any) -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ArithmeticError]
    la = getattr(xp.linalg, "LinAlgError", None)
    if isinstance(la, type):
        errs.append(la)
    errs.append(np.linalg.LinAlgError)
    return tuple(errs)


def dead_inputs(xp: Any, H: Any, w: Any, name: str) -> tuple[Any, Any, Any, float]:
    """Sec. 0, before damping: a float64 copy of H with H_jj = 1 for dead inputs (H_jj = 0), a copy of w with
    their columns zeroed, the dead mask and mean(diag H); NumericalError for a non-finite or impossible H."""
    c = H.shape[0]
    H = xp.array(H, dtype=xp.float64, copy=True)
    if not bool(xp.all(xp.isfinite(H))):
        raise NumericalError(
            f"{name}: the Hessian ({c} x {c}) has NaN or infinite entries; the calibration activations overflowed "
            "or contain NaN - check the calibration data and the model's outputs on it")
    dead = xp.diagonal(H) == 0
    dead_idx = xp.nonzero(dead)[0]
    H[dead_idx, dead_idx] = 1.0
    w = xp.array(w, copy=True)
    w[:, dead_idx] = 0
    mean_diag = float(xp.mean(xp.diagonal(H)))
    if not mean_diag > 0:
        raise NumericalError(
            f"{name}: the Hessian's mean diagonal is {mean_diag:g} (<= 0), so it cannot come from real inputs "
            "(H = 2 X X^T / n has a non-negative diagonal); check how it was accumulated")
    return H, w, dead, mean_diag


def prepare(H: Any, w: Any, damp: float = 0.01, *, name: str = "layer", max_tries: int = 5) -> Prepared:
    """Dead inputs, relative damping with escalation, Cholesky-checked inversion (sec. 0).

    Dead inputs (H_jj == 0) never contribute to the output: H_jj = 1 and W[:, j] = 0 make the problem
    well posed without changing the objective. Damping adds ``damp * mean(diag H)`` to the diagonal; when
    the Cholesky factorisation fails (H not positive definite: too little calibration data, exact
    collinearity, or a numerically indefinite accumulation) the damping is multiplied by 10, up to
    ``max_tries`` attempts in all, and then a :class:`NumericalError` names the layer. No silent fallback.
    """
    xp = xp_of(H, w)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name}: Hessian must be square C x C, got shape {tuple(H.shape)}")
    if w.ndim != 2 or w.shape[1] != H.shape[0]:
        raise ValueError(f"{name}: weight must be rows x C with C={H.shape[0]}, got shape {tuple(w.shape)}")
    if not damp > 0:
        raise ValueError(f"{name}: damp must be > 0, got {damp}")
    if max_tries < 1:
        raise ValueError(f"{name}: max_tries must be >= 1, got {max_tries}")
    H, w, dead, mean_diag = dead_inputs(xp, H, w, name)
    errors = _linalg_error(xp)
    # one large factorisation and inverse: the BLAS's own threads are used here
    return _damped_inverse(xp, H, w, dead, float(damp), mean_diag, errors, name, damp, max_tries)


def _damped_inverse(xp: Any, H: Any, w: Any, dead: Any, lam: float, mean_diag: float, errors: Any, name: str,
                    damp: float, max_tries: int) -> Prepared:
    c = H.shape[0]
    diag_idx = xp.arange(c)
    for _ in range(max_tries):
        Hd = H.copy()
        Hd[diag_idx, diag_idx] += lam * mean_diag
        try:
            L = xp.linalg.cholesky(Hd)
            ok = bool(xp.all(xp.isfinite(L))) and bool(xp.all(xp.diagonal(L) > 0))
            if ok:  # CuPy may return a partial factor instead of raising: check it reproduces Hd
                resid = float(xp.max(xp.abs(L @ L.T - Hd))) / float(xp.max(xp.abs(Hd)))
                ok = resid < 1e-8
        except errors:  # NumPy raises on a failed factorisation
            ok = False
        if ok:
            Hinv = xp.linalg.inv(Hd)
            Hinv = (Hinv + Hinv.T) * 0.5
            if bool(xp.all(xp.isfinite(Hinv))) and bool(xp.all(xp.diagonal(Hinv) > 0)):
                return Prepared(Hd, Hinv, w, dead, lam)
        lam *= 10.0
    raise NumericalError(
        f"{name}: the Hessian ({c} x {c}) is not positive definite even with damping {lam / 10:g} "
        f"(tried {max_tries} levels from {damp:g}); raise --damp or use more calibration data")


def prepare_hessian(H: Any, w: Any, damp: float = 0.01, *, name: str = "layer",
                    max_tries: int = 5) -> tuple[Any, Any, Any, float]:
    """Public form of :func:`prepare`: returns ``(Hinv, w, dead_mask, damp_used)``."""
    p = prepare(H, w, damp, name=name, max_tries=max_tries)
    return p.Hinv, p.w, p.dead, p.damp


def _batches(sizes: Any, per_row_bytes: Any, budget: int = _SOLVE_BUDGET) -> list[Any]:
    """Split row indices (already sorted by decreasing size) into batches whose workspace fits ``budget``."""
    out, start, n = [], 0, len(sizes)
    while start < n:
        cap = max(1, min(_SOLVE_ROWS, int(budget // max(int(per_row_bytes[start]), 1))))
        out.append(slice(start, min(n, start + cap)))
        start += cap
    return out


def _gather_sym(xp: Any, M: Any, idx: Any, real: Any) -> Any:
    """Per-row principal submatrices M[idx_r, idx_r] (R x K x K, float64), identity where ``real`` is False.

    ``real`` must be a prefix mask per row (real entries first). The identity padding lets rows with fewer
    real entries share one batched solve: padded unknowns are decoupled from the real ones and have a zero
    right-hand side.
    """
    R, K = idx.shape
    counts = real.sum(axis=1)
    if xp is np:  # per-row takes: contiguous row copies, far faster than 3-D fancy indexing on a CPU
        sub = np.empty((R, K, K), dtype=M.dtype)
        rows = np.empty((K, M.shape[1]), dtype=M.dtype)
        for r in range(R):
            np.take(M, idx[r], axis=0, out=rows, mode="clip")
            np.take(rows, idx[r], axis=1, out=sub[r], mode="clip")
            n = int(counts[r])
            if n < K:
                sub[r, n:, :] = 0
                sub[r, :, n:] = 0
                sub[r, np.arange(n, K), np.arange(n, K)] = 1
        return sub
    sub = M[idx[:, :, None], idx[:, None, :]]
    both = real[:, :, None] & real[:, None, :]
    sub = xp.where(both, sub, 0.0)
    ar = xp.arange(K)
    sub[:, ar, ar] = xp.where(real, sub[:, ar, ar], 1.0)
    return sub


def masked_inverses(prep: Prepared, mask: Any, rows: Any) -> tuple[Any, Any, Any]:
    """Inverse of H restricted to each row's kept columns, for the rows ``rows`` (sec. 3, compound).

    Returns ``(inv, idx, real)``: ``idx`` (R x K) lists each row's kept columns in increasing order followed by
    some of its masked columns as padding (K = largest kept count among these rows), ``real`` marks the kept
    ones, and ``inv`` (R x K x K, float64) is (H_FF)^-1 on the real part and the identity on the padding.
    """
    xp = xp_of(prep.H)
    m = mask[rows]
    counts = m.sum(axis=1)
    K = int(counts.max()) if m.shape[0] else 0
    K = max(K, 1)
    idx = xp.argsort(~m, axis=1, kind="stable")[:, :K]
    real = xp.arange(K)[None, :] < counts[:, None]
    sub = _gather_sym(xp, prep.H, idx, real)
    inv = xp.linalg.inv(sub)
    inv = (inv + inv.transpose(0, 2, 1)) * 0.5
    return inv, idx, real


def reconstruct(prep: Prepared, pruned: Any) -> Any:
    """Optimal weights (float64) of every row given its set of pruned columns (sec. 1, global mask).

    A sequence of OBS removals ends exactly at the least-squares optimum for the union of the removed
    weights: w'_S = 0 and w'_F = w_F + (H_FF)^-1 H_FS w_S, equivalently w' = w - Hinv[:, S] (Hinv_SS)^-1 w_S.
    So the state a row reaches after c_r greedy steps is recomputed here from its first c_r choices with one
    solve of size min(|S|, |F|), instead of re-running c_r steps or storing every intermediate state.
    """
    xp = xp_of(prep.H)
    w = xp.asarray(prep.w, dtype=xp.float64)
    rows, c = w.shape
    out = xp.where(pruned, 0.0, w)
    ns = pruned.sum(axis=1)
    todo = xp.nonzero((ns > 0) & (ns < c))[0]
    if int(todo.size) == 0:
        return out
    ns_h = to_numpy(ns[todo]).astype(np.int64)  # host-side bookkeeping of the batch shapes
    small = np.minimum(ns_h, c - ns_h)
    order = np.argsort(-small, kind="stable")
    todo_sorted = todo[xp.asarray(order)]
    per_row = (small[order].astype(np.int64) ** 2 + small[order].astype(np.int64) * c) * 8
    ns_sorted = ns_h[order]

    def batch(sl: slice, _ws: Any) -> None:
        r = todo_sorted[sl]
        P = pruned[r]
        nsb = ns_sorted[sl]
        Ks, Kf = int(nsb.max()), int((c - nsb).max())
        if Ks <= Kf:
            # S-form: z = (Hinv_SS)^-1 w_S, w' = w - Hinv[:, S] z
            idx = xp.argsort(~P, axis=1, kind="stable")[:, :Ks]
            real = xp.arange(Ks)[None, :] < P.sum(axis=1)[:, None]
            M = _gather_sym(xp, prep.Hinv, idx, real)
            rhs = xp.where(real, xp.take_along_axis(w[r], idx, axis=1), 0.0)
            z = xp.linalg.solve(M, rhs[:, :, None])[:, :, 0]
            zf = xp.zeros((idx.shape[0], c), dtype=xp.float64)
            zf[xp.arange(idx.shape[0])[:, None], idx] = xp.where(real, z, 0.0)
            dw = zf @ prep.Hinv  # = sum_j z_j Hinv[S_j, :], as one product for the whole batch
            out[r] = xp.where(P, 0.0, w[r] - dw)
        else:
            # F-form: w'_F = w_F + (H_FF)^-1 (H w_S)_F
            idx = xp.argsort(P, axis=1, kind="stable")[:, :Kf]
            real = xp.arange(Kf)[None, :] < (c - P.sum(axis=1))[:, None]
            M = _gather_sym(xp, prep.H, idx, real)
            g = xp.matmul(xp.where(P, w[r], 0.0), prep.H)
            rhs = xp.where(real, xp.take_along_axis(g, idx, axis=1), 0.0)
            z = xp.linalg.solve(M, rhs[:, :, None])[:, :, 0]
            new = xp.where(P, 0.0, w[r])
            cur = xp.take_along_axis(new, idx, axis=1)
            new[xp.arange(new.shape[0])[:, None], idx] = xp.where(real, cur + z, cur)
            out[r] = new

    with blas_threads(1):
        run_batches(xp, _batches(small[order], per_row), batch)
    return out
