"""Per-layer report notes that need the graph or every layer (issue 15, part 4): kernel taps that only ever see
padding at the calibration input size, and a layer that took far longer than layers of the same shape and
method."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .engine.solver import LayerResult, Note
from .graph.layers import Layer

SLOW_FACTOR = 3.0  # a layer this many times slower than the median of its peers gets a note
SLOW_MIN_SECONDS = 10.0  # ... and at least this many seconds slower (fast layers' timings are noise)


def dead_input_note(layer: Layer, H: np.ndarray | None, res: LayerResult) -> Note | None:
    """A note for a Conv some of whose kernel taps read nothing but zero padding on the calibration data (every
    input channel at that tap has H_jj = 0: the input is too small for the kernel), when that leaves the layer
    sparser than its spec asked. The solver sets weights it never sees used to zero, so "exact 50%" can report
    68.8%; those taps are dead for this input length only (a larger input reaches them, and there the layer
    differs from the dense one). Inputs dead for other reasons (a ReLU feature never active) count toward the
    requested sparsity like any other weight and get no note."""
    if H is None or res.dense or layer.op != "Conv" or layer.weight.ndim < 3:
        return None
    kernel = tuple(int(k) for k in layer.weight.shape[2:])
    taps = int(np.prod(kernel))
    if taps < 2:
        return None
    H = np.asarray(H)
    dead = np.stack([np.diagonal(h) == 0 for h in H])  # (groups, C), stored column order: Cin/g outer, taps
    cin = dead.shape[1] // taps
    per_tap = dead.reshape(dead.shape[0], cin, taps).all(axis=(0, 1))  # a tap dead for every channel
    if not per_tap.any():
        return None
    spec = res.spec
    asked = spec.sparsity if spec.sparsity is not None else (1.0 - spec.nm[0] / spec.nm[1] if spec.nm else 0.0)
    got = float(np.mean(np.asarray(res.mats) == 0))
    if got <= asked + 1e-3:
        return None
    where = [tuple(int(i) for i in np.unravel_index(t, kernel)) for t in np.nonzero(per_tap)[0]]
    shown = ", ".join(str(p) for p in where[:6]) + (" ..." if len(where) > 6 else "")
    return Note("dead_taps", f"{int(per_tap.sum())} of the {'x'.join(map(str, kernel))} kernel taps ({shown}) only "
                f"see zero padding at the calibration input size, so their weights are zero: {got:.1%} zeros where "
                f"{asked:.0%} was asked; dead for this input length only (a larger input reaches them, and there "
                f"the layer differs from the dense one)", float(per_tap.sum()) / taps)


def slow_layer_notes(layers: list) -> None:
    """Add a note, IN PLACE, to each report entry (pipeline.LayerReport) that took more than SLOW_FACTOR x the
    median time of the other layers with the same shape, groups and method (at least three of them), and at
    least SLOW_MIN_SECONDS more."""
    peers: dict[tuple, list] = defaultdict(list)
    for r in layers:
        if r.method != "dense":
            peers[(r.op, r.shape, r.groups, r.method)].append(r)
    for group in peers.values():
        if len(group) < 3:
            continue
        for r in group:
            others = [o.seconds for o in group if o is not r]
            med = float(np.median(others))
            if med <= 0 or r.seconds <= SLOW_FACTOR * med or r.seconds - med < SLOW_MIN_SECONDS:
                continue
            damp = next((n for n in r.notes if n.get("kind") == "damp_raised"), None)
            why = (f"the damping was raised ({damp['text']}): each escalation is one more factorisation and inverse"
                   if damp else "its Hessian needed no extra damping and the solver's work depends only on the shape "
                   "and the method, so the time went to the machine (other processes, memory pressure), not the layer")
            text = (f"took {r.seconds:.1f} s, {r.seconds / med:.1f}x the median of the {len(others)} other "
                    f"{r.shape} {r.method} layers: {why}")
            r.notes.append(dict(kind="slow", text=text, value=r.seconds / med))
            r.note = "; ".join(x for x in (r.note, text) if x)
