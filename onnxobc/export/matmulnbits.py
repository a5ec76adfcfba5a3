"""MatMulNBits export: 4-bit MatMul weights as ONNX Runtime's com.microsoft MatMulNBits (fast int4 kernels).

MatMulNBits stores B [K, N] transposed as N rows of K codes cut into blocks of ``block_size`` with one scale
and zero point per (row, block); the kernel dequantizes (q - z) * scale like DequantizeLinear. With a
per-output-channel grid every block of a row carries the row's own scale and zero point; a group-wise grid
(``LayerGrid.group_size``) is stored as is, its group size being the block size (a power of two >= 16, as
the kernels require). Either way the stored weights are bit for bit the ones the engine chose.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.layers import Layer
from .writeback import GraphEdit
from .qdq import LayerGrid, codes_for, storage_bits

MS_DOMAIN = "com.microsoft"


def nbits_block_size(k: int, largest: int = 128) -> int:
    """A power of two in [16, largest] covering K if possible (fewer scales; all blocks share the row grid)."""
    b = 16
    while b < k and b < largest:
        b *= 2
    return b


def check_block_size(block_size: int) -> int:
    """``block_size`` if MatMulNBits accepts it (a power of two >= 16), else ValueError."""
    b = int(block_size)
    if b < 16 or b & (b - 1):
        raise ValueError(f"MatMulNBits needs a block size that is a power of two >= 16, got group_size {block_size}: "
                         "use group_size 16, 32, 64, 128... or export as QDQ")
    return b


def supports(layer: Layer, grid: LayerGrid | None) -> bool:
    """MatMul layers with a constant 2-D B quantized to at most 4 bits."""
    return layer.layout.matmulnbits and grid is not None and storage_bits(grid.bits) == 4


def _pack_rows(q: np.ndarray) -> np.ndarray:
    """(N, X) values in [0, 15] -> (N, ceil(X / 2)) bytes, the first value of each pair in the low nibble."""
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), q.dtype)], axis=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def replace_with_matmulnbits(edit: GraphEdit, layer: Layer, weight: np.ndarray, grid: LayerGrid, *,
                             accuracy_level: int = 0) -> str:
    """Turn every MatMul consumer of ``layer`` into MatMulNBits (same node name and output). The old weight
    and its chain are retired. Returns the packed weight's name.

    ``weight`` is B [K, N]; ``grid`` has rows = N and, when group-wise, groups along K (shape (N, ceil(K / gs)),
    gs a power of two >= 16, else ValueError). A partial last block is padded with code 0."""
    k, n = weight.shape
    if grid.sym:  # stored unsigned: symmetric codes are q in [0, 2^b - 1] with z = 2^(b-1)
        grid = LayerGrid(grid.scale, np.full_like(grid.zero_point, float(1 << (grid.bits - 1))), grid.bits, False,
                         grid.group_size)
    if grid.group_size is None:
        codes, zps, _ = codes_for(weight, grid, axis=1)  # uint codes [K, N], zero points [N]
        bs = nbits_block_size(k)
        nb = -(-k // bs)
        scales = np.repeat(grid.scale.astype(weight.dtype), nb)
        zpb = np.repeat(zps.astype(np.uint8), nb).reshape(n, nb)
    else:
        bs = check_block_size(grid.group_size)
        nb = -(-k // bs)
        codes, zps, _ = codes_for(weight, grid, axis=1, block_axis=0)  # uint codes [K, N], zero points [nb, N]
        scales = np.ascontiguousarray(grid.scale.astype(weight.dtype)).reshape(-1)  # (N, nb) row-major
        zpb = np.ascontiguousarray(zps.T.astype(np.uint8))
    q = np.zeros((n, nb * bs), dtype=np.uint8)
    q[:, :k] = codes.T
    # padded K positions have code 0; A has no entries there, so they never contribute
    packed = _pack_rows(q.reshape(n * nb, bs)).reshape(n, nb, bs // 2)
    zp = _pack_rows(zpb).reshape(-1)

    model, fresh = edit.model, edit.fresh
    bn, sn, zn = fresh(f"{layer.weight_name}_Q4"), fresh(f"{layer.weight_name}_scales"), fresh(f"{layer.weight_name}_zp")
    edit.add_initializers([numpy_helper.from_array(packed, bn), numpy_helper.from_array(scales, sn),
                                    numpy_helper.from_array(zp, zn)])
    for c in layer.consumers:
        old = edit.node(c.node_index)
        new = helper.make_node("MatMulNBits", [old.input[0], bn, sn, zn], list(old.output), name=old.name,
                               domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=bs, accuracy_level=accuracy_level)
        new.doc_string = old.doc_string
        edit.replace_node(c.node_index, new)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    edit.retire(layer)
    return bn
