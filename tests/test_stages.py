"""Stages (issue 12): grouping by depth and memory budget, staged calibration equal to one pass, --sequential
inputs from the compressed model, and the Hessians held at once."""
import weakref

import numpy as np
import onnx
import pytest

import golden_cases as gc
import graphs
from graphs import _init, _model, _node, _vi, _weights
from onnxobc import CompressConfig, compress
from onnxobc import pipeline
from onnxobc.calibrate import collect_hessians, find_token_mask, hessian as hessian_mod
from onnxobc.errors import UsageError
from onnxobc.graph import find_layers
from onnxobc.stages import hessian_bytes, layer_depths, plan_stages, pruned_copy, replace_weights


def _gemm(name: str, x: str, y: str, n_in: int, n_out: int, seed: int):
    inits = [_init(f"{name}.weight", _weights(seed, n_out, n_in)), _init(f"{name}.bias", _weights(seed + 1, n_out, scale=0.1))]
    return _node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [y], name, transB=1), inits


def _net(edges: list[tuple], extra_nodes=(), width: int = 8, out: str = "Y") -> onnx.ModelProto:
    """A graph of Gemm layers (name, input, output) of width x width, plus extra nodes, in the given order."""
    nodes, inits = [], []
    for i, e in enumerate(edges):
        if isinstance(e, tuple):
            n, it = _gemm(e[1], e[2], e[3], width, width, 10 * i + 3)
            nodes.append(n)
            inits += it
        else:
            nodes.append(e)
    nodes += list(extra_nodes)
    return _model("stages", nodes, [_vi("X", ["N", width])], [_vi(out, ["N", width])], inits, opset=13)


def _depths(model):
    layers, _ = find_layers(model)
    return layer_depths(model, layers)


# --------------------------------------------------------------------------------------------- grouping
def test_depth_chain_and_branches():
    assert _depths(graphs.BUILDERS["mixed_cnn"]()) == {"conv1": 0, "conv2": 1, "fc1": 2, "fc2": 3}
    # parallel branches reading one input share a stage; what they feed comes after all of them
    assert _depths(graphs.BUILDERS["bert_like"]()) == {
        "attn/q/MatMul": 0, "attn/k/MatMul": 0, "attn/v/MatMul": 0, "attn/o/MatMul": 1, "ffn/fc1/MatMul": 2,
        "ffn/fc2/MatMul": 3}


def test_depth_layer_feeding_two_layers_and_unequal_branches():
    # X -> a -> ra; ra -> b, ra -> c (a layer feeding two); b + c -> d; X -> e (parallel to everything);
    # d + e -> f (longest chain wins: depth 3, not 1)
    m = _net([("gemm", "a", "X", "ya"), _node("Relu", ["ya"], ["ra"], "relu_a"),
              ("gemm", "b", "ra", "yb"), ("gemm", "c", "ra", "yc"), _node("Add", ["yb", "yc"], ["s"], "add1"),
              ("gemm", "d", "s", "yd"), ("gemm", "e", "X", "ye"), _node("Add", ["yd", "ye"], ["t"], "add2"),
              ("gemm", "f", "t", "Y")])
    assert _depths(m) == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 0, "f": 3}


def test_depth_shared_input_and_skip_connection():
    # X feeds a and (through a residual Add) d: d's depth counts the chain through a and b only
    m = _net([("gemm", "a", "X", "ya"), ("gemm", "b", "ya", "yb"), _node("Add", ["X", "yb"], ["r"], "res"),
              ("gemm", "c", "X", "yc"), ("gemm", "d", "r", "Y")])
    assert _depths(m) == {"a": 0, "b": 1, "c": 0, "d": 2}


def test_only_selected_layers_count():
    m = graphs.BUILDERS["mixed_cnn"]()
    layers, _ = find_layers(m)
    picked = [l for l in layers if l.name in ("conv1", "fc2")]
    assert layer_depths(m, picked) == {"conv1": 0, "fc2": 1}


