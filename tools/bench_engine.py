"""Benchmark the exact engine (ALGORITHMS.md sec. 4) on synthetic layers.

For each layer shape and mode, times one call of the public engine function (Hessian preparation, the greedy
trace, global selection and the final weights all included) and prints seconds, ms per row and the effective
throughput 2 * rows * C^3 / seconds: the flops of the naive full trace (C steps of a C x C rank-1 update per
row), used as the common yardstick for every mode. The machine's float32 GEMM rate (an n^3 product) is
measured in the same run, so '% sgemm' says how close to the machine the engine runs. Layer errors
(relative, against H) of the engine and of its baseline (magnitude pruning / round-to-nearest) come along,
and the engine's own split of the time (info['seconds']: prepare, trace, final weights). One untimed
warm-up call per mode on a small layer comes first (GPU kernel compilation).

The fast modes (ALGORITHMS.md sec. 6, issue 12: gptq, gptq-act, sparsegpt, sparsegpt-nm) do much less work, so
their effective throughput uses their own yardstick, 2 * rows * C^2 + C^3 (the lazy block updates over the full
width, and the Cholesky factorisation with its triangular inverse), and their rows show the layer error of the
corresponding exact mode (OBQ, unstructured ExactOBS, N:M) next to their own where that one ran. Exact modes
are skipped where rows * C^3 exceeds --max-exact-cost (hours on a CPU at 4096 x 4096). The last lines fit the
exact modes' time as seconds = rows * C^3 / rate: --method auto's threshold is that rate times the seconds an
exact solve may take.

Inputs are random correlated activations with a decaying spectrum, H = 2 X X^T / N.

    python tools/bench_engine.py                       # 64x576, 128x1152, 256x2304; all three modes
    python tools/bench_engine.py --shapes 128x1152 --modes unstructured
    python tools/bench_engine.py --large               # adds 512x4608 (minutes on a CPU)
    python tools/bench_engine.py --device cuda         # CuPy arrays on the GPU
    python tools/bench_engine.py --modes obq,gptq,gptq-act,unstructured,sparsegpt,nm,sparsegpt-nm \
        --shapes 64x576,128x1152,256x2304,1024x4096,4096x4096   # fast modes next to exact (issue 12)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxobc.backend import get_xp, to_numpy  # noqa: E402
from onnxobc.engine import prune_blocks, prune_nm, prune_unstructured, quantize_obq  # noqa: E402
from onnxobc.engine._blas import blas_threads  # noqa: E402
from onnxobc.engine.gptq import prune_sparsegpt, quantize_gptq  # noqa: E402
from onnxobc.engine.baselines import magnitude_prune, magnitude_prune_nm, rtn_quantize  # noqa: E402
from onnxobc.engine.metrics import layer_error  # noqa: E402

DEFAULT_SHAPES = ["64x576", "128x1152", "256x2304"]
LARGE_SHAPE = "512x4608"
MODES = {
    "unstructured": "ExactOBS 50% (global mask)",
    "nm": "2:4 (ExactOBS, N:M)",
    "obq": "OBQ 4-bit (asym, minmax)",
    "blocks": "block OBS bs=4, 50%",
    "gptq": "GPTQ 4-bit (fast)",
    "gptq-act": "GPTQ 4-bit act-order (fast)",
    "sparsegpt": "SparseGPT 50% (fast)",
    "sparsegpt-nm": "SparseGPT 2:4 (fast)",
}
# the exact mode each fast mode is compared with
EXACT_OF = {"gptq": "obq", "gptq-act": "obq", "sparsegpt": "unstructured", "sparsegpt-nm": "nm"}


def synthetic_layer(rows: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (float32) and H = 2 X X^T / N of correlated inputs with a decaying spectrum (float64)."""
    rng = np.random.default_rng(seed)
    n = 2 * c
    z = rng.standard_normal((c, n), dtype=np.float32) * (np.arange(1, c + 1, dtype=np.float32) ** -0.5)[:, None]
    x = z + 0.7 * np.roll(z, 1, axis=0) + 0.4 * z[rng.permutation(c)]  # neighbour and random correlations
    h = (2.0 / n) * (x @ x.T).astype(np.float64)
    h = (h + h.T) * 0.5
    w = (rng.standard_normal((rows, c)) / np.sqrt(c)).astype(np.float32)
    return w, h


