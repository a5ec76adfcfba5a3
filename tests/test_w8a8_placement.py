"""W8A8 placement on fixture graphs (issue 15, part 1): BatchNormalization folded into its Conv before the
activation grids are placed, and activation tensors kept in float where quantizing them costs most."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.export.actquant import fold_batchnorm


def _run(model, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusions of ORT's own
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def conv_bn(const_weight=False, shared=False, bias=True, spread=None):
    """Conv(3->8, 3x3) -> BN -> Relu -> Conv(8->8, 1x1) -> BN. With ``spread``, conv1's channels have pre-BN
    ranges three decades apart that BN brings back to O(1), as in PaddlePaddle exports."""
    rng = np.random.default_rng(0)
    gain = 10.0 ** np.linspace(-1, 2, 8) if spread else rng.uniform(0.5, 2, 8)
    w1 = (rng.standard_normal((8, 3, 3, 3)) / gain[:, None, None, None] * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3, "w2")]
    nodes = []
    if const_weight:
        nodes.append(helper.make_node("Constant", [], ["w1"], name="w1c", value=numpy_helper.from_array(w1, "w1v")))
    else:
        inits.append(numpy_helper.from_array(w1, "w1"))
    for i in (1, 2):
        var = rng.uniform(0.5, 1.5, 8) / (gain ** 2 if (i == 1 and spread) else 1.0)  # normalised output O(1)
        inits += [numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), f"g{i}"),
                  numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"be{i}"),
                  numpy_helper.from_array((rng.standard_normal(8) * 0.1 / (gain if i == 1 else 1)).astype(np.float32),
                                          f"m{i}"),
                  numpy_helper.from_array(var.astype(np.float32), f"v{i}")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1"))
    nodes += [
        helper.make_node("Conv", ["X", "w1"] + (["b1"] if bias else []), ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["Y"], name="bn2", epsilon=1e-3),
    ]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8, 6, 6])]
    if shared:
        nodes.append(helper.make_node("Conv", ["X", "w1"], ["Z"], name="conv_shared", kernel_shape=[3, 3]))
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 8, 4, 4]))
    g = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


@pytest.mark.parametrize("kw", [{}, {"const_weight": True}, {"bias": False}])
def test_fold_batchnorm_is_exact(kw):
    model = conv_bn(**kw)
    feed = {"X": np.random.default_rng(1).standard_normal((4, 3, 6, 6)).astype(np.float32)}
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == 2
    onnx.checker.check_model(folded)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert [n.output[0] for n in folded.graph.node if n.op_type == "Conv"] == ["n1", "Y"]
    assert not [n for n in folded.graph.node if n.op_type == "Constant"]  # the old weight went away
    np.testing.assert_allclose(_run(folded, feed)[0], _run(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_leaves_shared_weights_and_training_mode_alone():
    model = conv_bn(shared=True)
    assert fold_batchnorm(model) == 1  # conv1's weight is shared with conv_shared: only bn2 folds
    assert [n.name for n in model.graph.node if n.op_type == "BatchNormalization"] == ["bn1"]
    m = conv_bn()
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            n.output.extend(["rm", "rv"])  # training-mode outputs: not an inference BN
    assert fold_batchnorm(m) == 0


def test_w8a8_folds_batchnorm_and_gets_closer_to_the_dense_model(monkeypatch):
    import onnxobc.export.actquant as aq

    model = conv_bn(spread=True)
    calib = [graphs.make_feed(model, 32, seed=s) for s in range(2)]
    test = graphs.make_feed(model, 64, seed=9)
    ref = _run(model, test)[0]

    def err(m):
        return float(np.linalg.norm(_run(m, test)[0] - ref) / np.linalg.norm(ref))

    cfg = CompressConfig(bits=8, act_bits=8, method="rtn")
    res = compress(model, None, calib, cfg)
    out = res.extra["model"]
    assert not [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    folded_err = err(out)
    monkeypatch.setattr(aq, "fold_batchnorm", lambda m: 0)
    kept_err = err(compress(model, None, calib, cfg).extra["model"])
    assert folded_err < 0.5 * kept_err, (folded_err, kept_err)


# ---- --act-calib search -----------------------------------------------------------------------------------

def outlier_mlp():
    """X [N, 16] -> MatMul -> t1 (channel 0 a thousand times the others) -> MatMul -> Y, where Y reads only the
    small channels: one per-tensor grid on t1 rounds all of them to zero."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((16, 16)).astype(np.float32) * 0.01
    w1[:, 0] *= 1e5
    w2 = rng.standard_normal((16, 8)).astype(np.float32) * 100
    w2[0] = 0
    nodes = [helper.make_node("MatMul", ["X", "w1"], ["t1"], name="mm1"),
             helper.make_node("MatMul", ["t1", "w2"], ["Y"], name="mm2")]
    g = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def _calib_and_error(model):
    """Two calibration feeds of ``model``, and the rel L2 of a model's output against ``model``'s on them."""
    calib = [graphs.make_feed(model, 32, seed=s) for s in range(2)]
    feed = {"X": np.concatenate([c["X"] for c in calib])}
    ref = _run(model, feed)[0]

    def err(m):
        return float(np.linalg.norm(_run(m, feed)[0] - ref) / np.linalg.norm(ref))

    return calib, err


