"""QDQ export: integer weights + DequantizeLinear that reproduce the fake-quantized model exactly."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import graphs
from onnxobc import CompressConfig, UsageError, compress
from onnxobc.export.qdq import ensure_opset


def run(model, feed, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _pair(model, feed, **cfg):
    fake = compress(model, None, [feed], CompressConfig(**cfg)).extra["model"]
    qdq = compress(model, None, [feed], CompressConfig(qdq=True, **cfg)).extra["model"]
    return fake, qdq


def _assert_same_outputs(a, b, feed):
    for x, y in zip(run(a, feed), run(b, feed)):
        err = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)
        assert err < 1e-5, err


def _dq_nodes(model):
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear"]


CASES = ["gemm_transB0", "gemm_transB1", "gemm_alpha_beta", "matmul_3d", "conv1d", "conv2d_grouped",
         "conv2d_depthwise", "conv3d", "weight_chain", "weight_through_reshape", "shared_weight", "bert_like",
         "const_weights", "mixed_cnn"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", [dict(bits=8), dict(bits=8, sym=True, method="rtn"), dict(bits=6, nm=(2, 4))],
                         ids=["obq8", "rtn8sym", "24w6"])
def test_qdq_8bit_equals_fake_quant(case, cfg):
    model = graphs.BUILDERS[case]()
    feed = graphs.make_feed(model, 6, seed=3)
    fake, qdq = _pair(model, feed, **cfg)
    onnx.checker.check_model(qdq, full_check=True)
    _assert_same_outputs(fake, qdq, feed)
    inits = {t.name: t for t in qdq.graph.initializer}
    dqs = _dq_nodes(qdq)
    assert dqs
    for dq in dqs:
        q, s, z = (inits[i] for i in dq.input)
        want = TensorProto.INT8 if cfg.get("sym") else TensorProto.UINT8
        assert q.data_type == want and z.data_type == want
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert numpy_helper.to_array(s).shape == (q.dims[axis],)
        if cfg.get("sym"):
            assert not numpy_helper.to_array(z).any()
    # no dense float copy of a quantized weight is left behind
    float_weights = [t for t in qdq.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2
                     and np.prod(t.dims) > 16]
    assert not float_weights, [t.name for t in float_weights]


def test_pruned_zeros_are_exact_codes():
    model = graphs.matmul_3d()
    feed = graphs.make_feed(model, 6)
    qdq = compress(model, None, [feed], CompressConfig(nm=(2, 4), bits=8, qdq=True)).extra["model"]
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    for dq in _dq_nodes(qdq):
        q, z = inits[dq.input[0]].astype(int), inits[dq.input[2]].astype(int)
        zero_codes = q == z[None, :]  # MatMul B [K, N]: axis 1
        groups = zero_codes.T.reshape(z.size, -1, 4)
        assert np.all(groups.sum(-1) >= 2)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_int4_storage_on_opset21(bits):
    model = graphs.conv_opset21()
    feed = graphs.make_feed(model, 4)
    fake, qdq = _pair(model, feed, bits=bits)
    _assert_same_outputs(fake, qdq, feed)
    inits = {t.name: t for t in qdq.graph.initializer}
    (dq,) = _dq_nodes(qdq)
    assert inits[dq.input[0]].data_type == TensorProto.UINT4
    codes = numpy_helper.to_array(inits[dq.input[0]]).astype(int)
    assert codes.max() < 2 ** bits


def test_low_opset_needs_permission():
    model = graphs.mixed_cnn()  # opset 13
    feed = graphs.make_feed(model, 4)
    with pytest.raises(UsageError, match="--opset 21"):
        compress(model, None, [feed], CompressConfig(bits=4, qdq=True))
    converted = ensure_opset(model, 4, 21)
    fake = compress(converted, None, [feed], CompressConfig(bits=4)).extra["model"]
    qdq = compress(model, None, [feed], CompressConfig(bits=4, qdq=True, opset=21)).extra["model"]
    assert qdq.opset_import[0].version == 21
    _assert_same_outputs(fake, qdq, feed)
    old = graphs.gemm_opset9()
    with pytest.raises(UsageError, match="opset >= 13"):
        compress(old, None, [graphs.make_feed(old, 3)], CompressConfig(bits=8, qdq=True))
    out = compress(old, None, [graphs.make_feed(old, 3)], CompressConfig(bits=8, qdq=True, opset=13)).extra["model"]
    assert _dq_nodes(out)


def test_qdq_needs_bits():
    with pytest.raises(ValueError, match="--qdq"):
        CompressConfig(sparsity=0.5, qdq=True)


@pytest.mark.slow
def test_shipped_model_qdq_sizes(root, tmp_path):
    from onnxobc.cli import main

    model = root / "models" / "fmnist_cnn.onnx"
    calib = root / "models" / "fmnist_calib.npz"
    sizes = {}
    for bits in (8, 4):
        out = tmp_path / f"w{bits}.onnx"
        assert main(["compress", str(model), "--calib", str(calib), "--bits", str(bits), "--qdq", "--opset", "21",
                     "--samples", "128", "-o", str(out), "-q"]) == 0
        sizes[bits] = out.stat().st_size
        x = np.load(root / "models" / "fmnist_test.npz")
        logits = ort.InferenceSession(str(out)).run(None, {"image": x["image"][:1000]})[0]
        assert np.mean(logits.argmax(1) == x["label"][:1000]) > 0.88
    dense = model.stat().st_size
    assert dense / sizes[8] > 3.5 and dense / sizes[4] > 6.5


# ---- MatMulNBits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["matmul_2d", "matmul_3d", "matmul_4d", "bert_like", "shared_weight",
                                  "weight_through_transpose"])
@pytest.mark.parametrize("cfg", [dict(bits=4), dict(bits=3, sym=True), dict(bits=4, nm=(2, 4))],
                         ids=["b4", "b3sym", "24b4"])
def test_matmulnbits_equals_fake_quant(case, cfg):
    model = graphs.BUILDERS[case]()
    feed = graphs.make_feed(model, 5, seed=4)
    fake = compress(model, None, [feed], CompressConfig(**cfg)).extra["model"]
    res = compress(model, None, [feed], CompressConfig(matmulnbits=True, **cfg))
    out = res.extra["model"]
    onnx.checker.check_model(out)
    mnb = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    mm_layers = [l for l in res.layers if l.op == "MatMul"]
    assert mnb and len(mnb) == sum(len(n.output) for n in mnb) >= len(mm_layers)
    assert all(n.domain == "com.microsoft" for n in mnb)
    assert {n.name for n in mnb} <= {n.name for n in model.graph.node}  # names kept
    assert not any(n.op_type == "MatMul" and n.name in {m.name for m in mnb} for n in out.graph.node)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        for x, y in zip(run(fake, feed, level), run(out, feed, level)):
            assert np.linalg.norm(x - y) / np.linalg.norm(x) < 1e-5


def test_matmulnbits_needs_low_bits():
    with pytest.raises(ValueError, match="matmulnbits"):
        CompressConfig(bits=8, matmulnbits=True)


def test_matmulnbits_smaller_than_float(tmp_path):
    from onnxobc.cli import main

    model = graphs.bert_like()
    p = tmp_path / "b.onnx"
    onnx.save(model, str(p))
    np.savez(tmp_path / "c.npz", **graphs.make_feed(model, 8))
    out = tmp_path / "o.onnx"
    assert main(["compress", str(p), "--calib", str(tmp_path / "c.npz"), "--bits", "4", "--format", "matmulnbits",
                 "-o", str(out), "-q"]) == 0
    weights = lambda m: sum(np.prod(t.dims) * (4 if t.data_type == TensorProto.FLOAT else 1)  # noqa: E731
                            for t in m.graph.initializer if len(t.dims) >= 2 or t.data_type == TensorProto.UINT8)
    assert weights(onnx.load(str(p))) / weights(onnx.load(str(out))) > 6
