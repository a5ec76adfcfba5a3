"""Reports that must not mislead (issue 15, part 4): in-sample --verify, cosine of one value, output slices,
long layer names, 'stem' wording, activation x activation MatMuls in an int8 model."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.cli import main, short_names
from onnxobc.errors import UsageError
from onnxobc.evaluate import evaluate
from onnxobc.evaluate.metrics import OutputAccumulator
from onnxobc.graph import find_layers


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "m", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=graphs.IR_VERSION)


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _w(seed, *shape):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3,
                                   f"w{seed}")


# ---- cosine ---------------------------------------------------------------------------------------------

def test_cosine_is_not_reported_for_one_value_per_sample():
    acc = OutputAccumulator("p")
    r = np.array([[0.9], [0.1], [0.5]], np.float32)
    acc.update(r, r * np.array([[0.2], [3.0], [1.0]], np.float32), 3)  # badly off, yet every cosine would be 1
    o = acc.result()
    assert o.cosine is None and o.rel_l2 > 0.5
    two = OutputAccumulator("q")
    two.update(np.ones((3, 2), np.float32), np.array([[1, 0]] * 3, np.float32), 3)
    assert two.result().cosine == pytest.approx(np.sqrt(0.5))


# ---- eval --slice ---------------------------------------------------------------------------------------

def detector():
    """[N, 8] -> [N, 3, 6]: per anchor 2 'box' values (large) and 4 class scores (small)."""
    scale = numpy_helper.from_array(np.array([100, 100, 1, 1, 1, 1], np.float32), "scale")
    shape = numpy_helper.from_array(np.array([0, 3, 6], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["X", "w1"], ["h"], name="head"),
             helper.make_node("Reshape", ["h", "shape"], ["h3"], name="r"),
             helper.make_node("Mul", ["h3", "scale"], ["Y"], name="s")]
    return _model(nodes, [_f("X", ["N", 8])], [_f("Y", ["N", 3, 6])], [_w(1, 8, 18), scale, shape])


def test_eval_slices_report_parts_of_an_output(tmp_path, capsys):
    ref = detector()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    cand = compress(ref, None, [{"X": x}], CompressConfig(method="rtn", bits=3)).extra["model"]
    res = evaluate(ref, cand, [{"X": x[:12]}, {"X": x[12:]}], latency_runs=0, slices=["Y:2:0:2", "Y:-1:2:"])
    names = [o.name for o in res.outputs]
    assert names == ["Y", "Y[:, :, 0:2]", "Y[..., 2:]"]
    r = ort.InferenceSession(ref.SerializeToString()).run(None, {"X": x})[0].astype(np.float64)
    c = ort.InferenceSession(cand.SerializeToString()).run(None, {"X": x})[0].astype(np.float64)
    for o, sl in zip(res.outputs[1:], (np.s_[:, :, 0:2], np.s_[..., 2:])):
        want = np.linalg.norm(c[sl] - r[sl]) / np.linalg.norm(r[sl])
        assert o.rel_l2 == pytest.approx(want, rel=1e-6) and o.samples == 20
    assert res.outputs[0].rel_l2 == pytest.approx(res.outputs[1].rel_l2, rel=0.05)  # the boxes dominate
    ref_p, cand_p = tmp_path / "r.onnx", tmp_path / "c.onnx"
    onnx.save(ref, str(ref_p))
    onnx.save(cand, str(cand_p))
    np.savez(tmp_path / "d.npz", X=x)
    assert main(["eval", str(ref_p), str(cand_p), "--data", str(tmp_path / "d.npz"), "--slice", "Y:2:2:6",
                 "--latency-runs", "0"]) == 0
    assert "Y[:, :, 2:6]" in capsys.readouterr().out
    for bad, msg in [("Y:0:1:2", "other than 0"), ("Z:1:0:2", "no numeric output 'Z'"), ("Y:1:a:2", "integers"),
                     ("Y", "NAME:AXIS:START:STOP"), ("Y:3:0:1", "not an axis"), ("Y:2:7:9", "selects no element")]:
        with pytest.raises(UsageError, match=msg):
            evaluate(ref, cand, [{"X": x}], latency_runs=0, slices=[bad])


# ---- names in tables ------------------------------------------------------------------------------------

def test_short_names_keep_the_distinguishing_end_and_stay_unique():
    long = ["StatefulPartitionedCall/model/" + "x" * 300 + f"/block_{i}/conv2d/Conv2D" for i in range(3)]
    out = short_names(long + ["fc"])
    assert all(len(n) <= 48 for n in out) and len(set(out)) == 4 and out[-1] == "fc"
    assert out[1].endswith("block_1/conv2d/Conv2D") and out[1].startswith("...")
    same_end = ["a" * 60 + "/" + "c" * 50, "b" * 60 + "/" + "c" * 50]  # the last 45 characters agree
    out = short_names(same_end)
    assert len(set(out)) == 2 and all(len(n) <= 48 for n in out) and out[0].startswith("aaa")


def test_compress_table_shortens_names_and_the_report_keeps_them(tmp_path, capsys):
    model = graphs.mixed_cnn()
    longname = "StatefulPartitionedCall/" + "very_long_scope/" * 20 + "fc1/MatMul"
    for n in model.graph.node:
        if n.name == "fc1":
            n.name = longname
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    np.savez(tmp_path / "c.npz", **graphs.make_feed(model, 8))
    rep = tmp_path / "r.json"
    assert main(["compress", str(p), "--calib", str(tmp_path / "c.npz"), "--bits", "8", "--method", "rtn",
                 "-o", str(tmp_path / "o.onnx"), "--report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert longname not in out and "very_long_scope/fc1/MatMul" in out
    assert longname in [l["name"] for l in json.loads(rep.read_text())["layers"]]


# ---- W8A8 notes -----------------------------------------------------------------------------------------

def test_small_fan_in_conv_mid_network_is_not_called_stem():
    nodes = [helper.make_node("Conv", ["X", "w1"], ["a"], name="first", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "w2"], ["Y"], name="mid", kernel_shape=[1, 1])]
    model = _model(nodes, [_f("X", ["N", 3, 6, 6])], [_f("Y", ["N", 8, 6, 6])], [_w(1, 8, 3, 3, 3), _w(2, 8, 8, 1, 1)])
    feeds = [graphs.make_feed(model, 8)]
    res = compress(model, None, feeds, CompressConfig(bits=8, act_bits=8, method="rtn"))
    notes = [a["note"] for a in res.activations if "note" in a]
    assert len(notes) == 1 and notes[0].startswith("mid: Conv with fan-in 8") and "stem" not in notes[0]
    gray = _model([helper.make_node("Conv", ["X", "w3"], ["Y"], name="c", kernel_shape=[3, 3])],
                  [_f("X", ["N", 1, 6, 6])], [_f("Y", ["N", 4, 4, 4])], [_w(3, 4, 1, 3, 3)])
    res = compress(gray, None, [graphs.make_feed(gray, 8)], CompressConfig(bits=8, act_bits=8, method="rtn"))
    assert [a["note"] for a in res.activations if "note" in a][0].startswith("c: stem Conv with fan-in 9")


def int8_attention():
    """Q/DQ int8 graph: q = DQ(Q(X)) @ DQ(Wq) (a quantized weight), then scores = q @ DQ(Q(Transpose(q)))
    and out = Softmax(scores) @ q: the last two MatMuls multiply activations."""
    s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    wq = numpy_helper.from_array(np.random.default_rng(0).integers(-100, 100, (4, 4)).astype(np.int8), "wq")
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "s", "z"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="dqw"),
        helper.make_node("MatMul", ["xd", "wd"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["qt"], name="t", perm=[0, 2, 1]),
        helper.make_node("QuantizeLinear", ["qt", "s", "z"], ["qtq"], name="qqt"),
        helper.make_node("DequantizeLinear", ["qtq", "s", "z"], ["qtd"], name="dqqt"),
        helper.make_node("MatMul", ["q", "qtd"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("QuantizeLinear", ["q", "s", "z"], ["qq"], name="qq"),
        helper.make_node("DequantizeLinear", ["qq", "s", "z"], ["qd"], name="dqq"),
        helper.make_node("Relu", ["qd"], ["v"], name="v"),
        helper.make_node("MatMul", ["p", "v"], ["Y"], name="context"),
    ]
    return _model(nodes, [_f("X", ["N", 3, 4])], [_f("Y", ["N", 3, 4])], [s, z, wq], opset=19)


def test_activation_matmuls_in_an_int8_model_are_not_called_already_quantized():
    model = int8_attention()
    layers, skipped = find_layers(model)
    reasons = {s.node_name: s.reason for s in skipped}
    assert not layers
    assert reasons["proj"].startswith("already quantized")
    for n in ("scores", "context"):
        assert "activation x activation" in reasons[n] and "quantized" not in reasons[n], reasons[n]


# ---- --verify -------------------------------------------------------------------------------------------

def test_verify_is_in_sample_by_default_and_held_out_with_verify_data(tmp_path, capsys):
    model = graphs.mixed_cnn()
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    np.savez(tmp_path / "c.npz", **graphs.make_feed(model, 24))
    np.savez(tmp_path / "t.npz", **graphs.make_feed(model, 40, seed=5))
    base = ["compress", str(p), "--calib", str(tmp_path / "c.npz"), "--bits", "4", "--method", "rtn", "--force"]
    assert main(base + ["-o", str(tmp_path / "a.onnx"), "--verify", "--samples", "16",
                        "--report", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "verify on 16 samples" in out and "in-sample" in out and "--verify-data" in out
    v = json.loads((tmp_path / "a.json").read_text())["verify"]
    assert v["in_sample"] is True and v["samples"] == 16  # not beyond the samples calibrated on
    assert main(base + ["-o", str(tmp_path / "b.onnx"), "--verify-data", str(tmp_path / "t.npz"),
                        "--report", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "verify on 40 samples of" in out and "t.npz (held-out)" in out
    v = json.loads((tmp_path / "b.json").read_text())["verify"]
    assert v["in_sample"] is False and v["data"].endswith("t.npz")
    assert main(base + ["-o", str(tmp_path / "c.onnx"), "--verify-data", str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz" in capsys.readouterr().err and not (tmp_path / "c.onnx").exists()
