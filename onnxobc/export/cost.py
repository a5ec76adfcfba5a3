"""The cost of a layer under a spec: MACs, BOPs and the exact bytes its weight occupies in the chosen storage.

The allocator optimises against these numbers and the report shows them, so the bytes are computed from the
same rules the writers follow (float in the source's dtype; QDQ codes + scales + zero points, 4-bit types
packed two per byte; MatMulNBits blocks), counted as tensor data (what a file holds besides names and
framing); tests/test_plan.py checks them against written files. Sparse storage is decided per tensor by the
encoder (its size is in the report's ``sparse_storage`` entries), so its bytes are not predicted here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..engine.spec import LayerSpec
from ..graph.layers import Layer
from .matmulnbits import nbits_block_size
from .qdq import qdq_pieces, storage_bits

FLOAT_BITS = 32


@dataclass
class LayerCost:
    """``macs``: dense MACs per sample (None when a dim is unknown); ``eff_macs``: MACs times the nominal density;
    ``bops``: eff_macs x weight bits x activation bits (32 for float); ``bytes``: stored weight bytes in
    ``storage``; ``dense_bytes``: the same weight stored dense in float32."""

    macs: int | None
    eff_macs: float | None
    bops: float | None
    bytes: int
    dense_bytes: int
    storage: str


def _packed(n: int, bits: int) -> int:
    return -(-n // 2) if storage_bits(bits) == 4 else n


def weight_bytes(layer: Layer, spec: LayerSpec | None, storage: str) -> int:
    """Bytes of tensor data that ``layer``'s weight occupies when written with ``spec`` as ``storage``."""
    w = layer.weight
    if spec is None or spec.bits is None or storage == "float":
        src = layer.chain[0].input_dtype if (layer.chain and layer.exclusive) else w.dtype
        return int(w.size) * np.dtype(src).itemsize
    bits, gs = spec.bits, spec.group_size
    if gs is not None and layer.layout.group_size_problem(w.shape, gs):
        gs = None  # per-channel fallback (the report notes it)
    scale_item = w.dtype.itemsize
    if storage == "matmulnbits":
        k, n = w.shape
        bs = gs if gs is not None else nbits_block_size(k)
        nb = -(-k // bs)
        return n * nb * bs // 2 + n * nb * scale_item + n * (-(-nb // 2))
    rows = layer.groups * layer.rows
    nparams = rows if gs is None else rows * math.ceil(layer.cols / gs)
    k = qdq_pieces(layer)  # DequantizeLinear nodes, each with its own (packed) tensors
    return k * (_packed(int(w.size) // k, bits) + nparams // k * scale_item + _packed(nparams // k, bits))


def layer_cost(layer: Layer, spec: LayerSpec | None, storage: str, macs: int | None,
               act_bits: int | None = None) -> LayerCost:
    density = 1.0 if spec is None else spec.density
    eff = None if macs is None else macs * density
    wbits = FLOAT_BITS if spec is None or spec.bits is None else spec.bits
    bops = None if eff is None else eff * wbits * (act_bits or FLOAT_BITS)
    return LayerCost(macs, eff, bops, weight_bytes(layer, spec, storage), int(layer.weight.size) * 4, storage)


def tensor_data_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data as stored (4-bit types packed two per byte)."""
    n = math.prod(t.dims)
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return -(-n // 2)
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
