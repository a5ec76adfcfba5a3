"""The fast Gram paths (onnxobc/engine/gram.py, issue 11) against a direct float64 NumPy computation, and
the calibration loop around them (ONNX Runtime optimisation level chosen by bit identity, overlap)."""
import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphs
from onnxobc.calibrate import collect_hessians, input_specs, iter_batches
from onnxobc.engine import gram as gm
from onnxobc.calibrate import hessian as hz
from onnxobc.errors import CalibrationError
from onnxobc.graph import find_layers
from onnxobc.graph.adapters import OpLayout

ROOT = Path(__file__).resolve().parents[1]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def naive_conv_gram(x, w_shape, group, begin, end, strides, dil):
    """Column by column, position by position, with explicit bounds checks for the padding: float64."""
    x = np.asarray(x, dtype=np.float64)
    b, cin = x.shape[:2]
    spatial = x.shape[2:]
    kernel = tuple(w_shape[2:])
    nd = len(kernel)
    out = [(spatial[i] + begin[i] + end[i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    cg = cin // group
    c = cg * int(np.prod(kernel))
    acc = np.zeros((group, c, c))
    for n in range(b):
        for pos in itertools.product(*[range(o) for o in out]):
            for g in range(group):
                col = np.zeros(c)
                k = 0
                for ci in range(cg):
                    for taps in itertools.product(*[range(kk) for kk in kernel]):
                        idx = [pos[i] * strides[i] + taps[i] * dil[i] - begin[i] for i in range(nd)]
                        if all(0 <= idx[i] < spatial[i] for i in range(nd)):
                            col[k] = x[(n, g * cg + ci) + tuple(idx)]
                        k += 1
                acc[g] += np.outer(col, col)
    return acc, b * int(np.prod(out))


CONV_CASES = {
    # name: (x shape, weight shape, group, begin, end, strides, dilations)
    "1x1": ((3, 8, 5, 6), (4, 8, 1, 1), 1, [0, 0], [0, 0], [1, 1], [1, 1]),
    "1x1_strided": ((2, 6, 7, 5), (4, 6, 1, 1), 1, [0, 0], [0, 0], [2, 3], [1, 1]),
    "1x1_padded": ((2, 4, 4, 4), (3, 4, 1, 1), 1, [1, 0], [0, 2], [1, 1], [1, 1]),
    "1x1_grouped": ((2, 8, 4, 4), (6, 4, 1, 1), 2, [0, 0], [0, 0], [1, 1], [1, 1]),
    "depthwise3": ((3, 5, 7, 7), (5, 1, 3, 3), 5, [1, 1], [1, 1], [1, 1], [1, 1]),
    "depthwise5_s2": ((2, 4, 11, 9), (4, 1, 5, 5), 4, [2, 2], [2, 2], [2, 2], [1, 1]),
    "depthwise_multiplier": ((2, 3, 6, 6), (6, 1, 3, 3), 3, [1, 1], [1, 1], [1, 1], [1, 1]),
    "strided_dilated_padded": ((2, 3, 9, 8), (4, 3, 3, 2), 1, [2, 0], [1, 3], [2, 1], [2, 3]),
    "grouped": ((2, 6, 6, 6), (4, 3, 3, 3), 2, [1, 1], [1, 1], [1, 1], [1, 1]),
    "conv1d": ((3, 4, 17), (5, 4, 3), 1, [1], [2], [2], [2]),
    "conv3d": ((2, 2, 4, 5, 3), (3, 2, 2, 3, 2), 1, [1, 0, 1], [0, 1, 1], [1, 2, 1], [1, 1, 2]),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_gram_conv_matches_naive(case):
    xs, ws, g, b, e, s, d = CONV_CASES[case]
    x = np.random.default_rng(len(case)).standard_normal(xs).astype(np.float32) + 0.3
    got, n = gm.gram_conv(x, ws, group=g, pads_begin=b, pads_end=e, strides=s, dilations=d)
    ref, n_ref = naive_conv_gram(x, ws, g, b, e, s, d)
    assert got.dtype == np.float64 and got.shape == ref.shape and n == n_ref
    assert rel(got, ref) < 1e-6
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # the previous float64 path agrees too (it is the benchmark's yardstick)
    old, n_old = gm.gram_reference(x, ws, op="Conv", group=g, pads_begin=b, pads_end=e, strides=s, dilations=d)
    assert n_old == n and rel(old, ref) < 1e-12


@pytest.mark.parametrize("case", ["1x1", "depthwise3", "grouped", "strided_dilated_padded", "conv3d"])
def test_gram_conv_tiles_do_not_change_the_sums(case):
    """Tiny tiles exercise the group / sample / column splits: same sums within float32 rounding."""
    xs, ws, g, b, e, s, d = CONV_CASES[case]
    x = np.random.default_rng(3).standard_normal(xs).astype(np.float32)
    whole, n = gm.gram_conv(x, ws, group=g, pads_begin=b, pads_end=e, strides=s, dilations=d)
    tiled, n2 = gm.gram_conv(x, ws, group=g, pads_begin=b, pads_end=e, strides=s, dilations=d, tile_bytes=1,
                             tile_columns=3)
    assert n == n2 and rel(tiled, whole) < 1e-6
    for workers in (1, 3):
        par, n3 = gm.gram_conv(x, ws, group=g, pads_begin=b, pads_end=e, strides=s, dilations=d, tile_bytes=64,
                               workers=workers)
        assert n3 == n and rel(par, whole) < 1e-6


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_gram_rows_workers(workers):
    x = np.random.default_rng(11).standard_normal((103, 6)).astype(np.float32)
    got, n = gm.gram_rows(x, tile_columns=10, workers=workers)
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    assert n == 103 and rel(got[0], ref) < 1e-6


def test_float64_inputs_and_dtype_keep_float64_products():
    xs, ws, g, b, e, s, d = CONV_CASES["strided_dilated_padded"]
    x = np.random.default_rng(4).standard_normal(xs)
    ref, _ = naive_conv_gram(x, ws, g, b, e, s, d)
    got, _ = gm.gram_conv(x, ws, group=g, pads_begin=b, pads_end=e, strides=s, dilations=d)
    assert rel(got, ref) < 1e-13  # float64 in, float64 products
    got32in, _ = gm.gram_conv(x.astype(np.float32), ws, group=g, pads_begin=b, pads_end=e, strides=s, dilations=d,
                              dtype=np.float64)
    ref32, _ = naive_conv_gram(x.astype(np.float32), ws, g, b, e, s, d)
    assert rel(got32in, ref32) < 1e-13


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
def test_oplayout_gram_resolves_auto_pad(auto_pad, stride):
    layout = OpLayout("Conv", {"auto_pad": auto_pad.encode(), "strides": [stride, stride], "group": 1})
    ws = (3, 2, 4, 3)  # even kernel: SAME_UPPER and SAME_LOWER pad differently
    x = np.random.default_rng(5).standard_normal((2, 2, 7, 6)).astype(np.float32)
    begin, end, strides, dil = layout.conv_geometry((7, 6), (4, 3))
    if auto_pad != "VALID":
        assert sum(begin) + sum(end) > 0
    got, n = layout.gram(x, ws)
    ref, n_ref = naive_conv_gram(x, ws, 1, begin, end, strides, dil)
    assert n == n_ref and rel(got, ref) < 1e-6
    assert n == len(x) * layout.positions_per_sample(x.shape, ws)


def test_same_upper_and_lower_differ_for_even_kernels():
    x = np.random.default_rng(6).standard_normal((1, 1, 5, 5)).astype(np.float32)
    up = OpLayout("Conv", {"auto_pad": "SAME_UPPER"}).gram(x, (1, 1, 2, 2))[0]
    lo = OpLayout("Conv", {"auto_pad": "SAME_LOWER"}).gram(x, (1, 1, 2, 2))[0]
    assert rel(up, lo) > 1e-3


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_gram(trans_a):
    a = np.random.default_rng(7).standard_normal((9, 5)).astype(np.float32)  # op(A) is (samples, K)
    x = np.ascontiguousarray(a.T) if trans_a else a
    got, n = OpLayout("Gemm", {"transA": trans_a, "transB": 1}).gram(x, (3, 5))
    ref = a.astype(np.float64).T @ a.astype(np.float64)
    assert n == 9 and got.shape == (1, 5, 5) and rel(got[0], ref) < 1e-6
    tiled, _ = gm.gram_gemm(x, trans_a=bool(trans_a), tile_columns=2)
    assert rel(tiled[0], ref) < 1e-6


@pytest.mark.parametrize("shape", [(7,), (6, 7), (2, 5, 7), (2, 3, 4, 7)])
def test_matmul_gram_any_rank(shape):
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    got, n = OpLayout("MatMul").gram(x, (7, 4))
    rows = x.reshape(-1, 7).astype(np.float64)
    assert n == len(rows) and rel(got[0], rows.T @ rows) < 1e-6
    tiled, _ = gm.gram_matmul(x, 7, tile_columns=4)
    assert rel(tiled[0], rows.T @ rows) < 1e-6


def test_long_inputs_stay_accurate():
    """Many columns (a long 1-D signal): float32 tiles summed in float64 keep the 1e-5 contract."""
    x = (np.random.default_rng(9).standard_normal((4, 3, 60000)) * 5 + 2).astype(np.float32)
    got, n = gm.gram_conv(x, (2, 3, 5), pads_begin=[2], pads_end=[2])
    old, _ = gm.gram_reference(x, (2, 3, 5), op="Conv", pads_begin=[2], pads_end=[2])
    assert n == 4 * 60000 and rel(got, old) < 1e-6


# ---- the calibration loop --------------------------------------------------------------------------
def _masked_matmul_model():
    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y0"], name="mm"),
             helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=onnx.TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m3"], name="unsq"),
             helper.make_node("Mul", ["Y0", "m3"], ["Y"], name="mul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", "S", 6]),
                                       helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["N", "S"])],
                          [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["N", "S", 4])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("overlap", [False, True])
def test_token_mask_keeps_real_tokens_only(overlap):
    model = _masked_matmul_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7, 6)).astype(np.float32)
    mask = (rng.random((5, 7)) < 0.6).astype(np.int64)
    mask[:, 0] = 1
    layers, _ = find_layers(model)
    feeds = [{"X": x[s:s + 2], "attention_mask": mask[s:s + 2]} for s in range(0, 5, 2)]
    st = collect_hessians(model, layers, feeds, token_mask="attention_mask", overlap=overlap)["mm"]
    real = x[mask != 0].astype(np.float64)
    assert st.columns == len(real) and st.samples == 5
    assert rel(st.xtx[0], real.T @ real) < 1e-6
    full = collect_hessians(model, layers, feeds, overlap=overlap)["mm"]
    assert full.columns == 35 and rel(full.xtx[0], real.T @ real) > 1e-3


