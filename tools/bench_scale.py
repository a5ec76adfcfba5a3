"""Scaling benchmark (issue 12): `onnxobc compress` on a synthetic decoder with external data, and a projection.

    python tools/make_decoder.py --hidden 2048 --ffn 8192 --blocks 8 --out /tmp/dec2g --calib
    python tools/bench_scale.py /tmp/dec2g --json /tmp/dec2g/bench.json          # table + 7B projection
    python tools/bench_scale.py /tmp/dec2g --args "--method auto --bits 4 --group-size 128 --executor ray"
    python tools/bench_scale.py /tmp/dec2g --from-json /tmp/dec2g/bench.json --target 8,2048,8192,8000   # re-project

DIR is a folder written by tools/make_decoder.py (decoder.onnx, decoder.onnx.data, calib.npz, decoder.json).
One `python -m onnxobc compress` subprocess (default arguments: --method auto --bits 4 --group-size 128; change
them with --args) is measured:

* wall: the subprocess's wall time, interpreter start and model loading included;
* calibration / solve+export: the report's ``seconds`` (calibration: ONNX Runtime + Hessians; compression: the
  layer solves, export and the rest, verify included when asked);
* peak RSS: ``ru_maxrss`` of that subprocess (os.wait4), printed next to the model's size on disk (.onnx + data);
* per layer kind: the report's per-layer solve seconds grouped by (op, rows x C, solver), with the effective
  GFLOP/s of the GPTQ cost model below against this machine's sgemm rate (numpy float32, measured here).

Projection to a 7B decoder (--target, default LLaMA-7B-like: 32 blocks, hidden 4096, FFN 11008, vocab 32000):

* solve, this CPU: every GPTQ layer costs ``a C^3 + b rows C^2`` seconds (Hessian factorisation ~C^3; the
  column loop and the lazy block updates ~rows C^2). a and b are fitted by least squares (relative residuals)
  on the measured per-kind times, which come in two widths C = hidden and C = FFN (q/k/v/o and gate/up read
  hidden-wide inputs, down reads FFN-wide ones) and several row counts, then summed over the target's layers;
  the embedding lookup (RTN) scales with its parameter count;
* calibration, this CPU: scaled by the flop ratio (forward 2 x params x tokens + Grams 2 x tokens x C^2 per
  layer) at the same calibration set (--calib tokens as measured);
* one GPU (default H200): the solve time divided by (GPU sgemm rate / this CPU's measured sgemm rate), with
  --gpu-tflops as the GPU's float32 GEMM rate (default 50: an estimate for an H100/H200 without TF32; no GPU
  was used here), but at least --gpu-column-us per weight column (the column loop is a chain of small
  kernels: latency, not flops, bounds it); calibration stays as on this CPU (ONNX Runtime's CPU provider and
  NumPy Grams);
* a Ray cluster of N GPUs: the layer solves spread over N GPUs (largest first; the makespan of that greedy
  schedule), calibration not parallel.
Memory: the float64 Hessians of all layers at once (the pipeline today) vs of one block (stage-wise).

Timings are taken on a shared machine (other processes compete for the cores): noisy, see the sgemm rate
printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARGS = "--method auto --bits 4 --group-size 128"


def sgemm_gflops(n: int = 2048, reps: int = 3) -> float:
    """GFLOP/s of a float32 n x n x n product (best of ``reps``): tools/bench_calibration.py's yardstick."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_calibration import sgemm_rate

    return sgemm_rate(n, n, reps)


