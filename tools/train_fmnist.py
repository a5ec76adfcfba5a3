#!/usr/bin/env python3
"""Train and export the small embedded default model of onnxobc.

Trains a small CNN on Fashion-MNIST (CPU, a few minutes on 2 cores) and writes:

* ``fmnist_cnn.onnx``   -- opset 17, input ``image`` uint8 [N,1,28,28], output
  ``logits`` float32 [N,10]; the graph itself casts to float and normalises, so
  deployment feeds raw uint8 pixels.
* ``fmnist_calib.npz``  -- ``image``: 512 uint8 images drawn (seeded) from the
  TRAIN split, for calibration.
* ``fmnist_test.npz``   -- ``image``: the first 5000 uint8 images of the t10k
  split and ``label``: their int64 labels, for evaluation.
* ``README.md``         -- description of the above.

The network deliberately exercises every op kind the compressor handles:
a regular Conv, a strided Conv, a depthwise Conv (group=32), a 1x1 Conv, a
Gemm (nn.Linear) and a MatMul whose B input is a constant initializer.

Torch is needed by this script only; onnxobc itself does not depend on it.

Data: ``apt-get install dataset-fashion-mnist`` (Debian) provides
/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "models"

LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Pixel statistics of the Fashion-MNIST training split (on the [0, 1] scale).
MEAN = 0.2860
STD = 0.3530

N_CALIB = 512
N_TEST = 5000


# --------------------------------------------------------------------------- data


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzip-compressed IDX file (the MNIST format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX data, got type 0x{dtype_code:02x}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {np.prod(dims)} values, found {arr.size}")
    return arr.reshape(dims).copy()


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,1,28,28], labels int64 [N]) for split 'train' or 't10k'."""
    img_path = data_dir / f"{split}-images-idx3-ubyte.gz"
    lbl_path = data_dir / f"{split}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        sys.exit(
            "error: Fashion-MNIST data not found: "
            + ", ".join(missing)
            + "\n  On Debian/Ubuntu install it with:\n"
            "    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
            "  or pass --data-dir pointing at a folder holding the four *-ubyte.gz files\n"
            "  from https://github.com/zalandoresearch/fashion-mnist"
        )
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(f"unexpected shapes {images.shape} / {labels.shape} in {data_dir}")
    return images[:, None, :, :], labels


# --------------------------------------------------------------------------- model


