"""--act-search-target and --act-search-samples (issue 15): the in-sample stop of the W8A8 range search and the
samples it measures on."""
import numpy as np
import pytest

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.cli import main
from test_w8a8_placement import _run, outlier_mlp


def _search(calib, **kw):
    res = compress(outlier_mlp(), None, calib, CompressConfig(bits=8, act_bits=8, method="rtn", act_calib="search",
                                                              **kw))
    notes = [a["note"] for a in res.activations if "note" in a]
    kept = [n.split(":")[0] for n in notes if ": kept float" in n]
    return res, notes, kept


def test_search_target_decides_what_is_kept_float():
    model = outlier_mlp()
    calib = [graphs.make_feed(model, 32, seed=s) for s in range(2)]
    feed = {"X": np.concatenate([c["X"] for c in calib])}
    ref = _run(model, feed)[0]

    def err(res):
        return float(np.linalg.norm(_run(res.extra["model"], feed)[0] - ref) / np.linalg.norm(ref))

    strict, notes, kept = _search(calib)  # default 2x: t1 (the outlier tensor) costs far more, so it stays float
    assert kept == ["t1"], notes
    loose, notes_loose, kept_loose = _search(calib, act_search_target=1e6)  # already within 1e6 x: nothing kept
    assert kept_loose == [], notes_loose
    assert {a["tensor"] for a in loose.activations if "tensor" in a} == {"X", "t1"}
    assert err(loose) > 10 * err(strict), (err(loose), err(strict))
    head = next(n for n in notes_loose if n.startswith("range search on"))
    assert "with 0 tensors kept float" in head, head


def test_search_samples_are_the_ones_asked_for():
    model = outlier_mlp()
    calib = [graphs.make_feed(model, 16, seed=s) for s in range(4)]  # 64 samples
    _, notes, _ = _search(calib, act_search_samples=16)
    assert any(n.startswith("range search on 16 calibration samples (in-sample") for n in notes), notes
    _, notes, _ = _search(calib)
    assert any(n.startswith("range search on 64 calibration samples (in-sample") for n in notes), notes


@pytest.mark.parametrize("kw, message", [
    (dict(act_search_target=0.5), "--act-search-target must be >= 1"),
    (dict(act_search_target=float("nan")), "--act-search-target must be >= 1"),
    (dict(act_search_samples=0), "--act-search-samples must be >= 1"),
    (dict(act_search_metric="probability"), "--act-search-metric must be logits or output"),
])
def test_search_option_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        CompressConfig(bits=8, act_bits=8, act_calib="search", **kw)


def test_cli_search_target_error_is_one_line(root, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code = main(["compress", str(root / "models" / "fmnist_cnn.onnx"), "-o", str(out), "--calib",
                 str(root / "models" / "fmnist_calib.npz"), "--bits", "8", "--act-bits", "8", "--act-calib", "search",
                 "--act-search-target", "0.9"])
    err = capsys.readouterr().err
    assert code == 2 and "--act-search-target must be >= 1" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not out.exists()


def _softmax_model():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["X", "w"], ["z"], name="mm"),
             helper.make_node("Sigmoid", ["z"], ["P"], name="sig"),
             helper.make_node("Relu", ["z"], ["R"], name="relu")]
    g = helper.make_graph(nodes, "sig", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("P", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("R", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32),
                                                   "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def test_search_metric_output_scores_the_outputs_themselves():
    from onnxobc.calibrate.actsearch import scored_tensors

    model = _softmax_model()
    assert scored_tensors(model) == ["z", "R"]  # default: the logits behind the Sigmoid
    assert scored_tensors(model, "output") == ["P", "R"]
    with pytest.raises(ValueError, match="search metric must be one of logits, output"):
        scored_tensors(model, "probabilities")
    calib = [graphs.make_feed(model, 16, seed=s) for s in range(2)]
    heads = {}
    for metric in ("logits", "output"):
        res = compress(model, None, calib, CompressConfig(bits=8, act_bits=8, method="rtn", act_calib="search",
                                                          act_search_metric=metric))
        heads[metric] = next(a["note"] for a in res.activations if a.get("note", "").startswith("range search"))
        out = {o.name for o in res.extra["model"].graph.output}
        assert out == {"P", "R"}  # the scored tensors were only added for the search
    assert "(logits for Softmax/Sigmoid outputs)" in heads["logits"]
    assert "logits" not in heads["output"], heads["output"]
    # and the errors were taken on different tensors: the weight-only error on P is not the one on z
    w = {k: float(h.split("weight-only 8-bit: ")[1].rstrip(")")) for k, h in heads.items()}
    assert w["output"] != pytest.approx(w["logits"], rel=0.05), heads
