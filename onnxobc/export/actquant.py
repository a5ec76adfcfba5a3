"""Activation quantization (W8A8, ``--act-bits``): static per-tensor QuantizeLinear/DequantizeLinear pairs.

Where the pairs go (:func:`plan_sites`), chosen so that ONNX Runtime's QDQ optimiser turns the compressed
layers into integer kernels on CPU:

* the activation input of every compressed layer (Conv, Gemm, MatMul): ``DQ(x) -> Conv/Gemm/MatMul <- DQ(w)``;
  only the layer's own nodes read the quantized copy, other readers of the tensor (a residual Add, say) keep
  the float tensor;
* except for a Conv with a tiny fan-in (fewer than ``MIN_INT8_FAN_IN`` inputs per output, e.g. a 3x3 conv on a
  gray image), which stays float;
* the output of every compressed Conv, after a directly following Relu or Clip (which ORT then folds into the
  requantization): ``DQ -> Conv -> Q`` is the pattern ORT fuses into QLinearConv (a Conv without a quantized
  output stays a float Conv). All readers of that output read the dequantized tensor, as in any W8A8 graph.
  A Conv output that is a graph output (a detection head) is quantized too and dequantized back under the
  output's own name, so the model's interface does not change.

Gemm and MatMul need no output pair: ORT fuses ``DQ -> MatMul <- DQ`` into MatMulIntegerToFloat and
``DQ -> Gemm <- DQ`` into QGemm with a float output.

A layer whose input and weight are both quantized also gets its bias stored as int32 codes on the grid
``x_scale * w_scale`` (per output channel) behind a DequantizeLinear, which is what the integer kernel adds to
its int32 accumulator; the rounding moves the bias by at most half of that (tiny) step. ORT needs it: it fuses
a Conv or Gemm only when *every* input comes from a DequantizeLinear (a float bias leaves a float Gemm behind),
and it turns a 2-D ``MatMul -> Add(bias)`` into a Gemm (MatMulAddFusion) before the QDQ fusions run, so that
bias (the Add's constant operand) is quantized as well. A bias that does not fit int32 (a near-dead channel
with a tiny weight scale) gets that channel's weight scale widened until it does, as ORT's own quantizer does.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..calibrate.ranges import ActQuantParams
from ..graph.layers import LAYER_OPS, QUANTIZED_OPS, GraphIndex, Layer
from ..graph.model_io import infer_shapes
from .writeback import NameAllocator, remove_unused

HOP_OPS = ("Relu", "Clip")
# A dense (group 1) Conv with a fan-in this small keeps float activations: ONNX Runtime's int8 GEMM pads the
# reduction to its tile size, and on the shipped model's 3x3 stem over a 1-channel image (fan-in 9) QLinearConv ran
# 2.5x slower than the float Conv (858 vs 336 us per batch of 64), while EfficientNet's RGB stem (fan-in 27) was
# faster in int8 (1.7 vs 2.4 ms per batch of 8). Depthwise convs (fan-in 9 per group) use a different kernel and
# are fast in int8.
MIN_INT8_FAN_IN = 16


@dataclass
class ActSite:
    """One activation tensor that gets a Q/DQ pair."""

    tensor: str
    rewire_all: bool = False  # every reader reads the dequantized tensor (else only ``readers``)
    readers: set[str] = field(default_factory=set)  # first output names of the nodes to rewire
    why: list[str] = field(default_factory=list)
    graph_output: bool = False  # a graph output: quantized under a new name, dequantized back under its own
    pad_of: str | None = None  # the output of a zero Pad of this quantized tensor: pad the uint8 codes instead


def _float32_tensors(model: onnx.ModelProto) -> set[str]:
    from ..graph.layers import tensor_types

    return {k for k, v in tensor_types(model).items() if v == TensorProto.FLOAT}


def fold_zero_pads(model: onnx.ModelProto) -> int:
    """Fold every constant-zero ``Pad`` of the spatial dims whose only reader is a Conv (``auto_pad`` NOTSET) into
    that Conv's ``pads`` attribute, in place; returns how many were folded. Exact (the Conv pads with zeros
    too), and it keeps ``DQ -> Conv`` adjacent so ONNX Runtime can fuse an integer kernel (a Pad between them,
    float or uint8, costs as much as the conv itself on EfficientNet: TF-style "same" padding is a Pad node)."""
    ix = GraphIndex(model)
    folded: list[int] = []
    dead: set[str] = set()
    for n in model.graph.node:
        if n.op_type != "Conv" or n.domain not in ("", "ai.onnx") or not n.input:
            continue
        pads = _spatial_zero_pads(ix, n.input[0])
        if pads is None:
            continue
        attrs = {a.name: a for a in n.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"NOTSET", b""):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * len(pads)
        if len(old) != len(pads):
            continue
        pad_idx = ix.producer[n.input[0]]
        pad = ix.node(pad_idx)
        new = [a + b for a, b in zip(old, pads)]
        for a in list(n.attribute):
            if a.name == "pads":
                n.attribute.remove(a)
        n.attribute.append(helper.make_attribute("pads", new))
        dead.update(x for x in pad.input if x)
        n.input[0] = pad.input[0]
        folded.append(pad_idx)
    for i in sorted(folded, reverse=True):
        del model.graph.node[i]
    remove_unused(model, dead)
    return len(folded)


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold every inference-mode ``BatchNormalization`` whose input is a Conv output read by nothing else into that
    Conv's weight and bias, in place; returns how many were folded. Exact up to float rounding.

    Why W8A8 needs it: an unfused BN (PaddlePaddle exports keep them) puts the per-tensor activation grid on the
    Conv output *before* the per-channel BN scale, so channels with a small pre-BN spread but a large gain get
    few quantization levels and their error is amplified (PP-OCR's text-orientation classifier: output rel L2
    0.30 with the BN kept, 0.10 folded). ONNX Runtime's and NNCF's int8 paths fold BN first too."""
    ix = GraphIndex(model)
    names = NameAllocator(model)
    removed: list[int] = []
    dead: set[str] = set()
    for bi, bn in enumerate(model.graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) < 5:
            continue
        if sum(1 for o in bn.output if o) != 1 or any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        x = bn.input[0]
        ci = ix.producer.get(x)
        if ci is None or x in ix.graph_outputs or len(ix.users.get(x, [])) != 1 or ix.subgraph_users.get(x):
            continue
        conv = ix.node(ci)
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2:
            continue
        w = ix.constant_value(conv.input[1])
        b = ix.constant_value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        gamma, beta, mean, var = (ix.constant_value(t) for t in bn.input[1:5])
        if w is None or any(v is None for v in (gamma, beta, mean, var)) or w.dtype != np.float32:
            continue
        if any(ix.use_count(t) != 1 for t in conv.input[1:3] if t):
            continue  # a weight or bias shared with another node keeps its values
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = (gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))
        if k.shape != (w.shape[0],) or not np.all(np.isfinite(k)):
            continue
        w_new = (w.astype(np.float64) * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        b_new = ((b0 - mean.astype(np.float64)) * k + beta.astype(np.float64)).astype(np.float32)
        wn, bname = names(f"{conv.input[1]}_bnfolded"), names(f"{conv.input[1]}_bnfolded_bias")
        model.graph.initializer.extend([numpy_helper.from_array(w_new, wn), numpy_helper.from_array(b_new, bname)])
        dead.update(t for t in list(conv.input[1:3]) + list(bn.input[1:5]) if t)
        conv.input[1] = wn
        if len(conv.input) > 2:
            conv.input[2] = bname
        else:
            conv.input.append(bname)
        conv.output[0] = next(o for o in bn.output if o)
        stale = [vi for vi in model.graph.value_info if vi.name == x]
        for vi in stale:
            model.graph.value_info.remove(vi)
        removed.append(bi)
    for i in sorted(removed, reverse=True):
        del model.graph.node[i]
    remove_unused(model, dead)
    return len(removed)


def _spatial_zero_pads(ix: GraphIndex, t: str) -> list[int] | None:
    """The spatial [begins..., ends...] of the constant-zero Pad producing ``t``, when it pads only spatial dims
    (of a rank >= 3 tensor), by non-negative amounts, and ``t`` has no other reader; else None."""
    if t in ix.graph_outputs or len(ix.users.get(t, [])) != 1 or ix.subgraph_users.get(t):
        return None
    if _zero_pad_source(ix, t) is None:
        return None
    n = ix.node(ix.producer[t])
    if len(n.input) > 3 and n.input[3]:
        return None  # explicit axes (opset 18): rare, not folded
    p = ix.constant_value(n.input[1])
    if p is None or p.ndim != 1 or p.size % 2 or p.size < 6:
        return None
    r = p.size // 2
    p = [int(v) for v in p]
    begins, ends = p[:r], p[r:]
    if any(v < 0 for v in p) or begins[:2] != [0, 0] or ends[:2] != [0, 0]:
        return None
    return begins[2:] + ends[2:]


def _is_stem(ix: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor`` is computed from the graph inputs without passing any Gemm / MatMul / Conv (or
    integer) layer: the input of a network's first layer, after any normalisation."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        idx = ix.producer.get(t)
        if idx is None:
            continue
        node = ix.node(idx)
        if node.op_type in LAYER_OPS or node.op_type in QUANTIZED_OPS:
            return False
        stack.extend(node.input)
    return True


def plan_sites(model: onnx.ModelProto, layers: list[Layer]) -> tuple[list[ActSite], list[str]]:
    """The activation tensors to quantize for ``layers`` (see the module docstring), and notes on the ones
    left in float (not float32, graph outputs)."""
    ix = GraphIndex(model)
    f32 = _float32_tensors(model)
    sites: dict[str, ActSite] = {}
    notes: list[str] = []

    def site(t: str) -> ActSite:
        return sites.setdefault(t, ActSite(t))

    for layer in layers:
        if not layer.layout.activation_sites:
            notes.append(f"{layer.name}: {layer.op} keeps float activations (its weights multiply inputs and hidden "
                         "states inside the node)")
            continue
        if layer.op == "Conv" and layer.groups == 1 and layer.cols < MIN_INT8_FAN_IN:
            what = "stem Conv" if _is_stem(ix, layer.consumers[0].input_name) else "Conv"
            notes.append(f"{layer.name}: {what} with fan-in {layer.cols} (below {MIN_INT8_FAN_IN}) keeps float "
                         "activations (its integer kernel is slower than the float one)")
            continue
        for c in layer.consumers:
            node = ix.node(c.node_index)
            if c.input_name not in f32:
                notes.append(f"{c.node_name}: input {c.input_name} is not float32, left unquantized")
                continue
            s = site(c.input_name)
            s.readers.add(node.output[0])
            s.why.append(f"input of {c.node_name}")
            if c.op != "Conv":
                continue
            out = node.output[0]
            users = ix.users.get(out, [])
            if (len(users) == 1 and out not in ix.graph_outputs and not ix.subgraph_users.get(out)
                    and ix.node(users[0][0]).op_type in HOP_OPS):
                out = ix.node(users[0][0]).output[0]
            if out not in f32 or ix.subgraph_users.get(out):
                notes.append(f"{c.node_name}: output {out} is not float32 or used in a subgraph, left unquantized")
                continue
            s = site(out)
            s.rewire_all = True
            s.graph_output = out in ix.graph_outputs
            s.why.append(f"output of {c.node_name}")
    for s in sites.values():
        src = _zero_pad_source(ix, s.tensor)
        if src is not None and src in sites and not s.rewire_all and sites[src].pad_of is None:
            s.pad_of = src
    return list(sites.values()), notes


def _zero_pad_source(ix: GraphIndex, t: str) -> str | None:
    """The data input of the constant-mode, zero-valued Pad that produces ``t`` (else None)."""
    p = ix.producer.get(t)
    if p is None:
        return None
    n = ix.node(p)
    if n.op_type != "Pad" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
        return None
    mode = next((a.s for a in n.attribute if a.name == "mode"), b"constant")
    if mode != b"constant":
        return None
    if len(n.input) > 2 and n.input[2]:
        v = ix.constant_value(n.input[2])
        if v is None or v.size != 1 or float(v.reshape(())) != 0.0:
            return None
    return n.input[0]


def insert_activation_qdq(model: onnx.ModelProto, sites: list[ActSite], params: dict[str, ActQuantParams]
                          ) -> dict[str, ActQuantParams]:
    """Insert a QuantizeLinear -> DequantizeLinear pair per site (right after the tensor's producer, or at the
    front for graph inputs) and rewire its readers. Then quantize the biases of layers whose input and weight
    are both dequantized (see the module docstring).

    Returns the parameters each site's tensor is dequantized with, for reports: those of ``params``, except
    that a padded site (``pad_of``) uses its source's scale, zero point and range (keeping its own observed
    min/max). ``params`` itself is not changed."""
    params = dict(params)
    fresh = NameAllocator(model)
    g = model.graph
    after: dict[str, list[onnx.NodeProto]] = {}
    renamed: dict[str, tuple[str, set[str] | None]] = {}
    names: dict[str, tuple[str, str, str]] = {}  # site -> (scale, zero point, quantized tensor)
    ix = GraphIndex(model)
    bypassed: set[str] = set()
    out_renames: list[tuple[onnx.NodeProto, str, str]] = []  # applied after the readers are rewired
    for s in sorted(sites, key=lambda s: s.pad_of is not None):  # padded sites reuse their source's tensors
        base = s.tensor
        dt = fresh(f"{base}_act_dequantized")
        if s.pad_of is not None:
            # Pad(DQ(Q(u))) == DQ(Pad_uint8(Q(u), value=zero point)) exactly: pad the codes, skip a float round trip
            sn, zn, uq = names[s.pad_of]
            if s.tensor in params:
                own = params[s.tensor]
                params[s.tensor] = replace(params[s.pad_of], observed_min=own.observed_min,
                                           observed_max=own.observed_max)
            pad = ix.node(ix.producer[s.tensor])
            qt = fresh(f"{base}_act_quantized")
            new_pad = helper.make_node("Pad", [uq, pad.input[1], zn] + list(pad.input[3:]), [qt],
                                       name=fresh(f"{pad.name or base}_uint8"))
            dq = helper.make_node("DequantizeLinear", [qt, sn, zn], [dt], name=fresh(f"{base}_DequantizeLinear"))
            after[s.tensor] = [new_pad, dq]
            bypassed.add(pad.output[0])
        else:
            p = params[s.tensor]
            sn, zn = fresh(f"{base}_act_scale"), fresh(f"{base}_act_zero_point")
            qt = fresh(f"{base}_act_quantized")
            g.initializer.extend([numpy_helper.from_array(np.array(p.scale, np.float32), sn),
                                  numpy_helper.from_array(np.array(p.zero_point, np.uint8), zn)])
            src = s.tensor
            if s.graph_output:
                # the producer writes a new name; the pair gives the graph output back under its own name, so
                # the Conv still ends in a QuantizeLinear (an integer kernel) and the interface is unchanged
                src = fresh(f"{base}_float")
                out_renames.append((ix.node(ix.producer[s.tensor]), s.tensor, src))
                dt = s.tensor
            q = helper.make_node("QuantizeLinear", [src, sn, zn], [qt], name=fresh(f"{base}_QuantizeLinear"))
            dq = helper.make_node("DequantizeLinear", [qt, sn, zn], [dt], name=fresh(f"{base}_DequantizeLinear"))
            after[src] = [q, dq]
            names[s.tensor] = (sn, zn, qt)
        if not s.graph_output:
            renamed[s.tensor] = (dt, None if s.rewire_all else set(s.readers))
    for n in g.node:
        key = n.output[0] if n.output else ""
        for k, name in enumerate(n.input):
            if name in renamed:
                new, readers = renamed[name]
                if readers is None or key in readers:
                    n.input[k] = new
    for prod, old, new in out_renames:
        for k, o in enumerate(prod.output):
            if o == old:
                prod.output[k] = new
    nodes = list(g.node)
    inputs = {i.name for i in g.input}
    front = [x for t, pair in after.items() if t in inputs or t not in {o for n in nodes for o in n.output}
             for x in pair]
    out: list[onnx.NodeProto] = list(front)
    for n in nodes:
        out.append(n)
        for o in n.output:
            if o in after:
                out.extend(after[o])
    del g.node[:]
    g.node.extend(out)
    _drop_dead(model, bypassed | {dq.output[0] for pair in after.values() for dq in pair[1:]})
    _quantize_biases(model)
    return params


def _drop_dead(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the nodes producing ``candidates`` (and, transitively, what only they read) once nothing reads
    them: a Pad bypassed by its uint8 twin, a DequantizeLinear left without readers; and the initializers
    that only they read (the float Pad's constant value)."""
    g = model.graph
    while True:
        ix = GraphIndex(model)
        dead = [i for i, n in enumerate(g.node) if n.output and all(o in candidates and ix.use_count(o) == 0
                                                                   for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            candidates.update(x for x in g.node[i].input if x and x not in ix.graph_inputs)
            del g.node[i]
    remove_unused(model, candidates)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor of the main graph whose shape is known (after shape inference, where it works)."""
    try:
        m = infer_shapes(model)
    except Exception:
        m = model
    return {vi.name: len(vi.type.tensor_type.shape.dim)
            for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}


def _bias_site(ix: GraphIndex, n: onnx.NodeProto, ranks) -> tuple[onnx.NodeProto, int] | None:
    """(node, input index) of the float bias that ORT fuses into the integer kernel of layer node ``n``."""
    if n.op_type in ("Conv", "Gemm"):
        if len(n.input) < 3 or not n.input[2]:
            return None
        if n.op_type == "Gemm":
            attrs = {a.name: a.f for a in n.attribute if a.name in ("alpha", "beta")}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None  # ORT keeps such a Gemm float anyway
        return n, 2
    if n.op_type == "MatMul":
        # a 2-D MatMul whose only reader is an Add of a constant: ORT makes them one Gemm (MatMulAddFusion)
        out = n.output[0]
        users = ix.users.get(out, [])
        if (len(users) != 1 or out in ix.graph_outputs or ix.subgraph_users.get(out)
                or ranks().get(n.input[0]) != 2):
            return None
        add = ix.node(users[0][0])
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            return None
        return add, 1 - users[0][1]
    return None


_BIAS_LIMIT = 2 ** 30  # int32 bias codes, with headroom for the accumulated products


def _widen_weight_scale(ix: GraphIndex, dqw: onnx.NodeProto, b: np.ndarray, sx: np.float32,
                        codes: np.ndarray) -> np.ndarray | None:
    """Raise the per-channel weight scale of the channels whose bias overflows, requantizing their int8 codes
    in place; returns the new bias scale (x_scale * w_scale), or None when the weight is not a per-channel
    int8 grid with zero point 0 that only this DequantizeLinear reads."""
    qn, sn = dqw.input[0], dqw.input[1]
    zp = ix.constant_value(dqw.input[2]) if len(dqw.input) > 2 and dqw.input[2] else None
    q = ix.constant_value(qn)
    sw = ix.constant_value(sn)
    if (q is None or sw is None or q.dtype != np.int8 or (zp is not None and zp.any()) or sw.shape != b.shape
            or ix.use_count(qn) != 1 or ix.use_count(sn) != 1 or qn not in ix.inits or sn not in ix.inits):
        return None
    axis = next((a.i for a in dqw.attribute if a.name == "axis"), 1)
    axis = axis % q.ndim
    bad = np.abs(codes) > _BIAS_LIMIT
    new_sw = sw.astype(np.float32).copy()
    new_sw[bad] = (np.abs(b[bad]).astype(np.float64) / (float(sx) * _BIAS_LIMIT / 2)).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    w = q.astype(np.float32) * sw.reshape(shape)
    new_q = np.clip(np.rint(w / new_sw.reshape(shape)), -128, 127).astype(np.int8)
    keep = ~bad.reshape(shape) if q.ndim else ~bad
    new_q = np.where(np.broadcast_to(keep, q.shape), q, new_q)
    ix.inits[qn].CopyFrom(numpy_helper.from_array(new_q, qn))
    ix.inits[sn].CopyFrom(numpy_helper.from_array(new_sw, sn))
    return (np.float32(sx) * new_sw).astype(np.float32)


def _quantize_biases(model: onnx.ModelProto) -> None:
    ix = GraphIndex(model)
    known: list[dict[str, int]] = []

    def ranks() -> dict[str, int]:  # shape inference only when a MatMul needs it
        if not known:
            known.append(_ranks(model))
        return known[0]

    fresh = NameAllocator(model)
    new_nodes: list[onnx.NodeProto] = []
    retired: set[str] = set()
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        px, pw = ix.producer.get(n.input[0]), ix.producer.get(n.input[1])
        if px is None or pw is None:
            continue
        dqx, dqw = ix.node(px), ix.node(pw)
        if dqx.op_type != "DequantizeLinear" or dqw.op_type != "DequantizeLinear":
            continue
        found = _bias_site(ix, n, ranks)
        if found is None:
            continue
        target, k = found
        bias = target.input[k]
        if bias not in ix.inits or ix.use_count(bias) != 1:
            continue
        b = ix.constant_value(bias)
        sx = ix.constant_value(dqx.input[1])
        sw = ix.constant_value(dqw.input[1])
        if b is None or sx is None or sw is None or b.dtype != np.float32 or sx.size != 1 or b.ndim != 1:
            continue
        if sw.ndim > 1 or sw.size not in (1, b.size):
            continue  # blocked weight grids: no single scale per output channel
        scale = np.broadcast_to(np.float32(sx.reshape(())) * sw.astype(np.float32), b.shape).astype(np.float32)
        scale[scale == 0] = np.float32(1.0)
        codes = np.rint(b.astype(np.float64) / scale.astype(np.float64))
        if not np.all(np.abs(codes) <= _BIAS_LIMIT):
            # a near-dead output channel (tiny weight scale) with a real bias: its bias does not fit the int32
            # accumulator's grid. A float bias is no way out (ONNX Runtime's own bias quantization would overflow
            # it silently), so widen that channel's weight scale until the bias fits, as ORT's quantizer does;
            # its weights, already tiny, move by at most half of the new step.
            scale = _widen_weight_scale(ix, dqw, b, np.float32(sx.reshape(())), codes)
            if scale is None:
                continue
            codes = np.rint(b.astype(np.float64) / scale.astype(np.float64))
        codes = codes.astype(np.int32)
        qn, sn, zn, dn = (fresh(f"{bias}_quantized"), fresh(f"{bias}_scale"), fresh(f"{bias}_zero_point"),
                          fresh(f"{bias}_dequantized"))
        model.graph.initializer.extend([numpy_helper.from_array(codes, qn), numpy_helper.from_array(scale, sn),
                                        numpy_helper.from_array(np.zeros(b.shape, np.int32), zn)])
        new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dn], name=fresh(f"{bias}_DequantizeLinear"),
                                          axis=0))
        retired.add(bias)
        target.input[k] = dn
    for dq in reversed(new_nodes):
        model.graph.node.insert(0, dq)
    remove_unused(model, retired)
