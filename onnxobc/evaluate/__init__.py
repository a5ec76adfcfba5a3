"""Run a dense (reference) and a compressed (candidate) model on the same data and compare them: output error,
class agreement, accuracy against labels, file size and latency."""
from .metrics import DEFINITIONS, OutputAccumulator, OutputMetrics
from .runner import EvalResult, check_interfaces, evaluate, model_file_bytes

__all__ = [
           "DEFINITIONS",
           "EvalResult",
           "OutputAccumulator",
           "OutputMetrics",
           "check_interfaces",
           "evaluate",
           "model_file_bytes",
]
