"""Stages: which layers are calibrated (and their Hessians held) together (issue 12).

One calibration pass over the data forms every selected layer's C x C float64 Hessian at once, so its peak memory
is the sum over all layers. Split into stages, the Hessians are formed, solved and freed stage by stage: peak
memory is about the model plus ONE stage's Hessians, at the price of one ONNX Runtime pass per stage (each pass
runs only the part of the graph that the stage's inputs need: :func:`pruned_copy`).

* **Depth.** A layer's depth is the longest chain of selected layers before it in the graph (the number of
  selected-layer nodes on the longest path from a graph input to the node's activation input). Layers of one
  depth never feed each other, so they can be calibrated together even when earlier layers are already replaced
  by their compressed weights (``--sequential``: later layers then see, and compensate, the earlier errors).
* **Budget.** A stage whose Hessians exceed the byte budget is split (in graph order); a single layer over the
  budget is a stage of its own (a layer's Hessian cannot be split).
* **Default.** Without ``--sequential`` all layers stay in ONE pass whenever their Hessians fit the budget
  (``--stage-memory``; default half of the memory available when the run starts): that is the fastest, and
  byte-identical to calibrating without stages. Over the budget the layers are packed into as few stages as
  the budget allows (depth does not matter then: no weight changes between passes). Each layer's Hessian is the
  same sum over the same batches in the same order either way, so staging never changes its value.

Memory accounting is exposed for benchmarks: :func:`hessian_bytes`, :class:`StagePlan` (``CompressResult.memory``
holds its ``summary()`` plus the largest number of bytes of Hessians held at once) and :func:`peak_rss_bytes`.
"""
from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .graph.layers import Layer, _names_used_in, _subgraphs

MB = 1 << 20
# Without --stage-memory, the Hessians held at once may take this fraction of the memory available at the start.
DEFAULT_MEMORY_FRACTION = 0.5


def hessian_bytes(layer: Layer, hessians: bool = True) -> int:
    """Bytes of the layer's float64 X X^T sums ((groups, C, C); none for lookups or without Hessians)."""
    if not hessians or layer.layout.hessian_free:
        return 0
    return int(layer.groups) * int(layer.cols) ** 2 * 8


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere free physical pages), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int:
    """The Hessian budget when --stage-memory is not given: half of the available memory (1 GiB if unknown)."""
    avail = available_memory()
    return int(DEFAULT_MEMORY_FRACTION * avail) if avail else 1 << 30


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage`` ru_maxrss; KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and the outer names its subgraphs use."""
    names = [i for i in node.input if i]
    for g in _subgraphs(node):
        names += sorted(_names_used_in(g))
    return names


def layer_depths(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, int]:
    """{layer name: depth}: the number of ``layers``' nodes on the longest path from a graph input to the layer's
    activation input (0: nothing among ``layers`` comes before it). A weight read by several nodes counts at its
    deepest reader. The graph's nodes are in topological order (ONNX requires it)."""
    owner = {c.node_index: l for l in layers for c in l.consumers}
    act_of = {c.node_index: c.input_name for l in layers for c in l.consumers}
    depth: dict[str, int] = {}  # tensor -> selected-layer nodes on the longest path to it (absent: 0)
    out = {l.name: 0 for l in layers}
    for idx, node in enumerate(model.graph.node):
        d = max((depth.get(t, 0) for t in _reads(node)), default=0)
        if idx in owner:
            layer = owner[idx]
            out[layer.name] = max(out[layer.name], depth.get(act_of[idx], 0))
            d = max(d, depth.get(act_of[idx], 0) + 1)
        for o in node.output:
            if o:
                depth[o] = d
    return out


@dataclass
class StagePlan:
    """The stages of one run, in the order they are calibrated."""

    stages: list[list[Layer]]
    budget: int  # bytes of Hessians a stage may hold (a single larger layer is a stage alone)
    total: int  # bytes of all layers' Hessians (what one pass holds)
    sequential: bool = False
    hessians: bool = True  # False: statistics without Hessians (counts only), nothing to bound
    depths: dict[str, int] = field(default_factory=dict)
    held_peak: int = 0  # the most bytes of Hessians held at once so far (note_held)
    passes: int = 0  # calibration passes that formed statistics so far

    @property
    def staged(self) -> bool:
        """True when calibration runs stage by stage (False: the one pass of old)."""
        return self.sequential or len(self.stages) > 1

    def stage_bytes(self) -> list[int]:
        return [sum(hessian_bytes(l, self.hessians) for l in s) for s in self.stages]

    def note_held(self, stats: dict) -> None:
        """Count one pass whose statistics ``stats`` ({name: LayerStats}) are all alive now."""
        self.passes += 1
        self.held_peak = max(self.held_peak, sum(st.xtx.nbytes for st in stats.values()))

    def summary(self) -> dict:
        """For reports and benchmarks: stages, budget, bytes of all Hessians, of the largest stage, and the most
        bytes of Hessians actually held at once."""
        return dict(stages=len(self.stages), sequential=self.sequential, staged=self.staged,
                    budget_bytes=self.budget, hessian_bytes_total=self.total,
                    hessian_bytes_max_stage=max(self.stage_bytes(), default=0), hessian_bytes_held_peak=self.held_peak,
                    passes=self.passes, layers_per_stage=[len(s) for s in self.stages])


