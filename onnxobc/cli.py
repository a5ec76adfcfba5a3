"""The `onnxobc` command: argument parsing, progress display, summary table, exit codes.

Exit codes: 0 success, 1 error in the model/data/computation, 2 bad usage (argparse and option checks).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from ._version import __version__
from .jsonutil import dumps
from .paths import check_writable_outputs

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain-text table (monospace, no dependencies)."""
    right = right or set()
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


NAME_WIDTH = 48


def short_names(names: list[str], width: int = NAME_WIDTH) -> list[str]:
    """Names for a table column: those longer than ``width`` keep their end (tf2onnx / torch names differ at the
    end: '.../block_3/conv2d/Conv2D'), or their start and end where two ends collide; the JSON keeps them whole."""
    def tail(n: str) -> str:
        return n if len(n) <= width else "..." + n[-(width - 3):]

    def middle(n: str) -> str:
        head = width // 3
        return n if len(n) <= width else n[:head] + "..." + n[-(width - head - 3):]

    out = [tail(n) for n in names]
    counts: dict[str, int] = {}
    for n in out:
        counts[n] = counts.get(n, 0) + 1
    out = [middle(full) if counts[n] > 1 else n for n, full in zip(out, names)]
    return [o if out.count(o) == 1 or o == full else full for o, full in zip(out, names)]


def _progress_factory(quiet: bool):
    enabled = not quiet and sys.stderr.isatty()

    def progress(it: Iterable, desc: str, total: int | None) -> Iterable:
        if not enabled:
            return it
        from tqdm import tqdm

        return tqdm(it, desc=desc, total=total, unit="batch" if desc.startswith(("calib", "eval")) else "layer",
                    leave=False, file=sys.stderr, dynamic_ncols=True)

    return progress


# ---- inspect --------------------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph import find_layers, load_model

    model = load_model(args.model)
    layers, skipped = find_layers(model)
    info = {
        "model": str(args.model),
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "layers": [
            {"name": l.name, "op": l.op, "weight": l.weight_name, "weight_shape": list(l.weight.shape),
             "rows": l.groups * l.rows, "C": l.cols, "groups": l.groups, "params": l.params, "macs": l.static_macs(),
             "nodes": [c.node_name for c in l.consumers], "source": l.source_kind,
             "chain": [s.op for s in l.chain]}
            for l in layers
        ],
        "skipped": [{"name": s.node_name, "op": s.op, "reason": s.reason} for s in skipped],
    }
    info["total_params"] = sum(l["params"] for l in info["layers"])
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{args.model}: {len(layers)} compressible layers, {_fmt_int(info['total_params'])} parameters, "
          f"opsets {', '.join(f'{k} {v}' for k, v in info['opsets'].items())}")
    rows = []
    for l, short in zip(info["layers"], short_names([l["name"] for l in info["layers"]])):
        extra = []
        if len(l["nodes"]) > 1:
            extra.append("shared by " + ", ".join(l["nodes"]))
        if l["chain"]:
            extra.append("via " + " > ".join([l["source"]] + l["chain"]))
        elif l["source"] == "constant":
            extra.append("Constant node")
        rows.append([short, l["op"], "x".join(map(str, l["weight_shape"])), f"{l['rows']}x{l['C']}",
                     str(l["groups"]), _fmt_int(l["params"]), _fmt_int(l["macs"]), "; ".join(extra)])
    if rows:
        print(format_table(["layer", "op", "weight", "rows x C", "groups", "params", "MACs/sample", "note"], rows,
                           right={4, 5, 6}))
    if skipped:
        print(f"\nskipped {len(skipped)}:")
        print(format_table(["node", "op", "reason"], [[s["name"], s["op"], s["reason"]] for s in info["skipped"]]))
    return EXIT_OK


# ---- compress -------------------------------------------------------------------------------------------

