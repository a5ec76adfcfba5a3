"""The only place ONNX Runtime runs for statistics: data readers, graph augmentation, Hessians."""
from .data import InputSpec, count_samples, input_specs, iter_batches
from .hessian import LayerStats, augment, collect_hessians, find_token_mask, make_session

__all__ = ["InputSpec", "count_samples", "input_specs", "iter_batches", "LayerStats", "augment",
           "collect_hessians", "find_token_mask", "make_session"]
