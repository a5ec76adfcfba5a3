"""Compression to a budget (ALGORITHMS.md sec. 5): a database of compressed variants per layer, a cost and an
error per variant, and the dynamic programme of :func:`onnxobc.engine.allocate.allocate` choosing one variant per
layer so that the total cost meets the target.

Targets (fractions of the selected layers' dense totals): ``flops`` (MACs x density), ``size`` (stored weight
bytes vs fp32) and ``bops`` (MACs x density x weight bits x activation bits vs dense 8-bit weights and 8-bit
activations). Every layer may also stay as it is.

The database lives in a directory (``--database DIR``, else a temporary one): one ``.npz`` per variant (weights,
grid) and ``index.json`` with its error and what its cost needs. A variant's key hashes the model, the
calibration data and its options, so a second target on the same model and data reuses every variant (no
calibration, no solve), and any change of model, data or options misses.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ._version import __version__
from .engine.allocate import allocate
from .engine.grid import Grid
from .engine.solver import LayerResult, Note, Problem
from .engine.spec import LayerSpec
from .errors import UsageError
from .executor import SolveJob, executor_for
from .export.apply import ExportOptions, storage_format
from .export.cost import LayerCost, layer_cost
from .graph.layers import Layer

log = logging.getLogger(__name__)

TARGETS = ("flops", "size", "bops")
LADDER = tuple(round(1.0 - 0.9 ** i, 6) for i in range(1, 45))  # densities 0.9^i: sparsity 0.1 ... 0.99
# A layer's ladder costs one exact trace per row (work ~ rows x cols^3) plus, per level, one reconstruction and
# one error. Layers whose trace work exceeds LADDER_THIN_WORK (EfficientNet-Lite0's 1280x1000 classifier,
# MiniLM's 1536-input FFN projections) get every other level of the default ladder: see ladder_for.
LADDER_THIN_WORK = 1e12
SIZE_BITS = (8, 4)  # what QDQ storage distinguishes: 5..8-bit codes are int8, 2..4-bit codes int4
BOPS_BITS = (8, 4)
BOPS_REF_BITS = 8  # the reference: dense 8-bit weights and 8-bit activations


@dataclass
class Variant:
    spec: LayerSpec | None  # None: the layer as it is
    key: str
    error: float
    cost: LayerCost | None = None
    result: LayerResult | None = None


def ladder_for(layer: Layer) -> tuple[float, ...]:
    """The default sparsity ladder of one layer: LADDER (densities 0.9^i, 44 levels), or every other level of it
    (densities 0.9^(2i+1), 22 levels, sparsity 0.1 to 0.99) for a layer whose exact trace is expensive
    (rows x cols^3 above LADDER_THIN_WORK, per group summed), where the per-level reconstructions dominate the
    database build (measured in docs/RESULTS.md)."""
    work = layer.groups * layer.rows * float(layer.cols) ** 3
    return LADDER if work <= LADDER_THIN_WORK else LADDER[::2]


def candidates(base: LayerSpec, target: str, bits: tuple | None, sparsities: tuple | None,
               ladder: tuple = LADDER) -> list[LayerSpec]:
    """The variants a layer is offered (besides staying as it is), from the run's options.

    flops: the sparsity ladder (``sparsities`` or densities 0.9^i), plus N:M when ``base.nm`` is set, each
    quantized to ``base.bits`` when given; size: each of ``bits`` (default 8 and 4: the storage holds 5..8-bit codes
    in int8 and 2..4-bit codes in int4, so 3 bits costs what 4 bits does), pruned at
    ``sparsities`` too when given; bops: each of ``bits`` (default 8, 4) dense, N:M and at ``sparsities``."""
    from .engine.spec import spec_fields

    plain = {f.name: getattr(base, f.name) for f in spec_fields()}  # not a LayerSpec yet: it may lack its bits
    plain.update(sparsity=None, nm=None, block_size=None)
    out: list[LayerSpec] = []

    def add(**kw):
        try:
            out.append(LayerSpec(**{**plain, **kw}))
        except ValueError:
            pass  # an impossible combination (e.g. a group size without bits) is simply not a candidate

    if target == "flops":
        for s in (sparsities or ladder):
            add(sparsity=s, block_size=base.block_size, bits=base.bits)
        if base.nm:
            add(nm=base.nm, bits=base.bits)
    else:
        for b in (bits or (SIZE_BITS if target == "size" else BOPS_BITS)):
            add(bits=b, group_size=None)
            if base.group_size is not None:  # grouped beside per-channel: the DP may mix them
                add(bits=b)
            for s in (sparsities or ()):
                add(sparsity=s, bits=b)
            if target == "bops" and base.nm:
                add(nm=base.nm, bits=b)
    return list(dict.fromkeys(out))


ERRORS = ("layer", "output")


class OutputProbe:
    """The change of the model's outputs when ONE layer is swapped to a variant (every other layer dense): the
    error the reference implementation allocates with (sec. 5.2), here without labels: sum over the outputs of
    ||y' - y||^2 / ||y||^2 on a few calibration batches. One ONNX Runtime session serves every swap: each
    layer's weight becomes a graph input, fed dense or swapped. With a token mask (``config.token_mask``, e.g.
    MiniLM's ``attention_mask``), outputs shaped [batch, sequence, ...] count only the real tokens: padded
    positions are left out of calibration, so their outputs drift under compression and would otherwise
    dominate the error (MiniLM, uniform 4-bit GPTQ: rel L2 0.95 over every position, 0.25 over real tokens)."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], calib: Any, config, samples: int):
        import copy

        from .calibrate import input_specs, iter_batches
        from .runtime import inference_session
        import onnxruntime as ort

        m = copy.deepcopy(model)
        self.names = {}
        for i, l in enumerate(layers):
            name = f"__onnxobc_w{i}"
            m.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(l.weight.dtype), list(l.weight.shape)))
            for c in l.consumers:
                m.graph.node[c.node_index].input[c.layout.weight_input] = name
            self.names[l.name] = name
        self.dense = {self.names[l.name]: np.ascontiguousarray(l.weight) for l in layers}
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sess = inference_session(m, so)
        self.feeds = list(iter_batches(calib, input_specs(model, dict(config.batch_axes or ())),
                                        batch_size=config.batch_size, max_samples=samples))
        self.token_mask = probe_mask(model, config)
        self.masks = [None if self.token_mask is None else np.asarray(f[self.token_mask]) != 0 for f in self.feeds]
        self.ref = [self.sess.run(None, {**f, **self.dense}) for f in self.feeds]

    def error(self, layer: Layer, weight: np.ndarray) -> float:
        return self.error_many({layer.name: (layer, weight)})

    def error_many(self, swaps: dict[str, tuple[Layer, np.ndarray]]) -> float:
        """The output change with every layer of ``swaps`` ({name: (layer, weight)}) swapped at once."""
        swap = dict(self.dense)
        for name, (layer, weight) in swaps.items():
            swap[self.names[name]] = np.ascontiguousarray(weight.astype(layer.weight.dtype))
        num = den = 0.0
        for f, ref, mask in zip(self.feeds, self.ref, self.masks):
            for y, r in zip(self.sess.run(None, {**f, **swap}), ref):
                if np.issubdtype(np.asarray(r).dtype, np.floating):
                    y, r = np.asarray(y), np.asarray(r)
                    if mask is not None and r.ndim >= 2 and r.shape[:2] == mask.shape:
                        y, r = y[mask], r[mask]  # real tokens only
                    d = np.asarray(y, np.float64) - r
                    num += float(np.sum(d * d))
                    den += float(np.sum(np.asarray(r, np.float64) ** 2))
        return num / den if den > 0 else 0.0


