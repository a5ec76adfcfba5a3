"""The LSTM of a real OCR recogniser: ddddocr's ``common.onnx`` (the "beta" model of the ddddocr wheel: a CNN, one
bidirectional LSTM of hidden 512 whose W and R hold 4.2M of its 13.5M parameters, and an 8210-class Gemm per
step, read by CTC).

Renders captcha-like text images (random 4-6 letters and digits in DejaVu fonts, jittered, with noise lines and
dots, 64 x 160 grey as ddddocr feeds them), checks that the dense model reads them, then compresses only the LSTM
(``--include LSTM``) with each setting and reports, on the test images: the output's rel L2 against the dense
model, how many decoded strings equal the dense model's, and the accuracy against the rendered text.

    pip download --no-deps ddddocr==1.6.1 -d /tmp/dd && unzip -q /tmp/dd/ddddocr-*.whl -d /tmp/dd/x
    python tools/ocr_lstm_bench.py /tmp/dd/x/ddddocr --out /tmp/ocr_lstm [--settings exact50,mag50,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SETTINGS = {
    "exact50": ("50% exact", ["--sparsity", "0.5"]),
    "sparsegpt50": ("50% sparsegpt", ["--sparsity", "0.5", "--method", "sparsegpt"]),
    "mag50": ("50% magnitude", ["--sparsity", "0.5", "--method", "magnitude"]),
    "obq4": ("4-bit exact (OBQ)", ["--bits", "4"]),
    "gptq4": ("4-bit gptq", ["--bits", "4", "--method", "gptq"]),
    "rtn4": ("4-bit rtn", ["--bits", "4", "--method", "rtn"]),
    "obq4qdq": ("4-bit exact, QDQ", ["--bits", "4", "--format", "qdq", "--opset", "21"]),
}
ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
         "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"]


def render(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = [f for f in FONTS if os.path.exists(f)]
    images, texts = [], []
    for _ in range(n):
        text = "".join(rng.choice(list(ALPHABET), size=int(rng.integers(4, 7))))
        bg = int(rng.integers(200, 256))
        img = Image.new("L", (160, 64), bg)
        d = ImageDraw.Draw(img)
        font = ImageFont.truetype(str(rng.choice(fonts)), int(rng.integers(30, 38)))
        x = int(rng.integers(4, 14))
        for ch in text:
            y = int(rng.integers(4, 16))
            d.text((x, y), ch, fill=int(rng.integers(0, 90)), font=font)
            x += int(font.getlength(ch)) + int(rng.integers(-2, 3))
        for _ in range(int(rng.integers(1, 4))):  # noise lines
            d.line([tuple(int(v) for v in rng.integers(0, [160, 64])) for _ in range(2)],
                   fill=int(rng.integers(60, 180)), width=1)
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0, 6, arr.shape)  # sensor noise
        images.append(np.clip(arr, 0, 255) / 255.0)
        texts.append(text)
    return np.stack(images)[:, None].astype(np.float32), texts


def decode(out: np.ndarray, charset: list[str]) -> str:
    idx = np.argmax(out[:, 0, :], axis=1)
    s, prev = [], -1
    for i in idx:
        if i != prev and i != 0:
            s.append(charset[i] if i < len(charset) else "")
        prev = i
    return "".join(s)


def run_all(sess, x):
    return [sess.run(None, {"input1": x[i:i + 1]})[0] for i in range(len(x))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pkg", help="the unpacked ddddocr package directory (holds common.onnx and charsets.py)")
    ap.add_argument("--out", default="/tmp/ocr_lstm")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args()
    import onnxruntime as ort

    sys.path.insert(0, args.pkg)
    from charsets import CHARSET_BETA  # noqa: E402  (the wheel's own module, read for the label table)

    os.makedirs(args.out, exist_ok=True)
    model = os.path.join(args.pkg, "common.onnx")
    xc, _ = render(args.calib, seed=1)
    xt, truth = render(args.test, seed=2)
    calib = os.path.join(args.out, "calib.npz")
    np.savez(calib, input1=xc)
    np.savez(os.path.join(args.out, "test.npz"), input1=xt)  # for onnxobc eval (--batch-axis input1=0 --batch-size 1)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    dense_out = run_all(ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]), xt)
    dense_txt = [decode(o, CHARSET_BETA) for o in dense_out]
    acc_dense = np.mean([a.lower() == b.lower() for a, b in zip(dense_txt, truth)])
    print(f"dense: {acc_dense:.3f} of {len(truth)} test images read exactly (case-insensitive); "
          f"e.g. {list(zip(truth[:4], dense_txt[:4]))}")
    rows = []
    for key in args.settings.split(","):
        label, opts = SETTINGS[key]
        out = os.path.join(args.out, f"{key}.onnx")
        rep = out + ".json"
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "onnxobc", "compress", model, "-o", out, "--calib", calib,
                            "--include", "LSTM", "--report", rep, "-q", "--force",
                            "--batch-axis", "input1=0", "--batch-size", "1"] + opts, capture_output=True,
                           text=True)
        if r.returncode:
            sys.exit(f"{key} failed: {r.stderr[-1500:]}")
        secs = time.time() - t
        with open(rep) as f:
            errs = {l["name"]: l["error"] for l in json.load(f)["layers"]}
        got = run_all(ort.InferenceSession(out, so, providers=["CPUExecutionProvider"]), xt)
        num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(got, dense_out))
        den = sum(float(np.sum(b ** 2)) for b in dense_out)
        txt = [decode(o, CHARSET_BETA) for o in got]
        same = np.mean([a == b for a, b in zip(txt, dense_txt)])
        acc = np.mean([a.lower() == b.lower() for a, b in zip(txt, truth)])
        row = [label, *(f"{errs[k]:.4f}" for k in sorted(errs)), f"{np.sqrt(num / den):.4f}", f"{same:.3f}",
               f"{acc:.3f}", f"{os.path.getsize(out) / 2 ** 20:.1f} MB", f"{secs:.0f}"]
        print(" | ".join(row), flush=True)
        rows.append(row)
    names = sorted(errs)
    print(f"\n(dense: accuracy {acc_dense:.3f}, {os.path.getsize(model) / 2 ** 20:.1f} MB)")
    head = ["setting", *(f"{n} err" for n in names), "logits rel L2", "same text as dense", "acc", "size", "s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
