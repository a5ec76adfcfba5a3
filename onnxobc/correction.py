"""Statistics correction after compression (ALGORITHMS.md sec. 5.5): per output channel, make a compressed
layer's output mean (``mean``) or mean and standard deviation (``affine``) on the calibration data match the
dense model's, folded into the layer so that the graph keeps its shape.

Exported graphs have their BatchNorms folded into the Convs, so the correction goes into each compressed layer:
``y' = (y - mu_c) * s + mu_d`` with ``s = sigma_d / sigma_c`` (1 for ``mean``) becomes ``W' = s W`` (for a
quantized weight: its per-channel quantization scale times s, which keeps the stored grid exact) and
``b' = s (b - mu_c) + mu_d`` (a bias is created where the layer has none: a Conv/Gemm bias input, or an Add after
a MatMul). Layers are corrected in topological order, each measured on the model whose earlier layers are
already corrected (one ONNX Runtime run over the correction samples per layer).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph.layers import Layer

log = logging.getLogger(__name__)

MODES = ("none", "mean", "affine")


@dataclass
class _Site:
    layer: Layer
    node: onnx.NodeProto  # the consumer as written (Conv / Gemm / MatMul / MatMulNBits)
    out: str  # its output tensor
    axis: int  # channel axis of that output


def _channel_stats(y: np.ndarray, axis: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum, sum of squares, count) per channel, float64."""
    y = np.asarray(y, np.float64)
    if mask is not None and axis == y.ndim - 1 and y.ndim >= 3 and y.shape[:2] == mask.shape:
        y = y[mask]
        axis = y.ndim - 1
    y = np.moveaxis(y, axis, -1).reshape(-1, y.shape[axis])
    return y.sum(0), (y * y).sum(0), y.shape[0]


