"""Every model ONNX Runtime can load is accepted, even where onnx.checker is stricter (issue 13)."""
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxobc import CompressConfig, UnsupportedModel, compress
from onnxobc.graph import load_model
from onnxobc.graph.model_io import validate


def _model(out_vi, *, elem=onnx.TensorProto.FLOAT, opset=17):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="r")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", 8])], [out_vi], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _shapeless():
    """Graph output typed float but without a shape: onnx.checker refuses it, ONNX Runtime runs it."""
    return _model(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))


def test_the_fixture_is_what_it_claims():
    m = _shapeless()
    with pytest.raises(onnx.checker.ValidationError, match="shape"):
        onnx.checker.check_model(m)
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("vi", [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
                                onnx.ValueInfoProto(name="y")], ids=["no-shape", "no-type"])
def test_validate_accepts_what_ort_loads(vi):
    why = validate(_model(vi), "m")
    assert why and "missing" in why


def test_validate_refuses_when_ort_refuses_too():
    m = _model(helper.make_tensor_value_info("y", onnx.TensorProto.UNDEFINED, None))
    with pytest.raises(UnsupportedModel, match="not a valid ONNX model.*ONNX Runtime cannot load it"):
        validate(m, "m")


def test_valid_model_passes_silently():
    assert validate(_model(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6])), "m") is None


@pytest.mark.parametrize("cfg", [dict(sparsity=0.5), dict(bits=4, qdq=True, opset=21), dict(bits=8, act_bits=8, qdq=True)],
                         ids=["exact50", "qdq4-opset21", "w8a8"])
def test_compress_a_shapeless_output_model_from_file_and_proto(tmp_path, cfg):
    m = _shapeless()
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    assert load_model(path).graph.output[0].name == "y"
    feed = {"x": np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)}
    out = tmp_path / "o.onnx"
    res = compress(str(path), str(out), [feed], CompressConfig(verify=True, **cfg))
    assert [l.method for l in res.layers] != ["dense"]
    res2 = compress(m, None, [feed], CompressConfig(**cfg))
    for model in (onnx.load(str(out)), res2.extra["model"]):
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        assert y.shape == ref.shape and np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.5


def test_cli_refuses_a_model_neither_accepts_in_one_line(tmp_path):
    m = _model(helper.make_tensor_value_info("y", onnx.TensorProto.UNDEFINED, None))
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    p = subprocess.run([sys.executable, "-m", "onnxobc", "inspect", str(path)], capture_output=True, text=True)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "ONNX Runtime cannot load it" in p.stderr
