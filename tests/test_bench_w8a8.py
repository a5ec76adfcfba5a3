"""tools/bench_w8a8.py: config names with suffixes, and calibration feeds cut along each input's batch axis (the
ORT and NNCF readers of a VAD whose recurrent state has no batch axis)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_w8a8", ROOT / "tools" / "bench_w8a8.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_suffixes(bench):
    assert bench._onnxobc_flags("w8") == ["--bits", "8", "--method", "rtn"]
    f = bench._onnxobc_flags("a8_search_bc_auto_noise")
    assert f[f.index("--method") + 1] == "auto" and f[-1] == "--act-noise"
    assert "--act-bias-correction" in f and f[f.index("--act-calib") + 1] == "search"
    assert bench._onnxobc_flags("a8_minmax_noise")[-1] == "--act-noise"
    assert bench._onnxobc_flags("nncf") is None and bench._onnxobc_flags("a8_nothing_auto") is None


def test_feeds_cut_each_input_along_its_own_axis(bench, tmp_path):
    p = tmp_path / "c.npz"
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    state = np.ones((2, 10, 4), np.float32)
    h = np.zeros((1, 1, 5), np.float32)
    np.savez(p, input=x, state=state, h=h)
    feeds = bench._feeds(str(p), ["input", "state", "h"], 4, {"state": 1, "h": None})
    assert [f["input"].shape[0] for f in feeds] == [4, 4, 2]
    assert [f["state"].shape for f in feeds] == [(2, 4, 4), (2, 4, 4), (2, 2, 4)]
    assert all(f["h"].shape == (1, 1, 5) for f in feeds)  # passed whole with every batch
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), x)
