"""The fast modes (issue 12, ALGORITHMS.md sec. 6): GPTQ, SparseGPT and --method auto."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.cli import main
from onnxobc.engine import LayerSpec, Problem, solve
from onnxobc.engine import solver as solver_mod
from onnxobc.engine.baselines import rtn_quantize
from onnxobc.engine.grid import apply_grid, fit_grid
from onnxobc.engine.gptq import fast_obs, prune_sparsegpt, quantize_gptq
from onnxobc.engine.hessian import prepare
from onnxobc.engine.metrics import layer_error
from onnxobc.engine.reference import damped, naive_fixed_order
from onnxobc.export.qdq import ensure_opset
from onnxobc.plan import parse_rules, resolve


def layer(rows, c, seed=0, n=None, dead=()):
    """Weights and H = 2 X X^T / n of correlated inputs (float32 weights, float64 H)."""
    rng = np.random.default_rng(seed)
    n = n or 3 * c
    x = rng.standard_normal((c, n)) * np.linspace(1.5, 0.3, c)[:, None]
    x = x + 0.5 * np.roll(x, 1, axis=0)
    x[list(dead)] = 0
    w = rng.standard_normal((rows, c)).astype(np.float32)
    return w, 2.0 * x @ x.T / n


def expanded(w, bits, gs=None, sym=False):
    g = fit_grid(w, bits, sym=sym, group_size=gs)
    s, z = g.expand(w.shape[1])
    return np.broadcast_to(s, w.shape).astype(np.float64), np.broadcast_to(z, w.shape).astype(np.float64), g


# ---------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("gs", [None, 8])
@pytest.mark.parametrize("act", [False, True])
def test_identity_hessian_gptq_equals_rtn(gs, act):
    w, _ = layer(12, 32, seed=1)
    r = quantize_gptq(w, np.eye(32), 4, group_size=gs, act_order=act)
    q, _ = rtn_quantize(w, 4, group_size=gs)
    np.testing.assert_array_equal(r.weight, q)


@pytest.mark.parametrize("bits,gs,act,bs", [(4, None, False, 128), (3, None, False, 8), (4, 8, False, 8),
                                            (4, None, True, 8), (3, 8, True, 16), (8, None, False, 5)])
def test_gptq_matches_naive(bits, gs, act, bs):
    w, H = layer(10, 40, seed=2, dead=(3,))
    r = quantize_gptq(w, H, bits, group_size=gs, act_order=act, blocksize=bs, dtype="float64")
    Hd, w0 = damped(H, w)
    s, z, grid = expanded(w, bits, gs)
    order = np.argsort(-np.diag(H), kind="stable") if act else None
    want, loss = naive_fixed_order(Hd, w0, order=order, s=s, z=z, maxq=grid.maxq)
    np.testing.assert_allclose(r.weight, want, atol=1e-6)
    assert r.loss == pytest.approx(loss, rel=1e-6)
    # the loss is the damped objective 1/2 tr(dW Hd dW^T)
    d = w0 - r.weight
    assert r.loss == pytest.approx(0.5 * np.sum((d @ Hd) * d), rel=1e-6)
    assert np.all(r.weight[:, 3] == 0)  # dead input
    assert r.info["dead"] == 1


@pytest.mark.parametrize("kw,bs", [(dict(sparsity=0.5), 8), (dict(sparsity=0.3), 16), (dict(sparsity=0.6), 128),
                                   (dict(nm=(2, 4)), 8), (dict(nm=(1, 4), bits=4), 8),
                                   (dict(sparsity=0.5, bits=3), 8), (dict(nm=(2, 8)), 128),
                                   (dict(nm=(2, 4), bits=4, group_size=8), 8)])
def test_sparsegpt_matches_naive(kw, bs):
    w, H = layer(9, 32, seed=3)
    r = prune_sparsegpt(w, H, blocksize=bs, dtype="float64", **kw)
    Hd, w0 = damped(H, w)
    extra = {}
    if "bits" in kw:
        s, z, grid = expanded(w, kw["bits"], kw.get("group_size"))
        extra = dict(s=s, z=z, maxq=grid.maxq)
    want, loss = naive_fixed_order(Hd, w0, sparsity=kw.get("sparsity"), nm=kw.get("nm"), blocksize=bs, **extra)
    np.testing.assert_array_equal(r.weight == 0, want == 0)
    np.testing.assert_allclose(r.weight, want, atol=1e-6)
    assert r.loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("sparsity", [0.5, 0.37, 0.9])
def test_sparsegpt_sparsity_is_exact(sparsity):
    w, H = layer(13, 300, seed=4)  # 3 blocks, the last one partial
    r = prune_sparsegpt(w, H, sparsity=sparsity)
    assert int((r.weight == 0).sum()) == int(round(sparsity * w.size))
    assert layer_error(w, r.weight, H) < layer_error(w, np.where(r.weight == 0, 0, w), H)  # compensation helps


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 6)])
def test_sparsegpt_nm_pattern(n, m):
    w, H = layer(7, 48, seed=5)
    r = prune_sparsegpt(w, H, nm=(n, m), bits=4)
    kept = (r.weight != 0).reshape(7, 48 // m, m).sum(axis=2)
    assert kept.max() <= n
    # joint: the survivors lie on the grid fitted up front
    np.testing.assert_array_equal(r.weight, apply_grid(r.weight, r.grid))


def test_grouped_matrices_in_one_pass():
    ws, Hs = zip(*(layer(6, 24, seed=s) for s in range(3)))
    both = fast_obs(list(ws), list(Hs), bits=4, dtype="float64")
    for w, H, r in zip(ws, Hs, both):
        np.testing.assert_allclose(r.weight, quantize_gptq(w, H, 4, dtype="float64").weight, atol=1e-7)
    pr = fast_obs(list(ws), list(Hs), sparsity=0.5)
    assert sum(int((r.weight == 0).sum()) for r in pr) == round(0.5 * 3 * 6 * 24)  # one count for the layer


def test_damping_as_prepare_does():
    w, H = layer(5, 16, seed=6, n=6)  # rank 6 < 16
    H -= 1e-3 * np.eye(16)  # indefinite: a tiny damping must escalate
    r = quantize_gptq(w, H, 4, damp=1e-6)
    assert r.info["damp"] > 1e-6
    assert r.info["damp"] == pytest.approx(prepare(H, w, 1e-6).damp)
    r2 = quantize_gptq(w, H, 4, damp=0.05)
    assert r2.info["damp"] == 0.05


def test_act_order_on_the_stored_grid_in_original_order():
    w, H = layer(8, 64, seed=7)
    H[np.arange(64), np.arange(64)] *= np.linspace(0.2, 5, 64)[::-1] ** 2  # act-order differs from stored order
    r = quantize_gptq(w, H, 3, group_size=16, act_order=True)
    g = fit_grid(w, 3, group_size=16)  # static groups: fitted on the original consecutive columns
    np.testing.assert_array_equal(r.grid.scale, g.scale)
    np.testing.assert_array_equal(r.weight, apply_grid(r.weight, r.grid))
    plain = quantize_gptq(w, H, 3, group_size=16)
    assert not np.array_equal(r.weight, plain.weight)


def test_fast_mode_argument_errors():
    w, H = layer(4, 8)
    with pytest.raises(ValueError, match="act_order"):
        fast_obs([w], [H], sparsity=0.5, act_order=True)
    with pytest.raises(ValueError, match="multiple of M"):
        fast_obs([w], [H], nm=(2, 3))
    with pytest.raises(ValueError, match="nothing to do"):
        fast_obs([w], [H])


# -------------------------------------------------------------------------------------------- spec / solve
@pytest.mark.parametrize("kw,msg", [
    (dict(method="exact", bits=4, act_order=True), "act-order"),
    (dict(method="gptq", sparsity=0.5, bits=4, act_order=True), "no pruning"),
    (dict(method="auto", act_order=True, sparsity=0.5), "act-order"),
])
def test_spec_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LayerSpec(**kw)


@pytest.mark.parametrize("kw,msg", [(dict(method="gptq", sparsity=0.5), "give --bits"),
                                    (dict(method="sparsegpt", bits=4), "prunes"),
                                    (dict(method="sparsegpt", sparsity=0.5, block_size=4), "block-size")])
def test_method_checks(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CompressConfig(**kw)


def problem(rows=16, c=32, seed=8, groups=1):
    mats, Hs = zip(*(layer(rows, c, seed=seed + g) for g in range(groups)))
    return Problem("fc", np.stack(mats), np.stack(Hs))


def test_auto_keeps_the_lower_error_and_says_why():
    p = problem()
    for spec_kw in (dict(bits=3), dict(bits=4, act_order=True), dict(sparsity=0.5), dict(nm=(2, 4), bits=4)):
        auto = solve(p, LayerSpec(method="auto", **spec_kw))
        ex = solve(p, LayerSpec(method="exact", **{k: v for k, v in spec_kw.items() if k != "act_order"}))
        fast = "sparsegpt" if ("sparsity" in spec_kw or "nm" in spec_kw) else "gptq"
        fa = solve(p, LayerSpec(method=fast, **spec_kw))
        assert fa.solver == fast and ex.solver == "exact"
        best = min((ex, fa), key=lambda r: r.error)
        assert auto.solver == best.solver
        np.testing.assert_array_equal(auto.mats, best.mats)
        assert auto.error == min(ex.error, fa.error)
        note = next(n for n in auto.notes if n.kind == "solver")
        assert note.value["solver"] == auto.solver
        assert note.value["errors"] == {"exact": ex.error, fast: fa.error}
        assert auto.solver in note.text and "both ran" in note.text


def test_auto_above_the_threshold_runs_only_the_fast_mode(monkeypatch):
    p = problem()
    monkeypatch.setattr(solver_mod, "AUTO_EXACT_MAX_COST", 16 * 32 ** 3 - 1)
    calls = []
    real = solver_mod._solve_exact
    monkeypatch.setattr(solver_mod, "_solve_exact", lambda *a: calls.append(1) or real(*a))
    r = solve(p, LayerSpec(method="auto", bits=4))
    assert r.solver == "gptq" and not calls
    note = next(n for n in r.notes if n.kind == "solver")
    assert note.value == dict(solver="gptq", cost=16 * 32 ** 3, threshold=16 * 32 ** 3 - 1)
    np.testing.assert_array_equal(r.mats, solve(p, LayerSpec(method="gptq", bits=4)).mats)
    monkeypatch.setattr(solver_mod, "AUTO_EXACT_MAX_COST", 16 * 32 ** 3)  # at the threshold: exact runs too
    assert solve(p, LayerSpec(method="auto", bits=4)).notes[0].value["errors"]


def test_auto_block_sparsity_is_exact():
    r = solve(problem(), LayerSpec(method="auto", sparsity=0.5, block_size=4))
    assert r.solver == "exact" and "block" in r.notes[0].text


def test_sparsegpt_falls_back_to_gptq_when_c_is_no_multiple_of_m():
    p = problem(c=30)
    r = solve(p, LayerSpec(method="sparsegpt", nm=(2, 4), bits=4))
    assert r.solver == "gptq" and r.spec.method == "gptq" and r.notes[0].kind == "not_pruned"


def test_plan_accepts_the_new_methods():
    rules = parse_rules([{"match": "fc", "method": "gptq", "bits": 4, "act_order": True},
                         {"match": "conv", "method": "sparsegpt", "nm": "2:4"},
                         {"match": ".", "method": "auto"}])
    specs = resolve(["fc1", "conv1", "other"], CompressConfig(bits=3), rules)
    assert specs["fc1"] == LayerSpec(method="gptq", bits=4, act_order=True)
    assert specs["conv1"] == LayerSpec(method="sparsegpt", nm=(2, 4), bits=3)
    assert specs["other"] == LayerSpec(method="auto", bits=3)
    assert specs["fc1"].to_rule()["act_order"] is True
    with pytest.raises(ValueError, match="act-order"):
        resolve(["fc1"], CompressConfig(bits=3), parse_rules([{"match": "fc", "method": "exact", "act_order": True}]))


# ------------------------------------------------------------------------------------------ end to end
def run(model, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


@pytest.mark.parametrize("case,gs", [("bert_like", 4), ("gemm_transB0", 4), ("conv2d_grouped", 2)])
@pytest.mark.parametrize("method", ["gptq", "auto"])
def test_act_order_exports_as_blocked_qdq(case, gs, method):
    model = ensure_opset(graphs.BUILDERS[case](), 4, 21)
    feed = graphs.make_feed(model, 6, seed=3)
    cfg = dict(method=method, bits=4, group_size=gs, act_order=True)
    fake = compress(model, None, [feed], CompressConfig(**cfg))
    qdq = compress(model, None, [feed], CompressConfig(qdq=True, **cfg))
    onnx.checker.check_model(qdq.extra["model"], full_check=True)
    assert any(n.op_type == "DequantizeLinear" for n in qdq.extra["model"].graph.node)
    for a, b in zip(run(fake.extra["model"], feed), run(qdq.extra["model"], feed)):
        assert rel(a, b) < 1e-5
    assert all(l.error is not None and l.bits == 4 for l in qdq.layers)


def test_act_order_exports_as_matmulnbits():
    model = graphs.BUILDERS["bert_like"]()
    feed = graphs.make_feed(model, 6, seed=4)
    cfg = dict(method="gptq", bits=4, group_size=16, act_order=True)
    fake = compress(model, None, [feed], CompressConfig(**cfg))
    mnb = compress(model, None, [feed], CompressConfig(matmulnbits=True, **cfg))
    assert any(n.op_type == "MatMulNBits" for n in mnb.extra["model"].graph.node)
    for a, b in zip(run(fake.extra["model"], feed), run(mnb.extra["model"], feed)):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("kw", [dict(method="sparsegpt", sparsity=0.5), dict(method="sparsegpt", nm=(2, 4), bits=8),
                                dict(method="auto", sparsity=0.5, bits=4), dict(method="gptq", bits=3)])
def test_compress_through_the_pipeline(kw):
    model = graphs.BUILDERS["mixed_cnn"]()
    feed = graphs.make_feed(model, 8, seed=5)
    res = compress(model, None, [feed], CompressConfig(**kw))
    assert res.layers and all(l.error is not None for l in res.layers)
    out = run(res.extra["model"], feed)
    assert all(np.all(np.isfinite(o)) for o in out)
    if kw["method"] == "auto":
        assert all(any(n["kind"] == "solver" for n in l.notes) for l in res.layers if l.method != "dense")


def test_cli_report_records_the_solver(tmp_path, capsys):
    model = graphs.BUILDERS["bert_like"]()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", **graphs.make_feed(model, 8))
    rep = tmp_path / "r.json"
    assert main(["compress", str(path), "--calib", str(tmp_path / "c.npz"), "--bits", "4", "--method", "auto",
                 "--act-order", "-o", str(tmp_path / "o.onnx"), "--report", str(rep), "-q"]) == 0
    layers = json.loads(rep.read_text())["layers"]
    assert layers
    for l in layers:
        note = next(n for n in l["notes"] if n["kind"] == "solver")
        assert note["value"]["solver"] in ("exact", "gptq")
        assert l["solver"] == note["value"]["solver"]
        assert l["method"].startswith("auto 4b")


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(bits=4), dict(bits=4, group_size=8, act_order=True), dict(sparsity=0.5),
                                dict(nm=(2, 4), bits=4)])
def test_cupy_matches_numpy(kw):
    import cupy as cp

    w, H = layer(24, 64, seed=9)
    a = fast_obs([w], [H], dtype="float64", **kw)[0]
    b = fast_obs([cp.asarray(w)], [cp.asarray(H)], dtype="float64", **kw)[0]
    np.testing.assert_allclose(cp.asnumpy(b.weight), a.weight, atol=1e-6)
    assert b.loss == pytest.approx(a.loss, rel=1e-6)


@pytest.mark.gpu
def test_cupy_solve_auto():
    p = problem()
    a = solve(p, LayerSpec(method="auto", bits=4))
    b = solve(p, LayerSpec(method="auto", bits=4, device="cuda"))
    assert a.solver == b.solver
    assert b.error == pytest.approx(a.error, rel=1e-3)


def test_block_mask_ties_are_broken_by_position():
    from onnxobc.engine.sparsegpt import block_mask

    rng = np.random.default_rng(11)
    W1 = rng.integers(-2, 3, size=(2, 5, 8)).astype(np.float32)  # many equal scores (and zeros)
    d1 = np.ones((2, 8))
    for k in (0, 1, 7, 33, 79, 80):
        want = np.zeros(80, bool)
        want[np.argsort((W1.astype(np.float64) ** 2).ravel(), kind="stable")[:k]] = True
        np.testing.assert_array_equal(block_mask(W1, d1, k), want.reshape(W1.shape))
