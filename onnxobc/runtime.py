"""Creating ONNX Runtime sessions from in-memory models, including ones beyond the 2 GB protobuf limit."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from .graph.model_io import _EXTERNAL_DATA_THRESHOLD, tensor_bytes


def inference_session(model: onnx.ModelProto, so: Any, providers: list[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model``. Models too large to serialise in one message are
    written with external data to a temporary folder that is removed once the session holds the weights."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    if tensor_bytes(model) > _EXTERNAL_DATA_THRESHOLD:
        with tempfile.TemporaryDirectory(prefix="onnxobc-session-") as tmp:
            f = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(f), save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(f), so, providers=providers)
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
