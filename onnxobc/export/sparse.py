"""Sparse storage: pruned initializers stored compactly, decoded by standard ONNX ops at session creation.

Every eligible initializer is replaced by a compact encoding (a few new initializers) plus a small decode
subgraph whose inputs are all initializers and whose last node writes the ORIGINAL tensor name, so the
consumers (Conv/Gemm/MatMul weights, DequantizeLinear code inputs) are untouched. ONNX Runtime's constant
folding (ORT_ENABLE_BASIC and above) evaluates the subgraph once when the session is created, so inference
runs on the same dense initializer as before; with optimizations disabled the subgraph simply runs on every
call. The decoded tensor is bit for bit the original: "zero" means an all-zero bit pattern for floats
(-0.0 is kept as a value), and for integer codes the DequantizeLinear zero point of the element's channel.

Two encodings, the smaller one wins per tensor (the N:M one on a tie):

* ``bitmask``: one occupancy bit per element (uint8, eight per byte, element ``8*i + j`` in bit ``j`` of
  byte ``i``) and the non-zero values in element order, in the tensor's own type (4-bit codes stay packed two
  per byte). Decode: BitShift + Mod unpack the bits, NonZero gives the positions, ScatterElements writes
  the values into a tensor of zeros (or of zero points), Reshape gives the shape back.
* ``nm``: N:M semi-structured, when every group of M consecutive elements along one axis (for Conv
  ``[Cout, Cin, k...]`` along Cin at each kernel tap, for MatMul ``B [K, N]`` along K, for Gemm along K) holds
  at most N non-zeros. Per group the N kept values are stored, plus which of the C(M, N) position sets it
  uses, several groups per byte in base C(M, N) (three groups per byte for 2:4, i.e. 2.67 bits per group
  where two bits per index would need four). Decode: Div/Mod split the bytes into pattern numbers, Gather
  maps them to in-group positions, ScatterElements writes the values into the groups, Reshape/Transpose give
  the layout back. 2:4 costs 2 values + 2.67 bits per 4 weights, and the decoded tensor is the exact 2:4
  tensor, so an engine with sparse kernels (TensorRT) sees the pattern.

ONNX Runtime 1.32 has no Reshape/ScatterElements/Gather kernels for int4/uint4, so 4-bit code tensors are
decoded in 8 bits (the stored 4-bit values are Cast up first) and Cast to int4/uint4 at the end; Cast to
and from the 4-bit types is implemented and constant-folded. The decode ops need opset >= 11 (BitShift,
ScatterElements, ConstantOfShape with a typed value); below that nothing is encoded.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .qdq import main_opset, pack_4bit

log = logging.getLogger(__name__)

MIN_OPSET = 11
_NM_CANDIDATES = (4, 8, 2)  # group sizes M tried (C(M, N) <= 256 for all N, so one pattern fits a byte)

_FLOAT_TYPES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2}
_CODE_TYPES = {TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT4: 4, TensorProto.INT4: 4}
_WIDE = {TensorProto.UINT4: TensorProto.UINT8, TensorProto.INT4: TensorProto.INT8}  # decode type of 4-bit codes
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.UINT8: np.uint8,
       TensorProto.INT8: np.int8, TensorProto.UINT4: np.uint8, TensorProto.INT4: np.int8}


@dataclass
class _Target:
    """One initializer considered for encoding, with what "zero" means for it."""

    name: str
    dtype: int  # ONNX element type
    dense: np.ndarray  # values as numpy (4-bit codes widened to uint8/int8)
    background: np.ndarray  # same shape as dense, broadcastable: the value that counts as zero
    zero_point: str | None = None  # per-axis zero point initializer name (codes)
    zp_axis: int | None = None  # axis of the per-axis zero point
    group_axes: list[int] = field(default_factory=list)  # N:M axes to try, preferred first

    @property
    def is_code(self) -> bool:
        return self.dtype in _CODE_TYPES

    @property
    def elem_bits(self) -> int:
        return _CODE_TYPES[self.dtype] if self.is_code else 8 * _FLOAT_TYPES[self.dtype]


class _Graph:
    """New initializers and nodes of one candidate encoding, with unique names."""

    def __init__(self, taken_values: set[str], taken_nodes: set[str], shared: dict[str, str]):
        self.taken_values, self.taken_nodes, self.shared = taken_values, taken_nodes, shared
        self.inits: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.new_shared: dict[str, str] = {}
        self._local: set[str] = set()
        self._local_nodes: set[str] = set()

    def _fresh(self, base: str, nodes: bool = False) -> str:
        taken, local = (self.taken_nodes, self._local_nodes) if nodes else (self.taken_values, self._local)
        name, k = base, 1
        while name in taken or name in local:
            name = f"{base}_{k}"
            k += 1
        local.add(name)
        return name

    def init(self, base: str, tensor: TensorProto) -> str:
        tensor.name = self._fresh(base)
        self.inits.append(tensor)
        return tensor.name

    def const(self, key: str, array: np.ndarray) -> str:
        """A small constant shared by all decode subgraphs of the model (created once)."""
        if key in self.shared:
            return self.shared[key]
        if key not in self.new_shared:
            self.new_shared[key] = self.init(f"sparse_decode/{key}", numpy_helper.from_array(np.asarray(array)))
        return self.new_shared[key]

    def op(self, prefix: str, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        node_name = self._fresh(f"{prefix}/sparse_{op}", nodes=True)
        out = out or self._fresh(f"{prefix}/sparse_{op}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=node_name, **attrs))
        return out

    def size(self) -> int:
        return sum(t.ByteSize() for t in self.inits) + sum(n.ByteSize() for n in self.nodes)

    def commit(self, model: onnx.ModelProto, front: list[onnx.NodeProto]) -> None:
        model.graph.initializer.extend(self.inits)
        front.extend(self.nodes)
        self.taken_values |= self._local
        self.taken_nodes |= self._local_nodes
        self.shared.update(self.new_shared)


# ----------------------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------------------

def _is_zero(t: _Target) -> np.ndarray:
    """Boolean mask of the elements that need no storage (bit-exact: -0.0 is not zero)."""
    if t.is_code:
        return t.dense == t.background
    view = t.dense.view(np.uint32 if t.dense.dtype == np.float32 else np.uint16)
    return view == 0


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    uses.setdefault(name, []).append((node, i))
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(g)

    walk(model.graph)
    return uses


def _reduction_axes(uses, name: str, rank: int, depth: int = 0) -> list[int]:
    """Axes along which the consumers reduce (where N:M groups run for sparse kernels), preferred first."""
    found: list[int] = []
    for node, i in uses.get(name, []):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ax = None
        if node.op_type == "Conv" and i == 1 and rank >= 3:
            ax = 1
        elif node.op_type == "MatMul" and rank >= 2:
            ax = rank - 2 if i == 1 else rank - 1
        elif node.op_type == "Gemm" and rank == 2 and i in (0, 1):
            ax = (0 if attrs.get("transA", 0) else 1) if i == 0 else (1 if attrs.get("transB", 0) else 0)
        elif node.op_type == "DequantizeLinear" and i == 0 and depth == 0:
            found += _reduction_axes(uses, node.output[0], rank, depth + 1)
        if ax is not None and ax not in found:
            found.append(ax)
    return found


def _targets(model: onnx.ModelProto, opset: int, min_elements: int) -> list[_Target]:
    g = model.graph
    uses = _consumers(model)
    graph_io = {v.name for v in g.input} | {v.name for v in g.output}
    out: list[_Target] = []
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        if t.name in graph_io or t.data_location == TensorProto.EXTERNAL or not uses.get(t.name):
            continue
        n = math.prod(t.dims)
        if n < min_elements or n == 0:
            continue
        if t.data_type in _FLOAT_TYPES:
            dense = numpy_helper.to_array(t)
            bg = np.zeros((), dense.dtype)
            tgt = _Target(t.name, t.data_type, dense, bg)
        elif t.data_type in _CODE_TYPES:
            if t.data_type in _WIDE and opset < 21:
                continue
            dq = [(node, i) for node, i in uses[t.name] if node.op_type == "DequantizeLinear" and i == 0
                  and node.domain in ("", "ai.onnx")]
            if not dq:
                continue
            node = dq[0][0]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("block_size", 0):
                continue  # blocked zero points: not handled
            dense = numpy_helper.to_array(t).astype(_NP[t.data_type])
            zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            zp_axis = None
            if zp_name is None:
                bg = np.zeros((), dense.dtype)
            elif zp_name in inits and zp_name not in graph_io:
                zp = numpy_helper.to_array(inits[zp_name]).astype(dense.dtype)
                if zp.size == 1:
                    bg = zp.reshape(())
                elif zp.ndim == 1:
                    zp_axis = int(attrs.get("axis", 1)) % dense.ndim
                    if zp.shape[0] != dense.shape[zp_axis]:
                        continue
                    if np.all(zp == zp[0]):
                        bg = zp[:1].reshape(())
                    else:
                        shape = [1] * dense.ndim
                        shape[zp_axis] = -1
                        bg = zp.reshape(shape)
                else:
                    continue
            else:
                continue  # zero point not a constant we can read
            tgt = _Target(t.name, t.data_type, dense, bg, zp_name if bg.ndim else None, zp_axis if bg.ndim else None)
        else:
            continue
        pref = _reduction_axes(uses, t.name, tgt.dense.ndim)
        tgt.group_axes = pref + [a for a in reversed(range(tgt.dense.ndim)) if a not in pref]
        out.append(tgt)
    return out


def _nm_fit(zero: np.ndarray, axis: int) -> dict[int, int]:
    """For each candidate M dividing the axis: the largest non-zero count of any group (N < M only)."""
    res = {}
    moved = np.moveaxis(~zero, axis, -1)
    for m in _NM_CANDIDATES:
        if moved.shape[-1] % m:
            continue
        counts = moved.reshape(-1, m).sum(axis=1)
        n = int(counts.max()) if counts.size else 0
        if n < m:
            res[m] = max(n, 1)
    return res


def _pattern_layout(m: int, n: int) -> tuple[list[tuple[int, ...]], int]:
    """The C(m, n) position sets in lexicographic order, and how many pattern numbers share one byte."""
    pats = list(itertools.combinations(range(m), n))
    k = 1
    while len(pats) ** (k + 1) <= 256:
        k += 1
    return pats, k


# ----------------------------------------------------------------------------------------------------------
# encoders: each fills a _Graph and returns the arrays it stored (for a NumPy round trip)
# ----------------------------------------------------------------------------------------------------------

def _values_tensor(t: _Target, values: np.ndarray) -> TensorProto:
    if t.dtype in _WIDE:
        return helper.make_tensor("v", t.dtype, list(values.shape), pack_4bit(values), raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(values.astype(t.dense.dtype)))


def _wide(t: _Target) -> int:
    return _WIDE.get(t.dtype, t.dtype)


def _background(g: _Graph, t: _Target, layout_shape: list[int], layout_axes: list[int], out_shape: list[int]) -> str:
    """A tensor of ``out_shape`` holding the background (zero or zero points) of every element.

    ``layout_shape`` is the tensor in the order the decoder writes it (dims of the original axes
    ``layout_axes``), whose row-major flattening ``out_shape`` reshapes."""
    p = t.name
    if t.zero_point is None:  # one value for all elements
        value = numpy_helper.from_array(np.asarray(t.background, t.dense.dtype).reshape(1))
        value.data_type = _wide(t)
        return g.op(p, "ConstantOfShape", [g.const(f"shape_{'x'.join(map(str, out_shape))}",
                                                    np.asarray(out_shape, np.int64))], value=value)
    j = layout_axes.index(t.zp_axis)
    pre, c, post = math.prod(layout_shape[:j]), layout_shape[j], math.prod(layout_shape[j + 1:])
    zp = t.zero_point
    if t.dtype in _WIDE:
        zp = g.op(p, "Cast", [zp], to=_wide(t))
    zp = g.op(p, "Reshape", [zp, g.const("shape_col", np.asarray([-1, 1], np.int64))])
    full = g.op(p, "Expand", [zp, g.const(f"shape_{pre}x{c}x{post}", np.asarray([pre, c, post], np.int64))])
    return g.op(p, "Reshape", [full, g.const(f"shape_{'x'.join(map(str, out_shape))}", np.asarray(out_shape, np.int64))])


def _finish(g: _Graph, t: _Target, x: str, shape: list[int], perm: list[int] | None) -> None:
    """Reshape (and transpose) the decoded values to the tensor's shape under its original name."""
    p = t.name
    last = t.dtype not in _WIDE and not perm
    x = g.op(p, "Reshape", [x, g.const(f"shape_{'x'.join(map(str, shape))}", np.asarray(shape, np.int64))],
             out=t.name if last else None)
    if perm:
        x = g.op(p, "Transpose", [x], out=t.name if t.dtype not in _WIDE else None, perm=[int(a) for a in np.argsort(perm)])
    if t.dtype in _WIDE:
        g.op(p, "Cast", [x], out=t.name, to=t.dtype)


