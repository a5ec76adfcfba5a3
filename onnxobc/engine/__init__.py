"""The numerical engine: exact greedy pruning and quantization of one layer (ALGORITHMS.md sec. 0-4).

Pure array code (NumPy or CuPy, inferred from the inputs); no ONNX, no I/O, no printing. The pipeline calls
:func:`solve` (one layer under a :class:`LayerSpec`, the method looked up in :data:`SOLVERS`); below it:

- :func:`prepare_hessian` - dead inputs, damping with escalation, inverse (sec. 0);
- :func:`prune_unstructured` - ExactOBS with a global mask (sec. 1);
- :func:`prune_nm`, :func:`prune_blocks` - N:M and block sparsity (sec. 2);
- :func:`quantize_obq` - OBQ, optionally of the survivors of a mask (sec. 3);
- :func:`compress_weight` - one entry point for all of the above and their compound;
- :func:`compress_groups` - the same for grouped layers, one global mask over all groups;
- :func:`quantize_gptq`, :func:`prune_sparsegpt` - the fast modes for large layers (sec. 6: fixed column order,
  lazy block updates; :func:`~onnxobc.engine.gptq.fast_obs` for several matrices at once);

each returning an :class:`EngineResult`. Naive reference implementations live in :mod:`.reference`.
"""
from .gptq import prune_sparsegpt, quantize_gptq
from .hessian import prepare_hessian
from .obq import quantize_obq
from .obs import prune_blocks, prune_nm, prune_unstructured
from .result import EngineResult
from .solver import SOLVERS, LayerResult, Note, Problem, compress_groups, compress_weight, register_solver, solve
from .spec import LayerSpec

__all__ = [
    "EngineResult",
    "LayerResult",
    "LayerSpec",
    "Note",
    "Problem",
    "SOLVERS",
    "compress_groups",
    "compress_weight",
    "prepare_hessian",
    "prune_blocks",
    "prune_nm",
    "prune_sparsegpt",
    "prune_unstructured",
    "quantize_gptq",
    "quantize_obq",
    "register_solver",
    "solve",
]
