"""QDQ export: quantized weights stored as integer initializers feeding DequantizeLinear.

The grid the engine minimises is exactly the one stored: per output channel, codes q in [0, 2^b - 1] with
zero point z, and the consumer sees (q - z) * scale computed in float32, which is bit for bit the engine's
fake-quantized weight (checked here before anything is written).

Storage types: asymmetric grids use unsigned codes (uint8, or uint4 for b <= 4), symmetric grids signed
codes shifted by 2^(b-1) with zero point 0 (int8 / int4), which is what integer kernels expect. 8-bit
DequantizeLinear with a per-axis scale needs opset >= 13, the 4-bit types opset >= 21.

Group-wise grids (one scale and zero point per output channel and group of ``group_size`` consecutive
fan-in weights) become blocked DequantizeLinear (opset >= 21 at any bit width): attributes ``axis`` (the
weight's fan-in axis) and ``block_size``, scale and zero point of the weight's rank with the fan-in axis
divided (rounded up) by the block size.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..engine.grid import Grid
from ..errors import NumericalError, UsageError
from ..graph.layers import Layer
from .writeback import GraphEdit


# The quantization grid of a whole layer, in the engine's matrix layout: the engine's own Grid (one quantizer).
# Rows are the layer's output channels in channel order (the rows of all Conv groups stacked, so rows = Cout).
# Per-channel grids (``group_size=None``): ``scale`` and ``zero_point`` have shape (rows,). Group-wise grids:
# shape (rows, ngroups), entry (r, j) serving the engine's columns [j * group_size, min((j + 1) * group_size, C))
# of row r, where the engine's columns run over the weight's fan-in axis innermost and its other non-output axes
# outermost, i.e. for Conv the CHANNELS-LAST column order c = tap * (Cin/g) + ci of
# :meth:`OpLayout.channels_last_perm` (identical to the stored order for 1x1 kernels). A Conv with more than one
# kernel tap needs group_size to divide Cin/g so that no group straddles two taps (see :func:`group_size_problem`).
# ngroups = ceil(C / group_size), the last group of a Gemm/MatMul may be partial.
LayerGrid = Grid


def storage_bits(bits: int) -> int:
    """4 for 2..4-bit grids (int4/uint4), 8 for 5..8-bit grids."""
    return 4 if bits <= 4 else 8


def required_opset(bits: int, blocked: bool = False) -> int:
    """Lowest opset storing ``bits``-bit QDQ weights: 21 for int4/uint4 codes or blocked (group-wise)
    DequantizeLinear, else 13 (per-axis DequantizeLinear)."""
    return 21 if (blocked or storage_bits(bits) == 4) else 13


def main_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def ensure_opset(model: onnx.ModelProto, bits: int, opset: int | None, *, blocked: bool = False) -> onnx.ModelProto:
    """The model at an opset where ``bits``-bit QDQ weights (group-wise when ``blocked``) can be stored:
    unchanged when it already is, converted with onnx's version converter when the user allowed it
    (``opset``), else a clear error."""
    need = required_opset(bits, blocked)
    have = main_opset(model)
    target = max(need, opset or 0) if opset else None
    if have >= need and (opset is None or opset <= have):
        return model
    if target is None:
        if blocked:
            raise UsageError(f"--qdq with group-wise grids needs blocked DequantizeLinear, i.e. opset >= {need}, but "
                             f"the model has opset {have}: pass --opset {need} to convert the model (or use "
                             "per-channel grids)")
        kind = "int4/uint4 initializers" if need == 21 else "per-channel DequantizeLinear"
        raise UsageError(f"--qdq with {bits}-bit weights needs {kind}, i.e. opset >= {need}, but the model has opset "
                         f"{have}: pass --opset {need} to convert the model (or use --bits {'8' if need == 21 else bits} "
                         "without --qdq)")
    if target < have:
        raise UsageError(f"--opset {opset} is lower than the model's opset {have}: onnxobc never lowers an opset")
    from onnx import version_converter

    from ..graph.model_io import has_lazy, needs_external_data, restore_elided, split_external, validate

    try:
        if needs_external_data(model) or has_lazy(model):  # the converter serialises its input: convert the skeleton, weights after
            converted = restore_elided(version_converter.convert_version(split_external(model), target), model)
        else:
            converted = version_converter.convert_version(model, target)
        converted.ir_version = max(converted.ir_version, 10 if target >= 21 else converted.ir_version)
        validate(converted, "the converted model")  # onnx.checker, or ONNX Runtime where the checker is stricter
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot convert the model from opset {have} to {target} ({msg}); convert it yourself or "
                         "use 8-bit weights") from e
    return converted


def group_size_problem(layer: Layer, group_size: int) -> str | None:
    """Why ``layer`` cannot store group-wise grids of ``group_size`` as blocked DequantizeLinear (None: it can);
    the op adapter knows (a Conv block cannot straddle kernel taps)."""
    return layer.layout.group_size_problem(layer.weight.shape, group_size)


def blocked_params(shape: tuple[int, ...], grid: LayerGrid, axis: int, block_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A group-wise ``grid`` (rows, ngroups) as blocked DequantizeLinear's scale and zero point (float).

    ``shape`` is the weight's shape as consumers see it, ``axis`` its output-channel axis and ``block_axis``
    its fan-in axis. The engine's columns run over the remaining axes (in weight order, outermost) and
    ``block_axis`` (innermost): see :class:`LayerGrid`. The result has the weight's rank, with
    ``shape[block_axis]`` replaced by ceil(shape[block_axis] / group_size).
    """
    gs = grid.group_size
    if gs is None:
        raise ValueError("blocked_params needs a group-wise grid")
    nd = len(shape)
    axis, block_axis = axis % nd, block_axis % nd
    if axis == block_axis:
        raise ValueError("the output-channel axis and the blocked axis must differ")
    other = [a for a in range(nd) if a not in (axis, block_axis)]
    d = int(shape[block_axis])
    nb = -(-d // gs)
    n_other = int(np.prod([shape[a] for a in other])) if other else 1
    if n_other > 1 and d % gs:
        raise ValueError(f"group_size {gs} does not divide the blocked axis ({d}) of a weight of shape {tuple(shape)}: "
                         "blocks would straddle the other axes")
    rows = int(shape[axis])
    want = (rows, n_other * nb)
    if tuple(grid.scale.shape) != want or tuple(grid.zero_point.shape) != want:
        raise ValueError(f"a group-wise grid for a weight of shape {tuple(shape)} (group_size {gs}) must have shape "
                         f"{want}, got {tuple(grid.scale.shape)}")
    # (rows, other..., nb) in engine order -> permuted into the weight's axis order
    src_axes = [axis] + other + [block_axis]
    dims = [rows] + [int(shape[a]) for a in other] + [nb]
    perm = [src_axes.index(a) for a in range(nd)]

    def lay(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a).reshape(dims).transpose(perm))

    return lay(grid.scale), lay(grid.zero_point)


