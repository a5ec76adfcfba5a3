"""Build a synthetic decoder-only transformer as ONNX (no torch), weights stored as external data (issue 12).

    python tools/make_decoder.py --hidden 2048 --ffn 8192 --blocks 8 --out /tmp/dec2g --calib
    python tools/make_decoder.py --hidden 512 --ffn 2048 --blocks 2 --out /tmp/dec_small --calib

Writes DIR/decoder.onnx + DIR/decoder.onnx.data (every initializer over 1 KiB, 4 KiB aligned) and, with
--calib, DIR/calib.npz holding ``input_ids`` [--calib-seqs, --seq] int64 (and DIR/test.npz, other tokens).

The graph (opset 17), LLaMA-like, pre-norm:

    input_ids [B, S] -> Gather(embed [V, D])
    per block:  h = x + o_proj(attn(RMSNorm(x)))          attn: q/k/v MatMuls [D, D], heads of --head-dim,
                                                            softmax(q k^T / sqrt(hd) + causal mask) v
                x = h + down(SiLU(gate(RMSNorm(h))) * up(RMSNorm(h)))     gate/up [D, F], down [F, D]
    logits = RMSNorm(x) @ lm_head [D, V]

RMSNorm is built from ops (Mul, ReduceMean, Add, Sqrt, Div, Mul by a gain). The causal mask is a constant
[--max-seq, --max-seq] table sliced to the sequence length. Weights are low rank plus noise
(W = U V^T * a + N(0, s), rank --rank), so that each layer's outputs and the next layer's inputs are correlated
and the Hessians X X^T are not near-diagonal; the overall scale is about N(0, 0.02) as in trained LMs.
Token ids of the calibration set follow a Zipf-like law over the vocabulary (a few tokens are frequent).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

_ALIGN = 4096


class _DataWriter:
    """Appends raw tensor bytes to one external data file and makes the TensorProtos that reference it."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offset = 0
        self.inits: list[onnx.TensorProto] = []
        self.params = 0

    def add(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        self.params += arr.size
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        if arr.nbytes <= 1024:
            t.raw_data = arr.tobytes()
        else:
            pad = (-self.offset) % _ALIGN
            if pad:
                self.f.write(b"\0" * pad)
                self.offset += pad
            self.f.write(arr.tobytes())
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.offset += arr.nbytes
        self.inits.append(t)
        return name

    def close(self):
        self.f.close()


def _lowrank(rng: np.random.Generator, rows: int, cols: int, rank: int, std: float = 0.02) -> np.ndarray:
    """[rows, cols] float32: a rank-``rank`` part carrying half the variance plus i.i.d. noise, total std ~ std."""
    u = rng.standard_normal((rows, rank), dtype=np.float32)
    v = rng.standard_normal((rank, cols), dtype=np.float32)
    w = (u @ v) * np.float32(std * np.sqrt(0.5 / rank))
    w += rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std * np.sqrt(0.5))
    return w


