"""Calibration data: .npz files, directories of them, or any iterable of {input_name: array} feeds
(ONNX Runtime's CalibrationDataReader too). Every feed is checked against the model's inputs."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import CalibrationError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for static dims, strings (or None) for symbolic ones
    batch_axis: int | None = 0  # the axis that indexes samples; None: passed whole with every batch
    batch_source: str = "axis 0"  # how batch_axis was found (for error messages)

    @property
    def dynamic_batch(self) -> bool:
        return self.batch_axis is not None and not (isinstance(self.shape[self.batch_axis], int)
                                                    and self.shape[self.batch_axis] > 0)

    @property
    def static_batch(self) -> int | None:
        if self.batch_axis is None:
            return None
        d = self.shape[self.batch_axis]
        return d if isinstance(d, int) and d > 0 else None

    def describe(self) -> str:
        dims = ",".join(str(d) if d not in (None, "") else "?" for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def describe_batch(self) -> str:
        if self.batch_axis is None:
            return f"{self.name} passed whole ({self.batch_source})"
        return f"{self.name} axis {self.batch_axis} ({self.batch_source})"


def parse_batch_axes(items: Iterable[str] | dict | None) -> dict[str, int | None]:
    """``["state=1", "sr=none"]`` (the --batch-axis option, repeatable) -> {"state": 1, "sr": None}."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, int | None] = {}
    for item in items:
        name, sep, axis = str(item).rpartition("=")
        if not sep or not name:
            raise ValueError(f"--batch-axis must look like NAME=AXIS (e.g. state=1, or sr=none to pass an input "
                             f"whole with every batch), got {item!r}")
        axis = axis.strip().lower()
        if axis in ("none", "whole", "-"):
            out[name] = None
        else:
            try:
                out[name] = int(axis)
            except ValueError:
                raise ValueError(f"--batch-axis {item}: AXIS must be an integer or 'none', got {axis!r}") from None
    return out


def _placeholder(dim: str) -> bool:
    """A symbolic dim name that only means 'unknown' (tf2onnx's unk__N, '?', a number)."""
    d = dim.strip()
    return d in ("?", "-1", "None") or d.lstrip("-").isdigit() or d.startswith("unk__")


def _infer_batch_axes(raw: list[tuple[str, tuple]]) -> dict[str, tuple[int | None, str]]:
    """Each input's sample axis: the axis holding the symbolic dim that the inputs share as their batch dim.

    The batch dim is the named symbolic dim that is axis 0 of the most inputs, then present in the most inputs,
    then earliest; an input that holds it is sliced along (the first) axis with it, e.g. ``state [2, N, 128]``
    along axis 1. An input without it is sliced along axis 0 when that axis is dynamic, else passed whole (a flag,
    a fixed table, a scalar sample rate). A model where no input has such a dim or a dynamic axis 0 (all static,
    or only spatial dims dynamic: ``[1, 1, 64, width]``) is sliced along axis 0 (fixed batch).
    Placeholder names ('?', 'unk__12', '-1'-like) and names repeated within one input ('?' for both H and W of an
    image) say nothing about sharing, and a name never at axis 0 is not taken for the batch dim.
    """
    score: dict[str, list] = {}
    for i, (_, shape) in enumerate(raw):
        names = [d for d in shape if isinstance(d, str) and d]
        for ax, d in enumerate(shape):
            if not isinstance(d, str) or not d or names.count(d) > 1 or _placeholder(d):
                continue
            sc = score.setdefault(d, [0, 0, -i, -ax])
            sc[0] += ax == 0
            sc[1] += 1
    score = {k: v for k, v in score.items() if v[0] > 0}
    sym = max(score, key=lambda k: tuple(score[k])) if score else None
    any_batch = sym is not None or any(shape and not (isinstance(shape[0], int) and shape[0] > 0)
                                       for _, shape in raw)
    out: dict[str, tuple[int | None, str]] = {}
    for name, shape in raw:
        if not shape:
            out[name] = (None, "a scalar")
        elif sym is not None and sym in shape:
            out[name] = (shape.index(sym), f"the shared dim '{sym}'")
        elif not (isinstance(shape[0], int) and shape[0] > 0):
            out[name] = (0, "dynamic axis 0")
        elif not any_batch:
            out[name] = (0, "axis 0, fixed batch")
        else:
            out[name] = (None, f"no '{sym}' dim" if sym else "no dynamic dim")
    return out


