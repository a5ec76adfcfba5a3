"""Compression to a budget: the DP against brute force, candidates, the database cache, targets met on the
written model."""
import json

import numpy as np
import onnx
import pytest

import graphs
from golden_cases import calib
from onnxobc import CompressConfig, compress
from onnxobc.allocation import LADDER, candidates, ladder_for
from onnxobc.cli import main
from onnxobc.engine.allocate import allocate, brute_force
from onnxobc.engine.spec import LayerSpec
from onnxobc.export.cost import tensor_data_bytes
from onnxobc.graph import find_layers


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force_on_integer_costs(seed):
    rng = np.random.default_rng(seed)
    L, S = rng.integers(2, 5), rng.integers(2, 5)
    costs = [list(rng.integers(0, 10, S).astype(float)) for _ in range(L)]
    errors = [list(rng.random(S)) for _ in range(L)]
    budget = float(rng.integers(int(sum(min(c) for c in costs)), int(sum(max(c) for c in costs)) + 1))
    dp = allocate(costs, errors, budget, buckets=int(budget) or 1)
    bf = brute_force(costs, errors, budget)
    assert sum(errors[l][s] for l, s in enumerate(dp)) == pytest.approx(sum(errors[l][s] for l, s in enumerate(bf)))
    assert sum(costs[l][s] for l, s in enumerate(dp)) <= budget


@pytest.mark.parametrize("seed", range(8))
def test_dp_on_real_valued_costs_stays_within_budget_and_near_optimal(seed):
    rng = np.random.default_rng(100 + seed)
    L, S = 4, 4
    costs = [list(rng.random(S) * 10) for _ in range(L)]
    errors = [list(rng.random(S)) for _ in range(L)]
    budget = 0.6 * sum(max(c) for c in costs)
    buckets = 1000
    dp = allocate(costs, errors, budget, buckets=buckets)
    assert sum(costs[l][s] for l, s in enumerate(dp)) <= budget + 1e-9  # costs rounded up: never over
    err = sum(errors[l][s] for l, s in enumerate(dp))
    best = sum(errors[l][s] for l, s in enumerate(brute_force(costs, errors, budget)))
    tight = brute_force(costs, errors, budget - L * budget / buckets)  # rounding loses < 1 unit per layer
    assert best <= err + 1e-12 and err <= sum(errors[l][s] for l, s in enumerate(tight)) + 1e-12


def test_dp_infeasible_and_validation():
    assert allocate([[5.0, 3.0], [4.0]], [[0, 1], [0]], 6.0) is None
    with pytest.raises(ValueError):
        allocate([[1.0]], [[0.0, 1.0]], 1.0)
    assert allocate([[0.0, 2.0]], [[1.0, 0.0]], 0.0) == [0]


def test_candidates():
    base = LayerSpec()
    flops = candidates(base, "flops", None, None)
    assert [c.sparsity for c in flops] == list(LADDER) and LADDER[0] == pytest.approx(0.1)
    assert 0.99 < LADDER[-1] < 0.991 and len(LADDER) == 44
    assert candidates(LayerSpec(nm=(2, 4), bits=8), "flops", None, (0.5,)) == [
        LayerSpec(sparsity=0.5, bits=8), LayerSpec(nm=(2, 4), bits=8)]
    assert [c.bits for c in candidates(base, "size", (8, 4), None)] == [8, 4]
    assert [c.sparsity for c in candidates(base, "flops", None, None, LADDER[::2])] == list(LADDER[::2])
    assert candidates(LayerSpec(nm=(2, 4)), "bops", (8,), None) == [LayerSpec(bits=8), LayerSpec(nm=(2, 4), bits=8)]


