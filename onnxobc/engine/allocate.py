"""Choosing one variant per layer under a global budget (ALGORITHMS.md sec. 5.4): a dynamic programme.

Each layer l offers variants s with a cost c[l][s] >= 0 and an error e[l][s]; find one variant per layer
minimising sum_l e[l][s_l] subject to sum_l c[l][s_l] <= budget. The budget is discretised into ``buckets``
units and every cost is rounded UP to whole units, so the chosen allocation never exceeds the budget (it may
leave up to one unit per layer unused). DP[l][b] = min over s of DP[l-1][b - c(l, s)] + e(l, s); O(L x S x B),
vectorised over b. Pure array code: no ONNX, no I/O.
"""
from __future__ import annotations

import numpy as np

__all__ = ["allocate", "brute_force"]


def allocate(costs: list[list[float]], errors: list[list[float]], budget: float, *,
             buckets: int = 10000) -> list[int] | None:
    """Index of the chosen variant per layer, or None when even the cheapest variants exceed ``budget``.

    Ties are broken toward the lower-cost variant (then the lower index), so the result is deterministic."""
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("every layer needs at least one variant, with one cost and one error each")
    if budget < 0 or not np.isfinite(budget):
        raise ValueError(f"the budget must be a finite number >= 0, got {budget}")
    if any(c < 0 for row in costs for c in row):
        raise ValueError("costs must be >= 0")
    if sum(min(c) for c in costs) > budget:
        return None
    unit = budget / buckets if budget > 0 else 1.0
    units = [np.ceil(np.asarray(c, np.float64) / unit - 1e-9).astype(np.int64) if budget > 0
             else np.where(np.asarray(c) > 0, buckets + 1, 0) for c in costs]
    B = buckets
    inf = np.inf
    dp = np.full(B + 1, inf)
    dp[0] = 0.0
    choice = []
    for u, e in zip(units, errors):
        e = np.asarray(e, np.float64)
        new = np.full(B + 1, inf)
        arg = np.full(B + 1, -1, np.int64)
        # cheaper variants first, so that among equal totals the cheaper one is kept (strict < below)
        for s in sorted(range(len(u)), key=lambda i: (u[i], i)):
            if u[s] > B:
                continue
            cand = np.full(B + 1, inf)
            cand[u[s]:] = dp[: B + 1 - u[s]] + e[s]
            better = cand < new
            new[better] = cand[better]
            arg[better] = s
        dp = new
        choice.append(arg)
    b = int(np.argmin(dp))  # lowest error over all budget levels (ties: the smallest spend)
    if not np.isfinite(dp[b]):
        return None  # rounding up made the cheapest allocation exceed the budget
    picks = []
    for l in range(len(units) - 1, -1, -1):
        s = int(choice[l][b])
        picks.append(s)
        b -= int(units[l][s])
    return picks[::-1]


def brute_force(costs: list[list[float]], errors: list[list[float]], budget: float) -> list[int] | None:
    """The exact optimum by enumeration (tiny instances only: the reference the DP is tested against)."""
    import itertools

    best, pick = np.inf, None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[l][s] for l, s in enumerate(combo))
        if c > budget:
            continue
        e = sum(errors[l][s] for l, s in enumerate(combo))
        if e < best:
            best, pick = e, list(combo)
    return pick
