"""Models beyond the 2 GB protobuf limit (issue 12), on tiny models sent down the same code path.

The ``over_limit`` fixture lowers the threshold above which a model counts as too large to serialise, and makes
every function that would serialise such a model whole (the checker, shape inference, the version converter,
ONNX Runtime fed bytes, onnx.save_model without external data) fail as protobuf does past 2 GB. A tiny synthetic
decoder (tools/make_decoder.py, weights as external data) then goes through compress (calibration, verify,
allocation, QDQ with an opset conversion), eval, inspect and sweep; the outputs must match the in-memory path.
"""
import hashlib
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxobc.cli import main
from onnxobc.config import CompressConfig
from onnxobc.errors import UnsupportedModel
from onnxobc.graph import model_io
from onnxobc.pipeline import compress

LIMIT = 20_000  # bytes: the tiny decoder's tensors hold ~150 KB


def _big(m) -> bool:
    return isinstance(m, onnx.ModelProto) and model_io.needs_external_data(m)


@pytest.fixture
def over_limit(monkeypatch, tmp_path):
    """Models with more than LIMIT tensor bytes behave as if beyond 2 GB. Yields the temp folder ModelFiles
    use (.tmp) and the count of refused calls (.calls)."""
    monkeypatch.setattr(model_io, "_EXTERNAL_DATA_THRESHOLD", LIMIT)
    calls = {"big": 0}

    def refuse(fn, what):
        def wrapped(model, *a, **k):
            if _big(model):
                calls["big"] += 1
                raise ValueError(f"simulated protobuf limit: {what} was given a whole model over the limit")
            return fn(model, *a, **k)
        return wrapped

    monkeypatch.setattr(onnx.checker, "check_model", refuse(onnx.checker.check_model, "check_model"))
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse(onnx.shape_inference.infer_shapes, "infer_shapes"))
    from onnx import version_converter

    monkeypatch.setattr(version_converter, "convert_version", refuse(version_converter.convert_version, "convert"))
    real_session = ort.InferenceSession

    def session(src, *a, **k):
        if isinstance(src, bytes) and len(src) > LIMIT:
            calls["big"] += 1
            raise ValueError("simulated protobuf limit: ONNX Runtime was given a serialised model over the limit")
        return real_session(src, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", session)
    real_save = onnx.save_model

    def save(model, f, *a, **k):
        if _big(model) and not k.get("save_as_external_data"):
            raise ValueError("simulated protobuf limit: save_model without external data")
        return real_save(model, f, *a, **k)

    monkeypatch.setattr(onnx, "save_model", save)
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield SimpleNamespace(tmp=tmp, calls=calls)
    assert calls["big"] == 0, "a whole over-limit model reached a serialising function"


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tensors(model) -> dict:
    """name -> (data type, dims, bytes) of every initializer (how it is stored aside)."""
    from onnx import numpy_helper

    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


def _run(model_or_path, ids):
    src = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": ids})[0]


def test_fixture_catches_a_whole_model(decoder, over_limit):
    path, _, _ = decoder
    model = onnx.load(str(path))
    assert model_io.needs_external_data(model)
    with pytest.raises(ValueError, match="simulated"):
        onnx.checker.check_model(model)
    with pytest.raises(ValueError, match="simulated"):
        ort.InferenceSession(model.SerializeToString())
    assert over_limit.calls["big"] == 2
    over_limit.calls["big"] = 0


def test_split_external_leaves_the_model_alone(decoder, tmp_path):
    path, _, _ = decoder
    model = onnx.load(str(path))
    before = model.SerializeToString()
    skel = model_io.split_external(model)
    assert model.SerializeToString() == before
    assert skel.ByteSize() < 20_000 < model.ByteSize()
    shapes = model_io.infer_shapes(model)
    assert any(v.name.endswith("_out") for v in shapes.graph.value_info)
    # a written split model loads back equal, tensor by tensor, and is aligned for mapping
    f = tmp_path / "x.onnx"
    onnx.save_model(model_io.split_external(model, tmp_path / "x.onnx.data"), str(f))
    back = onnx.load(str(f))
    assert _tensors(back) == _tensors(model)
    raw = onnx.load(str(f), load_external_data=False)
    offs = [int(e.value) for t in raw.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offs and all(o % model_io._EXTERNAL_ALIGN == 0 for o in offs)
    # the digest of a large model sees its weights
    d0 = model_io.model_digest(model)
    model.graph.initializer[-1].raw_data = bytes(len(model.graph.initializer[-1].raw_data))
    assert model_io.model_digest(model) != d0


@pytest.mark.parametrize("cfg", [
    dict(method="auto", bits=4, group_size=32, verify=True),
    dict(method="gptq", bits=4, group_size=32, qdq=True, opset=21),
])
def test_compress_external_in_and_out(decoder, tmp_path, monkeypatch, cfg):
    path, calib, test = decoder
    data = path.with_name("decoder.onnx.data")
    digests = (_digest(path), _digest(data))
    ref = compress(path, None, str(calib), CompressConfig(**cfg))  # the in-memory path (the limit is 2 GB)
    ids = np.load(test)["input_ids"]
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    with monkeypatch.context() as mp:
        mp.setattr(model_io, "_EXTERNAL_DATA_THRESHOLD", LIMIT)
        mp.setattr(tempfile, "tempdir", str(tmp))
        out = tmp_path / "out" / "decoder.obc.onnx"
        out.parent.mkdir()
        res = compress(path, out, str(calib), CompressConfig(**cfg))
    assert sorted(p.name for p in out.parent.iterdir()) == ["decoder.obc.onnx", "decoder.obc.onnx.data"]
    raw = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    assert out.stat().st_size < out.with_name("decoder.obc.onnx.data").stat().st_size
    # same weights and the same outputs as the in-memory path; runs in ONNX Runtime from the file
    back = onnx.load(str(out))
    assert _tensors(back) == _tensors(ref.extra["model"])
    np.testing.assert_array_equal(_run(out, ids), _run(ref.extra["model"], ids))
    assert [l.error for l in res.layers] == [l.error for l in ref.layers]
    # sizes count the data files; the input model is untouched; no temporary folder left
    assert res.input_bytes == path.stat().st_size + data.stat().st_size
    assert res.output_bytes == out.stat().st_size + out.with_name("decoder.obc.onnx.data").stat().st_size
    assert (_digest(path), _digest(data)) == digests
    assert not list(tmp.iterdir())
    if cfg.get("verify"):
        assert res.verify["outputs"][0]["rel_l2"] == ref.verify["outputs"][0]["rel_l2"]


def test_compress_over_limit_touches_no_whole_model(decoder, over_limit, tmp_path):
    """The same run with every serialising function refusing whole over-limit models: calibration, the
    level check, verify, allocation's output probe and the save all go through files."""
    path, calib, test = decoder
    out = tmp_path / "o.onnx"
    res = compress(path, out, str(calib), CompressConfig(method="gptq", target_size=0.2, allocation_error="output", opset=21,
                                                         verify=True))
    assert res.allocation is not None and out.with_name("o.onnx.data").is_file()
    ids = np.load(test)["input_ids"]
    assert np.isfinite(_run(out, ids)).all()
    res = compress(onnx.load(str(path)), tmp_path / "p.onnx", str(calib),
                   CompressConfig(method="rtn", bits=8, stats_correction="mean"))
    assert res.input_bytes > LIMIT
    assert not list(over_limit.tmp.iterdir())


def test_cli_inspect_eval_sweep_over_limit(decoder, over_limit, tmp_path, capsys):
    path, calib, test = decoder
    out = tmp_path / "c.onnx"
    assert main(["inspect", str(path)]) == 0
    assert "lm_head" in capsys.readouterr().out
    assert main(["compress", str(path), "--calib", str(calib), "--method", "auto", "--bits", "4", "--group-size",
                 "32", "-o", str(out), "-q"]) == 0
    assert main(["eval", str(path), str(out), "--data", str(test), "--json", str(tmp_path / "ev.json")]) == 0
    assert '"rel_l2"' in (tmp_path / "ev.json").read_text()
    assert main(["sweep", str(path), "--calib", str(calib), "--data", str(test), "--target-size", "0.3", "--opset", "21",
                 "--out", str(tmp_path / "sw"), "-q", "--no-uniform"]) == 0
    assert (tmp_path / "sw" / "sweep.json").is_file()
    assert not list(over_limit.tmp.iterdir())


def test_save_failure_leaves_nothing(decoder, tmp_path, monkeypatch):
    from onnxobc.export import save as save_mod

    model = onnx.load(str(decoder[0]))
    out = tmp_path / "fail" / "m.onnx"
    out.parent.mkdir()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(save_mod.onnx, "save_model", boom)
    with pytest.raises(OSError):
        save_mod.save_model_atomic(model, out, external_data=True)
    assert not list(out.parent.iterdir())


def test_missing_external_data_is_a_clear_error(decoder, tmp_path):
    path, calib, _ = decoder
    path.with_name("decoder.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(UnsupportedModel, match="external data files sit next to it"):
        compress(path, None, str(calib), CompressConfig(method="rtn", bits=8))
