"""Sparse storage: pruned initializers stored compactly, decoded by standard ONNX ops at session creation.

Every eligible initializer is replaced by a compact encoding (a few new initializers) plus a small decode
subgraph whose inputs are all initializers and whose last node writes the ORIGINAL tensor name, so the
consumers (Conv/Gemm/MatMul weights, DequantizeLinear code inputs) are untouched. ONNX Runtime's constant
folding (ORT_ENABLE_BASIC and above) evaluates the subgraph once when the session is created and inference
runs on the same dense initializer as before; with optimizations disabled the subgraph runs on every call.
The decoded tensor is bit for bit the original: "zero" means an all-zero bit pattern for floats (-0.0 is
stored as a value), and for integer codes the DequantizeLinear zero point of the element's channel.

Two encodings; per tensor the smaller one (serialized initializers + decode nodes) wins, N:M when it is
within ``NM_MARGIN`` of the bitmask (see :func:`_choose`), and nothing when neither beats the dense tensor:

* ``bitmask``: one occupancy bit per element (uint8, element ``8*i + j`` in bit ``j`` of byte ``i``) and
  the non-zero values in element order, in the tensor's own type (4-bit codes stay packed two per byte),
  after one background slot. Decode: Div/Mod unpack the bits, CumSum * bit gives every element the slot of
  its value (0 for a zero), Gather reads the values; per-channel zero points come back through Where
  (from a one-byte-per-channel copy of them stored with the encoding).
* ``nm``: N:M semi-structured, when every group of M consecutive elements along one axis holds at most N
  non-zeros. The axis is the one the consumer reduces over when one divides by M (Conv ``[Cout, Cin, k...]``:
  Cin at each kernel tap; MatMul ``B [K, N]``: K; Gemm: K), else any axis that fits. Per group the N kept
  values are stored, plus which of the C(M, N) position sets it uses, several groups per byte in base
  C(M, N) (three per byte for 2:4: 2.67 bits per group where two 2-bit indices need four). Decode: Div/Mod
  split the bytes into pattern numbers, Gather maps them to in-group positions, ScatterElements writes the
  values into a tensor of zeros (ConstantOfShape; per-channel zero points: Expand of a copy of them),
  Reshape/Transpose restore the layout. 2:4 costs 2 values + 2.67 bits per 4 weights, and the decoded
  tensor is the exact 2:4 tensor an engine with sparse kernels (TensorRT) needs.

Each encoded tensor also costs its decode nodes and a few shape constants, roughly 0.6-1.4 kB serialized (the
node names carry the tensor name): on layers of a few thousand weights (4-bit ones especially) that can eat
the saving, and such tensors stay dense.

ONNX Runtime limits that shaped the decoders (1.32, CPU):

* Constant folding leaves NonZero (data-dependent output shape) in the graph, so every decode tensor has a
  static shape (CumSum/Gather/Where instead of NonZero/ScatterND).
* No Reshape/Gather/ScatterElements/Where/Expand kernels for int4/uint4, and no Div for uint8: 4-bit codes
  are decoded in 8 bits (stored 4-bit values Cast up first) and Cast to int4/uint4 at the end (Cast to and
  from the 4-bit types exists and folds); bit and base-C arithmetic runs in int32.
* ORT prepacks constant MatMul/Gemm weights at session creation; with ORT_DISABLE_ALL the decoded weight is
  not constant, so large MatMul/Gemm may sum in a different order than with the dense initializer (outputs
  within float rounding, not always bit-identical). With any folding level the decoded weight is an
  initializer again and outputs are bit-identical.

The decode ops need opset >= 11 (CumSum, ScatterElements); below that nothing is encoded. 4-bit codes only
exist at opset >= 21. The model's opsets, inputs, outputs and metadata are kept as they are.
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
NM_MARGIN = (256, 0.01)  # N:M is preferred over a bitmask up to this many bytes + this fraction larger
_GROUP_SIZES = (4, 8, 2)  # N:M group sizes M tried; C(M, N) <= 256, so one pattern number fits a byte

_FLOAT_TYPES = {TensorProto.FLOAT: 32, TensorProto.FLOAT16: 16}
_CODE_TYPES = {TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT4: 4, TensorProto.INT4: 4}
_WIDE = {TensorProto.UINT4: TensorProto.UINT8, TensorProto.INT4: TensorProto.INT8}  # decode type of 4-bit codes
_NP = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8, TensorProto.UINT4: np.uint8, TensorProto.INT4: np.int8}


@dataclass
class _Target:
    """One initializer considered for encoding, with what counts as zero in it."""

    name: str
    dtype: int  # ONNX element type of the initializer
    dense: np.ndarray  # its values (4-bit codes widened to uint8/int8)
    background: np.ndarray  # scalar, or zero points shaped to broadcast against ``dense``
    zp_axis: int | None = None  # axis of per-channel zero points (``background`` then has that axis only)
    group_axes: list[int] = field(default_factory=list)  # N:M axes to try, preferred first

    @property
    def elem_bits(self) -> int:
        return _CODE_TYPES.get(self.dtype) or _FLOAT_TYPES[self.dtype]

    @property
    def wide(self) -> int:
        """Element type the decoder computes in (int4/uint4 have too few ORT kernels)."""
        return _WIDE.get(self.dtype, self.dtype)

    def zero_mask(self) -> np.ndarray:
        """Elements that need no storage (bit-exact: -0.0 is not zero)."""
        if self.dtype in _CODE_TYPES:
            return self.dense == self.background
        return self.dense.view(np.uint32 if self.dense.dtype == np.float32 else np.uint16) == 0


@dataclass
class _Names:
    """Names used in the model (values and nodes, subgraphs included) and the shared decode constants."""

    values: set[str]
    nodes: set[str]
    shared: dict[str, str] = field(default_factory=dict)
    next_id: int = 0

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Names:
        values: set[str] = set()
        nodes: set[str] = set()

        def walk(g: onnx.GraphProto) -> None:
            values.update(t.name for t in g.initializer)
            values.update(t.values.name for t in g.sparse_initializer)
            values.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
            for nd in g.node:
                nodes.add(nd.name)
                values.update(nd.input)
                values.update(nd.output)
                for a in nd.attribute:
                    for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        walk(sub)

        walk(model.graph)
        return cls(values, nodes)


class _Graph:
    """The new initializers and nodes of one candidate encoding of one tensor.

    Decode nodes are named ``<tensor>/sparse<k>``. Their intermediate outputs get short model-unique names
    (``sp<n>``): a name is stored again in every node that reads it, which adds up on small models.
    """

    def __init__(self, t: _Target, names: _Names):
        self.t, self.names = t, names
        self.inits: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.new_shared: dict[str, str] = {}
        self._values: set[str] = set()
        self._nodes: set[str] = set()
        self._next_id = names.next_id

    def _free(self, name: str, nodes: bool = False) -> bool:
        return name not in (self.names.nodes if nodes else self.names.values) and name not in (
            self._nodes if nodes else self._values)

    def init(self, base: str, tensor: TensorProto) -> str:
        name, k = base, 1
        while not self._free(name):
            name, k = f"{base}_{k}", k + 1
        self._values.add(name)
        tensor.name = name
        self.inits.append(tensor)
        return name

    def const(self, key: str, array: np.ndarray) -> str:
        """A small constant shared by all decode subgraphs of the model (stored once)."""
        if key in self.names.shared:
            return self.names.shared[key]
        if key not in self.new_shared:
            self.new_shared[key] = self.init(f"sparse/{key}", numpy_helper.from_array(np.asarray(array)))
        return self.new_shared[key]

    def shape(self, dims) -> str:
        dims = [int(d) for d in dims]
        return self.const("shape_" + "x".join(map(str, dims)), np.asarray(dims, np.int64))

    def op(self, op: str, inputs: list[str], last: bool = False, **attrs) -> str:
        """Append a node; ``last`` makes it write the original tensor name."""
        k = len(self.nodes)
        node_name = f"{self.t.name}/sparse{k}"
        while not self._free(node_name, nodes=True):
            k += 1
            node_name = f"{self.t.name}/sparse{k}"
        self._nodes.add(node_name)
        if last:
            out = self.t.name
        else:
            while not self._free(out := f"sp{self._next_id}"):
                self._next_id += 1
            self._values.add(out)
        self.nodes.append(helper.make_node(op, inputs, [out], name=node_name, **attrs))
        return out

    def size(self) -> int:
        return sum(t.ByteSize() for t in self.inits) + sum(n.ByteSize() for n in self.nodes)

    def commit(self, model: onnx.ModelProto, front: list[onnx.NodeProto]) -> None:
        model.graph.initializer.extend(self.inits)
        front.extend(self.nodes)
        self.names.values |= self._values
        self.names.nodes |= self._nodes
        self.names.shared.update(self.new_shared)
        self.names.next_id = self._next_id

    # -- pieces shared by the encoders ------------------------------------------------------------------

    def values(self, values: np.ndarray) -> str:
        """Store ``values`` in the tensor's own type; returns them in the decode type."""
        t = self.t
        if t.dtype in _WIDE:
            stored = helper.make_tensor("v", t.dtype, list(values.shape), pack_4bit(values), raw=True)
        else:
            stored = numpy_helper.from_array(np.ascontiguousarray(values.astype(t.dense.dtype)))
        name = self.init(f"{t.name}/sparse_values", stored)
        return self.op("Cast", [name], to=t.wide) if t.dtype in _WIDE else name

    def zero_points(self, bshape: list[int]) -> str:
        """The per-channel zero points in the decode type, shaped ``bshape``: a copy (one byte per channel)
        costs less than the Cast + Reshape nodes that would adapt the DequantizeLinear's own."""
        zp = np.ascontiguousarray(self.t.background.reshape(bshape))
        return self.init(f"{self.t.name}/sparse_zero_points", numpy_helper.from_array(zp))

    def to_storage(self, x: str) -> str:
        """The decoded tensor in the initializer's own type, under its name."""
        return self.op("Cast", [x], last=True, to=self.t.dtype) if self.t.dtype in _WIDE else x


