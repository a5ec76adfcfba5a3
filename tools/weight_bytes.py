"""Stored weight bytes of the compressed MatMul/Gemm/Conv weights of a model, as a fraction of their fp32 bytes
in the reference model, counted from the files (any writer: onnxobc, NNCF, ORT): every initializer of the
candidate that is not an unchanged initializer of the reference counts (codes, scales, zero points; 4-bit
tensors count n/2 bytes), against the fp32 bytes of the reference's weights that are no longer there unchanged.

    python tools/weight_bytes.py reference.onnx a.onnx b.onnx ...
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
        TensorProto.FLOAT16: 16, TensorProto.FLOAT: 32, TensorProto.INT32: 32, TensorProto.INT64: 64}


def _inits(path: str) -> dict[str, tuple[int, int, bytes]]:
    m = onnx.load(path)
    out = {}
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        out[t.name] = (t.data_type, n, t.raw_data[:64] if t.raw_data else b"")
    return out


def fraction(ref: str, cand: str) -> tuple[float, int, int]:
    r, c = _inits(ref), _inits(cand)
    changed_ref = [k for k, v in r.items() if k not in c or c[k][:2] != v[:2] or c[k][2] != v[2]]
    new = [k for k, v in c.items() if k not in r or r[k][:2] != v[:2] or r[k][2] != v[2]]
    dense = sum(r[k][1] * 4 for k in changed_ref if r[k][1] > 1)
    stored = sum((c[k][1] * BITS.get(c[k][0], 32) + 7) // 8 for k in new)
    return (stored / dense if dense else float("nan")), stored, dense


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("candidates", nargs="+")
    args = ap.parse_args(argv)
    for p in args.candidates:
        f, s, d = fraction(args.reference, p)
        print(f"{p}: {s / 1e6:.3f} MB stored for {d / 1e6:.3f} MB fp32 weights replaced: fraction {f:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
