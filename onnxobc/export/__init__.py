"""Writing the compressed model: weights back into the graph, QDQ weights, atomic save (external data when large)."""
from .qdq import LayerGrid, add_qdq_weight, ensure_opset, insert_nodes
from .save import save_model_atomic
from .writeback import remove_unused, write_back

__all__ = ["LayerGrid", "add_qdq_weight", "ensure_opset", "insert_nodes", "save_model_atomic", "remove_unused",
           "write_back"]
