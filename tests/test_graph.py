"""Layer discovery on every fixture layout, and round trips through the compressor's write-back."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.export import save_model_atomic
from onnxobc.graph import find_layers, load_model

# Policy differences from the fixture's neutral EXPECTED (documented in the README):
# a weight also read as plain data by another node is skipped, not compressed.
POLICY_SKIPPED = {"shared_weight_mixed": {"matmul": "also used by Add"}}


def run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


@pytest.mark.parametrize("case", sorted(graphs.BUILDERS))
def test_find_layers_matches_expected(case):
    model = graphs.BUILDERS[case]()
    layers, skipped = find_layers(model)
    exp = graphs.EXPECTED[case]
    got = {}
    for l in layers:
        for c in l.consumers:
            got[c.node_name] = (l.op, l.groups * l.rows, l.cols, l.groups)
    exp_layers = {k: v for k, v in exp["layers"].items() if k not in POLICY_SKIPPED.get(case, {})}
    assert got == exp_layers
    reasons = {s.node_name: s.reason for s in skipped}
    for name, keyword in {**exp["skipped"], **POLICY_SKIPPED.get(case, {})}.items():
        assert name in reasons, f"{name} not reported as skipped"
        assert keyword in reasons[name]


def test_shared_weight_is_one_layer():
    layers, _ = find_layers(graphs.shared_weight())
    assert len(layers) == 1 and [c.node_name for c in layers[0].consumers] == ["matmul_1", "matmul_2"]


def _all_cases_with_layers():
    return [c for c in sorted(graphs.BUILDERS) if find_layers(graphs.BUILDERS[c]())[0]]


@pytest.mark.parametrize("case", _all_cases_with_layers())
def test_nothing_compressed_reproduces_outputs_exactly(case):
    model = graphs.BUILDERS[case]()
    before = model.SerializeToString()
    feed = graphs.make_feed(model, 4, seed=1)
    res = compress(model, None, [feed], CompressConfig(method="magnitude", sparsity=0.0))
    out = res.extra["model"]
    assert model.SerializeToString() == before, "input model was modified"
    for a, b in zip(run(model, feed), run(out, feed)):
        np.testing.assert_array_equal(a, b)
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert list(out.opset_import) == list(model.opset_import)


@pytest.mark.parametrize("case", _all_cases_with_layers())
@pytest.mark.parametrize("cfg", [dict(method="magnitude", sparsity=0.5), dict(method="rtn", bits=3)],
                         ids=["mag50", "rtn3"])
def test_compressed_model_runs_and_holds_the_compressed_weights(case, cfg):
    model = graphs.BUILDERS[case]()
    feed = graphs.make_feed(model, 4, seed=2)
    res = compress(model, None, [feed], CompressConfig(**cfg))
    out = res.extra["model"]
    onnx.checker.check_model(out, full_check=True)
    outs = run(out, feed)
    assert all(np.all(np.isfinite(o)) for o in outs if o.dtype.kind == "f")
    new_layers, _ = find_layers(out)
    by_name = {l.name: l for l in new_layers}
    for rep in res.layers:
        w = by_name[rep.name].weight
        if "sparsity" in cfg:
            assert np.mean(w == 0) == pytest.approx(0.5, abs=0.5 / w.size + 1e-9)
        else:
            mats = by_name[rep.name].layout.to_matrices(w.astype(np.float32))
            for m in mats:
                for row in m:
                    assert len(np.unique(row)) <= 8  # 3 bits
        assert rep.error > 0


def test_chain_rewritten_in_place_keeps_dtype_and_names():
    model = graphs.weight_through_cast()
    feed = graphs.make_feed(model, 3)
    res = compress(model, None, [feed], CompressConfig(method="magnitude", sparsity=0.5))
    out = res.extra["model"]
    src = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert src and res.layers[0].written == "in place"
    new = {t.name: t for t in out.graph.initializer}
    assert new[src[0].name].data_type == onnx.TensorProto.FLOAT16
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def test_transpose_chain_inverted():
    model = graphs.weight_chain()
    feed = graphs.make_feed(model, 3)
    res = compress(model, None, [feed], CompressConfig(method="magnitude", sparsity=0.5))
    out = res.extra["model"]
    (layer,) = find_layers(out)[0]
    assert layer.chain and layer.source_kind == "constant"
    assert np.mean(layer.weight == 0) == 0.5


def test_source_with_other_users_gets_a_private_copy():
    """A chain whose source also feeds something else: the consumer gets a new initializer."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["X", "Wt"], ["Y"], name="mm"),
             helper.make_node("ReduceSum", ["W"], ["S"], name="sum", keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", 8]),
                           helper.make_tensor_value_info("S", onnx.TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(W, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    feed = {"X": rng.standard_normal((5, 6)).astype(np.float32)}
    res = compress(model, None, [feed], CompressConfig(method="magnitude", sparsity=0.5))
    out = res.extra["model"]
    assert res.layers[0].written.startswith("new initializer")
    y0, s0 = run(model, feed)
    y1, s1 = run(out, feed)
    np.testing.assert_array_equal(s0, s1)  # the other user still sees the dense weight
    assert not np.allclose(y0, y1)
    assert "t" not in [n.name for n in out.graph.node]  # the orphaned Transpose is gone


def test_external_data_load_and_save(tmp_path):
    model = graphs.mixed_cnn()
    path = tmp_path / "ext.onnx"
    graphs.save_with_external_data(model, path)
    loaded = load_model(path)
    feed = graphs.make_feed(model, 2)
    res = compress(path, tmp_path / "out.onnx", [feed], CompressConfig(method="magnitude", sparsity=0.3))
    assert (tmp_path / "out.onnx").exists()
    run(onnx.load(str(tmp_path / "out.onnx")), feed)
    assert len(res.layers) == 4 and loaded.graph.initializer
    # forced external data on save (what >2 GB outputs get automatically)
    written = save_model_atomic(copy.deepcopy(res.extra["model"]), tmp_path / "big.onnx", external_data=True)
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    a = run(onnx.load(str(tmp_path / "big.onnx")), feed)
    b = run(res.extra["model"], feed)
    np.testing.assert_array_equal(a[0], b[0])
    assert not list(tmp_path.glob(".onnxobc-*")), "temporary folder left behind"


def test_metadata_and_doc_strings_survive(tmp_path):
    model = graphs.mixed_cnn()
    onnx.helper.set_model_props(model, {"labels": '["a", "b"]', "author": "me"})
    model.doc_string = "my model"
    model.graph.doc_string = "graph doc"
    feed = graphs.make_feed(model, 2)
    compress(model, tmp_path / "o.onnx", [feed], CompressConfig(method="rtn", bits=8))
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert {p.key: p.value for p in out.metadata_props} == {"labels": '["a", "b"]', "author": "me"}
    assert out.doc_string == "my model" and out.graph.doc_string == "graph doc"
