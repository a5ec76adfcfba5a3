"""Loading and saving ONNX models: external data, atomic writes, the 2 GB protobuf limit."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from ..errors import UnsupportedModel, UsageError

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it with a margin for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model (with its external data) and check that it is a well-formed ONNX graph."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file not found: {p}")
    if p.is_dir():
        raise UsageError(f"{p} is a directory: give the path of an .onnx file")
    try:
        model = onnx.load_model(str(p), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, missing external data file, ...
        raise UnsupportedModel(
            f"cannot read {p} as an ONNX model ({type(e).__name__}: {e}); check that the file is a complete "
            "ONNX model and that its external data files sit next to it"
        ) from e
    if not model.HasField("graph") or not model.graph.node:
        raise UnsupportedModel(f"{p} holds no ONNX graph (no nodes): is it really an .onnx model file?")
    validate(model, str(p), p)
    return model


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
        src = str(path) if path is not None else model.SerializeToString()
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (any refusal: invalid graph, unknown op, missing kernel, ...)
        return _first_line(e)
    return None


def validate(model: onnx.ModelProto, what: str, path: str | os.PathLike | None = None) -> str | None:
    """Accept every model ONNX Runtime can load: ``onnx.checker`` first; where it refuses (a graph output
    without a shape in its type, a newer IR version, ...), the model is still accepted when ONNX Runtime
    creates a session for it. Returns the checker's complaint that was overridden (None: the checker passed);
    raises UnsupportedModel, with both reasons, when ONNX Runtime refuses too."""
    try:
        onnx.checker.check_model(model)
        return None
    except onnx.checker.ValidationError as e:
        first = _first_line(e)
    why = ort_refusal(model, path)
    if why is not None:
        raise UnsupportedModel(f"{what} is not a valid ONNX model: {first} (and ONNX Runtime cannot load it: {why})")
    log.warning("%s: onnx.checker refuses it (%s) but ONNX Runtime loads it: continuing", what, first)
    return first


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's initializers and Constant tensors (in memory, before saving)."""
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) or init.ByteSize()
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += len(a.t.raw_data) or a.t.ByteSize()
    return total


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
