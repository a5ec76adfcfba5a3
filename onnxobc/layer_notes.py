"""Per-layer report notes that need the graph or every layer (issue 15, part 4): inputs that were dead on the
calibration data (kernel taps that only ever see padding at the calibration input size), and a layer that took
far longer than layers of the same shape and method."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .engine.solver import LayerResult, Note
from .graph.layers import Layer

SLOW_FACTOR = 3.0  # a layer this many times slower than the median of its peers gets a note


def dead_input_note(layer: Layer, H: np.ndarray | None, res: LayerResult) -> Note | None:
    """A note when some of the layer's inputs were zero on every calibration sample (H_jj = 0): the solver sets
    their weights to zero (they never contribute on that data), which adds zeros beyond the requested sparsity.
    For a Conv whose dead inputs are whole kernel taps (every input channel at that tap), those taps only ever
    read the zero padding at the calibration input size: dead for that input length only."""
    if H is None or res.dense:
        return None
    H = np.asarray(H)
    dead = np.stack([np.diagonal(h) == 0 for h in H])  # (groups, C), stored column order
    if not dead.any():
        return None
    w = np.asarray(layer.layout.to_matrices(layer.weight))  # (groups, rows, C)
    lost = int(np.count_nonzero(w[:, :, :][np.broadcast_to(dead[:, None, :], w.shape)]))
    frac = lost / max(w.size, 1)
    if lost == 0:
        return None
    share = f"{lost} weights ({frac:.1%} of the layer) set to zero beyond the method's own choice"
    if layer.op == "Conv" and layer.weight.ndim >= 3:
        kernel = tuple(int(k) for k in layer.weight.shape[2:])
        taps = int(np.prod(kernel))
        cin = dead.shape[1] // taps
        per_tap = dead.reshape(dead.shape[0], cin, taps).all(axis=(0, 1))  # a tap dead for every channel
        if per_tap.any() and taps > 1:
            where = [tuple(int(i) for i in np.unravel_index(t, kernel)) for t in np.nonzero(per_tap)[0]]
            shown = ", ".join(str(p) for p in where[:6]) + (" ..." if len(where) > 6 else "")
            return Note("dead_taps", f"{int(per_tap.sum())} of the {'x'.join(map(str, kernel))} kernel taps ({shown}) "
                        f"only see zero padding at the calibration input size: {share}; dead for this input "
                        f"length only (a larger input reaches them, and there the layer differs from the dense one)",
                        frac)
    return Note("dead_inputs", f"{int(dead.sum())} of {dead.size} inputs were zero on every calibration sample: "
                f"{share}", frac)


def slow_layer_notes(layers: list) -> None:
    """Add a note, IN PLACE, to each report entry (pipeline.LayerReport) that took more than SLOW_FACTOR x the
    median time of the other layers with the same shape, groups and method (at least three of them)."""
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
            if med <= 0 or r.seconds <= SLOW_FACTOR * med:
                continue
            damp = next((n for n in r.notes if n.get("kind") == "damp_raised"), None)
            why = (f"the damping was raised ({damp['text']}): each escalation is one more factorisation and inverse"
                   if damp else "its Hessian needed no extra damping and the solver's work depends only on the shape "
                   "and the method, so the time went to the machine (other processes, memory pressure), not the layer")
            text = (f"took {r.seconds:.1f} s, {r.seconds / med:.1f}x the median of the {len(others)} other "
                    f"{r.shape} {r.method} layers: {why}")
            r.notes.append(dict(kind="slow", text=text, value=r.seconds / med))
            r.note = "; ".join(x for x in (r.note, text) if x)
