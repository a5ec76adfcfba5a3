"""Loading and saving ONNX models: external data, atomic writes, the 2 GB protobuf limit."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import onnx

from ..errors import UnsupportedModel, UsageError

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it with a margin for the graph itself.
# Read at call time (needs_external_data): tests lower it to send tiny models down the >2 GB code path.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors above this many bytes leave the .onnx when a model is split for external data (as onnx.save_model's
# size_threshold); INT64 tensors always stay inline: ONNX Runtime cannot read a Reshape shape from external data.
_EXTERNAL_MIN_BYTES = 1024
# Offsets of tensors in a data file written here are multiples of this (ONNX Runtime can map them in place).
_EXTERNAL_ALIGN = 4096
_ELIDED = "__onnxobc_elided__"
# ONNX Runtime reads models whose tensors exceed this from a temporary external-data file (ModelFile) rather than
# from serialised bytes: the bytes, and the deep copy an augmented graph would need, cost two copies of the weights.
_FILE_SESSION_BYTES = 64 * 1024 * 1024
# Low-memory mode ('auto': for models whose tensors exceed _LOW_MEMORY_BYTES; 'on'; 'off'): sessions read from a
# ModelFile run with ONNX Runtime's weight prepacking off, so that it maps the file's weights instead of holding a
# repacked copy (the forward pass is ~1.3-1.6x slower). Set for the length of a run by :func:`low_memory_mode`.
_LOW_MEMORY_BYTES = 1024 ** 3
_low_memory = "auto"


def load_model(path: str | os.PathLike, sources: dict | None = None, *, lazy: bool = False) -> onnx.ModelProto:
    """Load a model (with its external data) and check that it is a well-formed ONNX graph.

    ``sources``, when given, receives where each main-graph initializer stored as external data lies on disk:
    {name: (file, offset, length)} (see :func:`mapped_tensor`: the weights can then be read without a copy).
    ``lazy``: a model whose external data exceeds :data:`_FILE_SESSION_BYTES` keeps its large float weights on
    disk: they stay *lazy* tensors (see :func:`is_lazy`) that every reader here resolves from the file, so the
    model costs no memory for them. Meant for runs that replace some weights and write the rest back out."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file not found: {p}")
    if p.is_dir():
        raise UsageError(f"{p} is a directory: give the path of an .onnx file")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
        found = _external_sources(model, p.parent)
        if sources is not None:
            sources.update(found)
        if lazy and sum(n for _, _, n in found.values()) > min(_FILE_SESSION_BYTES, _EXTERNAL_DATA_THRESHOLD):
            _make_lazy(model, found)  # the large float tensors point at their file by absolute path
        for t in onnx.external_data_helper._get_all_tensors(model):  # the rest into memory (as onnx.load does)
            if onnx.external_data_helper.uses_external_data(t) and not is_lazy(t):
                onnx.external_data_helper.load_external_data_for_tensor(t, str(p.parent))
    except Exception as e:  # protobuf DecodeError, missing external data file, ...
        raise UnsupportedModel(
            f"cannot read {p} as an ONNX model ({type(e).__name__}: {e}); check that the file is a complete "
            "ONNX model and that its external data files sit next to it"
        ) from e
    if not model.HasField("graph") or not model.graph.node:
        raise UnsupportedModel(f"{p} holds no ONNX graph (no nodes): is it really an .onnx model file?")
    validate(model, str(p), p)
    return model


