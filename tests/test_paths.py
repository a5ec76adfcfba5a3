"""Output paths checked before any work, and clear errors for unreadable data (issue 15, part 3)."""
import os

import numpy as np
import onnx
import pytest

import graphs
import onnxobc.paths as paths
from onnxobc.cli import main
from onnxobc.errors import UsageError
from onnxobc.paths import check_writable_outputs


@pytest.fixture
def tiny(tmp_path):
    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", **graphs.make_feed(model, 8))
    return path, tmp_path / "calib.npz"


def _one_line(capsys, rc, expected_rc, *needles):
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxobc: error: "), err
    assert "unexpected" not in err and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def _files(d):
    return sorted(p.name for p in d.iterdir())


def test_check_writable_outputs_unit(tmp_path, monkeypatch):
    check_writable_outputs({"a": tmp_path / "x.onnx", "b": None}, force=False)
    assert _files(tmp_path) == []  # the probe leaves nothing behind
    (tmp_path / "f.txt").write_text("x")
    cases = [
        ({"--report": tmp_path / "missing" / "r.json"}, "directory " + str(tmp_path / "missing") + " does not exist"),
        ({"--report": tmp_path / "f.txt" / "r.json"}, "is a file, not a directory"),
        ({"--report": tmp_path / "f.txt" / "sub" / "r.json"}, "is a file, not a directory"),
        ({"--json": tmp_path / "f.txt"}, "already exists"),
        ({"--json": tmp_path}, "is a directory"),
        ({"output": tmp_path / "o", "--report": tmp_path / "o"}, "is the output path"),
    ]
    for p, msg in cases:
        with pytest.raises(UsageError) as e:
            check_writable_outputs(p, force=False)
        assert msg in str(e.value) and "\n" not in str(e.value)
    check_writable_outputs({"--json": tmp_path / "f.txt"}, force=True)
    with pytest.raises(UsageError, match="is an input file"):
        check_writable_outputs({"output": tmp_path / "f.txt"}, force=True, inputs=[tmp_path / "f.txt"])


def test_read_only_directory_is_refused(tmp_path, monkeypatch):
    # root writes through chmod 0555, so read-only is simulated at the two places the check looks
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False)
    with pytest.raises(UsageError, match="is not writable"):
        check_writable_outputs([tmp_path / "o.onnx"], force=False)
    monkeypatch.undo()

    def refuse(directory):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(paths, "_probe", refuse)
    with pytest.raises(UsageError, match="cannot create files in directory .*Permission denied"):
        check_writable_outputs([tmp_path / "o.onnx"], force=False)


def test_compress_report_into_missing_directory_fails_first(tiny, tmp_path, capsys, monkeypatch):
    path, calib = tiny
    import onnxobc.pipeline as pl

    monkeypatch.setattr(pl, "collect_hessians", lambda *a, **k: pytest.fail("calibration ran"))
    before = _files(tmp_path)
    rc = main(["compress", str(path), "--calib", str(calib), "--bits", "8", "-o", str(tmp_path / "o.onnx"),
               "--report", str(tmp_path / "nodir" / "r.json")])
    _one_line(capsys, rc, 2, "nodir", "does not exist")
    rc = main(["compress", str(path), "--calib", str(calib), "--bits", "8", "-o", str(tmp_path / "o.onnx"),
               "--report", str(calib / "r.json")])
    _one_line(capsys, rc, 2, "is a file, not a directory")
    rc = main(["compress", str(path), "--calib", str(calib), "--bits", "8", "-o", str(tmp_path / "x" / "o.onnx")])
    _one_line(capsys, rc, 2, "does not exist")
    rc = main(["compress", str(path), "--calib", str(calib), "--bits", "8", "-o", str(calib), "--force"])
    _one_line(capsys, rc, 2, "is an input file")
    assert _files(tmp_path) == before


def test_compress_into_read_only_directory_fails_before_calibration(tiny, tmp_path, capsys, monkeypatch):
    path, calib = tiny
    import onnxobc.pipeline as pl

    monkeypatch.setattr(pl, "collect_hessians", lambda *a, **k: pytest.fail("calibration ran"))
    ro = tmp_path / "ro"
    ro.mkdir()
    real = paths._probe
    monkeypatch.setattr(paths, "_probe", lambda d: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if d == ro else real(d))
    rc = main(["compress", str(path), "--calib", str(calib), "--bits", "8", "-o", str(ro / "o.onnx")])
    _one_line(capsys, rc, 2, str(ro), "Permission denied")
    rc = main(["compress", str(path), "--calib", str(calib), "--bits", "8", "-o", str(tmp_path / "o.onnx"),
               "--report", str(ro / "r.json")])
    _one_line(capsys, rc, 2, "--report", "Permission denied")
    assert _files(ro) == [] and not (tmp_path / "o.onnx").exists()


def test_eval_json_into_missing_or_unwritable_directory(tiny, tmp_path, capsys):
    path, calib = tiny
    rc = main(["eval", str(path), str(path), "--data", str(calib), "--json", str(tmp_path / "nodir" / "e.json")])
    _one_line(capsys, rc, 2, "does not exist")
    rc = main(["eval", str(path), str(path), "--data", str(calib), "--json", str(calib), "--force"])
    _one_line(capsys, rc, 2, "is an input file")


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04truncated", b""])
def test_corrupt_npz_is_one_clear_line(tiny, tmp_path, capsys, content):
    path, _ = tiny
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    out = tmp_path / "o.onnx"
    rc = main(["compress", str(path), "--calib", str(bad), "--bits", "8", "-o", str(out)])
    _one_line(capsys, rc, 1, f"cannot read {bad} as .npz")
    assert not out.exists()
    rc = main(["eval", str(path), str(path), "--data", str(bad), "--latency-runs", "0"])
    _one_line(capsys, rc, 1, f"cannot read {bad} as .npz")
    rc = main(["eval", str(path), str(path), "--data", str(bad), "--labels", "y", "--latency-runs", "0"])
    _one_line(capsys, rc, 1, f"cannot read {bad} as .npz")


def test_npz_with_pickled_objects_is_a_clear_error(tiny, tmp_path, capsys):
    path, calib = tiny
    feed = dict(np.load(calib))
    bad = tmp_path / "obj.npz"
    np.savez(bad, **feed, junk=np.array([{"a": 1}], dtype=object))
    rc = main(["compress", str(path), "--calib", str(bad), "--bits", "8", "-o", str(tmp_path / "o.onnx")])
    _one_line(capsys, rc, 1, f"cannot read {bad} as .npz", "pickle")
    assert not (tmp_path / "o.onnx").exists()
