"""W8A8 bias correction (--act-bias-correction) and SmoothQuant migration (--smooth-alpha) on fixture graphs
(issue 15)."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.calibrate.biascorr import _independent_groups, correct_biases, correction_sites
from onnxobc.calibrate.smooth import smooth, smoothing_groups


def _run(model, feed, opt=False):
    so = ort.SessionOptions()
    if not opt:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


# ------------------------------------------------------------------------------------------ bias correction
def conv_chain(bias2=True):
    """Conv(4->8, 3x3) -> Relu -> Conv(8->6, 1x1) [-> parallel Conv(8->6) read by a second output]."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((6, 8, 1, 1)) * 0.5).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal((6, 8, 1, 1)) * 0.5).astype(np.float32), "w3")]
    if bias2:
        inits.append(numpy_helper.from_array((rng.standard_normal(6) * 0.1).astype(np.float32), "b2"))
    nodes = [helper.make_node("Conv", ["X", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"] + (["b2"] if bias2 else []), ["Y"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["r1", "w3"], ["Z"], name="conv3", kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 6, 8, 8]),
                           helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 6, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def _skewed(n, seed):
    # a heavy right tail: a 95th-percentile grid clips it, which shifts every mean downstream
    rng = np.random.default_rng(seed)
    return (rng.exponential(1.0, (n, 4, 8, 8)) ** 2).astype(np.float32)


def _shift(dense, cand, x):
    d, c = _run(dense, {"X": x}, opt=True), _run(cand, {"X": x}, opt=True)
    return [float(np.sqrt(np.mean(np.mean(a - b, axis=(0, 2, 3)) ** 2))) for a, b in zip(c, d)]


@pytest.mark.parametrize("bias2", [True, False])
def test_bias_correction_removes_the_mean_shift(bias2):
    model = conv_chain(bias2)
    calib, test = [{"X": _skewed(32, 0)}], _skewed(64, 1)
    kw = dict(bits=8, method="rtn", act_bits=8, act_calib="percentile", act_percentile=95.0, layer_error=False)
    plain = compress(model, None, calib, CompressConfig(**kw)).extra["model"]
    res = compress(model, None, calib, CompressConfig(**kw, act_bias_correction=True))
    fixed = res.extra["model"]
    onnx.checker.check_model(fixed)
    before, after = _shift(model, plain, test), _shift(model, fixed, test)
    assert before[0] > 0.02 and before[1] > 0.02  # the clipped tail really shifts both outputs
    assert after[0] < before[0] / 3 and after[1] < before[1] / 3, (before, after)
    notes = [a["note"] for a in res.activations if "note" in a]
    assert any("bias correction" in n and "3 layers corrected" in n for n in notes), notes
    # the correction lives in int32 bias codes behind a DequantizeLinear, so the convs still fuse into
    # integer kernels: every Conv has three dequantized inputs
    prod = {o: n for n in fixed.graph.node for o in n.output}
    convs = [n for n in fixed.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for n in convs:
        if n.name == "conv1":
            continue  # reads the graph input, quantized too, but check the layers fed by quantized activations
        assert len(n.input) == 3 and prod[n.input[2]].op_type == "DequantizeLinear"


def test_bias_correction_groups_only_independent_layers():
    model = compress(conv_chain(), None, [{"X": _skewed(8, 0)}],
                     CompressConfig(bits=8, method="rtn", act_bits=8, layer_error=False)).extra["model"]
    sites, notes = correction_sites(model, {"c1", "Y", "Z"})
    assert [n.name for n in sites] == ["conv1", "conv2", "conv3"] and not notes
    groups = _independent_groups(model, sites, 8)
    # conv2 and conv3 both read conv1's output: measured after conv1 is corrected, but together
    assert [[n.name for n in g] for g in groups] == [["conv1"], ["conv2", "conv3"]]
    assert [[n.name for n in g] for g in _independent_groups(model, sites, 1)] == [["conv1"], ["conv2"], ["conv3"]]


def dc_stem():
    """Conv(1->8, 3x3, zero-sum filters: a high-pass front end) -> Relu -> Conv(8->6, 3x3) -> Tanh, on inputs with a large
    mean (openWakeWord's mel frames: mean 9, std 1). The stem's fan-in of 9 keeps its input float in W8A8, but
    its rounded weights no longer sum to zero and leak 9 * sum(dW) into every output."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((8, 1, 3, 3)) * 0.5
    w1 -= w1.mean(axis=(1, 2, 3), keepdims=True)
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"),
             numpy_helper.from_array(np.full(8, 0.1, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((6, 8, 3, 3)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["X", "w1", "b1"], ["c1"], name="stem", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3]),
             helper.make_node("Tanh", ["c2"], ["Y"], name="tanh")]
    g = helper.make_graph(nodes, "dc", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 12, 12])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 6, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def test_bias_correction_also_corrects_a_layer_with_a_float_input():
    model = dc_stem()
    x = lambda n, seed: (9.0 + np.random.default_rng(seed).standard_normal((n, 1, 12, 12))).astype(np.float32)
    calib, test = [{"X": x(32, 0)}], x(64, 1)
    kw = dict(bits=8, method="rtn", act_bits=8, layer_error=False)
    plain = compress(model, None, calib, CompressConfig(**kw)).extra["model"]
    res = compress(model, None, calib, CompressConfig(**kw, act_bias_correction=True))
    fixed = res.extra["model"]
    prod = {o: n for n in plain.graph.node for o in n.output}
    stem = next(n for n in plain.graph.node if n.name == "stem")
    assert prod[stem.input[1]].op_type == "DequantizeLinear" and stem.input[0] == "X"  # int8 weight, float input
    sites, _ = correction_sites(plain, {"c1", "c2"})
    assert [n.name for n in sites] == ["stem", "conv2"]
    notes = [a["note"] for a in res.activations if "note" in a]
    assert any("2 layers corrected" in n for n in notes), notes
    ref = _run(model, {"X": test}, opt=True)[0]
    err = lambda m: float(np.linalg.norm(_run(m, {"X": test}, opt=True)[0] - ref) / np.linalg.norm(ref))
    before, after = _shift(model, plain, test)[0], _shift(model, fixed, test)[0]
    assert after < before / 3, (before, after)
    assert err(fixed) < 0.7 * err(plain), (err(plain), err(fixed))


def test_bias_correction_on_a_float_model_changes_nothing():
    model = conv_chain()
    m = copy.deepcopy(model)
    assert correct_biases(model, m, [{"X": _skewed(4, 0)}]) == []  # no quantized activation: nothing to do
    assert m == model


def test_bias_correction_needs_act_bits():
    with pytest.raises(ValueError, match="--act-bits"):
        CompressConfig(bits=8, act_bias_correction=True)
    with pytest.raises(ValueError, match="smooth-alpha"):
        CompressConfig(bits=8, act_bits=8, smooth_alpha=1.5)


# ------------------------------------------------------------------------------------------------ smoothing
def ln_block(residual=True, outliers=True):
    """LayerNorm(16) -> {MatMul q, MatMul k} -> Add (output qk), and a MatMul that reads a Relu of it (nothing to
    fold into; output O, plus a residual Add of the LayerNorm output). ``outliers``: three channels of the LayerNorm output 100x larger."""
    rng = np.random.default_rng(5)
    gamma = np.ones(16, np.float32)
    if outliers:
        gamma[[2, 7, 11]] = 100.0
    rows = np.ones((16, 1), np.float32) / gamma[:, None]  # the outlier channels weigh no more than the others
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.2 * rows).astype(np.float32), "wq"),
             numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.2 * rows).astype(np.float32), "wk"),
             numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.2).astype(np.float32), "wo")]
    nodes = [helper.make_node("LayerNormalization", ["X", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="mm_q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="mm_k"),
             helper.make_node("Add", ["q", "k"], ["qk"], name="add_qk"),
             helper.make_node("Relu", ["qk"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "wo"], ["o"], name="mm_o")]
    if residual:
        nodes.append(helper.make_node("Add", ["o", "h"], ["O"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["o"], ["O"], name="out"))
    g = helper.make_graph(nodes, "ln_block", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8, 16])],
                          [helper.make_tensor_value_info("qk", TensorProto.FLOAT, ["N", 8, 16]),
                           helper.make_tensor_value_info("O", TensorProto.FLOAT, ["N", 8, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def _smoothed_exactly(model, x):
    """A smoothed copy of ``model`` (alpha 0.5, calibrated on ``x``), checked to be valid and to compute the same
    outputs; returns it and the smoothing's report."""
    m = copy.deepcopy(model)
    rep = smooth(m, 0.5, [{"X": x}])
    onnx.checker.check_model(m)
    for a, b in zip(_run(m, {"X": x}), _run(model, {"X": x})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    return m, rep


@pytest.mark.parametrize("residual", [True, False])
def test_smoothing_is_exact_and_folded_into_the_layernorm(residual):
    model = ln_block(residual)
    x = np.random.default_rng(0).standard_normal((16, 8, 16)).astype(np.float32)
    m, rep = _smoothed_exactly(model, x)
    done = [r for r in rep if "tensor" in r]
    assert len(done) == 1 and done[0]["layers"] == ["mm_q", "mm_k"]
    assert done[0]["duplicated"] is residual  # the residual Add must keep the unsmoothed LayerNorm output
    assert done[0]["absmax_ratio_after"] < done[0]["absmax_ratio_before"] / 3
    assert sum(n.op_type == "LayerNormalization" for n in m.graph.node) == (2 if residual else 1)
    assert sum(n.op_type == "Mul" for n in m.graph.node) == 0  # no run-time Mul
    assert any("mm_o: not smoothed (its input comes from Relu" in r.get("note", "") for r in rep)


def test_smoothing_groups_share_one_scale_across_readers():
    groups, notes = smoothing_groups(ln_block())
    assert [(g.tensor, len(g.readers)) for g in groups] == [("h", 2)]
    assert len(notes) == 1


def test_smooth_alpha_reduces_w8a8_error_on_outlier_channels():
    model = ln_block(residual=False)
    rng = np.random.default_rng(1)
    calib = [{"X": rng.standard_normal((64, 8, 16)).astype(np.float32)}]
    x = rng.standard_normal((64, 8, 16)).astype(np.float32)
    ref = _run(model, {"X": x})[0]

    def err(**kw):
        r = compress(model, None, calib, CompressConfig(bits=8, method="rtn", act_bits=8, layer_error=False, **kw))
        out = _run(r.extra["model"], {"X": x}, opt=True)[0]
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), r

    plain, _ = err()
    smoothed, res = err(smooth_alpha=0.5)
    assert smoothed < plain / 2, (plain, smoothed)
    notes = [a["note"] for a in res.activations if "note" in a]
    assert any("h: smoothed (alpha 0.5) for mm_q, mm_k" in n for n in notes), notes


def gelu_tail(shared=False):
    """x -> Relu -> Mul(., 0.5) -> MatMul (a GELU's final constant Mul before an FFN output layer), and a
    Mul of two activations -> MatMul (nothing to fold into). ``shared``: the first Mul's output is also a
    graph output."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "w3")]
    nodes = [helper.make_node("Relu", ["X"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "half"], ["g"], name="gelu_half"),
             helper.make_node("MatMul", ["g", "w1"], ["Y"], name="ffn_out"),
             helper.make_node("Mul", ["X", "r"], ["p"], name="prod"),
             helper.make_node("MatMul", ["p", "w2"], ["Z"], name="other"),
             # GELU as exported by torch: x * (0.5 * (1 + erf)) -- here x * Mul(relu(x), 0.5)
             helper.make_node("Mul", ["r", "half"], ["h2"], name="inner_half"),
             helper.make_node("Mul", ["X", "h2"], ["gelu"], name="gelu_outer"),
             helper.make_node("MatMul", ["gelu", "w3"], ["V"], name="ffn_out2")]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("V", TensorProto.FLOAT, ["N", 8])]
    if shared:
        outs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 16]))
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16])], outs,
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def test_smoothing_folds_into_a_constant_mul():
    model = gelu_tail()
    x = (np.random.default_rng(0).standard_normal((32, 16)) * np.linspace(0.1, 20, 16)).astype(np.float32)
    m, rep = _smoothed_exactly(model, x)
    done = [r for r in rep if "tensor" in r]
    assert [(r["tensor"], r["producer"], r["duplicated"]) for r in done] == [("g", "Mul", False),
                                                                             ("gelu", "Mul", False)]
    assert done[0]["absmax_ratio_after"] < done[0]["absmax_ratio_before"]
    assert len(m.graph.node) == len(model.graph.node)  # no node added
    assert any("other: not smoothed (its input comes from a Mul of two activations, neither" in r.get("note", "")
               for r in rep)
    shared = gelu_tail(shared=True)
    rep = smooth(shared, 0.5, [{"X": x}])
    assert [r["tensor"] for r in rep if "tensor" in r] == ["gelu"]
    assert any("a Mul whose output other nodes read too" in r.get("note", "") for r in rep)


def test_act_noise_adds_the_input_grids_rounding_noise_to_the_hessian(monkeypatch):
    """--act-noise: the Hessian a layer is solved with is the dense one plus columns * s^2 / 12 on the diagonal,
    s the step of the activation grid on the layer's input (only where the input is quantized)."""
    import types

    from onnxobc import pipeline
    from onnxobc.calibrate.hessian import LayerStats

    rng = np.random.default_rng(0)
    xtx = rng.standard_normal((1, 5, 5))
    xtx = xtx @ xtx.transpose(0, 2, 1)
    st = {"a": LayerStats(xtx.copy(), columns=40, samples=8), "b": LayerStats(xtx.copy(), columns=40, samples=8)}
    la = types.SimpleNamespace(name="a", consumers=[types.SimpleNamespace(input_name="xa")])
    lb = types.SimpleNamespace(name="b", consumers=[types.SimpleNamespace(input_name="float_input")])
    act = (None, lambda: {"xa": types.SimpleNamespace(scale=np.float32(0.5))})
    cfg = CompressConfig(bits=8, act_bits=8, act_noise=True)
    pipeline._add_act_noise([la, lb], st, act, cfg)
    np.testing.assert_allclose(st["a"].xtx, xtx + 40 * 0.25 / 12 * np.eye(5))
    np.testing.assert_array_equal(st["b"].xtx, xtx)  # its input is not quantized
    pipeline._add_act_noise([la], {"a": LayerStats(xtx.copy(), columns=40, samples=8)}, act,
                            CompressConfig(bits=8, act_bits=8))  # off by default: nothing changes
    with pytest.raises(ValueError, match="--act-noise"):
        CompressConfig(bits=8, act_noise=True)


def test_act_noise_end_to_end_on_the_shipped_model():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calib = [dict(np.load(root / "models/fmnist_calib.npz"))]
    calib = [{k: v[:64] for k, v in calib[0].items() if k != "label"}]
    a = compress(str(root / "models/fmnist_cnn.onnx"), None, calib, CompressConfig(bits=8, act_bits=8, method="exact"))
    b = compress(str(root / "models/fmnist_cnn.onnx"), None, calib,
                 CompressConfig(bits=8, act_bits=8, method="exact", act_noise=True))
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.extra["model"].graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.extra["model"].graph.initializer}
    assert wa.keys() == wb.keys() and any(not np.array_equal(wa[k], wb[k]) for k in wa)  # the solves saw more noise
    onnx.checker.check_model(b.extra["model"], full_check=True)