def probe_mask(model: onnx.ModelProto, config) -> str | None:
    """The token-mask input the output error restricts itself to (None: every position counts)."""
    from .calibrate import find_token_mask

    return find_token_mask(model, config.token_mask)


def probe_key(model: onnx.ModelProto, config) -> str:
    """Where a variant's output error is cached in its database entry: the sample count, marked when only real
    tokens count (entries written before that change measured every position and are not reused)."""
    return str(config.allocation_samples) + (":real-tokens" if probe_mask(model, config) else "")


def candidate_bits(config) -> list[int]:
    """Every bit width a target's candidates may use (for the opset the storage needs)."""
    kind = config.target[0]
    if kind == "flops":
        return [config.bits] if config.bits else []
    return list(config.cand_bits or (SIZE_BITS if kind == "size" else BOPS_BITS))


def _cost_value(target: str, cost: LayerCost) -> float:
    if target == "flops":
        return float(cost.eff_macs)
    if target == "size":
        return float(cost.bytes)
    return float(cost.bops)


def _dense_value(target: str, layer: Layer, macs: int) -> float:
    if target == "flops":
        return float(macs)
    if target == "size":
        return float(layer.weight.size * 4)
    return float(macs * BOPS_REF_BITS * BOPS_REF_BITS)


def digest_model(model: onnx.ModelProto) -> str:
    from .graph.model_io import model_digest

    return model_digest(model)  # sha256 of the serialised model (beyond 2 GB: of its skeleton and tensors)


