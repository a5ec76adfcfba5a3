"""One apply: every layer's result written into the model, in every storage format, then the post-passes.

:func:`apply` is the only place that rewrites a model's layers. Per layer it picks the storage (see
:func:`storage_format`: MatMulNBits, QDQ integer codes + DequantizeLinear, or float) and writes through one
:class:`~onnxobc.export.writeback.GraphEdit` (names, rewiring, retired tensors, new nodes, order); then it
inserts the activation Q/DQ pairs of W8A8 and, last, encodes sparse initializers compactly.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from ..engine.grid import Grid
from ..engine.spec import LayerSpec
from ..graph.layers import Layer
from .matmulnbits import replace_with_matmulnbits
from .qdq import add_qdq_weight, storage_bits
from .writeback import GraphEdit, write_back


@dataclass(frozen=True)
class ExportOptions:
    """How the compressed model is stored (the run's export options)."""

    qdq: bool = False
    matmulnbits: bool = False
    accuracy_level: int = 0
    sparse_storage: bool = False

    @classmethod
    def of(cls, cfg) -> "ExportOptions":
        return cls(qdq=cfg.qdq, matmulnbits=cfg.matmulnbits, accuracy_level=cfg.accuracy_level,
                   sparse_storage=cfg.sparse_storage)


def storage_format(layer: Layer, bits: int | None, opts: ExportOptions) -> str:
    """'matmulnbits', 'qdq' or 'float': how a layer quantized to ``bits`` (None: not quantized) is stored."""
    if bits is not None and opts.matmulnbits and layer.layout.matmulnbits and storage_bits(bits) == 4:
        return "matmulnbits"
    if bits is not None and opts.qdq:
        return "float" if layer.layout.qdq_problem(layer.weight.shape) else "qdq"
    return "float"


@dataclass
class Written:
    """What :func:`apply` did: per layer how its weight was written, and the post-passes' reports."""

    layers: dict[str, str]
    activations: list | None = None
    sparse_storage: list | None = None
    correction: list | None = None
    finish: list | None = None


def apply(model: onnx.ModelProto, layers: list[Layer], results: dict[str, tuple[np.ndarray, Grid | None]],
          opts: ExportOptions, *, activations=None,
          correct=None, finish=None) -> tuple[onnx.ModelProto, Written]:
    """Write ``results`` ({layer name: (new weight as the consumers see it, its grid or None)}) into ``model``
    IN PLACE (pass a copy to keep the original), then the W8A8 activation pairs (``activations``: the sites of
    :func:`~onnxobc.export.actquant.plan_sites` and their parameters, or a function of the written model giving
    them) and sparse storage. ``correct(model, deploy)`` (statistics correction) edits the written weights
    before the activation pairs are inserted; ``deploy`` (None without activation pairs) maps a model to a copy
    with the pairs in place, the model to measure. ``finish(model)`` (W8A8 bias correction) runs after the pairs,
    its result in ``Written.finish``. Returns the model
    (a new object only when sparse storage re-encoded it) and what was written."""
    edit = GraphEdit(model)
    written: dict[str, str] = {}
    for layer in layers:
        if layer.name not in results:
            continue
        w_new, grid = results[layer.name]
        fmt = storage_format(layer, None if grid is None else grid.bits, opts)
        if fmt == "matmulnbits":
            written[layer.name] = "MatMulNBits " + replace_with_matmulnbits(edit, layer, w_new, grid,
                                                                           accuracy_level=opts.accuracy_level)
        elif fmt == "qdq":
            written[layer.name] = f"QDQ {add_qdq_weight(edit, layer, w_new, grid)}"
        else:
            written[layer.name] = write_back(edit, layer, w_new)
            why = layer.layout.qdq_problem(layer.weight.shape) if (grid is not None and opts.qdq) else None
            if why:
                written[layer.name] += f" (float fake-quant: {why})"
    edit.finish()
    _tie_tables(model, [l for l in layers if l.name in results], written)
    out = Written(written)
    acts = None
    if activations is not None:
        acts = activations(model) if callable(activations) else activations
    if correct is not None:
        # with W8A8, the statistics are measured on the model as deployed (its activation pairs in place and the
        # biases on their int32 grids), so that the correction also removes the shift that quantized activations
        # cause; the corrections are folded into the float model, which gets its pairs just below
        out.correction = correct(model, None if acts is None else functools.partial(_with_activations, acts))
    if acts is not None:
        from .actquant import insert_activation_qdq

        sites, params = acts
        used = insert_activation_qdq(model, sites, params)
        out.activations = [dict(tensor=s.tensor, used_as=s.why, **asdict(used[s.tensor])) for s in sites]
        if finish:
            out.finish = finish(model)
    if opts.sparse_storage:
        from .sparse import sparse_encode

        model, out.sparse_storage = sparse_encode(model, inplace=True)
    return model, out


def _tie_tables(model: onnx.ModelProto, layers: list[Layer], written: dict[str, str]) -> None:
    """Tied embeddings: a Gather (axis 0) that reads the same constant table as a compressed layer's weight (an
    LM head reading it through a Transpose, or a Gemm with transB) now reads that layer's compressed weight as
    written (float or DequantizeLinear output), turned back to the table's orientation: the table is compressed
    once, consistently, and stored once. MatMulNBits packs the weight inside its node, so there the Gather keeps
    the original table (said in ``written``)."""
    g = model.graph
    for layer in layers:
        gathers = [n for n in g.node if n.op_type == "Gather" and n.input and n.input[0] == layer.source_name
                   and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0]
        if not gathers:
            continue
        names = ", ".join(n.name or n.output[0] for n in gathers)
        if any(st.op != "Transpose" for st in layer.chain) or layer.weight.ndim != 2:
            written[layer.name] += f"; tied Gather {names} keeps the original table (weight chain is not a transpose)"
            continue
        out_name = layer.consumers[0].output_name
        node = next((n for n in g.node if out_name in n.output), None)
        if node is None or node.op_type == "MatMulNBits":
            written[layer.name] += f"; tied Gather {names} keeps the original table (MatMulNBits packs the weight)"
            continue
        tensor = node.input[layer.layout.weight_input]
        perm = np.arange(2)
        for st in layer.chain:  # source -> consumer orientation; the Gather needs the source's
            perm = perm[list(st.attrs["perm"])]
        if not np.array_equal(perm, np.arange(2)):
            taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
            name, k = f"{layer.source_name}_tied", 0
            while name in taken:
                k += 1
                name = f"{layer.source_name}_tied{k}"
            t_node = onnx.helper.make_node("Transpose", [tensor], [name], name=name, perm=np.argsort(perm).tolist())
            g.node.append(t_node)
            tensor = name
        for n in gathers:
            n.input[0] = tensor
        _toposort(g)  # the Gathers now read what the weight's producer (DQ, Transpose) makes
        written[layer.name] += f"; the tied Gather {names} reads this compressed weight (the table is stored once)"
        if not any(layer.source_name in n.input for n in g.node) and layer.source_name not in {o.name for o in g.output}:
            keep = [t for t in g.initializer if t.name != layer.source_name]
            del g.initializer[:]
            g.initializer.extend(keep)


def _toposort(g: onnx.GraphProto) -> None:
    """Order ``g``'s nodes topologically, keeping the given order wherever it already is one (Kahn's algorithm,
    the lowest original index first)."""
    import heapq

    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[t] for t in n.input if t in producer and producer[t] != i} for i, n in enumerate(nodes)]
    readers: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            readers.setdefault(j, []).append(i)
    left = [len(d) for d in deps]
    ready = [i for i, k in enumerate(left) if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers.get(i, []):
            left[r] -= 1
            if left[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):  # a cycle cannot come from this edit; leave the graph as it was
        return
    del g.node[:]
    g.node.extend(nodes[i] for i in order)


def _with_activations(acts, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the W8A8 activation pairs ``acts`` ((sites, parameters)) inserted."""
    from .actquant import insert_activation_qdq

    m = copy.deepcopy(model)
    insert_activation_qdq(m, *acts)
    return m


def spec_format(layer: Layer, spec: LayerSpec | None, opts: ExportOptions) -> str:
    """:func:`storage_format` of a layer planned with ``spec`` (None: left as it is)."""
    return storage_format(layer, None if spec is None else spec.bits, opts)
