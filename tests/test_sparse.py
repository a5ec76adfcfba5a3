"""Sparse storage: pruned weights stored compactly, decoded by standard ops that ONNX Runtime folds away.

Every encoded model must give ONNX Runtime outputs identical to the dense model's, and the tensor ORT
folds back must be the original initializer bit for bit (checked on the session's optimized model).
"""
import os

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxobc import CompressConfig, compress
from onnxobc.export.sparse import sparse_encode

DISABLE, BASIC, ALL = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
DECODE_OPS = {"Div", "Mod", "CumSum", "ScatterElements", "ConstantOfShape", "Expand", "Where", "Gather", "Slice"}


# ---------------------------------------------------------------------------------------------------------
# models and pruning
# ---------------------------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits, opset=17, dtype=TensorProto.FLOAT):
    g = helper.make_graph(nodes, "sparse_test", [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, dtype, s) for n, s in outputs], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10, producer_name="t")
    m.metadata_props.add(key="note", value="kept")
    onnx.checker.check_model(m, full_check=True)
    return m


def mlp(w1, w2, opset=17):
    """X [N, K] -> MatMul W1 [K, H] -> Relu -> Gemm(B=W2 [O, H], transB=1) -> Y [N, O]."""
    b = numpy_helper.from_array(np.linspace(-0.1, 0.1, w2.shape[0]).astype(np.float32), "fc2.bias")
    nodes = [helper.make_node("MatMul", ["X", "fc1.weight"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["Y"], name="fc2", transB=1)]
    inits = [numpy_helper.from_array(w1, "fc1.weight"), numpy_helper.from_array(w2, "fc2.weight"), b]
    return _model(nodes, [("X", ["N", w1.shape[0]])], [("Y", ["N", w2.shape[0]])], inits, opset)


def conv(w, opset=17):
    """X [N, Cin, 10, 10] -> Conv W [Cout, Cin, 3, 3] (+ bias, same padding) -> Y."""
    b = numpy_helper.from_array(np.linspace(-0.1, 0.1, w.shape[0]).astype(np.float32), "conv.bias")
    nodes = [helper.make_node("Conv", ["X", "conv.weight", "conv.bias"], ["Y"], name="conv", pads=[1, 1, 1, 1])]
    return _model(nodes, [("X", ["N", w.shape[1], 10, 10])], [("Y", ["N", w.shape[0], 10, 10])],
                  [numpy_helper.from_array(w, "conv.weight"), b], opset)


def weights(seed, *shape, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)


def prune_random(w, sparsity, seed=0):
    w = w.copy()
    w[np.random.default_rng(seed).random(w.shape) < sparsity] = 0
    return w


def prune_nm(w, axis, n=2, m=4):
    """Keep the n largest of every m consecutive elements along ``axis``."""
    moved = np.moveaxis(w, axis, -1).copy()
    groups = moved.reshape(-1, m)
    drop = np.argsort(np.abs(groups), axis=1)[:, :m - n]
    np.put_along_axis(groups, drop, 0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def nm_holds(w, axis, n=2, m=4, zero=0):
    groups = np.moveaxis(np.asarray(w) != zero, axis, -1).reshape(-1, m)
    return bool((groups.sum(axis=1) <= n).all())


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------

def session(model, level, optimized=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def folded(model, tmp_path):
    """The session's optimized model at ORT_ENABLE_BASIC (what constant folding left)."""
    path = tmp_path / f"opt_{len(os.listdir(tmp_path))}.onnx"
    session(model, BASIC, path)
    return onnx.load(str(path))


def init_bytes(model, name):
    t = next(t for t in model.graph.initializer if t.name == name)
    return t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes()


def check_encoded(dense, enc, report, feed, tmp_path):
    """Valid model, identical outputs, decode folded away, folded tensors bit-identical, same interface."""
    onnx.checker.check_model(enc, full_check=True)
    assert [(o.domain, o.version) for o in enc.opset_import] == [(o.domain, o.version) for o in dense.opset_import]
    assert enc.graph.input == dense.graph.input and enc.graph.output == dense.graph.output
    assert enc.metadata_props == dense.metadata_props and enc.ir_version == dense.ir_version
    names = [n.name for n in enc.graph.node]
    assert len(names) == len(set(names)) and all(names)
    for r in report:
        decoders = [n for n in enc.graph.node if n.name.startswith(r["name"] + "/sparse")]
        assert decoders and sum(r["name"] in n.output for n in enc.graph.node) == 1
        assert r["name"] not in {t.name for t in enc.graph.initializer}
    # small batches: with ORT_DISABLE_ALL the decoded weight is not a constant, and ORT prepacks only
    # constant MatMul/Gemm weights, whose summation order can differ for large products
    for level in (DISABLE, ALL):
        for x, y in zip(session(dense, level).run(None, feed), session(enc, level).run(None, feed)):
            assert x.dtype == y.dtype and np.array_equal(x, y), level
    opt = folded(enc, tmp_path)
    left = {n.op_type for n in opt.graph.node if n.name.split("/sparse")[0] in {r["name"] for r in report}}
    assert not left, f"decode nodes not folded: {left}"
    assert not DECODE_OPS & {n.op_type for n in opt.graph.node} - {n.op_type for n in dense.graph.node}
    for r in report:
        assert init_bytes(opt, r["name"]) == init_bytes(dense, r["name"]), r["name"]
    return opt


def encode(model, **kw):
    before = model.SerializeToString()
    enc, report = sparse_encode(model, **kw)
    assert model.SerializeToString() == before, "the input model was modified"
    return enc, report, len(before), enc.ByteSize()


def feed_for(model, n=4, seed=0):
    return graphs.make_feed(model, n, seed=seed)


# ---------------------------------------------------------------------------------------------------------
# float weights
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_float(sparsity, tmp_path):
    w1, w2, wc = weights(1, 64, 48), weights(2, 32, 48), weights(3, 16, 8, 3, 3)
    for dense in (mlp(prune_random(w1, sparsity, 1), prune_random(w2, sparsity, 2)),
                  conv(prune_random(wc, sparsity, 3))):
        enc, report, before, after = encode(dense)
        check_encoded(dense, enc, report, feed_for(dense), tmp_path)
        names = {t.name for t in dense.graph.initializer if t.name.endswith(".weight")}
        assert {r["name"] for r in report} == names
        assert all(r["encoding"] == "bitmask" and r["bytes_after"] < r["bytes_before"] for r in report)
        # 32 bits per non-zero + 1 bit per weight, plus under 1 kB of decode nodes and constants per tensor
        assert after < before * (1 - sparsity + 1 / 32 + 0.02) + 1000 * len(report), (sparsity, after / before)


def test_2of4_float_uses_nm_along_the_reduction_axis(tmp_path):
    w1 = prune_nm(weights(1, 64, 48), axis=0)  # MatMul B [K, N]: groups along K
    w2 = prune_nm(weights(2, 32, 48), axis=1)  # Gemm transB=1 B [N, K]: along K
    wc = prune_nm(weights(3, 16, 8, 3, 3), axis=1)  # Conv: along Cin at each tap
    for dense, expect in ((mlp(w1, w2), {"fc1.weight": 0, "fc2.weight": 1}), (conv(wc), {"conv.weight": 1})):
        enc, report, before, after = encode(dense)
        opt = check_encoded(dense, enc, report, feed_for(dense), tmp_path)
        assert {r["name"]: (r["encoding"], r["axis"]) for r in report} == {k: ("nm 2:4", a) for k, a in expect.items()}
        for name, axis in expect.items():
            assert nm_holds(numpy_helper.to_array(next(t for t in opt.graph.initializer if t.name == name)), axis)
        # 2 of 4 values + 2.67 bits of pattern per 4 weights, plus under 1 kB of decode per tensor
        assert after < before * (0.5 + 2.67 / 128 + 0.02) + 1000 * len(report), after / before


def test_nm_beats_bitmask_and_ragged_tails(tmp_path):
    """Group counts not a multiple of 3 (pattern bytes end in a partial byte) and element counts not a multiple
    of 8 (partial mask byte) decode exactly; 1:4 uses the N:M encoding too."""
    w = prune_nm(weights(4, 256, 49), axis=0)  # 64 * 49 groups, 3136 % 3 == 1
    odd = prune_random(weights(5, 37, 29), 0.6)  # 1073 elements
    m14 = prune_nm(weights(6, 32, 64), axis=1, n=1)
    nodes = [helper.make_node("MatMul", ["X", "a"], ["h"], name="mm_a"),
             helper.make_node("MatMul", ["X2", "odd"], ["h2"], name="mm_odd"),
             helper.make_node("Gemm", ["X3", "m14"], ["h3"], name="gemm_m14", transB=1)]
    dense = _model(nodes, [("X", ["N", 256]), ("X2", ["N", 37]), ("X3", ["N", 64])],
                   [("h", ["N", 49]), ("h2", ["N", 29]), ("h3", ["N", 32])],
                   [numpy_helper.from_array(w, "a"), numpy_helper.from_array(odd, "odd"),
                    numpy_helper.from_array(m14, "m14")])
    enc, report, _, _ = encode(dense)
    check_encoded(dense, enc, report, feed_for(dense), tmp_path)
    got = {r["name"]: r["encoding"] for r in report}
    assert got == {"a": "nm 2:4", "odd": "bitmask", "m14": "nm 1:4"}
    ops = [n.op_type for n in enc.graph.node]
    assert ops.count("Slice") == 2  # both ragged tails exercised


def test_float16_and_negative_zero_are_bit_exact(tmp_path):
    w = prune_random(weights(7, 64, 48), 0.6).astype(np.float16)
    w[0, :8] = np.float16(-0.0)  # -0.0 is a value, not a zero: it must come back with its sign
    w[1, :4] = np.float16(np.inf)
    nodes = [helper.make_node("MatMul", ["X", "w"], ["Y"], name="mm")]
    dense = _model(nodes, [("X", ["N", 64])], [("Y", ["N", 48])], [numpy_helper.from_array(w, "w")],
                   dtype=TensorProto.FLOAT16)
    enc, report, _, _ = encode(dense)
    opt = check_encoded(dense, enc, report, feed_for(dense), tmp_path)
    assert [r["dtype"] for r in report] == ["float16"]
    back = numpy_helper.to_array(next(t for t in opt.graph.initializer if t.name == "w"))
    assert np.signbit(back[0, :8]).all()


def test_dense_small_and_low_sparsity_left_alone():
    w1 = prune_random(weights(1, 64, 48), 0.1)  # 10% zeros < min_sparsity
    w2 = weights(2, 32, 48)  # dense
    dense = mlp(w1, w2)
    enc, report, _, _ = encode(dense)
    assert report == [] and enc.SerializeToString() == dense.SerializeToString()
    small = conv(prune_random(weights(3, 2, 8, 3, 3), 0.9))  # 144 elements < min_elements
    assert encode(small)[1] == []
    assert encode(small, min_elements=100)[1] == []  # eligible, but the decode would outweigh the savings
    sparse = conv(prune_random(weights(3, 16, 8, 3, 3), 0.9))
    assert encode(sparse, min_elements=2000)[1] == []
    assert [r["name"] for r in encode(sparse)[1]] == ["conv.weight"]
    enc, report, _, _ = encode(dense, min_sparsity=0.05)
    assert [r["name"] for r in report] == ["fc1.weight"]


def test_opset_too_old_and_bad_arguments():
    dense = mlp(prune_nm(weights(1, 64, 48), 0), prune_nm(weights(2, 32, 48), 1), opset=10)
    enc, report, _, _ = encode(dense)
    assert report == [] and enc.SerializeToString() == dense.SerializeToString()
    with pytest.raises(ValueError):
        sparse_encode(dense, min_sparsity=1.5)
    with pytest.raises(ValueError):
        sparse_encode(dense, min_elements=0)


def test_opset_11_is_enough(tmp_path):
    dense = mlp(prune_nm(weights(1, 64, 48), 0), prune_random(weights(2, 32, 48), 0.5), opset=11)
    enc, report, _, _ = encode(dense)
    check_encoded(dense, enc, report, feed_for(dense), tmp_path)
    assert {r["encoding"] for r in report} == {"nm 2:4", "bitmask"}


def test_names_stay_unique_when_taken():
    dense = mlp(prune_random(weights(1, 64, 48), 0.5), prune_random(weights(2, 32, 48), 0.5))
    # occupy the names the encoder would pick first
    taken = ["sp0", "sp1", "fc1.weight/sparse0", "fc1.weight/sparse_mask", "sparse/pow2_i32"]
    for i, name in enumerate(taken):
        dense.graph.node.append(helper.make_node("Identity", ["Y"], [f"{name}_o"], name=name))
        dense.graph.output.append(helper.make_tensor_value_info(f"{name}_o", TensorProto.FLOAT, ["N", 32]))
    dense.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "fc1.weight/sparse_mask"))
    dense.graph.node.append(helper.make_node("Identity", ["fc1.weight/sparse_mask"], ["sp1"], name="keep_sp1"))
    dense.graph.output.append(helper.make_tensor_value_info("sp1", TensorProto.FLOAT, [1]))
    enc, report, _, _ = encode(dense)
    onnx.checker.check_model(enc, full_check=True)
    assert len(report) == 2
    nodes = [n.name for n in enc.graph.node]
    assert len(nodes) == len(set(nodes))
    outs = [o for n in enc.graph.node for o in n.output] + [t.name for t in enc.graph.initializer]
    assert len(outs) == len(set(outs))
    feed = feed_for(dense)
    for x, y in zip(session(dense, ALL).run(None, feed), session(enc, ALL).run(None, feed)):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------------------------------------------------
# quantized (QDQ) code tensors
# ---------------------------------------------------------------------------------------------------------

def _qdq(dense, **cfg):
    feed = feed_for(dense, 16, seed=1)
    return compress(dense, None, [feed], CompressConfig(method="magnitude", qdq=True, **cfg)).extra["model"]


def _codes(model):
    return {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}


@pytest.fixture(scope="module")
def dense21():
    return mlp(weights(1, 256, 128), weights(2, 64, 128), opset=21), conv(weights(3, 64, 32, 3, 3), opset=21)


@pytest.mark.parametrize("sym", [False, True])
def test_2of4_w4_qdq(dense21, sym, tmp_path):
    """uint4 codes with per-channel zero points (asymmetric) and int4 codes with zero point 0 (symmetric)."""
    for dense in dense21:
        q = _qdq(dense, nm=(2, 4), bits=4, sym=sym)
        enc, report, before, after = encode(q)
        opt = check_encoded(q, enc, report, feed_for(q), tmp_path)
        codes = _codes(q)
        assert {r["name"] for r in report} == set(codes)
        assert {r["dtype"] for r in report} == {"int4" if sym else "uint4"}
        assert {r["encoding"] for r in report} == {"nm 2:4"}
        stored = {t.name: t.data_type for t in enc.graph.initializer}
        for r in report:  # the kept codes stay in 4-bit storage, two per byte
            assert stored[r["name"] + "/sparse_values"] == (TensorProto.INT4 if sym else TensorProto.UINT4)
        for r in report:
            dq = codes[r["name"]]
            zp = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == dq.input[2])).astype(int)
            c = numpy_helper.to_array(next(t for t in opt.graph.initializer if t.name == r["name"])).astype(int)
            axis = helper.get_attribute_value(dq.attribute[0]) if dq.attribute else 1
            shape = [1] * c.ndim
            shape[axis] = -1
            assert nm_holds(c - zp.reshape(shape), r["axis"])
        # dense float: 32 bits per weight; 2:4 W4: 2 x 4 bits + 2.67 bits of pattern per 4 weights (+ scales,
        # zero points, decode nodes on these tiny layers)
        ratio = dense.ByteSize() / after
        assert ratio > 4.5, ratio
        assert after < 0.85 * before