def input_specs(model: onnx.ModelProto, batch_axes: dict[str, int | None] | None = None) -> list[InputSpec]:
    """The inputs a feed must provide (graph inputs that are not initializers), each with the axis along which
    samples are stacked: inferred from the model's symbolic dims unless ``batch_axes`` ({name: axis or None})
    says otherwise."""
    inits = {t.name for t in model.graph.initializer}
    raw = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        raw.append((vi.name, dtype, shape))
    inferred = _infer_batch_axes([(n, s) for n, _, s in raw])
    batch_axes = dict(batch_axes or {})
    unknown = sorted(set(batch_axes) - {n for n, _, _ in raw})
    if unknown:
        raise UsageError(f"--batch-axis {', '.join(unknown)}: no such model input (inputs: "
                         f"{', '.join(n for n, _, _ in raw) or 'none'})")
    specs = []
    for name, dtype, shape in raw:
        axis, why = inferred[name]
        if name in batch_axes:
            axis, why = batch_axes[name], "--batch-axis"
            if axis is not None:
                if not -len(shape) <= axis < len(shape):
                    raise UsageError(f"--batch-axis {name}={axis}: input '{name}' has rank {len(shape)} "
                                     f"(shape [{','.join(str(d) if d not in (None, '') else '?' for d in shape)}])")
                axis %= len(shape)
        specs.append(InputSpec(name, dtype, shape, axis, why))
    return specs


def describe_batch_axes(specs: list[InputSpec]) -> str:
    """One line for error messages: where the samples of each input were taken from."""
    return ("batch axes: " + "; ".join(s.describe_batch() for s in specs)
            + " (set them with --batch-axis NAME=AXIS, or NAME=none to pass an input whole)")


class Batch(dict):
    """A checked feed {input_name: array} that knows how many samples it holds."""

    samples: int = 1


def batched_inputs(specs: list[InputSpec]) -> set[str]:
    """Inputs that hold one slice per sample along their batch axis (the others are passed whole)."""
    return {s.name for s in specs if s.batch_axis is not None}


def _take(a: np.ndarray, spec: InputSpec | None, start: int, stop: int) -> np.ndarray:
    """Samples ``start:stop`` of ``a`` along its batch axis (``a`` whole for inputs passed whole)."""
    if spec is None or spec.batch_axis is None or a.ndim <= spec.batch_axis:
        return a
    index = [slice(None)] * a.ndim
    index[spec.batch_axis] = slice(start, stop)
    return a[tuple(index)]


def _n_samples(a: np.ndarray, spec: InputSpec) -> int | None:
    if spec.batch_axis is None or a.ndim <= spec.batch_axis:
        return None
    return int(a.shape[spec.batch_axis])


