"""--no-layer-error: the data-free baselines skip the Hessians; same model, counts only."""
import json

import numpy as np
import onnx
import pytest

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.calibrate import collect_hessians
from onnxobc.cli import main
from onnxobc.graph import find_layers


@pytest.mark.parametrize("case", ["mixed_cnn", "bert_like", "conv2d_depthwise", "gemm_transB0", "matmul_3d"])
def test_counts_without_hessians_match(case):
    model = graphs.BUILDERS[case]()
    layers, _ = find_layers(model)
    feeds = [graphs.make_feed(model, 5, seed=s) for s in range(2)]
    full = collect_hessians(model, layers, iter(feeds))
    light = collect_hessians(model, layers, iter(feeds), hessians=False)
    for layer in layers:
        a, b = full[layer.name], light[layer.name]
        assert a.has_hessian and not b.has_hessian
        assert (a.samples, a.columns) == (b.samples, b.columns), layer.name


@pytest.mark.parametrize("cfg", [dict(method="rtn", bits=4), dict(method="magnitude", sparsity=0.5),
                                 dict(method="rtn", bits=8, act_bits=8), dict(method="magnitude", nm=(2, 4), bits=8)])
def test_baselines_give_the_same_model_without_hessians(cfg):
    model = graphs.mixed_cnn()
    feed = graphs.make_feed(model, 8, seed=1)
    with_err = compress(model, None, [feed], CompressConfig(**cfg))
    without = compress(model, None, [feed], CompressConfig(layer_error=False, **cfg))
    assert all(l.error is not None for l in with_err.layers)
    assert all(l.error is None for l in without.layers)
    assert [l.macs for l in with_err.layers] == [l.macs for l in without.layers]
    a, b = with_err.extra["model"], without.extra["model"]
    assert a.SerializeToString() == b.SerializeToString()


def test_exact_still_reports_its_error():
    model = graphs.mixed_cnn()
    res = compress(model, None, [graphs.make_feed(model, 8)], CompressConfig(bits=4, layer_error=False))
    assert all(l.error is not None and l.error >= 0 for l in res.layers)


def test_cli_prints_a_dash_and_writes_null(tmp_path, capsys):
    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "c.npz", **graphs.make_feed(model, 8))
    rep = tmp_path / "r.json"
    code = main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--method", "rtn", "--bits", "8",
                 "--no-layer-error", "-o", str(tmp_path / "o.onnx"), "--report", str(rep)])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("conv1"))
    assert " - " in row and "e-0" not in row
    assert all(l["error"] is None for l in json.loads(rep.read_text())["layers"])
