"""onnxobc: post-training pruning and quantization of ONNX models with Optimal Brain Compression."""
from ._version import __version__  # noqa: E402

from .config import CompressConfig  # noqa: E402
from .errors import CalibrationError, NumericalError, OnnxObcError, UnsupportedModel, UsageError  # noqa: E402
from .pipeline import CompressResult, compress  # noqa: E402

__all__ = ["__version__", "compress", "CompressConfig", "CompressResult", "OnnxObcError", "UsageError",
           "UnsupportedModel", "CalibrationError", "NumericalError"]
