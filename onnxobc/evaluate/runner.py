"""Run a reference and a candidate model on the same data with ONNX Runtime (CPU) and compare their outputs.

The two models must have the same interface (input and output names, element types, ranks, static dims): eval
compares two versions of one model, typically a model and its compressed copy. Data is streamed batch by
batch through both sessions; metrics are accumulated in float64 (see metrics.py), so memory holds one batch.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._version import __version__
from ..calibrate.data import (
    InputSpec,
    _npz_files,
    count_samples,
    describe_batch_axes,
    effective_batch_size,
    feed_samples,
    input_specs,
    iter_batches,
    npz_shapes,
)
from ..calibrate.hessian import find_token_mask
from ..jsonutil import dumps
from ..graph.model_io import model_file_bytes, proto_bytes  # noqa: F401  (model_file_bytes: re-exported)
from ..runtime import inference_session
from ..errors import CalibrationError, UnsupportedModel, UsageError
from ..graph import load_model
from .metrics import DEFINITIONS, OutputAccumulator, OutputMetrics

log = logging.getLogger(__name__)

Progress = Callable[[Iterable, str, "int | None"], Iterable]


def _identity_progress(it: Iterable, desc: str, total: int | None) -> Iterable:
    return it


# ---- result ---------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Reference vs candidate on ``samples`` samples: metrics per output, model sizes, latency."""

    reference: str
    candidate: str
    data: str
    samples: int
    batches: int
    batch_size: int | None  # samples per batch cut from .npz files (None: Python feeds, used as given)
    outputs: list[OutputMetrics]
    skipped_outputs: list[dict]  # outputs that cannot be compared numerically ({name, reason})
    labels: str | None  # the label key, "<array>" for labels given as an array, None without labels
    label_output: str | None  # the output the labels apply to
    reference_bytes: int
    candidate_bytes: int
    latency_ms: dict | None  # {"reference", "candidate", "runs", "batch_samples"}; None with latency_runs=0
    seconds: float
    token_mask: str | None = None  # the input whose zeros marked padding left out of the "[real tokens]" rows
    version: str = __version__
    definitions: dict = field(default_factory=lambda: dict(DEFINITIONS))

    def output(self, name: str) -> OutputMetrics:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(f"no output '{name}' (outputs: {', '.join(o.name for o in self.outputs)})")

    def to_dict(self) -> dict:
        """Plain Python values (floats may be inf / nan; see ``to_json`` for strict JSON)."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON: non-finite floats are written as the strings "inf", "-inf" and "nan"."""
        return dumps(self.to_dict(), indent=indent)




# ---- models ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str  # "tensor_type", "sequence_type", "map_type", ...
    elem_type: int  # TensorProto element type (0 when not a tensor)
    shape: tuple | None  # ints for static dims, str/None for symbolic ones; None when the rank is unknown

    @property
    def type_str(self) -> str:
        if self.kind != "tensor_type":
            return self.kind.replace("_type", "")
        if self.elem_type == onnx.TensorProto.STRING:
            return "string"
        try:
            return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type)))
        except (KeyError, TypeError, ValueError):  # UNDEFINED or a type NumPy cannot name
            return onnx.TensorProto.DataType.Name(self.elem_type).lower()

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.type_str}[rank ?]"
        dims = ",".join(str(d) if d not in (None, "") else "?" for d in self.shape)
        return f"{self.name}: {self.type_str}[{dims}]"


def output_specs(model: onnx.ModelProto) -> list[OutputSpec]:
    specs = []
    for vi in model.graph.output:
        kind = vi.type.WhichOneof("value") or "unknown"
        if kind == "tensor_type":
            tt = vi.type.tensor_type
            shape = (tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
                     if tt.HasField("shape") else None)
            specs.append(OutputSpec(vi.name, kind, tt.elem_type, shape))
        else:
            specs.append(OutputSpec(vi.name, kind, 0, None))
    return specs


def _static_dims_differ(a: tuple, b: tuple) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0
            and x != y]


