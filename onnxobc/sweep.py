"""``onnxobc sweep``: one model compressed at several budgets from one variant database, each result evaluated
on held-out data beside uniform compression at the same budget; a table, a JSON file and a plot.

Uniform equivalents: for a FLOP target F, every layer at sparsity 1 - F; for a size target F, every layer at the
largest candidate bit width whose nominal size (bits / 32) fits F; for a BOP target F, the largest candidate bit
width b with b x 8 / 64 <= F (dense, 8-bit activations). Each row reports the cost the written model reaches.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from .config import CompressConfig
from .errors import UsageError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepRow:
    kind: str  # 'allocated' | 'uniform'
    target: str
    fraction: float
    label: str
    achieved: float | None  # the cost the compressed model reaches, as a fraction of dense
    top1: float | None
    rel_l2: float | None
    accuracy: float | None
    seconds: float


def _uniform(kind: str, f: float, config: CompressConfig) -> tuple[str, dict] | None:
    bits = sorted(config.cand_bits or ((config.bits,) if config.bits else (8, 4)), reverse=True)
    if kind == "flops":
        return f"uniform {1 - f:.0%}", dict(sparsity=round(1 - f, 4), bits=config.bits, nm=None)
    if kind == "size":
        fit = [b for b in bits if b / 32 <= f + 1e-12]
        return (f"uniform {fit[0]}-bit", dict(bits=fit[0], qdq=True, nm=None)) if fit else None
    options = [(b * 8 / 64, b, None) for b in bits]  # nominal BOPs of dense b-bit weights x 8-bit activations
    if config.nm:
        options += [(b * 8 / 64 * config.nm[0] / config.nm[1], b, config.nm) for b in bits]
    fit = sorted((o for o in options if o[0] <= f + 1e-12), key=lambda o: -o[0])
    if not fit:
        return None
    _, b, nm = fit[0]
    return (f"uniform {f'{nm[0]}:{nm[1]} + ' if nm else ''}{b}-bit", dict(bits=b, nm=nm))


def _achieved(res, kind: str) -> float | None:
    if res.allocation:  # over every selected layer, those left dense included
        return res.allocation["achieved"]
    c = res.cost or {}
    if kind == "flops" and c.get("macs"):
        return c["eff_macs"] / c["macs"]
    if kind == "size" and c.get("dense_bytes"):
        return c["bytes"] / c["dense_bytes"]
    if kind == "bops" and c.get("macs"):  # activations count as 8-bit unless --act-bits says otherwise
        act = (res.config or {}).get("act_bits") or 8
        return sum(l.cost["eff_macs"] * (l.bits or 32) * act for l in res.layers) / (c["macs"] * 64)
    return None


def sweep(model: str | os.PathLike, calib: Any, data: Any, config: CompressConfig, targets: list[float], *,
          labels: str | None = None, uniform: bool = True, progress: Callable | None = None,
          test_samples: int | None = None) -> list[SweepRow]:
    """Compress ``model`` at every fraction of ``targets`` (the kind is ``config``'s target: flops, size or
    bops) and, with ``uniform``, uniformly at the same budgets; evaluate each against the dense model on
    ``data``."""
    from .evaluate import evaluate
    from .pipeline import compress

    kind = config.target[0]
    rows: list[SweepRow] = []

    def one(kind_: str, label: str, cfg: CompressConfig, f: float) -> None:
        t = time.perf_counter()
        try:
            res = compress(model, None, calib, cfg, progress=progress)
        except UsageError as e:  # e.g. a budget below the cheapest candidates: a row that says so
            if "out of reach" not in str(e):
                raise
            rows.append(SweepRow(kind_, kind, f, f"{label} (out of reach)", None, None, None, None,
                                 time.perf_counter() - t))
            log.warning("%s", e)
            return
        ev = evaluate(model, res.extra["model"], data, labels=labels, max_samples=test_samples, latency_runs=0,
                      batch_axes=dict(cfg.batch_axes or ()))
        o = ev.outputs[0]
        rows.append(SweepRow(kind_, kind, f, label, _achieved(res, kind), o.top1, o.rel_l2, o.acc_cand,
                             time.perf_counter() - t))
        log.info("%s: top-1 %s rel L2 %s", label, o.top1, o.rel_l2)

    for f in targets:
        one("allocated", f"{kind} {f:g}, allocated", dataclasses.replace(config, **{f"target_{kind}": f}), f)
        if uniform:
            u = _uniform(kind, f, config)
            if u is None:
                log.warning("no uniform setting fits %s %g", kind, f)
                continue
            label, opts = u
            base = {k: v for k, v in dataclasses.asdict(config).items()
                    if k not in ("target_flops", "target_size", "target_bops", "cand_bits", "cand_sparsity",
                                 "database", "plan", "sparsity", "nm", "bits", "qdq")}
            wants_qdq = opts.pop("qdq", False)
            base["qdq"] = config.qdq or wants_qdq
            one("uniform", f"{kind} {f:g}, {label}", CompressConfig(**base, **opts), f)
    return rows


def write(rows: list[SweepRow], out_dir: str | os.PathLike, title: str) -> list[Path]:
    """sweep.json, sweep.md and (with matplotlib) sweep.png in ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "sweep.json", out / "sweep.md"]
    files[0].write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    metric = "accuracy" if any(r.accuracy is not None for r in rows) else "top1"
    lines = [f"# {title}", "", f"| config | cost reached | {'accuracy' if metric == 'accuracy' else 'top-1 agreement'} "
             "| rel L2 | seconds |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        def fmt(x, spec):
            return "-" if x is None else format(x, spec)
        lines.append(f"| {r.label} | {fmt(r.achieved, '.3f')} | {fmt(getattr(r, metric), '.4f')} | "
                     f"{fmt(r.rel_l2, '.4f')} | {r.seconds:.1f} |")
    files[1].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install onnxobc[plot]): no sweep.png")
        return files
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for kind, style in (("allocated", "o-"), ("uniform", "s--")):
        pts = sorted((r.achieved if r.achieved is not None else r.fraction, getattr(r, metric)) for r in rows
                     if r.kind == kind and getattr(r, metric) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=kind)
    kind = rows[0].target if rows else ""
    ax.set_xlabel({"flops": "FLOPs (fraction of dense)", "size": "weight bytes (fraction of fp32)",
                   "bops": "BOPs (fraction of 8-bit x 8-bit)"}.get(kind, "cost"))
    ax.set_ylabel("accuracy" if metric == "accuracy" else "top-1 agreement with dense")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out / "sweep.png"
    fig.savefig(png)
    plt.close(fig)
    files.append(png)
    return files
