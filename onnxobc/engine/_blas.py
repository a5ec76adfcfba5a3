"""Temporary limit on the number of BLAS threads while the greedy loops run (ALGORITHMS.md sec. 4).

Why: the delayed-update loops issue many mid-size products (C' x b times b x C', one per row of a batch) and
small LAPACK solves. Multi-threaded OpenBLAS spends more time synchronising its threads than computing on
such calls; on the 2-vCPU development machine a 1152 x 64 x 1152 sgemm took 12 ms with 2 threads against
1 ms with one, and a batched 600 x 600 float64 solve was 20x slower. The row batch, not the single product,
is the natural unit of parallelism here, so the engine runs these loops single-threaded by default.

The limit is process-wide while it is held (BLAS offers nothing finer), set with ``threadpoolctl`` and
restored on exit. ``ONNXOBC_BLAS_THREADS`` overrides the count (0 = leave BLAS alone).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """Run the body with at most ``n`` BLAS threads (see module docstring); restores the previous count."""
    env = os.environ.get("ONNXOBC_BLAS_THREADS")
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            n = 1
    if n <= 0:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield
