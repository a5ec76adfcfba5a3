"""ConvTranspose as a layer kind: its columns, its Hessian, compression and storage (issue 13)."""
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.calibrate.hessian import collect_hessians
from onnxobc.export.cost import tensor_data_bytes
from onnxobc.graph import find_layers
from onnxobc.graph.adapters import OpLayout


def _single(w, attrs, opset=17):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", **attrs)
    g = helper.make_graph([node], "ct", [helper.make_tensor_value_info("x", 1, None)],
                          [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


GEOMETRIES = [
    ((2, 4, 5, 6), (4, 3, 3, 3), dict(strides=[2, 2], output_padding=[1, 1], group=2, pads=[1, 0, 0, 1])),
    ((2, 4, 7), (4, 3, 3), dict(strides=[3], dilations=[2], pads=[1, 2])),
    ((2, 3, 7), (3, 2, 4), dict(strides=[2], output_padding=[1])),
    ((1, 4, 3, 4, 5), (4, 2, 2, 3, 2), dict(strides=[2, 1, 2], group=2)),
    ((2, 4, 5, 6), (4, 3, 3, 3), dict(strides=[2, 2], output_shape=[10, 12])),
    ((2, 4, 5, 6), (4, 3, 2, 2), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    ((2, 4, 5, 6), (4, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    ((2, 4, 5, 6), (4, 3, 3, 3), dict(strides=[2, 2], auto_pad="VALID", dilations=[2, 1])),
    ((2, 6, 4, 4), (6, 1, 3, 3), dict(strides=[2, 2], group=6, pads=[1, 1, 1, 1], output_padding=[1, 1])),
]


@pytest.mark.parametrize("xs,ws,attrs", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
def test_columns_times_matrices_reproduce_the_node(xs, ws, attrs):
    """W' X (the adapter's matrices times its unfolded columns) is the node's output, as ONNX Runtime computes it
    (and the reference evaluator, where it handles the case: group 1, no output_shape)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(ws).astype(np.float32)
    x = rng.standard_normal(xs).astype(np.float32)
    model = _single(w, attrs)
    y = _ort(model, {"x": x})[0]
    if attrs.get("group", 1) == 1 and "output_shape" not in attrs:  # what onnx.reference handles
        np.testing.assert_allclose(ReferenceEvaluator(model).run(None, {"x": x})[0], y, rtol=1e-5, atol=1e-5)
    lay = OpLayout("ConvTranspose", attrs)
    mats = lay.to_matrices(w.astype(np.float64))
    assert mats.shape == lay.matrix_shape(ws)
    np.testing.assert_array_equal(lay.from_matrices(mats, ws), w)
    cols = lay.unfold_samples(x, ws)
    got = np.einsum("grc,bgcp->bgrp", mats, cols).reshape(y.shape)
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    assert lay.positions_per_sample(xs, ws) == np.prod(y.shape[2:])
    # unfold (all samples as columns) is the same columns
    assert np.array_equal(lay.unfold(x, ws), cols.transpose(1, 2, 0, 3).reshape(cols.shape[1], cols.shape[2], -1))


def _probe_columns(x, ws, attrs):
    """Columns found from the reference evaluator alone: output channel 0 of group j with a one-hot weight
    W[ci, 0, t] = 1 is exactly the column entry (ci, t) of that group at every output position (the output is
    linear in W). Each group is run as a group-1 ConvTranspose on its own input channels."""
    g = attrs.get("group", 1)
    one = {k: v for k, v in attrs.items() if k != "group"}
    cin_g, taps = ws[0] // g, list(itertools.product(*[range(k) for k in ws[2:]]))
    out = []
    for j in range(g):
        xj = x[:, j * cin_g:(j + 1) * cin_g]
        rows = []
        for ci in range(cin_g):
            for t in taps:
                w = np.zeros((cin_g, 1) + tuple(ws[2:]), np.float32)
                w[(ci, 0) + t] = 1.0
                y = ReferenceEvaluator(_single(w, one)).run(None, {"x": xj})[0]  # (b, 1, out...)
                rows.append(y.reshape(len(x), -1))
        out.append(np.stack(rows))  # (C, b, positions)
    return np.stack(out).reshape(g, len(rows), -1).astype(np.float64)


@pytest.mark.parametrize("case", ["convtranspose2d_grouped", "convtranspose1d"])
def test_hessian_equals_the_reference_evaluators_columns(case):
    model = graphs.BUILDERS[case]()
    layers, _ = find_layers(model)
    (layer,) = layers
    assert layer.op == "ConvTranspose"
    feeds = [graphs.make_feed(model, 3, seed=s) for s in (1, 2)]
    stats = collect_hessians(model, layers, feeds, precision="float64")[layer.name]
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs.pop("kernel_shape", None)
    want = np.zeros_like(stats.xtx)
    ncols = 0
    for f in feeds:
        cols = _probe_columns(f["X"], layer.weight.shape, attrs)
        want += np.einsum("gcn,gdn->gcd", cols, cols)
        ncols += cols.shape[-1]
    assert stats.xtx.shape == (layer.groups, layer.cols, layer.cols)
    np.testing.assert_allclose(stats.xtx, want, rtol=1e-6, atol=1e-6)
    assert stats.columns == ncols and stats.samples == 6


def _layer_error(model, out_model, feed):
    """Relative output error of the compressed model (bias included in both)."""
    a, b = _ort(model, feed)[0], _ort(out_model, feed)[0]
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("case", ["convtranspose2d_grouped", "convtranspose1d"])
def test_exact_beats_magnitude_and_rtn_and_runs(case):
    model = graphs.BUILDERS[case]()
    feed = graphs.make_feed(model, 16, seed=4)
    res = {}
    for name, cfg in {"exact50": dict(sparsity=0.5), "mag50": dict(method="magnitude", sparsity=0.5),
                      "obq4": dict(bits=4), "rtn4": dict(method="rtn", bits=4)}.items():
        r = compress(model, None, [feed], CompressConfig(**cfg))
        (rep,) = r.layers
        assert rep.op == "ConvTranspose" and rep.method != "dense"
        out = r.extra["model"]
        onnx.checker.check_model(out, full_check=True)
        w = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "deconv.weight"))
        if "50" in name:
            assert abs(np.mean(w == 0) - 0.5) < 0.05
        else:
            mats = find_layers(out)[0][0].layout.to_matrices(w)  # each output channel of each group: its own grid
            assert all(len(np.unique(row)) <= 16 for row in mats.reshape(-1, mats.shape[-1]))
        res[name] = _layer_error(model, out, feed)
    assert res["exact50"] < res["mag50"]
    assert res["obq4"] < res["rtn4"]


@pytest.mark.parametrize("case", ["convtranspose2d_grouped", "convtranspose1d"])
@pytest.mark.parametrize("cfg", [dict(bits=8), dict(bits=4, method="rtn", sym=True), dict(bits=4, group_size=2)],
                         ids=["obq8", "rtn4sym", "g2"])
def test_qdq_storage_equals_fake_quant(case, cfg):
    model = graphs.BUILDERS[case]()
    if cfg["bits"] == 4:
        from onnxobc.export.qdq import ensure_opset

        model = ensure_opset(model, 4, 21, blocked=True)
    feed = graphs.make_feed(model, 8, seed=5)
    fake = compress(model, None, [feed], CompressConfig(**cfg)).extra["model"]
    r = compress(model, None, [feed], CompressConfig(qdq=True, **cfg))
    qdq = r.extra["model"]
    onnx.checker.check_model(qdq, full_check=True)
    dqs = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    g = r.layers[0].groups
    assert len(dqs) == g
    # blocks along Cin where group_size divides Cin/g (2-D case: 2), else per output channel with a note (1-D: 5)
    blocked = bool(cfg.get("group_size")) and case == "convtranspose2d_grouped"
    assert ("per-channel grid" in r.layers[0].note) == (bool(cfg.get("group_size")) and not blocked)
    for dq in dqs:
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == (0 if blocked else 1)
    if g > 1:
        (cat,) = [n for n in qdq.graph.node if n.op_type == "Concat"]
        assert list(cat.input) == [d.output[0] for d in dqs]
    # the dequantized weight is the fake-quantized one, bit for bit, and the models agree in ORT
    want = numpy_helper.to_array(next(t for t in fake.graph.initializer if t.name == "deconv.weight"))
    wname = next(n for n in qdq.graph.node if n.op_type == "ConvTranspose").input[1]
    aug = onnx.ModelProto()
    aug.CopyFrom(qdq)
    aug.graph.output.append(helper.make_tensor_value_info(wname, 1, None))
    got = _ort(aug, feed)[-1]
    np.testing.assert_array_equal(got, want)
    for a, b in zip(_ort(fake, feed), _ort(qdq, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # predicted bytes are what was written
    kept = sum(tensor_data_bytes(t) for t in model.graph.initializer if t.name != "deconv.weight")
    written = sum(tensor_data_bytes(t) for t in qdq.graph.initializer)
    assert written - kept == r.layers[0].cost["bytes"]


def test_w8a8_runs():
    model = graphs.convtranspose2d_grouped()
    feed = graphs.make_feed(model, 8, seed=6)
    out = compress(model, None, [feed], CompressConfig(bits=8, qdq=True, act_bits=8)).extra["model"]
    y, z = _ort(model, feed)[0], _ort(out, feed)[0]
    assert np.linalg.norm(y - z) / np.linalg.norm(y) < 0.05


def test_stats_correction_leaves_convtranspose_with_a_note():
    model = graphs.convtranspose1d()
    feed = graphs.make_feed(model, 8, seed=6)
    r = compress(model, None, [feed], CompressConfig(bits=4, method="rtn", stats_correction="mean"))
    assert any("ConvTranspose" in str(n) for n in (r.correction or []))
