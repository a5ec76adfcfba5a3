"""Hessians from ONNX Runtime recordings against a direct NumPy computation, and the data readers."""
import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphs
from onnxobc.calibrate import collect_hessians, input_specs, iter_batches
from onnxobc.errors import CalibrationError
from onnxobc.graph import find_layers


def _close(actual, desired):
    """Hessians are float32 products summed in float64 (issue 11): equal to the float64 products within the
    accuracy target, relative 1e-5 elementwise plus 1e-6 of the largest entry for entries that cancel."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6 * float(np.abs(desired).max()))


def naive_conv_columns(x, w_shape, attrs):
    """Per-position loops, independent of the library's slicing im2col: (groups, C, columns)."""
    nd = len(w_shape) - 2
    k = list(w_shape[2:])
    g = attrs.get("group", 1)
    strides = attrs.get("strides", [1] * nd)
    dil = attrs.get("dilations", [1] * nd)
    spatial = list(x.shape[2:])
    ap = attrs.get("auto_pad", "NOTSET")
    if ap in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-spatial[i] // strides[i]) for i in range(nd)]
        tot = [max((out[i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - spatial[i], 0) for i in range(nd)]
        begin = [t // 2 if ap == "SAME_UPPER" else t - t // 2 for t in tot]
    elif ap == "VALID":
        begin = [0] * nd
        out = [(spatial[i] - dil[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    else:
        pads = attrs.get("pads", [0] * 2 * nd)
        begin = pads[:nd]
        out = [(spatial[i] + pads[i] + pads[i + nd] - dil[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    cin = x.shape[1]
    cg = cin // g
    cols = [[] for _ in range(g)]
    for b in range(x.shape[0]):
        for pos in itertools.product(*[range(o) for o in out]):
            for gi in range(g):
                col = []
                for ci in range(cg):
                    for tap in itertools.product(*[range(kk) for kk in k]):
                        idx = [pos[i] * strides[i] - begin[i] + tap[i] * dil[i] for i in range(nd)]
                        inside = all(0 <= idx[i] < spatial[i] for i in range(nd))
                        col.append(x[(b, gi * cg + ci) + tuple(idx)] if inside else 0.0)
                cols[gi].append(col)
    return np.array([np.array(c, dtype=np.float64).T for c in cols])


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) if a.type != onnx.AttributeProto.STRING else a.s.decode()
            for a in node.attribute}


CONV_CASES = ["conv1d", "conv2d_basic", "conv2d_grouped", "conv2d_depthwise", "conv2d_depthwise_multiplier",
              "conv2d_asym_pads", "conv2d_autopad_same_upper", "conv2d_autopad_same_lower", "conv2d_autopad_valid",
              "conv3d", "conv2d_no_bias"]


def _hessians(model, feed, batch_size=4):
    layers, _ = find_layers(model)
    stats = collect_hessians(model, layers, iter_batches([feed], input_specs(model)) if batch_size is None else
                             _split(feed, batch_size))
    return layers, stats


def _split(feed, bs):
    n = next(iter(feed.values())).shape[0]
    for s in range(0, n, bs):
        yield {k: v[s:s + bs] for k, v in feed.items()}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_hessian_matches_naive_unfold(case):
    model = graphs.BUILDERS[case]()
    feed = graphs.make_feed(model, 5, seed=1)
    layers, stats = _hessians(model, feed, batch_size=2)
    (layer,) = layers
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    X = naive_conv_columns(feed[node.input[0]].astype(np.float64), layer.weight.shape, _attrs(node))
    H_ref = 2 * np.einsum("gcn,gdn->gcd", X, X) / 5
    H = stats[layer.name].hessian()
    assert H.shape == (layer.groups, layer.cols, layer.cols)
    _close(H, H_ref)
    assert stats[layer.name].samples == 5


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_hessian_reproduces_conv_output_energy(case):
    """tr(W H W^T) n / 2 = ||W X||^2 = ||conv(x) - bias||^2 as ONNX Runtime computes it."""
    import onnxruntime as ort

    model = graphs.BUILDERS[case]()
    feed = graphs.make_feed(model, 6, seed=2)
    layers, stats = _hessians(model, feed, batch_size=6)
    (layer,) = layers
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    rng = np.random.default_rng(0)
    V = rng.standard_normal(layer.weight.shape).astype(np.float32)
    single = helper.make_model(
        helper.make_graph([helper.make_node("Conv", [node.input[0], "V"], ["Y"], **_attrs(node))], "g",
                          [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(V, "V")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    y = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {node.input[0]: feed[node.input[0]]})[0].astype(np.float64)
    mats = layer.layout.to_matrices(V).astype(np.float64)
    H = stats[layer.name].hessian()
    quad = sum(np.sum((mats[g] @ H[g]) * mats[g]) for g in range(layer.groups))
    np.testing.assert_allclose(quad * 6 / 2, np.sum(y ** 2), rtol=1e-5)


def test_matmul_3d_and_gemm_hessians():
    model = graphs.matmul_3d()
    feed = graphs.make_feed(model, 7, seed=3)
    layers, stats = _hessians(model, feed, batch_size=3)
    fc1 = next(l for l in layers if l.name == "fc1/MatMul")
    A = feed[model.graph.input[0].name].astype(np.float64).reshape(-1, 8)
    _close(stats[fc1.name].hessian()[0], 2 * A.T @ A / 7)
    assert stats[fc1.name].columns == 7 * 5

    model = graphs.gemm_transB0()
    feed = graphs.make_feed(model, 9, seed=4)
    layers, stats = _hessians(model, feed, batch_size=4)
    A = next(iter(feed.values())).astype(np.float64)
    _close(stats[layers[0].name].hessian()[0], 2 * A.T @ A / 9)


def test_gemm_transA_hessian():
    rng = np.random.default_rng(0)
    B = rng.standard_normal((6, 4)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["A", "B"], ["Y"], name="gemm", transA=1)], "g",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [6, 5])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [5, 4])], [numpy_helper.from_array(B, "B")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    a = rng.standard_normal((6, 5)).astype(np.float32)
    layers, _ = find_layers(model)
    stats = collect_hessians(model, layers, [{"A": a}])
    X = a.astype(np.float64)  # transA: the columns of A^T are A's columns -> X = A (K x M)
    _close(stats["gemm"].xtx[0], X @ X.T)


def test_shared_weight_hessian_is_sum_of_consumers():
    model = graphs.shared_weight()
    feed = graphs.make_feed(model, 4, seed=5)
    layers, stats = _hessians(model, feed, batch_size=4)
    (layer,) = layers
    assert [c.node_name for c in layer.consumers] == ["matmul_1", "matmul_2"]
    import onnxruntime as ort
    from onnxobc.calibrate import augment

    aug, fetch = augment(model, [c.input_name for c in layer.consumers])
    vals = dict(zip(fetch, ort.InferenceSession(aug.SerializeToString()).run(fetch, feed)))
    vals.update(feed)
    xs = [vals[c.input_name].reshape(-1, 8).astype(np.float64) for c in layer.consumers]
    ref = sum(2 * x.T @ x for x in xs) / 4
    _close(stats[layer.name].hessian()[0], ref)


def test_streaming_batch_size_does_not_change_hessian():
    model = graphs.conv2d_grouped()
    feed = graphs.make_feed(model, 9, seed=6)
    H = [_hessians(model, feed, batch_size=bs)[1]["conv"].hessian() for bs in (1, 4, 9)]
    _close(H[0], H[1])
    _close(H[0], H[2])


# ---- data readers ---------------------------------------------------------------------------------------

def test_npz_file_and_directory(tmp_path):
    model = graphs.conv2d_basic()
    specs = input_specs(model)
    feed = graphs.make_feed(model, 10)
    np.savez(tmp_path / "a.npz", **feed)
    batches = list(iter_batches(tmp_path / "a.npz", specs, batch_size=4))
    assert [b["X"].shape[0] for b in batches] == [4, 4, 2]
    d = tmp_path / "dir"
    d.mkdir()
    np.savez(d / "1.npz", **feed)
    np.savez(d / "2.npz", **feed)
    batches = list(iter_batches(d, specs, batch_size=8, max_samples=13))
    assert sum(b["X"].shape[0] for b in batches) == 13


def test_iterables_and_calibration_data_reader():
    model = graphs.matmul_2d()
    specs = input_specs(model)
    feeds = [graphs.make_feed(model, 3, seed=i) for i in range(3)]

    class Reader:  # the onnxruntime.quantization.CalibrationDataReader protocol
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    assert len(list(iter_batches(feeds, specs))) == 3
    assert len(list(iter_batches(Reader(), specs))) == 3
    assert sum(b["X"].shape[0] for b in iter_batches(iter(feeds), specs, max_samples=5)) == 5


def test_float64_data_is_cast_and_extra_keys_ignored():
    model = graphs.matmul_2d()
    feed = {k: v.astype(np.float64) for k, v in graphs.make_feed(model, 3).items()}
    feed["label"] = np.zeros(3)
    (b,) = iter_batches([feed], input_specs(model))
    assert b["X"].dtype == np.float32 and "label" not in b


@pytest.mark.parametrize("bad, match", [
    ({"wrong": np.zeros((2, 8), np.float32)}, "no array for model input 'X'"),
    ({"X": np.zeros((2, 8), np.int64)}, "dtype int64"),
    ({"X": np.zeros((2, 2, 8), np.float32)}, "rank"),
    ({"X": np.zeros((2, 9), np.float32)}, "axis 1"),
])
def test_bad_feeds_are_clear_errors(bad, match):
    model = graphs.matmul_2d()
    with pytest.raises(CalibrationError, match=match):
        list(iter_batches([bad], input_specs(model)))


def test_bad_paths(tmp_path):
    specs = input_specs(graphs.matmul_2d())
    with pytest.raises(CalibrationError, match="not found"):
        list(iter_batches(tmp_path / "missing.npz", specs))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CalibrationError, match="not an .npz"):
        list(iter_batches(tmp_path / "x.txt", specs))
    with pytest.raises(CalibrationError, match="no .npz"):
        list(iter_batches(tmp_path, specs))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="cannot read"):
        list(iter_batches(tmp_path / "broken.npz", specs))


def test_unbatched_inputs_are_passed_whole():
    model = graphs.if_subgraph()
    feed = graphs.make_feed(model, 6)
    specs = input_specs(model)
    batches = list(iter_batches([feed], specs, max_samples=4))
    assert len(batches) == 1
    for s in specs:
        if s.dynamic_batch:
            assert batches[0][s.name].shape[0] == 4
        else:
            assert batches[0][s.name].shape == feed[s.name].shape


def test_unfold_in_slices_gives_same_hessian(monkeypatch):
    import onnxobc.calibrate.hessian as hz

    model = graphs.conv2d_grouped()
    feed = graphs.make_feed(model, 6, seed=7)
    full = _hessians(model, feed, batch_size=6)[1]["conv"].hessian()
    monkeypatch.setattr(hz, "_UNFOLD_BYTES", 1)  # one sample at a time
    sliced = _hessians(model, feed, batch_size=6)[1]["conv"].hessian()
    _close(full, sliced)


def _masked_model():
    """X [N, S, 8] @ W, output multiplied by the attention mask (so the mask input is used)."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y0"], name="mm"),
             helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=onnx.TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m3"], name="unsq"),
             helper.make_node("Mul", ["Y0", "m3"], ["Y"], name="mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", "S", 8]),
                                       helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["N", "S"])],
                          [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", "S", 6])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_padding_tokens_are_left_out_of_the_hessian():
    from onnxobc.calibrate import find_token_mask

    model = _masked_model()
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 7, 8)).astype(np.float32)
    mask = (rng.random((5, 7)) > 0.4).astype(np.int64)
    layers, _ = find_layers(model)
    assert find_token_mask(model) == "attention_mask" and find_token_mask(model, "none") is None
    with pytest.raises(CalibrationError, match="no such input"):
        find_token_mask(model, "nope")
    feed = {"X": X, "attention_mask": mask}
    st = collect_hessians(model, layers, [feed], token_mask="attention_mask")["mm"]
    real = X[mask != 0].astype(np.float64)
    _close(st.hessian()[0], 2 * real.T @ real / 5)
    assert st.columns == int(mask.sum())
    full = collect_hessians(model, layers, [feed])["mm"]
    allx = X.reshape(-1, 8).astype(np.float64)
    _close(full.hessian()[0], 2 * allx.T @ allx / 5)
