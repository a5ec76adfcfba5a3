"""W8A8 (``--act-bits 8``): activation ranges, where the Q/DQ pairs go, what the graph computes, what ORT fuses."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.calibrate.ranges import RangeObserver, fake_quant, params_from_range
from onnxobc.cli import main
from onnxobc.export.actquant import MIN_INT8_FAN_IN
from onnxobc.graph import find_layers

BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
EXTENDED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
ROOT = Path(__file__).resolve().parent.parent
CASES = ["conv2d_grouped", "conv2d_depthwise", "conv3d", "gemm_transB0", "gemm_transB1", "matmul_3d", "bert_like",
         "mixed_cnn"]


# ---- helpers --------------------------------------------------------------------------------------------

def session(model, level=BASIC, optimized=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model, feed, level=BASIC):
    return session(model, level).run(None, feed)


def reference(model, feed, outputs=None):
    """onnx's numpy reference implementation (it has DequantizeLinear from opset 19 on: run a converted copy)."""
    m = onnx.version_converter.convert_version(model, 21) if _opset(model) < 21 else model
    return ReferenceEvaluator(m).run(outputs, feed)


def _opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def min_cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def w8a8(model, calib, **cfg):
    return compress(model, None, calib, CompressConfig(bits=8, act_bits=8, **cfg))


class G:
    """Producers, readers and initializers of a model's main graph."""

    def __init__(self, model):
        self.model = model
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.init_types = {t.name: t.data_type for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.by_name = {n.name: n for n in model.graph.node}
        self.outputs = [o.name for o in model.graph.output]

    def op(self, tensor):
        p = self.producer.get(tensor)
        return p.op_type if p is not None else None

    def nodes(self, op):
        return [n for n in self.model.graph.node if n.op_type == op]


def is_stem(layer):
    return layer.op == "Conv" and layer.groups == 1 and layer.cols < MIN_INT8_FAN_IN


def calib_feeds(model, n=32, batches=2):
    return [graphs.make_feed(model, n, seed=s) for s in range(batches)]


# ---- RangeObserver --------------------------------------------------------------------------------------

def test_minmax_is_the_exact_range_over_batches_widened_to_zero():
    rng = np.random.default_rng(0)
    batches = [rng.uniform(lo, hi, (8, 50)).astype(np.float32) for lo, hi in ((1.0, 3.0), (2.0, 7.5), (0.5, 4.0))]
    signed = [b - 4.0 for b in batches]
    ob = RangeObserver(["pos", "signed", "pos"])  # duplicates are watched once
    assert ob.tensors == ["pos", "signed"]
    for p, s in zip(batches, signed):
        ob.update({"pos": p, "signed": s})
    allp = np.concatenate([b.ravel() for b in batches])
    p = ob.params("pos")
    assert p.observed_min == float(allp.min()) and p.observed_max == float(allp.max())
    assert p.lo == 0.0 and p.hi == float(allp.max())  # all positive: widened down to 0
    assert p.zero_point == 0 and p.scale == pytest.approx(allp.max() / 255, rel=1e-6)
    s = ob.params("signed")
    alls = np.concatenate([b.ravel() for b in signed])
    assert (s.lo, s.hi) == (float(alls.min()), float(alls.max()))
    assert (s.scale, s.zero_point) == params_from_range(alls.min(), alls.max(), 8)
    assert 0 < s.zero_point < 255
    # the grid spans the range: the extremes survive fake quantization within half a step
    ends = np.array([alls.min(), alls.max()], np.float32)
    assert np.all(np.abs(fake_quant(ends, s.scale, s.zero_point, 8) - ends) <= s.scale / 2 + 1e-7)


def test_percentile_ignores_a_few_huge_outliers():
    rng = np.random.default_rng(1)
    ob = RangeObserver(["t"])
    for k in range(4):  # 4 x 50k values: below the per-batch sample size, so every value is kept
        x = rng.standard_normal(50_000).astype(np.float32)
        x[:3] = [1e4, -2e4, 5e3]
        ob.update({"t": x})
    mm = ob.params("t", method="minmax")
    assert mm.hi == 1e4 and mm.lo == -2e4
    pc = ob.params("t", method="percentile", percentile=99.9)
    assert 2.5 < pc.hi < 4.0 and -4.0 < pc.lo < -2.5  # ~ +-3.09 sigma
    assert pc.scale < mm.scale / 1000
    assert (pc.observed_min, pc.observed_max) == (mm.observed_min, mm.observed_max)
    full = ob.params("t", method="percentile", percentile=100.0)  # every value was kept: the exact min-max
    assert (full.scale, full.zero_point) == (mm.scale, mm.zero_point)
    with pytest.raises(ValueError, match="minmax, percentile, mse"):
        ob.params("t", method="bogus")


def test_mse_clips_heavy_tails_and_lowers_the_error():
    rng = np.random.default_rng(2)
    x = rng.laplace(size=200_000).astype(np.float32)  # heavy (exponential) tails: a few values far out
    ob = RangeObserver(["t"])
    for part in np.split(x, 4):
        ob.update({"t": part})
    mm, ms = ob.params("t", method="minmax"), ob.params("t", method="mse")
    assert ms.hi < 0.9 * mm.hi and ms.lo > 0.9 * mm.lo  # clipped, both ends alike
    assert ms.hi / mm.hi == pytest.approx(ms.lo / mm.lo)

    def mse(p):
        return float(np.mean((fake_quant(x, p.scale, p.zero_point, 8) - x) ** 2))

    assert mse(ms) < 0.85 * mse(mm)  # about 0.78 here
    # on data without tails the chosen range stays close to the observed one
    u = rng.uniform(-1, 3, 100_000).astype(np.float32)
    ob = RangeObserver(["u"])
    ob.update({"u": u})
    mu = ob.params("u", method="mse")
    assert mu.hi > 0.9 * float(u.max()) and mu.lo < 0.9 * float(u.min())


def test_token_mask_excludes_padding_positions():
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, 3, (4, 6, 5)).astype(np.float32)  # [batch, sequence, hidden]
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    mask[2, 2:] = False
    x[~mask] = 1e6
    x[0, 5] = -1e6
    flat = rng.uniform(-1, 1, (4, 6)).astype(np.float32)  # [batch, features]: no token axis, nothing masked
    flat[3, 5] = 50.0
    ob = RangeObserver(["x", "flat"])
    ob.update({"x": x, "flat": flat}, token_mask=mask)
    p = ob.params("x")
    assert p.observed_max == float(x[mask].max()) < 3 and p.observed_min == float(x[mask].min()) > -2
    assert ob.params("x", method="percentile", percentile=100.0).hi < 3
    assert ob.params("flat").observed_max == 50.0
    unmasked = RangeObserver(["x"])
    unmasked.update({"x": x})
    assert unmasked.params("x").observed_max == 1e6


