"""SmoothQuant-style scale migration for W8A8 (``--smooth-alpha A``, Xiao et al., 2023).

A transformer's LayerNorm output has a few channels whose values are 10-100x larger than the rest; one per-tensor
8-bit grid wide enough for them leaves the other channels a handful of levels. The MatMuls reading that tensor
compute ``x W = (x / s) (s W)`` for any per-input-channel ``s > 0``: dividing channel j of the activation by

    s_j = max|x_j|^A / max|W_j|^(1 - A)    (max|W_j| over row j of every weight reading x)

moves part of its range into the weight's row j, which the per-output-channel weight grid absorbs much better.
The division must cost nothing at run time, so it is folded into the producer:

* a ``LayerNormalization`` (normalised over the last axis, constant Scale / B of one value per channel): its
  Scale and B are divided by s, exact. When the LayerNorm's output also has other readers (a BERT-style residual
  Add), the LayerNorm is duplicated: the copy with the divided Scale / B feeds only the smoothed MatMuls, the
  original keeps feeding the rest (an extra LayerNorm, no extra Mul).
* a ``Mul`` by a constant (one value, or one per last-axis channel) whose output only MatMul / Gemm layers read,
  such as the final ``x 0.5`` of a decomposed GELU in front of a transformer's FFN output layer: the constant
  becomes a per-channel vector divided by s, exact and free.
* anything else (an attention context through Reshape / Transpose) is left alone and reported: a separate Mul
  in front of the integer MatMul would cost a pass over the activation, and an unfused Mul is not what this
  option promises.

The transformation is exact in float (up to rounding): it changes only what the 8-bit grids see.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.layers import GraphIndex

log = logging.getLogger(__name__)

MIN_SCALE = 1e-5


@dataclass
class _Group:
    tensor: str  # the activation the MatMuls read
    producer: int  # index of the LayerNormalization or Mul node
    readers: list[tuple[int, str, bool]] = field(default_factory=list)  # (node index, weight name, transposed)


def _weight_rows(ix: GraphIndex, node: onnx.NodeProto) -> tuple[str, bool] | None:
    """(weight initializer, whether it is stored [out, in]) of a MatMul / Gemm with a constant weight of its
    own read as input 1, else None."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    w = node.input[1]
    if w not in ix.inits or ix.use_count(w) != 1:
        return None
    if node.op_type == "MatMul":
        return (w, False) if ix.inits[w].dims and len(ix.inits[w].dims) == 2 else None
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        return w, bool(attrs.get("transB", 0))
    return None


def smoothing_groups(model: onnx.ModelProto) -> tuple[list[_Group], list[str]]:
    """The LayerNorm outputs whose MatMul / Gemm readers can be smoothed, and notes on weight MatMuls that
    cannot (their input has no foldable producer)."""
    ix = GraphIndex(model)
    groups: dict[str, _Group] = {}
    notes: list[str] = []
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        wr = _weight_rows(ix, n)
        if wr is None:
            continue
        x = n.input[0]
        p = ix.producer.get(x)
        why = None
        if p is None:
            why = "its input is a graph input"
        else:
            prod = ix.node(p)
            if prod.op_type == "Mul" and prod.domain in ("", "ai.onnx"):
                p, why = _foldable_mul(ix, p, x)
            elif prod.op_type != "LayerNormalization" or prod.domain not in ("", "ai.onnx"):
                why = f"its input comes from {prod.op_type}, not a LayerNormalization or a Mul by a constant"
            elif next((a.i for a in prod.attribute if a.name == "axis"), -1) != -1:
                why = "LayerNormalization not over the last axis only"
            elif len(prod.input) < 2 or ix.constant_value(prod.input[1]) is None or (
                    len(prod.input) > 2 and prod.input[2] and ix.constant_value(prod.input[2]) is None):
                why = "LayerNormalization scale / bias not constant"
            elif ix.subgraph_users.get(x):
                why = "its input is read in a subgraph"
        if why:
            notes.append(f"{n.name or n.output[0]}: not smoothed ({why})")
            continue
        groups.setdefault(x, _Group(x, p)).readers.append((i, *wr))
    return list(groups.values()), notes


