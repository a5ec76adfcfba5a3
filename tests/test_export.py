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


# ---- group-wise grids: blocked DequantizeLinear (opset 21) and MatMulNBits blocks ------------------------

def _blocked_case(case: str) -> onnx.ModelProto:
    """Single-layer opset-21 models with fan-ins large enough for several (and partial) groups."""
    from graphs import _init, _model, _node, _vi, _weights

    if case == "matmul":
        inits = [_init("mm.B", _weights(60, 40, 24, scale=0.2))]
        nodes = [_node("MatMul", ["X", "mm.B"], ["Y"], "mm")]
        return _model(case, nodes, [_vi("X", ["N", 5, 40])], [_vi("Y", ["N", 5, 24])], inits, opset=21)
    if case in ("gemm_transB0", "gemm_transB1"):
        t = int(case[-1])
        b = _weights(61, 24, 40) if t else _weights(61, 40, 24, scale=0.2)
        inits = [_init("gemm.B", b), _init("gemm.C", _weights(62, 24, scale=0.1))]
        nodes = [_node("Gemm", ["X", "gemm.B", "gemm.C"], ["Y"], "gemm", transB=t)]
        return _model(case, nodes, [_vi("X", ["N", 40])], [_vi("Y", ["N", 24])], inits, opset=21)
    shapes = {"conv": ((8, 8, 3, 3), 1), "conv_grouped": ((8, 4, 3, 3), 2), "conv_1x1": ((6, 10, 1, 1), 1)}
    (w_shape, group) = shapes[case]
    k = w_shape[2]
    inits = [_init("conv.weight", _weights(63, *w_shape)), _init("conv.bias", _weights(64, w_shape[0], scale=0.1))]
    nodes = [_node("Conv", ["X", "conv.weight", "conv.bias"], ["Y"], "conv", group=group,
                   kernel_shape=[k, k], pads=[k // 2] * 4)]
    return _model(case, nodes, [_vi("X", ["N", w_shape[1] * group, 6, 6])], [_vi("Y", ["N", w_shape[0], 6, 6])],
                  inits, opset=21)


def _grouped_rtn(layer, bits: int, sym: bool, gs: int):
    """RTN on group-wise grids in the engine's layout (Conv: channels-last columns, groups stacked by rows):
    (new weight as consumers see it, LayerGrid)."""
    from onnxobc.engine.baselines import rtn_quantize
    from onnxobc.export import LayerGrid

    mats = layer.layout.to_matrices(layer.weight)
    perm = layer.layout.channels_last_perm(layer.weight.shape)
    work = mats if perm is None else mats[:, :, perm]
    qs, scales, zeros = [], [], []
    for m in work:
        q, g = rtn_quantize(m, bits, sym=sym, group_size=gs)
        qs.append(q)
        scales.append(g.scale)
        zeros.append(g.zero_point)
    new = np.stack(qs)
    if perm is not None:
        new = new[:, :, np.argsort(perm)]
    w_new = layer.layout.from_matrices(new, layer.weight.shape)
    return w_new, LayerGrid(np.concatenate(scales).astype(np.float32), np.concatenate(zeros), bits, sym, gs)


def _fake_and_blocked(model, bits: int, sym: bool, gs: int):
    import copy

    from onnxobc.export import GraphEdit, add_qdq_weight, write_back
    from onnxobc.graph import find_layers

    layers, _ = find_layers(model)
    fake, qdq = copy.deepcopy(model), copy.deepcopy(model)
    ef, eq, grids = GraphEdit(fake), GraphEdit(qdq), []
    for layer in layers:
        w_new, grid = _grouped_rtn(layer, bits, sym, gs)
        write_back(ef, layer, w_new)
        add_qdq_weight(eq, layer, w_new, grid)
        grids.append((layer, w_new, grid))
    ef.finish()
    eq.finish()
    return fake, qdq, grids


BLOCKED_DTYPES = {(8, False): TensorProto.UINT8, (8, True): TensorProto.INT8, (4, False): TensorProto.UINT4,
                  (3, True): TensorProto.INT4}


@pytest.mark.parametrize("bits,sym", list(BLOCKED_DTYPES), ids=["uint8", "int8", "uint4", "int4"])
@pytest.mark.parametrize("case,gs,axis", [("matmul", 16, 0), ("matmul", 8, 0), ("gemm_transB1", 16, 1),
                                          ("gemm_transB0", 12, 0), ("conv", 4, 1), ("conv_grouped", 2, 1),
                                          ("conv_1x1", 4, 1), ("matmul", 64, 0)])
def test_blocked_qdq_equals_fake_quant(case, gs, axis, bits, sym):
    model = _blocked_case(case)
    feed = graphs.make_feed(model, 4, seed=5)
    fake, qdq, grids = _fake_and_blocked(model, bits, sym, gs)
    onnx.checker.check_model(qdq, full_check=True)
    _assert_same_outputs(fake, qdq, feed)
    inits = {t.name: t for t in qdq.graph.initializer}
    (dq,) = _dq_nodes(qdq)
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": axis, "block_size": gs}
    q, s, z = (inits[i] for i in dq.input)
    assert q.data_type == z.data_type == BLOCKED_DTYPES[bits, sym]
    (layer, w_new, grid), = grids
    want = list(w_new.shape)
    want[axis] = -(-want[axis] // gs)
    assert list(s.dims) == list(z.dims) == want
    scale = numpy_helper.to_array(s)
    if case == "conv":  # (O, Cin/gs, kh, kw): block b of tap t is the engine's group t * (Cin/gs) + b
        np.testing.assert_array_equal(scale[3, 1, 2, 0], grid.scale[3, (2 * 3 + 0) * 2 + 1])
    if case == "matmul":  # (ceil(K/gs), N) = the grid transposed
        np.testing.assert_array_equal(scale, grid.scale.T)
    if sym:
        assert not numpy_helper.to_array(z).any()
    # the DequantizeLinear reproduces the engine's weights bit for bit (no graph optimisation involved)
    got = run(_dq_only(qdq, dq), {}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    np.testing.assert_array_equal(got, w_new)


def _dq_only(model, dq):
    """A graph that only runs ``dq`` on its initializers and returns the dequantized weight."""
    from onnx import helper

    inits = [t for t in model.graph.initializer if t.name in dq.input]
    g = helper.make_graph([dq], "dq", [], [helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None)],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("bits", [4, 8])
def test_blocked_qdq_full_optimisation(bits):
    """ORT 1.32 at ORT_ENABLE_ALL fuses blocked DequantizeLinear (axis 0, block_size a power of two >= 16) +
    MatMul into MatMulNBits with the session's ``session.qdq_matmulnbits_accuracy_level``, 4 by default (int8
    activations: ~0.5% output error). At accuracy level 0 the fused kernel computes in float: same outputs."""
    model = _blocked_case("matmul")
    feed = graphs.make_feed(model, 4, seed=6)
    fake, qdq, _ = _fake_and_blocked(model, bits, False, 16)
    ref = run(fake, feed)
    for level, tol in (("0", 1e-5), (None, 2e-2)):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if level is not None:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        got = ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)
        for x, y in zip(ref, got):
            assert np.linalg.norm(x - y) / np.linalg.norm(x) < tol


def test_blocked_qdq_opset_and_validation():
    from onnxobc.errors import NumericalError
    from onnxobc.export import GraphEdit, add_qdq_weight
    from onnxobc.export.qdq import codes_for, group_size_problem, required_opset
    from onnxobc.graph import find_layers

    assert required_opset(8) == 13 and required_opset(8, blocked=True) == 21 and required_opset(4) == 21
    old = graphs.matmul_3d()  # opset 17
    assert ensure_opset(old, 8, None) is old
    with pytest.raises(UsageError, match="group-wise.*opset >= 21"):
        ensure_opset(old, 8, None, blocked=True)
    assert ensure_opset(old, 8, 21, blocked=True).opset_import[0].version == 21
    (layer,), _ = (lambda r: ([r[0][0]], r[1]))(find_layers(old))
    w_new, grid = _grouped_rtn(layer, 8, False, 4)
    with pytest.raises(UsageError, match="opset >= 21"):
        add_qdq_weight(GraphEdit(old), layer, w_new, grid)
    # a Conv block must not straddle kernel taps
    conv = _blocked_case("conv")
    (clayer,), _ = find_layers(conv)
    assert group_size_problem(clayer, 4) is None and "straddle" in group_size_problem(clayer, 3)
    w_c, g_c = _grouped_rtn(clayer, 8, False, 3)
    with pytest.raises(UsageError, match="does not divide"):
        add_qdq_weight(GraphEdit(conv), clayer, w_c, g_c)
    (l1,), _ = find_layers(_blocked_case("conv_1x1"))
    assert group_size_problem(l1, 3) is None  # one tap: a partial last block is fine
    # off-grid weights are refused
    bad = w_new.copy()
    bad[0, 0] += grid.scale[0, 0] * 0.3
    with pytest.raises(NumericalError, match="not on their grid"):
        codes_for(bad, grid, axis=1, block_axis=0)
    with pytest.raises(ValueError, match="block"):
        codes_for(w_new, grid, axis=1)


@pytest.mark.parametrize("gs", [16, 32])
@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_matmulnbits_blocks_equal_fake_quant(gs, bits, sym):
    import copy

    from onnxobc.export import GraphEdit, write_back
    from onnxobc.export.matmulnbits import replace_with_matmulnbits
    from onnxobc.graph import find_layers

    model = _blocked_case("matmul")  # K = 40: a partial last block for both block sizes
    feed = graphs.make_feed(model, 4, seed=7)
    (layer,), _ = find_layers(model)
    w_new, grid = _grouped_rtn(layer, bits, sym, gs)
    fake, out = copy.deepcopy(model), copy.deepcopy(model)
    edit = GraphEdit(fake)
    write_back(edit, layer, w_new)
    edit.finish()
    edit = GraphEdit(out)
    replace_with_matmulnbits(edit, layer, w_new, grid)
    edit.finish()
    onnx.checker.check_model(out)
    (mnb,) = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in mnb.attribute}
    assert attrs["block_size"] == gs and attrs["K"] == 40 and attrs["N"] == 24
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    nb = -(-40 // gs)
    assert inits[mnb.input[1]].shape == (24, nb, gs // 2)
    np.testing.assert_array_equal(inits[mnb.input[2]], grid.scale.reshape(-1))  # the real per-block scales
    assert inits[mnb.input[3]].shape == (24 * -(-nb // 2),)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        for x, y in zip(run(fake, feed, level), run(out, feed, level)):
            assert np.linalg.norm(x - y) / np.linalg.norm(x) < 1e-5


@pytest.mark.parametrize("gs", [8, 24])
def test_matmulnbits_rejects_bad_block_size(gs):
    from onnxobc.export import GraphEdit
    from onnxobc.export.matmulnbits import replace_with_matmulnbits
    from onnxobc.graph import find_layers

    model = _blocked_case("matmul")
    (layer,), _ = find_layers(model)
    w_new, grid = _grouped_rtn(layer, 4, False, gs)
    with pytest.raises(ValueError, match="power of two >= 16"):
        replace_with_matmulnbits(GraphEdit(model), layer, w_new, grid)