# ----------------------------------------------------------------------------------------------------------
# which tensors
# ----------------------------------------------------------------------------------------------------------

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


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _reduction_axes(uses, name: str, rank: int, through_dq: bool = True) -> list[int]:
    """Axes the consumers reduce over (where N:M groups serve sparse kernels), preferred first."""
    found: list[int] = []
    for node, i in uses.get(name, []):
        a = _attrs(node)
        axes: list[int] = []
        if node.op_type == "Conv" and i == 1 and rank >= 3:
            axes = [1]
        elif node.op_type == "MatMul" and rank >= 2:
            axes = [rank - 2 if i == 1 else rank - 1]
        elif node.op_type == "Gemm" and rank == 2 and i in (0, 1):
            axes = [(0 if a.get("transA", 0) else 1) if i == 0 else (1 if a.get("transB", 0) else 0)]
        elif node.op_type == "DequantizeLinear" and i == 0 and through_dq:
            axes = _reduction_axes(uses, node.output[0], rank, through_dq=False)
        found += [ax for ax in axes if ax not in found]
    return found


def _code_target(t: TensorProto, uses, inits, graph_io) -> _Target | None:
    """An integer code tensor read by DequantizeLinear, with its zero points as background (or None)."""
    dq = [node for node, i in uses[t.name] if node.op_type == "DequantizeLinear" and i == 0
          and node.domain in ("", "ai.onnx")]
    if not dq:
        return None
    a = _attrs(dq[0])
    if a.get("block_size", 0):
        return None  # blocked zero points: not handled
    dense = numpy_helper.to_array(t).astype(_NP[t.data_type])
    zp_name = dq[0].input[2] if len(dq[0].input) > 2 and dq[0].input[2] else None
    if zp_name is None:
        return _Target(t.name, t.data_type, dense, np.zeros((), dense.dtype))
    if zp_name not in inits or zp_name in graph_io:
        return None  # zero point not a constant we can read
    zp = numpy_helper.to_array(inits[zp_name]).astype(dense.dtype)
    if zp.size == 1 or (zp.ndim == 1 and np.all(zp == zp[0])):
        return _Target(t.name, t.data_type, dense, zp.reshape(-1)[0].reshape(()))
    axis = int(a.get("axis", 1))
    if zp.ndim != 1 or not -dense.ndim <= axis < dense.ndim or zp.shape[0] != dense.shape[axis % dense.ndim]:
        return None
    axis %= dense.ndim
    shape = [1] * dense.ndim
    shape[axis] = -1
    return _Target(t.name, t.data_type, dense, zp.reshape(shape), axis)