def _mul_constant(ix: GraphIndex, mul: onnx.NodeProto) -> tuple[int, np.ndarray] | None:
    """(index of the constant operand, its value) of a two-input Mul with exactly one constant operand."""
    vals = [ix.constant_value(t) for t in mul.input[:2]]
    if len(mul.input) != 2 or sum(v is not None for v in vals) != 1:
        return None
    k = 0 if vals[0] is not None else 1
    return k, vals[k]


def _foldable_mul(ix: GraphIndex, idx: int, x: str) -> tuple[int, str | None]:
    """(index of the Mul node whose constant takes the 1/s, None) for the Mul ``idx`` producing ``x``, or
    (idx, why not). The Mul's constant must be one value or one value per last-axis channel, and ``x`` read
    only by MatMul / Gemm layers. A Mul of two activations (GELU as x * (0.5 * (1 + erf(...)))) qualifies
    through an operand that is itself a Mul by a constant read by nothing else: scaling either factor of an
    elementwise product scales the product."""
    if x in ix.graph_outputs or ix.subgraph_users.get(x) or any(
            ix.node(u).op_type not in ("MatMul", "Gemm") for u, _ in ix.users.get(x, [])):
        return idx, "its input comes from a Mul whose output other nodes read too"
    mul = ix.node(idx)
    target = idx
    if _mul_constant(ix, mul) is None:
        target = None
        for t in mul.input[:2]:
            q = ix.producer.get(t)
            if (q is not None and ix.node(q).op_type == "Mul" and _mul_constant(ix, ix.node(q)) is not None
                    and ix.use_count(t) == 1 and t not in ix.graph_outputs and not ix.subgraph_users.get(t)):
                target = q
                break
        if target is None:
            return idx, "its input comes from a Mul of two activations, neither a Mul by a constant of its own"
    v = _mul_constant(ix, ix.node(target))[1]
    if v.dtype.kind != "f" or (v.ndim > 0 and v.size != v.shape[-1] and v.size != 1):
        return idx, "its input comes from a Mul by a constant that is not per channel"
    return target, None


