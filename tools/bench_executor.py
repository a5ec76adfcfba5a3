#!/usr/bin/env python
"""The same compression with the local executor and on a local Ray cluster (issue 12): wall time and whether the
output is the same.

For each case, in one process: compress with ``executor='local'``, then with ``executor='ray'`` on a local Ray
cluster of ``--workers`` CPUs started once beforehand (its start-up and shut-down are timed apart: a CLI run
without ``--ray-address`` pays them on top). Per run: the wall time of ``compress``, its 'compression' seconds
(the solves plus writing the model; calibration is the same on both sides and excluded) and the sum of the
per-layer solve seconds. "identical" compares the serialized output models byte for byte, and the reports with
timings and the executor option left out. Prints a Markdown table.

A case ``decoder:DIR`` (a folder written by tools/make_decoder.py --calib) is run differently: each executor in a
fresh ``python -m onnxobc compress`` process (``--args``, default ``--method auto --bits 4 --group-size 128``;
Ray by ``--ray-address`` to the same cluster), as a user would, so that each run's memory is its own. Measured
per run: the subprocess's wall time, the report's calibration / compression seconds and sum of per-layer solve
seconds, the driver's peak RSS (``ru_maxrss``) and CPU seconds, and for Ray the worker processes of the cluster,
sampled every 0.5 s from /proc: the largest VmHWM of one worker, the peak of their summed private (anonymous)
RSS, their CPU seconds; and the object store's size, as the rise of the machine's shared memory (/proc/meminfo
Shmem: Ray's store lives in /dev/shm; other processes' shared memory counts too if it changes meanwhile) and as
the shared pages mapped by the driver (RssShmem: the objects it wrote or read). The outputs (``.onnx`` and its
data file) are compared byte for byte on disk, the reports as above (and without their input/output paths).

Examples:
  python tools/bench_executor.py --cases shipped,minilm-gptq --models-dir /work/cache/models
  python tools/bench_executor.py --cases minilm-auto --workers 2 --repeat 2
  python tools/bench_executor.py --cases decoder:/tmp/dec2048x2 --out-dir /tmp/bench_out
  python tools/bench_executor.py --cases decoder:/tmp/dec2048x2 --ray-address 127.0.0.1:6379   # a running cluster
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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


DECODER_ARGS = "--method auto --bits 4 --group-size 128"


@dataclass
class Case:
    """One case of the command line: a named in-process case of CASES, or a make_decoder folder (``decoder:DIR``,
    run as one CLI process per executor)."""

    name: str
    model: str
    calib: str
    samples: int | None = None
    opts: dict | None = None
    decoder: bool = False


def parse_cases(text: str, models_dir: str | os.PathLike) -> list[Case]:
    """The ``--cases`` list: names of CASES and ``decoder:DIR`` entries, comma-separated. A ValueError names what
    is unknown or missing."""
    cases, unknown = [], []
    for item in (c.strip() for c in text.split(",")):
        if not item:
            continue
        if item.startswith("decoder:"):
            d = Path(item[len("decoder:"):]).expanduser()
            missing = [f for f in ("decoder.onnx", "calib.npz") if not (d / f).is_file()]
            if missing:
                raise ValueError(f"{item}: no {', '.join(missing)} in {d} (write it with tools/make_decoder.py --calib)")
            cases.append(Case(item, str(d / "decoder.onnx"), str(d / "calib.npz"), decoder=True))
        elif item in CASES:
            model, calib, samples, opts = CASES[item]
            cases.append(Case(item, _path(model, Path(models_dir)), _path(calib, Path(models_dir)), samples, opts))
        else:
            unknown.append(item)
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}, decoder:DIR")
    if not cases:
        raise ValueError("no case given")
    return cases


def _strip(d):
    """A report without its timings, its executor options and the staging budget (without --stage-memory it is
    read from the memory available at the time; the stages it gave stay compared)."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in ("seconds", "executor", "ray_address", "budget_bytes")}
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


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssShmem (bytes) of a process; {} when it is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _meminfo_shmem() -> int:
    """The machine's shared memory in use (tmpfs, /dev/shm: where Ray's object store lives), bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


def _proc_cpu(pid: int) -> float:
    """utime + stime seconds of a process (0 when it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def ray_processes(session_dir: str) -> tuple[int | None, list[int]]:
    """(the raylet of the cluster whose session folder is ``session_dir``, its worker processes): workers are
    the raylet's children named ``ray::...`` other than its agents."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    raylet = next((p for p in pids if "raylet/raylet" in (c := _cmdline(p)) and session_dir in c), None)
    if raylet is None:
        return None, []
    workers = [p for p in pids if _ppid(p) == raylet and (c := _cmdline(p)).startswith("ray::")
               and not c.split()[0].endswith("Agent")]
    return raylet, workers


def _copy_files(out: Path) -> list[Path]:
    """The output model and the files beside it that belong to it (its external data)."""
    return sorted(p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(out.name + "."))


def same_files(a: Path, b: Path) -> bool:
    """The output model ``a`` and its data files equal ``b``'s byte for byte (same names beside each)."""
    fa, fb = _copy_files(a), _copy_files(b)
    if [p.name for p in fa] != [p.name for p in fb]:
        return False
    for x, y in zip(fa, fb):
        if x.stat().st_size != y.stat().st_size:
            return False
        with open(x, "rb") as f, open(y, "rb") as g:
            while True:
                u, v = f.read(1 << 24), g.read(1 << 24)
                if u != v:
                    return False
                if not u:
                    break
    return True


def run_cli(case: Case, executor: str, out_dir: Path, args: str, address: str | None,
            session_dir: str | None) -> dict:
    """One ``python -m onnxobc compress`` process; its wall time, report and memory (see the module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out, report = out_dir / "out.onnx", out_dir / "report.json"
    cmd = [sys.executable, "-m", "onnxobc", "compress", case.model, "--calib", case.calib, "-o", str(out),
           "--report", str(report), "--force", "-q", *shlex.split(args), "--executor", executor]
    if executor == "ray":
        cmd += ["--ray-address", address]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    raylet = None
    if executor == "ray" and session_dir:
        raylet, _ = ray_processes(session_dir)
    seen: dict[int, dict] = {}  # worker pid -> last status and CPU seconds (VmHWM only grows)
    peak = dict(workers_anon=0, workers_rss=0, shmem_rise=0, driver_anon=0, driver_shmem=0)
    shmem0 = _meminfo_shmem()
    stop = threading.Event()

    def sample(pid):
        while not stop.is_set():
            st = _proc_status(pid)
            peak["driver_anon"] = max(peak["driver_anon"], st.get("RssAnon", 0))
            peak["driver_shmem"] = max(peak["driver_shmem"], st.get("RssShmem", 0))
            peak["shmem_rise"] = max(peak["shmem_rise"], _meminfo_shmem() - shmem0)
            if raylet is not None:
                anon = rss = 0
                for w in ray_processes(session_dir)[1]:
                    ws = _proc_status(w)
                    if not ws:
                        continue
                    seen[w] = dict(ws, cpu=_proc_cpu(w))
                    anon += ws.get("RssAnon", 0)
                    rss += ws.get("VmRSS", 0)
                peak["workers_anon"] = max(peak["workers_anon"], anon)
                peak["workers_rss"] = max(peak["workers_rss"], rss)
            stop.wait(0.5)

    # CPU seconds the workers had before this run (idle ones started with the cluster); new ones start at 0
    start_cpu = {w: _proc_cpu(w) for w in ray_processes(session_dir)[1]} if raylet is not None else {}
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env)
    th = threading.Thread(target=sample, args=(p.pid,), daemon=True)
    th.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    stop.set()
    th.join(timeout=5)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{case.name} {executor}: compress failed (exit {p.returncode})")
    rep = json.loads(report.read_text())
    secs = rep["seconds"]
    stripped = _strip({k: v for k, v in rep.items() if k not in ("input", "output")})
    return dict(wall=wall, calibration=secs["calibration"], compression=secs["compression"],
                solves=sum(l["seconds"] for l in rep["layers"]), layers=len(rep["layers"]), out=out,
                report=stripped, peak_rss=usage.ru_maxrss * 1024, cpu=usage.ru_utime + usage.ru_stime,
                workers=len(seen), worker_hwm=max((w.get("VmHWM", 0) for w in seen.values()), default=0),
                worker_cpu=sum(w["cpu"] - start_cpu.get(pid, 0.0) for pid, w in seen.items()), **peak)


def run_decoder_case(case: Case, args: argparse.Namespace, address: str, session_dir: str) -> dict:
    """Local, then Ray, each in a fresh process; then the comparison. Returns the runs and the verdicts."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_calibration import sgemm_rate

    base = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="bench_executor_"))
    rate0 = sgemm_rate(2048, 2048, 3)
    load0 = os.getloadavg()[0]
    try:
        runs = {ex: run_cli(case, ex, base / ex, args.args, address, session_dir) for ex in ("local", "ray")}
        for ex, r in runs.items():
            print(f"{case.name} {ex}: wall {r['wall']:.1f} s, compression {r['compression']:.1f} s, peak RSS "
                  f"{r['peak_rss'] / 2 ** 30:.2f} GiB", file=sys.stderr, flush=True)
        same_out = same_files(runs["local"]["out"], runs["ray"]["out"])
        same_rep = runs["local"]["report"] == runs["ray"]["report"]
    finally:
        if not args.out_dir:
            shutil.rmtree(base, ignore_errors=True)
    return dict(runs=runs, same_out=same_out, same_rep=same_rep, sgemm=(rate0, sgemm_rate(2048, 2048, 3)),
                load=(load0, os.getloadavg()[0]))