def _config_from_args(args: argparse.Namespace):
    from .config import CompressConfig
    from .plan import load_plan

    per_layer, cands = _spec_options(args)
    return CompressConfig(
        **per_layer, **cands, target_flops=args.target_flops, target_size=args.target_size,
        target_bops=args.target_bops, database=args.database, allocation_error=args.allocation_error,
        allocation_samples=args.allocation_samples, allocation_search=args.allocation_search,
        stats_correction=args.stats_correction,
        correction_samples=args.correction_samples, samples=args.samples, batch_size=args.batch_size,
        include=args.include, exclude=args.exclude,
        qdq=args.qdq or args.format == "qdq", matmulnbits=args.format == "matmulnbits",
        accuracy_level=args.accuracy_level, opset=args.opset,
        verify=args.verify, verify_samples=args.verify_samples, token_mask=args.token_mask,
        sparse_storage=args.sparse_storage, act_bits=args.act_bits, act_calib=args.act_calib,
        act_percentile=args.act_percentile, act_bias_correction=args.act_bias_correction,
        smooth_alpha=args.smooth_alpha, act_noise=args.act_noise, act_search_target=args.act_search_target,
        act_search_samples=args.act_search_samples, act_search_metric=args.act_search_metric, layer_error=not args.no_layer_error,
        plan=None if args.plan is None else load_plan(args.plan),
        batch_axes=_batch_axes(args), verify_data=args.verify_data, executor=args.executor,
        ray_address=args.ray_address, sequential=args.sequential, stage_memory=args.stage_memory,
        low_memory=args.low_memory,
    )


def _batch_axes(args: argparse.Namespace) -> dict:
    from .calibrate.data import parse_batch_axes

    return parse_batch_axes(args.batch_axis)


def _spec_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """(the LayerSpec options as given, candidate lists): with a target, comma-separated --bits / --sparsity
    values are candidates (cand_bits / cand_sparsity) rather than one setting."""
    from .engine.spec import spec_fields

    per_layer = {f.name: getattr(args, f.name) for f in spec_fields()}
    cands = {}
    for name in ("bits", "sparsity"):
        if isinstance(per_layer[name], tuple):
            cands[f"cand_{name}"] = per_layer[name]
            per_layer[name] = None
    return per_layer, cands


