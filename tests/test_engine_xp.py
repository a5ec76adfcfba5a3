"""The key engine checks on every array module: NumPy always, CuPy when a CUDA device is usable.

The CuPy cases carry the ``gpu`` marker and skip cleanly when CuPy is missing or sees no device. Inputs are
moved to the module under test; results must come back in that module and agree with the NumPy naive
references of test_engine.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import onnxobc.engine._greedy as G
from onnxobc.backend import to_numpy
from onnxobc.engine import compress_weight, prepare_hessian, prune_blocks, prune_nm, prune_unstructured, quantize_obq
from onnxobc.engine.grid import fit_grid, quantize
from onnxobc.errors import NumericalError

from onnxobc.engine.reference import damped, global_states, naive_blocks, naive_obq, naive_obs

try:  # run from the repository root (python -m pytest) or with tests/ on sys.path
    from tests.test_engine import make_problem
except ImportError:  # pragma: no cover
    from test_engine import make_problem


def _cupy_or_skip():
    try:
        import cupy  # noqa: PLC0415
    except ImportError:
        pytest.skip("CuPy is not installed")
    try:
        ok = bool(cupy.cuda.is_available())
    except Exception:  # pragma: no cover - driver problems
        ok = False
    if not ok:
        pytest.skip("CuPy sees no CUDA device")
    return cupy


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    return np if request.param == "numpy" else _cupy_or_skip()


@pytest.fixture
def small_buffers(monkeypatch):
    monkeypatch.setattr(G, "NBUF", 4)
    monkeypatch.setattr(G, "MAX_ROWS", {"cpu": 3, "gpu": 3})


def _same_module(xp, a):
    assert type(a).__module__.split(".")[0] == xp.__name__.split(".")[0]


def test_prepare_and_escalation(xp):
    w, H = make_problem(3, 8, 0, dead=(2,))
    Hinv, w2, dead, lam = prepare_hessian(xp.asarray(H), xp.asarray(w))
    _same_module(xp, Hinv)
    Hd, _ = damped(H, w)
    np.testing.assert_allclose(to_numpy(Hinv) @ Hd, np.eye(8), atol=1e-9)
    assert to_numpy(dead).tolist() == [j == 2 for j in range(8)] and lam == 0.01
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    Hi = Q @ np.diag([2.0, 1.0, -0.05]) @ Q.T
    assert prepare_hessian(xp.asarray(Hi), xp.ones((1, 3), dtype=xp.float32))[3] == pytest.approx(0.1)
    with pytest.raises(NumericalError, match="fc3"):
        prepare_hessian(xp.asarray(np.diag([10.0, 10.0, -9.0])), xp.ones((1, 3), dtype=xp.float32),
                        name="fc3", max_tries=3)


@pytest.mark.parametrize("sparsity", [0.4, 0.7])
def test_unstructured(xp, small_buffers, sparsity):
    w, H = make_problem(5, 12, 2, dead=(3,))
    res = prune_unstructured(xp.asarray(w), xp.asarray(H), sparsity, dtype="float64")
    _same_module(xp, res.weight)
    Hd, wd = damped(H, w)
    W_ref, loss_ref = global_states([naive_obs(Hd, wd[r]) for r in range(5)], round(sparsity * w.size))
    np.testing.assert_allclose(to_numpy(res.weight), W_ref, rtol=1e-5, atol=1e-6)
    assert res.loss == pytest.approx(loss_ref, rel=1e-6)


def test_nm(xp, small_buffers):
    w, H = make_problem(5, 12, 10)
    res = prune_nm(xp.asarray(w), xp.asarray(H), 2, 4, dtype="float64")
    Hd, wd = damped(H, w)

    def allowed(pruned, j):
        return pruned[(j // 4) * 4:(j // 4) * 4 + 4].sum() < 2

    for r in range(5):
        st = naive_obs(Hd, wd[r], allowed, steps=6)[2]
        np.testing.assert_allclose(to_numpy(res.weight[r]), st[-1], rtol=1e-5, atol=1e-6)


def test_blocks(xp, small_buffers):
    w, H = make_problem(4, 12, 12)
    res = prune_blocks(xp.asarray(w), xp.asarray(H), 2, 0.5, dtype="float64")
    Hd, wd = damped(H, w)
    W_ref, _ = global_states([naive_blocks(Hd, wd[r], 2) for r in range(4)], 12)
    np.testing.assert_allclose(to_numpy(res.weight), W_ref, rtol=1e-5, atol=1e-6)


def test_obq(xp, small_buffers):
    w, H = make_problem(5, 12, 13)
    w[1, 3] = 4.0
    mask = np.random.default_rng(3).random(w.shape) > 0.3
    for m in (None, mask):
        res = quantize_obq(xp.asarray(w), xp.asarray(H), 3, mask=None if m is None else xp.asarray(m),
                           dtype="float64")
        _same_module(xp, res.weight)
        W = to_numpy(res.weight)
        g = fit_grid(w, 3, mask=m)
        Hd, wd = damped(H, w)
        for r in range(5):
            ref = naive_obq(Hd, wd[r], float(g.scale[r]), float(g.zero_point[r]), g.maxq,
                            kept=None if m is None else m[r])[2]
            np.testing.assert_allclose(W[r], ref, rtol=1e-6, atol=1e-7)
        q = quantize(res.weight, res.grid.scale[:, None], res.grid.zero_point[:, None], res.grid.maxq)
        assert np.array_equal(to_numpy(q).view(np.uint32), W.view(np.uint32))


def test_compound_float32(xp):
    w, H = make_problem(8, 64, 17)
    res = compress_weight(xp.asarray(w), xp.asarray(H), nm=(2, 4), bits=4)
    W = to_numpy(res.weight)
    assert W.dtype == np.float32
    assert np.all((W.reshape(8, -1, 4) != 0).sum(axis=2) <= 2)
    q = to_numpy(quantize(res.weight, res.grid.scale[:, None], res.grid.zero_point[:, None], res.grid.maxq))
    assert np.array_equal(q.view(np.uint32), W.view(np.uint32))
    ref = compress_weight(w, H, nm=(2, 4), bits=4)  # NumPy result: same decisions up to float32 rounding
    assert res.loss == pytest.approx(ref.loss, rel=1e-3)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_group_grid(xp, method):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((6, 70)) * rng.uniform(0.1, 3.0, 70)).astype(np.float32)
    mask = rng.random(w.shape) > 0.4
    for m in (None, mask):
        g = fit_grid(xp.asarray(w), 4, method=method, mask=None if m is None else xp.asarray(m), group_size=16)
        _same_module(xp, g.scale)
        ref = fit_grid(w, 4, method=method, mask=m, group_size=16)
        np.testing.assert_allclose(to_numpy(g.scale), ref.scale, rtol=1e-6)
        np.testing.assert_array_equal(to_numpy(g.zero_point), ref.zero_point)
        assert tuple(g.expand(70)[0].shape) == (6, 70)


def test_obq_groups(xp, small_buffers):
    w, H = make_problem(5, 16, 42, dead=(7,))
    w[1, 3] = 4.0
    mask = np.random.default_rng(3).random(w.shape) > 0.3
    for m in (None, mask):
        res = quantize_obq(xp.asarray(w), xp.asarray(H), 3, mask=None if m is None else xp.asarray(m),
                           dtype="float64", group_size=6)
        _same_module(xp, res.weight)
        W = to_numpy(res.weight)
        g = fit_grid(w, 3, mask=m, group_size=6)
        scale, zero = g.expand(16)
        Hd, wd = damped(H, w)
        for r in range(5):
            ref = naive_obq(Hd, wd[r], scale[r], zero[r], g.maxq, kept=None if m is None else m[r])[2]
            np.testing.assert_allclose(W[r], ref, rtol=1e-5, atol=1e-6)
        s, z = res.grid.expand(16)
        q = quantize(res.weight, s, z, res.grid.maxq)
        assert np.array_equal(to_numpy(q).view(np.uint32), W.view(np.uint32))
