"""ONNX in, no math: load/save models, find compressible layers, per-op adapters, write weights back."""
from .adapters import OpLayout
from .layers import Consumer, Layer, Skipped, find_layers, remove_unused, select_layers, tensor_types, write_back
from .model_io import check_output_path, load_model, save_model_atomic

__all__ = [
    "OpLayout", "Consumer", "Layer", "Skipped", "find_layers", "remove_unused", "select_layers", "tensor_types",
    "write_back", "check_output_path", "load_model", "save_model_atomic",
]