def build(hidden: int, ffn: int, blocks: int, vocab: int, head_dim: int, max_seq: int, rank: int, seed: int,
          out: Path) -> dict:
    if hidden % head_dim:
        raise SystemExit(f"--hidden {hidden} is not a multiple of --head-dim {head_dim}")
    heads = hidden // head_dim
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "decoder.onnx"
    data = _DataWriter(out / "decoder.onnx.data")
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    counter = [0]

    def node(op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        counter[0] += 1
        nm = name or f"{op.lower()}_{counter[0]}"
        outp = nm + "_out"
        nodes.append(helper.make_node(op, inputs, [outp], name=nm, **attrs))
        return outp

    def const(name: str, arr: np.ndarray) -> str:
        return data.add(name, arr)

    eps = const("eps", np.array(1e-5, np.float32))
    scale = const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    shape_heads = const("shape_heads", np.array([0, 0, heads, head_dim], np.int64))
    shape_merge = const("shape_merge", np.array([0, 0, hidden], np.int64))
    mask = np.triu(np.full((max_seq, max_seq), -1e4, np.float32), k=1)
    mask_c = const("causal_mask", mask)
    zeros2 = const("zeros2", np.array([0, 0], np.int64))
    one1 = const("idx1", np.array([1], np.int64))
    two1 = const("idx2", np.array([2], np.int64))

    def rmsnorm(x: str, prefix: str) -> str:
        g = const(prefix + ".weight", (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        sq = node("Mul", [x, x], prefix + ".sq")
        ms = node("ReduceMean", [sq], prefix + ".mean", axes=[-1], keepdims=1)
        rs = node("Sqrt", [node("Add", [ms, eps], prefix + ".add_eps")], prefix + ".sqrt")
        return node("Mul", [node("Div", [x, rs], prefix + ".div"), g], prefix + ".gain")

    def linear(x: str, rows_in: int, cols_out: int, name: str) -> str:
        w = const(name + ".weight", _lowrank(rng, rows_in, cols_out, rank))
        return node("MatMul", [x, w], name)

    t0 = time.perf_counter()
    emb = const("embed_tokens.weight", _lowrank(rng, vocab, hidden, rank, std=1.0))
    x = node("Gather", [emb, "input_ids"], "embed_tokens", axis=0)
    # causal mask [S, S] for this sequence length
    seq = node("Slice", [node("Shape", ["input_ids"], "ids_shape"), one1, two1], "seq_len")
    seq2 = node("Concat", [seq, seq], "seq_len2", axis=0)
    mask_s = node("Slice", [mask_c, zeros2, seq2], "mask_slice")
    for b in range(blocks):
        p = f"layers.{b}"
        h = rmsnorm(x, p + ".input_norm")
        q = node("Transpose", [node("Reshape", [linear(h, hidden, hidden, p + ".q_proj"), shape_heads], p + ".q_split")],
                 p + ".q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(h, hidden, hidden, p + ".k_proj"), shape_heads], p + ".k_split")],
                 p + ".k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(h, hidden, hidden, p + ".v_proj"), shape_heads], p + ".v_split")],
                 p + ".v_t", perm=[0, 2, 1, 3])
        s = node("Add", [node("Mul", [node("MatMul", [q, k], p + ".qk"), scale], p + ".scale"), mask_s], p + ".mask")
        a = node("MatMul", [node("Softmax", [s], p + ".softmax", axis=-1), v], p + ".av")
        a = node("Reshape", [node("Transpose", [a], p + ".a_t", perm=[0, 2, 1, 3]), shape_merge], p + ".a_merge")
        x = node("Add", [x, linear(a, hidden, hidden, p + ".o_proj")], p + ".res1")
        h = rmsnorm(x, p + ".post_norm")
        g = linear(h, hidden, ffn, p + ".gate_proj")
        silu = node("Mul", [g, node("Sigmoid", [g], p + ".sigmoid")], p + ".silu")
        u = node("Mul", [silu, linear(h, hidden, ffn, p + ".up_proj")], p + ".gated")
        x = node("Add", [x, linear(u, ffn, hidden, p + ".down_proj")], p + ".res2")
        print(f"  block {b + 1}/{blocks} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    logits = linear(rmsnorm(x, "final_norm"), hidden, vocab, "lm_head")
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    data.close()
    graph = helper.make_graph(
        nodes, "synthetic_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        initializer=data.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_decoder")
    model.ir_version = 8
    onnx.save_model(model, str(model_path))  # graph only: the tensors already reference decoder.onnx.data
    onnx.checker.check_model(str(model_path))
    info = dict(model=str(model_path), data=str(data.path), params=data.params, hidden=hidden, ffn=ffn,
                blocks=blocks, vocab=vocab, heads=heads, head_dim=head_dim,
                bytes=model_path.stat().st_size + data.path.stat().st_size)
    (out / "decoder.json").write_text(json.dumps(info, indent=1))
    return info


def tokens(n: int, seq: int, vocab: int, seed: int) -> np.ndarray:
    """[n, seq] int64 token ids, Zipf-like over the vocabulary."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    perm = np.random.default_rng(0).permutation(vocab)  # frequent tokens spread over the table
    return perm[rng.choice(vocab, size=(n, seq), p=p)].astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64, help="rank of the low-rank part of every weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder (outside git, e.g. /tmp/dec2g)")
    ap.add_argument("--calib", action="store_true", help="also write calib.npz and test.npz (input_ids)")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args(argv)
    if a.seq > a.max_seq:
        raise SystemExit(f"--seq {a.seq} exceeds --max-seq {a.max_seq}")
    out = Path(a.out)
    info = build(a.hidden, a.ffn, a.blocks, a.vocab, a.head_dim, a.max_seq, a.rank, a.seed, out)
    if a.calib:
        np.savez(out / "calib.npz", input_ids=tokens(a.calib_seqs, a.seq, a.vocab, a.seed + 1))
        np.savez(out / "test.npz", input_ids=tokens(a.calib_seqs, a.seq, a.vocab, a.seed + 2))
    print(f"{info['model']}: {info['params'] / 1e6:.1f} M parameters, {info['bytes'] / 2**30:.2f} GiB "
          f"(hidden {a.hidden}, ffn {a.ffn}, {a.blocks} blocks, vocab {a.vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
