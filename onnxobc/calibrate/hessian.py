"""Recording layer inputs with ONNX Runtime and accumulating one Hessian per layer (and group).

H = 2 X X^T / n_samples (ALGORITHMS.md section 0), accumulated in float64 while streaming over batches:
memory holds one batch's activations, never the dataset's.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..errors import CalibrationError
from .data import feed_samples, input_specs
from ..graph.layers import Layer, tensor_types
from ..runtime import inference_session

log = logging.getLogger(__name__)

# Upper bound on the float64 columns unfolded at once for one layer (im2col of big feature maps).
_UNFOLD_BYTES = 256 << 20


@dataclass
class LayerStats:
    """Accumulated second moments of one layer's input columns."""

    xtx: np.ndarray  # (groups, C, C) float64, sum over columns of x x^T
    columns: int = 0  # columns seen (samples x positions)
    samples: int = 0

    def hessian(self) -> np.ndarray:
        """H = 2 X X^T / n_samples, one C x C matrix per group."""
        return self.xtx * (2.0 / max(self.samples, 1))

    @property
    def has_hessian(self) -> bool:
        """False when collected with ``hessians=False`` (counts only)."""
        return self.xtx.shape[1] > 0

    @property
    def positions_per_sample(self) -> float:
        return self.columns / max(self.samples, 1)


def make_session(model: onnx.ModelProto, providers: list[str] | None = None):
    """An ONNX Runtime session with graph optimisations off (so every recorded tensor survives)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    providers = providers or ["CPUExecutionProvider"]
    try:
        return inference_session(model, so, providers)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"ONNX Runtime cannot load the model: {msg}") from e


def augment(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose graph also outputs ``tensors`` (those that are not graph inputs)."""
    aug = copy.deepcopy(model)
    inputs = {i.name for i in aug.graph.input}
    outputs = {o.name for o in aug.graph.output}
    types = tensor_types(model)
    fetch = []
    for t in dict.fromkeys(tensors):
        if t in inputs:
            continue
        if t not in outputs:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None))
        fetch.append(t)
    return aug, fetch


def find_token_mask(model: onnx.ModelProto, name: str | None = "auto") -> str | None:
    """The graph input that marks real tokens (1) and padding (0), for transformer calibration.

    ``"auto"`` picks a rank-2 integer/bool input called ``attention_mask`` (the Hugging Face convention);
    ``None`` or ``"none"`` disables masking; any other value must name a rank-2 graph input."""
    if name in (None, "none"):
        return None
    specs = {s.name: s for s in input_specs(model)}
    if name == "auto":
        for s in specs.values():
            if s.name.lower().endswith("attention_mask") and len(s.shape) == 2 and s.dtype.kind in "iub":
                return s.name
        return None
    if name not in specs:
        raise CalibrationError(f"--token-mask {name}: the model has no such input (inputs: {', '.join(specs)})")
    if len(specs[name].shape) != 2:
        raise CalibrationError(f"--token-mask {name}: expected a [batch, sequence] input, got {specs[name].describe()}")
    return name


def collect_hessians(model: onnx.ModelProto, layers: list[Layer], batches: Iterable[dict[str, np.ndarray]],
                     *, providers: list[str] | None = None,
                     progress: Callable[[Iterable, str, int | None], Iterable] | None = None,
                     total: int | None = None, token_mask: str | None = None,
                     observers: list | None = None, hessians: bool = True) -> dict[str, LayerStats]:
    """Run the model on every batch and accumulate each layer's X X^T (per group; summed over the nodes
    that share a weight).

    ``observers`` (e.g. :class:`~onnxobc.calibrate.ranges.RangeObserver`) name extra ``tensors`` to fetch and
    get ``update(values, token_mask)`` after every batch, in the same pass over the data.

    ``hessians=False`` only counts samples and columns (for MAC counts), leaving ``xtx`` empty: the data-free
    baselines need no Hessian unless a per-layer error is wanted, and the im2col products are the bulk of
    calibrating a CNN.

    With ``token_mask`` (a [batch, sequence] input, see :func:`find_token_mask`), MatMul/Gemm inputs of shape
    [batch, sequence, ...] keep only the positions of real tokens: padding never reaches the deployed model's
    outputs that matter, so it must not shape the Hessian."""
    specs = input_specs(model)
    wanted = [c.input_name for layer in layers for c in layer.consumers]
    observers = list(observers or [])
    wanted += [t for ob in observers for t in ob.tensors]
    aug, fetch = augment(model, wanted)
    sess = make_session(aug, providers)
    stats = {
        layer.name: LayerStats(np.zeros((layer.groups, layer.cols, layer.cols) if hessians else (layer.groups, 0, 0),
                                        dtype=np.float64)) for layer in layers
    }
    it: Iterable = batches
    if progress is not None:
        it = progress(batches, "calibrating", total)
    nb = 0
    for feed in it:
        try:
            outs = sess.run(fetch, feed) if fetch else []
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CalibrationError(f"ONNX Runtime failed on calibration batch {nb}: {msg}") from e
        values: dict[str, Any] = dict(zip(fetch, outs))
        values.update(feed)
        n = feed_samples(feed, specs)
        mask = None if token_mask is None else np.asarray(feed[token_mask]) != 0
        for ob in observers:
            ob.update(values, mask)
        for layer in layers:
            st = stats[layer.name]
            for c in layer.consumers:
                x = np.asarray(values[c.input_name])
                if mask is not None and layer.op != "Conv" and x.ndim >= 3 and x.shape[:2] == mask.shape:
                    x = x[mask]  # real tokens only: (tokens, ..., K)
                if layer.op == "MatMul" and x.shape[-1] != layer.weight.shape[0]:
                    raise CalibrationError(f"{c.node_name}: input has last dim {x.shape[-1]}, weight expects {layer.weight.shape[0]}")
                if not hessians:
                    if c.layout.op == "Conv":
                        st.columns += len(x) * c.layout.positions_per_sample(x.shape, layer.weight.shape)
                    else:
                        st.columns += x.size // max(layer.cols, 1)
                    continue
                # unfold a slice of samples at a time so im2col of large feature maps stays within a budget
                per_sample = layer.groups * layer.cols * max(c.layout.positions_per_sample(x.shape, layer.weight.shape), 1) * 8
                step = max(1, _UNFOLD_BYTES // per_sample) if x.ndim > 1 and c.layout.op != "Gemm" else max(len(x), 1)
                for s in range(0, max(len(x), 1), step):
                    xtx, ncols = c.layout.gram(x[s:s + step] if x.ndim > 1 else x, layer.weight.shape)
                    if xtx.shape[1] != layer.cols:
                        raise CalibrationError(
                            f"{c.node_name}: unfolded input has {xtx.shape[1]} rows, the weight has fan-in {layer.cols}"
                        )
                    st.xtx += xtx
                    st.columns += ncols
            st.samples += n
        nb += 1
    if nb == 0:
        raise CalibrationError("the calibration data yielded no samples: give at least one sample per input")
    return stats
