"""Build small trained recurrent models for measuring LSTM / GRU compression (issue 13).

No model shipped in the prepared wild set holds an LSTM or GRU, so this trains two on a synthetic but structured
sequence task and exports them with torch.onnx (CPU, about a minute each on 2 cores):

- ``lstm_cls.onnx``: a 2-layer bidirectional LSTM (hidden 64) over 8-D sequences of 32 steps, mean-pooled over
  time, Gemm to 10 classes;
- ``gru_enc.onnx``: a 1-layer bidirectional GRU encoder (hidden 96) with a per-step linear read-out (a
  sequence-to-sequence regression: the clean trajectory from the noisy one).

The task: each class is a smooth random trajectory in 8-D (sums of a few sinusoids); a sample is its class
template, randomly time-warped, scaled and shifted, with noise (std 0.8). Writes the models, ``calib.npz`` (256 samples),
``test.npz`` (512 samples, with the classes under ``labels``) into OUT.

    python tools/recurrent_model.py OUT [--seconds 60]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

T, F, CLASSES = 32, 8, 10


def make_data(n: int, seed: int, templates_seed: int = 0, noise: float = 0.8):
    rng = np.random.default_rng(templates_seed)
    freqs = rng.uniform(0.5, 3.0, size=(CLASSES, F, 3))
    phases = rng.uniform(0, 2 * np.pi, size=(CLASSES, F, 3))
    amps = rng.uniform(0.2, 1.0, size=(CLASSES, F, 3))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    t = np.linspace(0, 1, T)[None, :]
    warp = t ** rng.uniform(0.7, 1.4, size=(n, 1)) + rng.uniform(-0.1, 0.1, size=(n, 1))  # time warp and shift
    x = np.zeros((n, T, F))
    for k in range(3):
        arg = 2 * np.pi * freqs[y][:, None, :, k] * warp[:, :, None] + phases[y][:, None, :, k]
        x += amps[y][:, None, :, k] * np.sin(arg)
    x *= rng.uniform(0.7, 1.3, size=(n, 1, 1))
    clean = x.astype(np.float32)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), y, clean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=60.0, help="training time per model")
    args = ap.parse_args()
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)  # shared cores: one thread is faster than two fighting
    os.makedirs(args.out, exist_ok=True)

    class LSTMCls(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(F, 64, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(128, CLASSES)

        def forward(self, x):
            h, _ = self.rnn(x)
            return self.head(h.mean(dim=1))

    class GRUEnc(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(F, 96, num_layers=1, bidirectional=True, batch_first=True)
            self.out = nn.Linear(192, F)

        def forward(self, x):
            h, _ = self.rnn(x)
            return self.out(h)

    xtr, ytr, ctr = make_data(8192, seed=1)
    xcal, _, _ = make_data(256, seed=2)
    xte, yte, cte = make_data(512, seed=3)
    np.savez(os.path.join(args.out, "calib.npz"), x=xcal)
    np.savez(os.path.join(args.out, "test.npz"), x=xte, labels=yte)
    for name, model, loss_of in [
        ("lstm_cls", LSTMCls(), lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb)),
        # the GRU denoises: the clean trajectory from the noisy one
        ("gru_enc", GRUEnc(), lambda m, xb, yb: nn.functional.mse_loss(m(xb), yb)),
    ]:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        xt = torch.from_numpy(xtr)
        yt = torch.from_numpy(ytr) if name == "lstm_cls" else torch.from_numpy(ctr)
        t0, steps = time.time(), 0
        while time.time() - t0 < args.seconds:
            idx = torch.randint(0, len(xt), (64,))
            loss = loss_of(model, xt[idx], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        model.eval()
        with torch.no_grad():
            xv = torch.from_numpy(xte)
            if name == "lstm_cls":
                acc = float((model(xv).argmax(1).numpy() == yte).mean())
                print(f"{name}: {steps} steps, test accuracy {acc:.3f}")
            else:
                print(f"{name}: {steps} steps, test denoising MSE {float(loss_of(model, xv, torch.from_numpy(cte))):.4f} "
                      f"(noise alone {float(np.mean((xte - cte) ** 2)):.4f})")
        path = os.path.join(args.out, f"{name}.onnx")
        torch.onnx.export(model, (torch.from_numpy(xcal[:2]),), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
        print("wrote", path)


if __name__ == "__main__":
    main()
