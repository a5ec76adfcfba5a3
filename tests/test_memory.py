"""Bounded memory for large models (issue 12): weights left on disk (lazy tensors), weights mapped instead of
copied, shape inference on the skeleton, --low-memory sessions, and the outputs all equal to the in-memory path.

The real sizes are measured by tools/bench_scale.py; here a tiny decoder stored with external data is sent down
the same code paths by lowering the size above which they apply."""
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphs
from onnxobc.config import CompressConfig
from onnxobc.evaluate import evaluate
from onnxobc.graph import find_layers, model_io
from onnxobc.pipeline import compress



@pytest.fixture
def small_lazy(monkeypatch):
    """Models whose external data exceeds 20 KB count as large: their weights stay on disk."""
    monkeypatch.setattr(model_io, "_FILE_SESSION_BYTES", 20_000)


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tensors(m: onnx.ModelProto) -> dict:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}


def test_lazy_load_keeps_weights_on_disk(decoder, small_lazy):
    path, *_ = decoder
    full = onnx.load(str(path))
    lazy = model_io.load_model(path, lazy=True)
    assert model_io.has_lazy(lazy)
    big = [t for t in full.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) > 1024]
    assert big and all(model_io.is_lazy(t) for t in lazy.graph.initializer if t.name in {b.name for b in big})
    # the in-memory model holds none of their bytes, but counts them
    assert lazy.ByteSize() < full.ByteSize() / 5
    assert model_io.tensor_bytes(lazy) == model_io.tensor_bytes(full)
    byname = {t.name: t for t in lazy.graph.initializer}
    for t in full.graph.initializer:
        v = model_io.tensor_value(byname[t.name])
        np.testing.assert_array_equal(v, onnx.numpy_helper.to_array(t))
    # written out (and read by ONNX Runtime) through a file, with relative locations
    with model_io.ModelFile(lazy) as f:
        raw = onnx.load(str(f.path), load_external_data=False)
        locs = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
        assert locs == {"model.onnx.data"}
        assert _tensors(onnx.load(str(f.path))) == _tensors(full)
    # materialize: an ordinary in-memory model again
    assert _tensors(model_io.materialize(lazy)) == _tensors(full) and not model_io.has_lazy(lazy)
    # not lazy unless asked, or when small
    assert not model_io.has_lazy(model_io.load_model(path))


def test_small_external_models_are_not_lazy(decoder):
    path, *_ = decoder  # ~150 KB of external data: under the 64 MiB default
    assert not model_io.has_lazy(model_io.load_model(path, lazy=True))


@pytest.mark.parametrize("cfg", [
    dict(method="auto", bits=4, group_size=32),
    dict(method="exact", sparsity=0.5),
    dict(method="gptq", bits=4, group_size=32, qdq=True, opset=21, verify=True),
])
def test_compress_lazy_equals_in_memory(decoder, small_lazy, tmp_path, cfg):
    path, calib, _ = decoder
    data = path.with_name("decoder.onnx.data")
    digests = (_digest(path), _digest(data))
    ref = compress(onnx.load(str(path)), None, str(calib), CompressConfig(**cfg))  # a ModelProto: in memory
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    res = compress(path, out, str(calib), CompressConfig(**cfg))
    # written with external data like its input, every location relative, nothing else left in the folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    raw = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"} == {"m.onnx.data"}
    assert _tensors(onnx.load(str(out))) == _tensors(ref.extra["model"])
    assert [l.error for l in res.layers] == [l.error for l in ref.layers]
    assert [l.sparsity for l in res.layers] == [l.sparsity for l in ref.layers]
    if cfg.get("verify"):
        assert res.verify["outputs"][0]["rel_l2"] == ref.verify["outputs"][0]["rel_l2"]
    # the returned model is lazy where the weights were left as they were, and still runs through onnxobc
    assert model_io.has_lazy(res.extra["model"])
    ev = evaluate(res.extra["model"], out, str(calib), latency_runs=0)
    assert ev.outputs[0].rel_l2 == 0.0
    assert (_digest(path), _digest(data)) == digests  # the input is never modified


