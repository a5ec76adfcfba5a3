"""Recording layer inputs with ONNX Runtime and accumulating one Hessian per layer (and group).

H = 2 X X^T / n_samples (ALGORITHMS.md section 0), accumulated in float64 while streaming over batches:
memory holds one batch's activations, never the dataset's.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from ..errors import CalibrationError
from .data import _take, feed_samples, input_specs
from ..graph.layers import Layer, tensor_types
from ..graph.model_io import ModelFile, session_via_file
from ..runtime import inference_session, session_source

log = logging.getLogger(__name__)

# Samples handed to one Gram call are capped so that their full float64 im2col would fit here (the Gram
# code itself unfolds in smaller float32 tiles; this only bounds the work and memory of one call).
_UNFOLD_BYTES = 256 << 20


@dataclass
class LayerStats:
    """Accumulated second moments of one layer's input columns."""

    xtx: np.ndarray  # (groups, C, C) float64, sum over columns of x x^T
    columns: int = 0  # columns seen (samples x positions)
    samples: int = 0
    row_counts: np.ndarray | None = None  # lookups (Gather): how often calibration selected each table row

    def hessian(self) -> np.ndarray:
        """H = 2 X X^T / n_samples, one C x C matrix per group."""
        return self.xtx * (2.0 / max(self.samples, 1))

    @property
    def has_hessian(self) -> bool:
        """False when collected with ``hessians=False`` (counts only)."""
        return self.xtx.shape[1] > 0

    @property
    def positions_per_sample(self) -> float:
        return self.columns / max(self.samples, 1)


_LEVELS = ("all", "extended", "basic", "off")