def test_w8_qdq_unstructured_per_channel_and_symmetric(tmp_path):
    dense = mlp(weights(1, 256, 128), weights(2, 64, 128), opset=17)
    for sym in (False, True):
        q = _qdq(dense, sparsity=0.6, bits=8, sym=sym)
        enc, report, before, after = encode(q)
        check_encoded(q, enc, report, feed_for(q), tmp_path)
        assert {r["name"] for r in report} == set(_codes(q))
        assert {r["dtype"] for r in report} == {"int8" if sym else "uint8"}
        assert {r["encoding"] for r in report} == {"bitmask"}
        assert after < 0.75 * before


def test_zero_points_along_the_group_axis(tmp_path):
    """Hand-made QDQ weight whose per-axis zero points run along the N:M group axis (DQ axis 0 of B [K, N])."""
    rng = np.random.default_rng(0)
    zp = rng.integers(100, 156, size=64).astype(np.uint8)
    codes = rng.integers(0, 256, size=(64, 48)).astype(np.uint8)
    keep = prune_nm(rng.random((64, 48)) + 1, axis=0) != 0
    codes = np.where(keep, codes, zp[:, None]).astype(np.uint8)
    scale = np.full(64, 0.01, np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["codes", "scale", "zp"], ["w"], name="dq", axis=0),
             helper.make_node("MatMul", ["X", "w"], ["Y"], name="mm")]
    dense = _model(nodes, [("X", ["N", 64])], [("Y", ["N", 48])],
                   [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scale, "scale"),
                    numpy_helper.from_array(zp, "zp")], opset=13)
    enc, report, _, _ = encode(dense)
    check_encoded(dense, enc, report, feed_for(dense), tmp_path)
    assert [(r["encoding"], r["axis"]) for r in report] == [("nm 2:4", 0)]


