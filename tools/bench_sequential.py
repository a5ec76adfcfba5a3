#!/usr/bin/env python
"""Sequential calibration and bounded memory (issue 12): one pass vs stages vs --sequential.

For each model and configuration, compresses in a fresh subprocess per mode (so that ``ru_maxrss`` is that run's
peak resident set size) and records calibration / total seconds, peak RSS, the calibration stages and the most
bytes of Hessians held at once (``CompressResult.memory``), then measures the output's quality as
tools/bench_quality.py does (fmnist test accuracy, EfficientNet top-1 agreement with dense, MiniLM mean-pooled
embedding cosine). Modes:

  onepass     the default (all Hessians in one pass: they fit half the available memory)
  staged      --stage-memory MB (bounded memory: stages packed by the budget, each pass runs the graph only up to
              its layers' inputs); its weights must be byte-identical to onepass (checked: a hash of all
              initializers)
  noprune     staged, but every pass runs the whole graph (onnxobc.stages.pruned_copy replaced by a full copy): what pruning saves
  sequential  --sequential (stages by depth, each on the model whose earlier stages are compressed)

Example:
  python tools/bench_sequential.py --models fmnist --out seq.md
  python tools/bench_sequential.py --models minilm,effnet --effnet-samples 32 --out seq.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
CACHE = Path(os.environ.get("ONNXOBC_MODELS", "/work/cache/models"))
if not CACHE.exists():
    CACHE = ROOT / ".cache" / "models"

MODELS = {
    "fmnist": dict(model=ROOT / "models/fmnist_cnn.onnx", calib=ROOT / "models/fmnist_calib.npz",
                   test=ROOT / "models/fmnist_test.npz", metric="labels", label_key="label"),
    "minilm": dict(model=CACHE / "minilm.onnx", calib=CACHE / "minilm_calib.npz", test=CACHE / "minilm_test.npz",
                   metric="embed"),
    "effnet": dict(model=CACHE / "effnet_lite0.onnx", calib=CACHE / "effnet_calib.npz",
                   test=CACHE / "effnet_test.npz", metric="agree"),
}
# per model: config key -> CompressConfig options (float export: the weights, not the storage, are compared)
CONFIGS = {
    "fmnist": {"obs50": dict(method="exact", sparsity=0.5), "obq4": dict(method="exact", bits=4),
               "obq3": dict(method="exact", bits=3)},
    "minilm": {"gptq4": dict(method="gptq", bits=4), "sparsegpt50": dict(method="sparsegpt", sparsity=0.5)},
    "effnet": {"gptq4": dict(method="gptq", bits=4), "obq4": dict(method="exact", bits=4)},
}
# --stage-memory (MB) of the staged modes: well under each model's total Hessian bytes
STAGE_MB = {"fmnist": 0.5, "minilm": 24, "effnet": 8}
MODES = ("onepass", "staged", "noprune", "sequential")


def _child(spec: dict) -> None:
    """One compression in this process; prints one JSON line."""
    import resource

    import numpy as np
    import onnx

    from onnxobc import CompressConfig, compress

    if spec["mode"] == "noprune":
        import copy

        import onnxobc.stages as st

        st.pruned_copy = lambda model, fetch: copy.deepcopy(model)
    opts = dict(spec["opts"])
    if spec["mode"] in ("staged", "noprune"):
        opts["stage_memory"] = spec["stage_mb"]
    if spec["mode"] == "sequential":
        opts["sequential"] = True
    m = MODELS[spec["model"]]
    t = time.perf_counter()
    res = compress(str(m["model"]), spec["out"], str(m["calib"]),
                   CompressConfig(samples=spec["samples"], **opts), force=True)
    wall = time.perf_counter() - t
    h = hashlib.sha256()
    for init in res.extra["model"].graph.initializer:
        h.update(init.name.encode())
        h.update(np.ascontiguousarray(onnx.numpy_helper.to_array(init)).tobytes())
    print(json.dumps(dict(wall=wall, calibration=res.seconds["calibration"], compression=res.seconds["compression"],
                          maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                          memory=res.memory, samples=res.samples, weights_sha=h.hexdigest()[:16],
                          layer_error=float(np.nansum([l.error or 0.0 for l in res.layers])))))


def run_one(model: str, key: str, mode: str, args, outdir: Path) -> dict:
    out = outdir / f"{model}_{key}_{mode}.onnx"
    spec = dict(model=model, opts=CONFIGS[model][key], mode=mode, stage_mb=STAGE_MB[model],
                samples=args.effnet_samples if model == "effnet" else args.samples, out=str(out))
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if p.returncode != 0:
        raise RuntimeError(f"{model} {key} {mode} failed:\n{p.stderr[-3000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["out"] = str(out)
    return rec


def quality(model: str, path: Path, args, cache: dict) -> dict:
    import bench_quality as bq

    a = argparse.Namespace(test_samples=args.test_samples, threads=args.threads)
    return bq.measure(model, MODELS[model], path, a, cache)


def _q(model: str, q: dict) -> str:
    if model == "fmnist":
        return f"acc {q['acc']:.4f}"
    if model == "minilm":
        return f"cos {q['emb_cosine']:.4f}"
    return f"top-1 {q['top1_agree']:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="fmnist")
    ap.add_argument("--configs", default=None, help="comma-separated config keys (default: all of the model's)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: all)")
    ap.add_argument("--effnet-samples", type=int, default=64)
    ap.add_argument("--test-samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / ".cache" / "bench" / "sequential.json"))
    ap.add_argument("--out", help="Markdown table file")
    args = ap.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    store = Path(args.json)
    store.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text()) if store.exists() else {}
    outdir = Path(tempfile.mkdtemp(prefix="bench_seq_"))
    lines = ["| model | config | mode | stages | passes | Hessians held (MB, max / all) | calibration s | total s "
             "| peak RSS MB | quality | weights = onepass |", "|" + "---|" * 11]
    for model in args.models.split(","):
        cache: dict = {}
        keys = args.configs.split(",") if args.configs else list(CONFIGS[model])
        for key in keys:
            for mode in args.modes.split(","):
                rid = f"{model}/{key}/{mode}"
                if rid not in results:
                    print(f"running {rid}", flush=True)
                    rec = run_one(model, key, mode, args, outdir)
                    if mode in ("onepass", "sequential"):
                        rec["quality"] = quality(model, Path(rec["out"]), args, cache)
                    results[rid] = rec
                    store.write_text(json.dumps(results, indent=1))
                r = results[rid]
                base = results.get(f"{model}/{key}/onepass")
                mem = r["memory"]
                same = "-" if mode == "onepass" or base is None else (
                    "yes" if r["weights_sha"] == base["weights_sha"] else "no")
                q = _q(model, r["quality"]) if "quality" in r else ("= onepass" if same == "yes" else "-")
                lines.append(f"| {model} | {key} | {mode} | {mem['stages']} | {mem['passes']} | "
                             f"{mem['hessian_bytes_held_peak'] / 2**20:.1f} / {mem['hessian_bytes_total'] / 2**20:.1f} | "
                             f"{r['calibration']:.1f} | {r['wall']:.1f} | {r['maxrss_mb']:.0f} | {q} | {same} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