def test_plan_sequential_budget_splits_a_stage():
    m = graphs.BUILDERS["bert_like"]()
    layers, _ = find_layers(m)
    one = hessian_bytes(layers[0])
    assert one == 16 * 16 * 8
    plan = plan_stages(m, layers, sequential=True, budget=10 << 20)
    assert [[l.name for l in s] for s in plan.stages] == [
        ["attn/q/MatMul", "attn/k/MatMul", "attn/v/MatMul"], ["attn/o/MatMul"], ["ffn/fc1/MatMul"], ["ffn/fc2/MatMul"]]
    plan = plan_stages(m, layers, sequential=True, budget=2 * one)
    assert [len(s) for s in plan.stages] == [2, 1, 1, 1, 1]
    # fc1 / fc2 (C = 16 / 32) are over a one-Hessian budget of 16x16: each is a stage alone, never dropped
    plan = plan_stages(m, layers, sequential=True, budget=one)
    assert [len(s) for s in plan.stages] == [1] * 6
    assert plan.summary()["hessian_bytes_max_stage"] == 32 * 32 * 8
    with pytest.raises(ValueError):
        plan_stages(m, layers, budget=0)


def test_plan_default_one_pass_unless_over_budget():
    m = graphs.BUILDERS["bert_like"]()
    layers, _ = find_layers(m)
    total = sum(hessian_bytes(l) for l in layers)
    plan = plan_stages(m, layers, budget=total)
    assert not plan.staged and len(plan.stages) == 1
    plan = plan_stages(m, layers, budget=total - 1)  # packed by memory in graph order, depth does not matter
    assert plan.staged and [l.name for s in plan.stages for l in s] == [l.name for l in layers]
    assert all(sum(hessian_bytes(l) for l in s) <= total - 1 for s in plan.stages)
    assert len(plan.stages) == 2
    # without Hessians (rtn without a layer error) nothing is held: one pass whatever the budget
    assert not plan_stages(m, layers, budget=1, hessians=False).staged


# --------------------------------------------------------------------------------------------- graph edits
def test_prune_keeps_what_the_fetch_needs():
    import onnxruntime as ort

    m = graphs.BUILDERS["mixed_cnn"]()
    feed = graphs.make_feed(m, 3)
    full = ort.InferenceSession(hessian_mod.augment(m, ["r1"])[0].SerializeToString(), providers=["CPUExecutionProvider"])
    aug, fetch = hessian_mod.augment(m, ["r1"], prune=True)
    assert [n.name for n in aug.graph.node] == ["conv1", "relu1"] and [o.name for o in aug.graph.output] == ["r1"]
    assert len(pruned_copy(m, ["c2"]).graph.node) == 3 and len(m.graph.node) == 9  # the model is not touched
    assert {t.name for t in aug.graph.initializer} == {"conv1.weight", "conv1.bias"}
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(["r1"], feed)[0], full.run(["r1"], feed)[0])


def test_replace_weights_feeds_new_weights_and_restores():
    import onnxruntime as ort

    m = graphs.BUILDERS["mixed_cnn"]()
    layers, _ = find_layers(m)
    fc2 = next(l for l in layers if l.name == "fc2")
    before = m.SerializeToString()
    feed = graphs.make_feed(m, 3)
    # through collect_hessians: the copy it runs is edited, the model is not
    st = collect_hessians(m, [fc2], [feed], edit=lambda aug: replace_weights(aug, [(fc2, np.zeros_like(fc2.weight))]))
    assert m.SerializeToString() == before
    replace_weights(m, [(fc2, np.zeros_like(fc2.weight))])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    bias = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "fc2.bias"))
    np.testing.assert_allclose(y, np.broadcast_to(bias, y.shape), atol=1e-6)
    assert st["fc2"].samples == 3 and st["fc2"].xtx.any()


# --------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("key", ["mixed_cnn", "bert_like"])
def test_staged_hessians_equal_one_pass(key):
    m = graphs.BUILDERS[key]()
    layers, _ = find_layers(m)
    feeds = [gc.calib(m)]
    tm = find_token_mask(m)
    one = collect_hessians(m, layers, feeds, token_mask=tm)
    for l in layers:
        st = collect_hessians(m, [l], feeds, token_mask=tm, prune=True)[l.name]
        assert st.samples == one[l.name].samples and st.columns == one[l.name].columns
        assert np.array_equal(st.xtx, one[l.name].xtx), l.name  # the same sums, bit for bit


