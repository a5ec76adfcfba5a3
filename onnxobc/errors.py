"""Exceptions raised by onnxobc.

Every error carries a message that says what was wrong and what to do; the CLI prints it on one line
and exits non-zero (the traceback only with --debug).
"""


class OnnxObcError(Exception):
    """Base class of all errors onnxobc raises on purpose."""


class UsageError(OnnxObcError):
    """Incompatible or invalid options (also raised as ValueError by the config)."""


class UnsupportedModel(OnnxObcError):
    """The model cannot be loaded, parsed or rewritten."""


class CalibrationError(OnnxObcError):
    """Calibration data does not fit the model, or ONNX Runtime failed on it."""


class NumericalError(OnnxObcError):
    """A layer's problem is numerically unsolvable (e.g. Cholesky fails even after damping)."""
