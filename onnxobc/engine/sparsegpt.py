"""SparseGPT's mask selection (ALGORITHMS.md sec. 6); the loop that uses it is :func:`.gptq.fast_obs`.

A weight's pruning score is w^2 / U_ii^2 (U: upper Cholesky factor of the inverse Hessian of the columns not
yet fixed, so U_ii^2 is the OBS denominator [Hinv]_ii at the time column i is fixed): the OBS loss of zeroing
it, with the weights as updated by the errors of all earlier columns.

- Unstructured: at the start of each block of columns, the ``k`` smallest scores over the whole block (all
  rows, all matrices of a grouped layer) are pruned; ``k`` is the block's share of the layer's zero count, so
  the layer's sparsity is exact. This is SparseGPT's per-block mask and differs from the exact engine's
  ``--method exact``, whose mask is global over the whole layer (sec. 1): here a block of columns always keeps
  about the layer's density, there any column may lose more or fewer weights than another.
- N:M: at the first column of every group of M, the M - N smallest scores of each row's group are pruned,
  with the weights updated up to that column.

Ties are broken by position (stable sorts), so masks are deterministic.
"""
from __future__ import annotations

from typing import Any

from ..backend import xp_of

__all__ = ["block_mask", "nm_mask"]


def block_mask(W1: Any, d1: Any, k: int) -> Any:
    """Bool mask (True = prune) of the ``k`` smallest W1^2 / d1^2 over a block (G, rows, nb); d1: (G, nb)."""
    xp = xp_of(W1)
    if k <= 0:
        return xp.zeros(W1.shape, dtype=bool)
    flat = ((W1.astype(xp.float64) / d1.astype(xp.float64)[:, None, :]) ** 2).ravel()
    if k >= flat.size:
        return xp.ones(W1.shape, dtype=bool)
    # the k smallest, ties by position: exactly the first k of a stable argsort, with a partition (O(n))
    kth = xp.partition(flat, k - 1)[k - 1]
    sel = flat < kth
    need = k - int(sel.sum())
    sel[xp.nonzero(flat == kth)[0][:need]] = True
    return sel.reshape(W1.shape)


def nm_mask(Wg: Any, dg: Any, n: int) -> Any:
    """Bool mask (True = prune) of the M - ``n`` smallest scores of each row's group (G, rows, M); dg: (G, M)."""
    xp = xp_of(Wg)
    m = Wg.shape[2]
    score = (Wg.astype(xp.float64) / dg.astype(xp.float64)[:, None, :]) ** 2
    drop = xp.argsort(score, axis=2, kind="stable")[:, :, : m - n]
    mask = xp.zeros(Wg.shape, dtype=bool)
    xp.put_along_axis(mask, drop, True, axis=2)
    return mask
