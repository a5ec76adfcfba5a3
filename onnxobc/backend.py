"""The array-module shim: NumPy by default, CuPy on a CUDA device.

This is the only module that imports CuPy, and it does so lazily, so the CPU install never needs it.
Engine functions infer the module from their inputs with :func:`xp_of`.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .errors import UsageError

_cupy: ModuleType | None = None


def _import_cupy() -> ModuleType:
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415  (lazy on purpose)
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise UsageError(
                "--device cuda needs CuPy: install it with `pip install -e .[gpu]` (cupy-cuda13x)"
            ) from e
        _cupy = cupy
    return _cupy


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = _import_cupy()
        return bool(cp.cuda.is_available())
    except Exception:
        return False


def get_xp(device: str = "cpu") -> ModuleType:
    """Array module for a device name ('cpu' or 'cuda'); a clear error when CUDA is not usable."""
    if device == "cpu":
        return np
    if device == "cuda":
        cp = _import_cupy()
        if not cuda_available():
            raise UsageError("--device cuda: CuPy found no usable CUDA device; run on a GPU machine or use --device cpu")
        return cp
    raise UsageError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


def xp_of(*arrays: Any) -> ModuleType:
    """The array module (numpy or cupy) that owns the given arrays."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            return _import_cupy()
    return np


def to_numpy(a: Any) -> np.ndarray:
    """Copy an array of either module to host memory."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)
