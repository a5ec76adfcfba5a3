"""Golden test: the same options give the same compressed model as recorded (tests/golden_cases.py says what
and how; tools/record_golden.py records). Compared: ONNX Runtime's outputs of the compressed model on fixed
inputs, the op types of the written graph, the bytes of its initializers, the per-layer report (method,
sparsity, bits, how it was written, notes, layer error) and, for refused options, the error message."""
import json

import numpy as np
import pytest

import golden_cases as gc

_GOLD = np.load(gc.GOLDEN) if gc.GOLDEN.exists() else None
CASES = gc.cases()


@pytest.mark.parametrize("cid,key,opts", CASES, ids=[c[0] for c in CASES])
def test_golden(cid, key, opts):
    assert _GOLD is not None, f"{gc.GOLDEN} is missing: run tools/record_golden.py on the reference code"
    want = {k.split("|", 1)[1]: _GOLD[k] for k in _GOLD.files if k.split("|", 1)[0] == cid}
    assert want, f"no golden record for {cid}: record it with tools/record_golden.py"
    got = gc.run_case(key, opts)
    assert set(got) == set(want), (sorted(got), sorted(want))
    if "error" in want:
        assert str(got["error"]) == str(want["error"])
        return
    assert json.loads(str(got["ops"])) == json.loads(str(want["ops"]))
    assert json.loads(str(got["layers"])) == json.loads(str(want["layers"]))
    assert int(got["init_bytes"]) == int(want["init_bytes"])
    np.testing.assert_allclose(got["errors"], want["errors"], rtol=1e-6, atol=1e-12, equal_nan=True)
    for k in want:
        if k.startswith("out"):
            ref = want[k]
            scale = float(np.max(np.abs(ref))) if ref.size and ref.dtype.kind == "f" else 1.0
            np.testing.assert_allclose(got[k], ref, rtol=1e-6, atol=1e-6 * scale, err_msg=f"{cid} {k}")