def _expand_blocks(a: np.ndarray, block_axis: int, block_size: int, d: int) -> np.ndarray:
    """Blocked parameters repeated to every element along ``block_axis`` (length ``d``)."""
    return np.repeat(a, block_size, axis=block_axis).take(np.arange(d), axis=block_axis)


def codes_for(weight: np.ndarray, grid: LayerGrid, axis: int,
              block_axis: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(integer codes in the storage dtype, zero points in the storage dtype, ONNX element type).

    ``axis`` is the weight's output-channel axis. Group-wise grids also need ``block_axis`` (the fan-in
    axis); their zero points come back in blocked DequantizeLinear layout (see :func:`blocked_params`),
    those of per-channel grids as a 1-D array along ``axis``. Raises NumericalError unless every weight is
    bit for bit on its grid.
    """
    if grid.group_size is None:
        shape = [1] * weight.ndim
        shape[axis] = -1
        s = grid.scale.astype(np.float32).reshape(shape)
        z = grid.zero_point.astype(np.float32).reshape(shape)
        zp_out = grid.zero_point
    else:
        if block_axis is None:
            raise ValueError("a group-wise grid needs the weight's blocked (fan-in) axis")
        s_blk, z_blk = blocked_params(weight.shape, grid, axis, block_axis)
        d = weight.shape[block_axis]
        s = _expand_blocks(s_blk.astype(np.float32), block_axis, grid.group_size, d)
        z = _expand_blocks(z_blk.astype(np.float32), block_axis, grid.group_size, d)
        zp_out = z_blk
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
        zps = np.zeros(np.shape(zp_out), dtype=np.int8)
        et = TensorProto.INT4 if sb == 4 else TensorProto.INT8
    else:
        codes = q.astype(np.uint8)
        zps = np.asarray(zp_out).astype(np.uint8)
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


def qdq_split(layer: Layer) -> tuple[int, int]:
    """(pieces, axis): how many DequantizeLinear nodes store ``layer``'s weight, and the axis along which their
    slices are joined by a Concat. One, or the groups when the output-channel axis holds only one group's
    channels (ConvTranspose W [Cin, Cout/g, k...]: each group's slice along the fan-in axis gets its own
    per-channel DequantizeLinear), or what the adapter says (recurrent W / R: one per direction, along axis 0)."""
    own = layer.layout.qdq_split(layer.weight.shape)
    if own is not None:
        return own
    return qdq_pieces_by_groups(layer), layer.layout.fan_in_axis()


def qdq_pieces(layer: Layer) -> int:
    """How many DequantizeLinear nodes store ``layer``'s weight (see :func:`qdq_split`)."""
    return qdq_split(layer)[0]


