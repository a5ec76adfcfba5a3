"""Creating ONNX Runtime sessions from in-memory models, including ones beyond the 2 GB protobuf limit."""
from __future__ import annotations

from typing import Any

import onnx

from .graph.model_io import ModelFile, lean_session, session_via_file


def session_source(model: onnx.ModelProto | bytes | ModelFile) -> bytes | ModelFile:
    """What ONNX Runtime reads ``model`` from: its serialised bytes, or beyond 2 GB a temporary ModelFile
    (external data). Serialise (or write) once where several sessions of one model are made."""
    if isinstance(model, (bytes, ModelFile)):
        return model
    return ModelFile(model) if session_via_file(model) else model.SerializeToString()


def inference_session(model: onnx.ModelProto | bytes | ModelFile, so: Any, providers: list[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (a ModelProto, its serialised bytes, or a ModelFile).
    A ModelProto too large to serialise in one message is written with external data to a temporary folder
    that is removed once the session holds the weights; ``model`` is never modified."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    if isinstance(model, bytes):
        return ort.InferenceSession(model, so, providers=providers)
    if isinstance(model, ModelFile):
        if lean_session(model.tensor_bytes):  # ONNX Runtime then maps the file's weights instead of repacking them
            so.add_session_config_entry("session.disable_prepacking", "1")
        return ort.InferenceSession(str(model.path), so, providers=providers)
    if session_via_file(model):
        with ModelFile(model) as f:
            return inference_session(f, so, providers)
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