def check_interfaces(ref: onnx.ModelProto, cand: onnx.ModelProto, ref_name: str = "reference",
                     cand_name: str = "candidate") -> tuple[list[InputSpec], list[OutputSpec]]:
    """The inputs to feed and the outputs to compare; UsageError when the two models' interfaces differ."""

    def compare(what: str, r: list, c: list, dtype_of, rank_of) -> None:
        rmap, cmap = {s.name: s for s in r}, {s.name: s for s in c}
        problems = []
        only_r = [n for n in rmap if n not in cmap]
        only_c = [n for n in cmap if n not in rmap]
        if only_r or only_c:
            problems.append(f"names differ (only in the reference: {', '.join(only_r) or '-'}; "
                            f"only in the candidate: {', '.join(only_c) or '-'})")
        for n, a in rmap.items():
            b = cmap.get(n)
            if b is None:
                continue
            if dtype_of(a) != dtype_of(b):
                problems.append(f"'{n}' is {dtype_of(a)} in the reference, {dtype_of(b)} in the candidate")
            elif rank_of(a) is not None and rank_of(b) is not None and rank_of(a) != rank_of(b):
                problems.append(f"'{n}' has rank {rank_of(a)} in the reference, {rank_of(b)} in the candidate")
            elif a.shape and b.shape and _static_dims_differ(a.shape, b.shape):
                problems.append(f"'{n}' is {a.describe()} in the reference, {b.describe()} in the candidate")
        if problems:
            raise UsageError(
                f"the two models' {what} do not match: {'; '.join(problems)}. Reference {ref_name}: "
                f"{', '.join(s.describe() for s in r) or 'none'}; candidate {cand_name}: "
                f"{', '.join(s.describe() for s in c) or 'none'}. eval compares two versions of one model "
                f"(e.g. a model and its compressed copy): give models with the same {what}"
            )

    ri, ci = input_specs(ref), input_specs(cand)
    compare("inputs", ri, ci, lambda s: str(s.dtype), lambda s: len(s.shape))
    ro, co = output_specs(ref), output_specs(cand)
    compare("outputs", ro, co, lambda s: s.type_str, lambda s: None if s.shape is None else len(s.shape))
    return ri, ro



def _load(source: Any, which: str) -> tuple[str, onnx.ModelProto, int, Path | None]:
    """(display name, validated model, bytes, path or None)."""
    if isinstance(source, onnx.ModelProto):
        if not source.graph.node:
            raise UnsupportedModel(f"the {which} ModelProto holds no graph nodes")
        return f"<{which} ModelProto>", source, proto_bytes(source), None
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"{which} must be an .onnx path or an onnx.ModelProto, got {type(source).__name__}")
    p = Path(source)
    if not p.exists():
        raise UsageError(f"{which} model file not found: {p}")
    size = model_file_bytes(p) if p.is_file() else 0
    return str(p), load_model(p), size, p


def _session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # default graph optimisations (ORT_ENABLE_ALL): latency as deployed; both models get this same object
    return so


def _make_session(model: onnx.ModelProto, path: Path | None, so, which: str, name: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    try:
        if path is not None:  # ONNX Runtime reads the file itself (and its external data)
            return ort.InferenceSession(str(path), so, providers=providers)
        return inference_session(model, so, providers)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModel(f"ONNX Runtime (CPU) cannot load the {which} model {name}: {msg}") from e


# ---- labels ---------------------------------------------------------------------------------------------

def _file_samples(f: Path, specs: list[InputSpec]) -> tuple[int | None, str | None]:
    """Samples in one .npz (as the batch reader cuts it) and the input that says so."""
    shapes = npz_shapes(f)
    counts = [(shapes[s.name][s.batch_axis], s.name) for s in sorted(specs, key=lambda s: s.name)
              if s.batch_axis is not None and s.name in shapes and len(shapes[s.name]) > s.batch_axis]
    return min(counts) if counts else (None, None)


def _as_label_vector(lab: Any, where: str) -> np.ndarray:
    a = np.asarray(lab)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2 and a.shape[1] > 1:  # one-hot or per-class scores
        a = np.argmax(a, axis=1)
    if a.ndim != 1:
        raise CalibrationError(f"{where} has shape {a.shape}: expected class indices [N] (or one-hot [N, K])")
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise CalibrationError(f"{where} has dtype {a.dtype}: expected integer class indices")


def _prepare_labels(labels: Any, data: Any, specs: list[InputSpec]) -> tuple[np.ndarray | None, str | None, bool]:
    """(labels as int64 [samples], description, whether their length was checked against the source)."""
    if labels is None:
        return None, None, False
    is_path = isinstance(data, (str, os.PathLike))
    if isinstance(labels, str):
        if not is_path:
            raise UsageError(f"labels='{labels}' names an array in an .npz file, but the data is a "
                             f"{type(data).__name__}: pass the labels as an array (labels=np.ndarray)")
        parts = []
        for f in _npz_files(Path(data)):
            n, input_name = _file_samples(f, specs)
            with np.load(f, allow_pickle=False) as z:
                if labels not in z.files:
                    raise UsageError(f"--labels {labels}: {f} has no array '{labels}' (arrays: {', '.join(z.files)}); "
                                     f"give the key of the label array")
                lab = z[labels]
            if lab.ndim == 0 or (n is not None and lab.shape[0] != n):
                got = "a scalar" if lab.ndim == 0 else f"{lab.shape[0]} entries"
                axis = next(s.batch_axis for s in specs if s.name == input_name) if input_name else 0
                raise CalibrationError(f"labels '{labels}' in {f} hold {got} but the data has {n} samples "
                                       f"(axis {axis} of '{input_name}'): give exactly one label per sample")
            parts.append(_as_label_vector(lab, f"labels '{labels}' in {f}"))
        return np.concatenate(parts), labels, True
    if isinstance(labels, (np.ndarray, list, tuple)):
        vec = _as_label_vector(labels, "labels")
        if is_path:
            n = count_samples(data, specs, None)
            if n is not None and len(vec) != n:
                raise CalibrationError(f"labels hold {len(vec)} entries but {data} has {n} samples: "
                                       f"give exactly one label per sample")
            return vec, "<array>", True
        return vec, "<array>", False
    raise UsageError(f"labels must be the key of an array in the .npz data or an array, got {type(labels).__name__}")


# ---- evaluation -----------------------------------------------------------------------------------------

def _run(sess, names: list[str], feed: dict, which: str, name: str, batch: int,
         specs: list[InputSpec] | None = None) -> list[np.ndarray]:
    try:
        return sess.run(names, feed)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in feed.items())
        axes = f"; {describe_batch_axes(specs)}" if specs else ""
        raise CalibrationError(f"ONNX Runtime failed to run the {which} model {name} on batch {batch} "
                               f"({shapes}): {msg}{axes}") from e