def digest_data(calib: Any) -> str:
    """A fingerprint of the calibration data: the files' bytes (a path), or the arrays (a list of feeds)."""
    h = hashlib.sha256()
    if isinstance(calib, (str, os.PathLike)):
        p = Path(calib)
        for f in sorted(p.glob("*.npz")) if p.is_dir() else [p]:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    elif isinstance(calib, (list, tuple)):
        for feed in calib:
            for k in sorted(feed):
                a = np.ascontiguousarray(feed[k])
                h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
                h.update(a.tobytes())
    else:
        raise UsageError("compression to a target reads the calibration data twice: pass a path or a list of feeds, "
                         "not a one-shot iterator or reader")
    return h.hexdigest()


class Database:
    """Variants on disk: ``index.json`` ({key: entry}) and one ``<key>.npz`` per variant."""

    def __init__(self, path: str | os.PathLike | None):
        self.tmp = path is None
        self.dir = Path(tempfile.mkdtemp(prefix="onnxobc-db-")) if path is None else Path(path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--database {self.dir}: cannot create the directory ({e.strerror or e})") from None
        self.index_path = self.dir / "index.json"
        self.index: dict[str, dict] = {}
        if self.index_path.exists():
            try:
                self.index = json.loads(self.index_path.read_text())
            except (OSError, ValueError):
                log.warning("%s is unreadable: the database starts empty", self.index_path)
        self.hits = self.misses = 0

    def has(self, key: str) -> bool:
        return key in self.index and (self.dir / f"{key}.npz").exists()

    def put(self, key: str, res: LayerResult, meta: dict) -> None:
        arrays = {"mats": res.mats}
        if res.grid is not None:
            arrays.update(scale=np.asarray(res.grid.scale), zero_point=np.asarray(res.grid.zero_point))
        np.savez(self.dir / f"{key}.npz", **arrays)
        self.index[key] = dict(meta, error=res.error, loss=res.loss, dense=res.dense, solver=res.solver,
                               applied=res.spec.to_rule() | {"device": res.spec.device},
                               notes=[dataclasses.asdict(n) for n in res.notes],
                               grid=None if res.grid is None else dict(bits=res.grid.bits, sym=res.grid.sym,
                                                                         group_size=res.grid.group_size))

    def get(self, key: str) -> LayerResult:
        e = self.index[key]
        with np.load(self.dir / f"{key}.npz") as z:
            mats = z["mats"]
            grid = None if e["grid"] is None else Grid(z["scale"], z["zero_point"], **e["grid"])
        spec = LayerSpec(**e["applied"])
        return LayerResult(mats, grid, spec, e["loss"], e["error"], [Note(**n) for n in e["notes"]],
                           dense=e["dense"], solver=e["solver"])

    def save(self) -> None:
        tmp = self.index_path.with_name("index.json.tmp")
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.index_path)

    def close(self) -> None:
        if self.tmp:
            shutil.rmtree(self.dir, ignore_errors=True)


def _db_job(l: Layer, st, specs: list[LayerSpec]) -> SolveJob:
    """One layer's database variants as one solve job (they share a trace)."""
    problem = Problem(l.name, l.layout.to_matrices(l.weight).astype(np.float32),
                      None if l.layout.hessian_free else st.hessian(),
                      l.layout.channels_last_perm(l.weight.shape),
                      functools.partial(l.layout.group_size_problem, l.weight.shape))
    counts = (st.row_counts if st.row_counts is not None else np.zeros(l.rows)) if l.layout.hessian_free else None
    return SolveJob(l.name, problem, tuple(specs), counts)


