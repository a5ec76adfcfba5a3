"""tools/bench_executor.py: the case list parses (named cases and decoder folders) and outputs compare on disk."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench_executor")


def _decoder_dir(path: Path) -> Path:
    path.mkdir()
    for f in ("decoder.onnx", "calib.npz"):
        (path / f).write_bytes(b"x")
    return path


def test_cases_parse_names_and_decoder_folders(tmp_path):
    d = _decoder_dir(tmp_path / "dec")
    cases = bench.parse_cases(f"shipped, decoder:{d},minilm-gptq,", tmp_path / "models")
    assert [c.name for c in cases] == ["shipped", f"decoder:{d}", "minilm-gptq"]
    assert [c.decoder for c in cases] == [False, True, False]
    shipped, dec, minilm = cases
    assert shipped.model == str(ROOT / "models" / "fmnist_cnn.onnx") and shipped.samples == 256
    assert shipped.opts == dict(method="exact", sparsity=0.5, bits=4)
    assert minilm.model == str(tmp_path / "models" / "minilm.onnx")
    assert dec.model == str(d / "decoder.onnx") and dec.calib == str(d / "calib.npz") and dec.opts is None


def test_cases_reject_unknown_names_and_incomplete_folders(tmp_path):
    with pytest.raises(ValueError, match="unknown case.*nope"):
        bench.parse_cases("shipped,nope", tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "decoder.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="no calib.npz"):
        bench.parse_cases(f"decoder:{tmp_path / 'half'}", tmp_path)
    with pytest.raises(ValueError, match="no case"):
        bench.parse_cases(" , ", tmp_path)


def test_same_files_compares_the_model_and_its_data(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "out.onnx").write_bytes(b"graph")
        (d / "out.onnx.data").write_bytes(b"weights")
        (d / "report.json").write_text("{}")  # not part of the model
    assert bench.same_files(a / "out.onnx", b / "out.onnx")
    (b / "report.json").write_text('{"x": 1}')
    assert bench.same_files(a / "out.onnx", b / "out.onnx")
    (b / "out.onnx.data").write_bytes(b"weightz")
    assert not bench.same_files(a / "out.onnx", b / "out.onnx")
    (b / "out.onnx.data").unlink()
    assert not bench.same_files(a / "out.onnx", b / "out.onnx")


def test_strip_leaves_out_timings_and_executor_only():
    rep = dict(seconds=dict(total=1.0), config=dict(executor="ray", ray_address="h:1", bits=4),
               memory=dict(budget_bytes=5, stages=2), layers=[dict(name="l", seconds=0.5, error=0.1)])
    assert bench._strip(rep) == dict(config=dict(bits=4), memory=dict(stages=2), layers=[dict(name="l", error=0.1)])