def _encode_bitmask(g: _Graph, t: _Target, zero: np.ndarray) -> dict:
    p, flat = t.name, t.dense.ravel()
    keep = ~zero.ravel()
    total = flat.size
    bits = np.zeros(-(-total // 8) * 8, np.uint8)
    bits[:total] = keep
    mask = (bits.reshape(-1, 8) << np.arange(8, dtype=np.uint8)).sum(axis=1, dtype=np.uint8).reshape(-1, 1)
    # slot 0 holds the background (any value where it varies per channel), slot i the i-th non-zero
    lead = np.asarray(t.background).ravel()[:1].astype(flat.dtype)
    values = np.concatenate([lead, flat[keep]])
    m = g.init(f"{p}/sparse_mask", numpy_helper.from_array(mask))
    v = g.init(f"{p}/sparse_values", _values_tensor(t, values))
    b = g.op(p, "Cast", [m], to=TensorProto.INT32)
    b = g.op(p, "Div", [b, g.const("pow2_i32", (1 << np.arange(8)).astype(np.int32))])
    b = g.op(p, "Mod", [b, g.const("two_i32", np.asarray(2, np.int32))])
    b = g.op(p, "Reshape", [b, g.const("shape_flat", np.asarray([-1], np.int64))])
    if bits.size != total:
        b = g.op(p, "Slice", [b, g.const("zero_i64", np.asarray([0], np.int64)),
                              g.const(f"end_{total}", np.asarray([total], np.int64))])
    # index of each element's value: its rank among the non-zeros (1-based), 0 for a zero
    c = g.op(p, "CumSum", [b, g.const("zero_i32", np.asarray(0, np.int32))])
    c = g.op(p, "Mul", [c, b])
    shape = list(t.dense.shape)
    c = g.op(p, "Reshape", [c, g.const(f"shape_{'x'.join(map(str, shape))}", np.asarray(shape, np.int64))])
    if t.dtype in _WIDE:
        v = g.op(p, "Cast", [v], to=_wide(t))
    per_axis = t.zero_point is not None
    last = not per_axis and t.dtype not in _WIDE
    x = g.op(p, "Gather", [v, c], out=t.name if last else None)
    if per_axis:
        cond = g.op(p, "Cast", [c], to=TensorProto.BOOL)
        zp = t.zero_point
        if t.dtype in _WIDE:
            zp = g.op(p, "Cast", [zp], to=_wide(t))
        bshape = [1] * len(shape)
        bshape[t.zp_axis] = -1
        zp = g.op(p, "Reshape", [zp, g.const(f"shape_{'x'.join(map(str, bshape))}", np.asarray(bshape, np.int64))])
        x = g.op(p, "Where", [cond, x, zp], out=t.name if t.dtype not in _WIDE else None)
    if t.dtype in _WIDE:
        g.op(p, "Cast", [x], out=t.name, to=t.dtype)
    return {"encoding": "bitmask", "mask": mask, "values": values}


def _encode_nm(g: _Graph, t: _Target, zero: np.ndarray, axis: int, m: int, n: int) -> dict:
    p = t.name
    nd = t.dense.ndim
    perm = [a for a in range(nd) if a != axis] + [axis]
    moved = np.transpose(t.dense, perm)
    layout = list(moved.shape)
    groups_nz = ~np.transpose(zero, perm).reshape(-1, m)
    groups = moved.reshape(-1, m)
    n_groups = groups.shape[0]
    pats, k = _pattern_layout(m, n)
    lookup = {pat: i for i, pat in enumerate(pats)}
    # positions per group: the non-zeros, then the first zeros to fill N (their stored value is the background)
    order = np.argsort(~groups_nz, axis=1, kind="stable")[:, :n]
    pos = np.sort(order, axis=1)
    weights = 1 << np.arange(m, dtype=np.int64)
    number_of = np.full(1 << m, -1, np.int64)  # position-set bitmask -> pattern number
    for pat, i in lookup.items():
        number_of[weights[list(pat)].sum()] = i
    pat_no = number_of[weights[pos].sum(axis=1)]
    values = np.take_along_axis(groups, pos, axis=1)
    c = len(pats)
    nbytes = -(-n_groups // k)
    padded = np.zeros(nbytes * k, np.int64)
    padded[:n_groups] = pat_no
    packed = (padded.reshape(-1, k) * (c ** np.arange(k, dtype=np.int64))).sum(axis=1).astype(np.uint8).reshape(-1, 1)

    b = g.init(f"{p}/sparse_nm_patterns", numpy_helper.from_array(packed))
    v = g.init(f"{p}/sparse_values", _values_tensor(t, values))
    d = g.op(p, "Cast", [b], to=TensorProto.INT32)
    if k > 1:
        d = g.op(p, "Div", [d, g.const(f"radix{c}x{k}", (c ** np.arange(k)).astype(np.int32))])
        d = g.op(p, "Mod", [d, g.const(f"radix{c}", np.asarray(c, np.int32))])
    d = g.op(p, "Reshape", [d, g.const("shape_flat", np.asarray([-1], np.int64))])
    if nbytes * k != n_groups:
        d = g.op(p, "Slice", [d, g.const("zero_i64", np.asarray([0], np.int64)),
                              g.const(f"end_{n_groups}", np.asarray([n_groups], np.int64))])
    idx = g.op(p, "Gather", [g.const(f"nm_positions_{n}of{m}", np.asarray(pats, np.int64)), d])
    if t.dtype in _WIDE:
        v = g.op(p, "Cast", [v], to=_wide(t))
    base = _background(g, t, layout, perm, [n_groups, m])
    x = g.op(p, "ScatterElements", [base, idx, v], axis=1)
    _finish(g, t, x, layout, perm if perm != list(range(nd)) else None)
    return {"encoding": f"nm {n}:{m}", "nm": (n, m), "axis": axis, "patterns": packed, "values": values,
            "perm": perm, "k": k}


def _decode_numpy(t: _Target, enc: dict) -> np.ndarray:
    """What the decode subgraph computes, in NumPy: a guard against encoder bugs before anything is written."""
    shape = t.dense.shape
    bg = np.broadcast_to(t.background, shape).astype(t.dense.dtype)
    if enc["encoding"] == "bitmask":
        bits = ((enc["mask"].astype(np.int32).reshape(-1, 1) // (1 << np.arange(8))) % 2).ravel()[:bg.size]
        idx = np.cumsum(bits) * bits
        return np.where(idx.reshape(shape) > 0, enc["values"][idx].reshape(shape), bg)
    n, m = enc["nm"]
    pats, k = _pattern_layout(m, n)
    c = len(pats)
    digits = (enc["patterns"].astype(np.int64).reshape(-1, 1) // (c ** np.arange(k)) % c).ravel()
    out = np.transpose(bg, enc["perm"]).reshape(-1, m).copy()
    idx = np.asarray(pats, np.int64)[digits[:out.shape[0]]]
    np.put_along_axis(out, idx, enc["values"], axis=1)
    return np.transpose(out.reshape(np.transpose(bg, enc["perm"]).shape), np.argsort(enc["perm"]))


# ----------------------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------------------

def sparse_encode(model: onnx.ModelProto, *, min_sparsity: float = 0.3,
                  min_elements: int = 256) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` whose sparse initializers are stored compactly (see the module docstring).

    Eligible: main-graph initializers with at least ``min_elements`` elements that are not graph inputs or
    outputs, either float32/float16 with at least ``min_sparsity`` of exact zeros, or uint8/int8 (and
    uint4/int4 at opset >= 21) codes feeding input 0 of a DequantizeLinear whose zero point is a constant,
    with at least ``min_sparsity`` of codes equal to their channel's zero point. A tensor is encoded only
    when its new initializers and decode nodes together take fewer serialized bytes than it did.

    Returns the new model and one dict per encoded tensor: name, dtype, shape, encoding ("bitmask" or
    "nm N:M"), group axis for N:M, sparsity, bytes_before (the initializer's serialized size) and
    bytes_after (new initializers + decode nodes). ``model`` itself is not modified.
    """
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if int(min_elements) < 1:
        raise ValueError(f"min_elements must be >= 1, got {min_elements}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = main_opset(model)
    if opset < MIN_OPSET:
        log.info("sparse storage needs opset >= %d (BitShift, ScatterElements); the model has opset %d: "
                 "nothing encoded", MIN_OPSET, opset)
        return out, []

    g = out.graph
    taken_values = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
    taken_values |= {o for nd in g.node for o in nd.output} | {i for nd in g.node for i in nd.input}
    taken_values |= {v.name for v in g.value_info} | {t.values.name for t in g.sparse_initializer}
    taken_nodes = {nd.name for nd in g.node}
    shared: dict[str, str] = {}
    front: list[onnx.NodeProto] = []
    report: list[dict] = []
    replaced: set[str] = set()

    for t in _targets(out, opset, int(min_elements)):
        zero = _is_zero(t)
        sparsity = float(zero.mean())
        if sparsity < min_sparsity:
            continue
        old = next(x for x in g.initializer if x.name == t.name)
        before = old.ByteSize()
        candidates = []
        gb = _Graph(taken_values, taken_nodes, shared)
        candidates.append((gb, _encode_bitmask(gb, t, zero)))
        best_nm = None  # (estimated bytes, axis, m, n)
        for axis in t.group_axes:
            for m, n in _nm_fit(zero, axis).items():
                est = math.prod(t.dense.shape) // m * n * t.elem_bits / 8
                est += -(-(math.prod(t.dense.shape) // m) // _pattern_layout(m, n)[1])
                if best_nm is None or est < best_nm[0]:
                    best_nm = (est, axis, m, n)
        if best_nm is not None:
            gn = _Graph(taken_values, taken_nodes, shared)
            candidates.append((gn, _encode_nm(gn, t, zero, best_nm[1], best_nm[2], best_nm[3])))
        graph_, enc = min(candidates, key=lambda c: (c[0].size(), c[1]["encoding"] == "bitmask"))
        after = graph_.size()
        if after >= before:
            log.debug("%s: %s encoding would take %d bytes, dense %d: left dense", t.name, enc["encoding"], after, before)
            continue
        if not np.array_equal(np.ascontiguousarray(_decode_numpy(t, enc)).view(np.uint8), t.dense.view(np.uint8)):
            raise RuntimeError(f"internal error: the {enc['encoding']} encoding of {t.name} does not round-trip")
        graph_.commit(out, front)
        replaced.add(t.name)
        info = {"name": t.name, "dtype": TensorProto.DataType.Name(t.dtype).lower(), "shape": list(t.dense.shape),
                "encoding": enc["encoding"], "sparsity": sparsity, "bytes_before": before, "bytes_after": after}
        if "axis" in enc:
            info["axis"] = enc["axis"]
        report.append(info)
        log.debug("%s %s: %s, %d -> %d bytes", t.name, info["shape"], enc["encoding"], before, after)

    if replaced:
        keep = [x for x in g.initializer if x.name not in replaced]
        del g.initializer[:]
        g.initializer.extend(keep)
        for nd in reversed(front):
            g.node.insert(0, nd)
    return out, report
