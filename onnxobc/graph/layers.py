"""Finding the compressible layers of an ONNX graph and writing compressed weights back.

A layer is one constant weight tensor and the Gemm / MatMul / Conv nodes that read it. Weights may be
initializers or Constant nodes, reached directly or through Identity / Transpose / Reshape / Cast chains
(PaddlePaddle and tf2onnx exports). A weight read by several compatible nodes is ONE layer: its Hessian is
the sum of the consumers' Hessians (their output errors add), so it is compressed once, consistently.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .adapters import OpLayout
from .model_io import infer_shapes, mapped_tensor, tensor_value

log = logging.getLogger(__name__)

LAYER_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")
QUANTIZED_OPS = {
    "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "MatMulNBits", "QGemm",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
}
CHAIN_OPS = ("Identity", "Transpose", "Reshape", "Cast")
SUBGRAPH_OPS = ("If", "Loop", "Scan")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
EINSUM_OPS = ("Einsum",)  # a (batched) matrix product with one constant operand  # two layers per node: W (input weights) and R (recurrent weights)
LOOKUP_OPS = ("Gather",)  # a constant 2-D float table read by row (embeddings); other Gathers are not candidates
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


@dataclass
class Consumer:
    """One node that multiplies the layer's weight with an activation."""

    node_name: str
    node_index: int
    op: str
    input_name: str  # the activation tensor multiplied with the weight
    layout: OpLayout
    output_name: str = ""
    output_shape: tuple | None = None  # from shape inference; symbolic dims as strings
    aux: dict = field(default_factory=dict)  # more tensors the Gram needs: {keyword: tensor name} (recurrent ops)
    expose: tuple[int, int] | None = None  # (node index, output slot) naming ``input_name`` when the node leaves it unnamed


@dataclass
class ChainStep:
    op: str
    node_index: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    attrs: dict = field(default_factory=dict)


@dataclass
class Layer:
    """A compressible weight: its value as the consumers see it, and how to write it back."""

    name: str  # first consumer's node name: what users see, --include/--exclude match it (and the weight name)
    op: str
    weight_name: str  # the tensor the consumers read
    source_name: str  # the initializer or Constant output it comes from
    source_kind: str  # 'initializer' | 'constant'
    chain: list[ChainStep]
    weight: np.ndarray  # as the consumers see it
    consumers: list[Consumer]
    groups: int
    rows: int  # per group
    cols: int  # C, per group
    exclusive: bool = True  # the source and chain serve only this layer (it can be rewritten in place)

    @property
    def layout(self) -> OpLayout:
        return self.consumers[0].layout

    @property
    def params(self) -> int:
        return int(self.weight.size)

    @property
    def shape_str(self) -> str:
        s = f"{self.groups * self.rows}x{self.cols}"
        return s + (f" g{self.groups}" if self.groups > 1 else "")

    def static_macs(self) -> int | None:
        """MACs per sample from static shapes, None when a spatial/token dim is symbolic or unknown."""
        total = 0
        for c in self.consumers:
            if c.output_shape is None:
                return None
            pos_dims = c.layout.position_dims(tuple(c.output_shape))
            if any(not isinstance(d, int) for d in pos_dims):
                return None
            total += int(np.prod(pos_dims or [1])) * self.params
        return total


