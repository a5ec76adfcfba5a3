"""Compose graph -> plan -> calibrate -> solve -> apply. Nothing else lives here."""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from ._version import __version__
from .backend import get_xp
from .calibrate import collect_hessians, count_samples, find_token_mask, input_specs, iter_batches
from .calibrate.data import describe_batch_axes
from .config import CompressConfig
from .engine import LayerResult, LayerSpec, Problem
from .engine.spec import HESSIAN_METHODS
from .errors import CalibrationError, UsageError
from .executor import SolveJob, executor_for
from .export import ExportOptions, apply, ensure_opset, layer_cost, save_model_atomic, storage_format
from .graph import Layer, check_output_path, find_layers, load_model, select_layers
from .graph.model_io import (lean_session, low_memory_mode, model_file_bytes, proto_bytes, spill_array, tensor_bytes,
                              validate)
from .layer_notes import dead_input_note, slow_layer_notes
from .paths import check_writable_outputs
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
    allocation: dict | None = None  # compression to a target: budget, achieved cost, database use
    correction: list | None = None  # --stats-correction: per layer, the mean shift removed and the std ratios
    memory: dict | None = None  # calibration stages and Hessian bytes held (onnxobc.stages.StagePlan.summary)
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
    with low_memory_mode(config.low_memory):
        return _compress(model, output, calib, config, force, progress or _identity_progress)


def _compress(model, output, calib, config: CompressConfig, force: bool, progress: Progress) -> CompressResult:
    t0 = time.perf_counter()
    is_proto = isinstance(model, onnx.ModelProto)
    out_path = None if output is None else check_output_path(output, [] if is_proto else [model], force)
    if out_path is not None:
        check_writable_outputs([out_path], force=True)  # its directory accepts files (existence: just above)
    in_bytes = model_file_bytes(model) if not is_proto and os.path.isfile(model) else None  # first: it parses the file
    sources: dict = {}
    original = _load(model, sources, lazy=_lazy_ok(config))
    in_name = "<ModelProto>" if is_proto else str(model)
    work, layers, skipped, selected, specs = _plan(original, config, in_name, sources=sources, copy_needed=(
        is_proto or config.verify or config.act_calib == "search" or config.act_bias_correction
        or config.smooth_alpha is not None))
    smooth_notes = []
    if config.smooth_alpha is not None:
        layers, skipped, selected, specs, smooth_notes = _smooth(work, layers, selected, specs, calib, config)
    todo = [l for l in selected if specs[l.name] is not None]
    t_eng = time.perf_counter()
    specs, todo, solved, macs, act, samples, token_mask, t_cal, allocation, memory = _compress_layers(
        work, todo, specs, calib, config, progress)
    weights = _Weights(todo, solved)
    out_model, written = apply(work, todo, weights, ExportOptions.of(config),
                               activations=act and functools.partial(_act_params, act, original, calib, config),
                               correct=_correction(work, todo, calib, config, token_mask),
                               finish=act and config.act_bias_correction and functools.partial(
                                   _act_bias_correction, original, calib, config))
    t_eng = time.perf_counter() - t_eng - t_cal
    verify = _verify(original, out_model, calib, config, samples) if config.verify else None  # before anything is written
    result = CompressResult(
        input=in_name, output=str(out_path) if out_path else None,
        config=config.to_dict(), layers=[_report(l, specs[l.name], *solved[l.name], weights.zeros[l.name], macs[l.name],
                                                 written.layers[l.name], config) for l in todo],
        skipped=[asdict(s) for s in skipped], not_selected=[l.name for l in layers if specs.get(l.name) is None],
        samples=samples, seconds={"calibration": t_cal, "compression": t_eng}, token_mask=token_mask,
        input_bytes=proto_bytes(original) if is_proto else in_bytes, verify=verify,
        sparse_storage=written.sparse_storage,
        activations=None if act is None else written.activations + act[2] + smooth_notes + (written.finish or []),
        plan=plan_rules([l.name for l in layers], specs), allocation=allocation, correction=written.correction,
        memory=memory,
    )
    slow_layer_notes(result.layers)
    result.cost = {k: _total([l.cost[k] for l in result.layers]) for k in ("macs", "eff_macs", "bops", "bytes", "dense_bytes")}
    if out_path is not None:
        # an input with its weights in external data gives an output like it (written tensor by tensor, never
        # serialised whole: no copy of the model in memory); else external data only beyond the 2 GB limit
        written_files = save_model_atomic(out_model, out_path, external_data=True if sources else None)
        result.output_bytes = sum(f.stat().st_size for f in written_files)
    result.seconds["total"] = time.perf_counter() - t0
    result.extra["model"] = out_model
    return result