def qdq_pieces_by_groups(layer: Layer) -> int:
    if layer.groups > 1 and int(layer.weight.shape[layer.layout.out_axis()]) != layer.groups * layer.rows:
        return layer.groups
    return 1


def _dq_piece(edit: GraphEdit, layer: Layer, weight: np.ndarray, grid: LayerGrid, base: str) -> tuple[str, str]:
    """Integer codes + scale + zero point -> DequantizeLinear (waiting in ``edit.front``) for ``weight``;
    returns (codes name, DequantizeLinear output)."""
    fresh = edit.fresh
    axis = layer.layout.out_axis()
    if grid.group_size is not None:
        block_axis = layer.layout.fan_in_axis()
        codes, zps, et = codes_for(weight, grid, axis, block_axis)
        scale = blocked_params(weight.shape, grid, axis, block_axis)[0]
        attrs = dict(axis=block_axis, block_size=int(grid.group_size))
    else:
        codes, zps, et = codes_for(weight, grid, axis)
        scale = grid.scale
        attrs = dict(axis=axis)
    qn, sn, zn = fresh(f"{base}_quantized"), fresh(f"{base}_scale"), fresh(f"{base}_zero_point")
    out, node_name = fresh(f"{base}_dequantized"), fresh(f"{base}_DequantizeLinear")
    edit.add_initializers([
        _tensor(qn, codes, et),
        numpy_helper.from_array(np.asarray(scale).astype(weight.dtype), sn),
        _tensor(zn, zps, et),
    ])
    edit.add_front(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=node_name, **attrs))
    return qn, out


def add_qdq_weight(edit: GraphEdit, layer: Layer, weight: np.ndarray, grid: LayerGrid) -> str:
    """Replace ``layer``'s weight by integer codes -> DequantizeLinear (per output channel, or blocked along
    the fan-in axis for a group-wise grid: the model must then have opset >= 21, see :func:`ensure_opset`).

    ``weight`` is the new weight as the consumers see it and ``grid`` its :class:`LayerGrid` (engine layout:
    rows = output channels; group-wise grids with the engine's, for Conv channels-last, column order).
    The consumers are rewired to the DequantizeLinear output (a node waiting in ``edit.front``) and the old
    weight and its chain are retired. A grouped ConvTranspose gets one DequantizeLinear per group and a Concat
    (:func:`qdq_pieces`). Returns the name of the (first) integer codes.
    """
    model = edit.model
    if grid.group_size is not None:
        why = group_size_problem(layer, grid.group_size)
        if why:
            raise UsageError(f"{layer.name}: {why}")
        if main_opset(model) < 21:
            raise UsageError(f"{layer.name}: group-wise QDQ weights need opset >= 21 (blocked DequantizeLinear), the "
                             f"model has opset {main_opset(model)}: convert it first (ensure_opset(..., blocked=True))")
    base = layer.weight_name
    pieces, split = qdq_split(layer)
    if pieces == 1:
        qn, out = _dq_piece(edit, layer, weight, grid, base)
    else:
        parts = np.split(weight, pieces, axis=split)
        per = layer.groups * layer.rows // pieces  # grid rows (output channels) per piece
        names = [_dq_piece(edit, layer, part, grid.rows(slice(j * per, (j + 1) * per)), f"{base}_g{j}")
                 for j, part in enumerate(parts)]
        qn = names[0][0]
        out = edit.fresh(f"{base}_dequantized")
        edit.add_front(helper.make_node("Concat", [o for _, o in names], [out], name=edit.fresh(f"{base}_Concat"),
                                        axis=split))
    edit.rewire(layer, out)
    edit.retire(layer)
    return qn