def test_layer_weights_are_mapped_not_copied(decoder):
    path, *_ = decoder
    sources: dict = {}
    model = model_io.load_model(path, sources)
    assert sources
    layers, _ = find_layers(model, sources)
    mapped = [l for l in layers if isinstance(l.weight, np.memmap) or isinstance(l.weight.base, np.memmap)]
    assert mapped, "no layer weight is mapped from the external data file"
    plain, _ = find_layers(model)
    for a, b in zip(layers, plain):
        np.testing.assert_array_equal(a.weight, b.weight)
    assert not mapped[0].weight.flags.writeable


@pytest.mark.parametrize("name", sorted(graphs.BUILDERS))
def test_shape_inference_on_the_skeleton_equals_the_whole_model(name):
    model = graphs.BUILDERS[name]()
    ours = model_io.infer_shapes(model)
    theirs = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    assert [v.SerializeToString() for v in ours.graph.value_info] == [v.SerializeToString() for v in theirs.graph.value_info]
    assert [v.SerializeToString() for v in ours.graph.output] == [v.SerializeToString() for v in theirs.graph.output]


def test_the_skeleton_elides_weights():
    """The shape-inference comparison above covers fixtures whose weights are elided (not only tiny ones)."""
    for name in ("mixed_cnn", "bert_like"):
        skel = model_io.split_external(graphs.BUILDERS[name]())
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in skel.graph.initializer), name


def test_low_memory_sessions_compute_the_same(decoder, tmp_path):
    path, calib, _ = decoder
    outs = {}
    for mode in ("off", "on"):
        res = compress(path, None, str(calib), CompressConfig(method="gptq", bits=4, low_memory=mode))
        outs[mode] = (_tensors(res.extra["model"]), [l.error for l in res.layers])
    assert outs["on"][0].keys() == outs["off"][0].keys()
    np.testing.assert_allclose(outs["on"][1], outs["off"][1], rtol=1e-6)
    with pytest.raises(ValueError, match="--low-memory"):
        CompressConfig(low_memory="maybe")
    with pytest.raises(Exception, match="--low-memory"):
        model_io.low_memory_mode("maybe")


def test_allocation_database_is_built_in_stages(tmp_path):
    """With a target, the layers' Hessians are bounded by --stage-memory as without one: the database is built
    stage by stage (same variants, same choice, same weights), and the report says how many bytes were held."""
    model = graphs.mixed_cnn()
    feeds = [graphs.make_feed(model, 32)]
    cfg = dict(target_flops=0.5, cand_sparsity=(0.3, 0.5, 0.7), method="exact")
    one = compress(model, None, feeds, CompressConfig(**cfg))
    total = one.memory["hessian_bytes_total"]
    assert one.memory["stages"] == 1 and one.memory["hessian_bytes_held_peak"] == total
    staged = compress(model, None, feeds, CompressConfig(**cfg, stage_memory=total / 3 / 2 ** 20))
    assert staged.memory["stages"] > 1 and staged.memory["passes"] == staged.memory["stages"]
    assert staged.memory["hessian_bytes_held_peak"] < total
    assert staged.plan == one.plan and staged.allocation["cost"] == one.allocation["cost"]
    assert [l.error for l in staged.layers] == [l.error for l in one.layers]
    assert _tensors(staged.extra["model"]) == _tensors(one.extra["model"])


def test_low_memory_spills_results_and_cleans_up(decoder, tmp_path, monkeypatch):
    """--low-memory on: the solved weights wait on disk (mapped) until written; same model, folder removed."""
    import tempfile

    path, calib, _ = decoder
    ref = compress(path, None, str(calib), CompressConfig(method="rtn", bits=4, group_size=32, low_memory="off"))
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    spilled = []
    real = model_io.spill_array

    def spy(a):
        out = real(a)
        spilled.append(isinstance(out, np.memmap))
        return out

    monkeypatch.setattr("onnxobc.pipeline.spill_array", spy)
    res = compress(path, None, str(calib), CompressConfig(method="rtn", bits=4, group_size=32, low_memory="on"))
    assert spilled and all(spilled) and len(spilled) == len(res.layers)
    assert _tensors(res.extra["model"]) == _tensors(ref.extra["model"])
    assert not list(tmp.iterdir()), "spill folder left behind"