# ------------------------------------------------------------------------------------------------- stages
def _load(model: str | os.PathLike | onnx.ModelProto, sources: dict | None = None, lazy: bool = False
          ) -> onnx.ModelProto:
    """The model; for a file, ``sources`` receives where its external-data weights lie (to map, not copy them),
    and with ``lazy`` its large external weights stay on disk (model_io.load_model)."""
    if not isinstance(model, onnx.ModelProto):
        return load_model(model, sources, lazy=lazy)
    validate(model, "the model")
    return model


def _lazy_ok(config: CompressConfig) -> bool:
    """Whether the run may leave the input's external-data weights on disk (see model_io.is_lazy): it only
    replaces layers' weights and writes the rest back out. The passes that read or edit arbitrary tensors of the
    model (W8A8, smoothing, bias and statistics correction, sparse storage, allocation) get it in memory."""
    return not (config.act_bits or config.smooth_alpha is not None or config.act_bias_correction
                or config.stats_correction != "none" or config.sparse_storage or config.target is not None)


def _plan(original: onnx.ModelProto, config: CompressConfig, in_name: str, *, copy_needed: bool,
          sources: dict | None = None) -> tuple[onnx.ModelProto, list[Layer], list, list[Layer], dict[str, LayerSpec | None]]:
    """The model to edit (converted to the opset the plan's storage needs, zero Pads folded for W8A8), its
    layers, the skipped candidates, the selected layers and every layer's spec (None: left as it is).
    ``sources``: where the loaded file's external-data weights lie (the layers' weights are then mapped from it,
    read-only, as long as the model is not edited before they are found)."""
    layers, skipped = find_layers(original, sources)
    if not layers:
        raise UsageError(f"{in_name} has no compressible Gemm/MatMul/Conv/ConvTranspose layer with a constant weight "
                         f"({len(skipped)} candidates skipped: run `onnxobc inspect` to see why)")
    selected = select_layers(layers, config.include, config.exclude)
    if not selected:
        raise UsageError(f"--include/--exclude left none of the {len(layers)} layers: run `onnxobc inspect` to see their names")
    names = {l.name for l in selected}
    specs = resolve([l.name for l in selected], config, config.plan, check=config.check_export,
                    force_sym=config.act_bits is not None, final=config.target is None)
    specs.update({l.name: None for l in layers if l.name not in names})
    quantized = [s for s in specs.values() if s is not None and s.bits is not None]
    qbits = [s.bits for s in quantized]
    if config.target is not None:
        from .allocation import candidate_bits

        qbits = candidate_bits(config)
    if config.qdq and not qbits:
        raise UsageError("--qdq stores quantized weights: give --bits B")
    if config.executor == "local" and any(s is not None and s.device == "cuda" for s in specs.values()):
        get_xp("cuda")  # fail early and clearly when there is no GPU (a Ray cluster's GPUs: checked by the executor)
    work = original
    if config.qdq:  # a converted copy when the opset must rise
        work = ensure_opset(work, min(qbits), config.opset,
                            blocked=any(s.group_size is not None for s in specs.values() if s is not None))
    changed = work is not original
    if config.act_bits:
        from .export.actquant import fold_batchnorm, fold_zero_pads

        work = copy.deepcopy(work) if (work is original and copy_needed) else work
        fold_zero_pads(work)  # zero Pads -> Conv pads, so that DQ -> Conv stays fusable (exact)
        fold_batchnorm(work)  # BN into the Conv before it: one activation grid after the per-channel gain
        changed = True
    elif work is original and copy_needed:
        work = copy.deepcopy(work)  # the one copy: calibration reads it, then apply edits it
    if changed:  # nodes moved (or weights were folded): find the layers again, matched by any stable name
        layers, skipped, selected, specs = _refind(work, layers, selected, specs)
    return work, layers, skipped, selected, specs


