"""Saving models: atomic writes, external data for outputs beyond the protobuf limit."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from ..graph.model_io import has_lazy, needs_external_data, split_external

log = logging.getLogger(__name__)


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``output`` atomically (temp files in the same folder, then rename).

    Models whose tensors exceed the protobuf limit are written with external data in ``<output>.data``
    automatically (``external_data=None``); True/False forces the choice. ``model`` is not modified, and its
    weights are never serialised in one message (one tensor at a time goes to the data file). The data file
    is moved into place before the .onnx that references it; nothing is left behind on failure. Returns the
    files written.
    """
    out = Path(output)
    if external_data is None:
        external_data = needs_external_data(model)
    external_data = external_data or has_lazy(model)  # lazy tensors' bytes are on disk: they go to the data file
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxobc-", dir=out.parent))
    written: list[Path] = []
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            data_name = out.name + ".data"
            onnx.save_model(split_external(model, tmpdir / data_name), str(tmp_model))
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