def _check_feed(feed: dict[str, Any], specs: list[InputSpec], where: str, warned: set) -> Batch:
    if not isinstance(feed, dict):
        raise CalibrationError(f"{where}: expected a dict {{input_name: array}}, got {type(feed).__name__}")
    out = Batch()
    for spec in specs:
        if spec.name not in feed:
            raise CalibrationError(
                f"{where}: no array for model input '{spec.name}' (found: {', '.join(sorted(map(str, feed))) or 'nothing'}); "
                f"the model expects {', '.join(s.describe() for s in specs)}"
            )
        a = np.asarray(feed[spec.name])
        if a.dtype != spec.dtype:
            if a.dtype.kind == "f" and spec.dtype.kind == "f":
                if ("cast", spec.name) not in warned:
                    log.info("casting calibration input '%s' from %s to %s", spec.name, a.dtype, spec.dtype)
                    warned.add(("cast", spec.name))
                a = a.astype(spec.dtype)
            else:
                raise CalibrationError(
                    f"{where}: input '{spec.name}' has dtype {a.dtype}, the model expects {spec.dtype}; "
                    f"convert the data (e.g. arr.astype(np.{spec.dtype.name}))"
                )
        if spec.shape and a.ndim != len(spec.shape):
            along = ("it is passed whole" if spec.batch_axis is None
                     else f"axis {spec.batch_axis} must index samples")
            raise CalibrationError(
                f"{where}: input '{spec.name}' has shape {a.shape} (rank {a.ndim}), the model expects rank "
                f"{len(spec.shape)} ({spec.describe()}); {along}"
            )
        for i, (d, m) in enumerate(zip(a.shape, spec.shape)):
            if i != spec.batch_axis and isinstance(m, int) and m > 0 and d != m:
                raise CalibrationError(
                    f"{where}: input '{spec.name}' has shape {a.shape}, the model expects {spec.describe()} "
                    f"(axis {i} differs; {describe_batch_axes(specs)})"
                )
        if a.dtype.kind in "fc" and a.size and not np.isfinite(a).all():
            raise CalibrationError(f"{where}: input '{spec.name}' {_nonfinite(a, spec.batch_axis)}; NaN and Inf would "
                                   f"poison every Hessian and activation range: clean or drop those samples")
        out[spec.name] = a
    extra = sorted(set(map(str, feed)) - {s.name for s in specs})
    if extra and ("extra",) not in warned:
        log.info("ignoring calibration arrays that are not model inputs: %s", ", ".join(extra))
        warned.add(("extra",))
    counts = {s.name: _n_samples(out[s.name], s) for s in specs}
    counts = {k: v for k, v in counts.items() if v is not None}
    if len(set(counts.values())) > 1:
        got = ", ".join(f"'{k}' {v}" for k, v in counts.items())
        raise CalibrationError(f"{where}: inputs disagree on the number of samples ({got}); "
                               f"{describe_batch_axes(specs)}")
    out.samples = next(iter(counts.values())) if counts else 1
    return out


def _nonfinite(a: np.ndarray, axis: int | None) -> str:
    """'holds 3 NaN and 1 Inf values (first in sample 5 of this batch)'."""
    bad = ~np.isfinite(a)
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    what = " and ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    first = ""
    if axis is not None and a.ndim > axis:
        rows = np.nonzero(np.moveaxis(bad, axis, 0).reshape(a.shape[axis], -1).any(axis=1))[0]
        first = f" (first in sample {int(rows[0])} of this batch)"
    return f"holds {what} value{'s' if n_nan + n_inf > 1 else ''}{first}"


def _npz_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if not files:
            raise CalibrationError(f"calibration directory {path} holds no .npz files")
        return files
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    if path.suffix != ".npz":
        raise CalibrationError(f"calibration data {path} is not an .npz file (or a directory of them)")
    return [path]


def load_npz(f: Path) -> dict[str, np.ndarray]:
    """Every array of one .npz; CalibrationError ("cannot read F as .npz: ...") when it is not a readable one."""
    try:
        with np.load(f, allow_pickle=False) as z:
            if not hasattr(z, "files"):  # np.load also reads .npy and pickles
                raise ValueError("not a zip archive of .npy arrays")
            return {k: z[k] for k in z.files}
    except CalibrationError:
        raise
    except Exception as e:
        raise CalibrationError(f"cannot read {f} as .npz: {type(e).__name__}: {e}".rstrip(": ")) from e


def npz_shapes(f: Path) -> dict[str, tuple]:
    """The shape of every array in one .npz, from the array headers only (no data read)."""
    import zipfile

    try:
        shapes = {}
        with zipfile.ZipFile(f) as z:
            for n in z.namelist():
                if not n.endswith(".npy"):
                    continue
                with z.open(n) as fh:
                    version = np.lib.format.read_magic(fh)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shapes[n[:-4]] = tuple(reader(fh)[0])
        return shapes
    except Exception as e:
        raise CalibrationError(f"cannot read {f} as .npz: {type(e).__name__}: {e}".rstrip(": ")) from e