_LAZY_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def _make_lazy(model: onnx.ModelProto, found: dict[str, tuple[Path, int, int]]) -> None:
    for t in model.graph.initializer:
        if t.name in found and t.data_type in _LAZY_TYPES and found[t.name][2] > _EXTERNAL_MIN_BYTES:
            path, offset, length = found[t.name]
            del t.external_data[:]
            for k, v in (("location", str(Path(path).resolve())), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v


def is_lazy(t: onnx.TensorProto) -> bool:
    """A tensor whose data stays in the input model's external data file: EXTERNAL with an absolute location (an
    in-memory form only: every writer here copies its bytes out; ONNX files hold relative locations)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return False
    loc = next((e.value for e in t.external_data if e.key == "location"), "")
    return os.path.isabs(loc)


def _lazy_source(t: onnx.TensorProto) -> tuple[Path, int, int]:
    info = {e.key: e.value for e in t.external_data}
    return Path(info["location"]), int(info.get("offset", 0)), int(info["length"])


def has_lazy(model: onnx.ModelProto) -> bool:
    """Whether any main-graph initializer of ``model`` is lazy (see :func:`is_lazy`)."""
    return any(is_lazy(t) for t in model.graph.initializer)


def tensor_value(t: onnx.TensorProto):
    """``numpy_helper.to_array`` that also reads lazy tensors (mapped from their file, read-only)."""
    from onnx import numpy_helper

    if is_lazy(t):
        v = mapped_tensor(t, _lazy_source(t))
        if v is not None:
            return v
        import numpy as np

        return np.frombuffer(_tensor_bytes_of(t), dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                             ).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read every lazy tensor of ``model`` into memory (in place): an ordinary in-memory model. Returns it."""
    for t in model.graph.initializer:
        if is_lazy(t):
            data = _tensor_bytes_of(t)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
    return model


def _external_sources(model: onnx.ModelProto, base: Path) -> dict[str, tuple[Path, int, int]]:
    out = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        try:
            out[t.name] = (base / info["location"], int(info.get("offset", 0)), int(info["length"]))
        except (KeyError, ValueError):
            continue
    return out


def mapped_tensor(t: onnx.TensorProto, source: tuple[Path, int, int]):
    """``t``'s value as a read-only array mapped from its external data file (no copy in memory: the pages are
    the file's, and the kernel may drop them), or None where that cannot be done (a type numpy does not map, a
    big-endian host, a length that does not match the dims)."""
    import sys

    import numpy as np

    path, offset, length = source
    if sys.byteorder != "little" or t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.BFLOAT16) \
            or t.data_type in _PACKED_4BIT:
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:  # noqa: BLE001  (a type numpy cannot name)
        return None
    shape = tuple(int(d) for d in t.dims)
    n = 1
    for d in shape:
        n *= d
    if n * dtype.itemsize != length or length == 0 or not Path(path).is_file():
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def ort_refusal(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> str | None:
    """Why ONNX Runtime cannot create a session for ``model`` (None: it can). ``path`` (the file the model came
    from) lets ONNX Runtime read it, external data included, instead of a serialised copy."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if path is not None:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        elif needs_external_data(model) or has_lazy(model):
            with ModelFile(model) as f:
                ort.InferenceSession(str(f.path), so, providers=["CPUExecutionProvider"])
        else:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (any refusal: invalid graph, unknown op, missing kernel, ...)
        return _first_line(e)
    return None


def validate(model: onnx.ModelProto, what: str, path: str | os.PathLike | None = None) -> str | None:
    """Accept every model ONNX Runtime can load: ``onnx.checker`` first; where it refuses (a graph output
    without a shape in its type, a newer IR version, ...), the model is still accepted when ONNX Runtime
    creates a session for it. Returns the checker's complaint that was overridden (None: the checker passed);
    raises UnsupportedModel, with both reasons, when ONNX Runtime refuses too."""
    try:
        if needs_external_data(model) or has_lazy(model):  # the checker serialises what it is given: the file or skeleton
            onnx.checker.check_model(str(path) if path is not None and Path(path).is_file() else split_external(model))
        else:
            onnx.checker.check_model(model)
        return None
    except onnx.checker.ValidationError as e:
        first = _first_line(e)
    why = ort_refusal(model, path)
    if why is not None:
        raise UnsupportedModel(f"{what} is not a valid ONNX model: {first} (and ONNX Runtime cannot load it: {why})")
    log.warning("%s: onnx.checker refuses it (%s) but ONNX Runtime loads it: continuing", what, first)
    return first


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data held in the message, from its dims and type: reading ``raw_data`` or calling
    ``ByteSize()`` would copy or serialise the data (seconds for a large weight); external data counts 0, except
    lazy tensors (model tensors not read into memory, see :func:`is_lazy`)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return _lazy_source(t)[2] if is_lazy(t) else 0
    if t.data_type == onnx.TensorProto.STRING:
        return t.ByteSize()
    n = 1
    for d in t.dims:
        n *= d
    if t.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001  (a type numpy cannot name: measure the message)
        return t.ByteSize()


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's initializers and Constant tensors (in memory, before saving)."""
    total = 0
    for init in model.graph.initializer:
        total += _nbytes(init)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += _nbytes(a.t)
    return total


def proto_bytes(model: onnx.ModelProto) -> int:
    """The model's serialised size (``ByteSize()``), also beyond 2 GB (the skeleton plus the tensors' bytes)."""
    if not needs_external_data(model) and not has_lazy(model):
        return model.ByteSize()
    return split_external(model).ByteSize() + sum(_nbytes(t) for t in model.graph.initializer if _elidable(t))


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot be serialised as one protobuf message (its tensors are near 2 GiB): it must then
    be saved with external data, checked, shape-inferred and given to ONNX Runtime through a file."""
    return tensor_bytes(model) > _EXTERNAL_DATA_THRESHOLD


def session_via_file(model: onnx.ModelProto) -> bool:
    """True when ONNX Runtime should read ``model`` from a ModelFile rather than from serialised bytes."""
    return tensor_bytes(model) > min(_FILE_SESSION_BYTES, _EXTERNAL_DATA_THRESHOLD) or has_lazy(model)


class low_memory_mode:
    """``with low_memory_mode("auto" | "on" | "off"):`` the mode of the sessions made meanwhile (see
    :func:`lean_session`); the previous mode is restored on exit."""

    def __init__(self, mode: str):
        if mode not in ("auto", "on", "off"):
            raise UsageError(f"--low-memory must be auto, on or off, got {mode!r}")
        self.mode = mode

    def __enter__(self):
        global _low_memory, _spill
        self.prev, _low_memory = (_low_memory, _spill), self.mode
        _spill = None
        return self

    def __exit__(self, *exc) -> None:
        global _low_memory, _spill
        if _spill is not None:
            _spill.cleanup()
        _low_memory, _spill = self.prev


_spill = None  # the temporary folder of spill_array during a low_memory_mode block


def spill_array(a):
    """``a`` written to a temporary file and mapped back read-only (low-memory runs keep the layers' solved weights
    on disk until they are written into the model). The folder lives until the enclosing
    :class:`low_memory_mode` block ends (or the process, outside one)."""
    global _spill
    import numpy as np

    if _spill is None:
        _spill = tempfile.TemporaryDirectory(prefix="onnxobc-spill-")
    path = Path(_spill.name) / f"{len(os.listdir(_spill.name))}.npy"
    np.save(path, np.ascontiguousarray(a))
    return np.load(path, mmap_mode="r")


def lean_session(tensor_bytes_: int) -> bool:
    """Whether a session of a model with this many tensor bytes, read from a file, runs without weight prepacking."""
    return _low_memory == "on" or (_low_memory == "auto" and tensor_bytes_ > _LOW_MEMORY_BYTES)


def _elidable(t: onnx.TensorProto) -> bool:
    return ((t.data_location != onnx.TensorProto.EXTERNAL or is_lazy(t)) and t.data_type not in (
            onnx.TensorProto.INT64, onnx.TensorProto.STRING) and _nbytes(t) > _EXTERNAL_MIN_BYTES)


def _tensor_bytes_of(t: onnx.TensorProto) -> bytes:
    if is_lazy(t):
        path, offset, length = _lazy_source(t)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise UnsupportedModel(f"initializer {t.name}: its external data file {path} ended early "
                                   "(was it changed while onnxobc ran?)")
        return data
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def _copy_except(src, dst, skip: set[str]) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _tensor_header(t: onnx.TensorProto, n: onnx.TensorProto) -> None:
    """Copy ``t``'s name, type, dims and descriptions into ``n``, not its data (``ListFields`` would hand out a
    copy of ``raw_data``: seconds for a large weight)."""
    n.name, n.data_type = t.name, t.data_type
    n.dims.extend(t.dims)
    if t.doc_string:
        n.doc_string = t.doc_string
    if t.HasField("segment"):
        n.segment.CopyFrom(t.segment)
    if hasattr(t, "metadata_props"):
        n.metadata_props.extend(t.metadata_props)


def split_external(model: onnx.ModelProto, data_file: str | os.PathLike | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose large main-graph initializers reference external data instead of holding it,
    small enough to serialise whatever the model's size; ``model`` itself is not modified, and its weights are
    not copied in memory (one tensor at a time, when written).

    With ``data_file``, the tensors' bytes are written there (offsets aligned for mapping) and the copy names
    that file by its base name: save the copy next to it and ONNX Runtime / onnx.load read the whole model.
    Without, the copy is a skeleton for what needs only the graph, shapes and types (shape inference, the
    checker, the version converter, hashing): its elided tensors name a location that does not exist."""
    out = onnx.ModelProto()
    _copy_except(model, out, {"graph"})
    _copy_except(model.graph, out.graph, {"initializer"})
    f = open(data_file, "wb") if data_file is not None else None
    location = Path(data_file).name if data_file is not None else _ELIDED
    offset = 0
    try:
        for t in model.graph.initializer:
            if not _elidable(t):
                out.graph.initializer.add().CopyFrom(t)
                continue
            n = out.graph.initializer.add()
            _tensor_header(t, n)
            n.data_location = onnx.TensorProto.EXTERNAL
            length = 0
            if f is not None:
                data = _tensor_bytes_of(t)
                pad = (-offset) % _EXTERNAL_ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(data)
                length = len(data)
                del data
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                e = n.external_data.add()
                e.key, e.value = k, v
            offset += length
    finally:
        if f is not None:
            f.close()
    return out


