import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
ROOT = TESTS.parent


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped cleanly when CuPy or a CUDA device is missing."""
    try:
        import cupy

        has_gpu = bool(cupy.cuda.is_available())
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def root() -> Path:
    return ROOT


def make_decoder_tool():
    """tools/make_decoder.py as a module (the synthetic decoder of issue 12)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_decoder", ROOT / "tools" / "make_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_decoder", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def decoder(tmp_path):
    """(model path, calib .npz, test .npz) of a 1-block decoder, hidden 64, stored with external data."""
    import numpy as np

    tool = make_decoder_tool()
    d = tmp_path / "dec"
    tool.build(hidden=64, ffn=128, blocks=1, vocab=96, head_dim=16, max_seq=32, rank=4, seed=0, out=d)
    np.savez(d / "calib.npz", input_ids=tool.tokens(8, 16, 96, 1))
    np.savez(d / "test.npz", input_ids=tool.tokens(4, 16, 96, 2))
    return d / "decoder.onnx", d / "calib.npz", d / "test.npz"