def make_session(model: onnx.ModelProto | bytes | ModelFile, providers: list[str] | None = None, level: str = "off"):
    """An ONNX Runtime session; ``level`` names its graph optimisation level ("off" by default, so that every
    recorded tensor survives exactly as the unoptimised graph computes it). ``model`` may be serialised
    already (several sessions of one model: serialise once; beyond 2 GB a ModelFile, written once)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    so.log_severity_level = 3
    providers = providers or ["CPUExecutionProvider"]
    try:
        return inference_session(model, so, providers)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"ONNX Runtime cannot load the model: {msg}") from e


def _run(sess, fetch: list[str], feed: dict[str, np.ndarray], nb: int) -> list[np.ndarray]:
    try:
        return sess.run(fetch, feed) if fetch else []
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"ONNX Runtime failed on calibration batch {nb}: {msg}") from e


_CHECK_SAMPLES = 4


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":  # compare bits, so that NaNs and signed zeros count too
        u = np.dtype(f"u{a.dtype.itemsize}")
        return bool(np.array_equal(np.ascontiguousarray(a).view(u), np.ascontiguousarray(b).view(u)))
    return bool(np.array_equal(a, b))


def choose_session(model: onnx.ModelProto | bytes | ModelFile, fetch: list[str], feed: dict[str, np.ndarray],
                   specs: list | None = None, *, providers: list[str] | None = None, optimize: str = "auto",
                   report: dict | None = None, ref_sess=None):
    """The fastest session whose recorded tensors are bit-identical to the unoptimised graph's.

    ``optimize="auto"`` tries ONNX Runtime's levels from the most aggressive down and keeps the first one
    that reproduces every fetched tensor bit for bit on the first samples of ``feed`` (the first
    calibration batch; its first few samples when the batch axis is dynamic). A level is refused whole for
    the model when one tensor differs: layout changes such as NCHWc change float summation order, fusions
    such as LayerNorm change rounding, and those are the tensors that carry the whole graph's work.
    "off" / "basic" / "extended" / "all" force a level without checking. ``ref_sess``: an unoptimised
    session of the same model, when the caller has one."""
    if optimize not in ("auto",) + _LEVELS:
        raise CalibrationError(f"optimize={optimize!r}: expected one of auto, {', '.join(_LEVELS)}")
    if optimize != "auto" or not fetch:
        level = "off" if optimize == "auto" else optimize
        if report is not None:
            report["level"] = level
        return make_session(model, providers, level)
    probe = feed
    if specs is not None and any(s.dynamic_batch for s in specs):
        by_name = {s.name: s for s in specs if s.dynamic_batch}
        n = feed_samples(feed, specs)
        if n > _CHECK_SAMPLES:  # the first samples, each input cut along its own batch axis
            probe = {k: (_take(np.asarray(v), by_name[k], 0, _CHECK_SAMPLES) if k in by_name else v)
                     for k, v in feed.items()}
    model = session_source(model)  # once for the up to four sessions below
    ref_sess = ref_sess if ref_sess is not None else make_session(model, providers, "off")
    ref = _run(ref_sess, fetch, probe, 0)
    tried = {}
    for level in _LEVELS[:-1]:
        sess = make_session(model, providers, level)
        got = _run(sess, fetch, probe, 0)
        bad = [n for n, a, b in zip(fetch, ref, got) if not _same_bits(a, b)]
        tried[level] = len(bad)
        if not bad:
            log.info("calibration runs ONNX Runtime at optimisation level %s (recorded tensors bit-identical)", level)
            if report is not None:
                report.update(level=level, mismatches=tried)
            return sess
        log.debug("optimisation level %s changes %d of %d recorded tensors (e.g. %s)", level, len(bad), len(fetch), bad[0])
        del sess
    if report is not None:
        report.update(level="off", mismatches=tried)
    return ref_sess


def augment(model: onnx.ModelProto, tensors: list[str], expose: dict[str, tuple[int, int]] | None = None, *,
            prune: bool = False, types: dict[str, int] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose graph also outputs ``tensors`` (those that are not graph inputs).
    ``expose`` names node outputs the graph leaves unnamed: {name: (node index, output slot)}. ``prune``: the copy
    holds only what ``tensors`` depend on and outputs only them (:func:`onnxobc.stages.pruned_copy`). ``types``:
    ``tensor_types(model)`` when the caller has it (it runs shape inference)."""
    types = tensor_types(model) if types is None else types
    inputs = {i.name for i in model.graph.input}
    wanted = [t for t in dict.fromkeys(tensors) if t not in inputs]
    if prune and wanted:
        from ..stages import pruned_copy

        base = model
        if expose:  # name the outputs first, so that pruning finds their producers (a rare extra copy)
            base = copy.deepcopy(model)
            _name_outputs(base, expose)
        aug = pruned_copy(base, wanted)
        return aug, _add_outputs(aug, types, tensors)
    aug = copy.deepcopy(model)
    return aug, _add_outputs(aug, types, tensors, expose)


def _name_outputs(aug: onnx.ModelProto, expose: dict[str, tuple[int, int]]) -> None:
    for t, (idx, slot) in expose.items():
        node = aug.graph.node[idx]
        while len(node.output) <= slot:
            node.output.append("")
        node.output[slot] = t


def _add_outputs(aug: onnx.ModelProto, types: dict[str, int], tensors: list[str],
                 expose: dict[str, tuple[int, int]] | None = None) -> list[str]:
    _name_outputs(aug, expose or {})
    inputs = {i.name for i in aug.graph.input}
    outputs = {o.name for o in aug.graph.output}
    fetch = []
    for t in dict.fromkeys(tensors):
        if t in inputs:
            continue
        if t not in outputs:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None))
        fetch.append(t)
    return fetch


