"""The cases of the golden test (tests/test_golden.py): every existing option and export format, on the fixture
graphs and the shipped model. ``tools/record_golden.py`` records, per case, what ONNX Runtime computes with the
compressed model on fixed inputs, the op types of the written graph and the per-layer report, into
tests/golden/golden.npz. The recording was made on main before the plan -> solve -> apply redesign (issue 9);
the test proves the redesign kept behaviour."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

import graphs

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "golden.npz"

# (case id, model key, options for CompressConfig)
FIXTURES = ["gemm_transB0", "gemm_alpha_beta", "matmul_3d", "conv2d_grouped", "conv2d_depthwise", "conv3d",
            "conv1d", "bert_like", "weight_chain", "shared_weight", "mixed_cnn", "const_weights",
            "weight_through_transpose", "conv2d_autopad_same_upper"]
OPTIONS = {
    "s50": dict(sparsity=0.5),
    "nm24": dict(nm=(2, 4)),
    "block2": dict(block_size=2, sparsity=0.5),
    "b4": dict(bits=4),
    "s50b4": dict(sparsity=0.5, bits=4),
    "nm24b8": dict(nm=(2, 4), bits=8, sym=True),
    "b3mse": dict(bits=3, grid="mse"),
    "b4g4": dict(bits=4, group_size=4),
    "mag50": dict(method="magnitude", sparsity=0.5),
    "mag24b4": dict(method="magnitude", nm=(2, 4), bits=4),
    "rtn4": dict(method="rtn", bits=4),
    "rtn4g4": dict(method="rtn", bits=4, group_size=4),
    "rtn3_nolayer": dict(method="rtn", bits=3, layer_error=False),
    "b8qdq": dict(bits=8, qdq=True),
    "b8symqdq": dict(bits=8, sym=True, qdq=True),
    "b4qdq21": dict(bits=4, qdq=True, opset=21),
    "b4g4qdq21": dict(bits=4, group_size=4, qdq=True, opset=21),
    "s50sparse": dict(sparsity=0.5, sparse_storage=True),
    "nm24b8qdqsparse": dict(nm=(2, 4), bits=8, qdq=True, sparse_storage=True),
    "w8a8": dict(bits=8, act_bits=8),
    "w8a8pct": dict(bits=8, act_bits=8, act_calib="percentile", method="rtn"),
    "w8a8mse": dict(bits=8, act_bits=8, act_calib="mse"),
    "damp": dict(bits=4, damp=0.1, dtype="float64"),
    "include": dict(sparsity=0.5, include="fc|conv1|q/"),
}
# MatMulNBits only on graphs with MatMul layers
MNB_FIXTURES = ["bert_like", "matmul_3d", "weight_chain", "shared_weight"]
MNB_OPTIONS = {
    "mnb4": dict(bits=4, matmulnbits=True),
    "mnb4g16": dict(bits=4, group_size=16, matmulnbits=True),
    "mnb4qdq": dict(bits=4, matmulnbits=True, qdq=True, opset=21),
    "mnb3rtn": dict(method="rtn", bits=3, matmulnbits=True, accuracy_level=4),
}
SHIPPED_OPTIONS = {
    "s50": dict(sparsity=0.5),
    "nm24b8qdq": dict(nm=(2, 4), bits=8, qdq=True),
    "b4g16qdq": dict(bits=4, group_size=16, qdq=True, opset=21),
    "w8a8": dict(bits=8, act_bits=8),
    "rtn4": dict(method="rtn", bits=4),
    "mag50sparse": dict(method="magnitude", sparsity=0.5, sparse_storage=True),
}


def cases() -> list[tuple[str, str, dict]]:
    """Every case pins its method: recorded when 'exact' was the default, they keep recording exact's behaviour
    now that 'auto' is (the golden test guards refactors, not the choice of a default)."""
    out = []
    for f in FIXTURES:
        for k, o in OPTIONS.items():
            out.append((f"{f}/{k}", f, o))
    for f in MNB_FIXTURES:
        for k, o in MNB_OPTIONS.items():
            out.append((f"{f}/{k}", f, o))
    for k, o in SHIPPED_OPTIONS.items():
        out.append((f"fmnist/{k}", "fmnist", o))
    return [(case, key, {"method": "exact", **o}) for case, key, o in out]


def calib(model: onnx.ModelProto, n: int = 24) -> dict[str, np.ndarray]:
    """Correlated calibration inputs (as tests/test_pipeline.py makes them)."""
    rng = np.random.default_rng(0)
    feed = graphs.make_feed(model, n, seed=0)
    out = {}
    for k, v in feed.items():
        if v.dtype.kind == "f" and v.ndim >= 2:
            flat = v.reshape(n, -1)
            basis = rng.standard_normal((3, flat.shape[1]))
            flat = rng.standard_normal((n, 3)) @ basis + 0.3 * flat
            v = flat.reshape(v.shape).astype(v.dtype)
        out[k] = v
    return out


def load_case(model_key: str) -> tuple[onnx.ModelProto, list[dict], dict]:
    """(model, calibration feeds, evaluation feed)."""
    if model_key == "fmnist":
        model = onnx.load(str(ROOT / "models" / "fmnist_cnn.onnx"))
        c = np.load(ROOT / "models" / "fmnist_calib.npz")
        t = np.load(ROOT / "models" / "fmnist_test.npz")
        return model, [{"image": c["image"][:64]}], {"image": t["image"][:16]}
    model = graphs.BUILDERS[model_key]()
    return model, [calib(model)], graphs.make_feed(model, 5, seed=7)


def run_case(model_key: str, options: dict) -> dict[str, np.ndarray]:
    """Compress and describe the result as arrays (what the golden file stores)."""
    import onnxruntime as ort

    from onnxobc import CompressConfig, compress

    model, feeds, ev = load_case(model_key)
    try:
        res = compress(model, None, feeds, CompressConfig(**options))
    except Exception as e:  # refusing is behaviour too: the error class and message are recorded
        return {"error": np.array(f"{type(e).__name__}: {e}")}
    out = res.extra["model"]
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, ev)
    ops = sorted(f"{n.domain}:{n.op_type}" for n in out.graph.node)
    layers = [dict(name=l.name, method=l.method, sparsity=round(l.sparsity, 6), bits=l.bits,
                   written=l.written.split(" ")[0], note=l.note) for l in res.layers]
    rec = {f"out{i}": np.asarray(o) for i, o in enumerate(outs)}
    rec["ops"] = np.array(json.dumps(dict(Counter(ops)), sort_keys=True))
    rec["layers"] = np.array(json.dumps(layers, sort_keys=True))
    rec["errors"] = np.array([np.nan if l.error is None else l.error for l in res.layers], dtype=np.float64)
    rec["init_bytes"] = np.array(sum(onnx.numpy_helper.to_array(t).nbytes for t in out.graph.initializer))
    return rec