def run_compress(model: Path, calib: Path, out: Path, report: Path, args: str) -> dict:
    cmd = [sys.executable, "-m", "onnxobc", "compress", str(model), "--calib", str(calib), "-o", str(out),
           "--report", str(report), "--force", "-q", *shlex.split(args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env)
    # (seconds since start, RSS bytes, anonymous RSS bytes), sampled every 0.5 s. RSS also counts the pages of
    # files mapped in (weights read in place from their external data file: the kernel may drop them under
    # pressure); the anonymous part is the memory the run really holds
    timeline: list[tuple[float, int, int]] = []

    def sample():
        f = Path(f"/proc/{p.pid}/status")
        while p.returncode is None:
            try:
                st = {x.split(":")[0]: int(x.split()[1]) * 1024 for x in f.read_text().splitlines()
                      if x.startswith(("VmRSS:", "RssAnon:"))}
                timeline.append((time.perf_counter() - t, st["VmRSS"], st["RssAnon"]))
            except (OSError, KeyError, IndexError, ValueError):
                break
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"compress failed (exit {p.returncode})")
    th.join(timeout=2)
    return dict(cmd=cmd, wall=wall, peak_rss=usage.ru_maxrss * 1024, user=usage.ru_utime, sys=usage.ru_stime,
                peak_anon=max((x[2] for x in timeline), default=None),
                rss_timeline=timeline[::max(1, len(timeline) // 400)])


def rss_phases(run: dict, secs: dict) -> str:
    """The sampled RSS peak in each phase of the run, placed from the report's seconds: the first (wall - total)
    seconds are the interpreter's start; then load + plan, calibration, compression (solves, export, verify),
    save + report. How the rest (total - calibration - compression) splits into load + plan and save is not
    reported: half on each side (approximate boundaries)."""
    tl = run.get("rss_timeline") or []
    if not tl:
        return "no RSS timeline"
    start = run["wall"] - secs["total"]  # interpreter start and imports
    rest = secs["total"] - secs["calibration"] - secs["compression"]  # load + plan + save (split unknown)
    b1 = start + rest / 2
    b2 = b1 + secs["calibration"]
    b3 = b2 + secs["compression"]
    out = []
    for name, lo, hi in (("load+plan", 0, b1), ("calibration", b1, b2), ("solve+export", b2, b3), ("save", b3, 1e18)):
        vals = [x for x in tl if lo <= x[0] < hi]
        if vals:
            anon = [x[2] for x in vals if len(x) > 2]
            out.append(f"{name} {max(x[1] for x in vals) / 2 ** 30:.2f}"
                       + (f" (anonymous {max(anon) / 2 ** 30:.2f})" if anon else ""))
    return "sampled peak RSS (GiB) per phase, approximate boundaries: " + ", ".join(out)


def file_bytes(path: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from onnxobc.graph.model_io import model_file_bytes

    return model_file_bytes(path)


def _rows_cols(shape: str) -> tuple[int, int]:
    r, c = shape.split()[0].split("x")
    return int(r), int(c)


def layer_kinds(report: dict, blocks: int) -> list[dict]:
    """Per (op, shape, solver): count, mean and total seconds; 'role' from the layer names."""
    groups: dict = defaultdict(list)
    for l in report["layers"]:
        role = l["name"].split(".")[-1] if l["name"].startswith("layers.") else l["name"]
        both = "both ran" in (l.get("note") or "")  # auto ran exact and the fast mode: the time holds both
        groups[(l["op"], l["shape"], l["solver"], both)].append((role, l["seconds"], l["error"]))
    kinds = []
    for (op, shape, solver, both), items in groups.items():
        rows, cols = _rows_cols(shape)
        secs = [s for _, s, _ in items]
        kinds.append(dict(op=op, shape=shape, rows=rows, C=cols, solver=solver, both=both, roles=sorted({r for r, _, _ in items}),
                          count=len(items), mean_s=float(np.mean(secs)), total_s=float(np.sum(secs)),
                          mean_error=float(np.mean([e for _, _, e in items if e is not None] or [np.nan]))))
    return sorted(kinds, key=lambda k: -k["total_s"])


def fit_cost(kinds: list[dict]) -> tuple[float, float, float]:
    """(a, b, max relative residual) of seconds ~ a C^3 + b rows C^2 over the GPTQ-solved kinds, least squares
    on relative errors (every kind weighs the same whatever its size)."""
    pts = [k for k in kinds if k["op"] in ("MatMul", "Gemm") and k["solver"] in ("gptq", "sparsegpt")
           and not k["both"]]
    if len({k["C"] for k in pts}) < 2:
        raise SystemExit("the cost fit needs GPTQ layers of two input widths (C): run on a decoder with ffn != hidden")
    A = np.array([[k["C"] ** 3, k["rows"] * k["C"] ** 2] for k in pts], float)
    y = np.array([k["mean_s"] for k in pts], float)
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    coef = np.maximum(coef, 0.0)
    if not coef.any():
        raise SystemExit("the cost fit failed (no positive coefficient)")
    resid = float(np.max(np.abs(A @ coef - y) / y))
    return float(coef[0]), float(coef[1]), resid


def decoder_layers(hidden: int, ffn: int, blocks: int, vocab: int) -> list[tuple[str, int, int]]:
    """(role, rows, C) of every MatMul layer of a make_decoder model (rows = outputs, C = inputs)."""
    per = [("q_proj", hidden, hidden), ("k_proj", hidden, hidden), ("v_proj", hidden, hidden),
           ("o_proj", hidden, hidden), ("gate_proj", ffn, hidden), ("up_proj", ffn, hidden), ("down_proj", hidden, ffn)]
    return per * blocks + [("lm_head", vocab, hidden)]


def params(hidden: int, ffn: int, blocks: int, vocab: int) -> int:
    return blocks * (4 * hidden * hidden + 3 * hidden * ffn) + 2 * vocab * hidden


def cal_flops(hidden: int, ffn: int, blocks: int, vocab: int, tokens: int) -> float:
    fwd = 2.0 * params(hidden, ffn, blocks, vocab) * tokens
    grams = sum(2.0 * tokens * c * c for _, _, c in decoder_layers(hidden, ffn, blocks, vocab))
    return fwd + grams


def hessian_bytes(hidden: int, ffn: int, blocks: int, vocab: int, per_block: bool) -> float:
    layers = decoder_layers(hidden, ffn, 1 if per_block else blocks, vocab)
    if per_block:
        layers = layers[:-1]
    return sum(8.0 * c * c for _, _, c in layers)


def lpt_makespan(times: list[float], n: int) -> float:
    """Largest-first greedy schedule of ``times`` on ``n`` workers: the finishing time."""
    loads = [0.0] * n
    for t in sorted(times, reverse=True):
        i = int(np.argmin(loads))
        loads[i] += t
    return max(loads)


def gib(x: float) -> str:
    return f"{x / 2 ** 30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a folder written by tools/make_decoder.py --calib")
    ap.add_argument("--args", default=DEFAULT_ARGS, help=f"compress arguments (default: {DEFAULT_ARGS})")
    ap.add_argument("--json", help="write every number measured and projected here")
    ap.add_argument("--target", default="32,4096,11008,32000", help="blocks,hidden,ffn,vocab of the projection")
    ap.add_argument("--gpu-tflops", type=float, default=50.0, help="float32 GEMM TFLOP/s of one GPU (estimate)")
    ap.add_argument("--gpu-column-us", type=float, default=30.0,
                    help="GPU latency floor per weight column of a GPTQ solve (a few small kernels per column; "
                         "estimate): a layer takes at least C x this")
    ap.add_argument("--quiet-gflops", type=float, default=None,
                    help="also project this CPU at this sgemm GFLOP/s (e.g. its rate on a quiet machine)")
    ap.add_argument("--gpus", default="1,2,4,8", help="GPU counts of the Ray cluster projection")
    ap.add_argument("--from-json", help="project from an earlier run's --json instead of running compress")
    ap.add_argument("--keep", action="store_true", help="keep the compressed model (default: removed)")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    info = json.loads((d / "decoder.json").read_text())
    model, calib = d / "decoder.onnx", d / "calib.npz"
    out, report_path = d / "bench_out.onnx", d / "bench_report.json"
    ids = np.load(calib)["input_ids"]
    tokens = int(ids.size)
    if a.from_json:  # the measurement of an earlier run, projected again (e.g. to another --target)
        old = json.loads(Path(a.from_json).read_text())
        run, rate0, rate1, a.args = old["run"], *old["sgemm_gflops"], old["args"]
        rep = dict(seconds=old["seconds"], output_bytes=old["output_bytes"], layers=old["layers"])
        in_bytes = old["input_bytes"]
    else:
        rate0 = sgemm_gflops()
        run = run_compress(model, calib, out, report_path, a.args)
        rate1 = sgemm_gflops()
        rep = json.loads(report_path.read_text())
        in_bytes = file_bytes(model)
        if not a.keep:
            for f in (out, out.with_name(out.name + ".data")):
                f.unlink(missing_ok=True)
    cpu_rate = max(rate0, rate1)
    out_bytes = rep.get("output_bytes")
    layer_rows = [{k: l[k] for k in ("name", "op", "shape", "solver", "seconds", "error", "note")} for l in rep["layers"]]
    kinds = layer_kinds(rep, info["blocks"])
    secs = rep["seconds"]
    H, F, B, V = info["hidden"], info["ffn"], info["blocks"], info["vocab"]

    print()
    print(f"model: hidden {H}, FFN {F}, {B} blocks, vocab {V}: {info['params'] / 1e6:.0f} M parameters, "
          f"{gib(in_bytes)} on disk (external data); calibration {ids.shape[0]} x {ids.shape[1]} tokens")
    print(f"compress {a.args}: wall {run['wall']:.1f} s (calibration {secs['calibration']:.1f} s, solve + export "
          f"{secs['compression']:.1f} s, total in-process {secs['total']:.1f} s); CPU user {run['user']:.0f} s")
    anon = f" (sampled peak anonymous memory {gib(run['peak_anon'])})" if run.get("peak_anon") else ""
    print(f"peak RSS {gib(run['peak_rss'])}{anon} for a {gib(in_bytes)} model (output {gib(out_bytes or 0)}); "
          f"float64 Hessians of all layers {gib(hessian_bytes(H, F, B, V, False))}, of one block "
          f"{gib(hessian_bytes(H, F, B, V, True))}")
    print(rss_phases(run, secs))
    print(f"this CPU: {os.cpu_count()} cores, sgemm {rate0:.0f} / {rate1:.0f} GFLOP/s before / after (shared machine)")
    print()
    print("| layer kind | rows x C | solver | count | s / layer | s total | GFLOP/s (model) | mean error |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for k in kinds:
        fl = (k["C"] ** 3 + 2 * k["rows"] * k["C"] ** 2) if k["solver"] in ("gptq", "sparsegpt") and not k["both"] \
            else None
        gf = f"{fl / k['mean_s'] / 1e9:.1f}" if fl and k["mean_s"] > 0 else "-"
        solver = k["solver"] + (" (exact too)" if k["both"] else "")
        print(f"| {'/'.join(k['roles'])} | {k['shape']} | {solver} | {k['count']} | {k['mean_s']:.2f} | "
              f"{k['total_s']:.1f} | {gf} | {k['mean_error']:.4g} |")

    # ---- projection
    if not any(k["solver"] in ("gptq", "sparsegpt") and not k["both"] for k in kinds):
        print("\n(no layer solved by the fast mode alone: no cost fit, no projection)")
        if a.json:
            Path(a.json).write_text(json.dumps(dict(model=info, args=a.args, run=run, seconds=secs, input_bytes=in_bytes,
                                                    output_bytes=out_bytes, tokens=tokens, sgemm_gflops=[rate0, rate1],
                                                    kinds=kinds, layers=layer_rows), indent=1, default=str))
        return 0
    ca, cb, resid = fit_cost(kinds)
    tb, th, tf, tv = (int(x) for x in a.target.split(","))
    layers = decoder_layers(th, tf, tb, tv)
    solve_times = [ca * c ** 3 + cb * r * c * c for _, r, c in layers]
    emb = [k for k in kinds if k["op"] == "Gather"]
    emb_s = (emb[0]["mean_s"] * (tv * th) / (V * H)) if emb else 0.0
    solve_cpu = sum(solve_times) + emb_s
    measured_solve = sum(k["total_s"] for k in kinds)
    overhead = max(secs["compression"] - measured_solve, 0.0)  # export, save, report: ~ proportional to params
    scale_p = params(th, tf, tb, tv) / info["params"]
    cal_cpu = secs["calibration"] * cal_flops(th, tf, tb, tv, tokens) / cal_flops(H, F, B, V, tokens)
    over_cpu = overhead * scale_p
    gpu_ratio = a.gpu_tflops * 1e3 / cpu_rate
    solve_gpu = [max(t / gpu_ratio, c * a.gpu_column_us * 1e-6) for t, (_, _, c) in zip(solve_times, layers)]
    proj = dict(target=dict(blocks=tb, hidden=th, ffn=tf, vocab=tv, params=params(th, tf, tb, tv)),
                fit=dict(a=ca, b=cb, max_rel_residual=resid), cpu_sgemm_gflops=cpu_rate, gpu_tflops=a.gpu_tflops,
                gpu_over_cpu=gpu_ratio, calibration_s=cal_cpu, solve_cpu_s=solve_cpu, other_s=over_cpu,
                hessians_all=hessian_bytes(th, tf, tb, tv, False), hessians_block=hessian_bytes(th, tf, tb, tv, True),
                model_bytes=4.0 * params(th, tf, tb, tv), rows=[])
    print()
    print(f"cost fit (GPTQ layers of this run): seconds = {ca:.3g} C^3 + {cb:.3g} rows C^2 "
          f"(largest relative residual {resid:.0%}; C^3 term = {ca and 1 / ca / 1e9:.3g} G per s, rows C^2 term = "
          f"{cb and 1 / cb / 1e9:.3g} G per s)")
    print(f"projection to {tb} blocks, hidden {th}, FFN {tf}, vocab {tv} "
          f"({params(th, tf, tb, tv) / 1e9:.2f} B parameters, {gib(4.0 * params(th, tf, tb, tv))} fp32), "
          f"{ids.shape[0]} x {ids.shape[1]} calibration tokens:")
    print()
    print("| where | calibration | layer solves | export etc. | total | note |")
    print("|---|---:|---:|---:|---:|---|")

    def row(where: str, cal: float, solve: float, other: float, note: str):
        proj["rows"].append(dict(where=where, calibration_s=cal, solve_s=solve, other_s=other,
                                 total_s=cal + solve + other, note=note))
        print(f"| {where} | {cal / 60:.1f} min | {solve / 60:.1f} min | {other / 60:.1f} min | "
              f"{(cal + solve + other) / 60:.1f} min | {note} |")

    q = cpu_rate / a.quiet_gflops if a.quiet_gflops else 1.0  # this CPU quiet, when told its rate
    row("this CPU", cal_cpu, solve_cpu, over_cpu, f"fitted cost model, sgemm {cpu_rate:.0f} GFLOP/s as measured")
    if a.quiet_gflops:
        row("this CPU, quiet (estimate)", cal_cpu * q, solve_cpu * q, over_cpu * q,
            f"all times x {q:.2f}: sgemm {a.quiet_gflops:g} GFLOP/s instead of {cpu_rate:.0f}")
    cal_host, over_host = cal_cpu * q, over_cpu * q
    host = " (quiet)" if a.quiet_gflops else ""
    row("1 GPU (estimate)", cal_host, sum(solve_gpu) + emb_s, over_host,
        f"solves / {gpu_ratio:.0f} (GPU {a.gpu_tflops:g} TFLOP/s sgemm vs this CPU), at least "
        f"{a.gpu_column_us:g} us per column; calibration and export on this CPU{host}")
    for n in (int(x) for x in a.gpus.split(",")):
        if n > 1:
            row(f"Ray, {n} GPUs (estimate)", cal_host, lpt_makespan(solve_gpu, n) + emb_s, over_host,
                "solves largest-first over the GPUs; calibration not parallel")
    row("1 GPU, calibration on it too (estimate)", cal_cpu / gpu_ratio, sum(solve_gpu) + emb_s, over_host,
        "not implemented: ONNX Runtime's CUDA provider and CuPy Grams would be needed; flops / GPU rate")
    print()
    print(f"memory, projected model: fp32 weights {gib(proj['model_bytes'])}; float64 Hessians of all layers at once "
          f"{gib(proj['hessians_all'])}, of one block {gib(proj['hessians_block'])}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=info, args=a.args, run=run, seconds=secs, input_bytes=in_bytes,
                                                output_bytes=out_bytes, tokens=tokens, sgemm_gflops=[rate0, rate1],
                                                kinds=kinds, layers=layer_rows, projection=proj), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