def augmented_source(model: onnx.ModelProto, tensors: list[str], expose: dict[str, tuple[int, int]] | None = None,
                     *, prune: bool = False, types: dict[str, int] | None = None,
                     edit: Callable[[onnx.ModelProto], None] | None = None) -> tuple[bytes | ModelFile, list[str]]:
    """What ONNX Runtime reads the augmented model from (see :func:`augment`), and the fetched tensors: the
    augmented copy serialised, or for a large model (see :func:`session_via_file`) a ModelFile whose graph has
    the outputs added (the weights are written once and never copied in memory). ``edit`` changes the copy before it
    is serialised (e.g. :func:`onnxobc.stages.replace_weights`)."""
    if not session_via_file(model):
        aug, fetch = augment(model, tensors, expose, prune=prune, types=types)
        if edit is not None:
            edit(aug)
        return aug.SerializeToString(), fetch
    types, fetch = tensor_types(model) if types is None else types, []

    def change(small: onnx.ModelProto) -> None:  # the written skeleton: its weights are in the data file already
        if prune:
            aug, f = augment(small, tensors, expose, prune=True, types=types)
            small.CopyFrom(aug)
            fetch.extend(f)
        else:
            fetch.extend(_add_outputs(small, types, tensors, expose))
        if edit is not None:
            edit(small)

    return ModelFile(model, edit=change), fetch


def find_token_mask(model: onnx.ModelProto, name: str | None = "auto") -> str | None:
    """The graph input that marks real tokens (1) and padding (0), for transformer calibration.

    ``"auto"`` picks a rank-2 integer/bool input called ``attention_mask`` (the Hugging Face convention);
    ``None`` or ``"none"`` disables masking; any other value must name a rank-2 graph input."""
    if name in (None, "none"):
        return None
    specs = {s.name: s for s in input_specs(model)}
    if name == "auto":
        for s in specs.values():
            if s.name.lower().endswith("attention_mask") and len(s.shape) == 2 and s.dtype.kind in "iub":
                return s.name
        return None
    if name not in specs:
        raise CalibrationError(f"--token-mask {name}: the model has no such input (inputs: {', '.join(specs)})")
    if len(specs[name].shape) != 2:
        raise CalibrationError(f"--token-mask {name}: expected a [batch, sequence] input, got {specs[name].describe()}")
    return name


