"""Compose graph -> plan -> calibrate -> solve -> apply. Nothing else lives here."""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from ._version import __version__
from .backend import get_xp
from .calibrate import collect_hessians, count_samples, find_token_mask, input_specs, iter_batches
from .config import CompressConfig
from .engine import LayerResult, LayerSpec, Problem, solve
from .engine.spec import HESSIAN_METHODS
from .errors import UnsupportedModel, UsageError
from .export import ExportOptions, apply, ensure_opset, layer_cost, save_model_atomic, storage_format
from .graph import Layer, check_output_path, find_layers, load_model, select_layers
from .graph.model_io import model_file_bytes
from .plan import plan_rules, resolve

log = logging.getLogger(__name__)

Progress = Callable[[Iterable, str, "int | None"], Iterable]


@dataclass
class LayerReport:
    """What happened to one layer."""

    name: str
    op: str
    shape: str
    groups: int
    params: int
    macs: int | None
    method: str
    sparsity: float  # fraction of zero weights after compression
    bits: int | None
    error: float | None  # ||W X - W' X||^2 / ||W X||^2 on the calibration data (None: --no-layer-error)
    seconds: float
    note: str = ""
    written: str = ""
    notes: list = field(default_factory=list)  # the note as data: [{kind, text, value}]
    cost: dict | None = None  # LayerCost: macs, eff_macs, bops, bytes, dense_bytes, storage
    solver: str = ""  # the solver that produced the weights ('exact', 'gptq', ...; 'none' when left dense)


@dataclass
class CompressResult:
    input: str
    output: str | None
    config: dict
    layers: list[LayerReport]
    skipped: list[dict]
    not_selected: list[str]
    samples: int
    seconds: dict
    input_bytes: int | None = None
    output_bytes: int | None = None
    version: str = __version__
    sparse_storage: list | None = None  # one entry per tensor stored compactly (--sparse-storage)
    token_mask: str | None = None  # the input whose zeros marked padding left out of the Hessians
    verify: dict | None = None  # dense vs compressed outputs on calibration samples (--verify)
    activations: list | None = None  # one entry per quantized activation tensor (--act-bits)
    plan: list | None = None  # the plan that was used, one rule per layer (--plan format)
    cost: dict | None = None  # totals of the layers' costs
    extra: dict = field(default_factory=dict)  # not part of the report: 'model' holds the compressed ModelProto

    def to_dict(self) -> dict:
        return asdict(dataclasses.replace(self, extra={}))  # never a deep copy of the model


def _identity_progress(it: Iterable, desc: str, total: int | None) -> Iterable:
    return it