def run(model: onnx.ModelProto, layers: list[Layer], base_specs: dict[str, LayerSpec], calib: Any, config,
        calibrate: Callable[[list[Layer]], tuple[dict, int]], progress) -> tuple[dict, dict, dict, dict]:
    """Build (or reuse) the database, choose a variant per layer, and return
    ({name: chosen spec or None}, {name: (LayerResult, seconds)} for the compressed ones, {name: MACs}, report).

    ``calibrate(layers, first=, staged=)`` runs the model and returns ({name: LayerStats}, samples); it is called
    only when some variant is missing from the database, once per stage (``first``: the first pass; ``staged``:
    there are several)."""
    t0 = time.perf_counter()
    target, fraction = config.target
    db = Database(config.database)
    try:
        common = json.dumps([__version__, digest_model(model), digest_data(calib), config.samples, config.batch_size,
                             config.token_mask, config.layer_error])
        offered = {l.name: candidates(base_specs[l.name], target, config.cand_bits, config.cand_sparsity,
                                      ladder_for(l)) for l in layers}
        opts = ExportOptions.of(config)
        act_bits = config.act_bits if target != "bops" else (config.act_bits or BOPS_REF_BITS)
        for l in layers:  # what the export format cannot store is not a candidate
            ok = []
            for s in offered[l.name]:
                try:
                    config.check_export(s)
                    ok.append(s)
                except ValueError:
                    pass
            offered[l.name] = ok

        def key(layer: Layer, spec: LayerSpec) -> str:
            return hashlib.sha256(json.dumps([common, layer.name, spec.to_rule()]).encode()).hexdigest()[:32]

        missing = [l for l in layers if not all(db.has(key(l, s)) for s in offered[l.name])]
        samples = None
        macs: dict[str, int] = {}
        t_cal = t_solve = t_out = 0.0
        memory = None
        if missing:
            from .stages import MB, plan_stages

            # the layers missing from the database are calibrated and solved in stages when their Hessians
            # exceed the budget (--stage-memory; default half the available memory), as without a target: each
            # stage's statistics are freed before the next pass, each variant goes to disk as it is solved
            plan = plan_stages(model, missing, budget=None if config.stage_memory is None
                               else int(config.stage_memory * MB))
            todo = {l.name: [s for s in offered[l.name] if not db.has(key(l, s))] for l in missing}
            by_name = {l.name: l for l in missing}
            ts = time.perf_counter()
            with executor_for(config) as ex:  # local: one layer after the other; ray: tasks, as they finish
                for k, stage in enumerate(plan.stages):
                    tc = time.perf_counter()
                    stats, n = calibrate(stage, first=k == 0, staged=plan.staged)
                    t_cal += time.perf_counter() - tc
                    samples = samples or n
                    plan.note_held(stats)
                    for l in stage:
                        m = l.static_macs()
                        macs[l.name] = m if m is not None else int(round(stats[l.name].positions_per_sample * l.params))
                    jobs = (_db_job(l, stats[l.name], todo[l.name]) for l in stage)
                    for name, res, _ in progress(ex.solve(jobs), "database", len(stage)):
                        for s, r in zip(todo[name], res):  # to disk as they come: no stage's variants all in memory
                            db.put(key(by_name[name], s), r, dict(layer=name, macs=macs[name], samples=samples))
                            db.misses += 1
                    del stats, jobs
            order = [key(l, s) for l in missing for s in todo[l.name]]  # the index in the layers' order
            new = set(order)
            db.index = {k: v for k, v in db.index.items() if k not in new} | {k: db.index[k] for k in order}
            db.save()
            memory = plan.summary()
            t_solve = time.perf_counter() - ts - t_cal  # the stages' solves (and writing the variants)

        pkey = probe_key(model, config)
        if config.allocation_error == "output":
            to = time.perf_counter()
            probe = None
            for l in progress(layers, "output errors", len(layers)):
                for s in offered[l.name]:
                    e = db.index[key(l, s)]
                    if e.get("output_error", {}).get(pkey) is None:
                        probe = probe or OutputProbe(model, layers, calib, config, config.allocation_samples)
                        w = l.layout.from_matrices(db.get(key(l, s)).mats.astype(l.weight.dtype), l.weight.shape)
                        e.setdefault("output_error", {})[pkey] = probe.error(l, w)
            db.save()
            t_out = time.perf_counter() - to
        variants: dict[str, list[Variant]] = {}
        for l in layers:
            vs = [Variant(None, "", 0.0)]
            for s in offered[l.name]:
                k = key(l, s)
                e = db.index[k]
                if l.name not in macs:
                    macs[l.name] = e["macs"]
                samples = samples or e["samples"]
                applied = None if e["dense"] else LayerSpec(**e["applied"])
                cost = layer_cost(l, applied, storage_format(l, None if applied is None else applied.bits, opts),
                                  macs[l.name], act_bits)
                err = (e["output_error"][pkey] if config.allocation_error == "output"
                       else e["error"])
                vs.append(Variant(s, k, float(err), cost))
            vs[0].cost = layer_cost(l, None, "float", macs[l.name], act_bits)
            variants[l.name] = vs
        dense_total = sum(_dense_value(target, l, macs[l.name]) for l in layers)
        budget = fraction * dense_total
        costs = [[_cost_value(target, v.cost) for v in variants[l.name]] for l in layers]
        errors = [[v.error for v in variants[l.name]] for l in layers]
        picks = allocate(costs, errors, budget)
        search = None
        if picks is not None and config.allocation_search > 0:
            picks, search = _search(model, layers, variants, costs, errors, budget, picks, db, calib, config, progress)
        if picks is None:
            cheapest = sum(min(c) for c in costs) / dense_total
            raise UsageError(f"--target-{target} {fraction:g} is out of reach: the cheapest allocation of these "
                             f"candidates costs {cheapest:.4f} of the dense total; add cheaper candidates (e.g. more "
                             f"sparsity levels or fewer bits) or raise the target")
        chosen: dict[str, LayerSpec | None] = {}
        results: dict[str, tuple[LayerResult, float]] = {}
        for l, p in zip(layers, picks):
            v = variants[l.name][p]
            chosen[l.name] = v.spec
            if v.spec is not None:
                results[l.name] = (db.get(v.key), 0.0)
        spent = sum(costs[i][p] for i, p in enumerate(picks))
        picked_errors = {l.name: errors[i][p] for i, (l, p) in enumerate(zip(layers, picks))}
        report = dict(target=target, fraction=fraction, error=config.allocation_error, search=search, budget=budget, dense_total=dense_total, cost=spent,
                      achieved=spent / dense_total if dense_total else 0.0,
                      candidates={l.name: len(variants[l.name]) for l in layers},
                      database=None if db.tmp else str(db.dir), variants_reused=sum(len(v) - 1 for v in variants.values()) - db.misses, variants_solved=db.misses,
                      errors=picked_errors, predicted_error=sum(picked_errors.values()),
                      seconds=dict(calibration=t_cal, solve=t_solve, output_errors=t_out,
                                   total=time.perf_counter() - t0), samples=samples, memory=memory)
        return chosen, results, macs, report
    finally:
        db.close()


