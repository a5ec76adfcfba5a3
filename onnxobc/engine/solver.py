"""One layer in, one :class:`LayerResult` out: the engine's entry points.

- :func:`compress_weight` / :func:`compress_groups`: any supported combination of pruning and quantization of
  one matrix (or of a grouped layer's matrices, with one global mask), on arrays;
- :func:`solve`: a whole layer (:class:`Problem`: its matrices, Hessians and column order) under a
  :class:`~onnxobc.engine.spec.LayerSpec`, with the method looked up in :data:`SOLVERS` (exact, magnitude,
  rtn, the fast modes gptq and sparsegpt, and auto, which picks per layer between exact and a fast mode).
  Pure: arrays in, a typed result out; nothing here knows ONNX.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import get_xp, to_numpy, xp_of
from .baselines import magnitude_prune, magnitude_prune_nm, rtn_quantize
from .gptq import fast_obs
from .grid import Grid, check_group_size
from .metrics import error_terms
from .obq import quantize_obq
from .obs import global_prune, global_prune_levels, prune_blocks, prune_nm, prune_unstructured
from .result import EngineResult
from .spec import METHODS, LayerSpec, check_method

__all__ = ["Problem", "LayerResult", "Note", "SOLVERS", "register_solver", "solve", "solve_lookup", "compress_weight",
           "compress_groups", "solve_many"]


# ------------------------------------------------------------------------------------------ array entry points
def check_options(name: str, sparsity: float | None, nm: tuple[int, int] | None, block_size: int | None,
                   bits: int | None, group_size: int | None = None) -> None:
    """Invalid combinations of the compression options raise ValueError."""
    if nm is not None and sparsity is not None:
        raise ValueError(f"{name}: nm=(n, m) and sparsity are exclusive (N:M fixes the sparsity at 1 - n/m)")
    if nm is not None and block_size is not None:
        raise ValueError(f"{name}: nm=(n, m) and block_size are exclusive")
    if block_size is not None and sparsity is None:
        raise ValueError(f"{name}: block_size needs a sparsity (the fraction of weights to zero in blocks)")
    if nm is not None and len(tuple(nm)) != 2:
        raise ValueError(f"{name}: nm must be a pair (n, m), got {nm!r}")
    if sparsity is None and nm is None and bits is None:
        raise ValueError(f"{name}: nothing to do: give sparsity, nm=(n, m), block_size with sparsity, and/or bits")
    if group_size is not None:
        if bits is None:
            raise ValueError(f"{name}: group_size (group-wise quantization grids) needs bits")
        try:
            check_group_size(group_size)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def _quantize_survivors(pr: EngineResult, H: Any, bits: int, *, sym: bool, grid_method: str, name: str,
                        dtype: str, group_size: int | None = None) -> EngineResult:
    """Compound compression (sec. 3): OBQ of a pruned layer's survivors with its zeros frozen."""
    xp = xp_of(pr.weight, H)
    mask = pr.weight != 0
    if bool(xp.all(mask | (xp.diagonal(H) == 0)[None, :])):
        mask = None  # nothing pruned but dead inputs (zero either way): the faster unmasked path
    q = quantize_obq(pr.weight, H, bits, sym=sym, grid_method=grid_method, mask=mask, damp=pr.info["damp"],
                     name=name, dtype=dtype, group_size=group_size)
    info = dict(q.info)
    info["prune"] = pr.info
    return EngineResult(q.weight, q.grid, pr.loss + q.loss, info)


def compress_weight(w: Any, H: Any, *, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    block_size: int | None = None, bits: int | None = None, sym: bool = False,
                    grid_method: str = "minmax", damp: float = 0.01, name: str = "layer",
                    dtype: str = "float32", group_size: int | None = None) -> EngineResult:
    """One layer, any supported combination (sec. 1-3).

    Pruning: ``sparsity`` alone (unstructured, global mask), ``nm=(n, m)`` (N:M) or ``block_size`` with
    ``sparsity`` (block sparsity); then, if ``bits`` is given, OBQ of the survivors with the zeros frozen
    (compound compression, sec. 3). ``loss`` is the sum of both stages' greedy losses; ``info`` holds the
    pruning stage's info under ``'prune'``. ``group_size`` (with ``bits``): one grid per row and group of
    ``group_size`` consecutive columns instead of one per row. Invalid combinations raise ValueError.
    """
    check_options(name, sparsity, nm, block_size, bits, group_size)
    kw = dict(damp=damp, name=name, dtype=dtype)
    if nm is not None:
        pr = prune_nm(w, H, nm[0], nm[1], **kw)
    elif block_size is not None:
        pr = prune_blocks(w, H, block_size, sparsity, **kw)
    elif sparsity is not None:
        pr = prune_unstructured(w, H, sparsity, **kw)
    else:
        pr = None
    if bits is None:
        return pr
    if pr is None:
        return quantize_obq(w, H, bits, sym=sym, grid_method=grid_method, damp=damp, name=name, dtype=dtype,
                            group_size=group_size)
    return _quantize_survivors(pr, H, bits, sym=sym, grid_method=grid_method, name=name, dtype=dtype,
                               group_size=group_size)


