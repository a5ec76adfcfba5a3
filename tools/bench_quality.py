#!/usr/bin/env python
"""Quality benchmark of onnxobc against its own baselines and ONNX Runtime's quantization tools.

For each model (fmnist, minilm, effnet) and each configuration (dense, magnitude / ExactOBS pruning, RTN / OBQ
quantization, 2:4 + 8-bit, ORT quantize_static int8, ORT MatMulNBits 4-bit RTN / GPTQ) this script compresses
the model on the calibration split, evaluates it on the disjoint test split and records the task metric, the
file size (as written, and zlib-compressed to show how compressible pruned weights are) and the compression
wall time. Results go to a JSON file (kept between runs: finished model/config pairs are skipped unless
--redo) and to a Markdown table per model.

Metrics:
  fmnist  test accuracy against the labels in fmnist_test.npz (key "label")
  effnet  top-1 / top-5 agreement with the dense model on effnet_test.npz (onnxobc.evaluate.evaluate)
  minilm  cosine(dense, compressed) of mean-pooled sentence embeddings (mean of last_hidden_state over
          attention_mask), averaged over the test sentences, and nearest-neighbour agreement: for each test
          sentence, whether its nearest other test sentence by cosine is the same under dense and compressed
          embeddings.

Example:
  python tools/bench_quality.py --models fmnist
  python tools/bench_quality.py --models minilm --configs dense,rtn4,obq4,ort_int8,ort_nbits_rtn
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "models"
WORK = ROOT / ".cache" / "bench"

MODELS = {
    "fmnist": dict(model=ROOT / "models/fmnist_cnn.onnx", calib=ROOT / "models/fmnist_calib.npz",
                   test=ROOT / "models/fmnist_test.npz", metric="labels", label_key="label"),
    "minilm": dict(model=CACHE / "minilm.onnx", calib=CACHE / "minilm_calib.npz", test=CACHE / "minilm_test.npz",
                   metric="embed"),
    "effnet": dict(model=CACHE / "effnet_lite0.onnx", calib=CACHE / "effnet_calib.npz",
                   test=CACHE / "effnet_test.npz", metric="agree"),
}

# name -> (description, kind, options). kind "obc": onnxobc.compress with CompressConfig(**options);
# quantizing configs are stored as real low-bit tensors (see _obc_format).
CONFIGS = {
    "dense": ("dense fp32", "dense", {}),
    "mag50": ("magnitude 50%", "obc", dict(method="magnitude", sparsity=0.5)),
    "obs50": ("ExactOBS 50%", "obc", dict(method="exact", sparsity=0.5)),
    "obs70": ("ExactOBS 70%", "obc", dict(method="exact", sparsity=0.7)),
    "mag24": ("magnitude 2:4", "obc", dict(method="magnitude", nm="2:4")),
    "obs24": ("ExactOBS 2:4", "obc", dict(method="exact", nm="2:4")),
    "rtn4": ("RTN 4-bit", "obc", dict(method="rtn", bits=4)),
    "rtn3": ("RTN 3-bit", "obc", dict(method="rtn", bits=3)),
    "obq4": ("OBQ 4-bit", "obc", dict(method="exact", bits=4)),
    "obq3": ("OBQ 3-bit", "obc", dict(method="exact", bits=3)),
    "rtn4_g32": ("RTN 4-bit, groups of 32", "obc", dict(method="rtn", bits=4, group_size=32)),
    "obq4_g32": ("OBQ 4-bit, groups of 32", "obc", dict(method="exact", bits=4, group_size=32)),
    "rtn3_g32": ("RTN 3-bit, groups of 32", "obc", dict(method="rtn", bits=3, group_size=32)),
    "obq3_g32": ("OBQ 3-bit, groups of 32", "obc", dict(method="exact", bits=3, group_size=32)),
    "obs24_w8": ("ExactOBS 2:4 + 8-bit", "obc", dict(method="exact", nm="2:4", bits=8)),
    "mag24_rtn8": ("magnitude 2:4 + RTN 8-bit", "obc", dict(method="magnitude", nm="2:4", bits=8)),
    "rtn8_a8": ("RTN W8A8 (int8 weights, uint8 activations)", "obc", dict(method="rtn", bits=8, act_bits=8)),
    "obq8_a8": ("OBQ W8A8 (int8 weights, uint8 activations)", "obc", dict(method="exact", bits=8, act_bits=8)),
    "ort_int8": ("ORT quantize_static QDQ int8 (per-channel W, uint8 A)", "ort_static", {}),
    "ort_nbits_rtn": ("ORT MatMulNBits 4-bit RTN (block 32)", "ort_nbits", dict(algo="rtn")),
    "ort_nbits_gptq": ("ORT MatMulNBits 4-bit GPTQ (block 32)", "ort_nbits", dict(algo="gptq")),
}
DEFAULT_CONFIGS = list(CONFIGS)


# ---- data ---------------------------------------------------------------------------------------------------

def load_npz(path: Path, input_names: list[str], n: int | None) -> dict[str, np.ndarray]:
    z = np.load(path)
    return {k: (z[k][:n] if n else z[k]) for k in input_names}


def batches(feed: dict[str, np.ndarray], bs: int):
    n = len(next(iter(feed.values())))
    for i in range(0, n, bs):
        yield {k: v[i:i + bs] for k, v in feed.items()}


def input_names(model_path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def file_bytes(path: Path) -> int:
    from onnxobc.evaluate.runner import model_file_bytes

    return model_file_bytes(path)


def zlib_bytes(path: Path) -> int:
    """zlib (level 6) size of the model file plus any external-data files next to it."""
    total = 0
    paths = [path] + [p for p in path.parent.glob(path.name + "*.data")] + [p for p in path.parent.glob(path.stem + ".data")]
    seen = set()
    for p in paths:
        if p in seen or not p.exists():
            continue
        seen.add(p)
        c = zlib.compressobj(6)
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(c.compress(chunk))
        total += len(c.flush())
    return total


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ---- metrics ------------------------------------------------------------------------------------------------

def minilm_embeddings(path: Path, test: Path, n: int | None, threads: int) -> np.ndarray:
    sess = session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    feed = load_npz(test, names, n)
    out = []
    for b in batches(feed, 32):
        h = sess.run(["last_hidden_state"], b)[0].astype(np.float64)
        m = b["attention_mask"].astype(np.float64)[..., None]
        out.append((h * m).sum(1) / np.maximum(m.sum(1), 1e-9))
    e = np.concatenate(out)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def nearest(e: np.ndarray) -> np.ndarray:
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def measure(name: str, spec: dict, cand: Path, args, cache: dict) -> dict:
    if spec["metric"] == "embed":
        if "dense_emb" not in cache:
            cache["dense_emb"] = minilm_embeddings(spec["model"], spec["test"], args.test_samples, args.threads)
        d = cache["dense_emb"]
        c = minilm_embeddings(cand, spec["test"], args.test_samples, args.threads)
        cos = np.sum(d * c, axis=1)
        return dict(emb_cosine=float(cos.mean()), emb_cosine_min=float(cos.min()),
                    nn_agree=float(np.mean(nearest(d) == nearest(c))), test_samples=len(d))
    from onnxobc.evaluate import evaluate

    kw = dict(max_samples=args.test_samples, latency_runs=0)
    if spec["metric"] == "labels":
        r = evaluate(spec["model"], cand, str(spec["test"]), labels=spec["label_key"], **kw)
        o = r.outputs[0]
        return dict(acc=o.acc_cand, acc_dense=o.acc_ref, top1_agree=o.top1, test_samples=r.samples)
    r = evaluate(spec["model"], cand, str(spec["test"]), **kw)
    o = r.outputs[0]
    return dict(top1_agree=o.top1, top5_agree=o.top5, cosine=o.cosine, sqnr_db=o.sqnr_db, test_samples=r.samples)


# ---- compressors --------------------------------------------------------------------------------------------

def _model_has_const_matmul(path: Path) -> bool:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return any(n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits for n in m.graph.node)


def _obc_format(model: str, opts: dict) -> tuple[dict, str]:
    """How quantized weights are stored: MiniLM (MatMul only) as MatMulNBits for 2..4 bits (the format ORT's
    own 4-bit quantizer writes) and QDQ otherwise; QDQ int4/uint4 needs opset 21."""
    bits = opts.get("bits")
    if bits is None:
        return {}, "float"
    if model == "minilm" and bits <= 4:
        return dict(matmulnbits=True), "matmulnbits"
    if bits <= 4 or opts.get("group_size"):
        return dict(qdq=True, opset=21), "qdq (opset 21)"
    return dict(qdq=True), "qdq"


def run_obc(model: str, spec: dict, opts: dict, out: Path, args) -> dict:
    from onnxobc import CompressConfig, compress

    fmt, fmt_name = _obc_format(model, opts)
    cfg = CompressConfig(samples=args.samples, **opts, **fmt)
    t = time.perf_counter()
    try:
        res = compress(str(spec["model"]), str(out), str(spec["calib"]), cfg, force=True)
    except Exception as e:  # a storage format this graph cannot take: fall back to fake-quantized float
        if not fmt:
            raise
        print(f"    {fmt_name} export failed ({type(e).__name__}: {e}); storing fake-quantized float", flush=True)
        fmt_name = f"float (fallback: {fmt_name} failed: {type(e).__name__})"
        cfg = CompressConfig(samples=args.samples, **opts)
        t = time.perf_counter()
        res = compress(str(spec["model"]), str(out), str(spec["calib"]), cfg, force=True)
    secs = time.perf_counter() - t
    flat = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in opts.items())
    cmd = f"onnxobc compress MODEL --calib CALIB {flat}"
    if fmt.get("matmulnbits"):
        cmd += " --format matmulnbits"
    elif fmt.get("qdq"):
        cmd += " --qdq" + (f" --opset {fmt['opset']}" if fmt.get("opset") else "")
    if args.samples:
        cmd += f" --samples {args.samples}"
    return dict(seconds=secs, seconds_engine=res.seconds.get("compression"),
                seconds_calibration=res.seconds.get("calibration"), calib_samples=res.samples,
                layers=len(res.layers), format=fmt_name, command=cmd)


def _reader(feed: dict, bs: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._data = list(batches(feed, bs))
            self._i = 0

        def get_next(self):
            if self._i >= len(self._data):
                return None
            self._i += 1
            return self._data[self._i - 1]

        def rewind(self):
            self._i = 0

    return Reader()


def run_ort_static(model: str, spec: dict, out: Path, args) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = input_names(spec["model"])
    feed = load_npz(spec["calib"], names, args.samples)
    pre = out.with_name(out.stem + ".pre.onnx")
    t = time.perf_counter()
    pre_note = ""
    try:
        quant_pre_process(str(spec["model"]), str(pre))
    except Exception as e:  # e.g. MiniLM (dynamo export): "Incomplete symbolic shape inference"
        print(f"    quant_pre_process failed ({type(e).__name__}: {e}); retrying with skip_symbolic_shape=True",
              flush=True)
        pre_note = f" [quant_pre_process failed ({e}); rerun with skip_symbolic_shape=True]"
        quant_pre_process(str(spec["model"]), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _reader(feed, 32), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    secs = time.perf_counter() - t
    pre.unlink(missing_ok=True)
    return dict(seconds=secs, calib_samples=len(next(iter(feed.values()))), format="QDQ int8",
                command="quant_pre_process(MODEL, PRE); quantize_static(PRE, OUT, reader(CALIB, batch 32), "
                        "quant_format=QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8) "
                        "[calibrate_method default MinMax]" + pre_note)


def run_ort_nbits(model: str, spec: dict, opts: dict, out: Path, args) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if not _model_has_const_matmul(spec["model"]):
        return dict(skipped="no MatMul with a constant weight (MatMulNBits applies to MatMul only)")
    block = 32
    t = time.perf_counter()
    if opts["algo"] == "rtn":
        # the default algorithm (algo_config=None -> DefaultWeightOnlyQuantConfig): ORT's own block-wise RTN
        algo = None
        cmd = ("MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=False).process()  "
               "[DefaultWeightOnlyQuantConfig: block-wise RTN]")
    else:
        if not hasattr(mnq, "GPTQWeightOnlyQuantConfig"):
            return dict(skipped="GPTQWeightOnlyQuantConfig not available in this onnxruntime")

        names = input_names(spec["model"])
        feed = load_npz(spec["calib"], names, args.samples)
        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(feed, 32))
        cmd = ("MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=False, algo_config="
               "GPTQWeightOnlyQuantConfig(reader(CALIB, batch 32))).process()  [group size 32; GPTQ's own "
               "lazy-update block 128 and percdamp 0.01 at their defaults; the com.microsoft opset import, "
               "which ORT's RTN/GPTQ path leaves out, is added afterwards]")
    m = onnx.load(str(spec["model"]))
    q = mnq.MatMulNBitsQuantizer(m, bits=4, block_size=block, is_symmetric=False, algo_config=algo)
    q.process()
    qm = q.model.model if hasattr(q.model, "model") else q.model
    if not any(o.domain == "com.microsoft" for o in qm.opset_import):
        # ORT's RTN/GPTQ (neural-compressor) path writes MatMulNBits nodes without the domain's opset import
        qm.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(qm, str(out))
    secs = time.perf_counter() - t
    return dict(seconds=secs, format="MatMulNBits 4-bit, block 32", command=cmd)


# ---- report -------------------------------------------------------------------------------------------------

def _f(x, spec):
    return "-" if x is None else format(x, spec)


def _mb(n):
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def markdown(model: str, rows: dict) -> str:
    metric = MODELS[model]["metric"]
    if metric == "labels":
        mh = ["test accuracy", "top-1 agree w/ dense"]
        mf = lambda r: [_f(r.get("acc"), ".4f"), _f(r.get("top1_agree"), ".4f")]
    elif metric == "agree":
        mh = ["top-1 agree", "top-5 agree", "logit cosine"]
        mf = lambda r: [_f(r.get("top1_agree"), ".4f"), _f(r.get("top5_agree"), ".4f"), _f(r.get("cosine"), ".4f")]
    else:
        mh = ["emb. cosine (mean)", "emb. cosine (min)", "NN agreement"]
        mf = lambda r: [_f(r.get("emb_cosine"), ".4f"), _f(r.get("emb_cosine_min"), ".4f"),
                        _f(r.get("nn_agree"), ".4f")]
    head = ["config"] + mh + ["file size", "zlib size", "compress time", "stored as"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for key in CONFIGS:
        r = rows.get(key)
        if r is None:
            continue
        desc = CONFIGS[key][0]
        if r.get("skipped") or r.get("error"):
            why = r.get("skipped") or ("error: " + r["error"].splitlines()[-1][:150])
            lines.append("| " + " | ".join([f"{desc}", f"n/a ({why})"] + [""] * (len(head) - 2)) + " |")
            continue
        t = r.get("seconds")
        lines.append("| " + " | ".join([desc] + mf(r) + [_mb(r.get("bytes")), _mb(r.get("zlib_bytes")),
                                                          "-" if t is None else f"{t:.1f} s", r.get("format", "-")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="fmnist,minilm,effnet", help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--samples", type=int, default=None, help="calibration samples (default: all in the file)")
    p.add_argument("--test-samples", type=int, default=None, help="test samples (default: all in the file)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads for the metric runs")
    p.add_argument("--json", default=str(WORK / "results.json"),
                   help="results file, read at start (finished pairs are skipped) and rewritten after each run")
    p.add_argument("--out", default=None, help="write the Markdown tables here (e.g. docs/RESULTS.md tables file)")
    p.add_argument("--redo", action="store_true", help="rerun model/config pairs already in --json")
    p.add_argument("--keep", action="store_true", help="keep the compressed models in .cache/bench/")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from onnxruntime.quantization import matmul_nbits_quantizer

    for name in ("onnxruntime", "onnxruntime.quantization", matmul_nbits_quantizer.__name__, "onnxobc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for lg in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(lg, logging.Logger) and lg.name.startswith(("onnxruntime", "onnxobc")):
            lg.setLevel(logging.WARNING)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}")
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}")

    jpath = Path(args.json)
    results = json.loads(jpath.read_text()) if jpath.exists() else {}
    results.setdefault("_machine", dict(platform=platform.platform(), cpus=os.cpu_count(),
                                        python=sys.version.split()[0]))
    import onnx
    import onnxruntime

    import onnxobc
    results["_machine"]["versions"] = dict(onnxobc=onnxobc.__version__, onnxruntime=onnxruntime.__version__,
                                           onnx=onnx.__version__, numpy=np.__version__)
    WORK.mkdir(parents=True, exist_ok=True)

    def save():
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps(results, indent=1, default=float))

    for model in models:
        spec = MODELS[model]
        rows = results.setdefault(model, {})
        cache: dict = {}
        for key in configs:
            if key in rows and not args.redo and not rows[key].get("error"):
                continue
            desc, kind, opts = CONFIGS[key]
            out = WORK / f"{model}.{key}.onnx"
            print(f"[{model}] {desc} ...", flush=True)
            t0 = time.perf_counter()
            try:
                if kind == "dense":
                    r = dict(seconds=None, format="fp32", command="(the input model)")
                    cand = spec["model"]
                else:
                    cand = out
                    if kind == "obc":
                        r = run_obc(model, spec, opts, out, args)
                    elif kind == "ort_static":
                        r = run_ort_static(model, spec, out, args)
                    else:
                        r = run_ort_nbits(model, spec, opts, out, args)
                if not r.get("skipped"):
                    r["bytes"] = file_bytes(cand)
                    r["zlib_bytes"] = zlib_bytes(cand)
                    r.update(measure(model, spec, cand, args, cache))
            except Exception as e:
                r = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                print(r["traceback"], file=sys.stderr)
            r["wall_seconds"] = time.perf_counter() - t0
            rows[key] = r
            save()
            shown = {k: v for k, v in r.items() if k not in ("traceback", "command")}
            print(f"    {json.dumps(shown, default=float)}", flush=True)
            if kind != "dense" and not args.keep:
                for f in WORK.glob(f"{model}.{key}.onnx*"):
                    f.unlink()
        print(f"\n## {model}\n\n{markdown(model, rows)}\n", flush=True)

    if args.out:
        parts = [f"## {m}\n\n{markdown(m, results[m])}\n" for m in MODELS if m in results]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