def _refind(work: onnx.ModelProto, layers: list[Layer], selected: list[Layer], specs: dict):
    """The layers of the edited ``work`` matched to the old ones by any stable name: (layers, skipped, selected,
    specs)."""
    def keys(l: Layer) -> set[str]:
        return {l.weight_name, l.name, (l.consumers[0].output_name, l.layout.weight_input)}

    old = [(keys(l), specs[l.name], l in selected) for l in layers]
    layers, skipped = find_layers(work)
    match = {l.name: next(((sp, sel) for k, sp, sel in old if k & keys(l)), (None, False)) for l in layers}
    specs = {n: m[0] for n, m in match.items()}
    selected = [l for l in layers if match[l.name][1]]
    return layers, skipped, selected, specs


def _smooth(work: onnx.ModelProto, layers: list[Layer], selected: list[Layer], specs: dict, calib: Any,
            config: CompressConfig):
    """--smooth-alpha: SmoothQuant's migration on ``work`` (in place, exact in float), then the layers found
    again (their weights changed). Returns (layers, skipped, selected, specs, notes for the report)."""
    from .calibrate.smooth import smooth

    if not isinstance(calib, (str, os.PathLike, list, tuple)):
        raise UsageError("--smooth-alpha reads the calibration data twice: pass a path or a list of feeds")
    feeds = list(iter_batches(calib, _inputs(work, config), batch_size=config.batch_size,
                              max_samples=config.samples))
    rep = smooth(work, config.smooth_alpha, feeds)
    notes = [dict(note=r["note"]) for r in rep if "note" in r]
    for r in rep:
        if "tensor" in r:
            notes.append(dict(note=(
                f"{r['tensor']}: smoothed (alpha {config.smooth_alpha:g}) for {', '.join(r['layers'])}; channel "
                f"max|x| {r['absmax_before']:.4g} ({r['absmax_ratio_before']:.1f}x the median channel) -> "
                f"{r['absmax_after']:.4g} ({r['absmax_ratio_after']:.1f}x)"
                + ("; its LayerNorm duplicated (the original output has other readers)" if r["duplicated"] else ""))))
    return (*_refind(work, layers, selected, specs), notes)


def _compress_layers(work: onnx.ModelProto, todo: list[Layer], specs: dict, calib: Any, config: CompressConfig,
                     progress: Progress):
    """Calibrate and solve every planned layer, or, with a target, build the database and allocate.
    Returns (specs, compressed layers, {name: (LayerResult, seconds)}, {name: MACs}, W8A8 ranges, samples,
    token mask input, calibration seconds, allocation report, stages summary)."""
    t_cal = time.perf_counter()
    if config.target is not None:
        from .allocation import run as allocate_layers

        def calibrate(layers: list[Layer], first: bool = True, staged: bool = False):
            # stages after the first run unoptimised (the first pass's level search is exact or off), each only
            # the graph its layers' inputs need (as in _compress_staged)
            stats, _, n, _ = _calibrate(work, layers, specs, calib, config, progress, ranges=False,
                                        **(dict(prune=True, optimize="auto" if first else "off") if staged else {}))
            return stats, n

        specs, solved, macs, allocation = allocate_layers(work, todo, specs, calib, config, calibrate, progress)
        todo = [l for l in todo if specs[l.name] is not None]
        act, token_mask = None, find_token_mask(work, config.token_mask)
        if config.act_bits and todo:
            _, act, _, _ = _calibrate(work, todo, specs, calib, config, progress, hessians=False)
        return (specs, todo, solved, macs, act, allocation["samples"], token_mask,
                allocation["seconds"]["calibration"], allocation, allocation.get("memory"))
    stages = _stage_plan(work, todo, specs, config)
    if stages.staged:
        return (specs, todo) + _compress_staged(work, todo, stages, specs, calib, config, progress) + (
            None, stages.summary())
    stats, act, samples, token_mask = _calibrate(work, todo, specs, calib, config, progress)
    t_cal = time.perf_counter() - t_cal
    _add_act_noise(todo, stats, act, config)
    solved = _solve_layers(todo, specs, stats, config, progress, spill=lean_session(tensor_bytes(work)))
    macs = {l.name: _macs(l, stats[l.name]) for l in todo}
    stages.note_held(stats)
    return specs, todo, solved, macs, act, samples, token_mask, t_cal, None, stages.summary()


