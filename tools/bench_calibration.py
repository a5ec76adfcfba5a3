"""Benchmark calibration (ONNX Runtime + the per-layer Gram products X X^T) against the machine (issue 11).

For each model, measured in one run so that ratios survive a loaded machine:

* inference: plain ONNX Runtime over the same batches, default session options (untouched SessionOptions),
  the model as given (no recorded tensors), after one untimed warm-up batch;
* Gram GFLOP: 2 C^2 per column, group and layer (the full product; the code computes one triangle);
* sgemm: the machine's float32 GEMM rate (numpy @ on 2048 x 4096 x 2048, best of 5);
* calibration: one call of ``collect_hessians`` as the pipeline makes it (session creation and the
  optimisation-level check included), with its own split of the time ("top sinks");
* ratio: calibration / (inference + Gram GFLOP / sgemm rate); the issue's target is <= 1.5;
* accuracy (unless --no-check): the largest relative difference, over layers, between these Hessians and
  the previous path (unoptimised ONNX Runtime, float64 im2col, float64 products): ||H - H_ref||_F / ||H_ref||_F
  and max |H - H_ref| / max |H_ref|. Its time is shown as "before".

    python tools/bench_calibration.py                                # fmnist, + effnet / minilm when built
    python tools/bench_calibration.py --models-dir /work/cache/models --json out.json
    python tools/bench_calibration.py --models fmnist --repeat 3 --no-check

Models: fmnist (models/fmnist_cnn.onnx + models/fmnist_calib.npz, always); effnet (effnet_lite0.onnx +
effnet_calib.npz) and minilm (minilm.onnx + minilm_calib.npz) from --models-dir, built by
``python tools/prepare_models.py``, skipped when absent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnxobc.calibrate import collect_hessians, find_token_mask, input_specs, iter_batches  # noqa: E402
from onnxobc.engine import gram as gm  # noqa: E402
from onnxobc.graph import find_layers  # noqa: E402
from onnxobc.graph.adapters import OpLayout  # noqa: E402

MODELS = {
    "fmnist": (ROOT / "models", "fmnist_cnn.onnx", "fmnist_calib.npz"),
    "effnet": (None, "effnet_lite0.onnx", "effnet_calib.npz"),
    "minilm": (None, "minilm.onnx", "minilm_calib.npz"),
}


def sgemm_rate(n: int = 2048, k: int = 4096, reps: int = 5) -> float:
    """GFLOP/s of a float32 n x k x n product (best of ``reps``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n * k * n / best / 1e9


def inference_seconds(model: onnx.ModelProto, batches: list[dict]) -> float:
    """Plain ONNX Runtime over ``batches`` with default session options (one warm-up batch untimed)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), ort.SessionOptions(), providers=["CPUExecutionProvider"])
    sess.run(None, batches[0])
    t = time.perf_counter()
    for feed in batches:
        sess.run(None, feed)
    return time.perf_counter() - t


def _reference_gram(self: OpLayout, x, weight_shape, *, dtype=None):
    """The path before issue 11: float64 im2col and float64 products."""
    if self.op == "Gemm":
        return gm.gram_reference(x, weight_shape, op="Gemm", trans_a=bool(self.attrs.get("transA", 0)))
    if self.op == "MatMul":
        return gm.gram_reference(x, weight_shape, op="MatMul")
    begin, end, strides, dil = self.conv_geometry(x.shape[2:], tuple(int(k) for k in weight_shape[2:]))
    return gm.gram_reference(x, weight_shape, op="Conv", group=self.groups(weight_shape), pads_begin=begin,
                             pads_end=end, strides=strides, dilations=dil)


def reference_hessians(model, layers, batches, token_mask):
    """Hessians by the previous path (unoptimised ORT, no overlap, float64 im2col), and its seconds."""
    saved = OpLayout.gram
    OpLayout.gram = _reference_gram
    try:
        t = time.perf_counter()
        stats = collect_hessians(model, layers, iter(batches), token_mask=token_mask, optimize="off", overlap=False,
                                 precision="float64")
        return stats, time.perf_counter() - t
    finally:
        OpLayout.gram = saved


def bench_model(name: str, model_path: Path, calib_path: Path, args, rate: float) -> dict:
    model = onnx.load(str(model_path))
    specs = input_specs(model)
    batches = list(iter_batches(str(calib_path), specs, batch_size=args.batch_size, max_samples=args.samples))
    samples = sum(next(iter(b.values())).shape[0] for b in batches)
    layers, _ = find_layers(model)
    token_mask = find_token_mask(model, "auto")
    row: dict = {"model": name, "samples": samples, "batch_size": args.batch_size, "layers": len(layers)}
    infer, calib, profiles = [], [], []
    for _ in range(args.repeat):
        infer.append(inference_seconds(model, batches))
        prof: dict = {}
        t = time.perf_counter()
        stats = collect_hessians(model, layers, iter(batches), token_mask=token_mask, profile=prof,
                                 overlap=not args.no_overlap, optimize=args.optimize)
        calib.append(time.perf_counter() - t)
        profiles.append(prof)
    i = int(np.argmin(np.array(calib) / np.array(infer)))  # the repeat with the best ratio, both from one pass
    gflop = sum(gm.gram_flops(layer.groups, layer.cols, stats[layer.name].columns) for layer in layers) / 1e9
    ideal = infer[i] + gflop / rate
    prof = profiles[i]
    sinks = sorted(((k, v) for k, v in prof.items() if isinstance(v, float) and k != "gram"), key=lambda kv: -kv[1])
    row.update(inference_s=infer[i], gram_gflop=gflop, sgemm_gflops=rate, calibration_s=calib[i],
               ideal_s=ideal, ratio=calib[i] / ideal, level=prof.get("level"), mismatches=prof.get("mismatches"),
               sinks=[(k, round(v, 3)) for k, v in sinks[:4]], all_inference_s=infer, all_calibration_s=calib)
    if not args.no_check:
        ref, t_ref = reference_hessians(model, layers, batches, token_mask)
        fro, mx = 0.0, 0.0
        for layer in layers:
            a, b = stats[layer.name].xtx, ref[layer.name].xtx
            fro = max(fro, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)))
            mx = max(mx, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)))
        row.update(before_s=t_ref, rel_fro=fro, rel_max=mx)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--models", default="fmnist,effnet,minilm", help="comma-separated subset of fmnist,effnet,minilm")
    p.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "models",
                   help="where prepare_models.py wrote effnet / minilm (default: .cache/models)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=None, help="at most this many calibration samples (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="passes per model; the table keeps the best ratio")
    p.add_argument("--optimize", default="auto", choices=["auto", "all", "extended", "basic", "off"],
                   help="ONNX Runtime optimisation level for calibration (default auto: bit-identity checked)")
    p.add_argument("--no-overlap", action="store_true", help="run ONNX Runtime and the Grams one after the other")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check against the float64 path")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    rate = sgemm_rate()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            p.error(f"unknown model {name!r}")
        folder, mfile, cfile = MODELS[name]
        folder = folder or args.models_dir
        if not (folder / mfile).exists() or not (folder / cfile).exists():
            print(f"{name}: {folder / mfile} not found, skipped (python tools/prepare_models.py)", file=sys.stderr)
            continue
        rows.append(bench_model(name, folder / mfile, folder / cfile, args, rate))
        r = rows[-1]
        print(f"{name}: inference {r['inference_s']:.2f}s, calibration {r['calibration_s']:.2f}s, "
              f"ratio {r['ratio']:.2f}", file=sys.stderr, flush=True)

    print(f"sgemm rate {rate:.0f} GFLOP/s (float32, numpy @)")
    print("| model  | samples | inference s | Gram GFLOP | ideal s | calibration s | ratio | ORT level | before s "
          "| max rel diff (Frobenius / max) | top time sinks (s) |")
    print("|--------|---------|-------------|------------|---------|---------------|-------|-----------|----------"
          "|-------------------------------|--------------------|")
    for r in rows:
        acc = f"{r['rel_fro']:.1e} / {r['rel_max']:.1e}" if "rel_fro" in r else "-"
        before = f"{r['before_s']:.2f}" if "before_s" in r else "-"
        sinks = ", ".join(f"{k} {v:.2f}" for k, v in r["sinks"])
        print(f"| {r['model']:6s} | {r['samples']:7d} | {r['inference_s']:11.2f} | {r['gram_gflop']:10.1f} | "
              f"{r['ideal_s']:7.2f} | {r['calibration_s']:13.2f} | {r['ratio']:5.2f} | {r['level']!s:9s} | "
              f"{before:>8s} | {acc:29s} | {sinks} |")
    if args.json:
        args.json.write_text(json.dumps({"sgemm_gflops": rate, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
