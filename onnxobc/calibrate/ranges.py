"""Static activation ranges for W8A8 (``--act-bits``): per-tensor statistics gathered during calibration.

One :class:`RangeObserver` watches a list of tensors while :func:`collect_hessians` runs the model on the
calibration batches (one pass over the data, no second run). Per tensor it keeps the exact minimum and maximum
and a bounded random sample of values (a fixed number per batch, thinned evenly when it grows too large), from
which the clipping range is chosen:

* ``minmax``: the observed [min, max] (nothing is clipped; robust and the default);
* ``percentile``: the ``p``-th and ``(100 - p)``-th percentiles of the sample (``p`` = 99.99 by default);
* ``mse``: the shrink factor of the observed range (1.0 down to 0.2, both ends alike) that minimises the mean
  squared quantization error of the sample on the resulting grid.

Every range contains 0, so zero (padding, ReLU outputs) is exact. With a token mask, positions of padding tokens
are left out of the statistics of [batch, sequence, ...] tensors, as they are left out of the Hessians.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import ACT_CALIB
from ..engine.grid import quantize, shrink_factors, tensor_params

_PER_BATCH = 1 << 16  # sampled values per tensor and batch
_MAX_SAMPLE = 1 << 20  # values kept per tensor
_MSE_STEPS = 81  # shrink factors 1.00, 0.99, ..., 0.20


@dataclass
class ActQuantParams:
    """Per-tensor uint8 (or narrower) asymmetric quantization of one activation."""

    scale: float
    zero_point: int
    bits: int
    lo: float  # the chosen range (after clipping), for reports
    hi: float
    observed_min: float
    observed_max: float

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


params_from_range = tensor_params  # one quantizer: the grid math lives in onnxobc.engine.grid


def fake_quant(x: np.ndarray, scale: float, zp: int, bits: int) -> np.ndarray:
    """What QuantizeLinear -> DequantizeLinear computes (round half to even, saturate)."""
    return quantize(x, np.float32(scale), zp, (1 << bits) - 1)


@dataclass
class _TensorStats:
    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0
    parts: list = field(default_factory=list)
    kept: int = 0


class RangeObserver:
    """Collects activation statistics for ``tensors``; give it to :func:`collect_hessians` as an observer."""

    def __init__(self, tensors: list[str], *, seed: int = 0):
        self.tensors = list(dict.fromkeys(tensors))
        self.stats = {t: _TensorStats() for t in self.tensors}
        self.rng = np.random.default_rng(seed)

    def update(self, values: dict[str, np.ndarray], token_mask: np.ndarray | None = None) -> None:
        for t in self.tensors:
            x = np.asarray(values[t])
            if not np.issubdtype(x.dtype, np.floating):
                continue
            if token_mask is not None and x.ndim >= 3 and x.shape[:2] == token_mask.shape:
                x = x[token_mask]
            x = x.ravel()
            if x.size == 0:
                continue
            st = self.stats[t]
            ok = np.isfinite(x)
            finite = x if ok.all() else x[ok]
            if finite.size == 0:
                continue
            st.lo = min(st.lo, float(finite.min()))
            st.hi = max(st.hi, float(finite.max()))
            st.count += finite.size
            take = finite if finite.size <= _PER_BATCH else finite[self.rng.integers(0, finite.size, _PER_BATCH)]
            st.parts.append(take.astype(np.float32, copy=True))
            st.kept += take.size
            if st.kept > 2 * _MAX_SAMPLE:  # thin evenly: every stored value is kept with the same probability
                allv = np.concatenate(st.parts)
                st.parts = [allv[self.rng.permutation(allv.size)[:_MAX_SAMPLE]]]
                st.kept = _MAX_SAMPLE

    def sample(self, t: str) -> np.ndarray:
        st = self.stats[t]
        return np.concatenate(st.parts) if st.parts else np.zeros(0, np.float32)

    def params(self, t: str, bits: int = 8, method: str = "minmax", percentile: float = 99.99) -> ActQuantParams:
        """The quantization parameters of tensor ``t`` (see the module docstring for the methods)."""
        if method not in ACT_CALIB:
            raise ValueError(f"activation calibration must be one of {', '.join(ACT_CALIB)}, got {method!r}")
        if method == "search":  # the starting point of calibrate.actsearch
            method = "percentile"
        st = self.stats[t]
        if st.count == 0:  # never seen a finite value: an identity-ish grid that keeps 0 exact
            lo = hi = 0.0
        else:
            lo, hi = st.lo, st.hi
        olo, ohi = lo, hi
        if st.count and method == "percentile":
            x = self.sample(t)
            lo = float(np.percentile(x, 100.0 - percentile))
            hi = float(np.percentile(x, percentile))
        elif st.count and method == "mse":
            x = self.sample(t)
            best = np.inf
            for p in shrink_factors(_MSE_STEPS):
                s, z = params_from_range(p * olo, p * ohi, bits)
                err = float(np.mean((fake_quant(x, s, z, bits) - x) ** 2))
                if err < best:
                    best, lo, hi = err, p * olo, p * ohi
        scale, zp = params_from_range(lo, hi, bits)
        return ActQuantParams(scale, zp, bits, min(lo, 0.0), max(hi, 0.0), olo, ohi)