def _split(layers: list[Layer], budget: int, hessians: bool) -> list[list[Layer]]:
    """Consecutive runs of ``layers`` whose Hessians fit ``budget`` (a larger layer alone)."""
    out: list[list[Layer]] = []
    cur: list[Layer] = []
    used = 0
    for l in layers:
        b = hessian_bytes(l, hessians)
        if cur and used + b > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(l)
        used += b
    if cur:
        out.append(cur)
    return out


def plan_stages(model: onnx.ModelProto, layers: list[Layer], *, sequential: bool = False,
                budget: int | None = None, hessians: bool = True) -> StagePlan:
    """Group ``layers`` (in graph order) into stages; see the module docstring. ``budget``: bytes of Hessians a
    stage may hold (None: :func:`default_budget`); ``hessians=False``: nothing is held (counts only)."""
    budget = default_budget() if budget is None else int(budget)
    if budget <= 0:
        raise ValueError(f"the Hessian budget must be positive, got {budget} bytes")
    total = sum(hessian_bytes(l, hessians) for l in layers)
    depths = layer_depths(model, layers) if sequential else {}
    if not layers:
        return StagePlan([], budget, total, sequential, hessians, depths)
    if sequential:
        stages = [s for d in sorted(set(depths.values()))
                  for s in _split([l for l in layers if depths[l.name] == d], budget, hessians)]
    elif total <= budget:
        stages = [list(layers)]
    else:
        stages = _split(list(layers), budget, hessians)
    return StagePlan(stages, budget, total, sequential, hessians, depths)


# ------------------------------------------------------------------------------------------------ graph edits
def _needed(graph: onnx.GraphProto, fetch: list[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes ``fetch`` depends on (in graph order) and every tensor name they read."""
    need = set(fetch)
    keep = []
    for node in reversed(graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(_reads(node))
    keep.reverse()
    return keep, need


def pruned_copy(model: onnx.ModelProto, fetch: list[str]) -> onnx.ModelProto:
    """A new model with only the nodes (and initializers) that ``fetch`` depends on and no graph outputs (the
    caller adds ``fetch``): a stage's pass runs the graph up to its layers' inputs, not the whole model, and only
    what it needs is copied. Graph inputs all stay (callers feed every input)."""
    g = model.graph
    keep, need = _needed(g, fetch)
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name == "graph":
            continue
        if (fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED):
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    og = out.graph
    og.name = g.name
    og.input.extend(g.input)
    og.node.extend(keep)
    og.initializer.extend(t for t in g.initializer if t.name in need)
    og.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in need)
    og.value_info.extend(v for v in g.value_info if v.name in need)
    return out


def replace_weights(model: onnx.ModelProto, weights: list[tuple[Layer, np.ndarray]]) -> None:
    """Edit ``model`` in place so that the layers' nodes read the given weights (as the consumers see them, e.g.
    compressed float weights) instead of their own: each weight becomes a new initializer and the consumers'
    weight input is renamed to it. Node indices and every other tensor stay as they were. Meant for the copy a
    calibration pass runs (``collect_hessians(edit=...)``): a protobuf message keeps the memory of removed
    fields until it is freed, so the model the run keeps is never edited back and forth. Nodes are found by
    their output (a copy may hold only part of the graph); the replaced initializers are dropped when nothing
    else reads them."""
    g = model.graph
    by_out = {n.output[0]: n for n in g.node if n.output}
    replaced = set()
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for layer, w in weights:
        name = f"{layer.weight_name}__obc_stage"
        k = 0
        while name in taken:
            k += 1
            name = f"{layer.weight_name}__obc_stage{k}"
        taken.add(name)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, dtype=layer.weight.dtype), name))
        for c in layer.consumers:
            node = by_out.get(c.output_name)
            if node is None:  # pruned away: nothing this pass runs reads it
                continue
            for pos, inp in enumerate(node.input):
                if inp == layer.weight_name and inp != c.input_name:
                    node.input[pos] = name
                    replaced.add(inp)
    if replaced:
        read = {t for n in g.node for t in _reads(n)}
        dead = [t for t in g.initializer if t.name in replaced and t.name not in read]
        for t in dead:
            g.initializer.remove(t)
