"""Streaming comparison metrics of one model output: reference r against candidate c.

Everything is accumulated per batch in float64 (sums of squares, hit counts), so memory holds one batch of
outputs, never the dataset's. Pure NumPy: no onnx, no onnxruntime, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# What each reported number means; also written into the JSON report so that it is self-describing.
DEFINITIONS = {
    "rel_l2": "||c - r||_2 / ||r||_2 over every element of the output and every sample (r: reference, c: candidate); "
              "0 when identical, inf when r is all zero and c is not",
    "sqnr_db": "10 log10(||r||^2 / ||c - r||^2) over every element and sample; inf when identical",
    "cosine": "mean over samples of cos(r_i, c_i), each sample's output flattened (axis 0 = samples when its length "
              "is the batch's sample count, else the whole batch output counts as one sample); 1 when both are zero, "
              "0 when exactly one is; null when a sample's output is a single value (its cosine is only its sign)",
    "max_abs": "max |c - r| over every element",
    "top1": "class outputs ([N, K] floats, K >= 2): fraction of samples whose argmax is the same in both models "
            "(ties: the lowest index wins)",
    "top5": "class outputs: fraction of samples whose candidate top-1 class is among the reference's top-k classes, "
            "k = min(5, K), i.e. fewer than k reference scores are strictly greater than the reference score of that "
            "class (ties count in the candidate's favour)",
    "acc_ref": "fraction of samples whose reference argmax equals the label (labelled output only)",
    "acc_cand": "fraction of samples whose candidate argmax equals the label (labelled output only)",
    "latency_ms": "median wall time of one session.run on the first batch, after one warm-up run; the two models "
                  "are timed alternately, with the same ONNX Runtime session options (CPU)",
    "bytes": "size of the .onnx file plus the external data files it references (serialized size for an in-memory "
             "ModelProto)",
}


@dataclass
class OutputMetrics:
    """How far the candidate's output ``name`` is from the reference's, over all evaluated samples."""

    name: str
    dtype: str
    sample_shape: list  # shape of one sample's output (without axis 0), as seen on the first batch
    samples: int
    elements: int
    rel_l2: float
    sqnr_db: float
    cosine: float | None  # None when each sample's output is one value
    max_abs: float
    nonfinite_ref: int  # NaN / inf elements in the reference output
    nonfinite_cand: int
    is_class: bool = False
    classes: int | None = None
    top1: float | None = None
    top5: float | None = None
    topk: int | None = None  # the k actually used for "top5" (min(5, K))
    labeled: bool = False
    acc_ref: float | None = None
    acc_cand: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def is_class_output(a: np.ndarray, n: int) -> bool:
    """[n, K] floating-point scores with K >= 2."""
    return a.ndim == 2 and a.dtype.kind == "f" and a.shape[0] == n and a.shape[1] >= 2


class OutputAccumulator:
    """Running sums for one output; ``update`` once per batch, ``result`` at the end."""

    def __init__(self, name: str, classes: bool = True):
        self.name = name
        self.allow_class = classes  # False: never treated as class scores (e.g. one row per token)
        self.dtype: str | None = None
        self.sample_shape: list | None = None
        self.is_class: bool | None = None  # decided on the first batch
        self.classes: int | None = None
        self.samples = 0
        self.elements = 0
        self.ref_sq = 0.0
        self.err_sq = 0.0
        self.cos_sum = 0.0
        self.cos_count = 0
        self.cos_width: int | None = None  # fewest values per sample seen (cosine needs at least 2)
        self.max_abs = 0.0
        self.nonfinite_ref = 0
        self.nonfinite_cand = 0
        self.top1_hits = 0
        self.topk_hits = 0
        self.topk: int | None = None
        self.labeled = 0
        self.acc_ref_hits = 0
        self.acc_cand_hits = 0

    def update(self, r: np.ndarray, c: np.ndarray, n: int, labels: np.ndarray | None = None) -> None:
        """Add one batch: ``r`` and ``c`` are both models' arrays for this output, ``n`` the batch's samples,
        ``labels`` (int64 [n], already checked) when this output is the labelled one."""
        if r.shape != c.shape:
            raise ValueError(f"output '{self.name}': the reference gives shape {r.shape}, the candidate {c.shape}")
        per_sample = r.ndim >= 1 and r.shape[0] == n
        if self.dtype is None:
            self.dtype = str(r.dtype)
            self.sample_shape = list(r.shape[1:]) if per_sample else list(r.shape)
            self.is_class = self.allow_class and is_class_output(r, n)
            if self.is_class:
                self.classes = int(r.shape[1])
                self.topk = min(5, self.classes)
        r64 = np.asarray(r, dtype=np.float64)
        c64 = np.asarray(c, dtype=np.float64)
        rows = r64.reshape(n if per_sample else 1, -1)
        crow = c64.reshape(rows.shape)
        diff = crow - rows
        self.nonfinite_ref += int(r64.size - np.count_nonzero(np.isfinite(r64)))
        self.nonfinite_cand += int(c64.size - np.count_nonzero(np.isfinite(c64)))
        self.ref_sq += float(np.einsum("ij,ij->", rows, rows))
        self.err_sq += float(np.einsum("ij,ij->", diff, diff))
        if diff.size:
            m = float(np.max(np.abs(diff)))
            if m > self.max_abs or math.isnan(m):  # NaN sticks once seen
                self.max_abs = m
        # per-sample cosine (1 when both are zero, 0 when exactly one is)
        dot = np.einsum("ij,ij->i", rows, crow)
        nr = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        nc = np.sqrt(np.einsum("ij,ij->i", crow, crow))
        denom = nr * nc
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where((nr == 0) & (nc == 0), 1.0, 0.0))
        self.cos_sum += float(np.sum(cos))
        self.cos_count += cos.shape[0]
        self.cos_width = rows.shape[1] if self.cos_width is None else min(self.cos_width, rows.shape[1])
        self.samples += n
        self.elements += r.size
        if self.is_class and r.ndim == 2 and r.shape[0] == n:
            top_r = np.argmax(r64, axis=1)
            top_c = np.argmax(c64, axis=1)
            self.top1_hits += int(np.sum(top_r == top_c))
            # candidate's top-1 is within the reference's top-k: fewer than k reference scores beat it strictly
            score = r64[np.arange(n), top_c]
            better = np.sum(r64 > score[:, None], axis=1)
            self.topk_hits += int(np.sum(better < self.topk))
            if labels is not None:
                self.labeled += n
                self.acc_ref_hits += int(np.sum(top_r == labels))
                self.acc_cand_hits += int(np.sum(top_c == labels))

    def result(self) -> OutputMetrics:
        ref, err = self.ref_sq, self.err_sq
        if err == 0:
            rel, sqnr = 0.0, math.inf
        elif ref == 0:
            rel, sqnr = math.inf, -math.inf
        elif math.isfinite(ref) and math.isfinite(err):
            rel, sqnr = math.sqrt(err / ref), 10.0 * math.log10(ref / err)
        else:
            rel = sqnr = math.nan
        cls = bool(self.is_class)
        n = self.samples
        return OutputMetrics(
            name=self.name, dtype=self.dtype or "?", sample_shape=self.sample_shape or [], samples=n,
            elements=self.elements, rel_l2=rel, sqnr_db=sqnr,
            cosine=(None if (self.cos_width or 0) < 2 and self.cos_count
                    else self.cos_sum / self.cos_count if self.cos_count else math.nan), max_abs=self.max_abs,
            nonfinite_ref=self.nonfinite_ref, nonfinite_cand=self.nonfinite_cand, is_class=cls,
            classes=self.classes, top1=self.top1_hits / n if cls and n else None,
            top5=self.topk_hits / n if cls and n else None, topk=self.topk, labeled=bool(self.labeled),
            acc_ref=self.acc_ref_hits / self.labeled if self.labeled else None,
            acc_cand=self.acc_cand_hits / self.labeled if self.labeled else None,
        )
