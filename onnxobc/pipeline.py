"""Compose graph -> calibrate -> engine -> export. Nothing else lives here."""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from . import __version__
from .backend import get_xp, to_numpy
from .calibrate import collect_hessians, count_samples, find_token_mask, input_specs, iter_batches
from .calibrate.data import describe_batch_axes
from .config import CompressConfig
from .engine.baselines import magnitude_prune, magnitude_prune_nm, rtn_quantize
from .engine.metrics import error_terms
from .errors import CalibrationError, UnsupportedModel, UsageError
from .export.matmulnbits import replace_with_matmulnbits
from .export.matmulnbits import supports as mnb_supports
from .export.qdq import group_size_problem
from .export import LayerGrid, add_qdq_weight, ensure_opset, insert_nodes, remove_unused, save_model_atomic, write_back
from .graph import Layer, check_output_path, find_layers, load_model, select_layers
from .graph.model_io import model_file_bytes
from .paths import check_writable_outputs

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
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _identity_progress(it: Iterable, desc: str, total: int | None) -> Iterable:
    return it


def _baseline(mats: np.ndarray, cfg: CompressConfig) -> tuple[np.ndarray, LayerGrid | None]:
    """Magnitude pruning (one threshold over the whole layer, all groups) and/or RTN of the survivors."""
    g, r, c = mats.shape
    out = mats.reshape(g * r, c)
    mask = None
    if cfg.nm is not None:
        out = magnitude_prune_nm(out, *cfg.nm)
        mask = out != 0
    elif cfg.sparsity is not None:
        out = magnitude_prune(out, cfg.sparsity)
        mask = out != 0
    grid = None
    if cfg.bits is not None:
        out, gr = rtn_quantize(out, cfg.bits, sym=cfg.sym, grid_method=cfg.grid, mask=mask, group_size=cfg.group_size)
        grid = LayerGrid(np.asarray(gr.scale, np.float32), np.asarray(gr.zero_point), gr.bits, gr.sym, cfg.group_size)
    return out.reshape(g, r, c), grid


def _exact(mats: np.ndarray, H: np.ndarray, cfg: CompressConfig, name: str) -> tuple[np.ndarray, LayerGrid | None, str]:
    """The OBC engine on every group (one global mask over the groups for unstructured/block sparsity)."""
    from .engine import compress_groups

    xp = get_xp(cfg.device)
    res = compress_groups(
        [xp.asarray(m) for m in mats], [xp.asarray(h) for h in H], sparsity=cfg.sparsity, nm=cfg.nm,
        block_size=cfg.block_size, bits=cfg.bits, sym=cfg.sym, grid_method=cfg.grid, damp=cfg.damp, name=name,
        dtype=cfg.dtype, group_size=cfg.group_size,
    )
    damps = [r.info.get("damp", cfg.damp) for r in res]
    note = f"damp raised to {max(damps):g}" if max(damps) > cfg.damp else ""
    grid = None
    if all(r.grid is not None for r in res):
        grid = LayerGrid(np.concatenate([to_numpy(r.grid.scale).astype(np.float32) for r in res]),
                         np.concatenate([to_numpy(r.grid.zero_point) for r in res]), res[0].grid.bits, res[0].grid.sym,
                         cfg.group_size)
    return np.stack([to_numpy(r.weight).astype(mats.dtype) for r in res]), grid, note