def _targets(model: onnx.ModelProto, opset: int, min_elements: int) -> list[_Target]:
    g = model.graph
    uses = _consumers(model)
    graph_io = {v.name for v in g.input} | {v.name for v in g.output}
    inits = {t.name: t for t in g.initializer}
    out: list[_Target] = []
    for t in g.initializer:
        if t.name in graph_io or t.data_location == TensorProto.EXTERNAL or not uses.get(t.name):
            continue  # overridable, a graph output, data not loaded, or unused
        size = math.prod(t.dims)
        if size < max(min_elements, 1):
            continue
        if t.data_type in _FLOAT_TYPES:
            dense = numpy_helper.to_array(t)
            tgt = _Target(t.name, t.data_type, dense, np.zeros((), dense.dtype))
        elif t.data_type in _CODE_TYPES and (t.data_type not in _WIDE or opset >= 21):
            tgt = _code_target(t, uses, inits, graph_io)
            if tgt is None:
                continue
        else:
            continue
        pref = _reduction_axes(uses, t.name, tgt.dense.ndim)
        tgt.group_axes = pref + [a for a in reversed(range(tgt.dense.ndim)) if a not in pref]
        out.append(tgt)
    return out


# ----------------------------------------------------------------------------------------------------------
# encoders: each fills a _Graph and returns what it stored (checked by a NumPy decode before it is used)
# ----------------------------------------------------------------------------------------------------------

