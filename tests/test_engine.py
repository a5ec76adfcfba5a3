"""The engine against naive references, closed forms and the baselines (ALGORITHMS.md sec. 0-4).

The naive references re-invert the Hessian restricted to the free weights at every step (no delayed updates,
no compaction, no batching), in float64, on tiny layers. The engine runs with tiny update buffers and row
batches (fixture ``small_buffers``) so that flushes, compaction and several batches all happen at these sizes.
"""
from __future__ import annotations

import numpy as np
import pytest

import onnxobc.engine._greedy as G
from onnxobc.engine import (EngineResult, compress_weight, prepare_hessian, prune_blocks, prune_nm,
                            prune_unstructured, quantize_obq)
from onnxobc.engine.baselines import magnitude_prune, magnitude_prune_nm, rtn_quantize
from onnxobc.engine.grid import apply_grid, fit_grid, quantize
from onnxobc.engine.hessian import prepare
from onnxobc.engine.metrics import layer_error
from onnxobc.engine.obs import trace_blocks, trace_unstructured
from onnxobc.engine.reference import (damped, global_states, naive_blocks, naive_group_grid, naive_minmax_params,
                                      naive_obq, naive_obs)
from onnxobc.errors import NumericalError

DAMP = 0.01


# --------------------------------------------------------------------------------------------- problems
def make_problem(rows: int, c: int, seed: int, *, dead: tuple[int, ...] = (), n: int | None = None,
                 decay: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Weights (float32) and H = 2 X X^T / n from correlated inputs (mixed, decaying spectrum)."""
    rng = np.random.default_rng(seed)
    n = n or 4 * c
    X = rng.standard_normal((c, n)) * (np.arange(1, c + 1) ** -decay)[:, None]
    X = (rng.standard_normal((c, c)) / np.sqrt(c) + np.eye(c)) @ X  # correlate the inputs
    X[list(dead)] = 0
    H = 2.0 * X @ X.T / n
    w = rng.standard_normal((rows, c)).astype(np.float32)
    return w, H


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.fixture
def small_buffers(monkeypatch):
    """Update buffers of 3-4 vectors and batches of 3 rows: flushes, compaction and batching at tiny sizes."""
    monkeypatch.setattr(G, "NBUF", 4)
    monkeypatch.setattr(G, "MAX_ROWS", {"cpu": 3, "gpu": 3})


@pytest.fixture
def lazy_compaction(monkeypatch):
    """Buffers of 3 vectors on 40 columns: flushes first update in place (fixed columns stay, sec. 4) and
    compact only once 20% of the columns are stale, so both flush paths run."""
    monkeypatch.setattr(G, "NBUF", 3)
    monkeypatch.setattr(G, "MAX_ROWS", {"cpu": 2, "gpu": 2})


# --------------------------------------------------------------------------------------------- sec. 0
def test_prepare_hessian_dead_inputs_and_damping():
    w, H = make_problem(3, 8, 0, dead=(2, 5))
    Hinv, w2, dead, lam = prepare_hessian(H, w, 0.01)
    assert lam == 0.01
    assert dead.tolist() == [j in (2, 5) for j in range(8)]
    assert np.all(w2[:, [2, 5]] == 0) and np.array_equal(w2[:, [0, 1, 3]], w[:, [0, 1, 3]])
    assert w2.dtype == w.dtype and not np.shares_memory(w2, w)
    Hd, _ = damped(H, w)
    np.testing.assert_allclose(Hinv @ Hd, np.eye(8), atol=1e-9)
    assert np.all(H[2] == 0), "the input Hessian must not be modified"


def test_damping_escalates_on_indefinite_hessian():
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    H = Q @ np.diag([2.0, 1.0, -0.05]) @ Q.T  # mean diag 0.983: damp 0.01 is not enough, 0.1 is
    w = rng.standard_normal((2, 3)).astype(np.float32)
    Hinv, _, _, lam = prepare_hessian(H, w, 0.01)
    assert lam == pytest.approx(0.1)
    Hd = H + lam * np.mean(np.diag(H)) * np.eye(3)
    np.testing.assert_allclose(Hinv @ Hd, np.eye(3), atol=1e-9)
    res = prune_unstructured(w, H, 0.5, dtype="float64")
    assert res.info["damp"] == pytest.approx(0.1)


def test_damping_gives_up_with_a_clear_error():
    H = np.diag([10.0, 10.0, -9.0])  # needs damp > 2.45: three tries (0.01, 0.1, 1) fail
    w = np.ones((1, 3), np.float32)
    with pytest.raises(NumericalError, match=r"conv7.*raise --damp or use more calibration data"):
        prepare_hessian(H, w, 0.01, name="conv7", max_tries=3)
    assert prepare_hessian(H, w, 0.01, max_tries=4)[3] == pytest.approx(10.0)
    with pytest.raises(NumericalError, match="NaN"):
        prepare_hessian(np.full((3, 3), np.nan), w, name="fc")


# --------------------------------------------------------------------------------------------- sec. 1
def test_one_weight_by_hand():
    """H = [[4,2,0],[2,2,0],[0,0,1]], w = (1, 0.2, 0.5): Hinv = [[.5,-.5,0],[-.5,1,0],[0,0,1]]; scores
    w^2/Hinv_qq = 2, 0.04, 0.25, so w_1 goes, loss 0.04/2 = 0.02, dw = -(0.2/1) Hinv[1] = (0.1, -0.2, 0)."""
    H = np.array([[4.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    w = np.array([[1.0, 0.2, 0.5]], np.float32)
    res = prune_unstructured(w, H, 1 / 3, damp=1e-12, dtype="float64")
    np.testing.assert_allclose(res.weight, [[1.1, 0.0, 0.5]], rtol=1e-6)
    assert res.weight[0, 1] == 0
    assert res.loss == pytest.approx(0.02, rel=1e-6)  # w is float32: 0.2 is 0.2000000030


@pytest.mark.parametrize("seed", [0, 1])
def test_exactobs_trace_matches_naive(small_buffers, seed):
    w, H = make_problem(7, 12, seed, dead=(4,))
    prep = prepare(H, w)
    order, losses = trace_unstructured(prep, np.dtype(np.float64))
    Hd, wd = damped(H, w)
    for r in range(7):
        o, l, _ = naive_obs(Hd, wd[r])
        assert o.tolist() == order[r].tolist()
        assert rel(losses[r], l) < 1e-4


def test_lazy_compaction_matches_naive(lazy_compaction):
    w, H = make_problem(3, 40, 20, dead=(11,))
    w[0, 7] = 5.0
    prep = prepare(H, w)
    order, losses = trace_unstructured(prep, np.dtype(np.float64))
    Hd, wd = damped(H, w)
    for r in range(3):
        o, l, _ = naive_obs(Hd, wd[r])
        assert o.tolist() == order[r].tolist() and rel(losses[r], l) < 1e-4
    res = quantize_obq(w, H, 3, dtype="float64")
    g = fit_grid(w, 3)
    for r in range(3):
        ref = naive_obq(Hd, wd[r], float(g.scale[r]), float(g.zero_point[r]), g.maxq)[2]
        np.testing.assert_allclose(res.weight[r], ref, rtol=1e-6, atol=1e-7)
    bo, bl = trace_blocks(prep, 2, np.dtype(np.float64))
    for r in range(3):
        o, l, _ = naive_blocks(Hd, wd[r], 2)
        assert o.tolist() == bo[r].tolist() and rel(bl[r], l) < 1e-4


def test_thread_count_does_not_change_results(monkeypatch):
    monkeypatch.setattr(G, "MAX_ROWS", {"cpu": 2, "gpu": 2})
    w, H = make_problem(9, 48, 21)
    mask = np.random.default_rng(1).random(w.shape) > 0.5
    outs = []
    for threads in ("1", "3"):
        monkeypatch.setenv("ONNXOBC_THREADS", threads)
        outs.append([prune_unstructured(w, H, 0.5), prune_nm(w, H, 2, 4), quantize_obq(w, H, 4, mask=mask),
                     prune_blocks(w, H, 4, 0.5)])
    for a, b in zip(*outs):
        assert np.array_equal(a.weight, b.weight) and a.loss == b.loss


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_exactobs_global_mask_matches_naive(small_buffers, sparsity):
    w, H = make_problem(5, 12, 2)
    res = prune_unstructured(w, H, sparsity, dtype="float64")
    Hd, wd = damped(H, w)
    W_ref, loss_ref = global_states([naive_obs(Hd, wd[r]) for r in range(5)], round(sparsity * w.size))
    assert isinstance(res, EngineResult) and res.grid is None
    assert res.weight.dtype == np.float32 and res.weight.shape == w.shape
    assert np.array_equal(res.weight == 0, W_ref == 0)
    np.testing.assert_allclose(res.weight, W_ref, rtol=1e-5, atol=1e-6)
    assert res.loss == pytest.approx(loss_ref, rel=1e-6)
    assert int((res.weight == 0).sum()) == round(sparsity * w.size)
    # the loss is the objective: 1/2 sum_r dw_r Hd dw_r^T
    d = res.weight.astype(np.float64) - wd
    assert res.loss == pytest.approx(0.5 * np.einsum("rc,cd,rd->", d, Hd, d), rel=1e-5)


def test_float32_loop_agrees_with_float64():
    w, H = make_problem(6, 150, 3)  # default buffers: 150 columns > one update buffer, so flushes happen
    a = prune_unstructured(w, H, 0.5, dtype="float64")
    b = prune_unstructured(w, H, 0.5, dtype="float32")
    assert b.loss == pytest.approx(a.loss, rel=1e-3)
    assert np.mean((a.weight == 0) == (b.weight == 0)) > 0.99


def test_identity_hessian_exactobs_is_magnitude():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 20)).astype(np.float32)
    res = prune_unstructured(w, np.eye(20), 0.6)
    mag = magnitude_prune(w, 0.6)
    assert np.array_equal(res.weight == 0, mag == 0)
    np.testing.assert_array_equal(res.weight, mag)  # no compensation when H is diagonal


def test_exactobs_beats_magnitude():
    w, H = make_problem(16, 64, 6)
    res = prune_unstructured(w, H, 0.5)
    assert layer_error(w, res.weight, H) < 0.7 * layer_error(w, magnitude_prune(w, 0.5), H)


def test_dead_inputs_pruned_for_free():
    w, H = make_problem(4, 12, 7, dead=(0, 9))
    res = prune_unstructured(w, H, 0.25)
    assert res.info["dead"] == 2
    assert np.all(res.weight[:, [0, 9]] == 0)
    assert int((res.weight == 0).sum()) == 12  # the 8 dead weights are among the 12 pruned


def test_zero_sparsity_is_identity_but_dead_zeroed():
    w, H = make_problem(3, 8, 8, dead=(1,))
    res = prune_unstructured(w, H, 0.0)
    assert res.loss == 0.0 and np.all(res.weight[:, 1] == 0)
    np.testing.assert_array_equal(np.delete(res.weight, 1, axis=1), np.delete(w, 1, axis=1))


def test_deterministic():
    w, H = make_problem(5, 40, 9)
    a, b = prune_unstructured(w, H, 0.5), prune_unstructured(w, H, 0.5)
    assert np.array_equal(a.weight, b.weight) and a.loss == b.loss


# --------------------------------------------------------------------------------------------- sec. 2
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 3)])
def test_nm_matches_naive(small_buffers, n, m):
    w, H = make_problem(5, 12, 10, dead=(5,))
    res = prune_nm(w, H, n, m, dtype="float64")
    Hd, wd = damped(H, w)

    def allowed(pruned, j):
        g = j // m
        return pruned[g * m:(g + 1) * m].sum() < m - n

    total = 0.0
    for r in range(5):
        o, l, st = naive_obs(Hd, wd[r], allowed, steps=12 * (m - n) // m)
        np.testing.assert_allclose(res.weight[r], st[-1], rtol=1e-5, atol=1e-6)
        total += l.sum()
    assert res.loss == pytest.approx(total, rel=1e-6)
    nz = (res.weight.reshape(5, -1, m) != 0).sum(axis=2)
    assert np.all(nz <= n)


def test_nm_beats_magnitude_and_validates():
    w, H = make_problem(16, 64, 11)
    res = prune_nm(w, H, 2, 4)
    assert np.all((res.weight.reshape(16, -1, 4) != 0).sum(axis=2) <= 2)
    assert layer_error(w, res.weight, H) < 0.8 * layer_error(w, magnitude_prune_nm(w, 2, 4), H)
    with pytest.raises(ValueError, match="multiple of M=4"):
        prune_nm(w[:, :62], H[:62, :62], 2, 4)
    with pytest.raises(ValueError, match="N < M"):
        prune_nm(w, H, 4, 4)


@pytest.mark.parametrize("bs,c,sparsity", [(2, 12, 0.5), (3, 12, 0.4), (10, 40, 0.5)])
def test_blocks_match_naive(small_buffers, bs, c, sparsity):
    w, H = make_problem(4, c, 12)
    prep = prepare(H, w)
    order, losses = trace_blocks(prep, bs, np.dtype(np.float64))
    Hd, wd = damped(H, w)
    traces = [naive_blocks(Hd, wd[r], bs) for r in range(4)]
    for r in range(4):
        assert order[r].tolist() == traces[r][0].tolist()
        assert rel(losses[r], traces[r][1]) < 1e-4
    res = prune_blocks(w, H, bs, sparsity, dtype="float64")
    W_ref, loss_ref = global_states(traces, round(sparsity * 4 * c / bs))
    np.testing.assert_allclose(res.weight, W_ref, rtol=1e-5, atol=1e-6)
    assert res.loss == pytest.approx(loss_ref, rel=1e-6)
    zero_blocks = (res.weight.reshape(4, -1, bs) == 0)
    assert np.all(zero_blocks.all(axis=2) == zero_blocks.any(axis=2))  # whole blocks only
    with pytest.raises(ValueError, match="multiple of block_size"):
        prune_blocks(w[:, :c - 1], H[:c - 1, :c - 1], bs, 0.5)


# --------------------------------------------------------------------------------------------- sec. 3
def on_grid(res: EngineResult) -> bool:
    g = res.grid
    scale, zero = g.expand(res.weight.shape[1])
    q = quantize(res.weight, scale, zero, g.maxq)
    return q.dtype == res.weight.dtype and np.array_equal(q.view(np.uint32), res.weight.view(np.uint32))


@pytest.mark.parametrize("bits,sym", [(4, False), (3, True), (2, False)])
def test_obq_matches_naive(small_buffers, bits, sym):
    w, H = make_problem(5, 12, 13, dead=(7,))
    w[1, 3] = 4.0  # a large weight: compensation pushes others off the grid -> outlier rule engages
    res = quantize_obq(w, H, bits, sym=sym, dtype="float64")
    assert on_grid(res)
    Hd, wd = damped(H, w)
    g = fit_grid(w, bits, sym=sym)
    total = 0.0
    for r in range(5):
        _, l, wr = naive_obq(Hd, wd[r], float(g.scale[r]), float(g.zero_point[r]), g.maxq)
        np.testing.assert_allclose(res.weight[r], wr, rtol=1e-6, atol=1e-7)
        total += l.sum()
    assert res.loss == pytest.approx(total, rel=1e-6)


def test_obq_masked_matches_naive(small_buffers):
    w, H = make_problem(6, 12, 14)
    rng = np.random.default_rng(0)
    mask = rng.random(w.shape) > 0.4
    mask[2] = True  # a row with nothing masked
    mask[3, :] = False
    mask[3, 5] = True  # a row with a single survivor
    res = quantize_obq(w, H, 3, mask=mask, dtype="float64")
    assert on_grid(res)
    assert np.all(res.weight[~mask] == 0)
    Hd, wd = damped(H, w)
    g = fit_grid(w, 3, mask=mask)
    for r in range(6):
        _, _, wr = naive_obq(Hd, wd[r], float(g.scale[r]), float(g.zero_point[r]), g.maxq, kept=mask[r])
        np.testing.assert_allclose(res.weight[r], wr, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_identity_hessian_obq_is_round_to_nearest(method):
    rng = np.random.default_rng(15)
    w = rng.standard_normal((5, 24)).astype(np.float32)
    res = quantize_obq(w, np.eye(24), 4, grid_method=method)
    rtn, grid = rtn_quantize(w, 4, grid_method=method)
    np.testing.assert_array_equal(res.weight, rtn)
    np.testing.assert_array_equal(res.grid.scale, grid.scale)
    assert np.array_equal(res.weight, apply_grid(w, res.grid))


@pytest.mark.parametrize("bits", [3, 4])
def test_obq_beats_rtn_and_lies_on_grid(bits):
    w, H = make_problem(16, 64, 16)
    res = quantize_obq(w, H, bits, grid_method="mse")
    assert on_grid(res)
    assert res.weight.dtype == np.float32
    rtn, _ = rtn_quantize(w, bits, grid_method="mse")
    assert layer_error(w, res.weight, H) < 0.8 * layer_error(w, rtn, H)


# ---------------------------------------------------------------------------------------- compound
@pytest.mark.parametrize("prune", [dict(sparsity=0.5), dict(nm=(2, 4)), dict(block_size=2, sparsity=0.5)])
def test_compound(prune):
    w, H = make_problem(8, 32, 17)
    pr = compress_weight(w, H, **prune)
    res = compress_weight(w, H, bits=4, **prune)
    zeros = pr.weight == 0
    assert np.all(res.weight[zeros] == 0), "pruned weights must stay exactly zero"
    assert on_grid(res)
    assert res.loss > pr.loss and res.info["prune"]["zeros"] == int(zeros.sum())
    if "nm" in prune:
        assert np.all((res.weight.reshape(8, -1, 4) != 0).sum(axis=2) <= 2)
    g = fit_grid(pr.weight, 4, mask=~zeros)
    np.testing.assert_array_equal(res.grid.scale, g.scale)  # grid fitted on the survivors
    # compound error is the prune error plus the quantization error (sec. 3: additive greedy objective)
    Hd, wd = damped(H, w)
    d = res.weight.astype(np.float64) - wd
    assert res.loss == pytest.approx(0.5 * np.einsum("rc,cd,rd->", d, Hd, d), rel=1e-3)


def test_compress_weight_validation():
    w, H = make_problem(2, 8, 18)
    for kw, msg in [(dict(), "nothing to do"), (dict(nm=(2, 4), sparsity=0.5), "exclusive"),
                    (dict(nm=(2, 4), block_size=2), "exclusive"), (dict(block_size=2), "needs a sparsity"),
                    (dict(sparsity=1.0), r"\[0, 1\)"), (dict(bits=9), "bits"),
                    (dict(sparsity=0.5, dtype="float16"), "dtype")]:
        with pytest.raises(ValueError, match=msg):
            compress_weight(w, H, **kw)
    with pytest.raises(ValueError, match="Hessian must be 8 x 8"):
        compress_weight(w, H[:4, :4], sparsity=0.5)
    r = compress_weight(w, H, sparsity=0.5)
    assert r.grid is None and int((r.weight == 0).sum()) == 8


def test_blas_thread_limit_is_restored(monkeypatch):
    from threadpoolctl import threadpool_info

    from onnxobc.engine import _blas

    monkeypatch.delenv("ONNXOBC_BLAS_THREADS", raising=False)
    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    with _blas.blas_threads(1):
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before


# ------------------------------------------------------------------------------------- grouped layers
def test_groups_select_one_global_mask():
    """Groups sharing one Hessian are the same problem as the stacked matrix: identical result. Groups with
    different Hessians get uneven per-group sparsity but the exact total."""
    from onnxobc.engine import compress_groups

    w, H = make_problem(6, 9, seed=11)
    stacked = prune_unstructured(w, H, 0.5).weight
    parts = compress_groups([w[:2], w[2:4], w[4:]], [H, H, H], sparsity=0.5)
    np.testing.assert_array_equal(np.concatenate([p.weight for p in parts]), stacked)

    ws, Hs = zip(*[make_problem(1, 8, seed=s, decay=0.2 + s) for s in range(8)])
    parts = compress_groups(list(ws), list(Hs), sparsity=0.5)
    zeros = [int((p.weight == 0).sum()) for p in parts]
    assert sum(zeros) == 32 and len(set(zeros)) > 1
    # same total (4 of 8 per group when forced): the global choice's summed greedy loss is never worse
    forced = [prune_unstructured(w_, H_, 0.5) for w_, H_ in zip(ws, Hs)]
    assert sum(p.loss for p in parts) <= sum(f.loss for f in forced) + 1e-12
    q = compress_groups(list(ws), list(Hs), sparsity=0.5, bits=4)
    for p, qq in zip(parts, q):
        assert np.all((qq.weight == 0) | (p.weight != 0)) and np.all(qq.weight[p.weight == 0] == 0)


# ---------------------------------------------------------------------------------- group-wise grids
@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", [16, 7])
def test_group_grid_matches_per_group_loop(method, masked, sym, gs):
    rng = np.random.default_rng(40)
    w = (rng.standard_normal((6, 70)) * rng.uniform(0.1, 3.0, 70)).astype(np.float32)  # 70 % gs: a partial group
    mask = rng.random(w.shape) > 0.4 if masked else None
    if masked:
        mask[1, :gs] = False  # an all-masked group: degenerate range
    g = fit_grid(w, 4, sym=sym, method=method, mask=mask, group_size=gs)
    ng = -(-70 // gs)
    assert g.group_size == gs and g.scale.shape == (6, ng) and g.zero_point.shape == (6, ng)
    assert g.scale.dtype == w.dtype
    s_ref, z_ref = naive_group_grid(w, 4, gs, sym=sym, method=method, mask=mask)
    np.testing.assert_array_equal(g.scale, s_ref)
    np.testing.assert_array_equal(g.zero_point, z_ref)
    if method == "minmax":
        wm = w if mask is None else np.where(mask, w, 0)
        for r in (0, 1, 5):
            for j in range(ng):
                s, z = naive_minmax_params(wm[r, j * gs:(j + 1) * gs], 4, sym)
                assert g.scale[r, j] == pytest.approx(s, rel=1e-6) and g.zero_point[r, j] == z
    # every weight is rounded on its own group's grid; pruned zeros stay exactly 0
    q, g2 = rtn_quantize(w, 4, sym=sym, grid_method=method, mask=mask, group_size=gs)
    for j in range(ng):
        sl = slice(j * gs, (j + 1) * gs)
        ref = quantize(w[:, sl], g.scale[:, j:j + 1], g.zero_point[:, j:j + 1], g.maxq)
        if mask is not None:
            ref = np.where(mask[:, sl], ref, 0)
        np.testing.assert_array_equal(q[:, sl], ref)
    assert np.array_equal(apply_grid(q, g2), q)
    scale, zero = g.expand(70)
    assert scale.shape == (6, 70) and np.array_equal(scale[:, gs * (ng - 1):], np.repeat(g.scale[:, -1:], 70 - gs * (ng - 1), 1))
    with pytest.raises(ValueError, match="groups per row"):
        g.expand(70 + gs)
    sub = g.rows(slice(1, 3))
    assert sub.group_size == gs and sub.scale.shape == (2, ng)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_group_size_covering_the_row_is_per_row(method):
    w, H = make_problem(5, 24, 41)
    per_row = fit_grid(w, 3, method=method)
    per_row_obq = quantize_obq(w, H, 3, grid_method=method)
    for gs in (24, 100):
        g = fit_grid(w, 3, method=method, group_size=gs)
        assert g.scale.shape == (5, 1)  # kept as one group, not normalised to per-row
        np.testing.assert_array_equal(g.scale[:, 0], per_row.scale)
        np.testing.assert_array_equal(g.zero_point[:, 0], per_row.zero_point)
        np.testing.assert_array_equal(apply_grid(w, g), apply_grid(w, per_row))
        res = quantize_obq(w, H, 3, grid_method=method, group_size=gs)
        np.testing.assert_array_equal(res.weight, per_row_obq.weight)
        assert res.loss == per_row_obq.loss
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="group_size"):
            fit_grid(w, 3, group_size=bad)
    with pytest.raises(ValueError, match="group_size"):
        compress_weight(w, H, sparsity=0.5, group_size=8)  # no bits
    with pytest.raises(ValueError, match="layer: group_size"):
        compress_weight(w, H, bits=4, group_size=0)


@pytest.mark.parametrize("bits,sym,gs", [(4, False, 6), (3, True, 5), (2, False, 4)])
def test_obq_groups_match_naive(small_buffers, bits, sym, gs):
    w, H = make_problem(5, 16, 42, dead=(7,))
    w[1, 3] = 4.0  # outlier rule engages
    res = quantize_obq(w, H, bits, sym=sym, dtype="float64", group_size=gs)
    assert on_grid(res) and res.grid.group_size == gs and res.grid.scale.shape == (5, -(-16 // gs))
    assert np.array_equal(res.weight, apply_grid(res.weight, res.grid))
    Hd, wd = damped(H, w)
    g = fit_grid(w, bits, sym=sym, group_size=gs)
    scale, zero = g.expand(16)
    total = 0.0
    for r in range(5):
        _, l, wr = naive_obq(Hd, wd[r], scale[r], zero[r], g.maxq)
        np.testing.assert_allclose(res.weight[r], wr, rtol=1e-5, atol=1e-6)
        total += l.sum()
    assert res.loss == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("fixture", ["small_buffers", "lazy_compaction"])
def test_obq_groups_masked_match_naive(request, fixture):
    request.getfixturevalue(fixture)
    c = 40 if fixture == "lazy_compaction" else 16
    w, H = make_problem(6, c, 43)
    rng = np.random.default_rng(1)
    mask = rng.random(w.shape) > 0.4
    mask[2] = True
    mask[3, :] = False
    mask[3, 5] = True
    res = quantize_obq(w, H, 3, mask=mask, dtype="float64", group_size=6)
    assert on_grid(res) and np.all(res.weight[~mask] == 0)
    Hd, wd = damped(H, w)
    g = fit_grid(w, 3, mask=mask, group_size=6)
    np.testing.assert_array_equal(res.grid.scale, g.scale)
    scale, zero = g.expand(c)
    for r in range(6):
        _, _, wr = naive_obq(Hd, wd[r], scale[r], zero[r], g.maxq, kept=mask[r])
        np.testing.assert_allclose(res.weight[r], wr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,gs", [(3, 16), (4, 32), (4, 24)])
def test_obq_groups_beat_rtn_and_lie_on_grid(bits, gs):
    w, H = make_problem(16, 64, 44)
    res = quantize_obq(w, H, bits, grid_method="mse", group_size=gs)
    assert on_grid(res) and res.weight.dtype == np.float32
    rtn, grid = rtn_quantize(w, bits, grid_method="mse", group_size=gs)
    np.testing.assert_array_equal(res.grid.scale, grid.scale)
    assert layer_error(w, res.weight, H) < 0.8 * layer_error(w, rtn, H)


def test_groups_help_with_column_outliers():
    """Column groups of very different magnitudes: a per-row grid wastes its levels on the large groups."""
    w, H = make_problem(16, 64, 45)
    mags = np.repeat(10.0 ** np.random.default_rng(2).uniform(-2, 0.5, 8), 8)
    w = (w * mags[None, :]).astype(np.float32)
    per_row = quantize_obq(w, H, 4)
    grouped = quantize_obq(w, H, 4, group_size=8)
    assert on_grid(grouped)
    assert layer_error(w, grouped.weight, H) < 0.5 * layer_error(w, per_row.weight, H)
    rtn, _ = rtn_quantize(w, 4, group_size=8)
    assert layer_error(w, grouped.weight, H) <= layer_error(w, rtn, H)


@pytest.mark.parametrize("prune", [dict(nm=(2, 4)), dict(sparsity=0.5)])
def test_compound_groups(prune):
    w, H = make_problem(8, 32, 46)
    pr = compress_weight(w, H, **prune)
    res = compress_weight(w, H, bits=4, group_size=8, **prune)
    zeros = pr.weight == 0
    assert np.all(res.weight[zeros] == 0), "pruned weights must stay exactly zero"
    assert on_grid(res) and res.grid.group_size == 8 and res.grid.scale.shape == (8, 4)
    g = fit_grid(pr.weight, 4, mask=~zeros, group_size=8)
    np.testing.assert_array_equal(res.grid.scale, g.scale)  # grid fitted on the survivors, per group
    if "nm" in prune:
        assert np.all((res.weight.reshape(8, -1, 4) != 0).sum(axis=2) <= 2)


def test_compress_groups_with_group_size():
    from onnxobc.engine import compress_groups

    ws, Hs = zip(*[make_problem(3, 18, seed=s) for s in range(3)])
    for kw in (dict(bits=4), dict(bits=4, sparsity=0.5)):
        parts = compress_groups(list(ws), list(Hs), group_size=6, **kw)
        for w_, H_, p in zip(ws, Hs, parts):
            assert on_grid(p) and p.grid.scale.shape == (3, 3)
        one = compress_weight(ws[1], Hs[1], group_size=6, bits=4)
        if "sparsity" not in kw:
            np.testing.assert_array_equal(parts[1].weight, one.weight)