def compress_groups(ws: Any, Hs: Any, *, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    block_size: int | None = None, bits: int | None = None, sym: bool = False,
                    grid_method: str = "minmax", damp: float = 0.01, name: str = "layer",
                    dtype: str = "float32", group_size: int | None = None) -> list[EngineResult]:
    """:func:`compress_weight` for a layer made of several groups (grouped / depthwise Conv), one
    ``ws[g]`` (rows x C) and ``Hs[g]`` (C x C) per group.

    Unstructured and block sparsity select globally over ALL groups (one mask for the layer, as for a
    single matrix: a depthwise conv's 3x3 rows are not each forced to the same sparsity); N:M and
    quantization are per row anyway and run group by group (``group_size`` grids: per row and group of
    columns of each matrix, so a layer's grid is the groups' grids stacked along the rows).
    """

    g = len(ws)
    names = [name if g == 1 else f"{name}[group {i}]" for i in range(g)]
    if g == 1 or nm is not None or sparsity is None:
        return [compress_weight(ws[i], Hs[i], sparsity=sparsity, nm=nm, block_size=block_size, bits=bits, sym=sym,
                                grid_method=grid_method, damp=damp, name=names[i], dtype=dtype, group_size=group_size)
                for i in range(g)]
    check_options(name, sparsity, nm, block_size, bits, group_size)
    pruned = global_prune(list(ws), list(Hs), sparsity, None if block_size is None else int(block_size), damp=damp,
                           name=name, dtype=dtype)
    if bits is None:
        return pruned
    return [_quantize_survivors(pr, Hs[i], bits, sym=sym, grid_method=grid_method, name=names[i], dtype=dtype,
                                group_size=group_size) for i, pr in enumerate(pruned)]


# ------------------------------------------------------------------------------------------------ layer solve
@dataclass(frozen=True)
class Note:
    """Something the report should say about a layer: ``kind`` for programs, ``text`` for people."""

    kind: str  # 'left_dense' | 'not_pruned' | 'per_channel_grid' | 'damp_raised' | 'solver' (auto's choice) | 'lookup'
    text: str
    value: Any = None


@dataclass
class Problem:
    """One layer as the engine sees it.

    ``mats``: (groups, rows, C) float32 weights, columns in the stored order; ``hessian``: (groups, C, C)
    float64 or None (data-free baselines without a layer error); ``channels_last``: the column order in which
    N:M and block patterns and quantization groups run (None: the stored order); ``group_check``: why a
    group size cannot be stored for this layer (None: it can), from the layer's op adapter.
    """

    name: str
    mats: np.ndarray
    hessian: np.ndarray | None = None
    channels_last: np.ndarray | None = None
    group_check: Callable[[int], str | None] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mats.shape)


@dataclass
class LayerResult:
    """What :func:`solve` computed for one layer.

    ``mats``: the new weights (groups, rows, C), stored column order, dtype of the problem's matrices.
    ``grid``: the quantization grid of the whole layer (groups' rows stacked; group-wise grids in the column
    order the solve ran in, i.e. channels-last for Convs when a group size was used), None without bits.
    ``spec``: the spec actually applied (after any fallback the notes explain); ``dense``: left as it was.
    ``loss``: the greedy objective (exact method; 0 for baselines); ``error``: the relative layer output error
    ||WX - W'X||^2 / ||WX||^2 on the calibration data (None without a Hessian).
    """

    mats: np.ndarray
    grid: Grid | None
    spec: LayerSpec
    loss: float = 0.0
    error: float | None = None
    notes: list[Note] = field(default_factory=list)
    dense: bool = False
    solver: str = ""
    info: dict = field(default_factory=dict)

    @property
    def note(self) -> str:
        return "; ".join(n.text for n in self.notes)

    @property
    def sparsity(self) -> float:
        return float(np.mean(self.mats == 0))

    @property
    def mask(self) -> np.ndarray:
        return self.mats != 0