def _inits(res):
    return {t.name: onnx.numpy_helper.to_array(t) for t in res.extra["model"].graph.initializer}


@pytest.mark.parametrize("key,opts", [("mixed_cnn", dict(sparsity=0.5)), ("bert_like", dict(bits=4)),
                                      ("fmnist", dict(sparsity=0.5)), ("mixed_cnn", dict(bits=8, act_bits=8))])
def test_staged_compress_byte_identical(key, opts):
    model, feeds, _ = gc.load_case(key)
    a = compress(model, None, feeds, CompressConfig(**opts))
    b = compress(model, None, feeds, CompressConfig(stage_memory=1e-6, **opts))  # one layer per stage
    assert not a.memory["staged"] and b.memory["staged"] and b.memory["stages"] == len(b.layers) > 1
    ia, ib = _inits(a), _inits(b)
    assert set(ia) == set(ib) and all(np.array_equal(ia[k], ib[k]) for k in ia)
    assert [n.SerializeToString() for n in a.extra["model"].graph.node] == \
        [n.SerializeToString() for n in b.extra["model"].graph.node]
    assert [(l.name, l.error) for l in a.layers] == [(l.name, l.error) for l in b.layers]


def _mlp():
    n1, i1 = _gemm("fc1", "X", "h", 6, 10, 1)
    n2, i2 = _gemm("fc2", "r", "Y", 10, 4, 2)
    return _model("mlp", [n1, _node("Relu", ["h"], ["r"], "relu"), n2], [_vi("X", ["N", 6])], [_vi("Y", ["N", 4])],
                  i1 + i2, opset=13)


def _record_solves(monkeypatch):
    """{layer: (Hessian it was solved with, LayerResult, Layer)}, from the solve jobs and the solved results."""
    seen = {}
    job, solve_layers = pipeline._job, pipeline._solve_layers

    def rec_job(layer, spec, st, config):
        seen[layer.name] = (st.hessian().copy(), None, layer)
        return job(layer, spec, st, config)

    def rec_solve(layers, specs, stats, config, progress, ex=None, spill=False):
        out = solve_layers(layers, specs, stats, config, progress, ex, spill)
        for name, (res, _) in out.items():
            seen[name] = (seen[name][0], res, seen[name][2])
        return out

    monkeypatch.setattr(pipeline, "_job", rec_job)
    monkeypatch.setattr(pipeline, "_solve_layers", rec_solve)
    return seen


def test_sequential_second_layer_sees_compressed_first(monkeypatch):
    m = _mlp()
    x = gc.calib(m, 40)["X"]
    seen = _record_solves(monkeypatch)
    res = compress(m, None, [{"X": x}], CompressConfig(bits=3, sequential=True))
    assert res.memory["stages"] == 2 and res.memory["layers_per_stage"] == [1, 1]
    h2, r2, l2 = seen["fc2"]
    _, r1, l1 = seen["fc1"]
    b1 = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "fc1.bias")).astype(np.float64)
    w1c = pipeline._weight(l1, r1).astype(np.float64)
    w1 = l1.weight.astype(np.float64)
    xs = x.astype(np.float64)

    def hess(w):
        a = np.maximum(xs @ w.T + b1, 0)
        return 2 * a.T @ a / len(xs)

    want, dense = hess(w1c), hess(w1)
    assert np.abs(want - dense).max() > 1e-3 * np.abs(dense).max()  # 3-bit fc1 changes fc2's inputs visibly
    np.testing.assert_allclose(h2[0], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # without --sequential fc2 sees the dense fc1
    seen.clear()
    compress(m, None, [{"X": x}], CompressConfig(bits=3))
    np.testing.assert_allclose(seen["fc2"][0][0], dense, rtol=1e-5, atol=1e-6 * np.abs(dense).max())
    # the export holds the solved weights of both layers
    out = _inits(res)
    np.testing.assert_array_equal(out["fc1.weight"], pipeline._weight(l1, r1))
    np.testing.assert_array_equal(out["fc2.weight"], pipeline._weight(l2, r2))


def test_sequential_w8a8_ranges_from_compressed_model(monkeypatch):
    from onnxobc.calibrate import ranges

    made = []

    class Recording(ranges.RangeObserver):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(ranges, "RangeObserver", Recording)
    m = _mlp()
    x = gc.calib(m, 40)["X"]
    seen = _record_solves(monkeypatch)
    res = compress(m, None, [{"X": x}], CompressConfig(bits=8, act_bits=8, sequential=True))
    _, r1, l1 = seen["fc1"]
    b1 = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "fc1.bias"))
    a = np.maximum(x.astype(np.float64) @ pipeline._weight(l1, r1).astype(np.float64).T + b1, 0)
    st = made[-1].stats["r"]
    assert st.hi == pytest.approx(a.max(), rel=1e-5)
    assert res.activations  # the W8A8 pairs were written