def _solve_layers(layers: list[Layer], specs: dict, stats: dict, config: CompressConfig, progress: Progress,
                  ex=None, spill: bool = False) -> dict:
    """{name: (LayerResult, seconds)} for ``layers``, from their calibration statistics, on the executor ``ex``
    (default: a new one from the config; stages share one, so that Ray starts once)."""
    solved = {}
    if ex is None:
        with executor_for(config) as ex:
            return _solve_layers(layers, specs, stats, config, progress, ex, spill)
    jobs = (_job(layer, specs[layer.name], stats[layer.name], config) for layer in layers)
    by_name = {l.name: l for l in layers}
    for name, res, seconds in progress(ex.solve(jobs), "compressing", len(layers)):  # ray: as they finish
        st = stats[name]
        note = dead_input_note(by_name[name], st.xtx if st.has_hessian else None, res)
        if note is not None:
            res.notes.append(note)
        if spill and res.mats is not None:  # --low-memory: on disk until apply writes it (model_io.spill_array)
            res = dataclasses.replace(res, mats=spill_array(res.mats))
        solved[name] = (res, seconds)
    return {l.name: solved[l.name] for l in layers}  # the layers' order, wherever they were solved


def _stage_plan(work: onnx.ModelProto, todo: list[Layer], specs: dict, config: CompressConfig):
    """Which layers are calibrated together (onnxobc.stages): one pass unless the Hessians exceed the budget
    (--stage-memory) or --sequential asks for stages by depth."""
    from .stages import MB, plan_stages

    return plan_stages(work, todo, sequential=config.sequential, hessians=_need_hessians(todo, specs, config),
                       budget=None if config.stage_memory is None else int(config.stage_memory * MB))


def _compress_staged(work: onnx.ModelProto, todo: list[Layer], stages, specs: dict, calib: Any,
                     config: CompressConfig, progress: Progress):
    """Calibrate and solve stage by stage, each stage's statistics freed before the next is formed. With
    --sequential, a stage's pass runs the model whose earlier stages' weights are replaced by their compressed
    (float) values. Returns (solved, MACs, W8A8 ranges, samples, token mask, calibration seconds)."""
    from .graph import tensor_types
    from .stages import MB, replace_weights

    if not isinstance(calib, (str, os.PathLike, list, tuple)):
        why = ("--sequential" if stages.sequential else
               f"the Hessians ({stages.total / MB:.0f} MB) exceed --stage-memory {stages.budget / MB:.0f} MB, so")
        raise UsageError(f"{why} calibration runs in {len(stages.stages)} stages, reading the data once per stage: "
                         "pass a path or a list of feeds, not a one-shot iterator or reader"
                         + ("" if stages.sequential else " (or give a larger --stage-memory)"))

    types = tensor_types(work)  # once (shape inference), not once per pass
    solved: dict = {}
    macs: dict = {}
    act = samples = token_mask = None
    t_cal = 0.0
    with executor_for(config) as ex:  # one for every stage (a Ray starts once)
        for k, stage in enumerate(stages.stages):
            t = time.perf_counter()
            done = [(l, _weight(l, solved[l.name][0])) for l in todo if l.name in solved] if config.sequential else []
            # ONNX Runtime's optimisation level is searched on the first pass only; the others run unoptimised (exact
            # by definition: the search keeps only levels that reproduce it), since each search builds three more
            # sessions of the model
            stats, a, samples, token_mask = _calibrate(
                work, stage, specs, calib, config, progress, ranges=k == 0 and not config.sequential, act_layers=todo,
                hessians=_need_hessians(todo, specs, config), prune=True, types=types,
                edit=functools.partial(replace_weights, weights=done) if done else None, optimize="auto" if k == 0 else "off")
            del done
            t_cal += time.perf_counter() - t
            act = act or a
            _add_act_noise(stage, stats, act, config)
            stages.note_held(stats)
            solved.update(_solve_layers(stage, specs, stats, config, progress, ex, lean_session(tensor_bytes(work))))
            macs.update({l.name: _macs(l, stats[l.name]) for l in stage})
            del stats  # freed before the next stage's Hessians are formed
    if config.sequential and config.act_bits:  # W8A8 ranges of the compressed model: one more pass, no Hessians
        t = time.perf_counter()
        done = [(l, _weight(l, solved[l.name][0])) for l in todo]
        _, act, _, _ = _calibrate(work, todo, specs, calib, config, progress, hessians=False, prune=True, types=types,
                                  edit=functools.partial(replace_weights, weights=done))
        t_cal += time.perf_counter() - t
    return solved, macs, act, samples, token_mask, t_cal


