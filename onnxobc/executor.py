"""Where the layer solves run (``--executor``): in this process, or as tasks on a Ray cluster.

A solve is pure: a :class:`SolveJob` (one layer's :class:`~onnxobc.engine.solver.Problem` and its spec; several
specs for a database ladder; a lookup table's row counts) goes in, a :class:`~onnxobc.engine.solver.LayerResult`
(a list of them for several specs) comes out. So a job ships as it is to a Ray task (the Problem pickles: arrays,
a column order and the op adapter's group-size check), and results come back in the order they finish. Callers
put them back by key in their own order, so the output never depends on where or in what order layers were solved.

- :class:`LocalExecutor` (the default): one job after the other in the order given, in this process (the engine
  runs its own threads over row batches), as onnxobc always did.
- :class:`RayExecutor`: every job a Ray task, submitted biggest first (:func:`solve_cost`, :func:`schedule`) so
  that the longest solve does not start last; one CPU per task, and one GPU per task when its spec says
  ``device='cuda'``. With an address it connects to that cluster and ships this onnxobc package to its workers
  (they need onnxobc's dependencies and the same Ray); without one it starts a local Ray for the run and stops it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine.solver import AUTO_EXACT_MAX_COST, LayerResult, Problem, solve, solve_lookup, solve_many
from .engine.spec import LayerSpec
from .errors import OnnxObcError, UsageError

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install onnxobc[ray] (or pip install 'ray>=2.9')"

log = logging.getLogger(__name__)


@dataclass
class SolveJob:
    """One layer's solve: ``spec`` alone (-> LayerResult) or a sequence of specs (-> list of LayerResult, one
    :func:`~onnxobc.engine.solver.solve_many` ladder); with ``counts`` the layer is a lookup table (Gather) solved
    per row, its error weighted by how often calibration selected each row."""

    key: Hashable
    problem: Problem
    spec: LayerSpec | Sequence[LayerSpec]
    counts: np.ndarray | None = None

    @property
    def specs(self) -> list[LayerSpec]:
        return list(self.spec) if isinstance(self.spec, (list, tuple)) else [self.spec]

    @property
    def cost(self) -> float:
        return sum(solve_cost(self.problem.shape, s, lookup=self.counts is not None) for s in self.specs)


def solve_cost(shape: tuple[int, int, int], spec: LayerSpec, *, lookup: bool = False) -> float:
    """Estimated work of one solve of a (groups, rows, C) layer, for scheduling (relative, not seconds): exact
    OBS/OBQ rows * C^3, the fast modes C^3 + rows * C^2 (one factorisation, then lazy updates), auto as its rule
    (engine.solver: both where the exact cost is at most AUTO_EXACT_MAX_COST, the fast mode alone beyond), the
    data-free baselines and lookup tables rows * C."""
    g, r, c = (float(x) for x in shape)
    exact, fast, cheap = g * r * c ** 3, g * (c ** 3 + r * c * c), g * r * c
    if lookup or spec.method in ("magnitude", "rtn"):
        return cheap
    if spec.method == "exact":
        return exact
    if spec.method in ("gptq", "sparsegpt"):
        return fast
    if spec.block_size is not None:  # auto: block sparsity has no fast mode
        return exact
    return exact + fast if exact <= AUTO_EXACT_MAX_COST else fast


def schedule(costs: Sequence[float]) -> list[int]:
    """Submission order: biggest estimated cost first, the given order among equals."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


def run_job(job: SolveJob) -> tuple[LayerResult | list[LayerResult], float]:
    """Solve one job here: (result, or one result per spec when ``job.spec`` is a sequence; seconds)."""
    t = time.perf_counter()
    many = isinstance(job.spec, (list, tuple))
    if job.counts is not None:
        out = [solve_lookup(job.problem, s, job.counts) for s in job.specs]
        res = out if many else out[0]
    else:
        res = solve_many(job.problem, job.specs) if many else solve(job.problem, job.spec)
    return res, time.perf_counter() - t


class LocalExecutor:
    """Solve in this process, one job after the other, in the order given (jobs are built as they are needed)."""

    name = "local"

    def solve(self, jobs: Iterable[SolveJob]) -> Iterator[tuple[Hashable, Any, float]]:
        for job in jobs:
            res, seconds = run_job(job)
            yield job.key, res, seconds

    def close(self) -> None:
        pass


def blas_thread_count() -> int | None:
    """The number of threads BLAS uses in this process now (None: no BLAS library found)."""
    from threadpoolctl import threadpool_info

    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts) if counts else None


