"""Einsum with one constant operand as a (batched) matrix-product layer (issue 13)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxobc import CompressConfig, compress
from onnxobc.calibrate.hessian import collect_hessians
from onnxobc.export.cost import tensor_data_bytes
from onnxobc.graph import find_layers

# (equation, X shape with N for the samples, W shape, weight operand)
CASES = {
    "bij,jk->bik": (["N", 5, 12], (12, 8), 1),
    "...d,fd->...f": (["N", 3, 4, 12], (10, 12), 1),
    "fd,...d->...f": (["N", 6, 12], (10, 12), 0),
    "bhd,hdk->bhk": (["N", 3, 12], (3, 12, 6), 1),
    "bij,jk": (["N", 5, 12], (12, 8), 1),  # implicit output: bik
    "hkd,bsd->bshk": (["N", 4, 12], (2, 6, 12), 0),  # two output labels of W (Keras EinsumDense to heads)
    "bshd,hdk->bsk": (["N", 4, 3, 4], (3, 4, 8), 1),  # two contracted labels (heads back to the model dim)
}
PLAIN = list(CASES)


def einsum_model(eq, seed=0, opset=17):
    xs, ws, wi = CASES[eq]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(ws) / np.sqrt(12)).astype(np.float32)
    ins = ["W", "X"] if wi == 0 else ["X", "W"]
    nodes = [helper.make_node("Einsum", ins, ["Y"], name="ein", equation=eq)]
    x1 = np.zeros([2] + list(xs[1:]))
    ys = ["N"] + list((np.einsum(eq, w, x1) if wi == 0 else np.einsum(eq, x1, w)).shape[1:])
    g = helper.make_graph(nodes, "ein", [helper.make_tensor_value_info("X", TensorProto.FLOAT, xs)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ys)],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 8
    return m


def feed(eq, n=8, seed=0):
    xs = CASES[eq][0]
    rng = np.random.default_rng(seed)
    shape = [n] + list(xs[1:])
    base = rng.standard_normal(shape[:-1] + [3])
    mix = rng.standard_normal((3, shape[-1]))
    return {"X": (base @ mix + 0.2 * rng.standard_normal(shape)).astype(np.float32)}  # correlated features


def _ort(m, fd):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, fd)


def test_found_and_skipped_with_reasons():
    for eq in PLAIN:
        (layer,), _ = find_layers(einsum_model(eq))
        assert layer.op == "Einsum" and layer.name == "ein"
    lay = find_layers(einsum_model("bhd,hdk->bhk"))[0][0]
    assert (lay.groups, lay.rows, lay.cols) == (3, 6, 12)
    lay = find_layers(einsum_model("hkd,bsd->bshk"))[0][0]
    assert (lay.groups, lay.rows, lay.cols) == (1, 12, 12)
    lay = find_layers(einsum_model("bshd,hdk->bsk"))[0][0]
    assert (lay.groups, lay.rows, lay.cols) == (1, 8, 12)
    # two activations (attention scores): skipped with the reason
    g = helper.make_graph([helper.make_node("Einsum", ["A", "B"], ["Y"], name="qk", equation="bid,bjd->bij")], "g",
                          [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["N", 4, 8]) for k in "AB"],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    layers, skipped = find_layers(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert not layers and skipped[0].reason == "Einsum of two activations"
    for eq, why in [("bii,ij->bj", "repeated label"), ("bij,jk->b", "within one operand"),
                    ("bij,ij->bij", "not a matrix product"), ("bij,ijk->bijk", "not a matrix product")]:
        wshape = (4,) * (len(eq.split(",")[1].split("-")[0]))
        g = helper.make_graph([helper.make_node("Einsum", ["X", "W"], ["Y"], name="e", equation=eq)], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones(wshape, np.float32), "W")])
        layers, skipped = find_layers(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
        assert not layers and why in skipped[0].reason, skipped


@pytest.mark.parametrize("eq", PLAIN)
def test_columns_times_matrices_reproduce_numpy_einsum(eq):
    m = einsum_model(eq)
    (layer,), _ = find_layers(m)
    x = feed(eq, n=3)["X"].astype(np.float64)
    w = layer.weight.astype(np.float64)
    y = np.einsum(eq, w, x) if layer.layout.weight_input == 0 else np.einsum(eq, x, w)
    mats, cols = layer.layout.to_matrices(w), layer.layout.unfold(x, w.shape)
    got = mats @ cols  # (groups, rows, positions)
    t = layer.layout.terms
    # the einsum output brought to (groups, rows, positions) independently: move g and n to the front
    out_labels = layer.layout._out_axes(y.ndim)
    front = ([out_labels.index(t.g)] if t.g else []) + [out_labels.index(lb) for lb in t.n]
    rest = [i for i in range(y.ndim) if i not in front]
    want = np.transpose(y, front + rest).reshape(layer.groups, layer.rows, -1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(layer.layout.from_matrices(mats, w.shape), w)
    np.testing.assert_allclose(y.astype(np.float32), _ort(m, {"X": x.astype(np.float32)})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eq", PLAIN)
def test_hessian_equals_numpy(eq):
    m = einsum_model(eq)
    layers, _ = find_layers(m)
    feeds = [feed(eq, 5, seed=1), feed(eq, 4, seed=2)]
    st = collect_hessians(m, layers, feeds)["ein"]
    xs = np.concatenate([f["X"] for f in feeds]).astype(np.float64)
    if eq == "bhd,hdk->bhk":
        want = np.einsum("bhk,bhl->hkl", xs, xs)
    else:  # the contracted labels are X's last ones in every other case (flattened in W's order = X's order)
        flat = xs.reshape(-1, 12)
        want = (flat.T @ flat)[None]
    np.testing.assert_allclose(st.xtx, want, rtol=1e-6, atol=1e-6)
    assert st.samples == 9 and st.columns == xs.size // 12 // (3 if eq == "bhd,hdk->bhk" else 1)


@pytest.mark.parametrize("eq", ["bij,jk->bik", "fd,...d->...f", "bhd,hdk->bhk", "bshd,hdk->bsk"])
def test_exact_and_obq_end_to_end(eq):
    m = einsum_model(eq)
    feeds = [feed(eq, 16, seed=3)]
    res = {}
    for name, cfg in {"exact50": dict(sparsity=0.5), "mag50": dict(method="magnitude", sparsity=0.5),
                      "obq4": dict(bits=4), "rtn4": dict(method="rtn", bits=4)}.items():
        r = compress(m, None, feeds, CompressConfig(**cfg))
        (rep,) = r.layers
        assert rep.op == "Einsum" and rep.method != "dense"
        out = r.extra["model"]
        onnx.checker.check_model(out, full_check=True)
        w = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W"))
        if "50" in name:
            assert abs(np.mean(w == 0) - 0.5) < 0.05
        y0, y1 = _ort(m, feeds[0])[0], _ort(out, feeds[0])[0]
        res[name] = (rep.error, float(np.linalg.norm(y1 - y0) ** 2 / np.linalg.norm(y0) ** 2))
        # the reported error is the output's: a single Einsum is its own layer
        np.testing.assert_allclose(res[name][0], res[name][1], rtol=1e-3)
    assert res["exact50"][0] < res["mag50"][0] and res["obq4"][0] < res["rtn4"][0]


@pytest.mark.parametrize("eq", ["bij,jk->bik", "bhd,hdk->bhk", "fd,...d->...f"])
@pytest.mark.parametrize("cfg", [dict(bits=8), dict(bits=4, group_size=4)], ids=["obq8", "g4"])
def test_qdq_storage_equals_the_solved_weight(eq, cfg):
    m = einsum_model(eq, opset=21 if cfg["bits"] == 4 else 17)
    feeds = [feed(eq, 8, seed=5)]
    fake = compress(m, None, feeds, CompressConfig(**cfg)).extra["model"]
    r = compress(m, None, feeds, CompressConfig(qdq=True, **cfg))
    out = r.extra["model"]
    onnx.checker.check_model(out, full_check=True)
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == r.layers[0].groups
    node = next(n for n in out.graph.node if n.op_type == "Einsum")
    aug = onnx.ModelProto()
    aug.CopyFrom(out)
    wi = 0 if eq.startswith("fd") else 1  # the constant operand
    aug.graph.output.append(helper.make_tensor_value_info(node.input[wi], TensorProto.FLOAT, None))
    got = _ort(aug, feeds[0])[-1]
    want = numpy_helper.to_array(next(t for t in fake.graph.initializer if t.name == "W"))
    np.testing.assert_array_equal(got, want)
    kept = sum(tensor_data_bytes(t) for t in m.graph.initializer if t.name != "W")
    written = sum(tensor_data_bytes(t) for t in out.graph.initializer)
    assert written - kept == r.layers[0].cost["bytes"]


def test_macs():
    m = einsum_model("bhd,hdk->bhk")
    (rep,) = compress(m, None, [feed("bhd,hdk->bhk", 8)], CompressConfig(method="rtn", bits=8)).layers
    assert rep.macs == 3 * 6 * 12  # one product per head and sample
    m = einsum_model("...d,fd->...f")
    (rep,) = compress(m, None, [feed("...d,fd->...f", 8)], CompressConfig(method="rtn", bits=8)).layers
    assert rep.macs == 3 * 4 * 10 * 12


def test_qdq_with_several_output_labels_is_float_with_the_reason():
    eq = "hkd,bsd->bshk"
    m = einsum_model(eq)
    feeds = [feed(eq, 8, seed=5)]
    fake = compress(m, None, feeds, CompressConfig(bits=8)).extra["model"]
    r = compress(m, None, feeds, CompressConfig(bits=8, qdq=True))
    out = r.extra["model"]
    assert not [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert "stored as float fake-quant" in r.layers[0].note and "float fake-quant" in r.layers[0].written
    w = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W"))
    np.testing.assert_array_equal(w, numpy_helper.to_array(next(t for t in fake.graph.initializer if t.name == "W")))
    assert r.layers[0].cost["bytes"] == w.size * 4 and r.layers[0].cost["storage"] == "float"
