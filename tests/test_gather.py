"""Gather on a constant table (embeddings) as a layer kind without Hessian (issue 13)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxobc import CompressConfig, compress
from onnxobc.calibrate.hessian import collect_hessians
from onnxobc.export.cost import tensor_data_bytes
from onnxobc.graph import find_layers

V, D, H = 40, 16, 8


def _embed(tied: bool = False, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    emb = numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed", axis=0),
        helper.make_node("Shape", ["ids"], ["shp"], name="shape"),  # a Gather on computed data: no candidate
        helper.make_node("Gather", ["shp", "zero"], ["n"], name="batch_dim", axis=0),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", H]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [])]
    inits = [emb, w, numpy_helper.from_array(np.array(0, np.int64), "zero")]
    if tied:
        nodes += [helper.make_node("Transpose", ["emb"], ["embT"], name="tie_T", perm=[1, 0]),
                  helper.make_node("MatMul", ["e", "embT"], ["logits"], name="lm_head")]
        outs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", V]))
    g = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
                          outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _feed(n=6, s=5, seed=0):
    # a skewed vocabulary use: low ids are frequent, the top quarter never appears
    rng = np.random.default_rng(seed)
    return {"ids": np.minimum(rng.geometric(0.12, size=(n, s)) - 1, 3 * V // 4 - 1).astype(np.int64)}


def _run(m, feed):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_found_with_its_row_counts():
    m = _embed()
    layers, skipped = find_layers(m)
    by = {l.name: l for l in layers}
    assert set(by) == {"embed", "proj"}
    lay = by["embed"]
    assert (lay.op, lay.groups, lay.rows, lay.cols) == ("Gather", 1, V, D)
    assert "batch_dim" not in {s.node_name for s in skipped}  # Gathers on shapes are not candidates
    feeds = [_feed(seed=1), _feed(seed=2)]
    st = collect_hessians(m, layers, feeds)["embed"]
    want = sum(np.bincount(f["ids"].ravel(), minlength=V) for f in feeds)
    np.testing.assert_array_equal(st.row_counts, want)
    assert st.xtx.size == 0 and st.samples == 12


def test_4bit_rtn_per_row_with_count_weighted_error():
    m = _embed()
    feed = _feed(16)
    r = compress(m, None, [feed], CompressConfig(bits=4))  # method exact: a lookup takes RTN per row
    rep = {l.name: l for l in r.layers}["embed"]
    assert rep.op == "Gather" and rep.method.startswith("rtn") and "lookup table" in rep.note
    out = r.extra["model"]
    w0 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "emb")).astype(np.float64)
    w1 = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "emb")).astype(np.float64)
    assert all(len(np.unique(row)) <= 16 for row in w1) and not np.array_equal(w0, w1)
    counts = np.bincount(feed["ids"].ravel(), minlength=V)
    want = counts @ ((w1 - w0) ** 2).sum(1) / (counts @ (w0 ** 2).sum(1))
    assert rep.error == pytest.approx(want, rel=1e-5)
    # the lookup's output error is exactly the selected rows' weight error
    e0, e1 = _run(m, feed)[0], _run(out, feed)[0]
    assert np.all(np.isfinite(e1)) and 0 < np.linalg.norm(e1 - e0) / np.linalg.norm(e0) < 0.2


@pytest.mark.parametrize("cfg", [dict(bits=8), dict(bits=4, opset=21), dict(bits=4, group_size=8, opset=21)],
                         ids=["int8", "int4", "int4-g8"])
def test_qdq_table_before_the_gather(cfg):
    m = _embed()
    feed = _feed(16)
    # only the table: ONNX Runtime turns an 8-bit DQ -> MatMul into its own MatMulNBits, which is not bit exact
    fake = compress(m, None, [feed], CompressConfig(include="embed", **{k: v for k, v in cfg.items()
                                                                         if k != "opset"})).extra["model"]
    r = compress(m, None, [feed], CompressConfig(qdq=True, include="embed", **cfg))
    q = r.extra["model"]
    onnx.checker.check_model(q, full_check=True)
    gather = next(n for n in q.graph.node if n.name == "embed")
    dq = next(n for n in q.graph.node if gather.input[0] in n.output)
    assert dq.op_type == "DequantizeLinear"
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    assert axis == (1 if cfg.get("group_size") else 0)  # per row, or blocks along D
    inits = {t.name: t for t in q.graph.initializer}
    assert inits[dq.input[0]].data_type in (TensorProto.UINT8, TensorProto.UINT4)
    assert "emb" not in inits  # no float copy of the table is left
    for a, b in zip(_run(fake, feed), _run(q, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    kept = sum(tensor_data_bytes(t) for t in m.graph.initializer if t.name != "emb")
    written = sum(tensor_data_bytes(t) for t in q.graph.initializer)
    assert written - kept == sum(l.cost["bytes"] for l in r.layers)


@pytest.mark.parametrize("cfg", [dict(bits=8), dict(bits=4, qdq=True, opset=21), dict(bits=4, qdq=True, opset=21,
                                                                                    group_size=4),
                                 dict(sparsity=0.5)], ids=["float8", "qdq4", "qdq4g4", "s50"])
def test_tied_embedding_is_compressed_once_and_the_gather_reads_it(cfg):
    m = _embed(tied=True)
    layers, skipped = find_layers(m)
    reasons = {s.node_name: s.reason for s in skipped}
    assert "tied embedding" in reasons["embed"]
    assert "lm_head" in {l.name for l in layers}
    feed = _feed(8)
    r = compress(m, None, [feed], CompressConfig(**cfg))
    out = r.extra["model"]
    onnx.checker.check_model(out, full_check=True)
    assert {l.name for l in r.layers} == {"proj", "lm_head"}
    assert "the tied Gather embed reads this compressed weight" in next(l.written for l in r.layers if l.name == "lm_head")
    assert "emb" not in {t.name for t in out.graph.initializer}  # stored once: the original table is gone
    # the Gather's rows are the head's compressed weight, transposed back to the table's orientation
    gather = next(n for n in out.graph.node if n.name == "embed")
    head = next(n for n in out.graph.node if n.name == "lm_head")
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                               for t in (gather.input[0], head.input[1], gather.output[0])])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    *ys, table, w_head, e = sess.run(None, feed)
    emb0 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "emb"))
    assert table.shape == emb0.shape and np.array_equal(table, w_head.T)
    assert not np.array_equal(table, emb0)  # compressed, not the original
    np.testing.assert_array_equal(e, table[feed["ids"]])
    assert all(np.all(np.isfinite(y)) for y in ys)


def test_tied_embedding_with_matmulnbits_keeps_the_table_and_says_so():
    m = _embed(tied=True)
    r = compress(m, None, [_feed(8)], CompressConfig(bits=4, matmulnbits=True))
    out = r.extra["model"]
    assert "keeps the original table (MatMulNBits packs the weight)" in next(
        l.written for l in r.layers if l.name == "lm_head")
    emb0 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "emb"))
    assert np.array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "emb")), emb0)
    _run(out, _feed(8))


def test_gather_along_axis_1_is_skipped_with_its_reason():
    m = _embed()
    m.graph.node[0].attribute[0].i = 1
    m.graph.node[0].input[1] = "ids"
    layers, skipped = find_layers(m)
    assert "embed" not in {l.name for l in layers}
    assert "axis 1" in {s.node_name: s.reason for s in skipped}["embed"]


def test_size_target_allocates_the_table_too():
    m = _embed()
    feed = _feed(16)
    r = compress(m, None, [feed], CompressConfig(target_size=0.3, qdq=True, opset=21))
    rep = {l.name: l for l in r.layers}
    assert rep["embed"].bits is not None and "lookup table" in rep["embed"].note
    assert r.cost["bytes"] <= 0.3 * r.cost["dense_bytes"]
    ys = _run(r.extra["model"], feed)
    assert all(np.all(np.isfinite(y)) for y in ys)


@pytest.mark.parametrize("cfg,dense", [(dict(block_size=4, sparsity=0.5), True),
                                       (dict(block_size=4, sparsity=0.5, bits=4), False)])
def test_block_sparsity_is_not_offered_for_a_table(cfg, dense):
    m = _embed()
    r = compress(m, None, [_feed(16)], CompressConfig(include="embed", **cfg))
    (rep,) = r.layers
    assert (rep.method == "dense") == dense
    assert "block sparsity is not implemented for a lookup table" in rep.note
    assert rep.sparsity < 0.2


def test_row_counts_negative_and_out_of_range_indices():
    from onnxobc.errors import CalibrationError
    from onnxobc.graph.adapters import OpLayout

    lay = OpLayout("Gather", {})
    np.testing.assert_array_equal(lay.row_counts(np.array([[0, -1], [3, 3]], np.int32), (4, 2)), [1, 0, 0, 3])
    with pytest.raises(CalibrationError, match="out of range"):
        lay.row_counts(np.array([4]), (4, 2))
    with pytest.raises(CalibrationError, match="integers"):
        lay.row_counts(np.array([0.5]), (4, 2))
