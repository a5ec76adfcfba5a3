#!/usr/bin/env python
"""Allocated vs uniform compression at the same budget (issue 10), with and without statistics correction.

For one model, every requested target is compressed twice from one variant database (``--database``): with the
allocation (each layer's level chosen by the DP) and uniformly (every layer at the level whose total cost is the
same: the uniform sparsity 1 - F for FLOP targets, the uniform bit width for size targets). Each is evaluated on
the test split (agreement with the dense model; accuracy with --labels). Prints a Markdown table; --json keeps
the raw numbers.

Examples:
  python tools/bench_allocation.py --model models/fmnist_cnn.onnx --calib models/fmnist_calib.npz \\
      --test models/fmnist_test.npz --labels label --flops 0.7,0.5,0.33
  python tools/bench_allocation.py --model .cache/models/effnet_lite0.onnx --calib .cache/models/effnet_calib.npz \\
      --test .cache/models/effnet_test.npz --flops 0.5 --sparsity 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 \\
      --errors layer,output --corrections none,affine
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxobc import CompressConfig, compress  # noqa: E402
from onnxobc.evaluate import evaluate  # noqa: E402


def _floats(text: str | None) -> list[float]:
    return [float(x) for x in text.split(",")] if text else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--labels", help="label key in the test data (accuracy of both models)")
    ap.add_argument("--flops", help="FLOP targets, e.g. 0.7,0.5,0.33")
    ap.add_argument("--size", help="size targets, e.g. 0.25,0.156,0.125 (QDQ storage)")
    ap.add_argument("--bits", default="8,4,3", help="candidate bit widths for size targets (default 8,4,3)")
    ap.add_argument("--sparsity", help="candidate sparsities for FLOP targets (default: the 0.9^i ladder)")
    ap.add_argument("--errors", default="layer", help="allocation errors to compare: layer,output")
    ap.add_argument("--corrections", default="none,affine", help="statistics corrections to compare")
    ap.add_argument("--samples", type=int, help="calibration samples (default all)")
    ap.add_argument("--test-samples", type=int, default=None, help="test samples (default all)")
    ap.add_argument("--opset", type=int, help="opset for QDQ storage of low-bit size targets (e.g. 21)")
    ap.add_argument("--database", help="variant database directory (default: a temporary one)")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform rows")
    ap.add_argument("--method", default="exact", help="solver method of every variant (default exact, as the "
                                                      "tables in docs/RESULTS.md were measured; auto is the CLI's)")
    ap.add_argument("--allocation-samples", type=int, default=None,
                    help="calibration samples that score the output errors (default: the library's, 32)")
    ap.add_argument("--json", help="write the raw rows here")
    args = ap.parse_args()
    db = args.database or tempfile.mkdtemp(prefix="bench-alloc-")
    rows = []
    corrections = args.corrections.split(",")
    cand_sp = tuple(_floats(args.sparsity)) or None
    cand_bits = tuple(int(b) for b in args.bits.split(","))

    def run(label: str, cfg: dict) -> None:
        for corr in corrections:
            t = time.perf_counter()
            extra = {} if args.allocation_samples is None else dict(allocation_samples=args.allocation_samples)
            res = compress(args.model, None, args.calib, CompressConfig(samples=args.samples, stats_correction=corr,
                                                                         method=args.method, **extra, **cfg))
            secs = time.perf_counter() - t
            ev = evaluate(args.model, res.extra["model"], args.test, labels=args.labels,
                          max_samples=args.test_samples, latency_runs=0)
            o = ev.outputs[0]
            a = res.allocation or {}
            rows.append(dict(config=label, correction=corr, achieved=a.get("achieved"), top1=o.top1, top5=o.top5,
                             rel_l2=o.rel_l2, acc=o.acc_cand, acc_ref=o.acc_ref, seconds=secs,
                             solved=a.get("variants_solved"), reused=a.get("variants_reused"),
                             alloc_seconds=a.get("seconds"), predicted_error=a.get("predicted_error"),
                             plan=res.plan))
            alloc = " ".join(f"{k} {v:.1f}s" for k, v in (a.get("seconds") or {}).items())
            print(f"{label:40s} {corr:7s} top1 {o.top1} rel_l2 {o.rel_l2:.4f} acc {o.acc_cand} {secs:.1f}s"
                  + (f" (allocation: {alloc})" if alloc else ""), file=sys.stderr)

    for f in _floats(args.flops):
        for err in args.errors.split(","):
            run(f"flops {f:g}, allocated ({err} error)", dict(target_flops=f, cand_sparsity=cand_sp, database=db,
                                                              allocation_error=err))
        if not args.no_uniform:
            run(f"flops {f:g}, uniform {1 - f:.0%}", dict(sparsity=round(1 - f, 4)))
    for f in _floats(args.size):
        for err in args.errors.split(","):
            run(f"size {f:g}, allocated ({err} error)", dict(target_size=f, cand_bits=cand_bits, database=db,
                                                             allocation_error=err, opset=args.opset))
        if not args.no_uniform:
            b = max((b for b in cand_bits if b / 32 <= f + 1e-9), default=min(cand_bits))
            run(f"size {f:g}, uniform {b}-bit", dict(bits=b, qdq=True, opset=args.opset))
    head = "| config | correction | cost reached | top-1 agree | top-5 agree | rel L2 | accuracy | seconds |"
    print(head)
    print("|" + "---|" * 8)
    for r in rows:
        def f(x, spec):
            return "-" if x is None else format(x, spec)
        print(f"| {r['config']} | {r['correction']} | {f(r['achieved'], '.3f')} | {f(r['top1'], '.4f')} | "
              f"{f(r['top5'], '.4f')} | {f(r['rel_l2'], '.4f')} | {f(r['acc'], '.4f')} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