Solver = Callable[[np.ndarray, "np.ndarray | None", LayerSpec, str], tuple[np.ndarray, "Grid | None", float, list, dict]]
SOLVERS: dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    """Register ``fn(mats, H, spec, name) -> (new mats, grid, loss, notes, info)`` as method ``name``."""
    def deco(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        return fn
    return deco


def _stack_grid(grids: list[Grid], group_size: int | None) -> Grid:
    return Grid(np.concatenate([to_numpy(g.scale).astype(np.float32) for g in grids]),
                np.concatenate([to_numpy(g.zero_point) for g in grids]), grids[0].bits, grids[0].sym, group_size)


@register_solver("exact")
def _solve_exact(mats: np.ndarray, H: np.ndarray | None, spec: LayerSpec, name: str):
    """ExactOBS / OBQ on every group (one global mask over the groups for unstructured/block sparsity)."""
    if H is None:
        raise ValueError(f"{name}: the exact method needs the layer's Hessian")
    xp = get_xp(spec.device)
    res = compress_groups(
        [xp.asarray(m) for m in mats], [xp.asarray(h) for h in H], sparsity=spec.sparsity, nm=spec.nm,
        block_size=spec.block_size, bits=spec.bits, sym=spec.sym, grid_method=spec.grid, damp=spec.damp, name=name,
        dtype=spec.dtype, group_size=spec.group_size,
    )
    return _from_engine(res, mats, spec)


def _from_engine(res: list[EngineResult], mats: np.ndarray, spec: LayerSpec):
    """Per-group engine results as one solver result: (new mats, stacked grid, loss, notes, info)."""
    damps = [r.info.get("damp", spec.damp) for r in res]
    notes = _damp_notes(damps, spec)
    grid = _stack_grid([r.grid for r in res], spec.group_size) if all(r.grid is not None for r in res) else None
    new = np.stack([to_numpy(r.weight).astype(mats.dtype) for r in res])
    return new, grid, float(sum(r.loss for r in res)), notes, {"damp": max(damps)}


@register_solver("magnitude")
@register_solver("rtn")
def _solve_baseline(mats: np.ndarray, H: np.ndarray | None, spec: LayerSpec, name: str):
    """Magnitude pruning (one threshold over the whole layer, all groups) and/or RTN of the survivors."""
    g, r, c = mats.shape
    out = mats.reshape(g * r, c)
    mask = None
    if spec.nm is not None:
        out = magnitude_prune_nm(out, *spec.nm)
        mask = out != 0
    elif spec.sparsity is not None:
        out = magnitude_prune(out, spec.sparsity)
        mask = out != 0
    grid = None
    if spec.bits is not None:
        out, gr = rtn_quantize(out, spec.bits, sym=spec.sym, grid_method=spec.grid, mask=mask,
                               group_size=spec.group_size)
        grid = Grid(np.asarray(gr.scale, np.float32), np.asarray(gr.zero_point), gr.bits, gr.sym, spec.group_size)
    return out.reshape(g, r, c), grid, 0.0, [], {}


def _damp_notes(damps: list, spec: LayerSpec) -> list:
    if max(damps) <= spec.damp:
        return []
    steps = int(round(np.log10(max(damps) / spec.damp)))  # each escalation multiplies the damping by 10
    return [Note("damp_raised", f"damp raised to {max(damps):g} ({steps} escalation{'s' * (steps != 1)} from "
                 f"{spec.damp:g}: the Hessian was not positive definite with less)", max(damps))]


@register_solver("gptq")
@register_solver("sparsegpt")
def _solve_fast(mats: np.ndarray, H: np.ndarray | None, spec: LayerSpec, name: str):
    """GPTQ / SparseGPT (ALGORITHMS.md sec. 6) on all groups at once; gptq with a pruning option runs the
    same joint pass as sparsegpt with bits (the solver is then recorded as 'sparsegpt')."""
    if H is None:
        raise ValueError(f"{name}: the {spec.method} method needs the layer's Hessian")
    xp = get_xp(spec.device)
    res = fast_obs([xp.asarray(m) for m in mats], [xp.asarray(h) for h in H], bits=spec.bits, sparsity=spec.sparsity,
                   nm=spec.nm, sym=spec.sym, grid_method=spec.grid, group_size=spec.group_size,
                   act_order=spec.act_order, damp=spec.damp, name=name, dtype=spec.dtype)
    damps = [r.info["damp"] for r in res]
    grid = _stack_grid([r.grid for r in res], spec.group_size) if spec.bits is not None else None
    new = np.stack([to_numpy(r.weight).astype(mats.dtype) for r in res])
    solver = "sparsegpt" if spec.prunes else "gptq"
    return new, grid, float(sum(r.loss for r in res)), _damp_notes(damps, spec), {"damp": max(damps), "solver": solver}


# Exact cost rows * C^3 (summed over a grouped layer's matrices) up to which --method auto runs the exact solver
# as well as the fast one and keeps the lower layer error. Measured with tools/bench_engine.py on the 2-vCPU
# development machine (docs/RESULTS.md, "Fast modes"): exact OBQ runs at about 4e10 rows*C^3 per second there
# (256x1152 in ~10 s), so 2e11 is an exact solve of about 5 s (e.g. 1536x384 or 128x1152), beyond which the
# fast mode (1-2 s at 4096x4096) alone is used.
AUTO_EXACT_MAX_COST = 2e11


def _layer_error(mats: np.ndarray, new: np.ndarray, H: np.ndarray) -> float:
    num = den = 0.0
    for g in range(mats.shape[0]):
        a, b = error_terms(mats[g], new[g], H[g])
        num += a
        den += b
    return float(num / den if den > 0 else 0.0)


@register_solver("auto")
def _solve_auto(mats: np.ndarray, H: np.ndarray | None, spec: LayerSpec, name: str):
    """Per layer: exact where its cost rows * C^3 is at most AUTO_EXACT_MAX_COST, and then the fast mode too,
    keeping the lower layer error; the fast mode alone otherwise. A note (kind 'solver') says which and why."""
    if H is None:
        raise ValueError(f"{name}: the auto method needs the layer's Hessian")
    g, r, c = mats.shape
    cost = float(g) * r * float(c) ** 3
    fast = "sparsegpt" if spec.prunes else "gptq"
    value = dict(solver=None, cost=cost, threshold=AUTO_EXACT_MAX_COST)
    exact_spec = dataclasses.replace(spec, method="exact", act_order=False)
    if spec.block_size is not None:
        out = _solve_exact(mats, H, exact_spec, name)
        value["solver"] = "exact"
        why = "exact: block sparsity has no fast mode"
    elif cost > AUTO_EXACT_MAX_COST:
        out = _solve_fast(mats, H, dataclasses.replace(spec, method=fast), name)
        value["solver"] = fast
        why = f"{fast}: exact cost rows*C^3 = {cost:.3g} > {AUTO_EXACT_MAX_COST:.3g}"
    else:
        ex = _solve_exact(mats, H, exact_spec, name)
        fa = _solve_fast(mats, H, dataclasses.replace(spec, method=fast), name)
        e_ex, e_fa = _layer_error(mats, ex[0], H), _layer_error(mats, fa[0], H)
        keep = fast if e_fa < e_ex else "exact"
        out = fa if keep == fast else ex
        value.update(solver=keep, errors={"exact": e_ex, fast: e_fa})
        why = (f"{keep}: layer error exact {e_ex:.3g} vs {fast} {e_fa:.3g} (both ran: exact cost rows*C^3 = "
               f"{cost:.3g} <= {AUTO_EXACT_MAX_COST:.3g})")
    new, grid, loss, notes, info = out
    info = dict(info, solver=value["solver"])
    return new, grid, loss, [Note("solver", why, value)] + notes, info


assert set(SOLVERS) == set(METHODS), "every method of LayerSpec needs a registered solver"


def _fallbacks(problem: Problem, spec: LayerSpec) -> tuple[LayerSpec | None, list[Note]]:
    """The spec this layer can take (None: leave it dense) and the notes that explain any change."""
    notes: list[Note] = []
    c = problem.shape[2]
    m = spec.nm[1] if spec.nm else spec.block_size
    if m and c % m:
        what = f"{spec.nm[0]}:{spec.nm[1]}" if spec.nm else f"block {spec.block_size}"
        why = f"C={c} is not a multiple of {m} ({what})"
        if spec.bits is None:
            return None, [Note("left_dense", f"left dense: {why}")]
        notes.append(Note("not_pruned", f"not pruned: {why}"))
        spec = dataclasses.replace(spec, method={"magnitude": "rtn", "sparsegpt": "gptq"}.get(spec.method, spec.method),
                                   sparsity=None, nm=None, block_size=None)
    if spec.group_size is not None and problem.group_check is not None:
        why = problem.group_check(spec.group_size)
        if why:
            notes.append(Note("per_channel_grid", f"per-channel grid: {why}"))
            spec = dataclasses.replace(spec, group_size=None)
    return spec, notes


def solve(problem: Problem, spec: LayerSpec) -> LayerResult:
    """Compress one layer: the solver registered for ``spec.method`` on the problem's matrices (in the
    channels-last column order when a pattern or quantization groups need it), then the layer error."""
    check_method(spec)
    final, notes = _fallbacks(problem, spec)
    if final is None:
        return _dense(problem, spec, notes)
    perm = _perm(problem, final)
    work, Hw = _permuted(problem, perm)
    new, grid, loss, more, info = SOLVERS[final.method](work, Hw, final, problem.name)
    return _result(problem, final, notes + more, new, grid, loss, info, perm)


def solve_lookup(problem: Problem, spec: LayerSpec, counts: np.ndarray) -> LayerResult:
    """A lookup table (one matrix, a row per entry; Gather): no Hessian exists. The output error is
    sum_r counts[r] ||dW_r||^2 (counts: how often calibration selected row r), so each row's own grid (RTN with
    the spec's grid fit) is the layer-wise optimum whatever the counts, and pruning is by magnitude. The error
    reported is that count-weighted one, relative to sum_r counts[r] ||W_r||^2."""
    method = "rtn" if spec.bits is not None else "magnitude"
    pre: list[Note] = []
    if spec.block_size is not None:  # the baselines have no block patterns
        why = "block sparsity is not implemented for a lookup table"
        if spec.bits is None:
            return _dense(problem, spec, [Note("left_dense", f"left dense: {why}")])
        pre.append(Note("not_pruned", f"not pruned: {why}"))
        spec = dataclasses.replace(spec, sparsity=None, block_size=None)
    res = solve(problem, dataclasses.replace(spec, method=method))
    res.notes[:0] = pre
    counts = np.asarray(counts, dtype=np.float64)
    w = np.asarray(problem.mats[0], dtype=np.float64)
    d = np.asarray(res.mats[0], dtype=np.float64) - w
    base = float(counts @ np.sum(w * w, axis=1))
    res.error = float(counts @ np.sum(d * d, axis=1)) / base if base > 0 else None
    seen = int(np.count_nonzero(counts))
    res.notes.insert(0, Note("lookup", f"lookup table: {method} per row (no Hessian for a Gather); "
                                       f"{seen} of {len(w)} rows selected in calibration weigh the error", seen))
    return res


def solve_many(problem: Problem, specs: list[LayerSpec]) -> list[LayerResult]:
    """:func:`solve` for several specs of one layer (a database ladder), sharing work: exact unstructured
    pruning at several sparsities (and those levels quantized) costs one trace per row for all of them."""
    out: list[LayerResult | None] = [None] * len(specs)
    ladders: dict[tuple, list[int]] = {}
    finals = []
    for i, spec in enumerate(specs):
        check_method(spec)
        final, notes = _fallbacks(problem, spec)
        finals.append((final, notes))
        if final is None:
            out[i] = _dense(problem, spec, notes)
        elif (final.sparsity is not None and final.nm is None and final.block_size is None
              and (final.method == "exact" or (final.method == "auto" and _auto_cost(problem) <= AUTO_EXACT_MAX_COST))):
            ladders.setdefault((final.damp, final.dtype, final.device, _perm_key(problem, final)), []).append(i)
        else:
            out[i] = solve(problem, spec)
    dens = None  # the layer's output energy per group: the same for every level of the ladder
    if ladders and problem.hessian is not None:
        dens = [error_terms(problem.mats[g], problem.mats[g], problem.hessian[g])[1]
                for g in range(problem.mats.shape[0])]
    for idxs in ladders.values():
        first = finals[idxs[0]][0]
        perm = _perm(problem, first)
        work, Hw = _permuted(problem, perm)
        if Hw is None:
            raise ValueError(f"{problem.name}: the exact method needs the layer's Hessian")
        xp = get_xp(first.device)
        ws, Hs = [xp.asarray(m) for m in work], [xp.asarray(h) for h in Hw]
        levels = sorted({finals[i][0].sparsity for i in idxs})
        pruned = dict(zip(levels, global_prune_levels(ws, Hs, levels, None, damp=first.damp, name=problem.name,
                                                       dtype=first.dtype)))
        for i in idxs:
            final, notes = finals[i]
            res = pruned[final.sparsity]
            if final.bits is not None:
                names = [problem.name if len(res) == 1 else f"{problem.name}[group {g}]" for g in range(len(res))]
                res = [_quantize_survivors(pr, Hs[g], final.bits, sym=final.sym, grid_method=final.grid,
                                           name=names[g], dtype=final.dtype, group_size=final.group_size)
                       for g, pr in enumerate(res)]
            new, grid, loss, more, info = _from_engine(res, work, final)
            exact = dataclasses.replace(final, method="exact", act_order=False) if final.method == "auto" else final
            out[i] = _result(problem, exact, notes + more, new, grid, loss, info, perm, dens)
            if final.method == "auto":
                out[i] = _auto_pick(problem, final, out[i], len(notes))
    return out


def _auto_cost(problem: Problem) -> float:
    g, r, c = problem.mats.shape
    return float(g) * r * float(c) ** 3


def _auto_pick(problem: Problem, spec: LayerSpec, exact: LayerResult, pre: int) -> LayerResult:
    """``--method auto`` on a ladder level solved exactly: the fast mode too, the lower layer error kept, with
    the note :func:`_solve_auto` writes (the ladder shares exact's trace; the fast mode is cheap per level)."""
    fast = "sparsegpt" if spec.prunes else "gptq"
    fa = solve(problem, dataclasses.replace(spec, method=fast))
    cost = _auto_cost(problem)
    keep = fa if (fa.error is not None and exact.error is not None and fa.error < exact.error) else exact
    name = fast if keep is fa else "exact"
    why = (f"{name}: layer error exact {exact.error:.3g} vs {fast} {fa.error:.3g} (both ran: exact cost rows*C^3 = "
           f"{cost:.3g} <= {AUTO_EXACT_MAX_COST:.3g})")
    value = dict(solver=name, cost=cost, threshold=AUTO_EXACT_MAX_COST, errors={"exact": exact.error, fast: fa.error})
    notes = keep.notes[:pre] + [Note("solver", why, value)] + keep.notes[pre:]  # after the fallbacks, as solve()
    return dataclasses.replace(keep, spec=spec, notes=notes, solver=name,
                               info=dict(keep.info, solver=name))


def _perm_key(problem: Problem, spec: LayerSpec):
    p = _perm(problem, spec)
    return None if p is None else tuple(p.tolist())


def _perm(problem: Problem, spec: LayerSpec) -> np.ndarray | None:
    # N:M and block patterns, and quantization groups, run along input channels at each kernel tap
    # (channels-last), as sparse kernels and blocked DequantizeLinear expect
    return problem.channels_last if (spec.nm or spec.block_size or spec.group_size) else None


def _permuted(problem: Problem, perm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    mats, H = problem.mats, problem.hessian
    if perm is None:
        return mats, H
    return mats[:, :, perm], (H[:, perm][:, :, perm] if H is not None else None)


def _dense(problem: Problem, spec: LayerSpec, notes: list[Note]) -> LayerResult:
    return LayerResult(problem.mats.copy(), None, spec, 0.0, 0.0, notes, dense=True, solver="none")


def _result(problem: Problem, final: LayerSpec, notes: list[Note], new: np.ndarray, grid: Grid | None, loss: float,
            info: dict, perm: np.ndarray | None, dens: list[float] | None = None) -> LayerResult:
    """The result in stored column order, with the layer error from the Hessian."""
    mats, H = problem.mats, problem.hessian
    if perm is not None:
        new = new[:, :, np.argsort(perm)]
    err = None
    if H is not None:
        num = den = 0.0
        for g in range(mats.shape[0]):
            a, b = error_terms(mats[g], new[g], H[g], None if dens is None else dens[g])
            num += a
            den += b
        err = float(num / den if den > 0 else 0.0)
    return LayerResult(new, grid, final, loss, err, notes, solver=info.get("solver", final.method), info=info)