def _patterns(m: int, n: int) -> list[tuple[int, ...]]:
    """The C(m, n) in-group position sets, numbered in lexicographic order."""
    return list(itertools.combinations(range(m), n))


def _max_per_byte(m: int, n: int) -> int:
    c, k = len(_patterns(m, n)), 1
    while c ** (k + 1) <= 256:
        k += 1
    return k


def _unpack_bits(g: _Graph, mask: str, total: int) -> str:
    """int32 [total] occupancy bits from the packed uint8 [bytes, 1] mask."""
    b = g.op("Cast", [mask], to=TensorProto.INT32)
    b = g.op("Div", [b, g.const("pow2_i32", (1 << np.arange(8)).astype(np.int32))])
    b = g.op("Mod", [b, g.const("two_i32", np.asarray(2, np.int32))])
    b = g.op("Reshape", [b, g.shape([-1])])
    if -(-total // 8) * 8 != total:
        b = g.op("Slice", [b, g.const("zero_i64", np.asarray([0], np.int64)),
                           g.const(f"end_{total}", np.asarray([total], np.int64))])
    return b


def _encode_bitmask(g: _Graph, t: _Target, zero: np.ndarray) -> dict:
    flat = t.dense.ravel()
    keep = ~zero.ravel()
    total, shape = flat.size, list(t.dense.shape)
    bits = np.zeros(-(-total // 8) * 8, np.uint8)
    bits[:total] = keep
    mask = (bits.reshape(-1, 8) << np.arange(8, dtype=np.uint8)).sum(axis=1, dtype=np.uint8).reshape(-1, 1)
    # slot 0: the background (any value when it is per channel: Where replaces it), slot i: the i-th non-zero
    values = np.concatenate([t.background.reshape(-1)[:1].astype(flat.dtype), flat[keep]])

    b = _unpack_bits(g, g.init(f"{t.name}/sparse_mask", numpy_helper.from_array(mask)), total)
    slot = g.op("Mul", [g.op("CumSum", [b, g.const("zero_i32", np.asarray(0, np.int32))]), b])
    slot = g.op("Reshape", [slot, g.shape(shape)])
    v = g.values(values)
    if t.zp_axis is None:
        x = g.op("Gather", [v, slot], last=t.dtype not in _WIDE)
    else:
        x = g.op("Gather", [v, slot])
        cond = g.op("Cast", [slot], to=TensorProto.BOOL)
        x = g.op("Where", [cond, x, g.zero_points(list(t.background.shape))], last=t.dtype not in _WIDE)
    g.to_storage(x)
    return {"encoding": "bitmask", "mask": mask, "values": values}


def _encode_nm(g: _Graph, t: _Target, zero: np.ndarray, axis: int, m: int, n: int, k: int) -> dict:
    """N:M along ``axis``, ``k`` pattern numbers per byte."""
    nd = t.dense.ndim
    perm = [a for a in range(nd) if a != axis] + [axis]  # group axis last
    moved = np.transpose(t.dense, perm)
    pdims = list(moved.shape)
    lead = pdims[:-1] + [pdims[-1] // m]  # one entry per group
    groups = moved.reshape(-1, m)
    nonzero = ~np.transpose(zero, perm).reshape(-1, m)
    n_groups = groups.shape[0]
    pats = _patterns(m, n)
    c = len(pats)
    # per group: its non-zeros, then its first zeros up to N (stored as the background they hold)
    pos = np.sort(np.argsort(~nonzero, axis=1, kind="stable")[:, :n], axis=1)
    weights = 1 << np.arange(m, dtype=np.int64)
    number_of = np.full(1 << m, -1, np.int64)  # position-set bitmask -> pattern number
    for i, pat in enumerate(pats):
        number_of[weights[list(pat)].sum()] = i
    numbers = number_of[weights[pos].sum(axis=1)]
    values = np.take_along_axis(groups, pos, axis=1)
    n_bytes = -(-n_groups // k)
    padded = np.zeros(n_bytes * k, np.int64)
    padded[:n_groups] = numbers
    packed = (padded.reshape(-1, k) * c ** np.arange(k, dtype=np.int64)).sum(axis=1).astype(np.uint8).reshape(-1, 1)

    # scalar background: decode as [groups, M]; per-channel zero points: in the split layout
    # (lead + [M]) where they broadcast
    per_channel = t.zp_axis is not None
    layout = lead if per_channel else [n_groups]
    d = g.op("Cast", [g.init(f"{t.name}/sparse_nm", numpy_helper.from_array(packed))], to=TensorProto.INT32)
    if k > 1:
        d = g.op("Div", [d, g.const(f"radix{c}x{k}", (c ** np.arange(k)).astype(np.int32))])
        d = g.op("Mod", [d, g.const(f"radix{c}", np.asarray(c, np.int32))])
    if n_bytes * k != n_groups:
        d = g.op("Reshape", [d, g.shape([-1])])
        d = g.op("Slice", [d, g.const("zero_i64", np.asarray([0], np.int64)),
                           g.const(f"end_{n_groups}", np.asarray([n_groups], np.int64))])
        if per_channel:
            d = g.op("Reshape", [d, g.shape(layout)])
    else:
        d = g.op("Reshape", [d, g.shape(layout if per_channel else [-1])])
    idx = g.op("Gather", [g.const(f"positions_{n}of{m}", np.asarray(pats, np.int32)), d])  # layout + [N]
    v = g.values(values.reshape(layout + [n]))
    split = layout + [m]
    if not per_channel:
        value = numpy_helper.from_array(np.asarray(t.background, t.dense.dtype).reshape(1))
        base = g.op("ConstantOfShape", [g.shape(split)], value=value)
    else:
        j = perm.index(t.zp_axis)
        bshape = [1] * len(split)
        if j < nd - 1:
            bshape[j] = pdims[j]
        else:  # zero points along the group axis itself
            bshape[-2:] = [pdims[-1] // m, m]
        base = g.op("Expand", [g.zero_points(bshape), g.shape(split)])
    x = g.op("ScatterElements", [base, idx, v], axis=len(split) - 1)
    identity = perm == list(range(nd))
    x = g.op("Reshape", [x, g.shape(pdims)], last=identity and t.dtype not in _WIDE)
    if not identity:
        x = g.op("Transpose", [x], last=t.dtype not in _WIDE, perm=[int(a) for a in np.argsort(perm)])
    g.to_storage(x)
    return {"encoding": f"nm {n}:{m}", "axis": axis, "m": m, "n": n, "k": k, "patterns": packed,
            "values": values, "perm": perm}


def _decode_numpy(t: _Target, enc: dict) -> np.ndarray:
    """What the decode subgraph computes, in NumPy: catches an encoder bug before anything is written."""
    shape = t.dense.shape
    bg = np.broadcast_to(t.background, shape).astype(t.dense.dtype)
    if enc["encoding"] == "bitmask":
        bits = ((enc["mask"].astype(np.int32) // (1 << np.arange(8))) % 2).ravel()[:bg.size]
        slot = (np.cumsum(bits) * bits).reshape(shape)
        return np.where(slot > 0, enc["values"][slot], bg)
    m, n, k, perm = enc["m"], enc["n"], enc["k"], enc["perm"]
    pats = np.asarray(_patterns(m, n), np.int64)
    numbers = (enc["patterns"].astype(np.int64) // len(pats) ** np.arange(k) % len(pats)).ravel()
    moved = np.transpose(bg, perm)
    out = moved.reshape(-1, m).copy()
    np.put_along_axis(out, pats[numbers[:out.shape[0]]], enc["values"], axis=1)
    return np.transpose(out.reshape(moved.shape), np.argsort(perm))


def _candidates(t: _Target, zero: np.ndarray, names: _Names):
    """(graph, stored arrays) of every encoding worth comparing for ``t``."""
    g = _Graph(t, names)
    yield g, _encode_bitmask(g, t, zero)
    size = t.dense.size
    best = None  # (estimated payload bytes, axis, m, n): the cheapest N:M pattern that fits
    for axis in t.group_axes:
        moved = np.moveaxis(~zero, axis, -1)
        for m in _GROUP_SIZES:
            if moved.shape[-1] % m:
                continue
            n = max(int(moved.reshape(-1, m).sum(axis=1).max()), 1)
            if n >= m:
                continue
            est = size // m * n * t.elem_bits / 8 + size // m / _max_per_byte(m, n)
            if best is None or est < best[0]:
                best = (est, axis, m, n)
    if best is not None:
        _, axis, m, n = best
        k_max, n_groups = _max_per_byte(m, n), size // m
        # fewer pattern numbers per byte can spare the Slice of a ragged tail
        for k in [k_max] if n_groups % k_max == 0 else range(1, k_max + 1):
            g = _Graph(t, names)
            yield g, _encode_nm(g, t, zero, axis, m, n, k)


def _choose(candidates: list) -> tuple[_Graph, dict]:
    """The smallest candidate, but N:M when it is within NM_MARGIN of it: N:M records the structure
    explicitly (the pattern and the kept values can be read without scanning the tensor), and where the
    payloads tie (exact 2:4 float: 2 values + 4 mask bits vs 2 values + 2.67 pattern bits per group) its
    decode subgraph, a node or two longer, is what tips the balance on small tensors."""
    best = min(candidates, key=lambda c: c[0].size())
    nm = [c for c in candidates if c[1]["encoding"] != "bitmask"]
    if nm:
        best_nm = min(nm, key=lambda c: c[0].size())
        if best_nm[0].size() <= best[0].size() * (1 + NM_MARGIN[1]) + NM_MARGIN[0]:
            return best_nm
    return best


# ----------------------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------------------

def _hoist_sparse_constants(model: onnx.ModelProto, min_sparsity: float, min_elements: int) -> int:
    """Main-graph Constant nodes holding a float tensor (``value``) of at least ``min_elements`` elements with at
    least ``min_sparsity`` exact zeros become initializers of the same name, so that they can be encoded like
    any initializer: exporters such as Paddle's keep every weight in a Constant node, and compression writes
    those in place. Same semantics (both are constants); needs IR >= 4 (initializers that are not inputs).
    Returns how many were moved."""
    if model.ir_version < 4:
        return 0
    g = model.graph
    outputs = {v.name for v in g.output}
    keep, moved = [], 0
    for nd in g.node:
        t = None
        if nd.op_type == "Constant" and nd.domain in ("", "ai.onnx") and len(nd.attribute) == 1 \
                and nd.attribute[0].name == "value" and nd.output[0] not in outputs:
            t = nd.attribute[0].t
        if (t is None or t.data_type not in _FLOAT_TYPES or t.data_location == TensorProto.EXTERNAL
                or math.prod(t.dims) < max(min_elements, 1)):
            keep.append(nd)
            continue
        arr = numpy_helper.to_array(t)
        if float((arr == 0).mean()) < min_sparsity:
            keep.append(nd)
            continue
        init = numpy_helper.from_array(arr, nd.output[0])
        g.initializer.append(init)
        moved += 1
    if moved:
        del g.node[:]
        g.node.extend(keep)
    return moved


def sparse_encode(model: onnx.ModelProto, *, min_sparsity: float = 0.3, min_elements: int = 256,
                  inplace: bool = False) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` (``model`` itself with ``inplace``) whose sparse initializers are stored compactly
    (see the module docstring).

    Eligible: main-graph initializers (and float Constant nodes, moved to initializers first when they hold
    enough zeros) of at least ``min_elements`` elements that are not graph inputs or
    outputs, either float32/float16 with at least ``min_sparsity`` exact zeros, or uint8/int8 (uint4/int4
    at opset >= 21) codes read by input 0 of a DequantizeLinear whose zero point is a constant, with at least
    ``min_sparsity`` of the codes equal to their channel's zero point. A tensor is encoded only when its new
    initializers and decode nodes take fewer serialized bytes than the initializer did.

    Returns the new model and one dict per encoded tensor: name, dtype, shape, encoding ("bitmask" or
    "nm N:M", with "axis" for N:M), sparsity, bytes_before (serialized initializer) and bytes_after (new
    initializers + decode nodes; constants shared by several tensors count with the first). ``model`` is
    not modified unless ``inplace``.
    """
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if int(min_elements) < 1:
        raise ValueError(f"min_elements must be >= 1, got {min_elements}")
    if inplace:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    opset = main_opset(model)
    if opset < MIN_OPSET:
        log.info("sparse storage needs opset >= %d (CumSum, ScatterElements); the model has opset %d: "
                 "nothing encoded", MIN_OPSET, opset)
        return out, []

    _hoist_sparse_constants(out, float(min_sparsity), int(min_elements))
    g = out.graph
    names = _Names.of(out)
    front: list[onnx.NodeProto] = []
    report: list[dict] = []
    replaced: set[str] = set()
    before_of = {t.name: t.ByteSize() for t in g.initializer}
    for t in _targets(out, opset, int(min_elements)):
        zero = t.zero_mask()
        sparsity = float(zero.mean())
        if sparsity < min_sparsity:
            continue
        before = before_of[t.name]
        graph_, enc = _choose(list(_candidates(t, zero, names)))
        after = graph_.size()
        if after >= before:
            log.debug("%s: %s would take %d bytes, dense %d: left dense", t.name, enc["encoding"], after, before)
            continue
        decoded = np.ascontiguousarray(_decode_numpy(t, enc))
        if decoded.shape != t.dense.shape or decoded.tobytes() != t.dense.tobytes():
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
