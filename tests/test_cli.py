"""The `onnxobc` command: contract, exit codes, clear errors, files left (or not) behind."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphs
from onnxobc.cli import main


@pytest.fixture
def tiny(tmp_path):
    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", **graphs.make_feed(model, 20))
    return path, tmp_path / "calib.npz"


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_inspect_table_and_json(tiny, capsys):
    path, _ = tiny
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "conv2" in out and "8x18" in out and "4 compressible layers" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {l["name"] for l in info["layers"]} == {"conv1", "conv2", "fc1", "fc2"}
    conv2 = next(l for l in info["layers"] if l["name"] == "conv2")
    assert conv2["groups"] == 4 and conv2["C"] == 18 and conv2["macs"] > 0


def test_inspect_reports_skipped(tmp_path, capsys):
    p = tmp_path / "q.onnx"
    onnx.save(graphs.already_quantized(), str(p))
    assert main(["inspect", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert not info["layers"] and all("quantized" in s["reason"] for s in info["skipped"])


def test_compress_writes_model_report_and_table(tiny, capsys):
    path, calib = tiny
    digest = _digest(path)
    out = path.with_name("out.onnx")
    rep = path.with_name("rep.json")
    assert main(["compress", str(path), "-o", str(out), "--calib", str(calib), "--method", "magnitude",
                 "--sparsity", "0.5", "--report", str(rep), "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "fc1" in text and "error" in text and "50.0%" in text
    report = json.loads(rep.read_text())
    assert [l["name"] for l in report["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(0 < l["error"] < 1 for l in report["layers"]) and report["samples"] == 20
    assert _digest(path) == digest
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_existing_output_needs_force(tiny, capsys):
    path, calib = tiny
    out = path.with_name("out.onnx")
    out.write_bytes(b"keep me")
    args = ["compress", str(path), "-o", str(out), "--calib", str(calib), "--method", "rtn", "--bits", "8", "-q"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(args + ["--force"]) == 0
    onnx.load(str(out))


def test_output_equal_to_input_is_refused(tiny, capsys):
    path, calib = tiny
    digest = _digest(path)
    assert main(["compress", str(path), "-o", str(path), "--calib", str(calib), "--bits", "8", "--method", "rtn",
                 "--force"]) == 2
    assert "input" in capsys.readouterr().err and _digest(path) == digest


@pytest.mark.parametrize("args, code, message", [
    (["--sparsity", "1.5"], 2, "--sparsity must be in [0, 1)"),
    (["--bits", "9"], 2, "--bits must be between 2 and 8"),
    ([], 2, "nothing to do"),
    (["--nm", "4:2"], 2, "0 < N < M"),
    (["--nm", "2:4", "--sparsity", "0.5"], 2, "give one of them"),
    (["--method", "rtn", "--sparsity", "0.5"], 2, "--method rtn quantizes"),
    (["--sparsity", "0.5", "--include", "("], 2, "not a valid regular expression"),
    (["--sparsity", "0.5", "--include", "nomatch", "--method", "magnitude"], 2, "left none"),
])
def test_bad_options(tiny, capsys, args, code, message):
    path, calib = tiny
    out = path.with_name("o.onnx")
    assert main(["compress", str(path), "-o", str(out), "--calib", str(calib)] + args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_bad_inputs(tmp_path, tiny, capsys):
    path, calib = tiny
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    out = tmp_path / "o.onnx"
    assert main(["compress", str(junk), "-o", str(out), "--calib", str(calib), "--bits", "8"]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "nope.onnx"), "-o", str(out), "--calib", str(calib), "--bits", "8"]) == 2
    assert "not found" in capsys.readouterr().err
    other = graphs.matmul_2d()
    np.savez(tmp_path / "wrong.npz", **graphs.make_feed(other, 4))
    assert main(["compress", str(path), "-o", str(out), "--calib", str(tmp_path / "wrong.npz"), "--bits", "8",
                 "--method", "rtn"]) == 1
    err = capsys.readouterr().err
    assert "the model expects rank 4" in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".onnxobc-*"))


def test_nothing_compressible(tmp_path, capsys):
    p = tmp_path / "d.onnx"
    onnx.save(graphs.dynamic_weight(), str(p))
    np.savez(tmp_path / "c.npz", **graphs.make_feed(graphs.dynamic_weight(), 2))
    assert main(["compress", str(p), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c.npz"),
                 "--bits", "8", "--method", "rtn"]) == 2
    assert "no compressible" in capsys.readouterr().err


def test_console_script_no_traceback(tmp_path):
    """The installed command: a bad model gives one error line and exit 1, --debug shows the traceback."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"garbage")
    cmd = [sys.executable, "-m", "onnxobc", "compress", str(junk), "--calib", "x.npz", "--bits", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run(cmd + ["--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "onnxobc", "compress", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--sparsity" in r.stdout and "--calib" in r.stdout


def test_device_cuda_without_gpu_is_a_clear_error(tiny, capsys):
    from onnxobc.backend import cuda_available

    if cuda_available():
        pytest.skip("a CUDA device is present")
    path, calib = tiny
    out = path.with_name("o.onnx")
    assert main(["compress", str(path), "-o", str(out), "--calib", str(calib), "--sparsity", "0.5",
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert ("CuPy" in err or "CUDA" in err) and "Traceback" not in err and not out.exists()


def test_verify_prints_agreement_and_reports_strict_json(tiny, capsys):
    path, calib = tiny
    out, rep = path.with_name("v.onnx"), path.with_name("v.json")
    assert main(["compress", str(path), "-o", str(out), "--calib", str(calib), "--sparsity", "0.0",
                 "--method", "magnitude", "--verify", "--verify-samples", "8", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "verify on 8 samples of" in text and "in-sample" in text and "rel L2 0.000e+00" in text
    report = json.loads(rep.read_text())  # strict JSON: SQNR of identical outputs is the string "inf"
    assert report["verify"]["outputs"][0]["sqnr_db"] == "inf"


def test_verify_stops_a_broken_graph_before_it_is_written(tiny, capsys, monkeypatch):
    from onnxobc.export.writeback import GraphEdit

    real = GraphEdit.finish

    def sabotage(self):  # a graph ONNX Runtime cannot run: a consumer reads a missing tensor
        real(self)
        self.model.graph.node[-1].input[0] = "does_not_exist"

    monkeypatch.setattr(GraphEdit, "finish", sabotage)
    path, calib = tiny
    out = path.with_name("broken.onnx")
    code = main(["compress", str(path), "-o", str(out), "--calib", str(calib), "--bits", "8", "--verify"])
    assert code == 1 and not out.exists()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_calibration_data_is_refused_before_any_solve(tiny, tmp_path, capsys, monkeypatch, bad):
    """NaN / Inf in the calibration data: one line naming the input and the sample, exit 1, nothing written, no
    layer solved (they would poison every Hessian)."""
    import onnxobc.executor as executor

    path, calib = tiny
    feed = dict(np.load(calib))
    name = next(k for k, v in feed.items() if v.dtype.kind == "f")
    x = feed[name].copy()
    x[13].flat[5] = bad
    feed[name] = x
    np.savez(tmp_path / "bad.npz", **feed)
    solved = []
    monkeypatch.setattr(executor, "solve", lambda *a, **k: solved.append(a) or pytest.fail("a layer was solved"))
    out = tmp_path / "o.onnx"
    before = _digest(path)
    rc = main(["compress", str(path), "-o", str(out), "--calib", str(tmp_path / "bad.npz"), "--bits", "4",
               "--batch-size", "8"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"input '{name}'" in err and ("NaN" if np.isnan(bad) else "Inf") in err
    assert "bad.npz[8:16]" in err and "sample 5 of this batch" in err  # sample 13 = 5th of the second batch
    assert not out.exists() and not solved and _digest(path) == before