def compress(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike | None, calib: Any,
             config: CompressConfig, *, force: bool = False, progress: Progress | None = None) -> CompressResult:
    """Compress ``model`` with ``config`` using calibration data ``calib`` (.npz path, directory of .npz,
    or an iterable of {input_name: array} feeds) and write the result to ``output`` (None: don't save;
    the compressed ModelProto is in ``result.extra['model']``). The input model is never modified."""
    progress = progress or _identity_progress
    t0 = time.perf_counter()
    is_proto = isinstance(model, onnx.ModelProto)
    out_path = None if output is None else check_output_path(output, [] if is_proto else [model], force)
    original = _load(model)
    in_name = "<ModelProto>" if is_proto else str(model)
    work, layers, skipped, selected, specs = _plan(original, config, in_name, copy_needed=is_proto or config.verify)
    todo = [l for l in selected if specs[l.name] is not None]
    t_cal = time.perf_counter()
    stats, act, samples, token_mask = _calibrate(work, todo, specs, calib, config, progress)
    t_cal = time.perf_counter() - t_cal
    t_eng = time.perf_counter()
    solved = {}
    for layer in progress(todo, "compressing", len(todo)):
        t = time.perf_counter()
        solved[layer.name] = (_solve(layer, specs[layer.name], stats[layer.name], config), time.perf_counter() - t)
    weights = {l.name: (_weight(l, solved[l.name][0]), solved[l.name][0].grid) for l in todo}
    out_model, written = apply(work, todo, weights, ExportOptions.of(config),
                               activations=act and (act[0], act[1]()))
    t_eng = time.perf_counter() - t_eng
    verify = _verify(original, out_model, calib, config) if config.verify else None  # before anything is written
    result = CompressResult(
        input=in_name, output=str(out_path) if out_path else None,
        config=config.to_dict(), layers=[_report(l, specs[l.name], *solved[l.name], weights[l.name][0], stats[l.name],
                                                 written.layers[l.name], config) for l in todo],
        skipped=[asdict(s) for s in skipped], not_selected=[l.name for l in layers if specs.get(l.name) is None],
        samples=samples, seconds={"calibration": t_cal, "compression": t_eng}, token_mask=token_mask,
        input_bytes=original.ByteSize() if is_proto else model_file_bytes(model), verify=verify,
        sparse_storage=written.sparse_storage, activations=None if act is None else written.activations + act[2],
        plan=plan_rules([l.name for l in layers], specs),
    )
    result.cost = {k: _total([l.cost[k] for l in result.layers]) for k in ("macs", "eff_macs", "bops", "bytes", "dense_bytes")}
    if out_path is not None:
        save_model_atomic(out_model, out_path)
        result.output_bytes = model_file_bytes(out_path)
    result.seconds["total"] = time.perf_counter() - t0
    result.extra["model"] = out_model
    return result


