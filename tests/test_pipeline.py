"""`compress` with the exact engine on test graphs and on the shipped model, run in ONNX Runtime."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphs
from golden_cases import calib as golden_calib
from onnxobc import CompressConfig, compress
from onnxobc.cli import main
from onnxobc.graph import find_layers

OPTIONS = {
    "s50": dict(sparsity=0.5),
    "nm24": dict(nm=(2, 4)),
    "block2": dict(block_size=2, sparsity=0.5),
    "b4": dict(bits=4),
    "s50b4": dict(sparsity=0.5, bits=4),
    "nm24b8": dict(nm=(2, 4), bits=8, sym=True),
    "b3mse": dict(bits=3, grid="mse"),
}
CASES = ["gemm_transB0", "gemm_alpha_beta", "matmul_3d", "conv2d_grouped", "conv2d_depthwise", "conv3d", "bert_like",
         "weight_chain", "shared_weight"]


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _calib(model, n=24):
    """Correlated calibration inputs (a few latent factors), so OBS has structure to exploit."""
    return golden_calib(model, n)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_exact_runs_and_beats_baseline(case, opt):
    model = graphs.BUILDERS[case]()
    feed = _calib(model)
    cfg = OPTIONS[opt]
    res = compress(model, None, [feed], CompressConfig(method="exact", **cfg))
    out = res.extra["model"]
    onnx.checker.check_model(out, full_check=True)
    assert all(np.all(np.isfinite(o)) for o in run(out, feed) if o.dtype.kind == "f")
    base_method = "magnitude" if ("sparsity" in cfg or "nm" in cfg) else "rtn"
    dense = {l.name for l in res.layers if l.note.startswith("left dense")}
    if "block_size" not in cfg:  # blocks have no baseline here; the engine tests check them against a reference
        base = compress(model, None, [feed], CompressConfig(method=base_method, **cfg))
        errs = {l.name: l.error for l in res.layers}
        berrs = {l.name: l.error for l in base.layers}
        for name in errs:
            if name not in dense:
                # the exact greedy solution is (up to float32 noise) never worse than the baseline per layer
                assert errs[name] <= berrs[name] * 1.001 + 1e-7, (name, errs[name], berrs[name])
    # the constraint holds on the written model
    layers = {l.name: l for l in find_layers(out)[0]}
    for rep in res.layers:
        if rep.name in dense:
            continue
        layer = layers[rep.name]
        mats = layer.layout.to_matrices(layer.weight.astype(np.float32))
        if "nm" in cfg and layer.cols % 4 == 0:
            perm = layer.layout.channels_last_perm(layer.weight.shape)
            m = mats if perm is None else mats[:, :, perm]
            groups = m.reshape(m.shape[0], m.shape[1], -1, 4)
            assert np.all((groups != 0).sum(-1) <= 2)
        if "sparsity" in cfg:
            assert np.mean(mats == 0) == pytest.approx(cfg["sparsity"], abs=1.0 / mats.size + 1e-9)
        if "bits" in cfg:
            for row in mats.reshape(-1, mats.shape[-1]):
                assert len(np.unique(row)) <= 2 ** cfg["bits"]


def test_nm_conv_is_channels_last():
    """2:4 on a 3x3 conv with 8 input channels: groups of 4 run over input channels at each tap."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"], name="conv", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 8, 6, 6])],
                          [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [numpy_helper.from_array(W, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    feed = {"X": rng.standard_normal((8, 8, 6, 6)).astype(np.float32)}
    out = compress(model, None, [feed], CompressConfig(nm=(2, 4))).extra["model"]
    Wn = onnx.numpy_helper.to_array(out.graph.initializer[0])
    nz = (Wn != 0).reshape(4, 2, 4, 3, 3)  # Cout, channel group, 4 channels, kh, kw
    assert np.all(nz.sum(axis=2) == 2)


def test_layers_that_do_not_fit_nm_are_left_dense_and_reported():
    model = graphs.conv2d_basic()  # C = 27
    res = compress(model, None, [_calib(model)], CompressConfig(nm=(2, 4)))
    (rep,) = res.layers
    assert rep.note.startswith("left dense") and rep.sparsity == 0 and rep.method == "dense"
    res = compress(model, None, [_calib(model)], CompressConfig(nm=(2, 4), bits=4))
    assert res.layers[0].note.startswith("not pruned") and res.layers[0].bits == 4


# ---- the shipped model ------------------------------------------------------------------------------------

def _accuracy(path, test):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": test["image"][:2000]})[0]
    return float(np.mean(logits.argmax(1) == test["label"][:2000]))


@pytest.mark.slow
def test_shipped_model_exact_beats_magnitude(root, tmp_path, capsys):
    """The README's main job, end to end through the CLI, against the magnitude baseline on the test split."""
    model = root / "models" / "fmnist_cnn.onnx"
    calib = root / "models" / "fmnist_calib.npz"
    test = np.load(root / "models" / "fmnist_test.npz")
    dense = _accuracy(model, test)
    assert dense > 0.88
    exact, mag = tmp_path / "exact.onnx", tmp_path / "mag.onnx"
    assert main(["compress", str(model), "--calib", str(calib), "--sparsity", "0.5", "-o", str(exact),
                 "--samples", "256", "--report", str(tmp_path / "r.json")]) == 0
    assert main(["compress", str(model), "--calib", str(calib), "--sparsity", "0.5", "-o", str(mag),
                 "--samples", "256", "--method", "magnitude", "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["layers"]) == 7 and report["samples"] == 256
    a_exact, a_mag = _accuracy(exact, test), _accuracy(mag, test)
    assert a_exact > dense - 0.02, (a_exact, dense)
    assert a_exact > a_mag + 0.05, (a_exact, a_mag)


@pytest.mark.slow
def test_shipped_model_nm_and_bits(root, tmp_path):
    model = root / "models" / "fmnist_cnn.onnx"
    calib = root / "models" / "fmnist_calib.npz"
    out = tmp_path / "q.onnx"
    assert main(["compress", str(model), "--calib", str(calib), "--nm", "2:4", "--bits", "8", "-o", str(out),
                 "--samples", "128", "-q"]) == 0
    test = np.load(root / "models" / "fmnist_test.npz")
    assert _accuracy(out, test) > 0.85