def _fixture_cases():
    out = []
    for name, build in graphs.BUILDERS.items():
        model = build()
        try:
            layers, _ = find_layers(model)
        except Exception:
            continue
        if layers:
            out.append(name)
    return out


def _recorded(model, level, feed):
    layers, _ = find_layers(model)
    aug, fetch = hz.augment(model, [c.input_name for layer in layers for c in layer.consumers])
    return fetch, hz.make_session(aug, None, level).run(fetch, feed)


@pytest.mark.parametrize("case", _fixture_cases())
def test_chosen_level_reproduces_the_unoptimised_tensors(case):
    """Whatever level "auto" picks on the first samples, the tensors it records on another batch are the
    unoptimised graph's, bit for bit."""
    model = graphs.BUILDERS[case]()
    layers, _ = find_layers(model)
    aug, fetch = hz.augment(model, [c.input_name for layer in layers for c in layer.consumers])
    specs = input_specs(model)
    report = {}
    sess = hz.choose_session(aug, fetch, graphs.make_feed(model, 6, seed=1), specs, report=report)
    assert report["level"] in ("all", "extended", "basic", "off")
    feed = graphs.make_feed(model, 5, seed=2)
    ref = hz.make_session(aug, None, "off").run(fetch, feed)
    for name, a, b in zip(fetch, ref, sess.run(fetch, feed)):
        assert hz._same_bits(a, b), name