# ------------------------------------------------------------------------------------------------- stages
def _load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto):
        return load_model(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise UnsupportedModel(f"the model is not a valid ONNX model: {str(e).strip().splitlines()[0]}") from e
    return model


def _plan(original: onnx.ModelProto, config: CompressConfig, in_name: str, *, copy_needed: bool
          ) -> tuple[onnx.ModelProto, list[Layer], list, list[Layer], dict[str, LayerSpec | None]]:
    """The model to edit (converted to the opset the plan's storage needs, zero Pads folded for W8A8), its
    layers, the skipped candidates, the selected layers and every layer's spec (None: left as it is)."""
    layers, skipped = find_layers(original)
    if not layers:
        raise UsageError(f"{in_name} has no compressible Gemm/MatMul/Conv layer with a constant weight "
                         f"({len(skipped)} candidates skipped: run `onnxobc inspect` to see why)")
    selected = select_layers(layers, config.include, config.exclude)
    if not selected:
        raise UsageError(f"--include/--exclude left none of the {len(layers)} layers: run `onnxobc inspect` to see their names")
    names = {l.name for l in selected}
    specs = resolve([l.name for l in selected], config, config.plan, check=config.check_export,
                    force_sym=config.act_bits is not None)
    specs.update({l.name: None for l in layers if l.name not in names})
    quantized = [s for s in specs.values() if s is not None and s.bits is not None]
    if config.qdq and not quantized:
        raise UsageError("--qdq stores quantized weights: give --bits B")
    if any(s is not None and s.device == "cuda" for s in specs.values()):
        get_xp("cuda")  # fail early and clearly when there is no GPU
    work = original
    if config.qdq:  # a converted copy when the opset must rise
        work = ensure_opset(work, min(s.bits for s in quantized), config.opset,
                            blocked=any(s.group_size is not None for s in quantized))
    if config.act_bits:
        from .export.actquant import fold_zero_pads

        work = copy.deepcopy(work) if (work is original and copy_needed) else work
        fold_zero_pads(work)  # zero Pads -> Conv pads, so that DQ -> Conv stays fusable (exact)
    elif work is original and copy_needed:
        work = copy.deepcopy(work)  # the one copy: calibration reads it, then apply edits it
    if work is not original:  # node indices may have moved: find the layers again, same weights
        by_weight = {l.weight_name: specs[l.name] for l in layers}
        layers, skipped = find_layers(work)
        specs = {l.name: by_weight[l.weight_name] for l in layers}
        selected = [l for l in layers if l.weight_name in {s.weight_name for s in selected}]
    return work, layers, skipped, selected, specs


def _calibrate(model: onnx.ModelProto, todo: list[Layer], specs: dict, calib: Any, config: CompressConfig,
               progress: Progress):
    """Run the model on the calibration data: Hessians (or counts), and W8A8 activation ranges.
    Returns (stats per layer, (sites, params thunk, notes) or None, samples, token mask input)."""
    if config.verify and not isinstance(calib, (str, os.PathLike, list, tuple)):
        raise UsageError("--verify reads the calibration data twice: pass a path or a list of feeds, not a one-shot "
                         "iterator or reader")
    ins = input_specs(model)
    total = count_samples(calib, ins, config.samples) if isinstance(calib, (str, os.PathLike)) else None
    batches = iter_batches(calib, ins, batch_size=config.batch_size, max_samples=config.samples)
    token_mask = find_token_mask(model, config.token_mask)
    observers, act = [], None
    if config.act_bits:
        from .calibrate.ranges import RangeObserver
        from .export.actquant import plan_sites

        sites, notes = plan_sites(model, todo)
        observers.append(RangeObserver([s.tensor for s in sites]))
        act = (sites, lambda: {s.tensor: observers[0].params(s.tensor, config.act_bits, config.act_calib,
                                                             config.act_percentile) for s in sites},
               [dict(note=n) for n in notes])
    need_h = config.layer_error or any(specs[l.name].method in HESSIAN_METHODS for l in todo)
    stats = collect_hessians(model, todo, batches, progress=progress,
                             total=None if total is None else -(-total // config.batch_size), token_mask=token_mask,
                             observers=observers, hessians=need_h)
    return stats, act, next(iter(stats.values())).samples, token_mask


def _solve(layer: Layer, spec: LayerSpec, st, config: CompressConfig) -> LayerResult:
    """One layer through the engine: its matrices, Hessians and channels-last column order as a Problem."""
    H = st.hessian() if st.has_hessian and (spec.method in HESSIAN_METHODS or config.layer_error) else None
    problem = Problem(layer.name, layer.layout.to_matrices(layer.weight).astype(np.float32), H,
                      layer.layout.channels_last_perm(layer.weight.shape),
                      functools.partial(layer.layout.group_size_problem, layer.weight.shape))
    return solve(problem, spec)


def _weight(layer: Layer, res: LayerResult) -> np.ndarray:
    """The new weight as the consumers see it."""
    return layer.layout.from_matrices(res.mats.astype(layer.weight.dtype), layer.weight.shape)


def _report(layer: Layer, spec: LayerSpec, res: LayerResult, seconds: float, w_new: np.ndarray, st, written: str,
            config: CompressConfig) -> LayerReport:
    macs = layer.static_macs()
    if macs is None:
        macs = int(round(st.positions_per_sample * layer.params))
    applied = None if res.dense else res.spec
    opts = ExportOptions.of(config)
    cost = layer_cost(layer, applied, storage_format(layer, None if applied is None else applied.bits, opts), macs,
                      config.act_bits)
    return LayerReport(
        name=layer.name, op=layer.op, shape=layer.shape_str, groups=layer.groups, params=layer.params, macs=macs,
        method="dense" if res.dense else config.spec_label(spec), sparsity=float(np.mean(w_new == 0)),
        bits=None if res.dense else spec.bits, error=res.error, seconds=seconds, note=res.note, written=written,
        notes=[asdict(n) for n in res.notes], cost=asdict(cost), solver=res.solver,
    )


def _total(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def _verify(reference: onnx.ModelProto, candidate: onnx.ModelProto, calib: Any, config: CompressConfig) -> dict:
    """Dense vs compressed on calibration samples: a model ONNX Runtime cannot load or run never reaches the disk."""
    from .evaluate import evaluate

    t = time.perf_counter()
    ev = evaluate(reference, candidate, calib, batch_size=config.batch_size, max_samples=config.verify_samples,
                  latency_runs=0)
    out = ev.to_dict()
    out["seconds"] = time.perf_counter() - t
    return out
