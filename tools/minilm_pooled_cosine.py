"""MiniLM: cosine of dense vs compressed outputs on real tokens, on padded positions, and of the mean-pooled
sentence embedding (mean of last_hidden_state over attention_mask), on the first N test sentences; and the
relative L2 error ||c - r|| / ||r|| of last_hidden_state over the real tokens and over every position.

    python tools/minilm_pooled_cosine.py --models-dir /work/cache/models a.onnx b.onnx ... [--samples 64]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidates", nargs="+", type=Path)
    ap.add_argument("--models-dir", type=Path, default=Path(".cache/models"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--no-opt", action="store_true", help="ONNX Runtime graph optimizations off (NNCF's "
                    "group-wise uint4 models fail the DQ+MatMul -> MatMulNBits fusion of the higher levels)")
    args = ap.parse_args(argv)
    data = np.load(args.models_dir / "minilm_test.npz")
    feed = {k: data[k][: args.samples] for k in INPUTS if k in data.files}

    def run(path: Path) -> np.ndarray:
        so = ort.SessionOptions()
        if args.no_opt:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(b, np.float64) - a) / np.linalg.norm(np.asarray(a, np.float64)))

    def cos(a, b):
        return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    ref = run(args.models_dir / "minilm.onnx")
    m = feed["attention_mask"].astype(bool)
    pool = lambda x: (x * m[..., None]).sum(1) / m.sum(1, keepdims=True)  # noqa: E731
    for p in args.candidates:
        c = run(p)
        emb = cos(pool(ref), pool(c))
        pad = cos(ref[~m], c[~m]) if (~m).any() else np.array([np.nan])
        print(f"{p.name}: real-token cos {cos(ref[m], c[m]).mean():.4f}  padded-token cos {pad.mean():.4f}  "
              f"pooled-embedding cos {emb.mean():.4f} (min {emb.min():.4f})  "
              f"rel L2 real tokens {rel(ref[m], c[m]):.4f}  rel L2 all {rel(ref, c):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
