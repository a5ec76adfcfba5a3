"""How much of a W8A8 model's error its Conv-output grids cause: remove them, keep the Conv-input grids, compare.

    python tools/w8a8_output_grids.py DENSE.onnx W8A8.onnx TEST.npz [--samples N] [--slice START:STOP]

onnxobc quantizes each Conv's output (after a Relu / Clip it folds) as well as its input, because ONNX Runtime
fuses ``DQ -> Conv -> Q`` into QLinearConv and leaves a Conv without a quantized output in float. NNCF quantizes
only the inputs: its model has half the grids and no integer Conv. This removes every Q/DQ pair on a Conv output
that no Conv reads directly (those are also input grids) and prints the output rel L2 to the dense model, as
written and without those grids (first output; ``--slice`` also over output[..., START:STOP]). Runs one sample
at a time, so it works for models whose batch is fixed at 1. A diagnosis: the stripped model runs float Convs.
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx


def strip_output_grids(m: onnx.ModelProto) -> int:
    """Remove, in place, the Q/DQ pairs on Conv outputs (see the module docstring); returns how many."""
    prod = {o: x for x in m.graph.node for o in x.output}
    users: dict[str, list] = {}
    for x in m.graph.node:
        for i in x.input:
            users.setdefault(i, []).append(x)
    outputs = {o.name for o in m.graph.output}
    drop = set()
    for q in [x for x in m.graph.node if x.op_type == "QuantizeLinear"]:
        src = prod.get(q.input[0])
        if src is not None and src.op_type in ("Relu", "Clip"):
            src = prod.get(src.input[0])
        if src is None or src.op_type != "Conv" or q.input[0] in outputs:
            continue
        dqs = [u for u in users.get(q.output[0], []) if u.op_type == "DequantizeLinear"]
        if len(dqs) != 1:
            continue
        readers = users.get(dqs[0].output[0], [])
        if any(r.op_type == "Conv" for r in readers) or dqs[0].output[0] in outputs:
            continue
        for r in readers:
            for k, i in enumerate(r.input):
                if i == dqs[0].output[0]:
                    r.input[k] = q.input[0]
        drop.update([id(q), id(dqs[0])])
    keep = [x for x in m.graph.node if id(x) not in drop]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return len(drop) // 2


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense")
    ap.add_argument("w8a8")
    ap.add_argument("data")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--slice", action="append", default=[], metavar="START:STOP")
    args = ap.parse_args()
    d = np.load(args.data)
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def run(model) -> np.ndarray:
        s = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        n = min(len(d[names[0]]), args.samples or len(d[names[0]]))
        return np.concatenate([s.run(None, {k: d[k][i:i + 1] for k in names})[0] for i in range(n)])

    m = onnx.load(args.w8a8)
    removed = strip_output_grids(m)
    ref = run(args.dense)

    def e(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    print(f"{removed} Conv-output Q/DQ pairs removed")
    for name, model in (("as written", args.w8a8), ("without Conv-output grids", m)):
        o = run(model)
        cuts = [tuple(int(v) for v in c.split(":")) for c in args.slice]
        extra = "".join(f"  [..., {a}:{b}] {e(o[..., a:b], ref[..., a:b]):.4f}" for a, b in cuts)
        print(f"{name:26s} rel L2 {e(o, ref):.4f}{extra}")


if __name__ == "__main__":
    main()
