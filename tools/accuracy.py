#!/usr/bin/env python
"""Top-1 accuracy of one or more classifier models on a labelled .npz (ONNX Runtime, CPU).

    python tools/accuracy.py models/fmnist_cnn.onnx out.onnx --data models/fmnist_test.npz --labels label
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import onnxruntime as ort


def accuracy(model: str, data: dict[str, np.ndarray], labels: np.ndarray, batch: int = 500) -> float:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    correct = 0
    for s in range(0, len(labels), batch):
        out = sess.run(None, {n: data[n][s:s + batch] for n in names})[0]
        correct += int(np.sum(out.argmax(axis=-1) == labels[s:s + batch]))
    return correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help=".onnx classifier(s) whose first output holds class scores")
    p.add_argument("--data", default="models/fmnist_test.npz", help="labelled .npz (default: %(default)s)")
    p.add_argument("--labels", default="label", help="key of the label array (default: %(default)s)")
    args = p.parse_args(argv)
    z = np.load(args.data)
    if args.labels not in z.files:
        print(f"error: {args.data} has no array '{args.labels}' (has: {', '.join(z.files)})", file=sys.stderr)
        return 2
    data = {k: z[k] for k in z.files}
    labels = data[args.labels]
    for m in args.models:
        print(f"{accuracy(m, data, labels):.4f}  {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