@pytest.mark.parametrize("target,extra", [
    (dict(target_flops=0.5), {}),
    (dict(target_size=0.2), dict(cand_bits=(8, 4, 3), qdq=True, opset=21)),
    (dict(target_bops=0.55), dict(cand_bits=(8, 4), nm=(2, 4))),
])
def test_target_is_met_by_the_written_model(target, extra):
    model = graphs.mixed_cnn()
    res = compress(model, None, [calib(model, 32)], CompressConfig(**target, **extra))
    a = res.allocation
    assert a["cost"] <= a["budget"] + 1e-6 and a["achieved"] <= next(iter(target.values())) + 1e-9
    out = res.extra["model"]
    onnx.checker.check_model(out)
    if "target_size" in target:  # against the file: the bytes of the compressed layers' tensors
        layers, _ = find_layers(model)
        sources = {l.source_name for l in layers}
        kept = sum(tensor_data_bytes(t) for t in model.graph.initializer if t.name not in sources)
        dense_left = sum(l.weight.size * 4 for l in layers if l.name in res.not_selected)
        written = sum(tensor_data_bytes(t) for t in out.graph.initializer) - kept
        assert written == a["cost"] and written <= 0.2 * sum(l.weight.size * 4 for l in layers)
        assert res.cost["bytes"] + dense_left == written
    # the report's plan reproduces the allocation
    again = compress(model, None, [calib(model, 32)],
                     CompressConfig(plan=res.plan, **{k: v for k, v in extra.items() if k not in ("cand_bits",)}))
    for x, y in zip(out.graph.initializer, again.extra["model"].graph.initializer):
        assert x.name == y.name and x.raw_data == y.raw_data


def test_database_is_reused_and_invalidated(tmp_path):
    model = graphs.mixed_cnn()
    feeds = [calib(model, 32)]
    db = tmp_path / "db"
    cfg = dict(target_flops=0.5, database=str(db), cand_sparsity=(0.3, 0.5, 0.7, 0.9))
    first = compress(model, None, feeds, CompressConfig(**cfg))
    n = first.allocation["variants_solved"]
    assert n == 4 * 4 and first.allocation["variants_reused"] == 0
    second = compress(model, None, feeds, CompressConfig(**dict(cfg, target_flops=0.35)))
    assert second.allocation["variants_solved"] == 0 and second.allocation["variants_reused"] == n
    assert second.allocation["seconds"]["calibration"] == 0.0
    same = compress(model, None, feeds, CompressConfig(**cfg))
    for x, y in zip(first.extra["model"].graph.initializer, same.extra["model"].graph.initializer):
        assert x.raw_data == y.raw_data
    # other data, other options, another model: new variants
    other = [calib(model, 24)]
    assert compress(model, None, other, CompressConfig(**cfg)).allocation["variants_solved"] == n
    assert compress(model, None, feeds, CompressConfig(**dict(cfg, damp=0.05))).allocation["variants_solved"] == n
    changed = graphs.mixed_cnn()
    changed.graph.initializer[0].raw_data = np.asarray(
        onnx.numpy_helper.to_array(changed.graph.initializer[0]) * 1.5).tobytes()
    assert compress(changed, None, feeds, CompressConfig(**cfg)).allocation["variants_solved"] == n


def test_target_options_are_checked():
    for kw, msg in [(dict(target_flops=0.5, target_size=0.2), "one target"),
                    (dict(target_flops=1.5), r"in \(0, 1\]"),
                    (dict(cand_bits=(8, 4)), "needs --target"),
                    (dict(target_size=0.2, cand_bits=(9,)), "out of range"),
                    (dict(target_flops=0.5, plan=[{"match": ".", "bits": 4}]), "--plan and a --target")]:
        with pytest.raises(ValueError, match=msg):
            CompressConfig(**kw)


def test_unreachable_target_is_a_clear_error(tmp_path, capsys):
    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "c.npz", **calib(model, 16))
    code = main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--target-size", "0.01", "--bits", "8,4", "--opset", "21",
                 "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "out of reach" in err and not (tmp_path / "o.onnx").exists()


def test_cli_target_with_candidate_lists(tmp_path, capsys):
    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "c.npz", **calib(model, 16))
    rep = tmp_path / "r.json"
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--target-size", "0.3",
                 "--bits", "8,4,3", "--opset", "21", "-o", str(tmp_path / "o.onnx"), "--report", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert r["allocation"]["achieved"] <= 0.3 and {l["bits"] for l in r["layers"]} <= {8, 4, 3}
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--bits", "8,4",
                 "-o", str(tmp_path / "p.onnx")]) == 2
    assert "needs --target" in capsys.readouterr().err