def test_search_keeps_the_costly_tensor_float_and_reports_it():
    model = outlier_mlp()
    calib, err = _calib_and_error(model)
    w8 = err(compress(model, None, calib, CompressConfig(bits=8, method="rtn")).extra["model"])
    plain = err(compress(model, None, calib, CompressConfig(bits=8, act_bits=8, method="rtn")).extra["model"])
    res = compress(model, None, calib, CompressConfig(bits=8, act_bits=8, method="rtn", act_calib="search"))
    searched = err(res.extra["model"])
    assert plain > 0.5 and searched < 3 * w8 and searched < 0.03, (w8, plain, searched)  # X stays quantized
    notes = [a["note"] for a in res.activations if "note" in a]
    assert any(n.startswith("t1: kept float") for n in notes), notes
    assert any("range search on 64 calibration samples (in-sample" in n for n in notes)
    q_inputs = {n.input[0] for n in res.extra["model"].graph.node if n.op_type == "QuantizeLinear"}
    assert "t1" not in q_inputs and "X" in q_inputs
    assert [a["tensor"] for a in res.activations if "tensor" in a] == ["X"]


def test_float_limit_allows_two_tensors_in_a_small_model():
    from onnxobc.calibrate.actsearch import float_limit

    assert [float_limit(n) for n in (1, 3, 7, 8, 19, 20, 30, 156)] == [1, 1, 1, 2, 2, 2, 3, 15]


def outlier_chain(n=8, outliers=(2, 5)):
    """X [N, 16] -> 8 MatMuls (t0..t7): t2 and t5 each have a channel a thousand times the others that the next
    MatMul ignores: one per-tensor grid rounds the small channels to zero. Each alone destroys the output, so
    neither lowers the error when kept float first on its own: both must go (two of the 8 sites)."""
    rng = np.random.default_rng(4)
    nodes, inits, x = [], [], "X"
    for i in range(n):
        w = rng.standard_normal((16, 16)).astype(np.float32) * 0.25
        if i in outliers:
            w[:, 0] = 1e3 * np.abs(w[:, 0]).max()
        if i - 1 in outliers:
            w[0] = 0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"t{i}"], name=f"mm{i}"))
        x = f"t{i}"
    nodes[-1].output[0] = "Y"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def test_search_keeps_two_tensors_float_in_a_model_of_eight_sites():
    model = outlier_chain()
    calib, err = _calib_and_error(model)
    w8 = err(compress(model, None, calib, CompressConfig(bits=8, method="rtn")).extra["model"])
    res = compress(model, None, calib, CompressConfig(bits=8, act_bits=8, method="rtn", act_calib="search"))
    notes = [a["note"] for a in res.activations if "note" in a]
    assert sorted(n.split(":")[0] for n in notes if ": kept float" in n) == ["t2", "t5"], notes
    assert err(res.extra["model"]) < 2.5 * w8, (w8, err(res.extra["model"]))


def test_search_undoes_a_hidden_tensor_whose_partner_cannot_follow():
    # 4 sites: a float budget of one; t1 and t2 each destroy the output, so keeping one float gains nothing
    model = outlier_chain(4, (1, 2))
    calib = [graphs.make_feed(model, 32, seed=s) for s in range(2)]
    res = compress(model, None, calib, CompressConfig(bits=8, act_bits=8, method="rtn", act_calib="search"))
    notes = [a["note"] for a in res.activations if "note" in a]
    assert not [n for n in notes if ": kept float" in n], notes
    assert any("with 0 tensors kept float" in n for n in notes), notes
    q_inputs = {n.input[0] for n in res.extra["model"].graph.node if n.op_type == "QuantizeLinear"}
    assert {"t1", "t2"} <= q_inputs


def test_search_scores_logits_behind_softmax_and_needs_rereadable_data():
    from onnxobc.calibrate.actsearch import scored_tensors

    nodes = [helper.make_node("MatMul", ["X", "w"], ["z"], name="mm"),
             helper.make_node("Softmax", ["z"], ["p"], name="sm", axis=-1),
             helper.make_node("Reshape", ["p", "shape"], ["p2"], name="r"),
             helper.make_node("Identity", ["p2"], ["P"], name="id"),
             helper.make_node("Relu", ["z"], ["R"], name="relu")]
    g = helper.make_graph(nodes, "sm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("P", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("R", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.ones((4, 3), np.float32), "w"),
                           numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)
    assert scored_tensors(model) == ["z", "R"]
    from onnxobc.errors import UsageError

    with pytest.raises(UsageError, match="reads the calibration data twice"):
        compress(model, None, iter([graphs.make_feed(model, 4)]),
                 CompressConfig(bits=8, act_bits=8, method="rtn", act_calib="search"))
