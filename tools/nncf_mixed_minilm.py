"""NNCF's mixed-precision weight compression (``nncf.compress_weights``: INT4_ASYM primary, INT8_ASYM backup,
``ratio`` = share of the weights at 4 bits, chosen per layer by a sensitivity metric) on MiniLM's MatMuls, for
the comparison with onnxobc's size targets (issue 10). The embedding tables (Gather) are left float, as
onnxobc leaves them, and ``all_layers=True`` lets the last MatMul take 4 bits too. Run it in a venv with NNCF
(never the shared environment):

    python -m venv /tmp/nncfenv --system-site-packages && /tmp/nncfenv/bin/pip install nncf
    /tmp/nncfenv/bin/python tools/nncf_mixed_minilm.py --models-dir /work/cache/models --out /tmp/nncf \
        --ratios 0.4,0.7 --metrics hessian_input_activation,weight_quantization_error [--group-size 32]

Then measure with tools/weight_bytes.py (size fraction) and tools/minilm_pooled_cosine.py (quality).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _pack_zero_points(model: onnx.ModelProto) -> None:
    """NNCF (3.4) writes group-wise 4-bit weights as com.microsoft MatMulNBits with one uint8 per zero point
    ([N, blocks]); ONNX Runtime wants them packed two per byte ([N, ceil(blocks / 2)], low nibble first) and
    refuses the model otherwise ("zero_points initializer shape {384,12} does not match ... [384,6]"). NNCF also
    passes the bias to MatMulNBits while keeping the model's bias Add: the bias input is dropped here."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" and len(n.input) >= 6 and n.input[5] and any(
                n.output[0] in c.input and n.input[5] in c.input for c in model.graph.node if c.op_type == "Add"):
            del n.input[4:]  # NNCF also fused the bias into MatMulNBits and kept the Add: it was added twice
        bits = next((a.i for a in n.attribute if a.name == "bits"), None)
        if n.op_type != "MatMulNBits" or bits != 4 or len(n.input) < 4 or n.input[3] not in inits:
            continue
        t = inits[n.input[3]]
        z = numpy_helper.to_array(t)
        if t.data_type != onnx.TensorProto.UINT8 or z.ndim != 2 or z.max() > 15:
            continue
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), z.dtype)], 1)
        t.CopyFrom(numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8), t.name))


def main(argv=None) -> int:
    import nncf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=Path(".cache/models"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratios", default="0.4,0.7")
    ap.add_argument("--metrics", default="hessian_input_activation,weight_quantization_error")
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--gptq", action="store_true", help="NNCF's GPTQ for the 4-bit layers (data-aware)")
    ap.add_argument("--awq", action="store_true")
    ap.add_argument("--scale-estimation", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    calib = np.load(args.models_dir / "minilm_calib.npz")
    items = [{k: calib[k][i:i + 1] for k in INPUTS if k in calib.files} for i in range(args.samples)]
    dataset = nncf.Dataset(items)
    for metric in args.metrics.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            model = onnx.load(args.models_dir / "minilm.onnx")
            t = time.perf_counter()
            out = nncf.compress_weights(
                model, mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=ratio, group_size=args.group_size,
                all_layers=True, ignored_scope=nncf.IgnoredScope(types=["Gather"]),
                dataset=None if metric == "weight_quantization_error" else dataset,
                sensitivity_metric=nncf.SensitivityMetric(metric), subset_size=args.samples,
                backup_mode=nncf.BackupMode.INT8_ASYM, gptq=args.gptq or None, awq=args.awq or None,
                scale_estimation=args.scale_estimation or None)
            dt = time.perf_counter() - t
            for o in out.opset_import:  # NNCF writes uint4 DequantizeLinear into the opset-18 graph: ORT rejects
                if o.domain in ("", "ai.onnx") and o.version < 21:  # it ("tensor(uint4) ... is invalid") below 21
                    o.version = 21
            _pack_zero_points(out)
            g = "" if args.group_size < 0 else f"_g{args.group_size}"
            g += "".join(f"_{k}" for k in ("gptq", "awq", "scale_estimation") if getattr(args, k))
            path = args.out / f"nncf_{metric}_r{ratio:g}{g}.onnx"
            onnx.save(out, path)
            print(f"{path}: {dt:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