def test_chosen_level_on_the_shipped_model():
    model = onnx.load(str(ROOT / "models" / "fmnist_cnn.onnx"))
    layers, _ = find_layers(model)
    aug, fetch = hz.augment(model, [c.input_name for layer in layers for c in layer.consumers])
    specs = input_specs(model)
    feeds = list(iter_batches(str(ROOT / "models" / "fmnist_calib.npz"), specs, batch_size=16, max_samples=48))
    report = {}
    sess = hz.choose_session(aug, fetch, feeds[0], specs, report=report)
    assert report["level"] != "off"  # some optimisation survives on this CNN
    ref = hz.make_session(aug, None, "off")
    for feed in feeds[1:]:
        for name, a, b in zip(fetch, ref.run(fetch, feed), sess.run(fetch, feed)):
            assert hz._same_bits(a, b), name


def test_collect_hessians_checks_the_level_after_the_first_batch():
    """The first batch runs unoptimised; the level check picks one for the rest; same Hessians as "off"."""
    model = onnx.load(str(ROOT / "models" / "fmnist_cnn.onnx"))
    layers, _ = find_layers(model)
    feeds = list(iter_batches(str(ROOT / "models" / "fmnist_calib.npz"), input_specs(model), batch_size=16,
                              max_samples=48))
    for overlap in (True, False):
        prof = {}
        auto = collect_hessians(model, layers, feeds, profile=prof, overlap=overlap)
        assert prof["level"] != "off" and prof["level_check"] > 0
        off = collect_hessians(model, layers, feeds, optimize="off", overlap=overlap)
        for layer in layers:
            assert auto[layer.name].samples == off[layer.name].samples == 48
            assert rel(auto[layer.name].xtx, off[layer.name].xtx) < 1e-12  # same tensors, same tiles
    prof = {}
    collect_hessians(model, layers, feeds[:1], profile=prof)
    assert prof["level"] == "off" and "level_check" not in prof  # one batch: nothing left to speed up


