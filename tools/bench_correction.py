#!/usr/bin/env python
"""Statistics correction (``--stats-correction none|mean|affine``) on uniformly compressed models, W8A8 included.

Each ``--config`` (comma-separated CompressConfig fields, e.g. ``bits=8,act_bits=8,method=obq``) is compressed once
per correction and evaluated against the dense model on the test split (agreement; accuracy with --labels).
``--also-unquantized-measure`` adds, for W8A8 configs, the rows that measure the correction's statistics on the
model WITHOUT its activation Q/DQ pairs (what onnxobc did before: the correction cannot see the shift that
quantized activations cause). Prints a Markdown table.

Example:
  python tools/bench_correction.py --model models/fmnist_cnn.onnx --calib models/fmnist_calib.npz \\
      --test models/fmnist_test.npz --labels label --config bits=8,act_bits=8 --corrections none,mean,affine
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxobc import CompressConfig, compress  # noqa: E402
from onnxobc.evaluate import evaluate  # noqa: E402


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _config(text: str) -> dict:
    out = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        out[k.strip()] = _value(v.strip())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--labels")
    ap.add_argument("--config", action="append", required=True, help="CompressConfig fields, k=v,k=v (repeatable)")
    ap.add_argument("--corrections", default="none,mean,affine")
    ap.add_argument("--samples", type=int, help="calibration samples (default all)")
    ap.add_argument("--correction-samples", type=int, default=128)
    ap.add_argument("--test-samples", type=int)
    ap.add_argument("--also-unquantized-measure", action="store_true")
    args = ap.parse_args()
    apply_mod = importlib.import_module("onnxobc.export.apply")  # the module (onnxobc.export.apply is also a function)
    rows = []
    real = apply_mod._with_activations
    for text in args.config:
        cfg = _config(text)
        runs = [(c, False) for c in args.corrections.split(",")]
        if args.also_unquantized_measure and cfg.get("act_bits"):
            runs += [(c, True) for c in args.corrections.split(",") if c != "none"]
        for corr, blind in runs:
            apply_mod._with_activations = (lambda acts, m: m) if blind else real
            t = time.perf_counter()
            res = compress(args.model, None, args.calib, CompressConfig(samples=args.samples, stats_correction=corr,
                                                                         correction_samples=args.correction_samples,
                                                                         **cfg))
            secs = time.perf_counter() - t
            ev = evaluate(args.model, res.extra["model"], args.test, labels=args.labels,
                          max_samples=args.test_samples, latency_runs=0)
            o = ev.outputs[0]
            label = corr + (" (measured without activation Q/DQ)" if blind else "")
            rows.append((text, label, o.top1, o.top5, o.rel_l2, o.acc_cand, secs))
            print(f"{text:40s} {label:45s} top1 {o.top1} rel_l2 {o.rel_l2:.4f} acc {o.acc_cand} {secs:.1f}s",
                  file=sys.stderr, flush=True)
    apply_mod._with_activations = real

    def f(x, spec):
        return "-" if x is None else format(x, spec)
    print("| config | correction | top-1 agree | top-5 agree | rel L2 | accuracy | seconds |")
    print("|" + "---|" * 7)
    for text, label, t1, t5, rl, acc, secs in rows:
        print(f"| {text} | {label} | {f(t1, '.4f')} | {f(t5, '.4f')} | {f(rl, '.4f')} | {f(acc, '.4f')} | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