def _ray_task(job: SolveJob, blas: int | None) -> tuple[Any, float]:
    """The body of a Ray task. BLAS runs with the driver's thread count: the parts of a solve outside the engine's
    single-threaded loops (the Hessian's factorisation) round differently with another count, and the result must
    be the local executor's to the bit (Ray itself starts workers with OMP_NUM_THREADS=1). The engine's own
    threads over row batches do not change the result: one per task, the CPU Ray gave it."""
    from threadpoolctl import threadpool_limits

    os.environ.setdefault("ONNXOBC_THREADS", "1")
    if blas is None:
        return run_job(job)
    with threadpool_limits(limits=blas, user_api="blas"):
        return run_job(job)


def import_ray():
    """The ``ray`` module, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port address (optionally ray://) where nothing answers is a UsageError now: Ray itself would retry
    for minutes. 'auto' and other forms are left to Ray."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise UsageError(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                         f"`ray start --head` and pass the address it prints") from None


def _auth_hint(exc: BaseException) -> str:
    """A hint when Ray refused the connection for want of its token: recent Ray's `ray start --head` turns token
    authentication on (token in ~/.ray/auth_token), and a client connects only with RAY_AUTH_MODE=token set (Ray
    itself only says that it could not connect)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e):
            return ("; the cluster asks for a token (token authentication, the default of `ray start` in recent "
                    "Ray): set RAY_AUTH_MODE=token in this environment (the token is read from ~/.ray/auth_token)")
        todo += [e.__cause__, e.__context__]
    return ""


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class RayExecutor:
    """Solve every job as a Ray task and yield the results as they finish (see the module docstring).

    ``address``: a running cluster (``ray.init(address=...)``); None: reuse the Ray this process is already
    connected to, else start a local one with ``num_cpus`` (default: the CPUs this process may use). Ray is
    started or connected on the first job (a run with nothing to solve starts none), and shut down by
    :meth:`close` when this executor started it."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.ray = import_ray()
        self.address, self.num_cpus = address, num_cpus
        self.owned = False
        self.submitted: list[Hashable] = []  # keys in submission order (the last solve call's)
        self.blas = blas_thread_count()  # what a local solve here would use, for the tasks
        if address and not self.ray.is_initialized():
            _check_reachable(address)  # now, not after the calibration

    def _connect(self) -> None:
        ray, address = self.ray, self.address
        if ray.is_initialized():
            return
        kw: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR)
        try:
            if address:
                import onnxobc

                # the driver's onnxobc goes to the workers: the same code, so the same bytes out
                kw["runtime_env"] = {"py_modules": [os.path.dirname(onnxobc.__file__)]}
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=self.num_cpus or _usable_cpus(), include_dashboard=False, **kw)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            where = f"--ray-address {address}" if address else "a local Ray cluster"
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"could not start or reach {where}: {why}{_auth_hint(e)}") from None
        self.owned = True

    def solve(self, jobs: Iterable[SolveJob]) -> Iterator[tuple[Hashable, Any, float]]:
        ray = self.ray
        items = []  # (key, cost, object ref of the job, GPUs): each job goes to the object store as it is built
        for job in jobs:
            self._connect()
            gpus = 1 if any(s.device == "cuda" for s in job.specs) else 0
            items.append((job.key, job.cost, ray.put(job), gpus))
        self.submitted = []
        if not items:
            return
        if any(g for *_, g in items) and ray.cluster_resources().get("GPU", 0) < 1:
            raise UsageError("--device cuda with --executor ray: the Ray cluster has no GPU (use --device cpu, or a "
                             "cluster with GPUs)")
        remote = ray.remote(_ray_task)
        pending: dict[Any, Hashable] = {}
        for i in schedule([c for _, c, _, _ in items]):
            key, _, ref, gpus = items[i]
            pending[remote.options(num_cpus=1, num_gpus=gpus, max_retries=0).remote(ref, self.blas)] = key
            self.submitted.append(key)
        del items
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    key = pending.pop(ref)
                    res, seconds = self._get(ref, key)
                    yield key, res, seconds
        finally:
            for ref in pending:  # an error or an abandoned iteration: the rest is not needed
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def _get(self, ref, key) -> tuple[Any, float]:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the solve raised: the engine's own error, without Ray's wrapping
            cause = getattr(e, "cause", None)
            if isinstance(cause, (OnnxObcError, ValueError)):
                raise cause from None
            raise OnnxObcError(f"{key}: the Ray task failed: {cause!r}") from None
        except ray.exceptions.RayError as e:  # a worker died (out of memory?), the cluster went away
            raise OnnxObcError(f"{key}: the Ray task failed: {str(e).splitlines()[0]}") from None

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
            self.owned = False


@contextlib.contextmanager
def executor_for(config) -> Iterator[LocalExecutor | RayExecutor]:
    """The executor a run's options ask for (``config.executor``, ``config.ray_address``), closed afterwards."""
    kind = getattr(config, "executor", "local")
    ex: LocalExecutor | RayExecutor = (RayExecutor(getattr(config, "ray_address", None)) if kind == "ray"
                                       else LocalExecutor())
    try:
        yield ex
    finally:
        ex.close()

