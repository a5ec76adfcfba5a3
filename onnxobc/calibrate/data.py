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

from ..errors import CalibrationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for static dims, strings (or None) for symbolic ones

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and not (isinstance(self.shape[0], int) and self.shape[0] > 0)

    @property
    def static_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0 else None

    def describe(self) -> str:
        dims = ",".join(str(d) if d not in (None, "") else "?" for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a feed must provide (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def batched_inputs(specs: list[InputSpec]) -> set[str]:
    """Inputs whose axis 0 indexes samples: those with a symbolic first dim when the model has any (the
    others, e.g. a flag or a fixed table, are passed whole with every batch); all of them otherwise."""
    dyn = {s.name for s in specs if s.dynamic_batch}
    return dyn or {s.name for s in specs if s.shape}


def _check_feed(feed: dict[str, Any], specs: list[InputSpec], where: str, warned: set) -> dict[str, np.ndarray]:
    if not isinstance(feed, dict):
        raise CalibrationError(f"{where}: expected a dict {{input_name: array}}, got {type(feed).__name__}")
    out = {}
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
            raise CalibrationError(
                f"{where}: input '{spec.name}' has shape {a.shape} (rank {a.ndim}), the model expects rank "
                f"{len(spec.shape)} ({spec.describe()}); axis 0 must index samples"
            )
        for i, (d, m) in enumerate(zip(a.shape, spec.shape)):
            if i > 0 and isinstance(m, int) and m > 0 and d != m:
                raise CalibrationError(
                    f"{where}: input '{spec.name}' has shape {a.shape}, the model expects {spec.describe()} (axis {i} differs)"
                )
        out[spec.name] = a
    extra = sorted(set(map(str, feed)) - {s.name for s in specs})
    if extra and ("extra",) not in warned:
        log.info("ignoring calibration arrays that are not model inputs: %s", ", ".join(extra))
        warned.add(("extra",))
    batched = batched_inputs(specs)
    n = {v.shape[0] for k, v in out.items() if k in batched and v.ndim}
    if len(n) > 1:
        raise CalibrationError(f"{where}: inputs disagree on the number of samples along axis 0: {sorted(n)}")
    return out


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


def _iter_npz(path: Path, specs: list[InputSpec], batch_size: int) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    batched = batched_inputs(specs)
    for f in _npz_files(path):
        try:
            z = np.load(f, allow_pickle=False)
            arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise CalibrationError(f"cannot read {f} as .npz ({type(e).__name__}: {e})") from e
        n = min((arrays[k].shape[0] for k in batched if k in arrays and arrays[k].ndim), default=0)
        for start in range(0, max(n, 1), batch_size):
            yield f"{f.name}[{start}:{start + batch_size}]", {
                k: v[start:start + batch_size] if (k in batched and v.ndim) else v for k, v in arrays.items()
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


def iter_batches(source: str | os.PathLike | Iterable[dict] | Any, specs: list[InputSpec], *, batch_size: int = 32,
                 max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Checked feeds, at most ``max_samples`` samples in all. Files are cut into batches of ``batch_size``
    (or the model's static batch size); Python feeds are used as given (each one a batch)."""
    static = {s.static_batch for s in specs} - {None}
    if static:
        batch_size = min(static)
    if isinstance(source, (str, os.PathLike)):
        items: Iterable[tuple[str, Any]] = _iter_npz(Path(source), specs, batch_size)
    else:
        items = _iter_feeds(source)
    seen = 0
    warned: set = set()
    batched = batched_inputs(specs)

    def cut(feed: dict, a: int, b: int) -> dict:
        return {k: v[a:b] if k in batched else v for k, v in feed.items()}

    for where, feed in items:
        feed = _check_feed(feed, specs, where, warned)
        n = feed_samples(feed, specs)
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
    """Samples in a checked feed (axis 0 of its batched inputs)."""
    for k in batched_inputs(specs):
        if k in feed and feed[k].ndim:
            return int(feed[k].shape[0])
    return 1


def count_samples(source: Any, specs: list[InputSpec], max_samples: int | None) -> int | None:
    """Samples a file source will yield (for progress bars); None for Python iterables."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    total = 0
    for f in _npz_files(Path(source)):
        with np.load(f, allow_pickle=False) as z:
            names = [k for k in batched_inputs(specs) if k in z.files]
            if not names:
                continue
            total += z[names[0]].shape[0] if z[names[0]].ndim else 1
    return min(total, max_samples) if max_samples is not None else total
