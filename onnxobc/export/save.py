"""Saving models: atomic writes, external data for outputs beyond the protobuf limit."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from ..graph.model_io import _EXTERNAL_DATA_THRESHOLD, tensor_bytes

log = logging.getLogger(__name__)


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``output`` atomically (temp files in the same folder, then rename).

    Models whose tensors exceed the protobuf limit are written with external data in ``<output>.data``
    automatically (``external_data=None``); True/False forces the choice. Returns the files written.
    """
    out = Path(output)
    if external_data is None:
        external_data = tensor_bytes(model) > _EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxobc-", dir=out.parent))
    written: list[Path] = []
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            data_name = out.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            # save_model converts the in-memory model to reference external data; restore it for the caller.
            onnx.load_external_data_for_model(model, str(tmpdir))
            os.replace(tmpdir / data_name, out.parent / data_name)
            written.append(out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
        written.insert(0, out)
        log.info("wrote %s", ", ".join(map(str, written)))
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