def compress_layer(layer: Layer, H: np.ndarray | None, cfg: CompressConfig
                   ) -> tuple[np.ndarray, float | None, str, LayerGrid | None]:
    """Compress every group of ``layer`` given its Hessians (groups x C x C); returns the new weight as the
    consumers see it, the relative layer error ||WX - W'X||^2 / ||WX||^2, a note, and the quantization grid
    (one per output channel, None without --bits)."""
    mats = layer.layout.to_matrices(layer.weight).astype(np.float32)
    m = cfg.nm[1] if cfg.nm else cfg.block_size
    note = ""
    if m and layer.cols % m:
        what = f"{cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm else f"block {cfg.block_size}"
        note = f"C={layer.cols} is not a multiple of {m} ({what})"
        if cfg.bits is None:
            return layer.weight.copy(), 0.0, f"left dense: {note}", None
        note = f"not pruned: {note}"
        cfg = CompressConfig(method="rtn" if cfg.method == "magnitude" else cfg.method, bits=cfg.bits, sym=cfg.sym,
                             grid=cfg.grid, damp=cfg.damp, device=cfg.device, dtype=cfg.dtype,
                             group_size=cfg.group_size)
    if cfg.group_size is not None:
        why = group_size_problem(layer, cfg.group_size)
        if why:
            note = "; ".join(x for x in (note, f"per-channel grid: {why}") if x)
            cfg = dataclasses.replace(cfg, group_size=None)
    # N:M and block patterns, and quantization groups, run along input channels at each kernel tap
    # (channels-last), as sparse kernels and blocked DequantizeLinear expect
    perm = (layer.layout.channels_last_perm(layer.weight.shape) if (cfg.nm or cfg.block_size or cfg.group_size)
            else None)
    work, Hw = mats, H
    if perm is not None:
        work = mats[:, :, perm]
        Hw = H[:, perm][:, :, perm] if H is not None else None
    if cfg.method == "exact":
        new, grid, extra = _exact(work, Hw, cfg, layer.name)
        note = "; ".join(x for x in (note, extra) if x)
    else:
        new, grid = _baseline(work, cfg)
    if perm is not None:
        new = new[:, :, np.argsort(perm)]
    w_new = layer.layout.from_matrices(new.astype(layer.weight.dtype), layer.weight.shape)
    if H is None:  # a baseline without Hessians (--no-layer-error)
        return w_new, None, note, grid
    num = den = 0.0
    for g in range(layer.groups):
        a, b = error_terms(mats[g], new[g], H[g])
        num += a
        den += b
    err = num / den if den > 0 else 0.0
    return w_new, float(err), note, grid