def test_output_error_is_the_swapped_models_output_change():
    import copy

    import onnxruntime as ort

    from onnxobc.allocation import OutputProbe

    model = graphs.mixed_cnn()
    feeds = [calib(model, 16)]
    layers, _ = find_layers(model)
    probe = OutputProbe(model, layers, feeds, CompressConfig(bits=4), samples=16)
    layer = layers[1]
    rng = np.random.default_rng(0)
    w = (layer.weight * (1 + 0.1 * rng.standard_normal(layer.weight.shape))).astype(layer.weight.dtype)
    swapped = copy.deepcopy(model)
    for t in swapped.graph.initializer:
        if t.name == layer.source_name:
            t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])

    ref, got = run(model), run(swapped)
    want = sum(float(np.sum((g.astype(np.float64) - r) ** 2)) for g, r in zip(got, ref)) / sum(
        float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    assert probe.error(layer, w) == pytest.approx(want, rel=1e-4)
    assert probe.error(layer, layer.weight) == 0.0


def _masked_matmul():
    """Y = X @ W over [batch, sequence, 4] with an ``attention_mask`` input the graph does not read (like a
    transformer's padded positions: they are computed, but nobody uses them)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm/MatMul")], "masked",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "S", 4]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", "S", 3])],
        [onnx.numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_output_error_counts_real_tokens_only():
    from onnxobc.allocation import OutputProbe, probe_key

    model = _masked_matmul()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6, 4)).astype(np.float32)
    mask = np.ones((8, 6), np.int64)
    mask[:, 4:] = 0
    x[:, :4, 3] = 0.0  # input 3 is used only at the padded positions
    feeds = [{"X": x, "attention_mask": mask}]
    layers, _ = find_layers(model)
    layer = layers[0]
    w = layer.weight.copy()
    w[3] += 0.5  # a change that moves only the padded outputs ...
    w[0] += 0.01  # ... and a small one that moves the real tokens too
    ref, got = x @ layer.weight, x @ w
    m = mask != 0

    def rel2(a, b):
        return float(np.sum((b.astype(np.float64) - a) ** 2) / np.sum(a.astype(np.float64) ** 2))

    masked = OutputProbe(model, layers, feeds, CompressConfig(bits=4), samples=8)
    assert masked.error(layer, w) == pytest.approx(rel2(ref[m], got[m]), rel=1e-4)
    everywhere = OutputProbe(model, layers, feeds, CompressConfig(bits=4, token_mask="none"), samples=8)
    assert everywhere.error(layer, w) == pytest.approx(rel2(ref, got), rel=1e-4)
    assert 0 < masked.error(layer, w) < 0.1 * everywhere.error(layer, w)
    # the cache keeps the two apart, and a model without a mask input keeps the old key
    assert probe_key(model, CompressConfig(bits=4)) == "32:real-tokens"
    assert probe_key(model, CompressConfig(bits=4, token_mask="none")) == "32"
    assert probe_key(graphs.mixed_cnn(), CompressConfig(bits=4)) == "32"


def test_output_error_allocation_runs_and_is_cached(tmp_path):
    model = graphs.mixed_cnn()
    feeds = [calib(model, 16)]
    cfg = dict(target_flops=0.5, cand_sparsity=(0.3, 0.6, 0.9), allocation_error="output", database=str(tmp_path))
    a = compress(model, None, feeds, CompressConfig(**cfg)).allocation
    assert a["error"] == "output" and a["cost"] <= a["budget"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert all("32" in e["output_error"] for e in index.values())
    b = compress(model, None, feeds, CompressConfig(**dict(cfg, target_flops=0.4))).allocation
    assert b["variants_solved"] == 0


def test_sweep_command_writes_table_json_and_plot(tmp_path, capsys):
    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "c.npz", **calib(model, 16))
    np.savez(tmp_path / "t.npz", **calib(model, 12))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--calib", str(tmp_path / "c.npz"), "--data", str(tmp_path / "t.npz"),
                 "--target-flops", "0.7,0.4", "--sparsity", "0.3,0.6,0.9", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["kind"], r["fraction"]) for r in rows] == [("allocated", 0.7), ("uniform", 0.7), ("allocated", 0.4),
                                                          ("uniform", 0.4)]
    assert all(r["achieved"] <= r["fraction"] + 1e-6 for r in rows)
    assert "| flops 0.4, allocated |" in (out / "sweep.md").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sweep", str(path), "--calib", str(tmp_path / "c.npz"), "--data", str(tmp_path / "t.npz"),
                 "--out", str(out)]) == 2


def test_allocation_search_never_worse_than_the_dp_on_its_own_score():
    model = graphs.mixed_cnn()
    feeds = [calib(model, 16)]
    res = compress(model, None, feeds, CompressConfig(target_flops=0.45, cand_sparsity=(0.2, 0.4, 0.6, 0.8),
                                                      allocation_search=12))
    s = res.allocation["search"]
    assert s["trials"] == 12 and s["best"] <= s["start"] and s["distinct"] >= 1
    assert res.allocation["cost"] <= res.allocation["budget"]
    with pytest.raises(ValueError, match="allocation-search"):
        CompressConfig(target_flops=0.5, allocation_search=-1)


def test_candidate_bits_with_group_size_and_act_order(tmp_path):
    """--bits as a list with --group-size (or --act-order): the base has no bits yet, the candidates do; grouped
    and per-channel candidates are both offered, so the DP can mix them."""
    model = graphs.bert_like()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "c.npz", **calib(model, 16))
    rep = tmp_path / "r.json"
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--target-size", "0.2", "--bits", "8,4",
                 "--group-size", "8", "--opset", "21", "-o", str(tmp_path / "o.onnx"), "--report", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["allocation"]["achieved"] <= 0.2
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--target-size", "0.2", "--bits", "8,4",
                 "--method", "gptq", "--act-order", "--opset", "21", "-o", str(tmp_path / "p.onnx"), "-q"]) == 0
    offered = candidates(CompressConfig(target_size=0.2, cand_bits=(8, 4), group_size=8), "size", (8, 4), None)
    assert [(c.bits, c.group_size) for c in offered] == [(8, None), (8, 8), (4, None), (4, 8)]


def test_sweep_bops_uniform_rows_count_8bit_activations_and_nm(tmp_path):
    from onnxobc.sweep import sweep

    model = graphs.bert_like()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    feeds = [calib(model, 16)]
    rows = sweep(str(path), feeds, feeds, CompressConfig(target_bops=0.5, cand_bits=(8, 4), nm=(2, 4)), [0.5, 0.3])
    uni = {r.fraction: r for r in rows if r.kind == "uniform"}
    assert uni[0.5].label.endswith("uniform 4-bit") and uni[0.5].achieved == pytest.approx(0.5)
    assert "2:4 + 4-bit" in uni[0.3].label and uni[0.3].achieved == pytest.approx(0.25)


@pytest.mark.parametrize("method", ["exact", "auto"])
def test_solve_many_ladder_matches_single_solves(method):
    """The database ladder (one trace per row, one reconstruction per level, the output energy once) gives what
    one solve per level gives: the same weights and the same layer errors; with auto, the same solver kept per
    level (exact's trace shared, the fast mode run per level) and the same notes."""
    from onnxobc.engine import Problem
    from onnxobc.engine.solver import solve, solve_many

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 24, 200)).astype(np.float32)
    H = np.einsum("gcn,gdn->gcd", x, x) / 100
    w = rng.standard_normal((2, 6, 24)).astype(np.float32)
    problem = Problem("l", w, H, None, lambda gs: None)
    specs = [LayerSpec(method=method, sparsity=s) for s in (0.1, 0.3, 0.5, 0.8)] + [
        LayerSpec(method=method, sparsity=0.5, bits=4)]
    many = solve_many(problem, specs)
    for spec, got in zip(specs, many):
        one = solve(problem, spec)
        np.testing.assert_allclose(got.mats, one.mats, rtol=1e-4, atol=1e-5)
        assert got.error == pytest.approx(one.error, rel=1e-6, abs=1e-12)
        assert got.error > 0
        assert got.solver == one.solver and got.spec == one.spec
        assert [n.kind for n in got.notes] == [n.kind for n in one.notes]
    assert [r.error for r in many[:4]] == sorted(r.error for r in many[:4])


