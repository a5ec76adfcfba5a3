"""Writing the compressed model: weights back into the graph, atomic save (external data when large)."""
from .save import save_model_atomic
from .writeback import remove_unused, write_back

__all__ = ["save_model_atomic", "remove_unused", "write_back"]
