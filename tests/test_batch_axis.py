"""Inputs whose samples are not stacked along axis 0 (issue 15, part 2): a VAD-like model with
``input [N, 576]``, a recurrent ``state [2, N, 128]`` and a scalar sample rate ``sr``."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxobc.calibrate.data import input_specs, iter_batches, parse_batch_axes
from onnxobc.cli import main
from onnxobc.errors import CalibrationError, UsageError

H = 128


def _w(seed, *shape):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def vad_like(state_dim: str = "N") -> onnx.ModelProto:
    """MatMul 576->64, an LSTM (one step) whose initial h/c are the two halves of ``state``, Gemm 128->1, Sigmoid,
    scaled by sr / 16000. ONNX Runtime's LSTM checks that initial_h is [1, batch, 128]."""
    inits = [
        numpy_helper.from_array(_w(1, 576, 64), "proj.W"),
        numpy_helper.from_array(_w(2, 1, 4 * H, 64), "lstm.W"),
        numpy_helper.from_array(_w(3, 1, 4 * H, H), "lstm.R"),
        numpy_helper.from_array(np.zeros((1, 8 * H), np.float32), "lstm.B"),
        numpy_helper.from_array(_w(4, 1, H), "head.W"),
        numpy_helper.from_array(np.zeros(1, np.float32), "head.b"),
        numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([1], np.int64), "s1"),
        numpy_helper.from_array(np.array([2], np.int64), "s2"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "rate"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "proj.W"], ["p"], name="proj"),
        helper.make_node("Unsqueeze", ["p", "ax0"], ["x3"], name="unsq"),
        helper.make_node("Slice", ["state", "s0", "s1", "ax0"], ["h0"], name="h0"),
        helper.make_node("Slice", ["state", "s1", "s2", "ax0"], ["c0"], name="c0"),
        helper.make_node("LSTM", ["x3", "lstm.W", "lstm.R", "lstm.B", "", "h0", "c0"], ["", "hN", "cN"],
                         name="lstm", hidden_size=H),
        helper.make_node("Concat", ["hN", "cN"], ["stateN"], name="cat", axis=0),
        helper.make_node("Squeeze", ["hN", "ax0"], ["h2"], name="sq"),
        helper.make_node("Gemm", ["h2", "head.W", "head.b"], ["logit"], name="head", transB=1),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sig"),
        helper.make_node("Cast", ["sr"], ["srf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "rate"], ["srs"], name="div"),
        helper.make_node("Mul", ["prob", "srs"], ["output"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "vad_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 576]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, state_dim, H]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, state_dim, H])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def vad_data(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((n, 576)).astype(np.float32),
            "state": (0.5 * rng.standard_normal((2, n, H))).astype(np.float32),
            "sr": np.array(16000, np.int64)}


@pytest.fixture
def vad(tmp_path):
    path = tmp_path / "vad.onnx"
    onnx.save(vad_like(), str(path))
    np.savez(tmp_path / "calib.npz", **vad_data(64))
    np.savez(tmp_path / "test.npz", **vad_data(40, seed=1))
    return path, tmp_path / "calib.npz", tmp_path / "test.npz"


def test_batch_axes_are_inferred_from_the_shared_symbolic_dim():
    specs = {s.name: s for s in input_specs(vad_like())}
    assert specs["input"].batch_axis == 0
    assert specs["state"].batch_axis == 1 and "'N'" in specs["state"].batch_source
    assert specs["sr"].batch_axis is None
    assert specs["state"].static_batch is None  # the leading 2 is not a batch size


def test_transformer_like_inputs_pick_the_batch_dim_not_the_sequence_dim():
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("pos", TensorProto.INT64, ["seq"])]
    g = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"])], "t", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])])
    specs = {s.name: s.batch_axis for s in input_specs(helper.make_model(g))}
    assert specs == {"ids": 0, "mask": 0, "pos": 0}  # pos has a dynamic axis 0 of its own: sliced too (old rule)


def test_npz_is_sliced_along_each_inputs_axis_and_batch_size_is_honoured(vad):
    _, calib, _ = vad
    specs = input_specs(vad_like())
    batches = list(iter_batches(calib, specs, batch_size=16))
    assert len(batches) == 4
    for b in batches:
        assert b["input"].shape == (16, 576) and b["state"].shape == (2, 16, H) and b["sr"].shape == ()
        assert b.samples == 16
    full = np.load(calib)["state"]
    np.testing.assert_array_equal(batches[1]["state"], full[:, 16:32])
    assert sum(b.samples for b in iter_batches(calib, specs, batch_size=24, max_samples=50)) == 50


def test_override_and_its_errors():
    assert parse_batch_axes(["state=1", "sr=none", "x=-1"]) == {"state": 1, "sr": None, "x": -1}
    with pytest.raises(ValueError, match="NAME=AXIS"):
        parse_batch_axes(["state"])
    with pytest.raises(ValueError, match="integer or 'none'"):
        parse_batch_axes(["state=one"])
    with pytest.raises(UsageError, match="no such model input"):
        input_specs(vad_like(), {"nope": 0})
    with pytest.raises(UsageError, match="rank 3"):
        input_specs(vad_like(), {"state": 3})
    specs = input_specs(vad_like(), {"state": 0})
    with pytest.raises(CalibrationError) as e:
        list(iter_batches([vad_data(8)], specs))
    msg = str(e.value)
    assert "disagree" in msg and "'input' 8" in msg and "'state' 2" in msg
    assert "state axis 0 (--batch-axis)" in msg and "input axis 0 (the shared dim 'N')" in msg


def test_compress_and_eval_on_vad_like_model(vad, tmp_path, capsys):
    path, calib, test = vad
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["compress", str(path), "--calib", str(calib), "--bits", "4", "--batch-size", "16", "-o", str(out),
                 "--report", str(rep), "-q"]) == 0
    report = json.loads(rep.read_text())
    assert report["samples"] == 64 and {l["name"] for l in report["layers"]} >= {"proj", "head"}
    js = tmp_path / "e.json"
    assert main(["eval", str(path), str(out), "--data", str(test), "--batch-size", "8", "--json", str(js),
                 "--latency-runs", "0", "-q"]) == 0
    ev = json.loads(js.read_text())
    assert ev["samples"] == 40 and ev["batches"] == 5
    assert 0 < next(o for o in ev["outputs"] if o["name"] == "output")["rel_l2"] < 0.5


def test_uninferable_axis_fails_with_what_was_inferred_and_override_fixes_it(tmp_path, capsys):
    path = tmp_path / "vad2.onnx"
    onnx.save(vad_like(state_dim="B"), str(path))  # the state's batch dim has another name: not recognisable
    np.savez(tmp_path / "calib.npz", **vad_data(32))
    out = tmp_path / "o.onnx"
    args = ["compress", str(path), "--calib", str(tmp_path / "calib.npz"), "--bits", "8", "-o", str(out), "-q",
            "--batch-size", "8"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unexpected" not in err
    assert "state passed whole" in err and "--batch-axis" in err and not out.exists()
    assert main(args + ["--batch-axis", "state=1"]) == 0
    assert main(["eval", str(path), str(out), "--data", str(tmp_path / "calib.npz"), "--latency-runs", "0", "--batch-size", "8",
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert "state passed whole" in err
    assert main(["eval", str(path), str(out), "--data", str(tmp_path / "calib.npz"), "--latency-runs", "0", "--batch-size", "8",
                 "--batch-axis", "state=1", "-q"]) == 0
    assert main(["eval", str(path), str(out), "--data", str(tmp_path / "calib.npz"), "--batch-axis", "state:1"]) == 2


@pytest.mark.parametrize("shapes, want", [
    ({"x": [-1, 3, "?", "?"]}, {"x": 0}),  # a Paddle export: -1 batch, '?' for both H and W
    ({"x": ["N", 3, "H", "W"]}, {"x": 0}),
    ({"x": ["unk__1", 224, 224, 3], "y": ["unk__2", 10]}, {"x": 0, "y": 0}),  # tf2onnx: one name per input
    ({"x": [1, 3, 8, 8], "flag": [1]}, {"x": 0, "flag": 0}),  # fully static: a fixed batch of 1
    ({"input1": [1, 1, 64, "image_width"]}, {"input1": 0}),  # fixed batch of 1, dynamic width (ddddocr's OCR)
    ({"x": [1, 3, "H", "W"], "flag": [1]}, {"x": 0, "flag": 0}),
    ({"seq": ["T", "N", 16], "h": [2, "N", 8], "x": ["N", 4]}, {"seq": 1, "h": 1, "x": 0}),
    ({"x": ["N", 8], "table": [10, 4]}, {"x": 0, "table": None}),
])
def test_batch_axis_inference_cases(shapes, want):
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()]
    g = helper.make_graph([helper.make_node("Identity", [next(iter(shapes))], ["y_out"])], "t", inputs,
                          [helper.make_tensor_value_info("y_out", TensorProto.FLOAT, None)])
    assert {s.name: s.batch_axis for s in input_specs(helper.make_model(g))} == want
