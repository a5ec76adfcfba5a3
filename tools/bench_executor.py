#!/usr/bin/env python
"""The same compression with the local executor and on a local Ray cluster (issue 12): wall time and whether the
output is the same.

For each case, in one process: compress with ``executor='local'``, then with ``executor='ray'`` on a local Ray
cluster of ``--workers`` CPUs started once beforehand (its start-up and shut-down are timed apart: a CLI run
without ``--ray-address`` pays them on top). Per run: the wall time of ``compress``, its 'compression' seconds
(the solves plus writing the model; calibration is the same on both sides and excluded) and the sum of the
per-layer solve seconds. "identical" compares the serialized output models byte for byte, and the reports with
timings and the executor option left out. Prints a Markdown table.

Examples:
  python tools/bench_executor.py --cases shipped,minilm-gptq --models-dir /work/cache/models
  python tools/bench_executor.py --cases minilm-auto --workers 2 --repeat 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxobc import CompressConfig, compress  # noqa: E402

# name: (model file, calibration file, samples, options); 'models/' is the repository's, others --models-dir
CASES = {
    "shipped": ("models/fmnist_cnn.onnx", "models/fmnist_calib.npz", 256, dict(method="exact", sparsity=0.5, bits=4)),
    "shipped-auto": ("models/fmnist_cnn.onnx", "models/fmnist_calib.npz", 256, dict(method="auto", bits=4)),
    "minilm-gptq": ("minilm.onnx", "minilm_calib.npz", 128, dict(method="gptq", bits=4)),
    "minilm-auto": ("minilm.onnx", "minilm_calib.npz", 128, dict(method="auto", bits=4)),
    "minilm-exact": ("minilm.onnx", "minilm_calib.npz", 128, dict(method="exact", bits=4)),
}


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in ("seconds", "executor", "ray_address")}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _path(name: str, models_dir: Path) -> str:
    return str(ROOT / name) if name.startswith("models/") else str(models_dir / name)


def _run(model: str, calib: str, samples: int, opts: dict, executor: str) -> dict:
    cfg = CompressConfig(**opts, samples=samples, executor=executor)
    t = time.perf_counter()
    res = compress(model, None, calib, cfg)
    wall = time.perf_counter() - t
    return dict(wall=wall, compression=res.seconds["compression"], solves=sum(l.seconds for l in res.layers),
                calibration=res.seconds["calibration"], layers=len(res.layers),
                bytes=res.extra["model"].SerializeToString(), report=_strip(res.to_dict()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="shipped,minilm-gptq", help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--models-dir", default=os.environ.get("ONNXOBC_MODELS", str(ROOT / ".cache" / "models")))
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per executor; the fastest is reported")
    args = ap.parse_args()
    import ray

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    t = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t_start = time.perf_counter() - t
    rows = []
    try:
        for name in cases:
            model, calib, samples, opts = CASES[name]
            model, calib = _path(model, Path(args.models_dir)), _path(calib, Path(args.models_dir))
            runs = {}
            for ex in ("local", "ray"):
                rs = [_run(model, calib, samples, opts, ex) for _ in range(args.repeat)]
                runs[ex] = min(rs, key=lambda r: r["wall"])
                runs[ex]["same_each_time"] = all(r["bytes"] == rs[0]["bytes"] for r in rs)
                print(f"{name} {ex}: wall {runs[ex]['wall']:.1f} s, compression {runs[ex]['compression']:.1f} s",
                      file=sys.stderr)
            lo, ra = runs["local"], runs["ray"]
            label = ", ".join(f"{k}={v}" for k, v in opts.items())
            rows.append([name, label, str(lo["layers"]), f"{lo['calibration']:.1f}",
                         f"{lo['wall']:.1f}", f"{lo['compression']:.1f}", f"{lo['solves']:.1f}",
                         f"{ra['wall']:.1f}", f"{ra['compression']:.1f}", f"{ra['solves']:.1f}",
                         f"{ra['compression'] / lo['compression']:.2f}",
                         "yes" if lo["bytes"] == ra["bytes"] else "NO",
                         "yes" if lo["report"] == ra["report"] else "NO"])
    finally:
        t = time.perf_counter()
        ray.shutdown()
        t_stop = time.perf_counter() - t
    head = ["case", "options", "layers", "calib s", "local wall s", "local compression s", "local sum of solves s",
            "ray wall s", "ray compression s", "ray sum of solves s", "ray / local (compression)",
            "identical output", "identical report"]
    print(f"Ray {ray.__version__}, local cluster of {args.workers} CPUs: start {t_start:.1f} s, shut-down "
          f"{t_stop:.1f} s (paid on top by a run without --ray-address); {os.cpu_count()} CPUs on this machine\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if all(r[-2] == "yes" and r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
