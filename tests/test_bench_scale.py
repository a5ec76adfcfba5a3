"""tools/bench_scale.py: the cost fit, the schedule and the layer list agree with tools/make_decoder.py."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench_scale")


def test_fit_recovers_the_cost_model():
    a, b = 2e-10, 7e-10
    kinds = [dict(op="MatMul", solver="gptq", both=False, rows=r, C=c, mean_s=a * c ** 3 + b * r * c * c)
             for r, c in ((512, 512), (2048, 512), (512, 2048), (4000, 512))]
    kinds.append(dict(op="MatMul", solver="gptq", both=True, rows=64, C=64, mean_s=100.0))  # exact ran too: ignored
    fa, fb, resid = bench.fit_cost(kinds)
    assert fa == pytest.approx(a, rel=1e-6) and fb == pytest.approx(b, rel=1e-6) and resid < 1e-6
    with pytest.raises(SystemExit):
        bench.fit_cost([k for k in kinds if k["C"] == 512])  # one width cannot separate the two terms


def test_lpt_makespan():
    # largest first onto the least loaded: {5, 3}, {4, 3, 3} -> 10 (the optimum {5, 4}, {3, 3, 3} is 9: greedy
    # is within 4/3 of it, and the cluster's scheduler is greedy too)
    assert bench.lpt_makespan([5, 4, 3, 3, 3], 2) == 10
    assert bench.lpt_makespan([1.0] * 8, 8) == 1.0
    assert bench.lpt_makespan([10, 1, 1], 4) == 10


def test_layers_and_params_match_the_built_model(tmp_path):
    import onnx

    from onnxobc.graph import find_layers

    tool = _load("make_decoder")
    info = tool.build(hidden=32, ffn=48, blocks=2, vocab=40, head_dim=16, max_seq=8, rank=2, seed=0, out=tmp_path)
    model = onnx.load(str(tmp_path / "decoder.onnx"))
    layers, _ = find_layers(model)
    got = sorted((l.rows, l.cols) for l in layers if l.op == "MatMul")
    assert got == sorted((r, c) for _, r, c in bench.decoder_layers(32, 48, 2, 40))
    weights = sum(int(np.prod(l.weight.shape)) for l in layers)
    assert weights == bench.params(32, 48, 2, 40)
    assert info["params"] == json.loads((tmp_path / "decoder.json").read_text())["params"] >= weights