@dataclass(frozen=True)
class OutputSlice:
    """Part of an output compared on its own: ``output[..., start:stop, ...]`` along ``axis`` (never axis 0, the
    samples)."""

    output: str
    axis: int
    start: int | None
    stop: int | None

    def index(self, ndim: int) -> tuple:
        axis = self.axis + ndim if self.axis < 0 else self.axis
        if not 1 <= axis < ndim:
            raise UsageError(f"--slice {self.label}: axis {self.axis} is not an axis of output '{self.output}' beyond "
                             f"the samples (its rank is {ndim}; axis 0 indexes samples)")
        return (slice(None),) * axis + (slice(self.start, self.stop),)

    @property
    def label(self) -> str:
        part = f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"
        lead = ":, " * self.axis if self.axis >= 0 else "..., "
        tail = "" if self.axis >= 0 else ", :" * (-self.axis - 1)
        return f"{self.output}[{lead}{part}{tail}]"


def parse_slice(text: str, outputs: list[str]) -> OutputSlice:
    """'NAME:AXIS:START:STOP' (START or STOP may be empty) -> OutputSlice, checked against the output names."""
    parts = str(text).rsplit(":", 3)
    if len(parts) != 4 or not parts[0]:
        raise UsageError(f"--slice must look like NAME:AXIS:START:STOP (e.g. output0:2:5:85), got {text!r}")
    name, *nums = parts
    try:
        axis, start, stop = (int(x) if x.strip() else None for x in nums)
    except ValueError:
        raise UsageError(f"--slice {text}: AXIS, START and STOP must be integers (START/STOP may be empty)") from None
    if axis is None or axis == 0:
        raise UsageError(f"--slice {text}: give an AXIS other than 0 (axis 0 indexes samples)")
    if name not in outputs:
        raise UsageError(f"--slice {text}: no numeric output '{name}' (outputs: {', '.join(outputs)})")
    return OutputSlice(name, axis, start, stop)


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def evaluate(reference: str | os.PathLike | onnx.ModelProto, candidate: str | os.PathLike | onnx.ModelProto,
             data: Any, *, labels: str | np.ndarray | None = None, label_output: str | None = None,
             batch_size: int = 32, max_samples: int | None = None, latency_runs: int = 20,
             progress: Progress | None = None, batch_axes: dict[str, int | None] | None = None,
             slices: list[str] | None = None, token_mask: str | None = "auto") -> EvalResult:
    """Run ``reference`` and ``candidate`` (paths or ModelProtos with the same interface) on ``data`` (an .npz
    path, a directory of .npz, or an iterable of {input_name: array} feeds) and compare every output.

    ``labels``: the key of a label array in the .npz data, or an array with one class index per sample; accuracy
    of both models is then reported for ``label_output`` (default: the first [N, K] float output). At most
    ``max_samples`` samples are used, in batches of ``batch_size``; ``latency_runs`` timed runs of each model on
    the first batch give the median latency (0 skips timing). Nothing is printed; ``progress`` wraps the batches.
    Each input is sliced along its batch axis, inferred from the model's symbolic dims unless ``batch_axes``
    ({input_name: axis, or None to pass it whole}) says otherwise. ``slices`` ("NAME:AXIS:START:STOP", e.g.
    "boxes:2:5:85" for a detector's class scores) add rows for parts of outputs, so that large values in one part
    (box coordinates) do not hide the error in another (class scores).

    ``token_mask`` ("auto": an integer ``attention_mask`` input; a name; None or "none": off): every output whose
    leading axes are that input's [batch, sequence] gets a second row, "NAME[real tokens]", over the positions the
    mask marks real (each token one sample of the cosine): padded positions are left out of calibration, so no
    method controls them, and a masked consumer never reads them.
    """
    progress = progress or _identity_progress
    t0 = time.perf_counter()
    _check_int("--batch-size (batch_size)", batch_size, 1)
    _check_int("--samples (max_samples)", max_samples, 1, allow_none=True)
    _check_int("--latency-runs (latency_runs)", latency_runs, 0)
    if label_output is not None and labels is None:
        raise UsageError(f"--output {label_output} selects the output that the labels apply to: pass --labels too")

    ref_name, ref_model, ref_bytes, ref_path = _load(reference, "reference")
    cand_name, cand_model, cand_bytes, cand_path = _load(candidate, "candidate")
    specs, outs = check_interfaces(ref_model, cand_model, ref_name, cand_name)
    specs = input_specs(ref_model, batch_axes)

    skipped = []
    compared: list[str] = []
    for o in outs:
        if o.kind != "tensor_type":
            skipped.append({"name": o.name, "reason": f"not a tensor ({o.type_str})"})
        elif o.elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            skipped.append({"name": o.name, "reason": f"{o.type_str} tensor"})
        else:
            compared.append(o.name)
    if not compared:
        raise UnsupportedModel(f"{ref_name} has no numeric tensor output to compare "
                               f"(outputs: {', '.join(o.describe() for o in outs)})")
    if label_output is not None and label_output not in compared:
        raise UsageError(f"--output {label_output}: no such numeric output (outputs: {', '.join(compared)})")

    cuts = [parse_slice(x, compared) for x in (slices or [])]
    mask_name = find_token_mask(ref_model, token_mask)
    masked: list[str] = []  # outputs that got a real-token row (decided on the first batch)
    label_vec, label_desc, label_len_checked = _prepare_labels(labels, data, specs)
    is_path = isinstance(data, (str, os.PathLike))
    total = count_samples(data, specs, max_samples) if is_path else None
    eff_batch = effective_batch_size(specs, batch_size)
    n_batches = -(-total // eff_batch) if total is not None else None

    so = _session_options()
    ref_sess = _make_session(ref_model, ref_path, so, "reference", ref_name)
    del ref_model  # the session holds the weights now
    cand_sess = _make_session(cand_model, cand_path, so, "candidate", cand_name)
    del cand_model

    accs = {n: OutputAccumulator(n) for n in compared}
    target = label_output
    first: dict | None = None
    seen = batches = 0
    stream = iter_batches(data, specs, batch_size=batch_size, max_samples=max_samples)
    for feed in progress(stream, "eval", n_batches):
        n = feed_samples(feed, specs)
        r_out = _run(ref_sess, compared, feed, "reference", ref_name, batches, specs)
        c_out = _run(cand_sess, compared, feed, "candidate", cand_name, batches, specs)
        lab = None
        if label_vec is not None:
            if first is None:
                target = _label_target(target, compared, r_out, n)
            if seen + n > len(label_vec):
                raise CalibrationError(f"labels hold {len(label_vec)} entries but the data has more samples "
                                       f"(at least {seen + n}): give exactly one label per sample")
            lab = label_vec[seen:seen + n]
            k = r_out[compared.index(target)].shape[1]
            bad = (lab < 0) | (lab >= k)
            if np.any(bad):
                raise CalibrationError(f"label {int(lab[bad][0])} of sample {seen + int(np.argmax(bad))} is not a "
                                       f"class index of output '{target}' (0..{k - 1})")
        for name, r, c in zip(compared, r_out, c_out):
            if r.shape != c.shape:
                raise CalibrationError(f"output '{name}' on batch {batches}: the reference gives shape {list(r.shape)}, "
                                       f"the candidate {list(c.shape)}; the models do not compute the same thing")
            accs[name].update(r, c, n, lab if name == target else None)
        for cut in cuts:
            r, c = (out[compared.index(cut.output)] for out in (r_out, c_out))
            index = cut.index(r.ndim)
            if r.size and not r[index].size:
                raise UsageError(f"--slice {cut.label}: selects no element of output '{cut.output}' "
                                 f"(shape {list(r.shape)})")
            accs.setdefault(cut.label, OutputAccumulator(cut.label)).update(r[index], c[index], n)
        if mask_name is not None:
            mask = np.asarray(feed[mask_name]) != 0
            if first is None:
                masked = [name for name, r in zip(compared, r_out)
                          if r.ndim >= 2 and r.shape[:2] == mask.shape and r.dtype.kind == "f"]
            for name in masked:
                r, c = (out[compared.index(name)] for out in (r_out, c_out))
                if r.shape[:2] != mask.shape:
                    raise CalibrationError(f"output '{name}' on batch {batches} has shape {list(r.shape)}, not "
                                           f"[batch, sequence] of '{mask_name}' {list(mask.shape)}: pass token_mask=None")
                rt, ct = r[mask], c[mask]
                accs.setdefault(_token_label(name), OutputAccumulator(_token_label(name), classes=False)).update(rt, ct, len(rt))
        if first is None:
            first = feed
        seen += n
        batches += 1
    if first is None:
        raise CalibrationError(f"the data gave no samples to evaluate ({data if is_path else type(data).__name__})")
    if label_vec is not None and not label_len_checked:
        truncated = max_samples is not None and seen >= max_samples
        if len(label_vec) < seen or (len(label_vec) != seen and not truncated):
            raise CalibrationError(f"labels hold {len(label_vec)} entries but the data gave {seen} samples: "
                                   f"give exactly one label per sample")

    latency = None
    if latency_runs:
        times: dict[str, list[float]] = {"reference": [], "candidate": []}
        sessions = (("reference", ref_sess, ref_name), ("candidate", cand_sess, cand_name))
        for which, sess, name in sessions:  # warm-up
            _run(sess, compared, first, which, name, 0)
        for _ in progress(range(latency_runs), "eval latency", latency_runs):
            for which, sess, name in sessions:  # alternate, so that drift hits both alike
                t = time.perf_counter()
                _run(sess, compared, first, which, name, 0)
                times[which].append((time.perf_counter() - t) * 1e3)
        latency = {"reference": statistics.median(times["reference"]),
                   "candidate": statistics.median(times["candidate"]),
                   "runs": latency_runs, "batch_samples": feed_samples(first, specs)}

    return EvalResult(
        reference=ref_name, candidate=cand_name, data=str(data) if is_path else f"<{type(data).__name__}>",
        samples=seen, batches=batches, batch_size=eff_batch if is_path else None,
        outputs=[accs[n].result() for n in compared] + [accs[c.label].result() for c in cuts]
        + [accs[_token_label(n)].result() for n in masked if _token_label(n) in accs],
        token_mask=mask_name if masked else None,
        skipped_outputs=skipped, labels=label_desc,
        label_output=target if label_vec is not None else None, reference_bytes=ref_bytes,
        candidate_bytes=cand_bytes, latency_ms=latency, seconds=time.perf_counter() - t0,
    )


def _token_label(name: str) -> str:
    return f"{name}[real tokens]"


def _label_target(target: str | None, compared: list[str], r_out: list[np.ndarray], n: int) -> str:
    """The output the labels apply to: ``target`` if given (must be a class output), else the first class output."""
    from .metrics import is_class_output

    if target is not None:
        a = r_out[compared.index(target)]
        if not is_class_output(a, n):
            raise UsageError(f"--output {target} is {a.dtype}{list(a.shape)} on a batch of {n}: labels need a class "
                             f"output of float scores [N, K] with K >= 2")
        return target
    for name, a in zip(compared, r_out):
        if is_class_output(a, n):
            return name
    shapes = ", ".join(f"{name}: {a.dtype}{list(a.shape)}" for name, a in zip(compared, r_out))
    raise UsageError(f"labels need a class output (float scores [N, K], K >= 2), but on a batch of {n} the outputs "
                     f"are {shapes}")