def build_model():
    import torch
    from torch import nn

    def conv_bn_relu(cin, cout, k, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class FmnistCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # uint8 -> float, /255, (x - MEAN) / STD folded into one scale and shift
            # (buffers, so the exporter stores them as scalar initializers, not Constant nodes)
            self.register_buffer("in_scale", torch.tensor(1.0 / (255.0 * STD)))
            self.register_buffer("in_shift", torch.tensor(-MEAN / STD))
            self.conv1 = conv_bn_relu(1, 16, 3)                 # 28x28, regular Conv
            self.conv2 = conv_bn_relu(16, 32, 3, stride=2)      # 14x14, strided Conv
            self.conv3 = conv_bn_relu(32, 32, 3, groups=32)     # 14x14, depthwise Conv
            self.conv4 = conv_bn_relu(32, 64, 1)                # 14x14, pointwise 1x1 Conv
            self.conv5 = conv_bn_relu(64, 64, 3, stride=2)      # 7x7,   fan-in 64*3*3 = 576
            # 7x7 -> 3x3 with overlapping windows (rows/cols 0-2, 2-4, 4-6): covers every pixel
            self.pool = nn.AvgPool2d(kernel_size=3, stride=2)
            self.fc1 = nn.Linear(64 * 3 * 3, 128)              # exported as Gemm, K = 576
            self.relu = nn.ReLU(inplace=True)
            # plain parameter used as x @ W2 + b2 -> MatMul with constant B [128, 10] + Add
            self.w2 = nn.Parameter(torch.empty(128, 10))
            self.b2 = nn.Parameter(torch.zeros(10))
            nn.init.kaiming_uniform_(self.w2.T, a=5 ** 0.5)  # same init as nn.Linear
            bound = 1.0 / 128 ** 0.5
            nn.init.uniform_(self.b2, -bound, bound)

        def forward(self, image):
            x = image.float() * self.in_scale + self.in_shift
            x = self.conv1(x)
            x = self.conv2(x)
            x = self.conv3(x)
            x = self.conv4(x)
            x = self.conv5(x)
            x = self.pool(x)
            x = torch.flatten(x, 1)
            x = self.relu(self.fc1(x))
            return x @ self.w2 + self.b2

    return FmnistCNN()


# --------------------------------------------------------------------------- training


def set_seeds(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def predict_torch(model, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            outs.append(model(torch.from_numpy(images[i: i + batch])).numpy())
    return np.concatenate(outs)


def train(model, x_train: np.ndarray, y_train: np.ndarray, epochs: int, seed: int,
          batch_size: int, lr: float, augment: bool, log=print) -> float:
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    n = len(xt)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot_loss, tot_correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size: (step + 1) * batch_size]
            xb, yb = xt[idx], yt[idx]
            if augment:  # random horizontal flip of half the batch
                flip = torch.rand(len(xb), generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(yb)
            tot_correct += int((logits.argmax(1) == yb).sum())
        log(f"epoch {epoch + 1}/{epochs}: loss {tot_loss / n:.4f}  "
            f"train acc {tot_correct / n:.4f}  ({time.time() - t0:.0f}s)")
    return time.time() - t0


# --------------------------------------------------------------------------- export


def _export(model, dummy, path: Path) -> None:
    import torch

    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=17,
        do_constant_folding=True,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )


def export_onnx(model, path: Path, seed: int, epochs: int, torch_acc: float) -> None:
    import onnx
    import torch

    model.eval()
    dummy = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    tmp = path.with_name(path.name + ".tmp.onnx")
    with warnings.catch_warnings():
        # dynamo=False is deliberate: the legacy exporter folds BN and emits plain Gemm/MatMul
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _export(model, dummy, tmp)
    m = onnx.load(str(tmp))
    tmp.unlink()
    _name_folded_conv_initializers(m)
    m.doc_string = (
        "Small Fashion-MNIST CNN, the embedded default model of onnxobc. "
        "Input 'image': raw uint8 pixels [N,1,28,28] (0 = background); the graph casts "
        "to float and normalises. Output 'logits': float32 [N,10], class order as in "
        "metadata 'labels'."
    )
    props = {
        "labels": json.dumps(LABELS),
        "source": (
            f"Trained from scratch with tools/train_fmnist.py (torch {torch.__version__}, "
            f"AdamW + OneCycle, {epochs} epochs, seed {seed}) on the 60k Fashion-MNIST train "
            f"split; exported with torch.onnx.export(dynamo=False, opset 17), BatchNorm folded."
        ),
        "dataset": "Fashion-MNIST (Zalando Research, MIT license), "
                   "https://github.com/zalandoresearch/fashion-mnist",
        "input_normalization": json.dumps({"scale": 255.0, "mean": MEAN, "std": STD}),
        "torch_test_accuracy_5000": f"{torch_acc:.4f}",
    }
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def _name_folded_conv_initializers(m) -> None:
    """Give the BN-folded Conv weights readable names.

    The exporter stores the folded Conv weight/bias as anonymous initializers
    ('onnx::Conv_62'); rename them '<layer>.weight' / '<layer>.bias' after the
    node name '/conv1/conv1.0/Conv' -> 'conv1'.
    """
    inits = {t.name: t for t in m.graph.initializer}
    users: dict[str, int] = {}
    for node in m.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    for node in m.graph.node:
        if node.op_type != "Conv":
            continue
        layer = node.name.strip("/").split("/")[0]
        for pos, suffix in ((1, "weight"), (2, "bias")):
            if pos >= len(node.input):
                continue
            old, new = node.input[pos], f"{layer}.{suffix}"
            if old not in inits or users[old] != 1 or new in inits or not old.startswith("onnx::"):
                continue
            inits[old].name = new
            node.input[pos] = new
            inits[new] = inits.pop(old)


def describe_graph(path: Path) -> list[dict]:
    """Return one row per node: op type, name, weight shape (initializer input), group."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    rows = []
    for node in m.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w_shape = None
        const_inputs = [i for i in node.input if i in inits]
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            w_shape = list(inits[node.input[1]].shape)
        elif const_inputs:
            w_shape = list(inits[const_inputs[0]].shape)
        extra = ""
        if node.op_type == "Conv":
            extra = (f"group={attrs.get('group', 1)} strides={list(attrs.get('strides', [1, 1]))} "
                     f"pads={list(attrs.get('pads', [0, 0, 0, 0]))}")
        elif node.op_type == "Gemm":
            extra = f"transB={attrs.get('transB', 0)}"
        elif node.op_type == "AveragePool":
            extra = f"kernel={list(attrs['kernel_shape'])} strides={list(attrs.get('strides', []))}"
        rows.append({
            "op": node.op_type,
            "name": node.name,
            "inputs": list(node.input),
            "weight_shape": w_shape,
            "weight_is_initializer": bool(len(node.input) > 1 and node.input[1] in inits),
            "group": attrs.get("group") if node.op_type == "Conv" else None,
            "extra": extra,
        })
    return rows


def verify_graph(rows: list[dict]) -> list[str]:
    """Check the graph has every op kind the compressor handles; return problems."""
    problems = []
    convs = [r for r in rows if r["op"] == "Conv"]
    if not convs or not all(r["weight_is_initializer"] for r in convs):
        problems.append("expected Conv nodes with initializer weights")
    if not any(r["group"] and r["group"] > 1 and r["group"] == r["weight_shape"][0] for r in convs):
        problems.append("no depthwise Conv (group == Cout)")
    if not any("strides=[2, 2]" in r["extra"] for r in convs):
        problems.append("no strided Conv")
    if not any(r["weight_shape"][2:] == [1, 1] for r in convs):
        problems.append("no 1x1 Conv")
    if not any(r["weight_shape"][2:] == [3, 3] and (r["group"] or 1) == 1 for r in convs):
        problems.append("no regular 3x3 Conv")
    gemms = [r for r in rows if r["op"] == "Gemm"]
    if len(gemms) != 1 or not gemms[0]["weight_is_initializer"]:
        problems.append(f"expected exactly one Gemm with constant B, got {len(gemms)}")
    mms = [r for r in rows if r["op"] == "MatMul"]
    if len(mms) != 1 or not mms[0]["weight_is_initializer"]:
        problems.append(f"expected exactly one MatMul with constant B, got {len(mms)}")
    if any(r["op"] == "Transpose" for r in rows):
        problems.append("unexpected Transpose node in the graph")
    if any(r["op"] == "BatchNormalization" for r in rows):
        problems.append("BatchNormalization was not folded")
    return problems


def predict_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"image": images[i: i + 1000]})[0]
                           for i in range(0, len(images), 1000)])


# --------------------------------------------------------------------------- README


def fmt_size(n: int) -> str:
    return f"{n:,} bytes ({n / 1024:.0f} KiB)" if n < 1024 * 1024 else f"{n:,} bytes ({n / 2**20:.2f} MiB)"


def write_readme(out_dir: Path, rows: list[dict], n_params: int, torch_acc: float, onnx_acc: float,
                 onnx_acc_full: float, agree: float, max_diff: float, args) -> str:
    import torch

    conv_lines = []
    for r in rows:
        w = r["weight_shape"]
        ws = "-" if w is None else ("scalar" if w == [] else "x".join(map(str, w)))
        conv_lines.append(f"| {r['op']} | `{r['name']}` | {ws} | {r['extra'] or '-'} |")
    sizes = {f: (out_dir / f).stat().st_size
             for f in ("fmnist_cnn.onnx", "fmnist_calib.npz", "fmnist_test.npz")}
    text = f"""# Embedded default model: Fashion-MNIST CNN

`fmnist_cnn.onnx` is a small CNN trained from scratch on Fashion-MNIST. It is the
default model of onnxobc's examples and tests: it is small enough to compress in
seconds yet exercises every op kind the compressor handles (regular, strided,
depthwise and 1x1 Conv, Gemm, and MatMul with a constant B).

## Files

| file | content | size |
|---|---|---|
| `fmnist_cnn.onnx` | the model (opset 17) | {fmt_size(sizes['fmnist_cnn.onnx'])} |
| `fmnist_calib.npz` | `image`: {N_CALIB} uint8 images [{N_CALIB},1,28,28], seeded random draw from the TRAIN split | {fmt_size(sizes['fmnist_calib.npz'])} |
| `fmnist_test.npz` | `image`: uint8 [{N_TEST},1,28,28], `label`: int64 [{N_TEST}] -- the first {N_TEST} images of the t10k (test) split | {fmt_size(sizes['fmnist_test.npz'])} |

Calibration and test data are disjoint by construction (different splits).

## Interface

* input `image`: **uint8** [N,1,28,28], raw pixels as stored in Fashion-MNIST (dynamic batch N).
  The graph itself does Cast to float, `/255` and normalisation (mean {MEAN}, std {STD}),
  folded into one Mul and one Add.
* output `logits`: float32 [N,10]. Class order (also in the model's metadata key `labels`):
  {", ".join(f"{i} {c}" for i, c in enumerate(LABELS))}.

## Architecture

```
image uint8 [N,1,28,28] -> Cast -> Mul -> Add                     (normalise)
conv1  Conv 1->16   3x3 pad 1              + BN + ReLU   28x28   regular Conv
conv2  Conv 16->32  3x3 stride 2 pad 1     + BN + ReLU   14x14   strided Conv
conv3  Conv 32->32  3x3 pad 1 group 32     + BN + ReLU   14x14   depthwise Conv
conv4  Conv 32->64  1x1                    + BN + ReLU   14x14   pointwise Conv
conv5  Conv 64->64  3x3 stride 2 pad 1     + BN + ReLU   7x7
AveragePool 3x3 stride 2                                   3x3
Flatten -> 576
fc1    Gemm 576->128 (nn.Linear, transB=1)  + ReLU
fc2    MatMul x @ W2, W2 constant [128,10]  + Add b2
```

BatchNorm is folded into the Conv weights and biases by the exporter. Largest fan-in
(Cin*kh*kw or K) is 576 (conv5 and fc1). Parameters: {n_params:,} (after BN folding, including biases).

## ONNX graph

| op | name | weight (B) shape | attributes |
|---|---|---|---|
{chr(10).join(conv_lines)}

## Accuracy

| | test accuracy |
|---|---|
| torch (eval), first {N_TEST} of t10k (`fmnist_test.npz`) | {torch_acc:.4f} |
| ONNX Runtime (CPU), first {N_TEST} of t10k (`fmnist_test.npz`) | {onnx_acc:.4f} |
| ONNX Runtime (CPU), full 10000 t10k | {onnx_acc_full:.4f} |

torch and ONNX Runtime agree on {agree * 100:.2f}% of the argmax predictions on the
{N_TEST}-image split; max |logit difference| = {max_diff:.2e}.

## Training and regeneration

Trained with AdamW (peak lr {args.lr:g}, weight decay 1e-4, OneCycle schedule, batch
{args.batch_size}), {args.epochs} epochs, {"random horizontal flips" if args.augment else "no augmentation"}, seed {args.seed}, on the 60,000-image train split
(torch {torch.__version__}, CPU, 2 threads). To regenerate all four files:

```
sudo apt-get install dataset-fashion-mnist   # Debian/Ubuntu; or pass --data-dir
python tools/train_fmnist.py                 # --epochs, --seed, --out-dir, --data-dir
```

Torch is needed by this script only, not by onnxobc.

## Data provenance

Fashion-MNIST, by Zalando Research (Han Xiao, Kashif Rasul, Roland Vollgraf,
"Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms",
arXiv:1708.07747), <https://github.com/zalandoresearch/fashion-mnist>.
Copyright (c) 2017 Zalando SE, released under the MIT license. The images were read from
the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). The
subsets in `fmnist_calib.npz` and `fmnist_test.npz` are redistributed under the same
MIT license.
"""
    (out_dir / "README.md").write_text(text)
    return text


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Train the small Fashion-MNIST CNN and export the embedded default "
                    "model (fmnist_cnn.onnx), calibration and test data, and README.md.")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                    help=f"output folder (default: {DEFAULT_OUT_DIR})")
    ap.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR),
                    help=f"folder with the Fashion-MNIST *-ubyte.gz files (default: {DEFAULT_DATA_DIR}, "
                         "from the Debian package dataset-fashion-mnist)")
    ap.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    ap.add_argument("--lr", type=float, default=6e-3, help="peak learning rate (default: 6e-3)")
    ap.add_argument("--augment", action="store_true",
                    help="random horizontal flips (off by default: no gain in 3 epochs)")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        sys.exit("error: this script needs torch (CPU build is enough): pip install torch")
    torch.set_num_threads(2)
    set_seeds(args.seed)

    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "t10k")
    print(f"data: train {x_train.shape}, test {x_test.shape} from {args.data_dir}")

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    # Calibration (train split, seeded) and test (first N_TEST of t10k) data.
    rng = np.random.default_rng(args.seed)
    calib_idx = np.sort(rng.choice(len(x_train), size=N_CALIB, replace=False))
    calib = np.ascontiguousarray(x_train[calib_idx], dtype=np.uint8)
    test_x = np.ascontiguousarray(x_test[:N_TEST], dtype=np.uint8)
    test_y = y_test[:N_TEST].astype(np.int64)
    np.savez_compressed(out_dir / "fmnist_calib.npz", image=calib)
    np.savez_compressed(out_dir / "fmnist_test.npz", image=test_x, label=test_y)

    model = build_model()
    train_s = train(model, x_train, y_train, args.epochs, args.seed, args.batch_size, args.lr,
                    augment=args.augment)
    print(f"training time: {train_s:.1f}s")

    torch_logits = predict_torch(model, test_x)
    torch_acc = float((torch_logits.argmax(1) == test_y).mean())
    torch_acc_full = float((predict_torch(model, x_test).argmax(1) == y_test).mean())
    print(f"torch test accuracy: {torch_acc:.4f} (first {N_TEST}), {torch_acc_full:.4f} (all 10000)")

    onnx_path = out_dir / "fmnist_cnn.onnx"
    export_onnx(model, onnx_path, args.seed, args.epochs, torch_acc)
    rows = describe_graph(onnx_path)
    print("ONNX graph:")
    for r in rows:
        print(f"  {r['op']:<12} {r['name']:<28} weight={r['weight_shape']} {r['extra']}")
    problems = verify_graph(rows)
    if problems:
        for p in problems:
            print("error: exported graph:", p, file=sys.stderr)
        return 1

    onnx_logits = predict_onnx(onnx_path, test_x)
    onnx_acc = float((onnx_logits.argmax(1) == test_y).mean())
    onnx_acc_full = float((predict_onnx(onnx_path, x_test).argmax(1) == y_test).mean())
    agree = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean())
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    print(f"ONNX test accuracy: {onnx_acc:.4f} (first {N_TEST}), {onnx_acc_full:.4f} (all 10000); "
          f"argmax agreement with torch {agree:.4f}, max |logit diff| {max_diff:.2e}")
    if abs(onnx_acc - torch_acc) > 1e-3 or max_diff > 1e-3:
        print("error: ONNX Runtime output does not match torch", file=sys.stderr)
        return 1

    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(onnx_path))
    n_params = int(sum(numpy_helper.to_array(t).size for t in m.graph.initializer
                       if numpy_helper.to_array(t).size > 1))
    text = write_readme(out_dir, rows, n_params, torch_acc, onnx_acc, onnx_acc_full, agree,
                        max_diff, args)
    print()
    print(text)
    for f in ("fmnist_cnn.onnx", "fmnist_calib.npz", "fmnist_test.npz", "README.md"):
        print(f"{f}: {fmt_size((out_dir / f).stat().st_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