def _iter_npz(path: Path, specs: list[InputSpec], batch_size: int) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    by_name = {s.name: s for s in specs}
    for f in _npz_files(path):
        arrays = load_npz(f)
        ns = [_n_samples(arrays[k], s) for k, s in by_name.items() if k in arrays]
        n = min((x for x in ns if x is not None), default=0)
        for start in range(0, max(n, 1), batch_size):
            yield f"{f.name}[{start}:{start + batch_size}]", {
                k: _take(v, by_name.get(k), start, start + batch_size) for k, v in arrays.items()
            }


def _iter_feeds(source: Any) -> Iterator[tuple[str, Any]]:
    if hasattr(source, "get_next") and not isinstance(source, (dict, str, os.PathLike)):
        i = 0
        while True:
            feed = source.get_next()
            if feed is None:
                return
            yield f"CalibrationDataReader item {i}", feed
            i += 1
    for i, feed in enumerate(source):
        yield f"calibration item {i}", feed


def effective_batch_size(specs: list[InputSpec], batch_size: int) -> int:
    """``batch_size``, or the model's fixed batch size when its batch axes are static."""
    static = {s.static_batch for s in specs} - {None}
    return min(static) if static else batch_size


def iter_batches(source: str | os.PathLike | Iterable[dict] | Any, specs: list[InputSpec], *, batch_size: int = 32,
                 max_samples: int | None = None) -> Iterator[Batch]:
    """Checked feeds, at most ``max_samples`` samples in all, each input sliced along its own batch axis (see
    ``input_specs``). Files are cut into batches of ``batch_size`` (or the model's static batch size); Python
    feeds are used as given (each one a batch)."""
    static = {s.static_batch for s in specs} - {None}
    if static:
        if batch_size != min(static):
            log.info("batches of %d samples: the model's batch size is fixed (%s)", min(static),
                     describe_batch_axes(specs))
        batch_size = min(static)
    if isinstance(source, (str, os.PathLike)):
        items: Iterable[tuple[str, Any]] = _iter_npz(Path(source), specs, batch_size)
    else:
        items = _iter_feeds(source)
    seen = 0
    warned: set = set()
    by_name = {s.name: s for s in specs}

    def cut(feed: Batch, a: int, b: int) -> Batch:
        out = Batch({k: _take(v, by_name.get(k), a, b) for k, v in feed.items()})
        out.samples = b - a
        return out

    for where, feed in items:
        feed = _check_feed(feed, specs, where, warned)
        n = feed.samples
        if max_samples is not None and seen + n > max_samples:
            keep = max_samples - seen
            if keep <= 0:
                return
            feed = cut(feed, 0, keep)
            n = keep
        if static and n != batch_size:
            if n < batch_size:
                log.info("dropping a final batch of %d samples: the model's batch size is fixed at %d", n, batch_size)
                return
            for s in range(0, n - n % batch_size, batch_size):
                yield cut(feed, s, s + batch_size)
            seen += n - n % batch_size
            continue
        if n == 0:
            continue
        seen += n
        yield feed
        if max_samples is not None and seen >= max_samples:
            return


def feed_samples(feed: dict[str, np.ndarray], specs: list[InputSpec]) -> int:
    """Samples in a feed: what iter_batches counted, else the size of the first batch axis present."""
    if isinstance(feed, Batch):
        return feed.samples
    for s in specs:
        if s.name in feed:
            n = _n_samples(np.asarray(feed[s.name]), s)
            if n is not None:
                return n
    return 1


def count_samples(source: Any, specs: list[InputSpec], max_samples: int | None) -> int | None:
    """Samples a file source will yield (for progress bars); None for Python iterables."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    total = 0
    for f in _npz_files(Path(source)):
        shapes = npz_shapes(f)
        counts = [shapes[s.name][s.batch_axis] for s in specs
                  if s.batch_axis is not None and s.name in shapes and len(shapes[s.name]) > s.batch_axis]
        total += min(counts) if counts else 1
    return min(total, max_samples) if max_samples is not None else total