def test_ladder_for_thins_only_expensive_layers():
    """The default ladder is thinned (every other level) only where one exact trace is expensive."""
    import types

    small = types.SimpleNamespace(groups=1, rows=128, cols=576)  # fmnist's fc1
    classifier = types.SimpleNamespace(groups=1, rows=1000, cols=1280)  # EfficientNet-Lite0's
    depthwise = types.SimpleNamespace(groups=1152, rows=1, cols=25)
    assert ladder_for(small) == LADDER and ladder_for(depthwise) == LADDER
    thin = ladder_for(classifier)
    assert len(thin) == 22 and thin[0] == LADDER[0] and set(thin) < set(LADDER)
    assert thin[-1] > 0.98


def test_report_carries_the_chosen_errors_and_the_stage_seconds(tmp_path):
    model = graphs.mixed_cnn()
    feeds = [calib(model, 16)]
    cfg = dict(target_flops=0.5, cand_sparsity=(0.3, 0.6, 0.9), allocation_error="output", database=str(tmp_path))
    res = compress(model, None, feeds, CompressConfig(**cfg))
    a = res.allocation
    index = json.loads((tmp_path / "index.json").read_text())
    layers, _ = find_layers(model)
    assert set(a["errors"]) == {l.name for l in layers}
    for rule in res.plan:  # each layer's error is its chosen variant's output error (0 when left dense)
        name = rule["match"][1:-1].replace("\\", "")
        want = 0.0 if rule.get("skip") else next(e["output_error"]["32"] for e in index.values() if e["layer"] == name
                                                 and e["applied"]["sparsity"] == rule["sparsity"])
        assert a["errors"][name] == pytest.approx(want)
    assert a["predicted_error"] == pytest.approx(sum(a["errors"].values())) and a["predicted_error"] > 0
    assert a["seconds"]["solve"] > 0 and a["seconds"]["output_errors"] > 0
    again = compress(model, None, feeds, CompressConfig(**cfg)).allocation
    assert again["seconds"]["solve"] == 0.0 and again["seconds"]["calibration"] == 0.0
    assert again["errors"] == a["errors"]


