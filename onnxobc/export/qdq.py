"""QDQ export: quantized weights stored as integer initializers feeding DequantizeLinear.

The grid the engine minimises is exactly the one stored: per output channel, codes q in [0, 2^b - 1] with
zero point z, and the consumer sees (q - z) * scale computed in float32, which is bit for bit the engine's
fake-quantized weight (checked here before anything is written).

Storage types: asymmetric grids use unsigned codes (uint8, or uint4 for b <= 4), symmetric grids signed
codes shifted by 2^(b-1) with zero point 0 (int8 / int4), which is what integer kernels expect. 8-bit
DequantizeLinear with a per-axis scale needs opset >= 13, the 4-bit types opset >= 21.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import NumericalError, UsageError
from ..graph.layers import Layer
from .writeback import NameAllocator, retire_weight


@dataclass
class LayerGrid:
    """One per-output-channel grid over all rows of a layer (rows across Conv groups, in channel order)."""

    scale: np.ndarray  # (rows,) float32
    zero_point: np.ndarray  # (rows,) integer-valued floats in [0, 2^bits - 1]
    bits: int
    sym: bool


def storage_bits(bits: int) -> int:
    """4 for 2..4-bit grids (int4/uint4), 8 for 5..8-bit grids."""
    return 4 if bits <= 4 else 8


def required_opset(bits: int) -> int:
    return 21 if storage_bits(bits) == 4 else 13


def main_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def ensure_opset(model: onnx.ModelProto, bits: int, opset: int | None) -> onnx.ModelProto:
    """The model at an opset where ``bits``-bit QDQ weights can be stored: unchanged when it already is,
    converted with onnx's version converter when the user allowed it (``opset``), else a clear error."""
    need = required_opset(bits)
    have = main_opset(model)
    target = max(need, opset or 0) if opset else None
    if have >= need and (opset is None or opset <= have):
        return model
    if target is None:
        kind = "int4/uint4 initializers" if need == 21 else "per-channel DequantizeLinear"
        raise UsageError(f"--qdq with {bits}-bit weights needs {kind}, i.e. opset >= {need}, but the model has opset "
                         f"{have}: pass --opset {need} to convert the model (or use --bits {'8' if need == 21 else bits} "
                         "without --qdq)")
    if target < have:
        raise UsageError(f"--opset {opset} is lower than the model's opset {have}: onnxobc never lowers an opset")
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot convert the model from opset {have} to {target} ({msg}); convert it yourself or "
                         "use 8-bit weights") from e
    converted.ir_version = max(converted.ir_version, 10 if target >= 21 else converted.ir_version)
    return converted


def _weight_axis(layer: Layer) -> int:
    """Axis of the weight tensor (as consumers see it) that indexes output channels."""
    if layer.op == "Conv":
        return 0
    if layer.op == "Gemm":
        return 0 if layer.layout.attrs.get("transB", 0) else 1
    return 1  # MatMul B [K, N]


def codes_for(weight: np.ndarray, grid: LayerGrid, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(integer codes in the storage dtype, zero points in the storage dtype, ONNX element type)."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    s = grid.scale.astype(np.float32).reshape(shape)
    z = grid.zero_point.astype(np.float32).reshape(shape)
    maxq = (1 << grid.bits) - 1
    q = np.clip(np.rint(weight.astype(np.float32) / s) + z, 0, maxq)
    deq = (q - z) * s
    if not np.array_equal(deq.astype(weight.dtype), weight):
        bad = float(np.max(np.abs(deq - weight)))
        raise NumericalError(f"internal error: weights are not on their grid (max deviation {bad:g}); please report it")
    sb = storage_bits(grid.bits)
    if grid.sym:
        shift = 1 << (grid.bits - 1)
        codes = (q - shift).astype(np.int8)
        zps = np.zeros(grid.scale.shape, dtype=np.int8)
        et = TensorProto.INT4 if sb == 4 else TensorProto.INT8
    else:
        codes = q.astype(np.uint8)
        zps = grid.zero_point.astype(np.uint8)
        et = TensorProto.UINT4 if sb == 4 else TensorProto.UINT8
    return codes, zps, et


def pack_4bit(values: np.ndarray) -> bytes:
    """ONNX 4-bit raw layout: two values per byte, the first in the low nibble; an odd count is padded."""
    flat = values.astype(np.uint8).ravel() & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _tensor(name: str, values: np.ndarray, et: int) -> TensorProto:
    if et in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, et, list(values.shape), pack_4bit(values), raw=True)
    return numpy_helper.from_array(values, name)


def add_qdq_weight(model: onnx.ModelProto, layer: Layer, weight: np.ndarray, grid: LayerGrid,
                   dead: set[str]) -> onnx.NodeProto:
    """Replace ``layer``'s weight by integer codes -> DequantizeLinear (per output channel).

    The consumers are rewired to the DequantizeLinear output; the old weight tensor and its chain are
    recorded in ``dead`` for :func:`remove_unused`. The DequantizeLinear node is returned, not inserted, so
    that node indices of the other layers stay valid: insert the nodes with :func:`insert_nodes` at the end.
    """
    fresh = NameAllocator(model)
    axis = _weight_axis(layer)
    codes, zps, et = codes_for(weight, grid, axis)
    base = layer.weight_name
    qn, sn, zn = fresh(f"{base}_quantized"), fresh(f"{base}_scale"), fresh(f"{base}_zero_point")
    out, node_name = fresh(f"{base}_dequantized"), fresh(f"{base}_DequantizeLinear")
    model.graph.initializer.extend([
        _tensor(qn, codes, et),
        numpy_helper.from_array(grid.scale.astype(weight.dtype), sn),
        _tensor(zn, zps, et),
    ])
    dq = helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=node_name, axis=axis)
    for c in layer.consumers:
        model.graph.node[c.node_index].input[1] = out
    retire_weight(model, layer, dead)
    return dq


def insert_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Put nodes whose inputs are all initializers at the front of the graph (a valid topological place)."""
    for n in reversed(nodes):
        model.graph.node.insert(0, n)
