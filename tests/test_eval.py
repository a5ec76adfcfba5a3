"""`onnxobc eval` and onnxobc.evaluate: streamed metrics against direct NumPy computations, accuracy on the shipped
model, sizes, latency, JSON report, and one-line errors for everything that does not fit."""
import json
import math

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxobc import CompressConfig, compress
from onnxobc.cli import main
from onnxobc.errors import CalibrationError, UsageError
from onnxobc.evaluate import OutputAccumulator, evaluate

MODEL = "models/fmnist_cnn.onnx"
TEST = "models/fmnist_test.npz"


@pytest.fixture(autouse=True)
def _repo_root(root, monkeypatch):
    monkeypatch.chdir(root)


def _run(model: onnx.ModelProto | str, feed: dict) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _direct(r: np.ndarray, c: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """The metrics straight from their definitions, on the full outputs at once."""
    r = r.astype(np.float64)
    c = c.astype(np.float64)
    rf, cf = r.reshape(len(r), -1), c.reshape(len(c), -1)
    out = {
        "rel_l2": np.linalg.norm(c - r) / np.linalg.norm(r),
        "sqnr_db": 10 * np.log10(np.sum(r ** 2) / np.sum((c - r) ** 2)),
        "cosine": np.mean([a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(rf, cf)]),
        "max_abs": np.max(np.abs(c - r)),
    }
    if r.ndim == 2:
        k = min(5, r.shape[1])
        ref_topk = np.argsort(-r, axis=1)[:, :k]
        out["top1"] = np.mean(r.argmax(1) == c.argmax(1))
        out["top5"] = np.mean([cc in set(rk) for cc, rk in zip(c.argmax(1), ref_topk)])
        if labels is not None:
            out["acc_ref"] = np.mean(r.argmax(1) == labels)
            out["acc_cand"] = np.mean(c.argmax(1) == labels)
    return out


@pytest.fixture(scope="module")
def perturbed():
    """mixed_cnn, its 2-bit RTN copy, 29 samples (uneven batches) and random labels."""
    ref = graphs.mixed_cnn()
    feed = graphs.make_feed(ref, 29, seed=3)
    cand = compress(ref, None, [graphs.make_feed(ref, 16)], CompressConfig(method="rtn", bits=2)).extra["model"]
    labels = np.random.default_rng(0).integers(0, 10, size=29)
    return ref, cand, feed, labels


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxobc: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


# ---- metrics --------------------------------------------------------------------------------------------

def test_identical_models_give_exact_agreement():
    model = graphs.mixed_cnn()
    feeds = [graphs.make_feed(model, 8, seed=s) for s in range(2)]
    res = evaluate(model, model, feeds, latency_runs=2)
    o = res.output("Y")
    assert o.rel_l2 == 0.0 and o.sqnr_db == math.inf and o.max_abs == 0.0
    assert o.cosine == pytest.approx(1.0, abs=1e-12)
    assert o.is_class and o.classes == 10 and o.top1 == 1.0 and o.top5 == 1.0 and o.topk == 5
    assert res.samples == 16 and res.batches == 2 and o.samples == 16
    assert res.latency_ms["runs"] == 2 and res.latency_ms["reference"] > 0 and res.latency_ms["batch_samples"] == 8
    assert res.reference_bytes == res.candidate_bytes == model.ByteSize()
    assert res.labels is None and o.acc_ref is None


def test_perturbed_candidate_matches_numpy(perturbed, tmp_path):
    ref, cand, feed, labels = perturbed
    np.savez(tmp_path / "d.npz", **feed, lab=labels)
    res = evaluate(ref, cand, tmp_path / "d.npz", labels="lab", batch_size=8, latency_runs=0)
    assert res.batches == 4 and res.samples == 29 and res.latency_ms is None and res.label_output == "Y"
    want = _direct(_run(ref, feed), _run(cand, feed), labels)
    o = res.output("Y").to_dict()
    assert want["rel_l2"] > 0.01  # the candidate really differs
    assert want["top1"] < 1 or want["acc_ref"] != want["acc_cand"]
    for k, v in want.items():
        assert o[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    # Python feeds with an array of labels give the same numbers
    feeds = [{"X": feed["X"][i:i + 10]} for i in range(0, 29, 10)]
    res2 = evaluate(ref, cand, feeds, labels=labels, latency_runs=0)
    assert res2.batches == 3 and res2.batch_size is None
    for k in want:
        assert res2.output("Y").to_dict()[k] == pytest.approx(o[k], rel=1e-5, abs=1e-7), k


def test_non_class_output_and_sample_count(tmp_path):
    """Rank-3 output: no agreement numbers; --samples cuts the data."""
    ref = graphs.matmul_3d()
    init = ref.graph.initializer
    cand = onnx.ModelProto.FromString(ref.SerializeToString())
    w = onnx.numpy_helper.to_array(cand.graph.initializer[0])
    cand.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.round(w, 1), init[0].name))
    feed = graphs.make_feed(ref, 12)
    res = evaluate(ref, cand, [feed], max_samples=7, latency_runs=0)
    o = res.output("Y")
    assert res.samples == 7 and o.sample_shape == [5, 8] and not o.is_class and o.top1 is None
    want = _direct(_run(ref, {"X": feed["X"][:7]}), _run(cand, {"X": feed["X"][:7]}))
    for k, v in want.items():
        assert getattr(o, k) == pytest.approx(v, rel=1e-5), k