def compress(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike | None, calib: Any,
             config: CompressConfig, *, force: bool = False, progress: Progress | None = None) -> CompressResult:
    """Compress ``model`` with ``config`` using calibration data ``calib`` (.npz path, directory of .npz,
    or an iterable of {input_name: array} feeds) and write the result to ``output`` (None: don't save;
    the compressed ModelProto is in ``result.extra['model']``). The input model is never modified."""
    progress = progress or _identity_progress
    t0 = time.perf_counter()
    in_name = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    out_path = None
    if output is not None:
        out_path = check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [], force)
        check_writable_outputs([out_path], force=True)  # its directory accepts files (existence: just above)
    if isinstance(model, onnx.ModelProto):
        src = model
        try:
            onnx.checker.check_model(src)
        except onnx.checker.ValidationError as e:
            raise UnsupportedModel(f"the model is not a valid ONNX model: {str(e).strip().splitlines()[0]}") from e
    else:
        src = load_model(model)
    if config.qdq:
        src = ensure_opset(src, config.bits, config.opset, blocked=config.group_size is not None)  # a converted copy when the opset must rise
    if config.act_bits:
        from .export.actquant import fold_batchnorm, fold_zero_pads

        src = copy.deepcopy(src)  # never the caller's ModelProto
        fold_zero_pads(src)  # zero Pads -> Conv pads, so that DQ -> Conv stays fusable (exact)
        fold_batchnorm(src)  # BN into the Conv before it: one activation grid after the per-channel gain
    layers, skipped = find_layers(src)
    selected = select_layers(layers, config.include, config.exclude)
    if not layers:
        raise UsageError(f"{in_name} has no compressible Gemm/MatMul/Conv layer with a constant weight "
                         f"({len(skipped)} candidates skipped: run `onnxobc inspect` to see why)")
    if not selected:
        raise UsageError(f"--include/--exclude left none of the {len(layers)} layers: run `onnxobc inspect` to see their names")
    if config.device == "cuda":
        get_xp("cuda")  # fail early and clearly when there is no GPU
    if config.verify_data is not None and not os.path.exists(config.verify_data):
        raise UsageError(f"--verify-data {config.verify_data}: no such file or directory")
    if config.act_calib == "search" and config.act_bits and not isinstance(calib, (str, os.PathLike, list, tuple)):
        raise UsageError("--act-calib search reads the calibration data twice: pass a path or a list of feeds")
    if config.verify and config.verify_data is None and not isinstance(calib, (str, os.PathLike, list, tuple)):
        raise UsageError("--verify reads the calibration data twice: pass a path or a list of feeds, not a one-shot "
                         "iterator or reader")
    specs = input_specs(src, dict(config.batch_axes or ()))
    total = count_samples(calib, specs, config.samples) if isinstance(calib, (str, os.PathLike)) else None
    batches = iter_batches(calib, specs, batch_size=config.batch_size, max_samples=config.samples)
    t_cal = time.perf_counter()
    token_mask = find_token_mask(src, config.token_mask)
    observers, sites, act_notes = [], [], []
    if config.act_bits:
        from .calibrate.ranges import RangeObserver
        from .export.actquant import plan_sites

        sites, act_notes = plan_sites(src, selected)
        observers.append(RangeObserver([s.tensor for s in sites]))
    try:
        stats = collect_hessians(src, selected, batches, progress=progress,
                                 total=None if total is None else -(-total // config.batch_size), token_mask=token_mask,
                                 observers=observers, hessians=config.method == "exact" or config.layer_error)
    except CalibrationError as e:  # say how the inputs were sliced: a wrong batch axis fails inside ONNX Runtime
        if "ONNX Runtime failed" not in str(e):
            raise
        raise CalibrationError(f"{e}; {describe_batch_axes(specs)}") from e
    t_cal = time.perf_counter() - t_cal
    samples = next(iter(stats.values())).samples

    out_model = copy.deepcopy(src)
    reports: list[LayerReport] = []
    dead: set[str] = set()
    dq_nodes: list = []
    t_eng = time.perf_counter()
    for layer in progress(selected, "compressing", len(selected)):
        st = stats[layer.name]
        t = time.perf_counter()
        w_new, err, note, grid = compress_layer(layer, st.hessian() if st.has_hessian else None, config)
        if config.matmulnbits and mnb_supports(layer, grid):
            written = "MatMulNBits " + replace_with_matmulnbits(out_model, layer, w_new, grid, dead,
                                                                accuracy_level=config.accuracy_level)
        elif config.qdq and grid is not None:
            dq_nodes.append(add_qdq_weight(out_model, layer, w_new, grid, dead))
            written = f"QDQ {dq_nodes[-1].input[0]}"
        else:
            written = write_back(out_model, layer, w_new, dead)
        macs = layer.static_macs()
        if macs is None:
            macs = int(round(st.positions_per_sample * layer.params))
        reports.append(LayerReport(
            name=layer.name, op=layer.op, shape=layer.shape_str, groups=layer.groups, params=layer.params, macs=macs,
            method=config.describe() if not note.startswith("left dense") else "dense",
            sparsity=float(np.mean(w_new == 0)), bits=config.bits if not note.startswith("left dense") else None,
            error=err, seconds=time.perf_counter() - t, note=note, written=written,
        ))
    insert_nodes(out_model, dq_nodes)
    remove_unused(out_model, dead)
    act_report = None
    if config.act_bits:
        from .export.actquant import insert_activation_qdq

        act_params = {s.tensor: observers[0].params(s.tensor, config.act_bits, config.act_calib, config.act_percentile)
                      for s in sites}
        if config.act_calib == "search":
            from .calibrate.actsearch import search_notes, search_activation_ranges

            feeds = list(iter_batches(calib, specs, batch_size=config.batch_size, max_samples=min(samples, 64)))
            sites, act_params, search = search_activation_ranges(src, out_model, sites, act_params, observers[0],
                                                                 feeds, insert_activation_qdq, config.act_bits)
            act_notes += search_notes(search)
        params = insert_activation_qdq(out_model, sites, act_params)
        act_report = [dict(tensor=s.tensor, used_as=s.why, **asdict(params[s.tensor])) for s in sites]
        act_report += [dict(note=n) for n in act_notes]
    sparse_report = None
    if config.sparse_storage:
        from .export.sparse import sparse_encode

        out_model, sparse_report = sparse_encode(out_model)
    t_eng = time.perf_counter() - t_eng
    verify = None
    if config.verify:
        # before anything is written: a model that ONNX Runtime cannot load or run never reaches the disk
        from .evaluate import evaluate

        t_ver = time.perf_counter()
        held_out = config.verify_data is not None  # else in-sample: the first calibration samples, no more
        ev = evaluate(src, out_model, config.verify_data if held_out else calib, batch_size=config.batch_size,
                      max_samples=config.verify_samples if held_out else min(config.verify_samples, samples),
                      latency_runs=0, batch_axes=dict(config.batch_axes or ()))
        verify = ev.to_dict()
        verify["in_sample"] = not held_out
        verify["seconds"] = time.perf_counter() - t_ver
    result = CompressResult(
        input=in_name, output=str(out_path) if out_path else None, config=config.to_dict(), layers=reports,
        skipped=[asdict(s) for s in skipped], not_selected=[l.name for l in layers if l not in selected],
        samples=samples, seconds={"calibration": t_cal, "compression": t_eng}, token_mask=token_mask,
        input_bytes=model_file_bytes(model) if not isinstance(model, onnx.ModelProto) else src.ByteSize(),
    )
    if out_path is not None:
        save_model_atomic(out_model, out_path)
        result.output_bytes = model_file_bytes(out_path)
    result.seconds["total"] = time.perf_counter() - t0
    if verify is not None:
        result.verify = verify
    if sparse_report is not None:
        result.sparse_storage = sparse_report
    result.activations = act_report
    result.extra["model"] = out_model
    return result
