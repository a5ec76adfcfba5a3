"""``--act-calib search``: activation ranges chosen by the model's output error, and tensors kept in float.

Per-tensor statistics (min-max, percentiles, MSE of the tensor itself) do not know what the tensor feeds. A
Conv output read by a hard-swish loses nothing when its range is clipped far below -3, and a tensor that feeds a
sensitive head needs its full range; the error that matters is the model's. So, on a few calibration batches
(in-sample) and with ONNX Runtime running the real Q/DQ graph:

1. every activation site is quantized alone, to rank the sites by the output error each one causes;
2. for the most costly sites, a few candidate ranges (min-max, percentiles, the tensor-MSE clipping, the low or
   high end clipped) are tried, and each site keeps the one that gives the smallest output error;
3. with every site quantized, the most costly sites are kept in float, one at a time, while the model's output
   error exceeds twice the error of its 8-bit weights alone (the target of issue 15), for at most a tenth of the
   sites (2 in a model of 8 to 19 sites, :func:`float_limit`); a site that alone costs more than that target
   goes even when the error does not drop yet (another such site hides it; if its partner cannot follow within
   the budget, the search goes back to the last point where the error dropped). Each one is reported, with what
   it cost.

"Output error" is the mean over the model's outputs of rel L2 to the dense model, taken on the logits where an
output is a Softmax or Sigmoid (see ``scored_tensors``).

The search needs no gradients and no second calibration pass, only ONNX Runtime runs of the model: about
(sites + 10 x costly sites + kept) runs on the search batches.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..runtime import inference_session
from .ranges import ActQuantParams, RangeObserver, params_from_range

log = logging.getLogger(__name__)

TUNED_SITES = 8  # sites whose range is searched (the most costly ones)
MAX_FLOAT_FRACTION = 0.1  # at most this fraction of the sites kept in float
TARGET_FACTOR = 2.0  # keep tensors float while the W8A8 error exceeds this multiple of the weight-only error


@dataclass
class SearchReport:
    weight_only_error: float  # model output error of the quantized weights alone (float activations)
    before_error: float  # with every site quantized at the given ranges
    tuned_error: float  # after the range search
    final_error: float  # after keeping tensors in float
    tuned: list[dict]  # {tensor, range, was, error_alone, was_error_alone}
    kept_float: list[dict]  # {tensor, error_alone, error_after}
    runs: int
    samples: int  # calibration samples the errors were measured on (in-sample)
    metric: str = "logits"  # what the error was taken on: logits behind Softmax/Sigmoid outputs, or the outputs


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT's default rewrite of a weight-only DQ -> MatMul into MatMulNBits with int8 activations would add its own
    # activation error to the weight-only reference (rel L2 0.98 on a MatMul with an outlier channel)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return inference_session(model, so)


SATURATING = ("Softmax", "LogSoftmax", "Sigmoid")
SEARCH_METRICS = ("logits", "output")
SHAPE_ONLY = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def scored_tensors(model: onnx.ModelProto, metric: str = "logits") -> list[str]:
    """What the search compares: each graph output, or (``metric`` "logits", the default) the logits before it
    when it is a Softmax / Sigmoid (a saturated probability hides most of the error, and the few samples near a
    decision boundary then decide every choice: ranges fitted to them did not carry over to held-out data on
    PP-OCR's classifier). ``metric`` "output": the graph outputs themselves, for a model whose probabilities are
    what is read (a segmentation map thresholded at 0.3, whose logits are dominated by the saturated background:
    on PP-OCR's detector the search reached 2x the weight-only error on the logits and stayed at 2.8x on the map,
    in-sample)."""
    if metric not in SEARCH_METRICS:
        raise ValueError(f"search metric must be one of {', '.join(SEARCH_METRICS)}, got {metric!r}")
    if metric == "output":
        return list(dict.fromkeys(o.name for o in model.graph.output))
    prod = {o: n for n in model.graph.node for o in n.output}
    out = []
    for o in model.graph.output:
        t, target = o.name, o.name
        for _ in range(8):  # back through shape-only ops (Paddle: Softmax -> Reshape -> Identity)
            n = prod.get(t)
            if n is None or n.domain not in ("", "ai.onnx") or not n.input:
                break
            if n.op_type in SATURATING:
                target = n.input[0]
                break
            if n.op_type not in SHAPE_ONLY:
                break
            t = n.input[0]
        out.append(target)
    return list(dict.fromkeys(out))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (untyped outputs: ONNX Runtime infers them)."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


class _Scorer:
    """Output error of a model against reference outputs, on fixed feeds (mean over outputs of rel L2)."""

    def __init__(self, feeds: list[dict], ref_model: onnx.ModelProto, names: list[str]):
        self.feeds = feeds
        self.names = names
        self.runs = 0
        self.ref = self.outputs(ref_model)

    def outputs(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        sess = _session(model)
        names = [n for n in self.names]
        self.runs += 1
        return [sess.run(names, f) for f in self.feeds]

    def error(self, model: onnx.ModelProto, ref: list[list[np.ndarray]] | None = None) -> float:
        ref = self.ref if ref is None else ref
        out = self.outputs(model)
        errs = []
        for k in range(len(self.names)):
            r = [np.asarray(b[k], np.float64) for b in ref]
            if not r or r[0].dtype.kind != "f":
                continue
            num = sum(float(np.sum((np.asarray(o[k], np.float64) - x) ** 2)) for o, x in zip(out, r))
            den = sum(float(np.sum(x ** 2)) for x in r)
            errs.append(math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf))
        return float(np.mean(errs)) if errs else 0.0


def _candidates(ob: RangeObserver, t: str, base: ActQuantParams, bits: int) -> list[tuple[float, float]]:
    st = ob.stats[t]
    if not st.count:
        return []
    lo, hi = st.lo, st.hi
    x = ob.sample(t)
    cands = [(lo, hi), (base.lo, base.hi)]
    for p in (99.9, 99.99, 99.999):
        cands.append((float(np.percentile(x, 100 - p)), float(np.percentile(x, p))))
    m = ob.params(t, bits, "mse")
    cands.append((m.lo, m.hi))
    if lo < 0:
        cands += [(lo * f, hi) for f in (0.5, 0.2, 0.05)]
    if hi > 0:
        cands += [(lo, hi * f) for f in (0.5, 0.25)]
    seen, out = set(), []
    for a, b in cands:
        key = params_from_range(a, b, bits)
        if key not in seen:
            seen.add(key)
            out.append((min(a, 0.0), max(b, 0.0)))
    return out


def float_limit(n_sites: int) -> int:
    """How many of ``n_sites`` activation sites the search may keep in float: a tenth, but 2 from 8 sites on. A
    small model's few sites include its front end, and an audio front end has two that one per-tensor grid
    cannot hold (Silero VAD, 8 sites: the STFT Conv output and its magnitude, each alone output rel L2 0.1-0.2;
    the cap of one left W8A8 at 2.9x the weight-only error in-sample, two float gives 1.9x)."""
    return max(1, min(2, n_sites // 4), int(MAX_FLOAT_FRACTION * n_sites))


def search_activation_ranges(
    dense: onnx.ModelProto, weights_model: onnx.ModelProto, sites: list, params: dict[str, ActQuantParams],
    observer: RangeObserver, feeds: list[dict], insert: Callable, bits: int = 8, target_factor: float = TARGET_FACTOR,
    metric: str = "logits",
) -> tuple[list, dict[str, ActQuantParams], SearchReport]:
    """The sites to quantize (some may be dropped: kept in float), their parameters, and what the search did.

    ``dense``: the input model; ``weights_model``: the model with its compressed weights and float activations;
    ``insert(model, sites, params)`` adds the activation Q/DQ pairs in place (export.actquant.insert_activation_qdq);
    ``target_factor``: tensors are kept float while the error exceeds this multiple of the weight-only error;
    ``metric``: what the error is taken on (see ``scored_tensors``).
    """
    targets = scored_tensors(dense, metric)
    dense, weights_model = with_outputs(dense, targets), with_outputs(weights_model, targets)
    score = _Scorer(feeds, dense, targets)
    w_err = score.error(weights_model)
    w_ref = score.outputs(weights_model)
    params = dict(params)

    def with_sites(chosen: list, prm: dict) -> onnx.ModelProto:
        m = copy.deepcopy(weights_model)
        keep = {s.tensor for s in chosen}
        # a padded site reuses its source's grid: without the source it gets a grid of its own
        fixed = [s if s.pad_of is None or s.pad_of in keep else replace(s, pad_of=None) for s in chosen]
        insert(m, fixed, prm)
        return m

    def alone(s, p: ActQuantParams) -> float:
        return score.error(with_sites([replace(s, pad_of=None)], {s.tensor: p}), w_ref)

    before = score.error(with_sites(sites, params))
    single = {s.tensor: alone(s, params[s.tensor]) for s in sites}
    order = sorted(sites, key=lambda s: -single[s.tensor])
    tuned = []
    for s in order[:TUNED_SITES]:
        base = params[s.tensor]
        best, best_err = base, single[s.tensor]
        for lo, hi in _candidates(observer, s.tensor, base, bits):
            scale, zp = params_from_range(lo, hi, bits)
            if (scale, zp) == (base.scale, base.zero_point):
                continue
            p = ActQuantParams(scale, zp, bits, lo, hi, base.observed_min, base.observed_max)
            e = alone(s, p)
            if e < best_err:
                best, best_err = p, e
        if best is not base:
            tuned.append({"tensor": s.tensor, "range": [best.lo, best.hi], "was": [base.lo, base.hi],
                          "error_alone": best_err, "was_error_alone": single[s.tensor]})
            params[s.tensor] = best
            single[s.tensor] = best_err
    chosen = list(sites)
    err = score.error(with_sites(chosen, params)) if tuned else before
    tuned_err = err
    kept = []
    target = target_factor * w_err
    limit = float_limit(len(sites))
    tries = 0
    best = (list(chosen), err, 0)  # the fewest float tensors at the lowest error so far
    for s in sorted(sites, key=lambda s: -single[s.tensor]):
        if err <= target or len(kept) >= limit or tries >= 2 * limit:
            break
        tries += 1
        trial = [c for c in chosen if c.tensor != s.tensor]
        e = score.error(with_sites(trial, params))
        if e >= err and single[s.tensor] <= target:  # no better without it: keep it quantized
            continue
        # (a tensor that alone costs more than the target must go even when the error does not drop yet: another
        # such tensor hides it, and neither can be removed first on its own)
        chosen, err = trial, e
        kept.append({"tensor": s.tensor, "error_alone": single[s.tensor], "error_after": e})
        if err < best[1]:
            best = (list(chosen), err, len(kept))
    if len(kept) > best[2] and err >= best[1]:  # a hidden tensor went float, its partner could not follow: undo
        chosen, err, kept = best[0], best[1], kept[:best[2]]
    names = {c.tensor for c in chosen}
    chosen = [c if c.pad_of is None or c.pad_of in names else replace(c, pad_of=None) for c in chosen]
    report = SearchReport(w_err, before, tuned_err, err, tuned, kept, score.runs,
                          sum(int(getattr(f, "samples", 1)) for f in feeds), metric)
    log.info("activation search: weight-only %.4g, W8A8 %.4g -> tuned %.4g -> %d kept float %.4g (%d runs)",
             w_err, before, tuned_err, len(kept), err, score.runs)
    return chosen, params, report


def search_notes(r: SearchReport) -> list[str]:
    """One line per decision, for the report's activation notes."""
    notes = [f"range search on {r.samples} calibration samples (in-sample, {r.runs} ONNX Runtime runs): output "
             f"{'(logits for Softmax/Sigmoid outputs) ' if r.metric == 'logits' else ''}rel L2 {r.before_error:.4g} -> {r.tuned_error:.4g} with searched ranges -> {r.final_error:.4g} with "
             f"{len(r.kept_float)} tensors kept float (weight-only 8-bit: {r.weight_only_error:.4g})"]
    for t in r.tuned:
        notes.append(f"{t['tensor']}: range [{t['range'][0]:.4g}, {t['range'][1]:.4g}] instead of "
                     f"[{t['was'][0]:.4g}, {t['was'][1]:.4g}] (output rel L2 when quantized alone "
                     f"{t['was_error_alone']:.3g} -> {t['error_alone']:.3g})")
    for k in r.kept_float:
        notes.append(f"{k['tensor']}: kept float (quantized alone it costs output rel L2 {k['error_alone']:.3g}; "
                     f"the model's error without it {k['error_after']:.4g}); the layers reading or writing it run "
                     f"in float")
    return notes