def _add_act_noise(layers: list[Layer], stats: dict, act, config: CompressConfig) -> None:
    """--act-noise: a layer whose input gets an activation grid of step s sees x + e, e uniform of variance
    s^2 / 12 per element, independent of x, so E[(x+e)(x+e)^T] = x x^T + s^2 / 12 I: add that to the
    accumulated X X^T (every column seen), in place, before the solve."""
    if not (config.act_noise and act):
        return
    params = act[1]()
    for layer in layers:
        st = stats[layer.name]
        steps = [float(params[c.input_name].scale) for c in layer.consumers if c.input_name in params]
        if not steps or not st.has_hessian:
            continue
        idx = np.arange(st.xtx.shape[1])
        st.xtx[:, idx, idx] += st.columns * max(steps) ** 2 / 12.0


def _need_hessians(todo: list[Layer], specs: dict, config: CompressConfig) -> bool:
    return config.layer_error or config.target is not None or any(specs[l.name].method in HESSIAN_METHODS for l in todo)


def _calibrate(model: onnx.ModelProto, todo: list[Layer], specs: dict, calib: Any, config: CompressConfig,
               progress: Progress, *, ranges: bool = True, hessians: bool | None = None,
               act_layers: list[Layer] | None = None, **collect):
    """Run the model on the calibration data: Hessians (or counts) of ``todo``, and the W8A8 activation ranges
    of ``act_layers`` (default ``todo``); ``collect``: more options of collect_hessians (prune, edit, ...).
    Returns (stats per layer, (sites, params thunk, notes) or None, samples, token mask input)."""
    if config.verify_data is not None and not os.path.exists(config.verify_data):
        raise UsageError(f"--verify-data {config.verify_data}: no such file or directory")
    if config.act_calib == "search" and config.act_bits and not isinstance(calib, (str, os.PathLike, list, tuple)):
        raise UsageError("--act-calib search reads the calibration data twice: pass a path or a list of feeds")
    if config.verify and config.verify_data is None and not isinstance(calib, (str, os.PathLike, list, tuple)):
        raise UsageError("--verify reads the calibration data twice: pass a path or a list of feeds, not a one-shot "
                         "iterator or reader")
    ins = _inputs(model, config)
    total = count_samples(calib, ins, config.samples) if isinstance(calib, (str, os.PathLike)) else None
    batches = iter_batches(calib, ins, batch_size=config.batch_size, max_samples=config.samples)
    token_mask = find_token_mask(model, config.token_mask)
    observers, act = [], None
    if config.act_bits and ranges:
        from .calibrate.ranges import RangeObserver
        from .export.actquant import plan_sites

        sites, notes = plan_sites(model, todo if act_layers is None else act_layers)
        observers.append(RangeObserver([s.tensor for s in sites]))
        act = (sites, lambda: {s.tensor: observers[0].params(s.tensor, config.act_bits, config.act_calib,
                                                             config.act_percentile) for s in sites},
               [dict(note=n) for n in notes], observers[0])
    need_h = hessians if hessians is not None else _need_hessians(todo, specs, config)
    try:
        stats = collect_hessians(model, todo, batches, progress=progress,
                                 total=None if total is None else -(-total // config.batch_size), token_mask=token_mask,
                                 observers=observers, hessians=need_h, specs=ins, **collect)
    except CalibrationError as e:  # say how the inputs were sliced: a wrong batch axis fails inside ONNX Runtime
        if "ONNX Runtime failed" not in str(e):
            raise
        raise CalibrationError(f"{e}; {describe_batch_axes(ins)}") from e
    return stats, act, next(iter(stats.values())).samples, token_mask


def _inputs(model: onnx.ModelProto, config: CompressConfig):
    """The model's inputs, each with the axis its batches are cut along (--batch-axis overrides)."""
    return input_specs(model, dict(config.batch_axes or ()))


def _act_params(act: tuple, dense: onnx.ModelProto, calib: Any, config: CompressConfig, model: onnx.ModelProto):
    """The W8A8 sites and their ranges, for apply (which calls this on the model with its weights written):
    the observed ranges, or with --act-calib search the ones chosen by the output error they cause."""
    sites, params_of, notes, observer = act
    params = params_of()
    if config.act_calib == "search":
        from .calibrate.actsearch import search_activation_ranges, search_notes
        from .export.actquant import insert_activation_qdq

        feeds = list(iter_batches(calib, _inputs(dense, config), batch_size=config.batch_size,
                                  max_samples=config.act_search_samples))
        sites, params, search = search_activation_ranges(dense, model, sites, params, observer, feeds,
                                                         insert_activation_qdq, config.act_bits,
                                                         target_factor=config.act_search_target,
                                                         metric=config.act_search_metric)
        notes += [dict(note=n) for n in search_notes(search)]
    return sites, params


def _act_bias_correction(dense: onnx.ModelProto, calib: Any, config: CompressConfig, model: onnx.ModelProto
                         ) -> list[dict]:
    """--act-bias-correction, on the written W8A8 model (in place); returns notes for the activation report."""
    from .calibrate.biascorr import correct_biases

    feeds = list(iter_batches(calib, _inputs(dense, config), batch_size=config.batch_size,
                              max_samples=config.correction_samples))
    rep = correct_biases(dense, model, feeds, token_mask=find_token_mask(dense, config.token_mask))
    done = [r for r in rep if "shift" in r and "note" not in r]
    notes = [dict(note=f"bias correction on {len(feeds)} calibration batches (at most --correction-samples "
                       f"{config.correction_samples} samples): {len(done)} layers corrected, mean output shift "
                       f"(RMS over channels) "
                       f"{float(np.mean([r['shift'] for r in done])) if done else 0.0:.3g}")]
    notes += [dict(note=f"{r.get('layer', '')}: {r['note']}".lstrip(": ")) for r in rep if "note" in r]
    return notes


def _job(layer: Layer, spec: LayerSpec, st, config: CompressConfig) -> SolveJob:
    """One layer as a solve job: its matrices, Hessians and channels-last column order as a Problem; a lookup
    table (Gather): per-row grids, the error weighted by the calibration's row counts."""
    mats = layer.layout.to_matrices(layer.weight).astype(np.float32)
    check = functools.partial(layer.layout.group_size_problem, layer.weight.shape)
    if layer.layout.hessian_free:
        counts = st.row_counts if st.row_counts is not None else np.zeros(layer.rows)
        return SolveJob(layer.name, Problem(layer.name, mats, None, None, check), spec, counts)
    H = st.hessian() if st.has_hessian and (spec.method in HESSIAN_METHODS or config.layer_error) else None
    return SolveJob(layer.name, Problem(layer.name, mats, H, layer.layout.channels_last_perm(layer.weight.shape), check),
                    spec)


def _weight(layer: Layer, res: LayerResult) -> np.ndarray:
    """The new weight as the consumers see it."""
    return layer.layout.from_matrices(res.mats.astype(layer.weight.dtype), layer.weight.shape)


class _Weights(Mapping):
    """{layer name: (new weight as the consumers see it, grid)} for apply, made one layer at a time when apply asks
    for it: each layer's solved matrices are dropped from ``solved`` once its weight is made (apply writes it
    into the model and lets go of it), so the results, their weights and the written tensors never all exist at
    once. ``zeros`` records each weight's fraction of zeros for the report."""

    def __init__(self, layers: list[Layer], solved: dict):
        self.layers, self.solved, self.zeros = {l.name: l for l in layers}, solved, {}

    def __getitem__(self, name: str):
        res, seconds = self.solved[name]
        w = _weight(self.layers[name], res)
        self.zeros[name] = float(np.mean(w == 0))
        self.solved[name] = (dataclasses.replace(res, mats=None), seconds)
        return w, res.grid

    def __contains__(self, name) -> bool:  # without making the weight (Mapping's would)
        return name in self.layers

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def _macs(layer: Layer, st) -> int:
    """MACs per sample: from static shapes, else from the positions seen in calibration."""
    macs = layer.static_macs()
    return macs if macs is not None else int(round(st.positions_per_sample * layer.params))


def _report(layer: Layer, spec: LayerSpec, res: LayerResult, seconds: float, zeros: float, macs: int,
            written: str, config: CompressConfig) -> LayerReport:
    applied = None if res.dense else res.spec
    opts = ExportOptions.of(config)
    cost = layer_cost(layer, applied, storage_format(layer, None if applied is None else applied.bits, opts), macs,
                      config.act_bits)
    return LayerReport(
        name=layer.name, op=layer.op, shape=layer.shape_str, groups=layer.groups, params=layer.params, macs=macs,
        method="dense" if res.dense else config.spec_label(res.spec if layer.layout.hessian_free else spec), sparsity=zeros,
        bits=None if res.dense else spec.bits, error=res.error, seconds=seconds, written=written,
        note="; ".join(filter(None, [res.note, _storage_note(layer, applied, opts)])),
        notes=[asdict(n) for n in res.notes], cost=asdict(cost), solver=res.solver,
    )


def _storage_note(layer: Layer, applied: LayerSpec | None, opts: ExportOptions) -> str | None:
    """Why a quantized layer asked for as QDQ is stored as float fake-quant (None: it is not)."""
    why = layer.layout.qdq_problem(layer.weight.shape) if (applied is not None and applied.bits is not None
                                                          and opts.qdq) else None
    return f"stored as float fake-quant: {why}" if why else None


def _total(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def _correction(work: onnx.ModelProto, todo: list[Layer], calib: Any, config: CompressConfig, token_mask: str | None):
    """The statistics-correction step for apply (None without --stats-correction): the dense layer outputs'
    channel statistics are measured now, before the model is edited."""
    if config.stats_correction == "none" or not todo:
        return None
    from . import correction

    feeds = list(iter_batches(calib, _inputs(work, config), batch_size=config.batch_size,
                              max_samples=config.correction_samples))
    ref = correction.reference(work, todo, feeds, token_mask)
    return lambda model, deploy=None: correction.correct(ref, model, todo, feeds, config.stats_correction, token_mask,
                                                         deploy=deploy)


def _verify(reference: onnx.ModelProto, candidate: onnx.ModelProto, calib: Any, config: CompressConfig,
            samples: int) -> dict:
    """Dense vs compressed, on --verify-data or else in-sample (the first calibration samples, no more than were
    used): a model ONNX Runtime cannot load or run never reaches the disk."""
    from .evaluate import evaluate

    t = time.perf_counter()
    held_out = config.verify_data is not None
    ev = evaluate(reference, candidate, config.verify_data if held_out else calib, batch_size=config.batch_size,
                  max_samples=config.verify_samples if held_out else min(config.verify_samples, samples),
                  latency_runs=0, batch_axes=dict(config.batch_axes or ()))
    out = ev.to_dict()
    out["in_sample"] = not held_out
    out["seconds"] = time.perf_counter() - t
    return out