@dataclass
class Skipped:
    node_name: str
    op: str
    reason: str


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _names_used_in(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for n in graph.node:
        names.update(i for i in n.input if i)
        for g in _subgraphs(n):
            names |= _names_used_in(g)
    return names


class GraphIndex:
    """Producers, consumers and constants of the main graph, built once."""

    def __init__(self, model: onnx.ModelProto, sources: dict | None = None):
        self.model = model
        self.sources = sources or {}  # initializers whose data file is known: read mapped (model_io.load_model)
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self.producer: dict[str, int] = {}
        self.users: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.subgraph_users: dict[str, list[int]] = defaultdict(list)
        self.subgraph_reads: dict[int, list[str]] = defaultdict(list)  # node -> outer names its subgraphs use
        for idx, n in enumerate(g.node):
            for o in n.output:
                if o:
                    self.producer[o] = idx
            for k, i in enumerate(n.input):
                if i:
                    self.users[i].append((idx, k))
            for sg in _subgraphs(n):
                for name in _names_used_in(sg):
                    self.subgraph_users[name].append(idx)
                    self.subgraph_reads[idx].append(name)

    def node(self, idx: int) -> onnx.NodeProto:
        return self.model.graph.node[idx]

    def use_count(self, name: str) -> int:
        return len(self.users.get(name, [])) + len(self.subgraph_users.get(name, [])) + (name in self.graph_outputs)

    def constant_value(self, name: str) -> np.ndarray | None:
        if name in self.inits and name not in self.graph_inputs:
            if name in self.sources:
                value = mapped_tensor(self.inits[name], self.sources[name])
                if value is not None:
                    return value
            return tensor_value(self.inits[name])
        idx = self.producer.get(name)
        if idx is not None and self.node(idx).op_type == "Constant":
            for a in self.node(idx).attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None


def _node_name(node: onnx.NodeProto, idx: int) -> str:
    return node.name or f"{node.op_type}_{idx}"


class _Unresolved(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _resolve_weight(ix: GraphIndex, name: str) -> tuple[str, str, list[ChainStep], np.ndarray]:
    """Follow ``name`` back to a constant source through chain ops; returns (source, kind, chain, value)."""
    steps_rev: list[tuple[onnx.NodeProto, int]] = []
    cur = name
    for _ in range(16):
        if cur in ix.graph_inputs and cur not in ix.inits:
            raise _Unresolved("weight not constant (a graph input)")
        if cur in ix.inits:
            if cur in ix.graph_inputs:
                raise _Unresolved("weight not constant (an initializer that is also a graph input, so it can be overridden)")
            kind = "initializer"
            break
        idx = ix.producer.get(cur)
        if idx is None:
            raise _Unresolved("weight not constant (no producer found)")
        node = ix.node(idx)
        if node.op_type == "Constant":
            if not any(a.name == "value" for a in node.attribute):
                raise _Unresolved("weight is a Constant without a 'value' tensor (sparse or scalar form)")
            kind = "constant"
            break
        if node.op_type in ("DequantizeLinear",) or (node.op_type not in CHAIN_OPS and _looks_quantized(ix, idx)):
            if _reads_graph_inputs(ix, cur):  # an activation that passed through Q/DQ, not a stored weight
                raise _Unresolved(f"weight not constant (an activation, computed by {node.op_type} "
                                  f"'{_node_name(node, idx)}' from the model's inputs)")
        if node.op_type in ("DequantizeLinear",):
            raise _Unresolved("already quantized (weight comes from DequantizeLinear)")
        if node.op_type not in CHAIN_OPS:
            if _looks_quantized(ix, idx):
                raise _Unresolved(f"already quantized (integer weight dequantized by {node.op_type} '{_node_name(node, idx)}')")
            raise _Unresolved(f"weight not constant (computed by {node.op_type} '{_node_name(node, idx)}')")
        steps_rev.append((node, idx))
        cur = node.input[0]
    else:
        raise _Unresolved("weight chain too long")
    value = ix.constant_value(cur)
    if value is None:
        raise _Unresolved("weight not constant")
    source = cur
    chain: list[ChainStep] = []
    for node, idx in reversed(steps_rev):
        a = _attrs(node)
        step = ChainStep(node.op_type, idx, tuple(value.shape), value.dtype, a)
        if node.op_type == "Identity":
            pass
        elif node.op_type == "Transpose":
            perm = a.get("perm") or list(range(value.ndim))[::-1]
            step.attrs["perm"] = list(perm)
            value = np.transpose(value, perm)
        elif node.op_type == "Reshape":
            shape = ix.constant_value(node.input[1]) if len(node.input) > 1 else None
            if shape is None:
                raise _Unresolved("weight reshaped to a computed shape")
            shape = [int(s) for s in shape]
            if not a.get("allowzero", 0):
                shape = [value.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            value = value.reshape(shape)
        elif node.op_type == "Cast":
            to = onnx.helper.tensor_dtype_to_np_dtype(a["to"])
            if np.issubdtype(value.dtype, np.integer) and np.issubdtype(to, np.floating):
                raise _Unresolved("already quantized (integer weight cast to float)")
            value = value.astype(to)
        chain.append(step)
    return source, kind, chain, value


def _reads_graph_inputs(ix: GraphIndex, name: str) -> bool:
    """Whether tensor ``name`` is computed (through any number of nodes) from a graph input that is not an
    initializer: an activation, however many Quantize/DequantizeLinear nodes it went through."""
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in ix.graph_inputs and t not in ix.inits:
            return True
        idx = ix.producer.get(t)
        if idx is not None:
            stack.extend(ix.node(idx).input)
            stack.extend(n for n in ix.subgraph_reads.get(idx, ()))
    return False


def _looks_quantized(ix: GraphIndex, idx: int, depth: int = 3) -> bool:
    node = ix.node(idx)
    if node.op_type in ("DequantizeLinear",) or node.op_type in QUANTIZED_OPS:
        return True
    if node.op_type == "Cast":
        v = ix.constant_value(node.input[0])
        if v is not None and np.issubdtype(v.dtype, np.integer):
            return True
    if depth == 0:
        return False
    for i in node.input:
        p = ix.producer.get(i)
        if p is not None and _looks_quantized(ix, p, depth - 1):
            return True
        if i in ix.inits and ix.inits[i].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and node.op_type == "Cast":
            return True
    return False


def _consumer(ix: GraphIndex, idx: int, shapes: dict) -> tuple[Consumer | None, str | None, str | None]:
    """(consumer, weight tensor name, skip reason) for a candidate node."""
    node = ix.node(idx)
    name = _node_name(node, idx)
    a = _attrs(node)
    if node.op_type == "Gather":
        if a.get("axis", 0) != 0:
            return None, None, f"Gather along axis {a.get('axis')} (only row lookups, axis 0, are compressed)"
        return Consumer(name, idx, "Gather", node.input[1], OpLayout("Gather", {}), node.output[0],
                        shapes.get(node.output[0])), node.input[0], None
    if node.op_type == "Gemm":
        if len(node.input) < 2:
            return None, None, "malformed Gemm"
        layout = OpLayout("Gemm", {"transA": a.get("transA", 0), "transB": a.get("transB", 0),
                                   "alpha": a.get("alpha", 1.0), "beta": a.get("beta", 1.0)})
        act, w = node.input[0], node.input[1]
    elif node.op_type == "MatMul":
        act, w = node.input[0], node.input[1]
        layout = OpLayout("MatMul", {})
    elif node.op_type == "ConvTranspose":
        act, w = node.input[0], node.input[1]
        layout = OpLayout("ConvTranspose", {k: a[k] for k in ("group", "strides", "dilations", "pads", "auto_pad",
                                                              "kernel_shape", "output_padding", "output_shape")
                                            if k in a})
    else:  # Conv
        act, w = node.input[0], node.input[1]
        layout = OpLayout("Conv", {k: a[k] for k in ("group", "strides", "dilations", "pads", "auto_pad", "kernel_shape") if k in a})
    out = node.output[0]
    return Consumer(name, idx, node.op_type, act, layout, out, shapes.get(out)), w, None


def _recurrent_consumers(ix: GraphIndex, idx: int, shapes: dict) -> list[tuple[Consumer, str]]:
    """The W and R consumers of an LSTM / GRU / RNN node: W reads the node's input X, R the hidden states,
    recorded from the node's output Y (exposed under a fresh name when the node leaves Y unnamed)."""
    node = ix.node(idx)
    name = _node_name(node, idx)
    a = _attrs(node)
    attrs = {k: a[k] for k in ("hidden_size", "direction", "layout", "linear_before_reset", "activations",
                               "activation_alpha", "activation_beta", "clip") if k in a}
    ins = list(node.input) + [""] * (8 - len(node.input))
    seq = {"sequence_lens": ins[4]} if ins[4] else {}
    y = node.output[0] if len(node.output) and node.output[0] else ""
    expose = None
    if not y:
        y = f"{name}_Y_onnxobc"
        while y in ix.producer or y in ix.inits or y in ix.graph_inputs:
            y += "_"
        expose = (idx, 0)
    out_shape = shapes.get(y)
    found = []
    w_cons = Consumer(f"{name}/W", idx, node.op_type, ins[0], OpLayout(node.op_type, dict(attrs, part="W")), y,
                      out_shape, aux=dict(seq), expose=None)
    found.append((w_cons, ins[1]))
    r_aux = dict(seq)
    if ins[5]:
        r_aux["initial_h"] = ins[5]
    r_layout = OpLayout(node.op_type, dict(attrs, part="R"))
    if r_layout.split_gates:  # the h gate's input r * h needs r, recomputed from X, W, R and B
        r_aux.update(X=ins[0], W=ins[1], R=ins[2])
        if ins[3]:
            r_aux["B"] = ins[3]
    found.append((Consumer(f"{name}/R", idx, node.op_type, y, r_layout, y, out_shape, aux=r_aux, expose=expose),
                  ins[2]))
    return found


def _einsum_consumer(ix: GraphIndex, idx: int, shapes: dict) -> tuple[Consumer | None, str | None, str | None]:
    """(consumer, weight tensor, skip reason) of an Einsum: which operand is constant decides the weight."""
    from .adapters import einsum_terms

    node = ix.node(idx)
    name = _node_name(node, idx)
    eq = _attrs(node).get("equation", b"")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    if len(node.input) != 2:
        return None, None, f"Einsum with {len(node.input)} operands"
    const = []
    for k in (0, 1):
        try:
            _resolve_weight(ix, node.input[k])
            const.append(k)
        except _Unresolved:
            pass
    if len(const) != 1:
        return None, None, ("Einsum of two activations" if not const else "Einsum of two constants")
    terms = einsum_terms(eq, const[0])
    if isinstance(terms, str):
        return None, None, terms
    layout = OpLayout("Einsum", {"equation": eq, "w_input": const[0]})
    out = node.output[0]
    return Consumer(name, idx, "Einsum", node.input[1 - const[0]], layout, out, shapes.get(out)), node.input[const[0]], None


def _recurrent_problem(layout: OpLayout, shape: tuple) -> str | None:
    """Why a recurrent weight of this shape cannot be compressed (None: it can)."""
    gates = layout.gates()
    hidden = layout.attrs.get("hidden_size")
    if shape[1] % gates or (hidden is not None and shape[1] != gates * hidden):
        return f"{layout.op} weight of shape {tuple(shape)} does not hold {gates} gates of hidden_size {hidden}"
    if layout.part == "R" and shape[2] * gates != shape[1]:
        return f"{layout.op} R of shape {tuple(shape)} is not [num_directions, {gates} * hidden, hidden]"
    if layout.split_gates:
        try:
            for d in range(int(shape[0])):
                layout.gate_activation(d, int(shape[0]))
        except Exception as e:
            return f"{e} (GRU with linear_before_reset = 0 recomputes its reset gate)"
    return None


def _infer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = infer_shapes(model)
    except Exception as e:  # very large or exotic models: shapes are only used for MAC counts
        log.debug("shape inference failed: %s", e)
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    return shapes


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor of the main graph (after shape inference, where it works)."""
    try:
        m = infer_shapes(model)
    except Exception:
        m = model
    types = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in m.graph.initializer:
        types[t.name] = t.data_type
    return types


def _compatible(a: OpLayout, b: OpLayout) -> bool:
    if a.op != b.op:
        return False
    if a.op == "Gemm":
        return a.attrs.get("transB", 0) == b.attrs.get("transB", 0)
    if a.op == "Conv":
        return a.attrs.get("group", 1) == b.attrs.get("group", 1)
    if a.op in ("ConvTranspose",) + RECURRENT_OPS + EINSUM_OPS:  # the same matrices, and the same columns for an input
        return a.attrs == b.attrs
    return True


def find_layers(model: onnx.ModelProto, sources: dict | None = None) -> tuple[list[Layer], list[Skipped]]:
    """All compressible layers of the main graph, and every candidate skipped with its reason. ``sources``
    (from :func:`~onnxobc.graph.model_io.load_model`, for the model exactly as loaded): weights stored as
    external data are then mapped from their file, read-only, instead of copied."""
    ix = GraphIndex(model, sources)
    shapes = _infer_shapes(model)
    skipped: list[Skipped] = []
    by_weight: dict[str, list[Consumer]] = defaultdict(list)
    order: list[str] = []

    for idx, node in enumerate(model.graph.node):
        name = _node_name(node, idx)
        if node.op_type in QUANTIZED_OPS:
            skipped.append(Skipped(name, node.op_type, "already quantized (integer op)"))
            continue
        if node.op_type in SUBGRAPH_OPS:
            for sg in _subgraphs(node):
                for sub in _walk(sg):
                    if sub.op_type in LAYER_OPS + RECURRENT_OPS + EINSUM_OPS:
                        skipped.append(Skipped(sub.name or sub.op_type, sub.op_type, f"inside a subgraph of {node.op_type} '{name}'"))
            continue
        if node.op_type in LOOKUP_OPS and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            table = ix.constant_value(node.input[0]) if node.input[0] not in ix.graph_inputs else None
            if table is None:
                try:
                    table = _resolve_weight(ix, node.input[0])[3]
                except _Unresolved:
                    continue  # a Gather on computed data (shapes, activations): not a candidate
            if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating) or table.size < 2:
                continue
        elif node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
            if len(node.input) < 3 or not node.input[1] or not node.input[2]:
                skipped.append(Skipped(name, node.op_type, f"malformed {node.op_type}"))
                continue
            for cons, wname in _recurrent_consumers(ix, idx, shapes):
                if wname not in by_weight:
                    order.append(wname)
                by_weight[wname].append(cons)
            continue
        elif node.op_type not in LAYER_OPS + EINSUM_OPS or (node.domain not in ("", "ai.onnx")):
            continue
        if node.op_type in EINSUM_OPS:
            cons, wname, reason = _einsum_consumer(ix, idx, shapes)
        else:
            cons, wname, reason = _consumer(ix, idx, shapes)
        if cons is None:
            skipped.append(Skipped(name, node.op_type, reason or "unsupported"))
            continue
        if node.op_type == "MatMul" and ix.constant_value(wname) is None and ix.producer.get(wname) is None and wname not in ix.inits:
            skipped.append(Skipped(name, node.op_type, "weight not constant (a graph input)"))
            continue
        if wname not in by_weight:
            order.append(wname)
        by_weight[wname].append(cons)

    layers: list[Layer] = []
    for wname in order:
        consumers = by_weight[wname]
        first = consumers[0]
        names = ", ".join(c.node_name for c in consumers)
        try:
            source, kind, chain, value = _resolve_weight(ix, wname)
        except _Unresolved as e:
            reason = e.reason
            if first.op == "MatMul" and reason.startswith("weight not constant"):
                reason = "weight not constant (activation x activation MatMul)" if "graph input" not in reason else reason
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, reason))
            continue
        if not np.issubdtype(value.dtype, np.floating):
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, f"weight has non-float type {value.dtype}"))
            continue
        expected_rank = {"Gemm": 2, "MatMul": 2, "Gather": 2, "LSTM": 3, "GRU": 3, "RNN": 3}.get(first.op)
        if (expected_rank and value.ndim != expected_rank) or (first.op in ("Conv", "ConvTranspose") and value.ndim < 3):
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, f"constant weight of rank {value.ndim} (batched weights are not supported)"))
            continue
        # all users of the weight tensor must be compatible consumers reading it as the weight input
        other = []
        for uidx, k in ix.users.get(wname, []):
            un = ix.node(uidx)
            if not any(c.node_index == uidx for c in consumers) or k != first.layout.weight_input:
                other.append(f"{un.op_type} '{_node_name(un, uidx)}'")
        if ix.subgraph_users.get(wname):
            other.append("a subgraph")
        if wname in ix.graph_outputs:
            other.append("a graph output")
        if other:
            tied = (" (tied embedding: the Gather will read the compressed weight of the layer that shares the table; "
                    "compressed once, stored once)") if first.op == "Gather" else ""
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, f"weight '{wname}' is also used by {', '.join(other)}{tied}"))
            continue
        if any(not _compatible(first.layout, c.layout) for c in consumers[1:]):
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, f"weight '{wname}' is shared by nodes that read it differently ({names})"))
            continue
        g, r, cc = first.layout.matrix_shape(value.shape)
        if first.op == "Conv" and (value.shape[0] % g):
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, f"Conv output channels {value.shape[0]} not divisible by group {g}"))
            continue
        if first.op == "ConvTranspose" and (value.shape[0] % g):
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, f"ConvTranspose input channels {value.shape[0]} not divisible by group {g}"))
            continue
        if first.op in EINSUM_OPS and value.ndim != len(first.layout.terms.w):
            for c in consumers:
                skipped.append(Skipped(c.node_name, c.op, f"Einsum constant of rank {value.ndim}, the equation "
                                       f"gives it {len(first.layout.terms.w)} labels"))
            continue
        if first.op in RECURRENT_OPS:
            why = _recurrent_problem(first.layout, value.shape)
            if why:
                for c in consumers:
                    skipped.append(Skipped(c.node_name, c.op, why))
                continue
        along = [source] + [ix.node(s.node_index).output[0] for s in chain[:-1]]
        exclusive = not chain or all(ix.use_count(t) == 1 for t in along)
        layers.append(Layer(first.node_name, first.op, wname, source, kind, chain, value, consumers, g, r, cc,
                            exclusive))
    return layers, skipped


def _walk(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for sg in _subgraphs(n):
            yield from _walk(sg)


def select_layers(layers: list[Layer], include: str | None, exclude: str | None) -> list[Layer]:
    """Layers whose node name (or weight name) matches ``include`` and not ``exclude`` (Python regex, search)."""
    def names(layer: Layer):
        return [layer.name, layer.weight_name, layer.source_name] + [c.node_name for c in layer.consumers]

    out = []
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    for layer in layers:
        if inc and not any(inc.search(n) for n in names(layer)):
            continue
        if exc and any(exc.search(n) for n in names(layer)):
            continue
        out.append(layer)
    return out
