"""LSTM / GRU / RNN as layer kinds (issue 13): W and R of every node, one problem per direction."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxobc import CompressConfig, compress
from onnxobc.calibrate.hessian import collect_hessians
from onnxobc.export.cost import tensor_data_bytes
from onnxobc.graph import find_layers
from onnxobc.graph.adapters import OpLayout

T, I, H = 7, 6, 5
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_model(op="LSTM", direction="bidirectional", seq=True, init=True, lbr=0, y_named=True, opset=17,
              seed=0) -> onnx.ModelProto:
    """X [N, T, I] (and lens [N] int32) -> Transpose -> op -> Y (or Y_h when Y is left unnamed).

    initial_h (and initial_c) are computed from the first step of X, so they vary per sample."""
    rng = np.random.default_rng(seed)
    nd = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    w = (rng.standard_normal((nd, g * H, I)) / np.sqrt(I)).astype(np.float32)
    r = (rng.standard_normal((nd, g * H, H)) / np.sqrt(H)).astype(np.float32)
    b = (0.1 * rng.standard_normal((nd, 2 * g * H))).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"), numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([H], np.int64), "sH"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    nodes = [helper.make_node("Transpose", ["X"], ["Xt"], name="to_tbi", perm=[1, 0, 2])]
    ins = ["Xt", "W", "R", "B", "lens" if seq else "", "", ""]
    if init:
        nodes += [helper.make_node("Gather", ["Xt", "zero"], ["x0"], name="first_step", axis=0),
                  helper.make_node("Slice", ["x0", "s0", "sH", "ax1"], ["x0h"], name="first_h"),
                  helper.make_node("Tanh", ["x0h"], ["x0t"], name="first_tanh"),
                  helper.make_node("Unsqueeze", ["x0t", "ax0"], ["h1"], name="h_unsq"),
                  helper.make_node("Concat", ["h1"] * nd, ["h0"], name="h_dirs", axis=0)]
        ins[5] = "h0"
        if op == "LSTM":
            nodes.append(helper.make_node("Neg", ["h0"], ["c0"], name="c_init"))
            ins[6] = "c0"
    ins = ins[:7] if op == "LSTM" else ins[:6]
    while ins and not ins[-1]:
        ins.pop()
    attrs = dict(hidden_size=H, direction=direction)
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    outs = ["Y", "Y_h"] if y_named else ["", "Y_h"]
    nodes.append(helper.make_node(op, ins, outs, name="rnn", **attrs))
    graph_out = "Y" if y_named else "Y_h"
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", T, I])]
    if seq:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["N"]))
    shape = [T, nd, "N", H] if y_named else [nd, "N", H]
    gr = helper.make_graph(nodes, "rnn", inputs, [helper.make_tensor_value_info(graph_out, TensorProto.FLOAT, shape)],
                           inits)
    m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(m, full_check=True)
    return m


def feed(n=6, seed=0, seq=True):
    rng = np.random.default_rng(seed)
    # structured inputs: a slow sinusoid per sample plus noise, so that the Hessians are not isotropic
    t = np.arange(T)[None, :, None]
    f = rng.uniform(0.2, 1.0, size=(n, 1, I))
    x = np.sin(f * t + rng.uniform(0, 6, size=(n, 1, I))) + 0.3 * rng.standard_normal((n, T, I))
    out = {"X": x.astype(np.float32)}
    if seq:
        out["lens"] = rng.integers(2, T + 1, size=n).astype(np.int32)
        out["lens"][0] = T
    return out


def _ort(m, fd):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, fd)


# ---- the columns, formed independently of the adapter ---------------------------------------------------------

def _node_run(model, fd):
    """Xt, lens, h0, per-sample Y and the weights of the recurrent node. The reference evaluator ignores
    sequence_lens, so each sequence runs alone, cut to its length (what sequence_lens means); ORT's Y is
    checked against that on the valid steps."""
    node = next(n for n in model.graph.node if n.op_type in GATES)
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    for t in ["Xt", "h0", "c0"]:
        if any(t in n.output for n in aug.graph.node):
            aug.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    outs = dict(zip([o.name for o in aug.graph.output], ReferenceEvaluator(aug).run(None, fd)))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xt, h0, c0 = outs["Xt"], outs.get("h0"), outs.get("c0")
    n = xt.shape[1]
    lens = fd.get("lens", np.full(n, T))
    single = helper.make_node(node.op_type, ["X", "W", "R", "B", "", "h0"] + (["c0"] if c0 is not None else []),
                              ["Y"], **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    vi = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("X", "h0", "c0")]
    g = helper.make_graph([single], "one", vi[:3 if c0 is not None else 2],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(inits[k], k) for k in ("W", "R", "B")])
    ref = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]))
    nd = inits["W"].shape[0]
    h0 = np.zeros((nd, n, H), np.float32) if h0 is None else h0
    ys = []
    for b in range(n):
        f = {"X": xt[:lens[b], b:b + 1], "h0": h0[:, b:b + 1]}
        if c0 is not None:
            f["c0"] = c0[:, b:b + 1]
        ys.append(ref.run(None, f)[0][:, :, 0])  # [len, nd, H]
    y_ort = None
    if node.output[0]:
        y_ort = _ort(model, fd)[0]
        for b in range(n):
            np.testing.assert_allclose(y_ort[:lens[b], :, b], ys[b], rtol=1e-4, atol=1e-5)
            assert not y_ort[lens[b]:, :, b].any()  # ORT zeroes the steps beyond a sequence's length
    return node, xt, lens, h0, ys, inits


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _want_grams(model, feeds):
    """{W: (nd, I, I), R: (groups, H, H)}, sums over every valid step, and the number of columns."""
    hw = hr = None
    ncols = 0
    for fd in feeds:
        node, xt, lens, h0, ys, inits = _node_run(model, fd)
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nd = inits["W"].shape[0]
        n = xt.shape[1]
        split = op == "GRU" and not attrs.get("linear_before_reset", 0)
        gw = np.zeros((nd, I, I))
        gr = np.zeros((nd * 3 if split else nd, H, H))
        for bi in range(n):
            for d in range(nd):
                rev = d == 1 or attrs.get("direction", b"forward") in (b"reverse", "reverse")
                steps = range(lens[bi] - 1, -1, -1) if rev else range(lens[bi])
                h = h0[d, bi].astype(np.float64)
                for t in steps:
                    x = xt[t, bi].astype(np.float64)
                    gw[d] += np.outer(x, x)
                    if split:
                        wr, rr, bb = inits["W"][d, H:2 * H], inits["R"][d, H:2 * H], inits["B"][d]
                        rg = _sigmoid(wr @ x + rr @ h + bb[H:2 * H] + bb[4 * H:5 * H])
                        gr[3 * d] += np.outer(h, h)
                        gr[3 * d + 1] += np.outer(h, h)
                        gr[3 * d + 2] += np.outer(rg * h, rg * h)
                    else:
                        gr[d] += np.outer(h, h)
                    h = ys[bi][t, d].astype(np.float64)  # the state the next step of this direction reads
                    if d == 0:
                        ncols += 1
        hw = gw if hw is None else hw + gw
        hr = gr if hr is None else hr + gr
    return hw, hr, ncols


CASES = [
    dict(op="LSTM"), dict(op="LSTM", direction="forward", seq=False, init=False),
    dict(op="LSTM", direction="reverse", init=False), dict(op="LSTM", y_named=False),
    dict(op="GRU"), dict(op="GRU", lbr=1), dict(op="GRU", direction="reverse", seq=False),
    dict(op="RNN"), dict(op="RNN", direction="forward", init=False),
]
IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c in CASES]


def test_found_as_two_layers_per_node():
    m = rnn_model("LSTM")
    layers, skipped = find_layers(m)
    by = {l.name: l for l in layers}
    assert set(by) == {"rnn/W", "rnn/R"}
    assert (by["rnn/W"].groups, by["rnn/W"].rows, by["rnn/W"].cols) == (2, 4 * H, I)
    assert (by["rnn/R"].groups, by["rnn/R"].rows, by["rnn/R"].cols) == (2, 4 * H, H)
    assert by["rnn/W"].layout.weight_input == 1 and by["rnn/R"].layout.weight_input == 2
    g = {l.name: l for l in find_layers(rnn_model("GRU", lbr=0))[0]}
    assert (g["rnn/R"].groups, g["rnn/R"].rows) == (6, H)  # z, r, h gates apart: h sees r * h
    assert (g["rnn/W"].groups, g["rnn/W"].rows) == (2, 3 * H)
    mats = g["rnn/R"].layout.to_matrices(g["rnn/R"].weight)
    np.testing.assert_array_equal(g["rnn/R"].layout.from_matrices(mats, g["rnn/R"].weight.shape), g["rnn/R"].weight)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hessians_equal_a_direct_computation(case):
    m = rnn_model(**case)
    feeds = [feed(5, seed=1, seq=case.get("seq", True)), feed(4, seed=2, seq=case.get("seq", True))]
    layers, _ = find_layers(m)
    stats = collect_hessians(m, layers, feeds, optimize="off")
    hw, hr, ncols = _want_grams(m, feeds)
    np.testing.assert_allclose(stats["rnn/W"].xtx, hw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["rnn/R"].xtx, hr, rtol=1e-5, atol=1e-5)
    assert stats["rnn/W"].columns == ncols == stats["rnn/R"].columns
    assert stats["rnn/W"].samples == 9
    # without Hessians the columns are still counted (for MACs)
    counts = collect_hessians(m, layers, feeds, hessians=False)
    assert counts["rnn/W"].columns == ncols


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_layout_1_columns_equal_layout_0(op):
    """ONNX Runtime runs only layout 0: the batch-first layout's columns are checked on the reference evaluator's
    outputs, against the same sequences in layout 0."""
    rng = np.random.default_rng(5)
    nd, g, n = 2, GATES[op], 3
    w = rng.standard_normal((nd, g * H, I)).astype(np.float32) / 3
    r = rng.standard_normal((nd, g * H, H)).astype(np.float32) / 3
    x = rng.standard_normal((T, n, I)).astype(np.float32)
    h0 = rng.standard_normal((nd, n, H)).astype(np.float32)
    lens = np.array([T, 3, 5], np.int32)
    got = {}
    for layout in (0, 1):
        xs = x if layout == 0 else x.transpose(1, 0, 2)
        hs = h0 if layout == 0 else h0.transpose(1, 0, 2)
        node = helper.make_node(op, ["X", "W", "R", "", "lens", "h0"], ["Y"], hidden_size=H,
                                direction="bidirectional", layout=layout)
        gr = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, None)
                                             for k in ("X", "W", "R", "h0")]
                               + [helper.make_tensor_value_info("lens", TensorProto.INT32, None)],
                               [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
        mm = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 14)])
        (y,) = ReferenceEvaluator(mm).run(None, {"X": xs, "W": w, "R": r, "h0": hs, "lens": lens})
        attrs = dict(hidden_size=H, direction="bidirectional", layout=layout, linear_before_reset=1)
        lw = OpLayout(op, dict(attrs, part="W"))
        lr = OpLayout(op, dict(attrs, part="R"))
        got[layout] = (lw.gram(xs, w.shape, sequence_lens=lens)[0], lr.gram(y, r.shape, sequence_lens=lens,
                                                                            initial_h=hs)[0])
    for a, b in zip(got[0], got[1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _weights(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_exact_and_obq_end_to_end_beat_the_baselines(op):
    m = rnn_model(op, lbr=0)
    feeds = [feed(16, seed=3)]
    test = feed(16, seed=4)
    dense = _ort(m, test)[0]
    res = {}
    for name, cfg in {"exact50": dict(sparsity=0.5), "mag50": dict(method="magnitude", sparsity=0.5),
                      "obq4": dict(bits=4), "rtn4": dict(method="rtn", bits=4)}.items():
        r = compress(m, None, feeds, CompressConfig(**cfg))
        assert {l.name for l in r.layers} == {"rnn/W", "rnn/R"}
        assert all(l.op == op and l.method != "dense" for l in r.layers)
        out = r.extra["model"]
        onnx.checker.check_model(out, full_check=True)
        ws = _weights(out)
        for k in ("W", "R"):
            if "50" in name:
                assert abs(np.mean(ws[k] == 0) - 0.5) < 0.05
            else:  # every row of every direction on its own 16-level grid
                assert all(len(np.unique(row)) <= 16 for row in ws[k].reshape(-1, ws[k].shape[-1]))
        np.testing.assert_array_equal(ws["B"], _weights(m)["B"])  # the bias stays as it was
        errs = {l.name: l.error for l in r.layers}
        res[name] = (errs, float(np.linalg.norm(_ort(out, test)[0] - dense) / np.linalg.norm(dense)))
    # the layer-wise objective: exact beats its baseline on W and on R. The model's output is not compared between
    # them: 5 hidden units pruned to 50% through sigmoid gates weigh the gates' errors very differently from the
    # layer-wise objective (docs/RESULTS.md measures a trained model instead)
    for a, b in (("exact50", "mag50"), ("obq4", "rtn4")):
        for k in ("rnn/W", "rnn/R"):
            assert res[a][0][k] < res[b][0][k], (a, b, k, res)
    assert res["obq4"][1] < 0.15 and res["exact50"][1] < 0.7, res


@pytest.mark.parametrize("case", [dict(op="LSTM"), dict(op="GRU", direction="forward"), dict(op="GRU"),
                                  dict(op="RNN")], ids=["lstm-bi", "gru-fwd", "gru-bi", "rnn-bi"])
@pytest.mark.parametrize("cfg", [dict(bits=8), dict(bits=4, method="rtn", sym=True), dict(bits=4, group_size=3)],
                         ids=["obq8", "rtn4sym", "g3"])
def test_qdq_storage_equals_the_solved_weight(case, cfg):
    m = rnn_model(opset=21 if cfg["bits"] == 4 else 17, **case)
    feeds = [feed(8, seed=5)]
    fake = compress(m, None, feeds, CompressConfig(**cfg)).extra["model"]
    r = compress(m, None, feeds, CompressConfig(qdq=True, **cfg))
    out = r.extra["model"]
    onnx.checker.check_model(out, full_check=True)
    nd = 1 if case.get("direction") == "forward" else 2
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 * nd
    for dq in dqs:
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == (2 if cfg.get("group_size") else 1)
    node = next(n for n in out.graph.node if n.op_type == case["op"])
    aug = onnx.ModelProto()
    aug.CopyFrom(out)
    for k in (1, 2):
        aug.graph.output.append(helper.make_tensor_value_info(node.input[k], TensorProto.FLOAT, None))
    got = _ort(aug, feeds[0])[-2:]
    want = _weights(fake)
    np.testing.assert_array_equal(got[0], want["W"])
    np.testing.assert_array_equal(got[1], want["R"])
    for a, b in zip(_ort(fake, feeds[0]), _ort(out, feeds[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    kept = sum(tensor_data_bytes(t) for t in m.graph.initializer if t.name not in ("W", "R"))
    written = sum(tensor_data_bytes(t) for t in out.graph.initializer)
    assert written - kept == sum(l.cost["bytes"] for l in r.layers)


def test_include_selects_w_or_r():
    m = rnn_model("GRU", lbr=1)
    feeds = [feed(8, seed=6)]
    r = compress(m, None, feeds, CompressConfig(bits=4, include="rnn/R"))
    assert [l.name for l in r.layers] == ["rnn/R"]
    ws, w0 = _weights(r.extra["model"]), _weights(m)
    np.testing.assert_array_equal(ws["W"], w0["W"])
    assert not np.array_equal(ws["R"], w0["R"])
    r = compress(m, None, feeds, CompressConfig(sparsity=0.5, exclude="/R$"))
    assert [l.name for l in r.layers] == ["rnn/W"]


def test_macs_are_steps_times_weights():
    m = rnn_model("LSTM", y_named=True, seq=False)
    r = compress(m, None, [feed(8, seed=7, seq=False)], CompressConfig(method="rtn", bits=8))
    by = {l.name: l for l in r.layers}
    assert by["rnn/W"].macs == T * 2 * 4 * H * I
    assert by["rnn/R"].macs == T * 2 * 4 * H * H
    # Y unnamed (no static shape): from the steps seen in calibration (all T without sequence_lens)
    m = rnn_model("LSTM", y_named=False, seq=False)
    r = compress(m, None, [feed(8, seed=7, seq=False)], CompressConfig(method="rtn", bits=8))
    by = {l.name: l for l in r.layers}
    assert by["rnn/R"].macs == T * 2 * 4 * H * H


def test_w8a8_keeps_recurrent_activations_float_with_a_note():
    m = rnn_model("LSTM")
    r = compress(m, None, [feed(8, seed=8)], CompressConfig(bits=8, qdq=True, act_bits=8))
    out = r.extra["model"]
    node = next(n for n in out.graph.node if n.op_type == "LSTM")
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producers[node.input[0]] != "DequantizeLinear"
    assert any("keeps float activations" in str(a) for a in (r.activations or []))
    _ort(out, feed(4, seed=9))


def test_gru_with_an_unknown_gate_activation_is_skipped_with_its_reason():
    m = rnn_model("GRU", lbr=0, direction="forward")
    node = next(n for n in m.graph.node if n.op_type == "GRU")
    node.attribute.append(helper.make_attribute("activations", ["Softsign", "Tanh"]))
    layers, skipped = find_layers(m)
    assert [l.name for l in layers] == ["rnn/W"]
    (s,) = [s for s in skipped if s.node_name == "rnn/R"]
    assert "Softsign" in s.reason


@pytest.mark.parametrize("y_named", [True, False], ids=["Y-named", "Y-unnamed"])
def test_staged_and_sequential_passes_record_the_hidden_states(y_named):
    """Stages run a pruned copy of the graph: an unnamed Y must still be exposed there (it is named before the
    copy is pruned), and the staged Hessians equal one pass's."""
    m = rnn_model("LSTM", y_named=y_named)
    feeds = [feed(12, seed=5)]
    one = compress(m, None, feeds, CompressConfig(bits=4))
    staged = compress(m, None, feeds, CompressConfig(bits=4, stage_memory=1e-6))  # every layer its own stage
    assert staged.memory["staged"] and staged.memory["stages"] == 2
    assert [(l.name, l.error) for l in staged.layers] == [(l.name, l.error) for l in one.layers]
    for k, w in _weights(one.extra["model"]).items():
        np.testing.assert_array_equal(_weights(staged.extra["model"])[k], w)
    seq = compress(m, None, feeds, CompressConfig(bits=4, sequential=True))
    assert {l.name for l in seq.layers} == {"rnn/W", "rnn/R"} and all(l.error is not None for l in seq.layers)