def _number_or_list(typ):
    """An argparse type: one number, or a comma-separated list of them (candidates for a --target-*)."""
    def parse(text: str):
        parts = [p for p in text.split(",") if p.strip()]
        try:
            vals = tuple(typ(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {typ.__name__} or a comma-separated list, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"expected a {typ.__name__} or a comma-separated list, got {text!r}")
        return vals[0] if len(vals) == 1 and "," not in text else vals
    parse.__name__ = typ.__name__
    return parse


def _add_spec_arguments(group) -> None:
    """One argument per LayerSpec field, spelled and documented as its metadata says."""
    from .engine.spec import spec_fields

    for f in spec_fields():
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        if meta.get("action") == "store_true":
            group.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kw = dict(default=f.default, help=meta["help"])
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        if meta.get("type") is not None:
            kw["type"] = _number_or_list(meta["type"]) if f.name in ("bits", "sparsity") else meta["type"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        group.add_argument(flag, **kw)


def _default_output(model: str) -> str:
    p = Path(model)
    return str(p.with_name(p.stem + ".obc.onnx"))


def cmd_compress(args: argparse.Namespace) -> int:
    from .pipeline import compress

    try:
        cfg = _config_from_args(args)
    except ValueError as e:
        _error(str(e), EXIT_USAGE)
        return EXIT_USAGE
    output = args.output or _default_output(args.model)
    report_path = Path(args.report) if args.report else None
    check_writable_outputs({"output": output, "--report": report_path}, args.force, [args.model, args.calib])
    result = compress(args.model, output, args.calib, cfg, force=args.force, progress=_progress_factory(args.quiet))
    data = result.to_dict()
    data.pop("extra", None)
    if not args.quiet:
        rows = []
        for l, short in zip(result.layers, short_names([l.name for l in result.layers])):
            bits = str(l.bits) if l.bits else "-"
            rows.append([short, l.op, l.shape, l.method, f"{l.sparsity:.1%}", bits, "-" if l.error is None else f"{l.error:.2e}",
                         f"{l.seconds:.2f}", l.note])
        print(format_table(["layer", "op", "shape", "method", "sparsity", "bits", "error", "seconds", "note"], rows,
                           right={4, 5, 6, 7}))
        tot_params = sum(l.params for l in result.layers)
        zeros = sum(l.sparsity * l.params for l in result.layers)
        macs = [l.macs for l in result.layers]
        print(f"\n{len(result.layers)} layers compressed ({_fmt_int(tot_params)} weights, {zeros / max(tot_params, 1):.1%} "
              f"zero{'' if None in macs else f', {_fmt_int(sum(macs))} MACs/sample'}), "
              f"{len(result.skipped)} skipped, {len(result.not_selected)} not selected{' or skipped by the plan' if cfg.plan else ''}; {result.samples} calibration samples"
              + (f" (padding masked by '{result.token_mask}')" if result.token_mask else ""))
        if result.allocation:
            a = result.allocation
            print(f"allocation: --target-{a['target']} {a['fraction']:g} reached {a['achieved']:.3f} of the dense "
                  f"{a['target']} ({a['error']} error; {a['variants_solved']} variants solved, {a['variants_reused']} "
                  f"reused from the database; {len(result.not_selected)} layers left as they are)")
        if result.correction:
            notes = [c for c in result.correction if "note" in c]
            print(f"statistics correction ({cfg.stats_correction}): {len(result.correction) - len(notes)} layers "
                  f"corrected" + "".join(f"\n  {c['layer']}: {c['note']}" for c in notes))
        if result.cost and result.cost.get("bytes") is not None:
            c = result.cost
            line = (f"weights stored: {_fmt_bytes(c['bytes'])} of {_fmt_bytes(c['dense_bytes'])} in fp32 "
                    f"({c['bytes'] / max(c['dense_bytes'], 1):.1%})")
            if c.get("eff_macs") is not None and c.get("macs"):
                line += f"; MACs x density {c['eff_macs'] / c['macs']:.1%} of dense"
            print(line + (" (before sparse storage)" if result.sparse_storage else ""))
        print(f"calibration {result.seconds['calibration']:.1f} s, compression {result.seconds['compression']:.1f} s, "
              f"total {result.seconds['total']:.1f} s")
        if result.memory and result.memory["staged"]:
            m = result.memory
            print(f"calibrated in {m['stages']} {'sequential ' if m['sequential'] else ''}stages: Hessians held at most "
                  f"{_fmt_bytes(m['hessian_bytes_held_peak'])} of {_fmt_bytes(m['hessian_bytes_total'])}")
        if result.sparse_storage:
            before = sum(t["bytes_before"] for t in result.sparse_storage)
            after = sum(t["bytes_after"] for t in result.sparse_storage)
            print(f"sparse storage: {len(result.sparse_storage)} tensors, {_fmt_bytes(before)} -> {_fmt_bytes(after)}")
        if result.activations:
            acts = [a for a in result.activations if "tensor" in a]
            notes = [a["note"] for a in result.activations if "note" in a]
            print(f"activations: {len(acts)} tensors quantized to {cfg.act_bits} bits per tensor ({cfg.act_calib} ranges)"
                  + "".join(f"\n  note: {n}" for n in notes))
        if result.verify is not None:
            v = result.verify
            print(f"verify on {v['samples']} samples of {v['data']}" + (
                " (in-sample: the calibration samples, which the compression fitted; --verify-data FILE for "
                "held-out data)" if v.get("in_sample") else " (held-out)"))
            for o in v["outputs"]:
                agree = f", top-1 agreement {o['top1']:.2%}" if o.get("top1") is not None else ""
                cos = f", cosine {o['cosine']:.5f}" if o.get("cosine") is not None else ""
                print(f"  output '{o['name']}' rel L2 {o['rel_l2']:.3e}, SQNR {o['sqnr_db']:.1f} dB{cos}{agree}")
        print(f"wrote {result.output} ({_fmt_bytes(result.output_bytes)}; input {_fmt_bytes(result.input_bytes)})")
    if report_path is not None:
        tmp = report_path.with_name(report_path.name + ".tmp")
        tmp.write_text(dumps(data))
        os.replace(tmp, report_path)
        if not args.quiet:
            print(f"report: {report_path}")
    return EXIT_OK


# ---- eval -----------------------------------------------------------------------------------------------

def _fmt_metric(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)  # inf / nan print as "inf" / "nan"


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    json_path = Path(args.json) if args.json else None
    check_writable_outputs({"--json": json_path}, args.force, [args.reference, args.candidate, args.data])
    res = evaluate(args.reference, args.candidate, args.data, labels=args.labels, label_output=args.output,
                   batch_size=args.batch_size, max_samples=args.samples, latency_runs=args.latency_runs,
                   progress=_progress_factory(args.quiet), batch_axes=_batch_axes(args), slices=args.slice,
                   token_mask=args.token_mask)
    if not args.quiet:
        print(f"{res.samples} samples in {res.batches} batches from {res.data}"
              + (f"; labels '{res.labels}' on output '{res.label_output}'" if res.labels else ""))
        rows = []
        for o in res.outputs:
            top5 = _fmt_metric(o.top5, ".2%") + (f" (top-{o.topk})" if o.topk is not None and o.topk < 5 else "")
            rows.append([o.name, _fmt_metric(o.rel_l2, ".3e"), _fmt_metric(o.sqnr_db, ".2f"),
                         _fmt_metric(o.cosine, ".6f"), _fmt_metric(o.top1, ".2%"), top5,
                         _fmt_metric(o.acc_ref, ".2%"), _fmt_metric(o.acc_cand, ".2%")])
        print(format_table(["output", "rel L2", "SQNR dB", "cosine", "top-1", "top-5", "acc ref", "acc cand"], rows,
                           right={1, 2, 3, 4, 5, 6, 7}))
        for s in res.skipped_outputs:
            print(f"not compared: {s['name']} ({s['reason']})")
        if res.token_mask:
            print(f"[real tokens]: the positions where '{res.token_mask}' is non-zero, each token one sample "
                  f"(padding is left out of calibration; --token-mask none drops these rows)")
        line = (f"size: reference {_fmt_bytes(res.reference_bytes)}, candidate {_fmt_bytes(res.candidate_bytes)} "
                f"({res.candidate_bytes / max(res.reference_bytes, 1):.1%})")
        if res.latency_ms:
            lat = res.latency_ms
            line += (f"; latency per batch of {lat['batch_samples']} (median of {lat['runs']}): reference "
                     f"{lat['reference']:.2f} ms, candidate {lat['candidate']:.2f} ms")
        print(line)
    if json_path is not None:
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(res.to_json())
        os.replace(tmp, json_path)
        if not args.quiet:
            print(f"report: {json_path}")
    return EXIT_OK


# ---- sweep ----------------------------------------------------------------------------------------------

def cmd_sweep(args: argparse.Namespace) -> int:
    from .config import CompressConfig
    from .errors import UsageError
    from .sweep import sweep, write

    given = [(k, getattr(args, f"target_{k}")) for k in ("flops", "size", "bops") if getattr(args, f"target_{k}")]
    if len(given) != 1:
        raise UsageError("give exactly one of --target-flops, --target-size, --target-bops (a comma-separated list)")
    kind, text = given[0]
    try:
        targets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--target-{kind} {text!r}: expected comma-separated fractions such as 0.7,0.5") from None
    per_layer, cands = _spec_options(args)
    cfg = CompressConfig(**per_layer, **cands, samples=args.samples, batch_size=args.batch_size,
                         database=args.database, allocation_error=args.allocation_error,
                         stats_correction=args.stats_correction, opset=args.opset, executor=args.executor,
                         ray_address=args.ray_address, **{f"target_{kind}": targets[0]})
    out = Path(args.out)  # checked before any work: an existing folder must accept files, a new one a parent that does
    check_writable_outputs([out / "sweep.json" if out.is_dir() else out], force=True)
    rows = sweep(args.model, args.calib, args.data, cfg, targets, labels=args.labels, uniform=not args.no_uniform,
                 progress=_progress_factory(args.quiet), test_samples=args.test_samples)
    files = write(rows, args.out, f"{Path(args.model).name}: {kind} budgets")
    if not args.quiet:
        print(Path(files[1]).read_text().strip())
        print("wrote " + ", ".join(map(str, files)))
    return EXIT_OK


# ---- parser ---------------------------------------------------------------------------------------------

BATCH_AXIS_HELP = ("the axis of input NAME that indexes samples, or NAME=none to pass it whole with every batch "
                   "(repeatable). Default: inferred from the model, the symbolic dim the inputs share (e.g. axis 1 of "
                   "a state [2, N, 128] next to an input [N, 576]), else a dynamic axis 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onnxobc",
        description="Post-training pruning and quantization of ONNX models with Optimal Brain Compression "
                    "(ExactOBS / OBQ), using a few hundred unlabelled calibration samples.",
    )
    p.add_argument("--version", action="version", version=f"onnxobc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show Python tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables")

    pi = sub.add_parser("inspect", parents=[common], help="list the compressible layers of a model",
                        description="List every Gemm/MatMul/Conv/ConvTranspose with a constant weight (shape as rows x C, groups, "
                                    "parameters, MACs per sample) and every candidate that is skipped, with the reason.")
    pi.add_argument("model", help="path of the .onnx model")
    pi.add_argument("--json", action="store_true", help="print JSON instead of tables")
    pi.set_defaults(func=cmd_inspect)

    pe = sub.add_parser(
        "eval", parents=[common], help="compare a compressed model with its reference on data",
        description="Run REFERENCE and CANDIDATE (same inputs and outputs) in ONNX Runtime (CPU, same session options)\n"
                    "on the same data and report, per output (r: reference, c: candidate):\n"
                    "  rel L2    ||c - r|| / ||r|| over all elements and samples\n"
                    "  SQNR dB   10 log10(||r||^2 / ||c - r||^2) (inf when identical)\n"
                    "  cosine    mean over samples of the cosine of r and c (each sample flattened; '-' for outputs\n"
                    "            of one value per sample such as [N, 1], where it is only a sign)\n"
                    "  top-1     class outputs ([N, K] floats): fraction of samples with the same argmax\n"
                    "  top-5     class outputs: fraction of samples whose candidate top-1 class is among the\n"
                    "            reference's top-5 classes (top-K when K < 5; ties count for the candidate)\n"
                    "  acc       with --labels: accuracy (argmax == label) of each model\n"
                    "and the file sizes (external data included) and median latency per batch of both models.",
        epilog="examples:\n"
               "  onnxobc eval model.onnx model.obc.onnx --data test.npz\n"
               "  onnxobc eval model.onnx model.obc.onnx --data test.npz --labels label --json eval.json\n"
               "  onnxobc eval det.onnx det.obc.onnx --data test.npz --slice output0:2:0:4 --slice output0:2:5:85\n"
               "data: an .npz whose keys are the models' input names (axis 0 = samples), or a folder of them; "
               "other arrays (labels) are ignored.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pe.add_argument("reference", help="the reference (dense) .onnx model")
    pe.add_argument("candidate", help="the candidate (compressed) .onnx model")
    pe.add_argument("--data", required=True, metavar="DATA", help=".npz file or directory of .npz files")
    pe.add_argument("--labels", metavar="KEY", help="key of the label array (class indices, one per sample) in DATA")
    pe.add_argument("--output", metavar="NAME", help="the class output the labels apply to (default: the first)")
    pe.add_argument("--samples", type=int, metavar="N", help="use at most N samples (default: all)")
    pe.add_argument("--batch-size", type=int, default=32, metavar="B", help="batch size (default 32)")
    pe.add_argument("--batch-axis", action="append", metavar="NAME=AXIS", help=BATCH_AXIS_HELP)
    pe.add_argument("--slice", action="append", metavar="NAME:AXIS:START:STOP",
                    help="also report the part START:STOP along AXIS of output NAME on its own row (repeatable), e.g. "
                         "a detector's class scores (output0:2:5:85) apart from its box coordinates (output0:2:0:4)")
    pe.add_argument("--token-mask", default="auto", metavar="INPUT",
                    help="[batch, sequence] input marking real tokens (non-zero) and padding (0): outputs of shape "
                         "[batch, sequence, ...] get a second row over the real tokens only. Default 'auto': an "
                         "integer input named attention_mask; 'none' to turn off")
    pe.add_argument("--latency-runs", type=int, default=20, metavar="R",
                    help="timed runs per model on the first batch, after a warm-up run (default 20; 0 skips timing)")
    pe.add_argument("--json", metavar="FILE", help="also write the results as JSON (non-finite numbers as \"inf\")")
    pe.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    pe.set_defaults(func=cmd_eval)

    pc = sub.add_parser(
        "compress", parents=[common], help="prune and/or quantize a model",
        description="Prune and/or quantize every compressible layer of MODEL, layer by layer, so that each layer's "
                    "output on the calibration data changes as little as possible.",
        epilog="examples:\n"
               "  onnxobc compress model.onnx --calib calib.npz --sparsity 0.5\n"
               "  onnxobc compress model.onnx --calib calib.npz --nm 2:4 --bits 8 -o model.24w8.onnx\n"
               "  onnxobc compress model.onnx --calib calib.npz --bits 4 --method rtn --report rtn.json\n"
               "calibration data: an .npz whose keys are the model's input names (axis 0 = samples), or a folder of them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pc.add_argument("model", help="path of the .onnx model (never modified)")
    pc.add_argument("-o", "--output", help="output model path (default: MODEL with .obc.onnx)")
    pc.add_argument("--calib", required=True, metavar="DATA", help=".npz file or directory of .npz files")
    pc.add_argument("--samples", type=int, metavar="N", help="use at most N calibration samples (default: all)")
    pc.add_argument("--batch-size", type=int, default=32, metavar="B", help="calibration batch size (default 32)")
    pc.add_argument("--batch-axis", action="append", metavar="NAME=AXIS", help=BATCH_AXIS_HELP)
    pc.add_argument("--token-mask", default="auto", metavar="INPUT",
                    help="[batch, sequence] input whose zeros mark padding tokens to leave out of the statistics of "
                         "MatMul/Gemm layers (default auto: an input named attention_mask; 'none' to disable)")
    g = pc.add_argument_group("what to do")
    _add_spec_arguments(g)
    g.add_argument("--no-layer-error", action="store_true",
                   help="do not compute the per-layer error column: with --method rtn or magnitude (which need no "
                        "Hessian) calibration then only runs the model, several times faster on large CNNs")
    g.add_argument("--sequential", action="store_true",
                   help="calibrate the layers in stages by depth, each on the model whose earlier layers are already "
                        "compressed, so later layers compensate the earlier errors (one ONNX Runtime pass per stage)")
    g.add_argument("--stage-memory", type=float, metavar="MB",
                   help="MB of Hessians held at once: when all layers' Hessians need more, calibrate and solve in "
                        "stages, one pass over the data each (default: half the available memory)")
    g.add_argument("--low-memory", choices=("auto", "on", "off"), default="auto",
                   help="run ONNX Runtime without weight prepacking, so that it maps the weights from a file instead "
                        "of holding a repacked copy: one copy of the model less in memory, calibration ~1.3-1.6x "
                        "slower (default auto: on for models whose weights exceed 1 GiB)")
    g.add_argument("--include", metavar="REGEX", help="only layers whose node or weight name matches")
    g.add_argument("--exclude", metavar="REGEX", help="skip layers whose node or weight name matches")
    g.add_argument("--plan", metavar="FILE",
                   help="per-layer options: a JSON (or YAML) list of rules, first match wins, e.g. "
                        "[{\"match\": \"conv1$\", \"bits\": 8}, {\"match\": \"fc\", \"skip\": true}, "
                        "{\"match\": \".\", \"bits\": 4, \"group_size\": 32}]; keys are the options above "
                        "(method, sparsity, nm, block_size, bits, group_size, sym, grid, damp, dtype, device), and "
                        "replace the global ones for the matching layers (null clears one); layers no rule matches "
                        "get the global options. A --report's 'plan' key is such a list (one rule per layer): "
                        "--plan REPORT.json reuses it")
    t = pc.add_argument_group(
        "compression to a budget",
        "choose each layer's sparsity and/or bits (one exact trace per row gives every sparsity level) so that the "
        "selected layers' total cost meets ONE target, minimising the summed layer errors (a dynamic programme); every "
        "layer may also stay as it is. With a target, --bits and --sparsity take comma-separated candidates "
        "(defaults: flops: densities 0.9^i, i = 1..44, and --nm adds N:M; size: bits 8,4; bops: bits 8,4 and "
        "--nm). The chosen per-layer options are in the summary and in the report's plan (reusable with --plan)")
    t.add_argument("--target-flops", type=float, metavar="F",
                   help="keep at most F of the selected layers' dense MACs (e.g. 0.5: 2x fewer)")
    t.add_argument("--target-size", type=float, metavar="F",
                   help="stored weight bytes at most F of their fp32 bytes (e.g. 0.125: 4 bits on average); implies "
                        "--format qdq (4-bit codes need opset 21: add --opset 21 for older models)")
    t.add_argument("--target-bops", type=float, metavar="F",
                   help="bit operations (MACs x density x weight bits x activation bits; activations count as 8 "
                        "bits unless --act-bits says otherwise) at most F of dense 8-bit weights x 8-bit activations")
    t.add_argument("--allocation-error", choices=["layer", "output"], default="output",
                   help="a variant's error: output = the change of the model's outputs when only that layer is "
                        "swapped in (default: sees which layers matter more; one model run per variant on "
                        "--allocation-samples samples); layer = its relative layer output error on the calibration "
                        "data (free with the solve, but blind to how much a layer matters: on EfficientNet-Lite0 at "
                        "2x fewer FLOPs it kept 0.12 top-1 agreement where output kept 0.62)")
    t.add_argument("--allocation-samples", type=int, default=32, metavar="N",
                   help="calibration samples for --allocation-error output (default 32)")
    t.add_argument("--allocation-search", type=int, default=0, metavar="N",
                   help="after the DP, N trials of a search that perturbs each layer's error weight and keeps the "
                        "allocation whose whole compressed model changes the outputs least (one model run per trial "
                        "on --allocation-samples samples; default 0: the DP alone)")
    t.add_argument("--database", metavar="DIR",
                   help="keep the per-layer compressed variants and their errors in DIR: another target on the same "
                        "model, data and options reuses them (no calibration, no solve)")
    sc = pc.add_argument_group("statistics correction")
    sc.add_argument("--stats-correction", choices=["none", "mean", "affine"], default="none",
                    help="after compression, per output channel of every compressed layer (in topological order): "
                         "mean = shift its mean on the calibration data back to the dense model's (into the bias; "
                         "one is created where there is none), affine = also its standard deviation (into the weight "
                         "or its per-channel quantization scale, exact); default none")
    sc.add_argument("--correction-samples", type=int, default=128, metavar="N",
                    help="calibration samples the correction measures on (default 128)")
    a = pc.add_argument_group("activation quantization (W8A8)")
    a.add_argument("--act-bits", type=int, choices=[8], metavar="8",
                   help="also quantize activations to 8 bits with static per-tensor ranges from the calibration data: "
                        "QuantizeLinear/DequantizeLinear pairs on the inputs of compressed layers (and Conv outputs) "
                        "that ONNX Runtime fuses into QLinearConv / QGemm / MatMulIntegerToFloat; needs --bits 8 (stored as "
                        "symmetric int8), "
                        "implies --format qdq")
    a.add_argument("--act-calib", choices=["minmax", "percentile", "mse", "search"], default="minmax",
                   help="activation range: observed min-max (default), a percentile, the MSE-optimal clipping, or "
                        "search: ranges chosen by the model's output error on calibration samples (ONNX Runtime runs), "
                        "the costliest tensors kept in float until W8A8 is within 2x of the weight-only error (reported)")
    a.add_argument("--act-search-target", type=float, default=2.0, metavar="F",
                   help="--act-calib search: keep the costliest tensors in float while the in-sample W8A8 output error "
                        "exceeds F x the weight-only error (default 2; held-out errors are usually higher, so a "
                        "stricter F such as 1.5 keeps more tensors float for a held-out 2x)")
    a.add_argument("--act-search-samples", type=int, default=64, metavar="N",
                   help="--act-calib search: calibration samples the search measures on (default 64)")
    a.add_argument("--act-search-metric", choices=["logits", "output"], default="logits",
                   help="--act-calib search: the error is taken on the logits behind Softmax/Sigmoid outputs "
                        "(default) or on the outputs themselves (for probability maps that are read as such, "
                        "e.g. a detector's thresholded sigmoid map)")
    a.add_argument("--act-percentile", type=float, default=99.99, metavar="P",
                   help="percentile for --act-calib percentile (default 99.99; the low end uses 100 - P)")
    a.add_argument("--act-bias-correction", action="store_true",
                   help="after placing the activation grids, subtract each layer's mean output shift (W8A8 vs dense, "
                        "per output channel, on the calibration data) from its bias, layer by layer")
    a.add_argument("--act-noise", action="store_true",
                   help="add each quantized layer input's rounding noise (variance scale^2 / 12 per element) to the "
                        "layer's Hessian, so that the solver does not move weight onto inputs the activation grid "
                        "resolves coarsely")
    a.add_argument("--smooth-alpha", type=float, metavar="A",
                   help="SmoothQuant: divide the channels of LayerNorm outputs read by MatMul/Gemm layers by "
                        "max|x|^A / max|w|^(1-A), folded into the LayerNorm, the weights' rows multiplied (e.g. 0.5)")
    x = pc.add_argument_group("output format")
    x.add_argument("--format", choices=["float", "qdq", "matmulnbits"], default="float",
                   help="how quantized weights are stored: float (fake-quantized, default); qdq (integer "
                        "initializers + per-channel DequantizeLinear; 8-bit needs opset >= 13, 2..4-bit are int4/uint4 "
                        "and need opset 21); matmulnbits (MatMul weights as ONNX Runtime's com.microsoft MatMulNBits "
                        "4-bit kernels; other layers stay float unless --qdq is given too)")
    x.add_argument("--qdq", action="store_true", help="same as --format qdq; with --format matmulnbits, store the "
                                                      "non-MatMul layers as qdq")
    x.add_argument("--accuracy-level", type=int, default=0, choices=range(5), metavar="L",
                   help="MatMulNBits accuracy_level: 0 computes in float (default), 4 lets ONNX Runtime quantize "
                        "activations to int8 for speed")
    x.add_argument("--opset", type=int, metavar="N",
                   help="convert the model to this opset first when --qdq needs a newer one (e.g. 21 for int4)")
    x.add_argument("--sparse-storage", action="store_true",
                   help="store pruned weights compactly (bitmask or exact N:M encoding of float or integer codes) with a "
                        "small decode subgraph that ONNX Runtime folds at load time: smaller files, same outputs")
    x.add_argument("--verify", action="store_true",
                   help="before writing, run the dense and the compressed model in ONNX Runtime on calibration "
                        "samples (in-sample: optimistic) and print how well their outputs agree (fails if the new "
                        "graph does not load or run)")
    x.add_argument("--verify-samples", type=int, default=64, metavar="N",
                   help="samples for --verify (default 64; with calibration data at most those calibrated on)")
    x.add_argument("--verify-data", metavar="DATA",
                   help="verify on this held-out .npz (or folder) instead of the calibration samples (implies --verify)")
    _add_executor_arguments(pc.add_argument_group("where the layers are solved"))
    pc.add_argument("--report", metavar="FILE.json", help="write the per-layer report as JSON")
    pc.add_argument("--force", action="store_true", help="overwrite an existing output")
    pc.set_defaults(func=cmd_compress)

    ps = sub.add_parser(
        "sweep", parents=[common], help="compress at several budgets and compare with uniform compression",
        description="Compress MODEL at every budget of ONE --target-* list (a shared variant database: the layers are "
                    "solved once), and uniformly at the same budgets; evaluate each against the dense model on DATA "
                    "and write sweep.md (table), sweep.json and sweep.png (with matplotlib: pip install onnxobc[plot]) "
                    "to --out.",
        epilog="example:\n  onnxobc sweep models/fmnist_cnn.onnx --calib models/fmnist_calib.npz "
               "--data models/fmnist_test.npz --labels label --target-flops 0.7,0.5,0.33 --out sweep_fmnist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps.add_argument("model", help="path of the .onnx model (never modified)")
    ps.add_argument("--calib", required=True, metavar="DATA", help="calibration data (.npz or a folder of them)")
    ps.add_argument("--data", required=True, metavar="DATA", help="held-out evaluation data (.npz or a folder)")
    ps.add_argument("--labels", metavar="KEY", help="label key in DATA: accuracy instead of top-1 agreement")
    ps.add_argument("--out", required=True, metavar="DIR", help="directory for sweep.md, sweep.json and sweep.png")
    ps.add_argument("--samples", type=int, metavar="N", help="calibration samples (default: all)")
    ps.add_argument("--test-samples", type=int, metavar="N", help="evaluation samples (default: all)")
    ps.add_argument("--batch-size", type=int, default=32, metavar="B", help="batch size (default 32)")
    sg = ps.add_argument_group("budgets (one kind)")
    for kind in ("flops", "size", "bops"):
        sg.add_argument(f"--target-{kind}", metavar="F1,F2,...", help=f"{kind} budgets (fractions of dense)")
    sg.add_argument("--no-uniform", action="store_true", help="skip the uniform rows")
    sg.add_argument("--database", metavar="DIR", help="variant database (reused across runs)")
    sg.add_argument("--allocation-error", choices=["layer", "output"], default="output")
    sg.add_argument("--stats-correction", choices=["none", "mean", "affine"], default="none")
    sg.add_argument("--opset", type=int, metavar="N", help="opset for low-bit QDQ storage (e.g. 21)")
    _add_spec_arguments(ps.add_argument_group("per-layer options (candidates with comma-separated lists)"))
    _add_executor_arguments(ps.add_argument_group("where the layers are solved"))
    ps.set_defaults(func=cmd_sweep)
    return p


def _add_executor_arguments(r) -> None:
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: in this process (default); ray: one Ray task per layer, biggest first, a GPU per task "
                        "with --device cuda (pip install onnxobc[ray]); the output is the same byte for byte")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster to use (e.g. 10.0.0.1:6379 or ray://host:10001; implies --executor ray; "
                        "default: a local Ray started for the run)")


def _error(msg: str, code: int) -> None:
    print(f"onnxobc: error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.WARNING),
                        format="onnxobc: %(levelname)s: %(message)s")
    from .errors import OnnxObcError, UsageError

    try:
        return args.func(args)
    except (UsageError, ValueError) as e:
        if args.debug:
            raise
        _error(str(e), EXIT_USAGE)
        return EXIT_USAGE
    except OnnxObcError as e:
        if args.debug:
            raise
        _error(str(e), EXIT_ERROR)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted", EXIT_ERROR)
        return 130
    except BrokenPipeError:  # e.g. `onnxobc inspect model.onnx | head`: the reader left, nothing to report
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter shutdown from failing on flush
        except OSError:
            pass
        return EXIT_OK
    except MemoryError:
        if args.debug:
            raise
        _error("out of memory: use fewer --samples, a smaller --batch-size, or --include to do fewer layers at once", EXIT_ERROR)
        return EXIT_ERROR
    except Exception as e:  # a bug: still no traceback unless --debug, but say how to get one
        if args.debug:
            raise
        _error(f"unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback and please report it)", EXIT_ERROR)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
