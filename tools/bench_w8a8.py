"""W8A8 against 8-bit weight-only, ONNX Runtime's quantize_static and NNCF's quantize, on one model.

    python tools/bench_w8a8.py MODEL.onnx --calib calib.npz --test test.npz [--labels label] [--input x,y]
        [--configs w8,a8_minmax,a8_percentile,a8_mse,a8_search,ort_minmax,ort_percentile,ort_entropy,nncf]
        [--out DIR] [--opset 13] [--samples N] [--extra "ONNXOBC FLAGS" --tag NAME]

(more configs: a8_minmax_bc, a8_search_bc (``--act-bias-correction``), a8_smooth, a8_smooth_bc, a8_smooth_search
(``--smooth-alpha 0.5``), nncf_transformer (NNCF with ``model_type=TRANSFORMER``, its SmoothQuant on),
ort_minmax_layers (ORT with ``op_types_to_quantize`` MatMul / Gemm / Conv, the layers onnxobc quantizes)).
An onnxobc config name may end in ``_auto`` (``--method auto`` instead of ``rtn``) and / or ``_noise``
(``--act-noise``; it changes nothing with ``rtn``, which reads no Hessian), e.g. ``a8_search_bc_auto_noise``.

``--batch-axis NAME=AXIS`` (repeatable, as for ``onnxobc compress``) is passed to onnxobc and used by the ORT and NNCF
readers too: each input is cut along its own batch axis, ``NAME=none`` passes it whole with every batch (a recurrent
state). ``--batch-size`` is the batch of onnxobc's calibration, of the evaluation and of ORT's reader (1 for a model
whose batch is fixed at 1); NNCF reads one sample per item. ``--slice NAME:AXIS:START:STOP`` adds rows for parts of
an output (``onnxobc eval --slice``); every output and slice is kept in results.json.

Every candidate is compared with the input model by ``onnxobc.evaluate`` on the test split (rel L2 of the first
output, top-1 agreement and accuracy where it applies). ORT and NNCF get the model converted to ``--opset`` (ORT's
per-channel QDQ needs 13) and the same calibration samples. NNCF is optional (``pip install nncf``): its rows are
skipped when it does not import. Prints one line per config and adds them to DIR/results.json.
``--extra`` appends flags to every onnxobc config (e.g. ``"--method auto --act-noise"``; a repeated flag's last
value wins) and ``--tag`` names the variant (config ``a8_search_bc`` becomes ``a8_search_bc+TAG`` in the results and
the file names). Models with a token mask (an integer ``attention_mask`` input) also get the rel L2 / cosine over
the real tokens only (``rel_l2_real``), the positions that anything downstream reads.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

ONNXOBC = {
    "w8": ["--bits", "8", "--method", "rtn"],
    "a8_minmax": ["--bits", "8", "--act-bits", "8", "--method", "rtn"],
    "a8_percentile": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--act-calib", "percentile"],
    "a8_mse": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--act-calib", "mse"],
    "a8_search": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--act-calib", "search"],
    "a8_minmax_bc": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--act-bias-correction"],
    "a8_search_bc": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--act-calib", "search",
                     "--act-bias-correction"],
    "a8_smooth": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--smooth-alpha", "0.5"],
    "a8_smooth_bc": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--smooth-alpha", "0.5",
                     "--act-bias-correction"],
    "a8_smooth_search": ["--bits", "8", "--act-bits", "8", "--method", "rtn", "--smooth-alpha", "0.5",
                         "--act-calib", "search"],
}


def _arrays(calib: str, names: list[str]) -> dict:
    data = np.load(calib)
    return {n: data[n] for n in names if n in data.files}


def _feeds(calib: str, names: list[str], batch: int, axes: dict | None = None) -> list[dict]:
    """The calibration arrays cut into feeds of ``batch`` samples, each input along its batch axis (``axes``:
    {name: axis or None}, default 0; None: the input goes whole into every feed)."""
    axes = axes or {}
    xs = _arrays(calib, names)
    cut = {k: axes.get(k, 0) for k in xs}
    n = next(v.shape[a] for k, v in xs.items() if (a := cut[k]) is not None)
    return [{k: v if cut[k] is None else np.take(v, np.arange(i, min(i + batch, n)), axis=cut[k])
             for k, v in xs.items()} for i in range(0, n, batch)]


def _reader(calib: str, names: list[str], batch: int, axes: dict | None = None):
    from onnxruntime.quantization import CalibrationDataReader

    feeds = _feeds(calib, names, batch, axes)

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    return R()


def _ort(src: Path, calib: str, out: Path, method: str, name: list[str], layers_only: bool = False,
         batch: int = 16, axes: dict | None = None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _reader(calib, name, batch, axes), quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[method],
                    # layers_only: the layers onnxobc quantizes, as onnxobc does (ORT's default also quantizes
                    # Add, Mul, Softmax, LayerNorm... inputs where it has QDQ support)
                    **({"op_types_to_quantize": ["MatMul", "Gemm", "Conv"]} if layers_only else {}))


def _nncf(src: Path, calib: str, out: Path, name: list[str], transformer: bool = False,
          axes: dict | None = None) -> None:
    import nncf

    feeds = _feeds(calib, name, 1, axes)
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    q = nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds), subset_size=len(feeds), **kw)
    onnx.save(q, str(out))


def _onnxobc_flags(cfg: str) -> list[str] | None:
    """The compress flags of an onnxobc config: a name of ONNXOBC, optionally ending in _auto and / or _noise."""
    base, auto, noise = cfg, False, False
    while base not in ONNXOBC:
        if base.endswith("_noise"):
            base, noise = base.removesuffix("_noise"), True
        elif base.endswith("_auto"):
            base, auto = base.removesuffix("_auto"), True
        else:
            return None
    flags = list(ONNXOBC[base])
    if auto:
        flags[flags.index("rtn")] = "auto"
    return flags + (["--act-noise"] if noise else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--labels")
    ap.add_argument("--input", default=None, help="the model's input names, comma-separated (for the ORT / NNCF "
                    "readers; default: every graph input found in the calibration file)")
    ap.add_argument("--configs", default="w8,a8_minmax,a8_percentile,a8_mse,a8_search,ort_minmax,ort_percentile,"
                    "ort_entropy,nncf", help="any of " + ", ".join(list(ONNXOBC) + ["ort_minmax", "ort_percentile", "ort_entropy", "nncf",
                                                               "nncf_transformer", "ort_minmax_layers"]))
    ap.add_argument("--samples", type=int, default=None, help="calibration samples for onnxobc (default: all)")
    ap.add_argument("--out", default=".cache/bench_w8a8")
    ap.add_argument("--opset", type=int, default=13)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-axis", action="append", default=[], metavar="NAME=AXIS")
    ap.add_argument("--slice", action="append", default=[], metavar="NAME:AXIS:START:STOP")
    ap.add_argument("--extra", default="", help="more onnxobc compress flags for every onnxobc config (one string)")
    ap.add_argument("--tag", default=None, help="suffix of the config names with --extra (default: the flags)")
    args = ap.parse_args()

    from onnxobc.calibrate.data import parse_batch_axes
    from onnxobc.cli import main as cli
    from onnxobc.evaluate import evaluate

    axes = parse_batch_axes(args.batch_axis)
    ba = [x for a in args.batch_axis for x in ("--batch-axis", a)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    converted = out / f"{model.stem}.opset{args.opset}.onnx"
    m = onnx.load(str(model))
    if next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < args.opset:
        m = onnx.version_converter.convert_version(m, args.opset)
    onnx.save(m, str(converted))
    inputs = args.input.split(",") if args.input else [i.name for i in m.graph.input]
    results = {}
    extra = args.extra.split()
    tag = (args.tag or "".join(extra).replace("--", "_").strip("_")) if extra else None
    for cfg in args.configs.split(","):
        key = cfg if tag is None or _onnxobc_flags(cfg) is None else f"{cfg}+{tag}"
        cand = out / f"{model.stem}.{key.replace('+', '.')}.onnx"
        t = time.perf_counter()
        try:
            if _onnxobc_flags(cfg) is not None:
                rc = cli(["compress", str(model), "--calib", args.calib, "--opset", str(args.opset), "-o", str(cand),
                          "--force", "-q", "--no-layer-error", "--batch-size", str(args.batch_size),
                          "--report", str(cand.with_suffix(".report.json"))] + ba
                         + _onnxobc_flags(cfg) + extra + ([] if args.samples is None else ["--samples", str(args.samples)]))
                if rc:
                    raise RuntimeError(f"onnxobc exit {rc}")
            elif cfg.startswith("ort_"):
                _ort(converted, args.calib, cand, cfg[4:].removesuffix("_layers"), inputs,
                     layers_only=cfg.endswith("_layers"), batch=args.batch_size, axes=axes)
            elif cfg in ("nncf", "nncf_transformer"):
                _nncf(converted, args.calib, cand, inputs, transformer=cfg == "nncf_transformer", axes=axes)
            else:
                raise ValueError(f"unknown config {cfg}")
        except ImportError as e:
            print(f"{key:16s} skipped ({e})")
            continue
        except Exception as e:  # noqa: BLE001 -- ORT's or NNCF's own failure on this model is a result
            if _onnxobc_flags(cfg) is not None:
                raise
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
            print(f"{key:16s} failed ({msg})", flush=True)
            results[key] = {"error": msg}
            continue
        secs = time.perf_counter() - t
        res = evaluate(str(model), str(cand), args.test, labels=args.labels, latency_runs=0,
                       batch_size=args.batch_size, batch_axes=axes or None, slices=args.slice or None)
        o = res.outputs[0]
        real = next((r for r in res.outputs if r.name == f"{o.name}[real tokens]"), None)
        results[key] = {"rel_l2": o.rel_l2, "top1": o.top1, "acc_ref": o.acc_ref, "acc_cand": o.acc_cand,
                        "cosine": o.cosine, "seconds": secs, "samples": res.samples,
                        "outputs": {x.name: x.rel_l2 for x in res.outputs},
                        **({} if real is None else {"rel_l2_real": real.rel_l2, "cosine_real": real.cosine})}
        line = "" if o.top1 is None else f"  top-1 agreement {o.top1:.4f}  acc {o.acc_cand}"
        line += "" if o.cosine is None else f"  cosine {o.cosine:.5f}"
        line += "".join(f"  {x.name} {x.rel_l2:.4f}" for x in res.outputs[1:] if x is not real)
        line += "" if real is None else f"  real tokens: rel L2 {real.rel_l2:.4f} cosine {real.cosine:.5f}"
        print(f"{key:16s} rel L2 {o.rel_l2:.4f}{line}  ({secs:.1f} s)", flush=True)
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **results}, indent=2))  # configs run separately accumulate


if __name__ == "__main__":
    main()
