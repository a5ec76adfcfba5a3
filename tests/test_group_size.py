"""--group-size end to end: group-wise grids through the pipeline, blocked QDQ / MatMulNBits export, fallbacks."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.cli import main
from onnxobc.export.qdq import ensure_opset


def run(model, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def outlier_mlp(k=64, n=24, seed=0) -> onnx.ModelProto:
    """x [B, k] @ W [k, n] where a few input channels carry 30x larger weights: one scale per output channel
    wastes most of its levels on them, groups of 16 inputs do not."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.choice(k, 4, replace=False)] *= 30
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _dq_block_sizes(model):
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            out[n.input[0]] = next((a.i for a in n.attribute if a.name == "block_size"), None)
    return out


@pytest.mark.parametrize("method", ["rtn", "exact"])
@pytest.mark.parametrize("case, gs", [("gemm_transB0", 4), ("gemm_transB1", 4), ("matmul_3d", 4), ("bert_like", 4),
                                      ("conv2d_grouped", 2), ("mixed_cnn", 2)])
def test_blocked_qdq_equals_fake_quant(case, gs, method):
    model = ensure_opset(graphs.BUILDERS[case](), 4, 21)
    feed = graphs.make_feed(model, 6, seed=3)
    cfg = dict(method=method, bits=4, group_size=gs)
    fake = compress(model, None, [feed], CompressConfig(**cfg))
    qdq = compress(model, None, [feed], CompressConfig(qdq=True, **cfg))
    onnx.checker.check_model(qdq.extra["model"], full_check=True)
    for a, b in zip(run(fake.extra["model"], feed), run(qdq.extra["model"], feed)):
        assert rel(a, b) < 1e-5
    sizes = _dq_block_sizes(qdq.extra["model"])
    blocked = [l for l in qdq.layers if "per-channel" not in l.note]
    assert blocked, qdq.layers
    assert sum(1 for v in sizes.values() if v == gs) == len(blocked)
    assert all(l.bits == 4 for l in qdq.layers)


def test_conv_fallback_to_per_channel_is_reported():
    # conv2d_basic: 3 input channels, 3x3 kernel: groups of 2 would straddle kernel taps
    model = ensure_opset(graphs.conv2d_basic(), 4, 21)
    feed = graphs.make_feed(model, 4)
    res = compress(model, None, [feed], CompressConfig(bits=4, group_size=2, qdq=True))
    assert "per-channel grid" in res.layers[0].note and "does not divide" in res.layers[0].note
    assert set(_dq_block_sizes(res.extra["model"]).values()) == {None}


def test_groups_beat_per_channel_on_outlier_inputs():
    model = outlier_mlp()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((64, 64)).astype(np.float32)}]
    errs = {}
    for gs in (None, 16):
        for method in ("rtn", "exact"):
            errs[(gs, method)] = compress(model, None, calib, CompressConfig(method=method, bits=3, group_size=gs)).layers[0].error
    assert errs[(16, "rtn")] < 0.5 * errs[(None, "rtn")]
    assert errs[(16, "exact")] < 0.5 * errs[(None, "exact")]
    assert errs[(16, "exact")] <= errs[(16, "rtn")]


@pytest.mark.parametrize("gs", [16, 32])
def test_matmulnbits_uses_the_groups_as_blocks(gs):
    model = outlier_mlp()
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((32, 64)).astype(np.float32)}]
    fake = compress(model, None, calib, CompressConfig(bits=4, group_size=gs)).extra["model"]
    mnb = compress(model, None, calib, CompressConfig(bits=4, group_size=gs, matmulnbits=True)).extra["model"]
    node = next(n for n in mnb.graph.node if n.op_type == "MatMulNBits")
    assert next(a.i for a in node.attribute if a.name == "block_size") == gs
    scales = next(t for t in mnb.graph.initializer if t.name == node.input[2])
    assert numpy_helper.to_array(scales).size == 24 * (64 // gs)
    for a, b in zip(run(fake, calib[0]), run(mnb, calib[0])):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("kw, msg", [
    (dict(group_size=32), "give --bits"),
    (dict(bits=4, group_size=1), ">= 2"),
    (dict(bits=4, group_size=24, matmulnbits=True), "power of two"),
    (dict(bits=8, group_size=32, act_bits=8), "drop --group-size"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CompressConfig(**kw)


def test_cli_blocked_qdq_needs_opset21(tmp_path, capsys):
    model = graphs.matmul_3d()  # opset 17
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "c.npz", **graphs.make_feed(model, 8))
    out = tmp_path / "o.onnx"
    args = ["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--bits", "4", "--group-size", "4", "--qdq",
            "-o", str(out), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "opset" in err and "--opset 21" in err and "Traceback" not in err
    assert not out.exists()
    assert main(args + ["--opset", "21"]) == 0
    m = onnx.load(str(out))
    assert any(v == 4 for v in _dq_block_sizes(m).values())