def test_accumulator_edge_cases():
    acc = OutputAccumulator("y")
    r = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [3.0, 2.0, 2.0]], np.float32)
    c = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 3.0]], np.float32)
    acc.update(r[:2], c[:2], 2)
    acc.update(r[2:], c[2:], 1)
    o = acc.result()
    # cosine: both zero -> 1, one zero -> 0, last pair by the formula
    last = r[2] @ c[2] / (np.linalg.norm(r[2]) * np.linalg.norm(c[2]))
    assert o.cosine == pytest.approx((1 + 0 + last) / 3)
    # K = 3 < 5: top-3 always contains the candidate's class; top-1: argmax ties -> lowest index
    assert o.topk == 3 and o.top5 == 1.0 and o.top1 == pytest.approx(1 / 3)
    z = OutputAccumulator("z")
    z.update(np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32), 2)
    assert z.result().rel_l2 == math.inf and z.result().sqnr_db == -math.inf


# ---- shipped model, sizes ------------------------------------------------------------------------------

def test_shipped_model_accuracy_against_numpy():
    n = 800
    z = np.load(TEST)
    images, labels = z["image"][:n], z["label"][:n]
    cand = compress(onnx.load(MODEL), None, [{"image": z["image"][4000:4064]}],
                    CompressConfig(method="rtn", bits=2)).extra["model"]
    res = evaluate(MODEL, cand, TEST, labels="label", max_samples=n, batch_size=200, latency_runs=0)
    want = _direct(_run(MODEL, {"image": images}), _run(cand, {"image": images}), labels)
    o = res.output("logits")
    assert o.acc_ref == pytest.approx(want["acc_ref"], abs=1e-12) and 0.88 < o.acc_ref < 0.95
    assert o.acc_cand == pytest.approx(want["acc_cand"], abs=1e-12) and o.acc_cand != o.acc_ref
    assert o.top1 == pytest.approx(want["top1"], abs=1e-12) and o.top5 == pytest.approx(want["top5"], abs=1e-12)
    assert res.reference_bytes == 480714 and res.candidate_bytes == cand.ByteSize()