def _prefetched(first: dict, rest: Iterator[dict], sess, fetch: list[str], overlap: bool,
                switch: Callable[[], Any] | None = None) -> Iterator[tuple[dict, list]]:
    """(feed, outputs) per batch. With ``overlap``, a thread runs ONNX Runtime on the next batch while the
    caller accumulates the current one (ONNX Runtime and the BLAS products release the GIL). The thread
    starts a batch only when the caller has let go of the one before the current: memory holds two
    batches' activations (one without ``overlap``), never the dataset's.

    ``switch``, when given, is called once the first batch has been handed over and returns the session for
    the others: the optimisation-level check then runs while the first batch's Grams accumulate."""
    rest = itertools.chain([first], rest)
    if not overlap:
        for nb, feed in enumerate(rest):
            if nb == 1 and switch is not None:
                sess = switch()
            yield feed, _run(sess, fetch, feed, nb)
        return
    q: queue.Queue = queue.Queue()
    slots = threading.Semaphore(2)  # batches alive at once: the one being accumulated + the one being run
    stop = threading.Event()
    done = object()

    def produce() -> None:
        s = sess
        try:
            for nb, feed in enumerate(rest):
                if nb == 1 and switch is not None:
                    s = switch()
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                q.put((feed, _run(s, fetch, feed, nb)))
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    t = threading.Thread(target=produce, name="onnxobc-calibration-ort", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()  # the caller is done with this batch
    finally:
        stop.set()
        t.join()


def collect_hessians(model: onnx.ModelProto, layers: list[Layer], batches: Iterable[dict[str, np.ndarray]],
                     *, providers: list[str] | None = None,
                     progress: Callable[[Iterable, str, int | None], Iterable] | None = None,
                     total: int | None = None, token_mask: str | None = None,
                     observers: list | None = None, hessians: bool = True, optimize: str = "auto",
                     overlap: bool = True, precision: str = "float32",
                     profile: dict | None = None, specs: list | None = None, prune: bool = False,
                     edit: Callable[[onnx.ModelProto], None] | None = None, types: dict[str, int] | None = None
                     ) -> dict[str, LayerStats]:
    """Run the model on every batch and accumulate each layer's X X^T (per group; summed over the nodes
    that share a weight).

    ``observers`` (e.g. :class:`~onnxobc.calibrate.ranges.RangeObserver`) name extra ``tensors`` to fetch and
    get ``update(values, token_mask)`` after every batch, in the same pass over the data.

    ``hessians=False`` only counts samples and columns (for MAC counts), leaving ``xtx`` empty: the data-free
    baselines need no Hessian unless a per-layer error is wanted, and the im2col products are the bulk of
    calibrating a CNN.

    With ``token_mask`` (a [batch, sequence] input, see :func:`find_token_mask`), MatMul/Gemm inputs of shape
    [batch, sequence, ...] keep only the positions of real tokens: padding never reaches the deployed model's
    outputs that matter, so it must not shape the Hessian.

    Speed (issue 11): ``optimize`` picks ONNX Runtime's optimisation level (see :func:`choose_session`;
    "auto" keeps only levels that reproduce every recorded tensor bit for bit); ``overlap`` runs the next
    batch in ONNX Runtime while this one's Grams accumulate; ``precision="float32"`` forms the Gram products
    in float32 tiles summed in float64 (:mod:`onnxobc.engine.gram`; relative difference ~1e-7 from
    "float64", which computes every product in float64). ``profile``, when given a dict, receives seconds
    spent per phase ("session": creating the first session; "level_check": the level search, on the ONNX
    Runtime thread; "ort_wait": waiting for a batch; "gram"; "observers") and per layer kind ("gram:Conv
    1x1", ...), the chosen "level" and, per level tried, how many recorded tensors it changed.

    ``prune``: ONNX Runtime runs only the nodes the fetched tensors depend on (a stage of
    :mod:`onnxobc.stages` needs the graph up to its layers' inputs, not the whole model). ``edit``, when given,
    edits the copy that ONNX Runtime runs (``model`` itself is never changed), e.g.
    :func:`onnxobc.stages.replace_weights`. ``types``: ``tensor_types(model)``, when the caller has it."""
    if precision not in ("float32", "float64"):
        raise CalibrationError(f"precision={precision!r}: expected float32 or float64")
    dtype = np.float64 if precision == "float64" else None
    specs = specs if specs is not None else input_specs(model)  # the caller's, with --batch-axis overrides
    wanted = [c.input_name for layer in layers for c in layer.consumers]
    wanted += [t for layer in layers for c in layer.consumers for t in c.aux.values()]
    observers = list(observers or [])
    wanted += [t for ob in observers for t in ob.tensors]
    src, fetch = augmented_source(model, wanted, {c.input_name: c.expose for layer in layers
                                                  for c in layer.consumers if c.expose is not None},
                                  prune=prune, types=types, edit=edit)
    stats = {
        layer.name: LayerStats(np.zeros((layer.groups, layer.cols, layer.cols)
                                        if hessians and not layer.layout.hessian_free else (layer.groups, 0, 0),
                                        dtype=np.float64),
                               row_counts=np.zeros(layer.rows) if layer.layout.hessian_free else None)
        for layer in layers
    }
    prof: dict = profile if profile is not None else {}
    source = iter(batches)
    t0 = time.perf_counter()
    first_feed = next(source, None)
    if first_feed is None:
        raise CalibrationError("the calibration data yielded no samples: give at least one sample per input")
    if optimize not in ("auto",) + _LEVELS:
        raise CalibrationError(f"optimize={optimize!r}: expected one of auto, {', '.join(_LEVELS)}")
    # The first batch runs unoptimised (exact by definition); the level check follows on the ONNX Runtime
    # side, beside that batch's Grams, and the other batches use what it picked.
    sess = make_session(src, providers, "off" if optimize == "auto" else optimize)
    prof["level"] = "off" if optimize == "auto" else optimize
    switch = None
    if optimize == "auto" and fetch:
        def switch():
            t = time.perf_counter()
            chosen = choose_session(src, fetch, first_feed, specs, providers=providers, report=prof, ref_sess=sess)
            prof["level_check"] = time.perf_counter() - t
            return chosen
    prof["session"] = prof.get("session", 0.0) + time.perf_counter() - t0
    it: Iterable = _prefetched(first_feed, source, sess, fetch, overlap, switch)
    if progress is not None:
        it = progress(it, "calibrating", total)
    kinds = {id(c): _kind(c, layer) for layer in layers for c in layer.consumers}
    # One BLAS thread per call: the Gram code runs its tiles on its own worker threads (one per core), and
    # multi-threaded OpenBLAS on short or thin products spins and collapses when its cores are taken (by
    # ONNX Runtime's threads running the next batch, or by the other Gram workers).
    limit = threadpool_limits(limits=1, user_api="blas") if hessians else contextlib.nullcontext()
    with limit:
        _accumulate_all(it, fetch, specs, token_mask, observers, layers, stats, kinds, hessians, dtype, prof)
    return stats


def _accumulate_all(it, fetch, specs, token_mask, observers, layers, stats, kinds, hessians, dtype, prof) -> None:
    t_wait = time.perf_counter()
    for feed, outs in it:
        prof["ort_wait"] = prof.get("ort_wait", 0.0) + time.perf_counter() - t_wait
        values: dict[str, Any] = dict(zip(fetch, outs))
        values.update(feed)
        n = feed_samples(feed, specs)
        mask = None if token_mask is None else np.asarray(feed[token_mask]) != 0
        t = time.perf_counter()
        for ob in observers:
            ob.update(values, mask)
        prof["observers"] = prof.get("observers", 0.0) + time.perf_counter() - t
        for layer in layers:
            st = stats[layer.name]
            for c in layer.consumers:
                t = time.perf_counter()
                x = np.asarray(values[c.input_name])
                if mask is not None and c.layout.token_inputs and x.ndim >= 3 and x.shape[:2] == mask.shape:
                    x = x[mask]  # real tokens only: (tokens, ..., K)
                why = c.layout.input_problem(x.shape, layer.weight.shape)
                if why:
                    raise CalibrationError(f"{c.node_name}: {why}")
                if c.layout.hessian_free:  # a lookup: count the rows selected (real tokens only, with a mask)
                    if mask is not None and x.shape == mask.shape:
                        x = x[mask]
                    st.row_counts += c.layout.row_counts(x, layer.weight.shape)
                    continue
                aux = {k: values[t] for k, t in c.aux.items()}
                if not hessians:
                    st.columns += c.layout.count_columns(x.shape, layer.weight.shape, **aux)
                    continue
                # a slice of samples at a time (the Gram code tiles further): bounded work per call
                per_sample = layer.groups * layer.cols * max(c.layout.positions_per_sample(x.shape, layer.weight.shape), 1) * 8
                step = (max(1, _UNFOLD_BYTES // per_sample) if x.ndim > 1 and c.layout.rows_are_samples
                        else max(len(x), 1))
                for s in range(0, max(len(x), 1), step):
                    xtx, ncols = c.layout.gram(x[s:s + step] if x.ndim > 1 else x, layer.weight.shape, dtype=dtype,
                                               **aux)
                    if xtx.shape[1] != layer.cols:
                        raise CalibrationError(
                            f"{c.node_name}: unfolded input has {xtx.shape[1]} rows, the weight has fan-in {layer.cols}"
                        )
                    st.xtx += xtx
                    st.columns += ncols
                dt = time.perf_counter() - t
                prof["gram"] = prof.get("gram", 0.0) + dt
                prof["gram:" + kinds[id(c)]] = prof.get("gram:" + kinds[id(c)], 0.0) + dt
            st.samples += n
        t_wait = time.perf_counter()


def _kind(c, layer: Layer) -> str:
    """A label for the profile: which Gram path a consumer takes."""
    if c.layout.op != "Conv":
        return c.layout.op
    ksize = int(np.prod(layer.weight.shape[2:]))
    g = layer.groups
    if g > 1 and layer.weight.shape[1] == 1:
        return "Conv depthwise"
    if ksize == 1:
        return "Conv 1x1"
    return "Conv grouped" if g > 1 else "Conv kxk"