def test_quantization_parameter_edge_cases():
    # all zero (or nothing ever seen): an identity-ish grid, zero exact
    assert params_from_range(0.0, 0.0, 8) == (1.0, 0)
    ob = RangeObserver(["zero", "never", "ints", "nonfinite"])
    ob.update({"zero": np.zeros((2, 3), np.float32), "never": np.zeros((0, 3), np.float32),
               "ints": np.arange(6).reshape(2, 3), "nonfinite": np.array([np.nan, np.inf, -np.inf], np.float32)})
    for t in ("zero", "never", "ints", "nonfinite"):
        p = ob.params(t)
        assert (p.scale, p.zero_point) == (1.0, 0), t
    # non-finite values are ignored, not propagated into the range
    ob = RangeObserver(["t"])
    ob.update({"t": np.array([np.nan, 1.0, -np.inf, 2.0, np.inf], np.float32)})
    assert ob.params("t").hi == 2.0 and ob.params("t").observed_min == 1.0
    # all positive -> zero point 0; all negative -> zero point qmax
    assert params_from_range(0.5, 4.0, 8)[1] == 0
    assert params_from_range(-4.0, -0.5, 8)[1] == 255
    # 0 is exactly representable on every grid
    rng = np.random.default_rng(4)
    for _ in range(200):
        lo, hi = -rng.exponential(3.0), rng.exponential(3.0)
        s, z = params_from_range(lo, hi, 8)
        assert 0 <= z <= 255 and isinstance(s, float) and np.float32(s) == s
        assert fake_quant(np.zeros(3, np.float32), s, z, 8).tolist() == [0.0, 0.0, 0.0]
    # a range of a few denormals: a usable (positive, normal) scale, no division by zero
    for lo, hi in ((0.0, 1e-44), (-1e-44, 1e-44), (0.0, 1e-40)):
        s, z = params_from_range(lo, hi, 8)
        assert np.isfinite(s) and s >= np.finfo(np.float32).tiny and 0 <= z <= 255
    ob = RangeObserver(["tiny"])
    ob.update({"tiny": np.full((2, 2), 1e-44, np.float32)})
    for method in ("minmax", "percentile", "mse"):
        assert ob.params("tiny", method=method).scale > 0


