"""Writing compressed weights back into the graph, keeping everything else as it was."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.layers import CHAIN_OPS, GraphIndex, Layer

def _set_tensor(model: onnx.ModelProto, ix: GraphIndex, name: str, kind: str, value: np.ndarray) -> None:
    t = numpy_helper.from_array(value, name)
    if kind == "initializer":
        for i, init in enumerate(model.graph.initializer):
            if init.name == name:
                t.doc_string = init.doc_string
                model.graph.initializer[i].CopyFrom(t)
                return
        raise KeyError(name)
    node = ix.node(ix.producer[name])
    for a in node.attribute:
        if a.name == "value":
            t.name = a.t.name
            a.t.CopyFrom(t)
            return
    raise KeyError(name)


class NameAllocator:
    """Fresh tensor and node names that clash with nothing in the main graph."""

    def __init__(self, model: onnx.ModelProto, ix: GraphIndex | None = None):
        ix = ix or GraphIndex(model)
        self.taken = ({t.name for t in model.graph.initializer} | set(ix.producer) | ix.graph_inputs
                      | {n.name for n in model.graph.node})

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name


class GraphEdit:
    """All the edits of one model, with one protocol.

    Layers are found (and carry node indices) before any edit; while layers are written, nodes are only
    changed in place (an input renamed, a node replaced by another at the same index), new nodes whose inputs
    are all initializers wait in :attr:`front`, and replaced tensors are collected in :attr:`dead`. So every
    layer's node indices stay valid until :meth:`finish` puts the new nodes at the front of the graph (a valid
    topological place) and drops what no longer feeds anything. One index of the graph and one name allocator
    serve all layers.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.ix = GraphIndex(model)
        self.fresh = NameAllocator(model, self.ix)
        self.dead: set[str] = set()
        self.front: list[onnx.NodeProto] = []

    def node(self, index: int) -> onnx.NodeProto:
        return self.model.graph.node[index]

    def add_initializers(self, tensors: list[onnx.TensorProto]) -> None:
        self.model.graph.initializer.extend(tensors)

    def rewire(self, layer: Layer, name: str) -> None:
        """Every consumer of ``layer`` reads its weight from tensor ``name``."""
        for c in layer.consumers:
            self.node(c.node_index).input[c.layout.weight_input] = name

    def replace_node(self, index: int, node: onnx.NodeProto) -> None:
        self.node(index).CopyFrom(node)

    def add_front(self, node: onnx.NodeProto) -> None:
        self.front.append(node)

    def retire(self, layer: Layer) -> None:
        """Record the layer's old weight tensor, its source and its chain as candidates for removal."""
        self.dead.add(layer.weight_name)
        self.dead.add(layer.source_name)
        for step in layer.chain:
            self.dead.add(self.node(step.node_index).output[0])

    def finish(self) -> None:
        """Insert the waiting nodes and drop the tensors and chain nodes that no longer feed anything."""
        for n in reversed(self.front):
            self.model.graph.node.insert(0, n)
        self.front = []
        remove_unused(self.model, self.dead)
        self.dead = set()


def write_back(edit: GraphEdit, layer: Layer, new_weight: np.ndarray) -> str:
    """Store ``new_weight`` (as the consumers see it) as float; returns how it was written.

    The chain from the source is inverted (Transpose back, Reshape back, Cast back to the source dtype) and
    the source tensor rewritten in place, keeping its name and dtype, when the source and the chain's
    intermediate tensors serve only this layer. Otherwise a new initializer ``<weight>_obc`` is added, the
    consumers read it, and the old chain is retired.
    """
    ix = edit.ix
    if layer.exclusive:
        value = new_weight
        for step in reversed(layer.chain):
            if step.op == "Transpose":
                value = np.transpose(value, np.argsort(step.attrs["perm"]))
            elif step.op == "Reshape":
                value = value.reshape(step.input_shape)
            elif step.op == "Cast":
                value = value.astype(step.input_dtype)
        src_dtype = layer.chain[0].input_dtype if layer.chain else layer.weight.dtype
        _set_tensor(edit.model, ix, layer.source_name, layer.source_kind, np.ascontiguousarray(value.astype(src_dtype)))
        return "in place"
    new_name = edit.fresh(f"{layer.weight_name}_obc")
    edit.add_initializers([numpy_helper.from_array(np.ascontiguousarray(new_weight.astype(layer.weight.dtype)), new_name)])
    edit.rewire(layer, new_name)
    edit.retire(layer)
    return f"new initializer {new_name}"


def remove_unused(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the Constant/chain nodes and initializers among ``names`` that no longer feed anything.

    Only tensors that compression orphaned are considered: whatever the input model held unused stays.
    """
    g = model.graph
    while names:
        ix = GraphIndex(model)
        dead_nodes = [i for i, n in enumerate(g.node)
                      if n.op_type in ("Constant",) + CHAIN_OPS and n.output and n.output[0] in names
                      and ix.use_count(n.output[0]) == 0]
        if not dead_nodes:
            break
        for i in reversed(dead_nodes):
            del g.node[i]
    ix = GraphIndex(model)
    keep = [t for t in g.initializer if t.name not in names or ix.use_count(t.name) > 0 or t.name in ix.graph_inputs]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
