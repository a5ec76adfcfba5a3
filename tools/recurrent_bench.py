"""Exact vs fast vs baseline compression of the recurrent layers of the models built by
tools/recurrent_model.py (issue 13): runs ``onnxobc compress`` (only the LSTM / GRU layers: --include) and
``onnxobc eval`` for each setting and prints a table (output rel L2 and cosine vs the dense model, accuracy where
the model classifies, mean layer error of W and R, file size).

    python tools/recurrent_bench.py DIR [--out OUTDIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = [
    ("50% exact", ["--sparsity", "0.5"]),
    ("50% sparsegpt", ["--sparsity", "0.5", "--method", "sparsegpt"]),
    ("50% magnitude", ["--sparsity", "0.5", "--method", "magnitude"]),
    ("4-bit exact (OBQ)", ["--bits", "4"]),
    ("4-bit gptq", ["--bits", "4", "--method", "gptq"]),
    ("4-bit rtn", ["--bits", "4", "--method", "rtn"]),
    ("4-bit exact, QDQ", ["--bits", "4", "--format", "qdq", "--opset", "21"]),
]


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--out", default="/tmp/recurrent_bench")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    py = [sys.executable, "-m", "onnxobc"]
    calib, test = os.path.join(args.dir, "calib.npz"), os.path.join(args.dir, "test.npz")
    rows = []
    for model, extra in (("lstm_cls", ["--labels", "labels"]), ("gru_enc", [])):
        src = os.path.join(args.dir, f"{model}.onnx")
        for label, opts in SETTINGS:
            tag = label.replace(" ", "_").replace("%", "").replace(",", "").replace("(", "").replace(")", "")
            out = os.path.join(args.out, f"{model}_{tag}.onnx")
            rep, ev = out + ".report.json", out + ".eval.json"
            run(py + ["compress", src, "-o", out, "--calib", calib, "--include", "LSTM|GRU", "--report", rep,
                      "-q", "--force"] + opts)
            run(py + ["eval", src, out, "--data", test, "--json", ev, "-q", "--force"] + extra)
            with open(rep) as f:
                layers = json.load(f)["layers"]
            with open(ev) as f:
                e = json.load(f)
            o = e["outputs"][0] if isinstance(e.get("outputs"), list) else next(iter(e["outputs"].values()))
            errs = {l["name"].rsplit("/", 1)[-1]: l["error"] for l in layers}
            w = [v for k, v in errs.items() if k == "W"]
            r = [v for k, v in errs.items() if k == "R"]
            rows.append([model, label, f"{sum(w) / len(w):.4f}", f"{sum(r) / len(r):.4f}", f"{o['rel_l2']:.4f}",
                         f"{o['cosine']:.5f}" if o.get("cosine") is not None else "-",
                         f"{o['acc_cand']:.3f}" if o.get("acc_cand") is not None else "-",
                         f"{os.path.getsize(out) / 1024:.0f} kB"])
    head = ["model", "setting", "W err", "R err", "out rel L2", "cosine", "acc", "size"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