def _sync(xp) -> None:
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def sgemm_gflops(xp, n: int, repeat: int = 3) -> float:
    """Best-of-``repeat`` float32 n x n x n matrix product rate, GFLOP/s."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = a @ a
    _sync(xp)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        b = a @ a
        _sync(xp)
        best = min(best, time.perf_counter() - t)
    del b
    return 2.0 * n ** 3 / best / 1e9


def run_mode(xp, mode: str, w, h, dtype: str):
    if mode == "unstructured":
        return prune_unstructured(w, h, 0.5, dtype=dtype)
    if mode == "nm":
        return prune_nm(w, h, 2, 4, dtype=dtype)
    if mode == "obq":
        return quantize_obq(w, h, 4, dtype=dtype)
    if mode == "blocks":
        return prune_blocks(w, h, 4, 0.5, dtype=dtype)
    if mode in ("gptq", "gptq-act"):
        return quantize_gptq(w, h, 4, act_order=mode == "gptq-act", dtype=dtype)
    if mode == "sparsegpt":
        return prune_sparsegpt(w, h, sparsity=0.5, dtype=dtype)
    if mode == "sparsegpt-nm":
        return prune_sparsegpt(w, h, nm=(2, 4), dtype=dtype)
    raise ValueError(mode)


def baseline(mode: str, w: np.ndarray) -> np.ndarray:
    mode = EXACT_OF.get(mode, mode)
    if mode == "unstructured":
        return magnitude_prune(w, 0.5)
    if mode == "nm":
        return magnitude_prune_nm(w, 2, 4)
    if mode == "obq":
        return rtn_quantize(w, 4)[0]
    if mode == "blocks":  # magnitude of block norms, one global threshold
        rows, c = w.shape
        norms = np.linalg.norm(w.reshape(rows, c // 4, 4), axis=2)
        k = int(round(0.5 * norms.size))
        drop = np.zeros(norms.size, bool)
        drop[np.argsort(norms.ravel(), kind="stable")[:k]] = True
        return np.where(np.repeat(drop.reshape(norms.shape), 4, axis=1), 0, w)
    raise ValueError(mode)


def parse_shape(s: str) -> tuple[int, int]:
    try:
        r, c = s.lower().split("x")
        return int(r), int(c)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"shape must look like 128x1152, got {s!r}") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="array module: NumPy or CuPy")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help="comma-separated rows x C shapes (default: %(default)s)")
    ap.add_argument("--large", action="store_true", help=f"also run {LARGE_SHAPE}")
    ap.add_argument("--modes", default="unstructured,nm,obq",
                    help="comma-separated modes from: "
                    + ", ".join(f"{k} ({v})" for k, v in MODES.items()).replace("%", "%%") + " (default: %(default)s)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="engine working precision")
    ap.add_argument("--gemm-n", type=int, default=None, help="size of the GEMM used as the machine's yardstick "
                    "(default 2048 on cpu, 8192 on cuda)")
    ap.add_argument("--repeat", type=int, default=1, help="time each case this many times and report the best "
                    "(the 2-vCPU development VM varies by +-20%% between runs)")
    ap.add_argument("--max-exact-cost", type=float, default=2e12,
                    help="skip the exact modes where rows * C^3 exceeds this (default: %(default)g)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    if args.large and parse_shape(LARGE_SHAPE) not in shapes:
        shapes.append(parse_shape(LARGE_SHAPE))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    xp = get_xp(args.device)
    gemm_n = args.gemm_n or (2048 if args.device == "cpu" else 8192)

    gemm = sgemm_gflops(xp, gemm_n)
    line = f"sgemm {gemm_n}^3 ({args.device}, default BLAS threads): {gemm:8.1f} GFLOP/s"
    gemm1 = None
    if args.device == "cpu":
        with blas_threads(1):
            gemm1 = sgemm_gflops(xp, gemm_n)
        line += f"   | 1 thread: {gemm1:8.1f} GFLOP/s"
    ref = max(gemm, gemm1 or 0.0)
    # warm-up (kernel compilation on a GPU, first-touch allocations): untimed, on a small layer
    # (CuPy compiles its row reductions per power-of-two bucket of the row length: cover all of them)
    w0, h0 = synthetic_layer(8, 64, args.seed) if args.device == "cpu" else synthetic_layer(4, 2304, args.seed)
    for mode in modes:
        run_mode(xp, mode, xp.asarray(w0), xp.asarray(h0), args.dtype)
    print(line)
    print(f"engine dtype {args.dtype}; effective GFLOP/s = 2*rows*C^3 / s (exact), (2*rows*C^2 + C^3) / s (fast "
          f"modes); '% sgemm' is against {ref:.1f}\n")
    head = (f"{'layer':>10} {'mode':<28} {'s':>8} {'ms/row':>8} {'GFLOP/s':>9} {'% sgemm':>8} {'err':>9} "
            f"{'baseline':>9} {'exact err':>9}  phases (s)")
    print(head)
    print("-" * len(head))
    results = []
    for rows, c in shapes:
        w_np, h_np = synthetic_layer(rows, c, args.seed)
        w, h = xp.asarray(w_np), xp.asarray(h_np)
        for mode in modes:
            if mode in ("nm", "blocks", "sparsegpt-nm") and c % 4:
                print(f"{rows:>4}x{c:<5} {MODES[mode]:<28} skipped: C % 4 != 0")
                continue
            fast = mode in EXACT_OF
            if not fast and rows * float(c) ** 3 > args.max_exact_cost:
                print(f"{rows:>4}x{c:<5} {MODES[mode]:<28} skipped: rows*C^3 > --max-exact-cost")
                continue
            dt = float("inf")
            for _ in range(max(1, args.repeat)):
                _sync(xp)
                t = time.perf_counter()
                res_i = run_mode(xp, mode, w, h, args.dtype)
                _sync(xp)
                if time.perf_counter() - t < dt:
                    dt, res = time.perf_counter() - t, res_i
            flops = 2.0 * rows * c ** 2 + float(c) ** 3 if fast else 2.0 * rows * c ** 3
            eff = flops / dt / 1e9
            out = to_numpy(res.weight)
            err = layer_error(w_np, out, h_np)
            err_b = layer_error(w_np, baseline(mode, w_np), h_np)
            err_x = next((r["layer_error"] for r in results if r["rows"] == rows and r["C"] == c
                          and r["mode"] == EXACT_OF.get(mode)), None)
            phases = " ".join(f"{k}={v:.2f}" for k, v in res.info.get("seconds", {}).items())
            print(f"{rows:>4}x{c:<5} {MODES[mode]:<28} {dt:8.2f} {1e3 * dt / rows:8.2f} {eff:9.1f} "
                  f"{100 * eff / ref:7.0f}% {err:9.4f} {err_b:9.4f} "
                  f"{'-' if err_x is None else f'{err_x:.4f}':>9}  {phases}", flush=True)
            results.append(dict(rows=rows, C=c, mode=mode, seconds=dt, ms_per_row=1e3 * dt / rows,
                                effective_gflops=eff, fraction_of_sgemm=eff / ref, layer_error=err,
                                baseline_error=err_b, exact_error=err_x,
                                info={k: v for k, v in res.info.items() if k != "prune"}))
    for mode in modes:  # exact time ~ rows * C^3 / rate: the basis of --method auto's threshold
        pts = [(r["rows"] * float(r["C"]) ** 3, r["seconds"]) for r in results if r["mode"] == mode]
        if mode not in EXACT_OF and pts:
            rate = sum(x for x, _ in pts) / sum(t for _, t in pts)
            print(f"{MODES[mode]}: rows*C^3 / s = {rate:.3g} over {len(pts)} shapes "
                  f"(rows*C^3 solved in 5 s: {5 * rate:.3g})")
    if args.json:
        args.json.write_text(json.dumps(dict(device=args.device, dtype=args.dtype, sgemm_gflops=gemm,
                                             sgemm_gflops_1thread=gemm1, results=results), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