def test_cli_identical_shipped_model_table_and_json(tmp_path, capsys):
    rep = tmp_path / "eval.json"
    assert main(["eval", MODEL, MODEL, "--data", TEST, "--labels", "label", "--samples", "400",
                 "--latency-runs", "3", "--json", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "inf" in out and "100.00%" in out and "469.45 kB" in out and "latency" in out
    data = json.loads(rep.read_text(), parse_constant=lambda s: pytest.fail(f"non-standard JSON constant {s}"))
    o = data["outputs"][0]
    assert o["sqnr_db"] == "inf" and o["rel_l2"] == 0 and o["top1"] == 1 and o["top5"] == 1
    assert o["acc_ref"] == o["acc_cand"] and data["samples"] == 400 and data["latency_ms"]["runs"] == 3
    assert "top-k" in data["definitions"]["top5"]
    # an existing report is kept without --force, replaced with it
    before = rep.read_text()
    rc = main(["eval", MODEL, MODEL, "--data", TEST, "--samples", "32", "--json", str(rep)])
    _one_line_error(capsys, rc, "already exists", "--force")
    assert rep.read_text() == before
    assert main(["eval", MODEL, MODEL, "--data", TEST, "--samples", "32", "--latency-runs", "0", "-q",
                 "--json", str(rep), "--force"]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads(rep.read_text())["samples"] == 32 and not list(tmp_path.glob("*.tmp"))


def test_sizes_count_external_data_and_directory_labels(tmp_path):
    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    data_file = graphs.save_with_external_data(model, path)
    feeds = [graphs.make_feed(model, n, seed=n) for n in (5, 7)]
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 10, size=len(f["X"])) for f in feeds]
    d = tmp_path / "data"
    d.mkdir()
    for i, (f, lab) in enumerate(zip(feeds, labels)):
        np.savez(d / f"part{i}.npz", **f, y=lab)
    res = evaluate(path, model, d, labels="y", latency_runs=0)
    assert res.reference_bytes == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert res.reference_bytes > 2 * path.stat().st_size and data_file.endswith(".data")
    assert res.samples == 12 and res.output("Y").rel_l2 == 0.0
    all_x = np.concatenate([f["X"] for f in feeds])
    assert res.output("Y").acc_ref == pytest.approx(np.mean(_run(model, {"X": all_x}).argmax(1)
                                                            == np.concatenate(labels)))


# ---- errors ---------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    def save(model, name):
        p = tmp_path / name
        onnx.save(model, str(p))
        return str(p)
    return save


def test_cli_mismatched_inputs(saved, tmp_path, capsys):
    a = saved(graphs.gemm_transB1(), "a.onnx")
    b = saved(graphs.conv2d_basic(), "b.onnx")
    np.savez(tmp_path / "d.npz", **graphs.make_feed(graphs.gemm_transB1(), 4))
    rc = main(["eval", a, b, "--data", str(tmp_path / "d.npz")])
    _one_line_error(capsys, rc, "inputs do not match", "'X' has rank 2 in the reference, 4 in the candidate")


def test_cli_mismatched_outputs(saved, tmp_path, capsys):
    a = saved(graphs.gemm_transB1(), "a.onnx")
    b = saved(graphs.gemm_no_bias(), "b.onnx")  # same input, Y is [N,12] instead of [N,16]
    np.savez(tmp_path / "d.npz", **graphs.make_feed(graphs.gemm_transB1(), 4))
    rc = main(["eval", a, b, "--data", str(tmp_path / "d.npz")])
    _one_line_error(capsys, rc, "outputs do not match", "Y: float32[N,16]", "Y: float32[N,12]")
    renamed = graphs.gemm_transB1()
    renamed.graph.node[0].output[0] = "Z"
    renamed.graph.output[0].name = "Z"
    c = saved(renamed, "c.onnx")
    rc = main(["eval", a, c, "--data", str(tmp_path / "d.npz")])
    _one_line_error(capsys, rc, "outputs do not match", "only in the reference: Y", "only in the candidate: Z")


def test_cli_label_errors(saved, tmp_path, capsys, perturbed):
    ref, cand, feed, labels = perturbed
    a, b = saved(ref, "a.onnx"), saved(cand, "b.onnx")
    np.savez(tmp_path / "d.npz", **feed, lab=labels[:-1], bad=labels + 10)
    d = str(tmp_path / "d.npz")
    rc = main(["eval", a, b, "--data", d, "--labels", "label"])
    _one_line_error(capsys, rc, "no array 'label'", "arrays: X, lab, bad")
    rc = main(["eval", a, b, "--data", d, "--labels", "lab"])
    _one_line_error(capsys, rc, "28 entries", "29 samples", "one label per sample")
    rc = main(["eval", a, b, "--data", d, "--labels", "bad"])
    _one_line_error(capsys, rc, "not a class index of output 'Y' (0..9)")
    rc = main(["eval", a, b, "--data", d, "--labels", "bad", "--output", "nope"])
    _one_line_error(capsys, rc, "--output nope: no such numeric output (outputs: Y)")


def test_cli_missing_or_invalid_model(saved, tmp_path, capsys):
    a = saved(graphs.gemm_transB1(), "a.onnx")
    np.savez(tmp_path / "d.npz", **graphs.make_feed(graphs.gemm_transB1(), 4))
    rc = main(["eval", a, str(tmp_path / "missing.onnx"), "--data", str(tmp_path / "d.npz")])
    _one_line_error(capsys, rc, "candidate model file not found", "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    rc = main(["eval", str(tmp_path / "junk.onnx"), a, "--data", str(tmp_path / "d.npz")])
    _one_line_error(capsys, rc, "junk.onnx")


def test_cli_data_that_does_not_fit(saved, tmp_path, capsys):
    a = saved(graphs.gemm_transB1(), "a.onnx")
    np.savez(tmp_path / "d.npz", X=np.zeros((4, 9), np.float32))
    rc = main(["eval", a, a, "--data", str(tmp_path / "d.npz")])
    _one_line_error(capsys, rc, "input 'X' has shape (4, 9)")
    rc = main(["eval", a, a, "--data", str(tmp_path / "nothing.npz")])
    _one_line_error(capsys, rc, "not found")


def test_api_errors(perturbed):
    ref, cand, feed, labels = perturbed
    with pytest.raises(UsageError, match="pass the labels as an array"):
        evaluate(ref, cand, [feed], labels="lab")
    with pytest.raises(CalibrationError, match="labels hold 28 entries but the data has more samples"):
        evaluate(ref, cand, [feed], labels=labels[:-1], latency_runs=0)
    with pytest.raises(CalibrationError, match="labels hold 30 entries but the data gave 29 samples"):
        evaluate(ref, cand, [feed], labels=np.append(labels, 0), latency_runs=0)
    res = evaluate(ref, cand, [feed], labels=labels, max_samples=10, latency_runs=0)  # labels beyond the cut: fine
    assert res.samples == 10 and res.output("Y").acc_ref == np.mean(_run(ref, feed)[:10].argmax(1) == labels[:10])
    with pytest.raises(UsageError, match="labels need a class output"):
        m = graphs.matmul_3d()
        evaluate(m, m, [graphs.make_feed(m, 3)], labels=np.zeros(3, np.int64))
    with pytest.raises(UsageError, match="--batch-size"):
        evaluate(ref, cand, [feed], batch_size=0)


def _masked_pair():
    """Reference y = x; candidate y = x + 5 at padded positions only (attention_mask == 0)."""
    from onnx import TensorProto as T, helper as h

    ins = [h.make_tensor_value_info("x", T.FLOAT, ["N", "S", 4]),
           h.make_tensor_value_info("attention_mask", T.INT64, ["N", "S"])]
    out = [h.make_tensor_value_info("y", T.FLOAT, ["N", "S", 4])]
    ref = h.make_model(h.make_graph([h.make_node("Identity", ["x"], ["y"])], "ref", ins, out),
                       opset_imports=[h.make_opsetid("", 13)])
    five = h.make_tensor("five", T.FLOAT, [], [5.0])
    one = h.make_tensor("one", T.FLOAT, [], [1.0])
    axes = h.make_tensor("axes", T.INT64, [1], [2])
    nodes = [h.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT), h.make_node("Sub", ["one", "m"], ["pad"]),
             h.make_node("Unsqueeze", ["pad", "axes"], ["pad3"]), h.make_node("Mul", ["pad3", "five"], ["shift"]),
             h.make_node("Add", ["x", "shift"], ["y"])]
    cand = h.make_model(h.make_graph(nodes, "cand", ins, out, [five, one, axes]), opset_imports=[h.make_opsetid("", 13)])
    rng = np.random.default_rng(0)
    mask = np.ones((6, 5), np.int64)
    mask[:, 3:] = 0
    mask[0, :] = 1  # one sample without padding
    data = {"x": rng.normal(size=(6, 5, 4)).astype(np.float32), "attention_mask": mask}
    return ref, cand, data


def test_token_mask_rows_leave_padding_out(tmp_path, capsys):
    ref, cand, data = _masked_pair()
    res = evaluate(ref, cand, [data], latency_runs=0)
    assert res.token_mask == "attention_mask"
    full, real = res.output("y"), res.output("y[real tokens]")
    assert full.rel_l2 > 0.5 and full.cosine < 0.9  # the padded positions differ
    assert real.rel_l2 == 0.0 and real.cosine == 1.0 and real.samples == int(data["attention_mask"].sum())
    assert not real.is_class and real.top1 is None  # a [tokens, hidden] row is not a class output
    off = evaluate(ref, cand, [data], latency_runs=0, token_mask=None)
    assert [o.name for o in off.outputs] == ["y"] and off.token_mask is None
    # the CLI prints the extra row and says what it means
    np.savez(tmp_path / "d.npz", **data)
    onnx.save(ref, tmp_path / "r.onnx")
    onnx.save(cand, tmp_path / "c.onnx")
    assert main(["eval", str(tmp_path / "r.onnx"), str(tmp_path / "c.onnx"), "--data", str(tmp_path / "d.npz"),
                 "--latency-runs", "0"]) == 0
    out = capsys.readouterr().out
    assert "y[real tokens]" in out and "attention_mask" in out
    assert main(["eval", str(tmp_path / "r.onnx"), str(tmp_path / "c.onnx"), "--data", str(tmp_path / "d.npz"),
                 "--latency-runs", "0", "--token-mask", "none"]) == 0
    assert "real tokens" not in capsys.readouterr().out