def _stats(model: onnx.ModelProto, outs: list[tuple[str, int]], feeds: list[dict], token_mask: str | None
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, std) of tensors ``outs`` ((name, channel axis)) over the feeds, computed as the model
    will be deployed: ONNX Runtime's default graph optimisations on (its fused int4/int8 kernels round
    differently from the unfused graph, and the correction must match what runs)."""
    import onnxruntime as ort

    from .calibrate.hessian import augment
    from .runtime import inference_session

    aug, fetch = augment(model, [o for o, _ in outs])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = inference_session(aug, so)
    acc = [None] * len(outs)
    for f in feeds:
        vals = dict(zip(fetch, sess.run(fetch, f)))
        mask = None if token_mask is None else np.asarray(f[token_mask]) != 0
        for i, (o, ax) in enumerate(outs):
            s, q, n = _channel_stats(vals[o], ax, mask)
            acc[i] = (s, q, n) if acc[i] is None else (acc[i][0] + s, acc[i][1] + q, acc[i][2] + n)
    res = []
    for s, q, n in acc:
        mu = s / max(n, 1)
        res.append((mu, np.sqrt(np.maximum(q / max(n, 1) - mu * mu, 0.0))))
    return res


def _sites(model: onnx.ModelProto, layers: list[Layer]) -> tuple[list[_Site], list[dict]]:
    by_out = {o: n for n in model.graph.node for o in n.output}
    sites, notes = [], []
    for layer in layers:
        if len(layer.consumers) != 1:
            notes.append(dict(layer=layer.name, note="not corrected: the weight is shared by several nodes"))
            continue
        if layer.op not in ("Gemm", "MatMul", "Conv"):
            notes.append(dict(layer=layer.name, note=f"not corrected: statistics correction does not handle {layer.op}"))
            continue
        c = layer.consumers[0]
        node = by_out.get(c.output_name)
        if node is None:
            notes.append(dict(layer=layer.name, note="not corrected: its output is not produced in the written graph"))
            continue
        axis = layer.layout.channel_axis
        sites.append(_Site(layer, node, c.output_name, axis))
    return sites, notes


class _Folder:
    """Folds per-channel (scale, shift) into a written layer."""

    def __init__(self, model: onnx.ModelProto):
        from .export.writeback import NameAllocator

        self.model = model
        self.fresh = NameAllocator(model)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.uses: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        for o in model.graph.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1

    def _own(self, name: str) -> onnx.TensorProto | None:
        """The initializer ``name`` if only one node reads it (else None: it cannot be changed in place)."""
        t = self.inits.get(name)
        return t if t is not None and self.uses.get(name, 0) == 1 else None

    def _set(self, t: onnx.TensorProto, value: np.ndarray) -> None:
        t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), t.name))

    def scale_weight(self, site: _Site, s: np.ndarray, dry: bool = False) -> str | None:
        """Multiply output channel k of the layer's weight by s[k] (``dry``: only check that it can); None on
        success, else why not."""
        node, layer = site.node, site.layer
        if node.op_type == "MatMulNBits":
            t = self._own(node.input[2])
            if t is None:
                return "MatMulNBits scales shared"
            if dry:
                return None
            v = numpy_helper.to_array(t)
            n = len(s)
            self._set(t, (v.reshape(n, -1) * s[:, None].astype(v.dtype)).reshape(v.shape))
            return None
        w = node.input[1]
        prod = next((n for n in self.model.graph.node if w in n.output), None)
        out_axis = layer.layout.out_axis()
        if prod is not None and prod.op_type == "DequantizeLinear":
            t = self._own(prod.input[1])
            if t is None:
                return "quantization scale shared"
            v = numpy_helper.to_array(t)
            if v.ndim == 0 or v.size == 1:
                return "per-tensor quantization scale"
            if dry:
                return None
            shape = [1] * v.ndim
            shape[out_axis if v.ndim > 1 else 0] = -1
            self._set(t, v * s.reshape(shape).astype(v.dtype))
            return None
        t = self._own(w)
        if t is None:
            return "weight not a plain initializer (a chain or shared)"
        if dry:
            return None
        v = numpy_helper.to_array(t)
        shape = [1] * v.ndim
        shape[out_axis] = -1
        self._set(t, v * s.reshape(shape).astype(v.dtype))
        return None

    def bias(self, site: _Site, s: np.ndarray, mu_c: np.ndarray, mu_d: np.ndarray) -> str | None:
        """Fold the shift into the layer's bias (created where there is none); None on success, else why not.

        A Conv/Gemm bias is inside the measured output y = Wx + b, so b' = s (b - mu_c) + mu_d; the Add after a
        MatMul is outside it (y = xW), so b' = b + mu_d - s mu_c."""
        def inside(b):
            return s * (b - mu_c) + mu_d

        def outside(b):
            return b + mu_d - s * mu_c

        delta_of = inside if site.node.op_type in ("Conv", "Gemm") else outside
        node = site.node
        n_out = None
        g = self.model.graph
        if node.op_type in ("Conv", "Gemm"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            beta = float(attrs.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
            if beta == 0.0:
                return "Gemm with beta 0"
            if len(node.input) > 2 and node.input[2]:
                t = self._own(node.input[2])
                if t is None:
                    return "bias not a constant of its own"
                b = numpy_helper.to_array(t).astype(np.float64)
                flat = b.reshape(-1)
                if b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1):
                    return "bias not per channel"
                new = delta_of(np.broadcast_to(flat, (site_channels(site),)) * beta) / beta
                self._set(t, new.reshape((1, -1) if b.ndim == 2 else (-1,)))
                return None
            new = delta_of(np.zeros(site_channels(site))) / beta
            name = self.fresh(f"{node.name or site.out}_bias")
            g.initializer.append(numpy_helper.from_array(new.astype(np.float32), name))
            while len(node.input) < 2:
                node.input.append("")
            if len(node.input) == 2:
                node.input.append(name)
            else:
                node.input[2] = name
            return None
        # MatMul / MatMulNBits: an Add after it with a per-channel constant, or a new Add
        readers = [n for n in g.node if site.out in n.input]
        if len(readers) == 1 and readers[0].op_type == "Add" and site.out not in {o.name for o in g.output}:
            add = readers[0]
            other = add.input[1] if add.input[0] == site.out else add.input[0]
            t = self._own(other)
            if t is not None:
                b = numpy_helper.to_array(t).astype(np.float64)
                if b.ndim == 1 and b.shape[0] == site_channels(site):
                    self._set(t, delta_of(b))
                    return None
        n_out = self.fresh(f"{site.out}_uncorrected")
        name = self.fresh(f"{node.name or site.out}_bias")
        g.initializer.append(numpy_helper.from_array(delta_of(np.zeros(site_channels(site))).astype(np.float32), name))
        for k, o in enumerate(node.output):
            if o == site.out:
                node.output[k] = n_out
        idx = list(g.node).index(node)
        g.node.insert(idx + 1, helper.make_node("Add", [n_out, name], [site.out], name=self.fresh(f"{node.name}_bias_add")))
        return None


def site_channels(site: _Site) -> int:
    layer = site.layer
    return int(layer.weight.shape[layer.layout.out_axis()])


def reference(dense: onnx.ModelProto, layers: list[Layer], feeds: list[dict], token_mask: str | None = None
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, std) of every single-consumer layer's output in the dense model (before any edit)."""
    outs = [(l.consumers[0].output_name, l.layout.channel_axis) for l in layers if len(l.consumers) == 1]
    return {o: st for (o, _), st in zip(outs, _stats(dense, outs, feeds, token_mask))} if outs else {}


def correct(ref: dict, compressed: onnx.ModelProto, layers: list[Layer], feeds: list[dict], mode: str,
            token_mask: str | None = None, deploy=None) -> list[dict]:
    """Correct ``compressed`` IN PLACE toward the dense statistics ``ref`` (see :func:`reference`; ``layers`` as
    found in the dense model, whose consumers' outputs name the same tensors in both); returns one report entry
    per layer. ``deploy(model)``, when given, is the model whose statistics are measured (W8A8: a copy with the
    activation Q/DQ pairs inserted), while the corrections are folded into ``compressed``."""
    if mode == "none":
        return []
    sites, report = _sites(compressed, layers)
    for site in sites:
        mu_d, sd_d = ref[site.out]
        measured = compressed if deploy is None else deploy(compressed)
        (mu_c, sd_c), = _stats(measured, [(site.out, site.axis)], feeds, token_mask)
        folder = _Folder(compressed)
        s = np.ones_like(mu_d)
        why = None
        if mode == "affine":
            # a channel that is constant in the dense model (sd_d = 0) keeps its scale: s = 0 would zero a
            # quantization scale (DequantizeLinear needs it positive; W8A8's int32 bias grid divides by it)
            ok = (sd_c > 1e-8 * np.maximum(sd_d, 1e-30)) & (sd_d > 1e-6 * max(float(sd_d.max()), 1e-30))
            s = np.where(ok, sd_d / np.where(ok, sd_c, 1.0), 1.0)
            why = folder.scale_weight(site, s, dry=True)
            if why:
                s = np.ones_like(mu_d)
        err = folder.bias(site, s, mu_c, mu_d)
        if err is None and mode == "affine" and why is None:
            folder.scale_weight(site, s)
        entry = dict(layer=site.layer.name, mean_shift=float(np.mean(np.abs(mu_c - mu_d))),
                     std_ratio_min=float(s.min()), std_ratio_max=float(s.max()))
        if err:
            entry["note"] = f"not corrected: {err}"
        elif why:
            entry["note"] = f"mean only: {why}"
        report.append(entry)
    return report
