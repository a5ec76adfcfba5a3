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

    def __init__(self, model: onnx.ModelProto):
        ix = GraphIndex(model)
        self.taken = ({t.name for t in model.graph.initializer} | set(ix.producer) | ix.graph_inputs
                      | {n.name for n in model.graph.node})

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name


def retire_weight(model: onnx.ModelProto, layer: Layer, dead: set[str]) -> None:
    """Record the layer's old weight tensor, its source and its chain as candidates for :func:`remove_unused`."""
    ix = GraphIndex(model)
    dead.add(layer.weight_name)
    dead.add(layer.source_name)
    for step in layer.chain:
        dead.add(ix.node(step.node_index).output[0])


def write_back(model: onnx.ModelProto, layer: Layer, new_weight: np.ndarray, dead: set[str]) -> str:
    """Store ``new_weight`` (as the consumers see it) into ``model``; returns how it was written.

    The chain from the source is inverted (Transpose back, Reshape back, Cast back to the source dtype) and
    the source tensor rewritten in place, keeping its name and dtype, when the source and the chain's
    intermediate tensors serve only this layer. Otherwise a new initializer ``<weight>_obc`` is added, the
    consumers read it, and the old chain's tensor names are added to ``dead`` so that
    :func:`remove_unused` can drop them once every layer is written (node indices stay valid until then).
    """
    ix = GraphIndex(model)
    along = [layer.source_name] + [ix.node(s.node_index).output[0] for s in layer.chain[:-1]]
    exclusive = not layer.chain or all(ix.use_count(t) == 1 for t in along)
    if exclusive:
        value = new_weight
        for step in reversed(layer.chain):
            if step.op == "Transpose":
                value = np.transpose(value, np.argsort(step.attrs["perm"]))
            elif step.op == "Reshape":
                value = value.reshape(step.input_shape)
            elif step.op == "Cast":
                value = value.astype(step.input_dtype)
        src_dtype = layer.chain[0].input_dtype if layer.chain else layer.weight.dtype
        _set_tensor(model, ix, layer.source_name, layer.source_kind, np.ascontiguousarray(value.astype(src_dtype)))
        return "in place"
    new_name = NameAllocator(model)(f"{layer.weight_name}_obc")
    model.graph.initializer.append(
        numpy_helper.from_array(np.ascontiguousarray(new_weight.astype(layer.weight.dtype)), new_name))
    for c in layer.consumers:
        model.graph.node[c.node_index].input[1] = new_name
    retire_weight(model, layer, dead)
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
