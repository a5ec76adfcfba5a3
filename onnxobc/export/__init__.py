"""Writing the compressed model: :func:`apply` (every format, through one GraphEdit), the cost model, opset
conversion for QDQ, atomic save (external data when large)."""
from .apply import ExportOptions, Written, apply, storage_format
from .cost import LayerCost, layer_cost, weight_bytes
from .qdq import LayerGrid, add_qdq_weight, ensure_opset
from .save import save_model_atomic
from .writeback import GraphEdit, remove_unused, write_back

__all__ = ["ExportOptions", "GraphEdit", "LayerCost", "LayerGrid", "Written", "add_qdq_weight", "apply",
           "ensure_opset", "layer_cost", "remove_unused", "save_model_atomic", "storage_format", "weight_bytes",
           "write_back"]