def test_stages_refuse_a_one_shot_iterator():
    model, feeds, _ = gc.load_case("mixed_cnn")
    with pytest.raises(UsageError, match="reading the data once per stage"):
        compress(model, None, iter(feeds), CompressConfig(sparsity=0.5, sequential=True))
    with pytest.raises(UsageError, match="larger --stage-memory"):
        compress(model, None, iter(feeds), CompressConfig(sparsity=0.5, stage_memory=1e-6))
    assert compress(model, None, iter(feeds), CompressConfig(sparsity=0.5)).memory["passes"] == 1


def test_sequential_refuses_a_target():
    with pytest.raises(ValueError, match="--sequential cannot be combined"):
        CompressConfig(sequential=True, target_flops=0.5, sparsity=0.5)
    with pytest.raises(ValueError, match="--stage-memory"):
        CompressConfig(bits=4, stage_memory=0)


def test_cli_sequential_target_is_one_line_error(tmp_path, capsys):
    from onnxobc.cli import main

    m = _mlp()
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=gc.calib(m, 8)["X"])
    rc = main(["compress", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--sequential",
               "--target-flops", "0.5", "--sparsity", "0.5", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc != 0 and "--sequential cannot be combined" in err and "Traceback" not in err
    rc = main(["compress", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--sequential",
               "--bits", "4", "--stage-memory", "1", "-o", str(tmp_path / "o.onnx")])
    assert rc == 0 and (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------------------------- memory
def _count_live_stats(monkeypatch):
    """Patch LayerStats so that every instance is counted while alive; returns {'live', 'max'}."""
    count = {"live": 0, "max": 0}

    class Counted(hessian_mod.LayerStats):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            count["live"] += 1
            count["max"] = max(count["max"], count["live"])
            weakref.finalize(self, _dec, count)

    monkeypatch.setattr(hessian_mod, "LayerStats", Counted)
    return count


def _dec(count):
    count["live"] -= 1


@pytest.mark.parametrize("opts", [dict(sparsity=0.5, stage_memory=1e-6), dict(bits=4, sequential=True)])
def test_never_more_than_one_stage_of_stats_alive(monkeypatch, opts):
    import gc as pygc

    model, feeds, _ = gc.load_case("mixed_cnn")
    count = _count_live_stats(monkeypatch)
    res = compress(model, None, feeds, CompressConfig(**opts))
    pygc.collect()
    assert res.memory["stages"] == 4 and count["max"] == 1  # one layer per stage, each freed before the next
    assert count["live"] == 0
    assert res.memory["hessian_bytes_held_peak"] == max(hessian_bytes(l) for l in find_layers(model)[0])
    # the one pass holds them all (what the bound replaces)
    count.update(live=0, max=0)
    res = compress(model, None, feeds, CompressConfig(sparsity=0.5))
    assert count["max"] == 4 and res.memory["hessian_bytes_held_peak"] == res.memory["hessian_bytes_total"]
