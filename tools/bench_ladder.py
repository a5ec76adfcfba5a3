#!/usr/bin/env python
"""Cost of a layer's sparsity ladder in the allocation database (issue 10): one exact trace per row serves every
level, then one reconstruction per level. Times both for one layer of a model, for each requested ladder, in the
same process (so the ratios hold on a loaded machine), and prints a Markdown table.

Example (EfficientNet-Lite0's 1280x1000 classifier):
  python tools/bench_ladder.py --model effnet_lite0.onnx --calib effnet_calib.npz --samples 64 \\
      --layer largest --ladders default,coarse,0.1:0.9:0.1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from onnxobc import allocation  # noqa: E402
from onnxobc.calibrate import collect_hessians, input_specs, iter_batches  # noqa: E402
from onnxobc.engine import LayerSpec, Problem  # noqa: E402
from onnxobc.engine import hessian as eng_hessian, obs  # noqa: E402
from onnxobc.engine.solver import solve_many  # noqa: E402
from onnxobc.graph import find_layers, load_model  # noqa: E402


def _ladder(text: str, layer) -> tuple[float, ...]:
    if text == "default":
        return allocation.LADDER
    if text == "coarse":  # what the database uses for this layer
        return allocation.ladder_for(layer)
    if text == "thin":  # every other level of the default ladder, whatever the layer's size
        return allocation.LADDER[::2]
    if ":" in text:
        a, b, s = (float(x) for x in text.split(":"))
        return tuple(round(x, 6) for x in np.arange(a, b + s / 2, s))
    return tuple(float(x) for x in text.split("/"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--layer", default="largest", help="layer name, or 'largest' (most weights)")
    ap.add_argument("--ladders", default="default,0.1:0.9:0.1",
                    help="comma-separated: default (0.9^i, 44 levels), coarse (allocation.ladder_for: what the "
                         "database offers this layer), thin (every other default level), "
                         "a:b:step, or levels joined by /")
    args = ap.parse_args()
    model = load_model(args.model)
    layers, _ = find_layers(model)
    layer = (max(layers, key=lambda l: l.params) if args.layer == "largest"
             else next(l for l in layers if l.name == args.layer))
    t = time.perf_counter()
    stats = collect_hessians(model, [layer], iter_batches(args.calib, input_specs(model, {}), batch_size=32,
                                                          max_samples=args.samples))
    t_cal = time.perf_counter() - t
    st = stats[layer.name]
    print(f"layer {layer.name} {layer.shape_str} ({layer.rows} rows x {layer.cols} columns), calibration "
          f"{t_cal:.1f}s", file=sys.stderr)
    # ONE solve_many over the union of the ladders (one trace serves every level, as in the database), with the
    # trace and every level's work (the global selection + reconstruction, and the layer error) timed apart:
    # a ladder's cost is then prepare + trace + the sum of its own levels, all measured in the same process.
    ladders = [(text, _ladder(text, layer)) for text in args.ladders.split(",")]
    union = sorted({s for _, lv in ladders for s in lv})
    spent: dict[str, float] = {"trace": 0.0}
    per_level: list[float] = []

    def timed(fn, what):
        def f(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                if what == "level":
                    per_level.append(dt)
                else:
                    spent[what] += dt
        return f

    from onnxobc.engine import solver

    obs.trace_unstructured = timed(obs.trace_unstructured, "trace")
    obs._select = timed(obs._select, "level")
    errors: list[float] = []
    solver.error_terms = timed(solver.error_terms, "level_error") if False else solver.error_terms
    real_result = solver._result

    def result(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_result(*a, **k)
        finally:
            errors.append(time.perf_counter() - t0)
    solver._result = result
    problem = Problem(layer.name, layer.layout.to_matrices(layer.weight).astype(np.float32), st.hessian(),
                      layer.layout.channels_last_perm(layer.weight.shape),
                      lambda gs: layer.layout.group_size_problem(layer.weight.shape, gs))
    t = time.perf_counter()
    res = solve_many(problem, [LayerSpec(sparsity=s) for s in union])
    total = time.perf_counter() - t
    level_cost = {s: a + b for s, a, b in zip(union, per_level, errors)}
    fixed = total - sum(level_cost.values())  # prepare + trace + bookkeeping, paid once per layer
    print(f"{len(union)} levels in {total:.1f}s: trace {spent['trace']:.1f}s, once-per-layer {fixed:.1f}s; "
          "per level " + " ".join(f"{s:.3g}:{level_cost[s]:.1f}" for s in union), file=sys.stderr, flush=True)
    print(f"layer {layer.name} {layer.shape_str}: one trace serves every ladder; times measured in one run")
    print()
    print("| ladder | levels | sparsity range | build s (once-per-layer + levels) | of which trace s | levels s |")
    print("|---|---:|---|---:|---:|---:|")
    for text, lv in ladders:
        lv_s = sum(level_cost[s] for s in lv)
        print(f"| {text} | {len(lv)} | {min(lv):g}-{max(lv):g} | {fixed + lv_s:.1f} | {spent['trace']:.1f} | {lv_s:.1f} |")
    errs = {s: r.error for s, r in zip(union, res)}
    print()
    print("layer error per level: " + ", ".join(f"{s:.3g}: {errs[s]:.3g}" for s in union))
    return 0


if __name__ == "__main__":
    sys.exit(main())