def print_decoder_table(results: list[tuple[Case, dict]], args_text: str) -> None:
    g = 2 ** 30
    head = ["case", "executor", "layers", "wall s", "calibration s", "compression s", "sum of solves s",
            "driver peak RSS GiB", "driver CPU s", "workers", "worker peak RSS GiB (largest VmHWM)",
            "workers' private RSS peak GiB (sum)", "workers CPU s", "driver shared (store) peak GiB",
            "machine Shmem rise peak GiB",
            "identical output", "identical report"]
    print(f"\ndecoder cases, compress {args_text}; each run a fresh process:\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for case, res in results:
        for ex, r in res["runs"].items():
            ray_cols = ([str(r["workers"]), f"{r['worker_hwm'] / g:.2f}", f"{r['workers_anon'] / g:.2f}",
                         f"{r['worker_cpu']:.0f}"] if ex == "ray" else ["-"] * 4)
            ray_cols += [f"{r['driver_shmem'] / g:.2f}", f"{r['shmem_rise'] / g:.2f}"]
            print("| " + " | ".join([case.name, ex, str(r["layers"]), f"{r['wall']:.1f}", f"{r['calibration']:.1f}",
                                     f"{r['compression']:.1f}", f"{r['solves']:.1f}", f"{r['peak_rss'] / g:.2f}",
                                     f"{r['cpu']:.0f}", *ray_cols,
                                     "yes" if res["same_out"] else "NO", "yes" if res["same_rep"] else "NO"]) + " |")
        lo, ra = res["runs"]["local"], res["runs"]["ray"]
        print(f"\n{case.name}: ray / local wall {ra['wall'] / lo['wall']:.2f}, compression "
              f"{ra['compression'] / lo['compression']:.2f}; driver private RSS peak {ra['driver_anon'] / g:.2f} GiB "
              f"(local: {lo['driver_anon'] / g:.2f} GiB); sgemm {res['sgemm'][0]:.0f} / {res['sgemm'][1]:.0f} GFLOP/s and "
              f"load average {res['load'][0]:.1f} / {res['load'][1]:.1f} before / after")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="shipped,minilm-gptq", help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--models-dir", default=os.environ.get("ONNXOBC_MODELS", str(ROOT / ".cache" / "models")))
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per executor; the fastest is reported (in-process cases only)")
    ap.add_argument("--args", default=DECODER_ARGS, help=f"compress arguments of decoder cases (default: {DECODER_ARGS})")
    ap.add_argument("--out-dir", help="decoder cases: keep the outputs and reports here (default: a temporary "
                                      "folder, removed)")
    ap.add_argument("--ray-address", help="use this running Ray cluster (e.g. one from `ray start --head "
                                          "--num-cpus 2`) instead of starting a local one of --workers CPUs")
    ap.add_argument("--object-store-mb", type=float, default=None,
                    help="object store size of the local Ray cluster started here (default: Ray's)")
    args = ap.parse_args()
    try:
        cases = parse_cases(args.cases, args.models_dir)
    except ValueError as e:
        ap.error(str(e))
    import ray

    t = time.perf_counter()
    if args.ray_address:
        ctx = ray.init(address=args.ray_address, log_to_driver=False, logging_level="ERROR")
    else:
        store = int(args.object_store_mb * 2 ** 20) if args.object_store_mb else None
        ctx = ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                       object_store_memory=store)
    t_start = time.perf_counter() - t
    address, session_dir = ctx.address_info["gcs_address"], ctx.address_info["session_dir"]
    cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    rows, dec = [], []
    try:
        for case in cases:
            if case.decoder:
                dec.append((case, run_decoder_case(case, args, address, session_dir)))
                continue
            name, model, calib, samples, opts = case.name, case.model, case.calib, case.samples, case.opts
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
    where = f"cluster at {args.ray_address}" if args.ray_address else "local cluster"
    print(f"Ray {ray.__version__}, {where} of {cluster_cpus} CPUs: start (or connect) {t_start:.1f} s, shut-down "
          f"{t_stop:.1f} s (paid on top by a run without --ray-address); {os.cpu_count()} CPUs on this machine\n")
    if rows:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    if dec:
        print_decoder_table(dec, args.args)
    ok = all(r[-2] == "yes" and r[-1] == "yes" for r in rows) and all(d["same_out"] and d["same_rep"] for _, d in dec)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