def _search(model, layers, variants, costs, errors, budget, picks, db, calib, config, progress):
    """Refine the DP's allocation by the STITCHED model's output error (a SPDY-style search, sec. 5.4): the DP
    assumes that single-swap errors add up; here per-layer multipliers of those errors are perturbed at random
    around the best found (log-normal steps that shrink), the DP re-solved, and the allocation whose whole
    compressed model changes the outputs least is kept. Each trial costs one DP and one model run on
    ``config.allocation_samples`` samples. Deterministic (seeded)."""
    probe = OutputProbe(model, layers, calib, config, config.allocation_samples)
    cache: dict[str, np.ndarray] = {}
    scores: dict[tuple, float] = {}

    def weight(l: Layer, v: Variant) -> np.ndarray:
        if v.key not in cache:
            cache[v.key] = l.layout.from_matrices(db.get(v.key).mats.astype(l.weight.dtype), l.weight.shape)
        return cache[v.key]

    def score(p: list[int]) -> float:
        key = tuple(p)
        if key not in scores:
            swaps = {l.name: (l, weight(l, variants[l.name][i])) for l, i in zip(layers, p)
                     if variants[l.name][i].spec is not None}
            scores[key] = probe.error_many(swaps)
        return scores[key]

    rng = np.random.default_rng(0)
    best, best_m = list(picks), np.ones(len(layers))
    start = best_score = score(best)
    trials = config.allocation_search
    for t in progress(range(trials), "allocation search", trials):
        sigma = 0.5 * (1.0 - t / trials) + 0.05
        m = best_m * np.exp(rng.normal(0.0, sigma, len(layers)))
        p = allocate(costs, [[e * m[i] for e in row] for i, row in enumerate(errors)], budget)
        if p is None:
            continue
        sc = score(p)
        if sc < best_score:
            best, best_m, best_score = p, m, sc
    return best, dict(trials=trials, distinct=len(scores), start=start, best=best_score)