def test_fake_quant_is_what_onnxruntime_computes():
    """QuantizeLinear -> DequantizeLinear in ORT == fake_quant (round half to even, saturation)."""
    rng = np.random.default_rng(5)
    s, z = params_from_range(-1.3, 2.1, 8)
    x = np.concatenate([rng.uniform(-2, 3, 1000), (np.arange(-20, 20) + 0.5) * s - z * s]).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size])],
                          [numpy_helper.from_array(np.array(s, np.float32), "s"),
                           numpy_helper.from_array(np.array(z, np.uint8), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)
    np.testing.assert_array_equal(run(m, {"x": x})[0], fake_quant(x, s, z, 8))


# ---- graph structure ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_w8a8_graph_structure(case):
    model = graphs.BUILDERS[case]()
    before = model.SerializeToString()
    res = w8a8(model, calib_feeds(model))
    out = res.extra["model"]
    assert model.SerializeToString() == before  # the input model is not modified
    onnx.checker.check_model(out, full_check=True)
    g = G(out)

    # activation Q/DQ: per-tensor float32 scale and uint8 zero point, both scalars, shared by the pair
    qs = g.nodes("QuantizeLinear")
    assert qs
    for q in qs:
        scale, zp = g.inits[q.input[1]], g.inits[q.input[2]]
        assert scale.dtype == np.float32 and scale.shape == () and scale > 0
        assert zp.dtype == np.uint8 and zp.shape == ()
        for r in g.readers[q.output[0]]:  # its DequantizeLinear (same parameters) or a uint8 zero Pad
            assert r.op_type in ("DequantizeLinear", "Pad")
            if r.op_type == "DequantizeLinear":
                assert list(r.input[1:]) == list(q.input[1:])
    # the report lists every quantized tensor with its parameters
    reported = {a["tensor"]: a for a in res.activations if "tensor" in a}
    def reported_name(q):  # a quantized graph output is reported under its own name (its DQ's output)
        outs = [r.output[0] for r in g.readers[q.output[0]] if r.output[0] in g.outputs]
        return outs[0] if outs else q.input[0]

    assert {reported_name(q) for q in qs} <= set(reported)
    for q in qs:
        a = reported[reported_name(q)]
        assert a["scale"] == float(g.inits[q.input[1]]) and a["zero_point"] == int(g.inits[q.input[2]])
        assert a["lo"] <= 0.0 <= a["hi"] and a["observed_min"] <= a["observed_max"]

    g0 = G(model)
    layers, _ = find_layers(model)
    assert layers
    for layer in layers:
        for c in layer.consumers:
            node = g.by_name[c.node_name]
            # weights: int8 codes with zero point 0 behind a DequantizeLinear
            wdq = g.producer[node.input[1]]
            assert wdq.op_type == "DequantizeLinear"
            assert g.init_types[wdq.input[0]] == TensorProto.INT8
            assert g.init_types[wdq.input[2]] == TensorProto.INT8 and not g.inits[wdq.input[2]].any()
            if is_stem(layer):  # an image stem keeps float activations
                assert g.op(node.input[0]) != "DequantizeLinear"
                continue
            # activation input: DQ(Q(x)) or DQ(Pad_uint8(Q(x)))
            dq = g.producer[node.input[0]]
            assert dq.op_type == "DequantizeLinear", c.node_name
            src = g.producer[dq.input[0]]
            if src.op_type == "Pad":
                src = g.producer[src.input[0]]
            assert src.op_type == "QuantizeLinear", c.node_name
            assert list(dq.input[1:]) == list(src.input[1:])
            if layer.op != "Conv":
                continue
            # Conv output, after a directly following Relu/Clip (which ORT folds), is quantized: its one reader
            # is a QuantizeLinear
            out = node.output[0]
            hop = g0.readers.get(out, [])
            if len(hop) == 1 and hop[0].op_type in ("Relu", "Clip") and out not in g0.outputs:
                assert [r.name for r in g.readers[out]] == [hop[0].name]  # not quantized before the hop
                out = hop[0].output[0]
            if out in g.outputs:
                # a Conv output that is a graph output: Conv -> Q -> DQ, the DQ writing the output's own name
                dq = g.producer[out]
                assert dq.op_type == "DequantizeLinear" and g.op(dq.input[0]) == "QuantizeLinear", c.node_name
                q = g.producer[dq.input[0]]
                assert g.producer[q.input[0]] is node or g.op(q.input[0]) in ("Relu", "Clip"), c.node_name
            else:
                assert [r.op_type for r in g.readers[out]] == ["QuantizeLinear"], c.node_name

    # graph outputs: same names; only Conv outputs are quantized (and dequantized back under their name)
    assert g.outputs == [o.name for o in model.graph.output]
    for o in g.outputs:
        assert g.op(o) != "QuantizeLinear"
        if g.op(o) == "DequantizeLinear":
            assert g.op(g.producer[g.producer[o].input[0]].input[0]) in ("Conv", "Relu", "Clip")


def test_other_readers_of_a_quantized_input_keep_the_float_tensor():
    model = graphs.bert_like()
    g = G(w8a8(model, calib_feeds(model, n=8)).extra["model"])
    # X feeds q/k/v (quantized, one shared pair) and the residual Add (float)
    assert g.by_name["residual1/Add"].input[0] == "X"
    assert {g.op(g.by_name[f"attn/{p}/MatMul"].input[0]) for p in "qkv"} == {"DequantizeLinear"}
    assert len({g.by_name[f"attn/{p}/MatMul"].input[0] for p in "qkv"}) == 1
    assert [r.op_type for r in g.readers["X"]].count("QuantizeLinear") == 1
    # ln1 feeds ffn/fc1 (quantized) and the second residual Add (float)
    assert g.by_name["residual2/Add"].input[0] == "ln1"
    assert g.op(g.by_name["ffn/fc1/MatMul"].input[0]) == "DequantizeLinear"
    # activation x activation MatMuls are not layers: untouched
    assert g.by_name["attn/scores/MatMul"].input[:] == ["q_heads", "k_heads"]


def gray_stem():
    """A 3x3 Conv on a 1-channel image (fan-in 9), like the shipped model's first layer."""
    rng = np.random.default_rng(4)
    g_ = helper.make_graph(
        [helper.make_node("Conv", ["X", "w", "b"], ["Y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "gray", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 6, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((6, 1, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")])
    return helper.make_model(g_, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def test_tiny_fan_in_stem_keeps_float_activations():
    model = gray_stem()
    res = w8a8(model, calib_feeds(model))
    g = G(res.extra["model"])
    assert not g.nodes("QuantizeLinear")
    assert g.op(g.by_name["conv"].input[0]) is None  # reads the graph input directly
    assert any("stem Conv with fan-in 9" in a.get("note", "") for a in res.activations)
    # an RGB 3x3 stem (fan-in 27) is worth its integer kernel
    rgb = w8a8(graphs.conv2d_basic(), calib_feeds(graphs.conv2d_basic()))
    assert G(rgb.extra["model"]).nodes("QuantizeLinear") and not any("note" in a for a in rgb.activations)


# ---- numerics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_w8a8_numerics(case):
    model = graphs.BUILDERS[case]()
    out = w8a8(model, calib_feeds(model)).extra["model"]
    feed = graphs.make_feed(model, 16, seed=7)
    basic = run(out, feed, BASIC)
    # the graph computes what it says: ORT without fusions == numpy reference
    for a, r in zip(basic, reference(out, feed)):
        assert rel(a, r) < 1e-5
    # and it is close to the float model
    for a, d in zip(basic, run(model, feed, BASIC)):
        assert min_cosine(a, d) > 0.99
        assert rel(a, d) < 0.05
    # integer kernels (ORT_ENABLE_ALL) requantize, but stay close to the QDQ graph's float semantics
    for a, b in zip(run(out, feed, ALL), basic):
        assert rel(a, b) < 2e-2


# ---- what ONNX Runtime fuses ----------------------------------------------------------------------------

def optimized_ops(model, tmp_path, level=EXTENDED):
    path = tmp_path / f"opt{int(level)}.onnx"
    session(model, level, optimized=path)
    return onnx.load(str(path))


@pytest.mark.parametrize("case, expected, float_left", [
    ("gemm_transB0", {"QGemm": 1}, []),  # Gemm with a bias: needs the int32 bias to fuse
    ("gemm_transB1", {"QGemm": 1}, []),
    ("gemm_no_bias", {"QGemm": 1}, []),
    ("matmul_3d", {"MatMulIntegerToFloat": 2}, []),
    ("bert_like", {"MatMulIntegerToFloat": 6}, []),
    ("mixed_cnn", {"QLinearConv": 2, "QGemm": 2}, []),  # conv1: a 3-channel 3x3 stem, fan-in 27
])
def test_onnxruntime_fuses_integer_kernels(case, expected, float_left, tmp_path):
    model = graphs.BUILDERS[case]()
    opt = optimized_ops(w8a8(model, calib_feeds(model)).extra["model"], tmp_path)
    ops = [n.op_type for n in opt.graph.node]
    for op, k in expected.items():
        assert ops.count(op) == k, ops
    layer_nodes = {c.node_name for layer in find_layers(model)[0] for c in layer.consumers}
    left = [n.name for n in opt.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name in layer_nodes]
    assert left == float_left, ops


def test_alpha_or_beta_gemm_keeps_its_float_bias():
    """ORT fuses a QDQ Gemm only with alpha = beta = 1: no int32 bias for the others."""
    model = graphs.gemm_alpha_beta()
    g = G(w8a8(model, calib_feeds(model)).extra["model"])
    assert g.by_name["gemm"].input[2] == "gemm.C"


@pytest.fixture(scope="module")
def fmnist():
    root = ROOT
    calib = np.load(root / "models" / "fmnist_calib.npz")["image"][:128]
    test = np.load(root / "models" / "fmnist_test.npz")
    # rtn weights keep this fast; the weight method does not change where the activation pairs go
    res = compress(str(root / "models" / "fmnist_cnn.onnx"), None, [{"image": calib}],
                   CompressConfig(method="rtn", bits=8, act_bits=8, batch_size=64))
    return dict(dense=str(root / "models" / "fmnist_cnn.onnx"), res=res, model=res.extra["model"],
                x=test["image"][:1000], y=test["label"][:1000])


@pytest.mark.parametrize("level", [EXTENDED, ALL])
def test_fmnist_runs_as_integer_kernels(fmnist, tmp_path, level):
    opt = optimized_ops(fmnist["model"], tmp_path, level)
    ops = [n.op_type for n in opt.graph.node]
    # ORT 1.32: conv2..conv5 -> QLinearConv (ai.onnx at EXTENDED, com.microsoft NHWC at ALL), fc1 Gemm -> QGemm
    # with the Relu folded in, fc2 MatMul + Add -> Gemm (MatMulAddFusion) -> QGemm with a float output
    assert ops.count("QLinearConv") == 4, ops
    assert ops.count("QGemm") == 2, ops
    assert "MatMul" not in ops and "Gemm" not in ops and "MatMulIntegerToFloat" not in ops
    convs = [n for n in opt.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == ["/conv1/conv1.0/Conv"]  # only the 1-channel stem stays float
    assert opt.graph.output[0].name == "logits"


def test_fmnist_accuracy(fmnist):
    x, y = fmnist["x"], fmnist["y"]
    dense = run(fmnist["dense"], {"image": x}, ALL)[0]
    fused = run(fmnist["model"], {"image": x}, ALL)[0]
    qdq = run(fmnist["model"], {"image": x}, BASIC)[0]
    acc_dense, acc = np.mean(dense.argmax(1) == y), np.mean(fused.argmax(1) == y)
    assert acc >= acc_dense - 0.005, (acc, acc_dense)
    assert rel(fused, qdq) < 2e-2
    assert min_cosine(qdq, dense) > 0.99
    # the report: one entry per quantized tensor (4 Conv outputs, the inputs of conv2, fc1, fc2) and the stem note
    acts = fmnist["res"].activations
    assert len([a for a in acts if "tensor" in a]) == 7
    assert [a["note"] for a in acts if "note" in a][0].startswith("/conv1/conv1.0/Conv: stem Conv")
    assert fmnist["res"].config["qdq"] and fmnist["res"].config["sym"]


# ---- the zero-Pad path ----------------------------------------------------------------------------------

def pad_model(mode="constant", value=None, hop=None, pad_output=False):
    """X -> conv1 (-> Relu/Clip) -> Pad(1 each side) -> conv2 (no pads) -> Y; 8 channels (not a stem).
    ``pad_output``: the padded tensor is also a graph output (so the Pad cannot be folded into conv2)."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    pad_in = ["h", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "pad_value"))
        pad_in.append("pad_value")
    nodes = [helper.make_node("Conv", ["X", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    if hop is None:
        nodes[0].output[0] = "h"
    else:
        if hop == "Clip":
            inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                      numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
        nodes.append(helper.make_node(hop, ["c1"] + (["lo", "hi"] if hop == "Clip" else []), ["h"], name="hop"))
    nodes += [helper.make_node("Pad", pad_in, ["p"], name="pad", mode=mode),
              helper.make_node("Conv", ["p", "w2", "b2"], ["Y"], name="conv2", kernel_shape=[3, 3])]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8, 6, 6])]
    if pad_output:
        outs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 8, 8, 8]))
    g = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8, 6, 6])],
                          outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


@pytest.mark.parametrize("value, hop, act_calib", [(None, None, "minmax"), (0.0, None, "percentile"),
                                                   (None, "Relu", "minmax"), (0.0, "Clip", "mse")])
def test_zero_pad_pads_the_uint8_codes(value, hop, act_calib, tmp_path):
    """A zero Pad that cannot be folded into the Conv (its output is also read elsewhere) pads the uint8 codes."""
    model = pad_model(value=value, hop=hop, pad_output=True)
    onnx.checker.check_model(model, full_check=True)
    res = w8a8(model, calib_feeds(model), act_calib=act_calib)
    out = res.extra["model"]
    onnx.checker.check_model(out, full_check=True)
    g = G(out)
    dq = g.producer[g.by_name["conv2"].input[0]]
    assert dq.op_type == "DequantizeLinear"
    pad = g.producer[dq.input[0]]
    q = g.producer[pad.input[0]]
    assert pad.op_type == "Pad" and q.op_type == "QuantizeLinear" and q.input[0] == "h"
    assert pad.input[2] == q.input[2] == dq.input[2]  # pads with the zero point: dequantizes to exactly 0
    assert list(dq.input[1:]) == list(q.input[1:])
    assert len(g.nodes("Pad")) == 2  # the float Pad still feeds the graph output "p"
    assert g.producer["p"].name == "pad"
    zp = int(g.inits[q.input[2]])
    assert (zp == 0) if hop else (zp > 0)  # signed conv output: a non-trivial zero point
    # the report gives the padded tensor the grid the graph uses (its source's)
    rep = {a["tensor"]: a for a in res.activations if "tensor" in a}
    assert (rep["p"]["scale"], rep["p"]["zero_point"]) == (float(g.inits[q.input[1]]), zp) == \
        (rep["h"]["scale"], rep["h"]["zero_point"])
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    assert all(t.name in used for t in out.graph.initializer)
    # ORT: conv1 (+ hop) -> QLinearConv, a Pad on its uint8 codes, conv2 (a graph output, quantized and
    # dequantized back under its name) -> QLinearConv reading the padded codes
    opt = G(optimized_ops(out, tmp_path))
    assert len(opt.nodes("QLinearConv")) == 2 and not opt.nodes("Conv")
    opt_pad = next(n for n in opt.nodes("Pad") if opt.op(n.input[0]) == "QLinearConv")
    assert opt.nodes("QLinearConv")[1].input[0] == opt_pad.output[0]
    feed = graphs.make_feed(model, 6, seed=11)
    # Pad_uint8(Q(h), zp) dequantized == Pad(DQ(Q(h))): zero borders, the quantized interior
    qh, padded = reference(out, feed, [q.output[0], dq.output[0]])
    s = float(g.inits[q.input[1]])
    interior = (qh.astype(np.float32) - zp) * np.float32(s)
    assert padded.shape == (6, 8, 8, 8)
    np.testing.assert_array_equal(padded[:, :, 1:-1, 1:-1], interior)
    border = np.ones(padded.shape, bool)
    border[:, :, 1:-1, 1:-1] = False
    assert not padded[border].any()
    basic = run(out, feed)[0]
    assert rel(basic, reference(out, feed)[0]) < 1e-5
    assert min_cosine(basic, run(model, feed)[0]) > 0.99


@pytest.mark.parametrize("value, hop", [(None, None), (0.0, "Relu"), (0.0, "Clip")])
def test_zero_pad_folds_into_the_conv(value, hop, tmp_path):
    """A zero Pad read only by a Conv becomes that Conv's pads (exact), so DQ -> Conv stays fusable; the
    caller's model is not touched."""
    model = pad_model(value=value, hop=hop)
    before = model.SerializeToString()
    out = w8a8(model, calib_feeds(model)).extra["model"]
    assert model.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    g = G(out)
    assert not g.nodes("Pad") and "pads" not in g.inits and "pad_value" not in g.inits
    conv2 = g.by_name["conv2"]
    assert next(a.ints for a in conv2.attribute if a.name == "pads") == [1, 1, 1, 1]
    dq = g.producer[conv2.input[0]]
    assert dq.op_type == "DequantizeLinear" and g.op(dq.input[0]) == "QuantizeLinear"
    assert g.producer[dq.input[0]].input[0] == "h"
    feed = graphs.make_feed(model, 6, seed=11)
    basic = run(out, feed)[0]
    assert rel(basic, reference(out, feed)[0]) < 1e-5
    assert min_cosine(basic, run(model, feed)[0]) > 0.99
    opt = G(optimized_ops(out, tmp_path))
    assert len(opt.nodes("QLinearConv")) == 2 and not opt.nodes("Pad") and not opt.nodes("Conv")


def test_pads_that_cannot_fold_stay():
    from onnxobc.export.actquant import fold_zero_pads

    for kw in (dict(mode="reflect"), dict(value=0.5), dict(pad_output=True)):
        m = pad_model(**kw)
        assert fold_zero_pads(m) == 0 and len([n for n in m.graph.node if n.op_type == "Pad"]) == 1
    m = pad_model()
    # channel padding is not a Conv padding
    next(t for t in m.graph.initializer if t.name == "pads").CopyFrom(
        numpy_helper.from_array(np.array([0, 1, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    assert fold_zero_pads(m) == 0
    m = pad_model()
    assert fold_zero_pads(m) == 1 and not [n for n in m.graph.node if n.op_type == "Pad"]


@pytest.mark.parametrize("mode, value", [("constant", 0.5), ("reflect", None), ("edge", None)])
def test_other_pads_get_a_float_qdq_pair(mode, value):
    model = pad_model(mode=mode, value=value)
    out = w8a8(model, calib_feeds(model)).extra["model"]
    onnx.checker.check_model(out, full_check=True)
    g = G(out)
    dq = g.producer[g.by_name["conv2"].input[0]]
    q = g.producer[dq.input[0]]
    assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear" and q.input[0] == "p"
    pad = g.by_name["pad"]  # the original float Pad, reading the dequantized conv1 output
    assert g.op(pad.input[0]) == "DequantizeLinear" and pad.output[0] == "p"
    assert len(g.nodes("Pad")) == 1 and len(g.nodes("QuantizeLinear")) == 4  # X, h, p and the output Y
    feed = graphs.make_feed(model, 6, seed=11)
    basic = run(out, feed)[0]
    assert rel(basic, reference(out, feed)[0]) < 1e-5
    assert min_cosine(basic, run(model, feed)[0]) > 0.99


# ---- biases ---------------------------------------------------------------------------------------------

def test_conv_and_gemm_biases_become_int32_codes():
    model = graphs.mixed_cnn()
    out = w8a8(model, calib_feeds(model)).extra["model"]
    g = G(out)
    orig = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, bias in (("conv1", "conv1.bias"), ("conv2", "conv2.bias"), ("fc1", "fc1.bias"), ("fc2", "fc2.bias")):
        node = g.by_name[name]
        xdq, wdq, bdq = (g.producer[i] for i in node.input)
        assert bdq.op_type == "DequantizeLinear", name
        codes, scale, zp = (g.inits[i] for i in bdq.input)
        assert codes.dtype == np.int32 and zp.dtype == np.int32 and not zp.any()
        expect = (g.inits[xdq.input[1]] * g.inits[wdq.input[1]]).astype(np.float32)
        np.testing.assert_array_equal(scale, np.broadcast_to(expect, codes.shape))
        assert next(a.i for a in bdq.attribute if a.name == "axis") == 0
        assert np.all(np.abs(codes * scale.astype(np.float64) - orig[bias]) <= scale / 2 * (1 + 1e-6))
        assert bias not in g.inits  # the float bias is gone
    # a tiny-fan-in stem keeps its float bias (its input is not quantized)
    gray = G(w8a8(gray_stem(), calib_feeds(gray_stem())).extra["model"])
    assert gray.by_name["conv"].input[2] == "b"


def test_matmul_add_bias_int32_only_where_ort_fuses_it(root):
    """2-D MatMul + Add(bias): ORT makes it one Gemm, so the bias needs int32 codes to fuse; N-D MatMuls
    (MatMulIntegerToFloat + a float Add) keep a float bias and no extra DequantizeLinear."""
    g = G(w8a8(str(root / "models" / "fmnist_cnn.onnx"),
               [{"image": np.load(root / "models" / "fmnist_calib.npz")["image"][:16]}], method="rtn").extra["model"])
    add = g.by_name["/Add_1"]
    bdq = g.producer[add.input[1]]
    assert bdq.op_type == "DequantizeLinear" and g.inits[bdq.input[0]].dtype == np.int32
    model = graphs.matmul_3d()
    g = G(w8a8(model, calib_feeds(model)).extra["model"])
    assert g.by_name["fc1/Add"].input[1] == "fc1.bias" and g.by_name["fc2/Add"].input[1] == "fc2.bias"


def test_bias_that_overflows_int32_widens_the_channel_scale():
    """A near-dead channel (tiny weight scale) with a real bias: its bias cannot be stored on x_scale * w_scale
    in int32. Left float, ONNX Runtime's own bias quantization (ENABLE_BASIC and up) overflows it silently (the
    channel's output was 0 instead of 100), so the channel's weight scale is widened until the bias fits."""
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((4, 8, 3, 3)) / 8).astype(np.float32)
    w[2] *= 1e-9  # a nearly dead channel: tiny weight scale
    b = np.array([0.1, -0.2, 100.0, 0.3], np.float32)  # 100 / (x_scale * 1e-11) does not fit int32
    g_ = helper.make_graph(
        [helper.make_node("Conv", ["X", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["Y"], name="relu")],
        "overflow", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8, 5, 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g_, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)
    plain = w8a8(model, calib_feeds(model), method="rtn")
    out = plain.extra["model"]
    onnx.checker.check_model(out, full_check=True)
    g = G(out)
    conv = g.by_name["conv"]
    assert g.op(conv.input[0]) == "DequantizeLinear" and g.op(conv.input[1]) == "DequantizeLinear"
    bdq = g.producer[conv.input[2]]
    assert bdq.op_type == "DequantizeLinear" and g.inits[bdq.input[0]].dtype == np.int32
    assert np.abs(g.inits[bdq.input[0]]).max() <= 2 ** 30
    wdq = g.producer[conv.input[1]]
    sw = g.inits[wdq.input[1]]
    fake = compress(model, None, calib_feeds(model), CompressConfig(method="rtn", bits=8, sym=True)).extra["model"]
    sw_plain = numpy_helper.to_array(next(t for t in compress(
        model, None, calib_feeds(model), CompressConfig(method="rtn", bits=8, sym=True, qdq=True)
    ).extra["model"].graph.initializer if t.name == wdq.input[1]))
    assert sw[2] > 1e3 * sw_plain[2]  # only the dead channel's scale moved
    assert np.array_equal(np.delete(sw, 2), np.delete(sw_plain, 2))
    feed = graphs.make_feed(model, 4, seed=3)
    for level in (BASIC, EXTENDED, ALL):
        y = run(out, feed, level)[0]
        assert rel(y, reference(out, feed)[0]) < 2e-2
        assert rel(y, run(fake, feed)[0]) < 0.05
        assert np.allclose(y[:, 2], 100.0, rtol=0.01)  # the dead channel's output is its bias


# ---- configuration and CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(bits=8, act_bits=4), "8-bit"),
    (dict(bits=8, act_bits=16), "8-bit"),
    (dict(sparsity=0.5, act_bits=8), "--bits 8"),
    (dict(bits=4, act_bits=8), "--bits 8"),
    (dict(bits=4, act_bits=8, matmulnbits=True), "--bits 8|matmulnbits"),
    (dict(bits=8, act_bits=8, matmulnbits=True), "matmulnbits"),
    (dict(bits=8, act_bits=8, act_calib="entropy"), "--act-calib"),
    (dict(bits=8, act_bits=8, act_percentile=50.0), "--act-percentile"),
    (dict(bits=8, act_bits=8, act_percentile=100.5), "--act-percentile"),
])
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        CompressConfig(**kw)


def test_config_act_bits_implies_symmetric_qdq():
    cfg = CompressConfig(bits=8, act_bits=8, act_calib="percentile", act_percentile=100.0)
    assert cfg.qdq and cfg.sym and "a8" in cfg.describe()
    assert CompressConfig(bits=8).act_bits is None


def _cli(root, tmp_path, *args):
    out = tmp_path / "o.onnx"
    argv = ["compress", str(root / "models" / "fmnist_cnn.onnx"), "-o", str(out),
            "--calib", str(root / "models" / "fmnist_calib.npz"), *args]
    return main(argv), out


@pytest.mark.parametrize("args, message", [
    (["--act-bits", "8"], "--bits 8"),
    (["--act-bits", "8", "--bits", "4"], "--bits 8"),
    (["--bits", "8", "--act-bits", "8", "--act-percentile", "40"], "--act-percentile must be in (50, 100]"),
])
def test_cli_act_bits_usage_errors(root, tmp_path, capsys, args, message):
    code, out = _cli(root, tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("onnxobc: error:") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--bits", "8", "--act-bits", "4"], "invalid choice"),
    (["--bits", "8", "--act-bits", "8", "--act-calib", "entropy"], "invalid choice"),
    (["--bits", "8", "--act-bits", "8", "--act-percentile", "high"], "invalid float value"),
])
def test_cli_act_bits_argparse_errors(root, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        _cli(root, tmp_path, *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_w8a8_mse_report(root, tmp_path, capsys):
    rep = tmp_path / "r.json"
    code, out = _cli(root, tmp_path, "--bits", "8", "--act-bits", "8", "--act-calib", "mse", "--samples", "64",
                     "--report", str(rep))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "activations: 7 tensors quantized to 8 bits per tensor (mse ranges)" in captured.out
    assert "note: /conv1/conv1.0/Conv: stem Conv" in captured.out
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    report = json.loads(rep.read_text())
    assert report["config"]["act_bits"] == 8 and report["config"]["act_calib"] == "mse"
    acts = [a for a in report["activations"] if "tensor" in a]
    g = G(model)
    assert {a["tensor"] for a in acts} == {q.input[0] for q in g.nodes("QuantizeLinear")}
    for a in acts:
        q = next(q for q in g.nodes("QuantizeLinear") if q.input[0] == a["tensor"])
        assert a["scale"] == float(g.inits[q.input[1]]) > 0 and a["zero_point"] == int(g.inits[q.input[2]])
        assert 0 <= a["zero_point"] <= 255 and a["bits"] == 8 and a["used_as"]
        assert a["lo"] <= 0 <= a["hi"] <= a["observed_max"] + 1e-6  # mse only ever shrinks the range
    assert any(a["hi"] < a["observed_max"] for a in acts)
    assert any("stem" in a.get("note", "") for a in report["activations"])
    x = np.load(root / "models" / "fmnist_test.npz")["image"][:64]
    assert min_cosine(run(model, {"image": x}, ALL)[0], run(str(root / "models" / "fmnist_cnn.onnx"), {"image": x})[0]) > 0.99


def test_pruned_w8a8_with_sparse_storage_is_exact_and_fuses(root, tmp_path):
    """2:4 + W8A8 + --sparse-storage on the shipped model: the compact encoding decodes to the same int8 codes
    (same outputs), and ORT still fuses integer kernels once the decode subgraph is constant-folded."""
    path = str(root / "models" / "fmnist_cnn.onnx")
    feeds = [{"image": np.load(root / "models" / "fmnist_calib.npz")["image"][:64]}]
    dense = w8a8(path, feeds, method="magnitude", nm=(2, 4))
    packed = w8a8(path, feeds, method="magnitude", nm=(2, 4), sparse_storage=True)
    assert packed.sparse_storage and packed.extra["model"].ByteSize() < 0.7 * dense.extra["model"].ByteSize()
    onnx.checker.check_model(packed.extra["model"], full_check=True)
    feed = {"image": np.load(root / "models" / "fmnist_test.npz")["image"][:32]}
    for a, b in zip(run(dense.extra["model"], feed, ALL), run(packed.extra["model"], feed, ALL)):
        np.testing.assert_array_equal(a, b)
    ops = [n.op_type for n in optimized_ops(packed.extra["model"], tmp_path).graph.node]
    assert ops.count("QLinearConv") == 4 and "QGemm" in ops
