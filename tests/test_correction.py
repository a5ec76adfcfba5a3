"""Statistics correction: compressed layers' output channel means (and stds) back to the dense model's."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphs
from golden_cases import calib
from onnxobc import CompressConfig, compress
from onnxobc.graph import find_layers


def _outputs(model, feed, names):
    from onnxobc.calibrate.hessian import augment

    aug, fetch = augment(model, names)
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(fetch, sess.run(fetch, feed)))


def _channel(y, axis):
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1).reshape(-1, y.shape[axis])
    return y.mean(0), y.std(0)


@pytest.mark.parametrize("case", ["mixed_cnn", "bert_like", "gemm_no_bias", "conv2d_no_bias", "matmul_2d"])
@pytest.mark.parametrize("mode", ["mean", "affine"])
@pytest.mark.parametrize("fmt", [dict(), dict(bits=4, qdq=True, opset=21)])
def test_first_layer_statistics_restored(case, mode, fmt):
    model = graphs.BUILDERS[case]()
    feed = calib(model, 32)
    opts = dict(sparsity=0.7) if not fmt else fmt
    plain = compress(model, None, [feed], CompressConfig(**opts)).extra["model"]
    fixed = compress(model, None, [feed], CompressConfig(**opts, stats_correction=mode, correction_samples=32,
                                                         token_mask="none"))
    layers, _ = find_layers(model)
    first = layers[0]
    out, axis = first.consumers[0].output_name, 1 if first.op == "Conv" else -1
    readers = [n for n in model.graph.node if out in n.input]
    if first.op == "MatMul" and len(readers) == 1 and readers[0].op_type == "Add":
        out = readers[0].output[0]  # the bias of a MatMul is the Add after it: corrected there
    d = _channel(_outputs(model, feed, [out])[out], axis)
    p = _channel(_outputs(plain, feed, [out])[out], axis)
    c = _channel(_outputs(fixed.extra["model"], feed, [out])[out], axis)
    scale = np.abs(d[0]).max() + d[1].max()
    assert np.abs(p[0] - d[0]).max() > 1e-4 * scale  # compression did shift the means
    np.testing.assert_allclose(c[0], d[0], atol=2e-5 * scale)
    if mode == "affine":
        np.testing.assert_allclose(c[1], d[1], rtol=2e-4, atol=1e-6 * scale)
    onnx.checker.check_model(fixed.extra["model"])
    assert [e for e in fixed.correction if "note" in e] == []
    if fmt:  # the stored grid stays exact: codes unchanged, only scales (affine) and biases move
        codes = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_quantized")}
        a, b = codes(plain), codes(fixed.extra["model"])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_correction_report_and_shared_weight_note():
    model = graphs.shared_weight()
    feed = calib(model, 16)
    res = compress(model, None, [feed], CompressConfig(sparsity=0.5, stats_correction="affine"))
    assert res.correction and all("shared" in e["note"] for e in res.correction)


def _w8a8_shift_model():
    """Conv(8->16, 3x3) -> Relu -> Conv(16->8, 1x1) -> Flatten: both convs take int8 activations under W8A8."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(8)).astype(np.float32)
    w2 = (rng.standard_normal((8, 16, 1, 1)) / 4).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.full(16, 0.05, np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(8, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Flatten", ["c2"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "w8a8_shift", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 288])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("mode", ["mean", "affine"])
def test_w8a8_activation_shift_corrected(mode):
    """8-bit activations shift channel means: inputs mostly far below half a quantization step (an outlier per
    batch sets the range) round to zero. The correction must measure the model with its activation pairs in
    place; measured without them (weights at 8 bits are nearly exact) it would see no shift."""
    model = _w8a8_shift_model()
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(4):
        x = rng.uniform(0.0, 0.015, (16, 8, 6, 6)).astype(np.float32)
        x[0, 0, 0, 0] = 8.0  # the range: step 8/255, so the bulk of the input quantizes to 0
        feeds.append(dict(x=x))
    cfg = dict(bits=8, act_bits=8, method="rtn", qdq=True)
    plain = compress(model, None, feeds, CompressConfig(**cfg)).extra["model"]
    fixed = compress(model, None, feeds, CompressConfig(**cfg, stats_correction=mode, correction_samples=64))
    assert any(n.op_type == "QuantizeLinear" for n in fixed.extra["model"].graph.node)
    for out in ("c1", "c2"):
        def means(m):
            return np.mean([_channel(_outputs(m, f, [out])[out], 1)[0] for f in feeds], axis=0)

        d, p, c = means(model), means(plain), means(fixed.extra["model"])
        shift = np.abs(p - d).max()
        assert shift > 0.01  # the activation grid did shift the means
        np.testing.assert_allclose(c, d, atol=0.05 * shift)  # corrected: back to dense
    assert [e for e in fixed.correction if "note" in e] == []