def test_a_level_that_changes_one_tensor_is_refused(monkeypatch):
    """A session whose outputs differ in one bit is not used: the next level down is."""
    real = hz.make_session

    class Perturbed:
        def __init__(self, sess):
            self.sess = sess

        def run(self, fetch, feed):
            outs = self.sess.run(fetch, feed)
            outs[-1] = np.nextafter(outs[-1], np.inf).astype(outs[-1].dtype)
            return outs

    def fake(model, providers=None, level="off"):
        s = real(model, providers, level)
        return Perturbed(s) if level == "all" else s

    monkeypatch.setattr(hz, "make_session", fake)
    model = graphs.conv2d_basic()
    layers, _ = find_layers(model)
    aug, fetch = hz.augment(model, [c.input_name for layer in layers for c in layer.consumers] + ["Y"])
    report = {}
    hz.choose_session(aug, fetch, graphs.make_feed(model, 3), input_specs(model), report=report)
    assert report["mismatches"]["all"] == 1 and report["level"] == "extended"


def test_forced_level_and_bad_level():
    model = graphs.conv2d_basic()
    layers, _ = find_layers(model)
    feed = graphs.make_feed(model, 3)
    prof = {}
    collect_hessians(model, layers, [feed], optimize="basic", profile=prof)
    assert prof["level"] == "basic" and prof["gram"] >= 0
    with pytest.raises(CalibrationError, match="optimize"):
        collect_hessians(model, layers, [feed], optimize="fast")
    with pytest.raises(CalibrationError, match="precision"):
        collect_hessians(model, layers, [feed], precision="float16")


def test_overlap_and_precision_give_the_same_hessians():
    model = graphs.mixed_cnn()
    layers, _ = find_layers(model)
    feeds = [graphs.make_feed(model, 3, seed=s) for s in range(4)]
    a = collect_hessians(model, layers, feeds, overlap=True)
    b = collect_hessians(model, layers, feeds, overlap=False, optimize="off", precision="float64")
    for layer in layers:
        assert a[layer.name].samples == b[layer.name].samples == 12
        assert a[layer.name].columns == b[layer.name].columns
        assert rel(a[layer.name].xtx, b[layer.name].xtx) < 1e-6


def test_ort_failure_in_the_overlap_thread_is_a_calibration_error():
    model = graphs.mixed_cnn()  # records inner tensors, so ONNX Runtime runs every batch
    layers, _ = find_layers(model)
    good = graphs.make_feed(model, 2)
    bad = {"unknown_input": next(iter(good.values()))}  # ORT refuses a feed without the model's input
    with pytest.raises(CalibrationError, match="batch 2"):
        collect_hessians(model, layers, [good, good, bad, good], overlap=True)
