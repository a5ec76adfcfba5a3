"""ONNX in, no math: load models, find compressible layers, per-op adapters."""
from .adapters import OpLayout
from .layers import Consumer, GraphIndex, Layer, Skipped, find_layers, select_layers, tensor_types
from .model_io import check_output_path, load_model

__all__ = ["OpLayout", "Consumer", "GraphIndex", "Layer", "Skipped", "find_layers", "select_layers", "tensor_types",
           "check_output_path", "load_model"]