def test_diagnose_allocation_tool_measures_the_plan_it_reports(tmp_path, capsys):
    """tools/diagnose_allocation.py: its plan is the library's, and its combined output error of the allocated
    model is what ONNX Runtime gives for the written model (an independent run of the compressed graph)."""
    import importlib.util
    import sys
    from pathlib import Path

    from onnxobc.evaluate import evaluate

    model = graphs.mixed_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "c.npz", **calib(model, 40))
    np.savez(tmp_path / "t.npz", **graphs.make_feed(model, 24, seed=5))
    db = tmp_path / "db"
    cfg = CompressConfig(target_flops=0.5, cand_sparsity=(0.3, 0.6, 0.9), allocation_error="output",
                         database=str(db), allocation_samples=16, stats_correction="none", method="exact")
    res = compress(str(path), None, str(tmp_path / "c.npz"), cfg)
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("diagnose_allocation", root / "tools" / "diagnose_allocation.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["x", "--model", str(path), "--calib", str(tmp_path / "c.npz"), "--test", str(tmp_path / "t.npz"),
            "--database", str(db), "--flops", "0.5", "--sparsity", "0.3,0.6,0.9", "--allocation-samples", "16",
            "--oracle", "8", "--mask-only", "--variants-from", str(db), "--json", str(tmp_path / "d.json")]
    old, sys.argv = sys.argv, argv
    try:
        assert tool.main() == 0
    finally:
        sys.argv = old
    out = json.loads((tmp_path / "d.json").read_text())
    plan = {r["match"][1:-1].replace("\\", ""): (0.0 if r.get("skip") else r["sparsity"]) for r in res.plan}
    assert {r["layer"]: r["sparsity"] for r in out["layers"]} == plan
    assert sum(k["mac_share"] for k in out["kinds"].values()) == pytest.approx(1.0)
    for label, data, n in (("calib (swap-scoring samples)", "c.npz", 16), ("test", "t.npz", 24)):
        ev = evaluate(str(path), res.extra["model"], str(tmp_path / data), max_samples=n, latency_runs=0).outputs[0]
        got = out["generalisation"][label]
        assert got["samples"] == n
        assert got["rel_l2"] == pytest.approx(ev.rel_l2, rel=1e-4) and got["top1"] == pytest.approx(ev.top1)
    assert out["allocation"]["predicted_error"] == pytest.approx(res.allocation["predicted_error"])
    # the same masks without the reconstruction: the pruned weights' zeros, nothing else changed
    assert set(out["mask_only"]) == set(out["generalisation"])
    comp = {t.name: onnx.numpy_helper.to_array(t) for t in res.extra["model"].graph.initializer}
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    for t in masked.graph.initializer:
        if t.name in {l.source_name for l in find_layers(model)[0]}:
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(np.where(comp[t.name] == 0, 0, w).astype(w.dtype), t.name))
    ev = evaluate(str(path), masked, str(tmp_path / "t.npz"), latency_runs=0).outputs[0]
    assert out["mask_only"]["test"]["rel_l2"] == pytest.approx(ev.rel_l2, rel=1e-4)
    assert out["mask_only"]["test"]["rel_l2"] != pytest.approx(out["generalisation"]["test"]["rel_l2"], rel=1e-3)
    assert out["variants_from"] == out["generalisation"]  # its own database again: the same variants
    o = out["oracle"]
    assert o["scored_on"] == 8 and o["unseen"]["samples"] == 16
    assert "oracle allocation" in capsys.readouterr().out
