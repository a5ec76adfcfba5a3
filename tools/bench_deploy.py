#!/usr/bin/env python
"""Deployment benchmark: file size, ONNX Runtime CPU latency and output agreement of each export format.

For the shipped Fashion-MNIST CNN (accuracy on its labelled test split) and a transformer-sized MatMul block
built here (random weights, [batch, 128, 768] -> 3072 -> 768; agreement only), every format is produced with
`onnxobc.compress` from the same calibration data and timed in the same way: one ONNX Runtime session per model,
default graph optimisations, `--threads` intra-op threads, median of `--runs` runs on one batch after a warm-up.

    python tools/bench_deploy.py                 # both models, all formats
    python tools/bench_deploy.py --models fmnist --runs 100

Formats: dense; W8 QDQ; W4 QDQ (int4, opset 21); W4 MatMulNBits (MatMul layers; others float); 50% unstructured
and 2:4 with --sparse-storage; 2:4 + W4 QDQ with --sparse-storage; group-wise W4 (groups of 32) as blocked QDQ and
as MatMulNBits; W8A8 (--act-bits 8: int8 weights, uint8 activations, fused by ORT into QLinearConv / QGemm /
MatMulIntegerToFloat); and ONNX Runtime's own quantize_static W8A8 for comparison. EfficientNet-Lite0 (a real
ImageNet CNN, built by tools/prepare_models.py into .cache/models) is included when present. The weights are quantized by round-to-nearest
(--method rtn) or magnitude pruning here, since the formats, not the solver, are measured; the engine's choice of
values does not change sizes or latency.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxobc import CompressConfig, compress  # noqa: E402
from onnxobc.evaluate import evaluate  # noqa: E402

FORMATS = {
    "dense": None,
    "W8 qdq": dict(method="rtn", bits=8, qdq=True),
    "W4 qdq": dict(method="rtn", bits=4, qdq=True, opset=21),
    "W4 matmulnbits": dict(method="rtn", bits=4, matmulnbits=True),
    "50% sparse-storage": dict(method="magnitude", sparsity=0.5, sparse_storage=True),
    "2:4 sparse-storage": dict(method="magnitude", nm=(2, 4), sparse_storage=True),
    "2:4+W4 qdq sparse": dict(method="magnitude", nm=(2, 4), bits=4, qdq=True, opset=21, sparse_storage=True),
    "W4 qdq g32": dict(method="rtn", bits=4, group_size=32, qdq=True, opset=21),
    "W4 matmulnbits g32": dict(method="rtn", bits=4, group_size=32, matmulnbits=True),
    "W8A8 qdq": dict(method="rtn", bits=8, act_bits=8),
    "ORT int8 static": "ort_static",
}
EFFNET = ROOT / ".cache" / "models"


def ort_static(model_path: Path, calib, out: Path, samples: int) -> None:
    """ONNX Runtime's own W8A8: quant_pre_process + quantize_static (QDQ, per-channel int8 weights, uint8
    activations, MinMax calibration), for comparison with --act-bits 8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxobc.calibrate import input_specs, iter_batches

    model = onnx.load(str(model_path))
    feeds = list(iter_batches(calib, input_specs(model), batch_size=32, max_samples=samples))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(model_path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink(missing_ok=True)


def mlp_block(seed: int = 0) -> onnx.ModelProto:
    """A transformer FFN block: x [N, 128, 768] @ W1 [768, 3072] + b1 -> Relu -> @ W2 [3072, 768] + b2."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((768, 3072)) / np.sqrt(768)).astype(np.float32)
    w2 = (rng.standard_normal((3072, 768)) / np.sqrt(3072)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="ffn/fc1/MatMul"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="ffn/fc1/Add"),
             helper.make_node("Relu", ["h1"], ["h2"], name="ffn/act"),
             helper.make_node("MatMul", ["h2", "w2"], ["y0"], name="ffn/fc2/MatMul"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="ffn/fc2/Add")]
    g = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 128, 768])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 128, 768])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(np.zeros(3072, np.float32), "b1"),
                           numpy_helper.from_array(np.zeros(768, np.float32), "b2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def latency_ms(path: Path, feed: dict, runs: int, threads: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def bench(name: str, model_path: Path, calib, test, labels, feed: dict, args, tmp: Path) -> list[list[str]]:
    rows = []
    dense_bytes = model_path.stat().st_size
    convs = any(n.op_type == "Conv" for n in onnx.load(str(model_path), load_external_data=False).graph.node)
    for fmt, cfg in FORMATS.items():
        if args.formats and fmt not in args.formats:
            continue
        if isinstance(cfg, dict) and cfg.get("matmulnbits") and convs:
            continue  # MatMulNBits covers MatMul layers only: shown for the transformer block
        out = tmp / f"{name}-{fmt.replace(' ', '_').replace(':', '').replace('%', '').replace('+', '_')}.onnx"
        if cfg is None:
            out = model_path
        elif cfg == "ort_static":
            ort_static(model_path, calib, out, args.samples)
        else:
            compress(model_path, out, calib, CompressConfig(samples=args.samples, **cfg), force=True)
        ev = evaluate(model_path, out, test, labels=labels, max_samples=args.test_samples, latency_runs=0)
        o = ev.outputs[0]
        quality = (f"acc {o.acc_cand:.4f}" if o.acc_cand is not None else
                   f"top-1 {o.top1:.3f}" if o.top1 is not None and name.startswith("EfficientNet") else
                   f"cos {o.cosine:.5f}") + f", rel L2 {o.rel_l2:.2e}"
        size = out.stat().st_size
        rows.append([name, fmt, f"{size / 1024:.1f} kB", f"{dense_bytes / size:.2f}x",
                     f"{latency_ms(out, feed, args.runs, args.threads):.2f}", quality])
        print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="fmnist,mlp,effnet",
                   help="comma-separated: fmnist, mlp, effnet (default all; effnet needs tools/prepare_models.py)")
    p.add_argument("--formats", type=lambda s: [f.strip() for f in s.split(",")], default=None,
                   help=f"comma-separated subset of: {', '.join(FORMATS)}")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model (median reported)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--samples", type=int, default=128, help="calibration samples")
    p.add_argument("--test-samples", type=int, default=1000, help="evaluation samples")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmpd:
        tmp = Path(tmpd)
        if "fmnist" in args.models:
            z = np.load(ROOT / "models" / "fmnist_test.npz")
            feed = {"image": z["image"][:64]}
            rows += bench("fmnist CNN", ROOT / "models" / "fmnist_cnn.onnx", ROOT / "models" / "fmnist_calib.npz",
                          ROOT / "models" / "fmnist_test.npz", "label", feed, args, tmp)
        if "mlp" in args.models:
            m = mlp_block()
            path = tmp / "mlp.onnx"
            onnx.save(m, str(path))
            rng = np.random.default_rng(1)
            calib = [{"x": rng.standard_normal((8, 128, 768)).astype(np.float32)} for _ in range(4)]
            test = [{"x": rng.standard_normal((8, 128, 768)).astype(np.float32)} for _ in range(2)]
            rows += bench("FFN 768x3072", path, calib, test, None, {"x": test[0]["x"][:4]}, args, tmp)
        if "effnet" in args.models:
            if not (EFFNET / "effnet_lite0.onnx").exists():
                print("effnet: .cache/models/effnet_lite0.onnx missing (run tools/prepare_models.py); skipped")
            else:
                z = np.load(EFFNET / "effnet_test.npz")
                name = next(k for k in z.files if k != "label")
                rows += bench("EfficientNet-Lite0", EFFNET / "effnet_lite0.onnx", EFFNET / "effnet_calib.npz",
                              EFFNET / "effnet_test.npz", None, {name: z[name][:8]}, args, tmp)
    headers = ["model", "format", "file", "vs dense", "latency ms", "quality vs dense"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print(f"\nONNX Runtime {ort.__version__}, {args.threads} intra-op threads, median of {args.runs} runs; "
          "fmnist batch 64, FFN batch 4 x 128 tokens, EfficientNet batch 8 (224x224)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