def channel_absmax(model: onnx.ModelProto, tensors: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of ``tensors`` over ``feeds`` (ONNX Runtime)."""
    import onnxruntime as ort

    from ..runtime import inference_session
    from .hessian import augment

    aug, fetch = augment(model, tensors)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = inference_session(aug, so)
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        for t, v in zip(fetch, sess.run(fetch, f)):
            m = np.abs(np.asarray(v, np.float64)).reshape(-1, v.shape[-1]).max(0)
            out[t] = m if t not in out else np.maximum(out[t], m)
    return out


def _scale_rows(ix: GraphIndex, grp: _Group, s: np.ndarray) -> None:
    """Multiply input row j of every reader's weight by s_j, in place."""
    for _, w, trans in grp.readers:
        t = ix.inits[w]
        v = numpy_helper.to_array(t)
        new = v.astype(np.float64) * (s[None, :] if trans else s[:, None])
        t.CopyFrom(numpy_helper.from_array(new.astype(v.dtype), t.name))


def _entry(grp: _Group, g_nodes, duplicated: bool, xmax: np.ndarray, after: np.ndarray, s: np.ndarray) -> dict:
    return dict(tensor=grp.tensor, layers=[g_nodes[i].name or g_nodes[i].output[0] for i, _, _ in grp.readers],
                producer=g_nodes[grp.producer].op_type, duplicated=duplicated, absmax_before=float(xmax.max()),
                absmax_ratio_before=float(xmax.max() / max(np.median(xmax), 1e-30)),
                absmax_after=float(after.max()), absmax_ratio_after=float(after.max() / max(np.median(after), 1e-30)),
                s_min=float(s.min()), s_max=float(s.max()))


def smooth(model: onnx.ModelProto, alpha: float, feeds: list[dict]) -> list[dict]:
    """Migrate activation ranges into the weights, IN PLACE (see the module docstring); returns the report: one
    entry per smoothed tensor ({tensor, layers, duplicated, range_before, range_after, s_min, s_max}) and
    {note} entries for the MatMuls left alone."""
    from ..export.writeback import NameAllocator

    groups, notes = smoothing_groups(model)
    report: list[dict] = [dict(note=n) for n in notes]
    if not groups:
        return report
    amax = channel_absmax(model, [g.tensor for g in groups], feeds)
    ix = GraphIndex(model)
    fresh = NameAllocator(model)
    g_nodes = model.graph.node
    inserts: list[tuple[int, onnx.NodeProto]] = []
    dead: set[str] = set()
    for grp in groups:
        xmax = amax[grp.tensor]
        ws = []
        for _, w, trans in grp.readers:
            v = numpy_helper.to_array(ix.inits[w]).astype(np.float64)
            ws.append(np.abs(v.T if trans else v).max(1))
        if any(w.shape != xmax.shape for w in ws):
            report.append(dict(note=f"{grp.tensor}: not smoothed (weight rows do not match its channels)"))
            continue
        wmax = np.max(ws, axis=0)
        ok = (xmax > 0) & (wmax > 0)
        s = np.ones_like(xmax)
        s[ok] = xmax[ok] ** alpha / wmax[ok] ** (1 - alpha)
        s = np.maximum(s, MIN_SCALE)
        ln = g_nodes[grp.producer]
        if ln.op_type == "Mul":
            k, v = _mul_constant(ix, ln)
            if v.ndim > 0 and v.size not in (1, s.size):
                report.append(dict(note=f"{grp.tensor}: not smoothed (the Mul's constant does not match its channels)"))
                continue
            cn = fresh(f"{ln.input[k]}_smoothed")
            model.graph.initializer.append(numpy_helper.from_array(
                (np.broadcast_to(v.reshape(-1).astype(np.float64), s.shape) / s).astype(v.dtype), cn))
            ln.input[k] = cn
            _scale_rows(ix, grp, s)
            after = xmax / s
            report.append(_entry(grp, g_nodes, False, xmax, after, s))
            continue
        gamma = ix.constant_value(ln.input[1]).astype(np.float64)
        beta = ix.constant_value(ln.input[2]).astype(np.float64) if len(ln.input) > 2 and ln.input[2] else None
        if gamma.shape not in ((s.size,), ()) or (beta is not None and beta.shape not in ((s.size,), ())):
            report.append(dict(note=f"{grp.tensor}: not smoothed (LayerNorm scale is not one value per channel)"))
            continue
        readers = {g_nodes[i].output[0] for i, _, _ in grp.readers}
        others = [u for u, _ in ix.users.get(grp.tensor, []) if g_nodes[u].output[0] not in readers]
        duplicated = bool(others) or grp.tensor in ix.graph_outputs
        dt = numpy_helper.to_array(ix.inits[grp.readers[0][1]]).dtype
        gn = fresh(f"{ln.input[1]}_smoothed")
        new_in = [ln.input[0], gn]
        model.graph.initializer.append(numpy_helper.from_array((np.broadcast_to(gamma, s.shape) / s).astype(dt), gn))
        if beta is not None:
            bn = fresh(f"{ln.input[2]}_smoothed")
            model.graph.initializer.append(numpy_helper.from_array((np.broadcast_to(beta, s.shape) / s).astype(dt), bn))
            new_in.append(bn)
        if duplicated:
            out = fresh(f"{grp.tensor}_smoothed")
            twin = helper.make_node("LayerNormalization", new_in, [out], name=fresh(f"{ln.name or grp.tensor}_smoothed"))
            twin.attribute.extend(a for a in ln.attribute)
            inserts.append((grp.producer, twin))
            for i, _, _ in grp.readers:
                g_nodes[i].input[0] = out
        else:
            dead.update(t for t in ln.input[1:] if t)
            del ln.input[1:]
            ln.input.extend(new_in[1:])
        _scale_rows(ix, grp, s)
        report.append(_entry(grp, g_nodes, duplicated, xmax, xmax / s, s))
    for pos, node in sorted(inserts, key=lambda p: -p[0]):
        g_nodes.insert(pos + 1, node)
    from ..export.writeback import remove_unused

    remove_unused(model, dead)
    log.info("smoothing (alpha %g): %d tensors", alpha, sum(1 for r in report if "tensor" in r))
    return report