def test_code_tensors_not_read_by_dequantize_are_left_alone():
    w = np.zeros((64, 48), np.uint8)
    nodes = [helper.make_node("Cast", ["w"], ["wf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["X", "wf"], ["Y"], name="mm")]
    dense = _model(nodes, [("X", ["N", 64])], [("Y", ["N", 48])], [numpy_helper.from_array(w, "w")])
    assert encode(dense)[1] == []


def test_bert_like_2of4_from_compress(tmp_path):
    """A transformer block pruned 2:4 by onnxobc: the FFN weights (MatMul B [K, N]) use N:M along K; the
    16 x 16 attention weights are too small for the decode nodes to pay off and stay dense."""
    dense = graphs.BUILDERS["bert_like"]()
    feed = feed_for(dense, 4)
    pruned = compress(dense, None, [feed], CompressConfig(method="magnitude", nm=(2, 4))).extra["model"]
    enc, report, before, after = encode(pruned, min_elements=128)
    check_encoded(pruned, enc, report, feed, tmp_path)
    assert {r["name"]: (r["encoding"], r["axis"]) for r in report} == {
        "ffn.fc1.weight": ("nm 2:4", 0), "ffn.fc2.weight": ("nm 2:4", 0)}
    assert after < before


def test_cli_sparse_storage_end_to_end(tmp_path):
    """`compress --sparse-storage`: smaller file, same outputs as the plain compressed model."""
    from onnxobc.cli import main

    model = graphs.bert_like()
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    feed = graphs.make_feed(model, 8)
    np.savez(tmp_path / "c.npz", **feed)
    plain, packed = tmp_path / "plain.onnx", tmp_path / "packed.onnx"
    base = ["compress", str(p), "--calib", str(tmp_path / "c.npz"), "--nm", "2:4", "-q"]
    assert main(base + ["-o", str(plain)]) == 0
    assert main(base + ["-o", str(packed), "--sparse-storage", "--verify"]) == 0
    assert packed.stat().st_size < plain.stat().st_size
    a = ort.InferenceSession(str(plain)).run(None, feed)
    b = ort.InferenceSession(str(packed)).run(None, feed)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_constant_node_weights_are_encoded(tmp_path):
    """Paddle-style exports keep weights in Constant nodes (compression writes them in place): a sparse one is
    moved to an initializer and encoded; a dense one stays a Constant node."""
    w1 = prune_random(weights(1, 64, 48), 0.5, 1)
    w2 = weights(2, 48, 32)
    nodes = [helper.make_node("Constant", [], ["w1"], name="c1", value=numpy_helper.from_array(w1, "t1")),
             helper.make_node("Constant", [], ["w2"], name="c2", value=numpy_helper.from_array(w2, "t2")),
             helper.make_node("MatMul", ["X", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["Y"], name="fc2")]
    dense = _model(nodes, [("X", ["N", 64])], [("Y", ["N", 32])], [])
    enc, report, before, after = encode(dense)
    assert [r["name"] for r in report] == ["w1"] and after < before * 0.75
    onnx.checker.check_model(enc, full_check=True)
    assert [n.name for n in enc.graph.node if n.op_type == "Constant"] == ["c2"]
    feed = feed_for(dense)
    for level in (DISABLE, ALL):
        for x, y in zip(session(dense, level).run(None, feed), session(enc, level).run(None, feed)):
            assert np.array_equal(x, y), level
    old = dense.__class__()
    old.CopyFrom(dense)
    old.ir_version = 3  # initializers must also be graph inputs before IR 4: left alone
    assert sparse_encode(old)[1] == []