def restore_elided(small: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """``small`` (made from a skeleton of ``model``, see :func:`split_external`) with its elided main-graph
    initializers replaced, by name, by ``model``'s full tensors. Returns ``small``."""
    full = {t.name: t for t in model.graph.initializer}
    for t in small.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and any(e.key == "location" and e.value == _ELIDED
                                                                 for e in t.external_data):
            if t.name not in full:
                raise UnsupportedModel(f"initializer {t.name}: its data was elided and the model has no such tensor")
            t.CopyFrom(full[t.name])
    return small


class ModelFile:
    """``model`` written with external data to a temporary folder (``.path``: the .onnx, its data beside it), for
    what must read a model beyond 2 GB from a file (ONNX Runtime sessions). ``edit`` may change the written graph
    (e.g. add outputs) without copying the weights. The folder is removed by ``close()``, at the end of a
    ``with`` block, or when the object is collected; an open session keeps the weights it has read."""

    def __init__(self, model: onnx.ModelProto, edit: Callable[[onnx.ModelProto], None] | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="onnxobc-model-"))
        self.tensor_bytes = tensor_bytes(model)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        try:
            self.path = self.dir / "model.onnx"
            small = split_external(model, self.dir / "model.onnx.data")
            if edit is not None:
                edit(small)
            onnx.save_model(small, str(self.path))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._cleanup()

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` (strict_mode off) on the model's skeleton: shapes and types only,
    large initializers keep their dims but not their data (inference reads no weight values; integer tensors and
    tensors under 1 KiB, which shapes may depend on, stay whole). So it works beyond 2 GB, and costs no copy of the
    weights (serialising the whole model would cost two: the message and onnx's parse of it). Raises what onnx
    raises; the result's elided initializers hold no data."""
    return onnx.shape_inference.infer_shapes(split_external(model), strict_mode=False)


def model_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the model: of its serialised bytes, or beyond 2 GB of its skeleton and its large tensors'
    bytes in order (serialising the whole model is impossible there)."""
    if not needs_external_data(model) and not has_lazy(model):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    h = hashlib.sha256(split_external(model).SerializeToString())
    for t in model.graph.initializer:
        if _elidable(t):
            h.update(_tensor_bytes_of(t))
    return h.hexdigest()


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike], force: bool) -> Path:
    """Refuse to write over the input model (ever) or over an existing file (unless ``force``)."""
    out = Path(output)
    for i in inputs:
        if out.resolve() == Path(i).resolve():
            raise UsageError(f"output {out} is the input model: choose another output path (the input is never modified)")
    if out.exists() and out.is_dir():
        raise UsageError(f"output {out} is a directory: give a file path such as {out / 'model.obc.onnx'}")
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists: choose another path or pass --force to overwrite it")
    if not out.parent.exists():
        raise UsageError(f"output directory {out.parent} does not exist: create it first")
    return out


def _external_locations(model: onnx.ModelProto) -> set[str]:
    """Files named by tensors stored as external data (main graph, subgraphs, Constant attributes)."""
    locs: set[str] = set()

    def tensors(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from tensors(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from tensors(g)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    locs.add(e.value)
    return locs


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an .onnx file plus the external data files it references."""
    p = Path(path)
    size = p.stat().st_size
    try:
        bare = onnx.load_model(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001  (load_model then reports what is wrong with the file)
        return size
    for loc in _external_locations(bare):
        f = p.parent / loc
        if f.is_file():
            size += f.stat().st_size
    return size
