"""Per-op layout knowledge, one adapter class per op type: how a Gemm / MatMul / Conv weight is a matrix
rows x C, how the node's input becomes the columns X that multiply it (im2col for Conv, exactly as the node
computes it), which weight axes are the output channels and the fan-in (for QDQ and blocked storage), and what
a group-wise grid or a MAC count needs.

Every adapter works on groups: Gemm and MatMul have one group, a Conv with ``group = g`` has g independent
problems, each with its own Hessian (ALGORITHMS.md section 0). ``OpLayout(op, attrs)`` returns the adapter of
``op`` (see :data:`ADAPTERS`); a new op type is one new subclass registered there.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CalibrationError

ADAPTERS: dict[str, type["OpLayout"]] = {}


def adapter(op: str):
    """Register an OpLayout subclass as the adapter of ``op``."""
    def deco(cls):
        ADAPTERS[op] = cls
        return cls
    return deco


@dataclass(frozen=True)
class OpLayout:
    """How one consumer node uses its weight. ``attrs`` holds the node attributes that matter.

    Constructing ``OpLayout(op, attrs)`` gives the registered subclass for ``op``."""

    op: str
    attrs: dict = field(default_factory=dict, hash=False, compare=False)

    def __new__(cls, op: str = "", attrs: dict | None = None):
        if cls is OpLayout:
            if op not in ADAPTERS:
                raise ValueError(f"no adapter for op type {op!r} (known: {', '.join(ADAPTERS)})")
            cls = ADAPTERS[op]
        return object.__new__(cls)

    def __getnewargs__(self):
        return (self.op, self.attrs)

    # ---- weight <-> matrices (per op) -----------------------------------------------------------------
    def groups(self, weight_shape: tuple[int, ...]) -> int:
        return 1

    def matrix_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(groups, rows per group, C) of the weight seen as matrices."""
        raise NotImplementedError

    def to_matrices(self, w: np.ndarray) -> np.ndarray:
        """Weight tensor -> array (groups, rows, C); rows are output channels, C the fan-in
        (for Conv: Cin/g outermost, then kernel positions, as the weight is stored)."""
        raise NotImplementedError

    def from_matrices(self, mats: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_matrices`."""
        raise NotImplementedError

    def channels_last_perm(self, weight_shape: tuple[int, ...]) -> np.ndarray | None:
        """Column permutation putting input channels innermost (kernel taps outermost) for N:M and block
        patterns and quantization groups, as sparse kernels and blocked DequantizeLinear expect; None when C
        is already channel-ordered."""
        return None

    def out_axis(self) -> int:
        """Axis of the weight tensor (as consumers see it) that indexes output channels (the QDQ axis)."""
        raise NotImplementedError

    def fan_in_axis(self) -> int:
        """Axis of the weight tensor that runs along the engine's columns (the one blocked DequantizeLinear
        blocks over)."""
        raise NotImplementedError

    def group_size_problem(self, weight_shape: tuple[int, ...], group_size: int) -> str | None:
        """Why group-wise grids of ``group_size`` cannot be stored as blocked DequantizeLinear (None: they can)."""
        if group_size < 1:
            return f"group_size must be >= 1, got {group_size}"
        return None

    def position_dims(self, output_shape: tuple) -> list:
        """The dims of the node's output over which the weight is applied once per sample (spatial positions,
        tokens): MACs per sample are their product times the weight's size."""
        return []

    @property
    def matmulnbits(self) -> bool:
        """Whether ONNX Runtime's MatMulNBits can replace the node (a MatMul with a constant 2-D B)."""
        return False

    @property
    def channel_axis(self) -> int:
        """Axis of the node's OUTPUT that indexes output channels."""
        return -1

    @property
    def token_inputs(self) -> bool:
        """Whether an input of shape [batch, sequence, ...] carries one token per position (padding tokens can
        be left out of its statistics); False for Conv, whose positions are spatial."""
        return True

    @property
    def rows_are_samples(self) -> bool:
        """Whether axis 0 of the node's input indexes samples (so the input can be cut into slices of samples)."""
        return True

    def input_problem(self, x_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
        """Why an input of this shape cannot multiply the weight (None: it can)."""
        return None

    @property
    def weight_input(self) -> int:
        """Which input of the node is the weight."""
        return 1

    @property
    def hessian_free(self) -> bool:
        """True for a lookup (Gather): no Hessian exists, calibration counts how often each row is selected."""
        return False

    # ---- inputs -> columns (per op) --------------------------------------------------------------------
    def unfold(self, x: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        """The node's input (one batch) -> columns, shape (groups, C, n_columns), float64 (the reference the
        Gram products are tested against)."""
        raise NotImplementedError

    def gram(self, x: np.ndarray, weight_shape: tuple[int, ...], *, dtype=None) -> tuple[np.ndarray, int]:
        """(sum of x x^T over the columns of this input, per group: (groups, C, C) float64; number of columns).

        Same sums as ``unfold`` followed by ``cols @ cols^T``, computed by :mod:`onnxobc.engine.gram` in
        float32 tiles accumulated in float64 (``dtype=np.float64`` for float64 products), without unfolding
        1x1 convs and without a full im2col buffer for the others."""
        raise NotImplementedError

    def positions_per_sample(self, x_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
        """How many columns one sample contributes (spatial outputs for Conv, tokens for MatMul)."""
        return 1

    def count_columns(self, x_shape: tuple[int, ...], weight_shape: tuple[int, ...], **aux) -> int:
        """How many columns an input of this shape contributes (without forming them)."""
        return (x_shape[0] if self.rows_are_samples else x_shape[-1]) * self.positions_per_sample(x_shape, weight_shape)

    def qdq_split(self, weight_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(pieces, axis) when per-channel QDQ needs one DequantizeLinear per slice of the weight along ``axis``
        (joined by a Concat) because :meth:`out_axis` holds only part of the rows; None: decided by the groups
        (see :func:`onnxobc.export.qdq.qdq_pieces`)."""
        return None

    @property
    def activation_sites(self) -> bool:
        """Whether W8A8 may quantize the node's input (False where the weight's input is not a graph tensor)."""
        return True

    def qdq_problem(self, weight_shape: tuple[int, ...]) -> str | None:
        """Why QDQ cannot store this weight (None: it can); the weight is then written as float fake-quant."""
        return None


@adapter("Gemm")
@dataclass(frozen=True)
class GemmLayout(OpLayout):
    """Gemm: Y = alpha A B' + beta C; B [K, N] (transB=0) or [N, K] (transB=1)."""

    def matrix_shape(self, weight_shape):
        k, n = (weight_shape[1], weight_shape[0]) if self.attrs.get("transB", 0) else weight_shape
        return 1, int(n), int(k)

    def to_matrices(self, w):
        m = w if self.attrs.get("transB", 0) else w.T
        return np.ascontiguousarray(m)[None]

    def from_matrices(self, mats, weight_shape):
        m = mats[0]
        return np.ascontiguousarray(m if self.attrs.get("transB", 0) else m.T)

    def out_axis(self):
        return 0 if self.attrs.get("transB", 0) else 1

    def fan_in_axis(self):
        return 1 if self.attrs.get("transB", 0) else 0

    @property
    def rows_are_samples(self):
        return not self.attrs.get("transA", 0)

    def unfold(self, x, weight_shape):
        a = x.T if self.attrs.get("transA", 0) else x
        return np.asarray(a, dtype=np.float64).T[None]

    def gram(self, x, weight_shape, *, dtype=None):
        from ..engine import gram as gm

        return gm.gram_gemm(x, trans_a=bool(self.attrs.get("transA", 0)), dtype=dtype)


@adapter("MatMul")
@dataclass(frozen=True)
class MatMulLayout(OpLayout):
    """MatMul with a constant B [K, N] (the activation A [..., K] may have any batch dims)."""

    def matrix_shape(self, weight_shape):
        k, n = weight_shape
        return 1, int(n), int(k)

    def to_matrices(self, w):
        return np.ascontiguousarray(w.T)[None]

    def from_matrices(self, mats, weight_shape):
        return np.ascontiguousarray(mats[0].T)

    def out_axis(self):
        return 1

    def fan_in_axis(self):
        return 0

    def position_dims(self, output_shape):
        return list(output_shape[1:-1])

    def unfold(self, x, weight_shape):
        k = weight_shape[0]
        if x.ndim == 1:
            x = x[None]
        return np.asarray(x, dtype=np.float64).reshape(-1, k).T[None]

    def gram(self, x, weight_shape, *, dtype=None):
        from ..engine import gram as gm

        return gm.gram_matmul(x, int(weight_shape[0]), dtype=dtype)

    def positions_per_sample(self, x_shape, weight_shape):
        return int(np.prod(x_shape[1:-1])) if len(x_shape) > 2 else 1

    def input_problem(self, x_shape, weight_shape):
        if x_shape[-1] != weight_shape[0]:
            return f"input has last dim {x_shape[-1]}, weight expects {weight_shape[0]}"
        return None

    @property
    def matmulnbits(self):
        return True


@adapter("Conv")
@dataclass(frozen=True)
class ConvLayout(OpLayout):
    """Conv with W [Cout, Cin/g, k...]: g groups of (Cout/g) x (Cin/g * prod(k)) matrices."""

    def groups(self, weight_shape):
        return int(self.attrs.get("group", 1))

    def matrix_shape(self, weight_shape):
        g = self.groups(weight_shape)
        cout = weight_shape[0]
        return g, int(cout // g), int(np.prod(weight_shape[1:]))

    def to_matrices(self, w):
        g, r, c = self.matrix_shape(w.shape)
        return np.ascontiguousarray(w.reshape(g, r, c))

    def from_matrices(self, mats, weight_shape):
        return np.ascontiguousarray(mats.reshape(weight_shape))

    def channels_last_perm(self, weight_shape):
        if len(weight_shape) <= 2:
            return None
        cin_g = weight_shape[1]
        ksize = int(np.prod(weight_shape[2:]))
        if ksize == 1:
            return None
        # column index in stored order is ci * ksize + t; channels-last order is t * cin_g + ci.
        idx = np.arange(cin_g * ksize).reshape(cin_g, ksize)
        return idx.T.reshape(-1)

    def out_axis(self):
        return 0

    def fan_in_axis(self):
        return 1

    def group_size_problem(self, weight_shape, group_size):
        """A block runs along input channels at one kernel tap: with more than one tap, group_size must divide
        Cin/g (the engine's channels-last columns then never put two taps in one group)."""
        why = super().group_size_problem(weight_shape, group_size)
        if why:
            return why
        cin_g = int(weight_shape[1])
        taps = int(np.prod(weight_shape[2:]))
        if taps > 1 and cin_g % group_size:
            return (f"group_size {group_size} does not divide the {cin_g} input channels per group of this "
                    f"{'x'.join(str(k) for k in weight_shape[2:])} Conv (a block cannot straddle kernel taps)")
        return None

    def position_dims(self, output_shape):
        return list(output_shape[2:])

    @property
    def channel_axis(self):
        return 1

    @property
    def token_inputs(self):
        return False

    def unfold(self, x, weight_shape):
        return self._im2col(x, weight_shape)

    def gram(self, x, weight_shape, *, dtype=None):
        from ..engine import gram as gm

        kernel = tuple(int(k) for k in weight_shape[2:])
        if x.ndim != len(kernel) + 2:
            raise CalibrationError(f"Conv input has rank {x.ndim}, expected {len(kernel) + 2} for a {len(kernel)}-D kernel")
        begin, end, strides, dil = self.conv_geometry(x.shape[2:], kernel)
        try:
            return gm.gram_conv(x, weight_shape, group=self.groups(weight_shape), pads_begin=begin, pads_end=end,
                                strides=strides, dilations=dil, dtype=dtype)
        except ValueError as e:
            raise CalibrationError(str(e)) from e

    def positions_per_sample(self, x_shape, weight_shape):
        kernel = tuple(int(k) for k in weight_shape[2:])
        spatial = x_shape[2:]
        begin, end, strides, dil = self.conv_geometry(spatial, kernel)
        return int(np.prod([(spatial[i] + begin[i] + end[i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                            for i in range(len(kernel))]))

    def conv_geometry(self, spatial_in: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[list[int], list[int], list[int], list[int]]:
        """(pads_begin, pads_end, strides, dilations) with auto_pad resolved for these input sizes."""
        nd = len(kernel)
        strides = list(self.attrs.get("strides") or [1] * nd)
        dil = list(self.attrs.get("dilations") or [1] * nd)
        auto_pad = self.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(nd):
                out = -(-spatial_in[i] // strides[i])
                total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial_in[i], 0)
                small, big = total // 2, total - total // 2
                b, e = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
                begin.append(b)
                end.append(e)
        elif auto_pad == "VALID":
            begin, end = [0] * nd, [0] * nd
        else:
            pads = list(self.attrs.get("pads") or [0] * (2 * nd))
            begin, end = pads[:nd], pads[nd:]
        return begin, end, strides, dil

    def _im2col(self, x: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        cols = self._im2col_samples(x, weight_shape)
        b, g, c, n = cols.shape
        return cols.transpose(1, 2, 0, 3).reshape(g, c, b * n)

    def _im2col_samples(self, x: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        """im2col per sample: (batch, groups, C, positions), C ordered like the weight (Cin/g, then taps)."""
        g = self.groups(weight_shape)
        kernel = tuple(int(k) for k in weight_shape[2:])
        nd = len(kernel)
        if x.ndim != nd + 2:
            raise CalibrationError(f"Conv input has rank {x.ndim}, expected {nd + 2} for a {nd}-D kernel")
        b, cin = x.shape[:2]
        spatial = x.shape[2:]
        begin, end, strides, dil = self.conv_geometry(spatial, kernel)
        xp = np.pad(np.asarray(x, dtype=np.float64), [(0, 0), (0, 0)] + list(zip(begin, end)))
        out = [
            (spatial[i] + begin[i] + end[i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)
        ]
        if min(out) <= 0:
            raise CalibrationError(f"Conv output would be empty for input spatial size {spatial}")
        ksize = math.prod(kernel)
        cols = np.empty((b, cin, ksize) + tuple(out), dtype=np.float64)
        for t, offs in enumerate(itertools.product(*[range(k) for k in kernel])):
            sl = tuple(
                slice(offs[i] * dil[i], offs[i] * dil[i] + (out[i] - 1) * strides[i] + 1, strides[i]) for i in range(nd)
            )
            cols[:, :, t] = xp[(slice(None), slice(None)) + sl]
        # (b, g, cin/g * ksize, L): Cin outermost then kernel taps, like the weight
        return cols.reshape(b, g, (cin // g) * ksize, -1)


@adapter("ConvTranspose")
@dataclass(frozen=True)
class ConvTransposeLayout(OpLayout):
    """ConvTranspose with W [Cin, Cout/g, k...]: g groups of (Cout/g) x (Cin/g * prod(k)) matrices.

    ConvTranspose is the adjoint of a Conv: input pixel ``i`` of channel ``ci`` (group j) adds
    ``x[ci, i] * W[ci, o, t]`` to output position ``p = i * stride + t * dilation - pad_begin`` of output channel
    ``j * Cout/g + o``. So output row o of group j, at position p, is the weight row W[j-th Cin/g block, o, :]
    (Cin/g outermost, then taps, as stored) times the column X[(ci, t), p] = x[ci, (p + pad_begin - t * dil) /
    stride] where that is an integer input position, else 0 (:meth:`unfold`). Its Hessian is the Gram of those
    columns over every output position (output_padding positions included: their columns are zero)."""

    def groups(self, weight_shape):
        return int(self.attrs.get("group", 1))

    def matrix_shape(self, weight_shape):
        g = self.groups(weight_shape)
        return g, int(weight_shape[1]), int(weight_shape[0] // g * np.prod(weight_shape[2:]))

    def to_matrices(self, w):
        g = self.groups(w.shape)
        cin_g, cout_g = w.shape[0] // g, w.shape[1]
        k = int(np.prod(w.shape[2:]))
        m = w.reshape(g, cin_g, cout_g, k).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(m.reshape(g, cout_g, cin_g * k))

    def from_matrices(self, mats, weight_shape):
        g = self.groups(weight_shape)
        cin_g, cout_g = weight_shape[0] // g, weight_shape[1]
        k = int(np.prod(weight_shape[2:]))
        w = np.asarray(mats).reshape(g, cout_g, cin_g, k).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(w.reshape(weight_shape))

    def channels_last_perm(self, weight_shape):
        cin_g = int(weight_shape[0]) // self.groups(weight_shape)
        ksize = int(np.prod(weight_shape[2:]))
        if ksize == 1:
            return None
        return np.arange(cin_g * ksize).reshape(cin_g, ksize).T.reshape(-1)

    def out_axis(self):
        return 1

    def fan_in_axis(self):
        return 0

    def group_size_problem(self, weight_shape, group_size):
        why = super().group_size_problem(weight_shape, group_size)
        if why:
            return why
        cin_g = int(weight_shape[0]) // self.groups(weight_shape)
        taps = int(np.prod(weight_shape[2:]))
        if taps > 1 and cin_g % group_size:
            return (f"group_size {group_size} does not divide the {cin_g} input channels per group of this "
                    f"{'x'.join(str(k) for k in weight_shape[2:])} ConvTranspose (a block cannot straddle kernel taps)")
        return None

    def position_dims(self, output_shape):
        """Each input pixel multiplies the whole kernel once: the input positions are about the output's
        divided by the strides (ceil; exact without padding and output_padding)."""
        dims = list(output_shape[2:])
        strides = list(self.attrs.get("strides") or [1] * len(dims))
        return [-(-d // s) if isinstance(d, int) else d for d, s in zip(dims, strides)]

    @property
    def channel_axis(self):
        return 1

    @property
    def token_inputs(self):
        return False

    def geometry(self, spatial_in, kernel):
        """(pads_begin, strides, dilations, output spatial size), auto_pad and output_shape resolved as the
        ONNX spec says."""
        nd = len(kernel)
        strides = list(self.attrs.get("strides") or [1] * nd)
        dil = list(self.attrs.get("dilations") or [1] * nd)
        opad = list(self.attrs.get("output_padding") or [0] * nd)
        auto_pad = self.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        full = [strides[i] * (spatial_in[i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nd)]
        out_shape = list(self.attrs.get("output_shape") or [])
        if len(out_shape) > nd:
            out_shape = out_shape[-nd:]
        if not out_shape and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out_shape = [spatial_in[i] * strides[i] for i in range(nd)]
        if out_shape:
            begin = []
            for i in range(nd):
                total = full[i] - out_shape[i]
                begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
            return begin, strides, dil, [int(o) for o in out_shape]
        if auto_pad == "VALID":
            pads = [0] * (2 * nd)
        else:
            pads = list(self.attrs.get("pads") or [0] * (2 * nd))
        return pads[:nd], strides, dil, [full[i] - pads[i] - pads[nd + i] for i in range(nd)]

    def input_problem(self, x_shape, weight_shape):
        if len(x_shape) != len(weight_shape):
            return f"input has rank {len(x_shape)}, expected {len(weight_shape)} for this ConvTranspose"
        if x_shape[1] != weight_shape[0]:
            return f"input has {x_shape[1]} channels, the weight expects {weight_shape[0]}"
        return None

    def positions_per_sample(self, x_shape, weight_shape):
        kernel = tuple(int(k) for k in weight_shape[2:])
        return int(np.prod(self.geometry(tuple(x_shape[2:]), kernel)[3]))

    def unfold_samples(self, x: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        """Columns per sample: (batch, groups, Cin/g * prod(k), output positions), float64."""
        g = self.groups(weight_shape)
        kernel = tuple(int(k) for k in weight_shape[2:])
        nd = len(kernel)
        if x.ndim != nd + 2:
            raise CalibrationError(f"ConvTranspose input has rank {x.ndim}, expected {nd + 2} for a {nd}-D kernel")
        b, cin = x.shape[:2]
        spatial = x.shape[2:]
        begin, strides, dil, out = self.geometry(spatial, kernel)
        if min(out) <= 0:
            raise CalibrationError(f"ConvTranspose output would be empty for input spatial size {spatial}")
        ksize = math.prod(kernel)
        x = np.asarray(x, dtype=np.float64)
        cols = np.zeros((b, cin, ksize) + tuple(out), dtype=np.float64)
        for t, offs in enumerate(itertools.product(*[range(k) for k in kernel])):
            src, dst = [], []
            for i in range(nd):
                shift = offs[i] * dil[i] - begin[i]  # output position of input pixel 0 at this tap
                lo = max(0, -(-(-shift) // strides[i]))  # first input pixel landing at p >= 0
                hi = min(spatial[i] - 1, (out[i] - 1 - shift) // strides[i])  # last landing at p < out
                if hi < lo:
                    break
                src.append(slice(lo, hi + 1))
                start = lo * strides[i] + shift
                dst.append(slice(start, start + (hi - lo) * strides[i] + 1, strides[i]))
            else:
                cols[(slice(None), slice(None), t) + tuple(dst)] = x[(slice(None), slice(None)) + tuple(src)]
        return cols.reshape(b, g, (cin // g) * ksize, -1)

    def unfold(self, x, weight_shape):
        cols = self.unfold_samples(x, weight_shape)
        b, g, c, n = cols.shape
        return cols.transpose(1, 2, 0, 3).reshape(g, c, b * n)

    def gram(self, x, weight_shape, *, dtype=None):
        """Explicit unfold, one sample at a time, products in float64."""
        g, _, c = self.matrix_shape(weight_shape)
        h = np.zeros((g, c, c), dtype=np.float64)
        n = 0
        for s in range(len(x)):
            cols = self.unfold_samples(x[s:s + 1], weight_shape)[0]
            h += np.einsum("gcn,gdn->gcd", cols, cols)
            n += cols.shape[-1]
        return h, n


@adapter("Gather")
@dataclass(frozen=True)
class GatherLayout(OpLayout):
    """Gather(table [V, D], indices, axis=0) on a constant table: an embedding lookup.

    No Hessian exists for a lookup: output row = table row, so the output error of a selected row is exactly its
    weight error, and the layer's output error is sum_r count_r ||dW_r||^2 with count_r how often calibration
    selects row r. Each row is one matrix row (rows = V, C = D); the count only weighs the rows against each
    other, so each row's own grid (RTN / MSE fit) is the layer-wise optimum. QDQ stores per row (axis 0)."""

    def matrix_shape(self, weight_shape):
        return 1, int(weight_shape[0]), int(weight_shape[1])

    def to_matrices(self, w):
        return np.ascontiguousarray(w)[None]

    def from_matrices(self, mats, weight_shape):
        return np.ascontiguousarray(mats[0])

    def out_axis(self):
        return 0

    def fan_in_axis(self):
        return 1

    def position_dims(self, output_shape):
        return [0]  # a lookup does no multiply-accumulate

    @property
    def weight_input(self):
        return 0

    @property
    def hessian_free(self):
        return True

    def input_problem(self, x_shape, weight_shape):
        return None

    def row_counts(self, indices: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
        """How often each table row is selected by ``indices`` (negative indices count from the end)."""
        idx = np.asarray(indices)
        if not np.issubdtype(idx.dtype, np.integer):
            raise CalibrationError(f"Gather indices have type {idx.dtype}, expected integers")
        v = int(weight_shape[0])
        idx = idx.reshape(-1).astype(np.int64)
        if idx.size and (idx.min() < -v or idx.max() >= v):
            raise CalibrationError(f"Gather indices out of range [-{v}, {v}) for a table of {v} rows")
        return np.bincount(np.where(idx < 0, idx + v, idx), minlength=v).astype(np.float64)


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _activation(name: str, alpha: float | None, beta: float | None):
    """The ONNX recurrent activation ``name`` as a NumPy function (None: not known here)."""
    n = name.decode() if isinstance(name, bytes) else str(name)
    n = n.lower()
    if n == "sigmoid":
        return lambda v: 1.0 / (1.0 + np.exp(-v))
    if n == "tanh":
        return np.tanh
    if n == "relu":
        return lambda v: np.maximum(v, 0.0)
    if n == "hardsigmoid":
        a = 0.2 if alpha is None else alpha
        b = 0.5 if beta is None else beta
        return lambda v: np.clip(a * v + b, 0.0, 1.0)
    if n == "affine":
        a = 1.0 if alpha is None else alpha
        b = 0.0 if beta is None else beta
        return lambda v: a * v + b
    return None


_ACT_PARAMS = {"affine": 2, "leakyrelu": 1, "thresholdedrelu": 1, "scaledtanh": 2, "hardsigmoid": 2, "elu": 1,
               "softsign": 0, "softplus": 0, "sigmoid": 0, "tanh": 0, "relu": 0}


class _Recurrent(OpLayout):
    """LSTM / GRU / RNN (ONNX): W [num_dir, gates * hidden, input] and R [num_dir, gates * hidden, hidden], each
    a layer of its own (``attrs["part"]`` = "W" or "R"), one problem per direction (its groups).

    W multiplies the node's input X at every time step: its columns are X[t, b] for every step t below the
    sequence's length (all steps without ``sequence_lens``), the same for every direction. R multiplies the
    hidden state h_{t-1} that direction d carries into step t: initial_h[d] (zeros without it) at the
    direction's first step, else Y at the previous step of that direction (t - 1 going forward, t + 1 in
    reverse, where a sequence of length L starts at step L - 1). Calibration records Y (exposed as a graph
    output when the node does not name it) and passes initial_h and sequence_lens with it.

    GRU with ``linear_before_reset = 0`` (the ONNX default) multiplies its hidden gate's block of R with
    r_t * h_{t-1}, not h_{t-1}: its R is then 3 problems per direction (z, r, h gates, ``hidden`` rows each),
    the h gate's Hessian formed from r_t * h_{t-1}, with r_t recomputed from X, W, R and B as the node does."""

    @property
    def part(self) -> str:
        return self.attrs.get("part", "W")

    @property
    def nd_layout(self) -> int:
        return int(self.attrs.get("layout", 0))

    def gates(self) -> int:
        return _GATES[self.op]

    @property
    def split_gates(self) -> bool:
        """GRU R with linear_before_reset = 0: one problem per gate (the h gate sees r * h)."""
        return self.op == "GRU" and self.part == "R" and not self.attrs.get("linear_before_reset", 0)

    def groups(self, weight_shape):
        nd = int(weight_shape[0])
        return nd * 3 if self.split_gates else nd

    def matrix_shape(self, weight_shape):
        g = self.groups(weight_shape)
        return g, int(weight_shape[0] * weight_shape[1] // g), int(weight_shape[2])

    def to_matrices(self, w):
        g, r, c = self.matrix_shape(w.shape)
        return np.ascontiguousarray(w.reshape(g, r, c))

    def from_matrices(self, mats, weight_shape):
        return np.ascontiguousarray(np.asarray(mats).reshape(weight_shape))

    def out_axis(self):
        return 1

    def fan_in_axis(self):
        return 2

    def qdq_split(self, weight_shape):
        """One per-channel DequantizeLinear per direction (axis 1 holds one direction's gates * hidden rows),
        joined by a Concat along axis 0."""
        nd = int(weight_shape[0])
        return (nd, 0) if nd > 1 else None

    def position_dims(self, output_shape):
        """Every time step applies the weight once (per direction: the weight holds all directions)."""
        if output_shape is None or len(output_shape) != 4:
            return ["?"]
        return [output_shape[1] if self.nd_layout else output_shape[0]]

    @property
    def channel_axis(self):
        return -1

    @property
    def token_inputs(self):
        return False

    @property
    def rows_are_samples(self):
        return False

    @property
    def weight_input(self):
        return 1 if self.part == "W" else 2

    @property
    def activation_sites(self) -> bool:
        return False

    def input_problem(self, x_shape, weight_shape):
        want = 3 if self.part == "W" else 4
        if len(x_shape) != want:
            return f"{'input X' if self.part == 'W' else 'output Y'} has rank {len(x_shape)}, expected {want}"
        if x_shape[-1] != weight_shape[2]:
            return f"{'input' if self.part == 'W' else 'hidden'} size {x_shape[-1]}, the weight expects {weight_shape[2]}"
        return None

    def _time_batch(self, x_shape):
        """(T, B) of X (part W) or Y (part R: [T, nd, B, H] in layout 0)."""
        t_ax, b_ax = (1, 0) if self.nd_layout else (0, 2 if self.part == "R" else 1)
        return int(x_shape[t_ax]), int(x_shape[b_ax])

    def _valid(self, T: int, B: int, sequence_lens) -> np.ndarray:
        """(T, B) bool: the steps each sequence really has."""
        if sequence_lens is None:
            return np.ones((T, B), dtype=bool)
        lens = np.asarray(sequence_lens).reshape(-1).astype(np.int64)
        if lens.shape[0] != B:
            raise CalibrationError(f"sequence_lens has {lens.shape[0]} entries for a batch of {B}")
        if lens.size and (lens.min() < 0 or lens.max() > T):
            raise CalibrationError(f"sequence_lens out of range [0, {T}]")
        return np.arange(T)[:, None] < lens[None, :]

    def _reverse(self, d: int, nd: int) -> bool:
        direction = self.attrs.get("direction", "forward")
        if isinstance(direction, bytes):
            direction = direction.decode()
        return d == 1 or (nd == 1 and direction == "reverse")

    def positions_per_sample(self, x_shape, weight_shape):
        return self._time_batch(x_shape)[0]

    def count_columns(self, x_shape, weight_shape, sequence_lens=None, **_):
        T, B = self._time_batch(x_shape)
        return int(self._valid(T, B, sequence_lens).sum())

    def _tb(self, a: np.ndarray, nd_axis: bool) -> np.ndarray:
        """X [T, B, I] / Y [T, nd, B, H] in layout 0; layout 1 ([B, T, ...]) brought to it."""
        a = np.asarray(a, dtype=np.float64)
        if self.nd_layout:
            return a.transpose(1, 2, 0, 3) if nd_axis else a.transpose(1, 0, 2)
        return a

    def _h0(self, initial_h, nd, B, H):
        """initial_h as [nd, B, H] (zeros without it)."""
        if initial_h is None:
            return np.zeros((nd, B, H))
        h0 = np.asarray(initial_h, dtype=np.float64)
        return h0.transpose(1, 0, 2) if self.nd_layout else h0

    def hidden_inputs(self, y: np.ndarray, nd: int, sequence_lens=None, initial_h=None) -> np.ndarray:
        """h_{t-1} per direction and step: (nd, T, B, H), layout 0 order, from Y and initial_h."""
        y = self._tb(y, True)  # [T, nd, B, H]
        T, _, B, H = y.shape
        h0 = self._h0(initial_h, nd, B, H)
        lens = (np.full(B, T) if sequence_lens is None else np.asarray(sequence_lens).reshape(-1).astype(np.int64))
        prev = np.zeros((nd, T, B, H))
        for d in range(nd):
            if self._reverse(d, nd):
                prev[d, :-1] = y[1:, d]
                for b in range(B):  # a sequence of length L starts at step L - 1 from initial_h
                    if 0 < lens[b] <= T:
                        prev[d, lens[b] - 1, b] = h0[d, b]
            else:
                prev[d, 1:] = y[:-1, d]
                prev[d, 0] = h0[d]
        return prev

    def unfold(self, x, weight_shape, *, sequence_lens=None, initial_h=None, X=None, W=None, R=None, B=None):
        """Columns (groups, C, n) of one batch: X's valid steps for W, the hidden states R multiplies for R."""
        nd = int(weight_shape[0])
        if self.part == "W":
            xs = self._tb(x, False)  # [T, B, I]
            T, Bn, _ = xs.shape
            valid = self._valid(T, Bn, sequence_lens)
            cols = xs[valid].T  # (I, n)
            return np.broadcast_to(cols, (nd,) + cols.shape).copy()
        y = self._tb(x, True)
        T, _, Bn, H = y.shape
        valid = self._valid(T, Bn, sequence_lens)
        prev = self.hidden_inputs(x, nd, sequence_lens, initial_h)  # (nd, T, B, H)
        per_dir = [prev[d][valid].T for d in range(nd)]  # (H, n) each
        if not self.split_gates:
            return np.stack(per_dir)
        if X is None or W is None or R is None:
            raise CalibrationError("GRU (linear_before_reset = 0): the R Hessian needs X, W and R")
        xs = self._tb(X, False)
        W = np.asarray(W, dtype=np.float64)
        R = np.asarray(R, dtype=np.float64)
        bias = np.zeros((nd, 6 * H)) if B is None else np.asarray(B, dtype=np.float64)
        clip = self.attrs.get("clip")
        out = []
        for d in range(nd):
            f = self.gate_activation(d, nd)
            pre = (xs @ W[d, H:2 * H].T + prev[d] @ R[d, H:2 * H].T + bias[d, H:2 * H] + bias[d, 4 * H:5 * H])
            if clip is not None:
                pre = np.clip(pre, -clip, clip)
            r = f(pre)  # [T, B, H]
            h = per_dir[d]
            out += [h, h, (r * prev[d])[valid].T]
        return np.stack(out)

    def gate_activation(self, d: int, nd: int):
        """f of direction d (the z / r gates' activation): Sigmoid unless ``activations`` says otherwise."""
        acts = list(self.attrs.get("activations") or [])
        if not acts:
            return _activation("Sigmoid", None, None)
        alphas = list(self.attrs.get("activation_alpha") or [])
        betas = list(self.attrs.get("activation_beta") or [])
        # alpha / beta lists hold one entry per activation that takes them, in order
        ia = ib = 0
        for k, name in enumerate(acts):
            key = (name.decode() if isinstance(name, bytes) else str(name)).lower()
            n = _ACT_PARAMS.get(key, 0)
            a = alphas[ia] if n >= 1 and ia < len(alphas) else None
            b = betas[ib] if n >= 2 and ib < len(betas) else None
            ia += n >= 1
            ib += n >= 2
            if k == 2 * d:
                fn = _activation(name, a, b)
                if fn is None:
                    raise CalibrationError(f"GRU gate activation {name!r} is not supported for its R Hessian")
                return fn
        raise CalibrationError("GRU activations list too short")

    def gram(self, x, weight_shape, *, dtype=None, **aux):
        """Products in float64 (the columns are a copy of the recorded tensors: no unfolding to tile)."""
        cols = self.unfold(x, weight_shape, **aux)
        return cols @ cols.transpose(0, 2, 1), int(cols.shape[-1])


for _op in _GATES:
    adapter(_op)(dataclass(frozen=True)(type(f"{_op}Layout", (_Recurrent,), {"__module__": __name__})))


@dataclass(frozen=True)
class EinsumTerms:
    """An Einsum equation read as a product of an activation X with a constant W (see :func:`einsum_terms`)."""

    x: tuple[str, ...]  # X's labels, "..." for an ellipsis
    w: tuple[str, ...]
    out: tuple[str, ...]
    k: tuple[str, ...]  # contracted: in X and W, not in the output (the columns), in W's order
    n: tuple[str, ...]  # W's labels in the output, not in X (the rows), in W's order
    g: str | None  # in X, W and the output: one matrix per value (the groups)


def einsum_terms(equation: str, w_input: int) -> EinsumTerms | str:
    """The terms of an Einsum whose operand ``w_input`` (0 or 1) is the constant W, or why the equation is not a
    plain (batched) matrix product of X with W: at least one contracted label and one label of W in the output,
    at most one label shared by X, W and the output (groups: "bhd,hdk->bhk"), no label summed within one operand,
    no repeated label, no ellipsis in W."""
    eq = equation.replace(" ", "")
    if eq.count("->") > 1:
        return f"malformed Einsum equation {equation!r}"
    lhs, _, rhs = eq.partition("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return f"Einsum with {len(ops)} operands"

    def labels(s: str) -> list[str] | None:
        out, i = [], 0
        while i < len(s):
            if s.startswith("...", i):
                out.append("...")
                i += 3
            elif s[i].isalpha():
                out.append(s[i])
                i += 1
            else:
                return None
        return out

    sx, sw = labels(ops[1 - w_input]), labels(ops[w_input])
    if sx is None or sw is None:
        return f"malformed Einsum equation {equation!r}"
    if "->" in eq:
        so = labels(rhs)
        if so is None:
            return f"malformed Einsum equation {equation!r}"
    else:  # implicit output: the labels seen once, in alphabetical order, after any ellipsis
        seen = sx + sw
        so = (["..."] if "..." in seen else []) + sorted(lb for lb in set(seen) if lb != "..." and seen.count(lb) == 1)
    if "..." in sw:
        return "Einsum with an ellipsis in the constant operand"
    for s in (sx, sw, so):
        if len(set(s)) != len(s):
            return "Einsum with a repeated label (a diagonal or trace)"
    xs, ws, os_ = set(sx), set(sw), set(so)
    if ("..." in xs) != ("..." in os_):
        return "Einsum summing over an ellipsis"
    summed_alone = (xs - ws - os_) | (ws - xs - os_)
    if summed_alone:
        return f"Einsum summing label(s) {', '.join(sorted(summed_alone))} within one operand"
    k = tuple(lb for lb in sw if lb in xs and lb not in os_)
    g = [lb for lb in sw if lb in xs and lb in os_]
    n = tuple(lb for lb in sw if lb not in xs and lb in os_)
    if not k or not n or len(g) > 1:
        return (f"Einsum {equation!r} is not a matrix product with the constant (it needs a contracted label, an "
                f"output label of the constant and at most one shared batch label; found {len(k)}, {len(n)}, "
                f"{len(g)})")
    return EinsumTerms(tuple(sx), tuple(sw), tuple(so), k, n, g[0] if g else None)


@adapter("Einsum")
@dataclass(frozen=True)
class EinsumLayout(OpLayout):
    """Einsum of an activation X with a constant W that is a (batched) matrix product: W's labels in the output
    (n) are the rows, the contracted labels (k) the columns (both flattened in W's order), a label g shared by X,
    W and the output makes one matrix per value of g (groups, e.g. "bhd,hdk->bhk": head h multiplies X[:, h, :]
    by its own W[h]). X's other labels (and an ellipsis) are positions: the columns of the Hessian are X's
    k-vectors at every position (of group g). ``attrs``: ``equation`` and ``w_input`` (which operand is the
    constant). QDQ needs a single n and a single k label (the DequantizeLinear's channel and block axes); with
    several the weight is stored as float fake-quant (:meth:`qdq_problem`)."""

    @property
    def terms(self) -> EinsumTerms:
        t = einsum_terms(self.attrs["equation"], self.attrs.get("w_input", 1))
        if isinstance(t, str):
            raise ValueError(t)
        return t

    @property
    def weight_input(self):
        return int(self.attrs.get("w_input", 1))

    def _gdim(self, weight_shape) -> int:
        t = self.terms
        return int(weight_shape[t.w.index(t.g)]) if t.g else 1

    def _size(self, labels, weight_shape) -> int:
        return int(np.prod([weight_shape[self.terms.w.index(lb)] for lb in labels]))

    def groups(self, weight_shape):
        return self._gdim(weight_shape)

    def matrix_shape(self, weight_shape):
        t = self.terms
        return self._gdim(weight_shape), self._size(t.n, weight_shape), self._size(t.k, weight_shape)

    def _perm(self) -> list[int]:
        t = self.terms
        return ([t.w.index(t.g)] if t.g else []) + [t.w.index(lb) for lb in t.n + t.k]

    def to_matrices(self, w):
        g, r, c = self.matrix_shape(w.shape)
        return np.ascontiguousarray(np.transpose(w, self._perm()).reshape(g, r, c))

    def from_matrices(self, mats, weight_shape):
        perm = self._perm()
        shaped = np.asarray(mats).reshape([weight_shape[a] for a in perm])
        return np.ascontiguousarray(np.transpose(shaped, np.argsort(perm)))

    def qdq_problem(self, weight_shape):
        t = self.terms
        if len(t.n) > 1 or len(t.k) > 1:
            return (f"the Einsum's constant has {len(t.n)} output and {len(t.k)} contracted labels: "
                    "DequantizeLinear has one channel axis")
        return None

    def out_axis(self):
        return self.terms.w.index(self.terms.n[0])

    def fan_in_axis(self):
        return self.terms.w.index(self.terms.k[-1])

    def group_size_problem(self, weight_shape, group_size):
        why = super().group_size_problem(weight_shape, group_size)
        if why or len(self.terms.k) == 1:
            return why
        inner = int(weight_shape[self.fan_in_axis()])
        if inner % group_size:
            return (f"group_size {group_size} does not divide the Einsum's innermost contracted dim {inner} (a block "
                    "cannot straddle two contracted labels)")
        return None

    def qdq_split(self, weight_shape):
        t = self.terms
        g = self._gdim(weight_shape)
        return (g, t.w.index(t.g)) if t.g and g > 1 else None

    def _x_axes(self, ndim: int) -> list[str]:
        """X's label per axis, an ellipsis expanded to "...0", "...1", ..."""
        return self._expand(self.terms.x, ndim)

    def _out_axes(self, ndim: int) -> list[str]:
        return self._expand(self.terms.out, ndim)

    @staticmethod
    def _expand(labels, ndim: int) -> list[str]:
        if "..." not in labels:
            return list(labels)
        i = labels.index("...")
        return list(labels[:i]) + [f"...{j}" for j in range(max(ndim - (len(labels) - 1), 0))] + list(labels[i + 1:])

    def _not_pos(self) -> set:
        t = self.terms
        return set(t.k) | ({t.g} if t.g else set())

    @property
    def rows_are_samples(self):
        return self.terms.x[0] not in self._not_pos()

    @property
    def token_inputs(self):
        return False

    def position_dims(self, output_shape):
        """The output's dims of X's own labels, but X's first axis (the samples)."""
        t = self.terms
        axes = self._out_axes(len(output_shape))
        first = self._x_axes(len(output_shape))[0] if "..." in t.x else t.x[0]
        skip = set(t.n) | {t.g, first}
        return [output_shape[i] for i, lb in enumerate(axes) if lb not in skip]

    def input_problem(self, x_shape, weight_shape):
        t = self.terms
        axes = self._x_axes(len(x_shape))
        if len(axes) != len(x_shape) or ("..." in t.x and len(x_shape) < len(t.x) - 1):
            return f"input has rank {len(x_shape)}, the equation {self.attrs['equation']!r} expects {len(t.x)}"
        for lb in t.k + ((t.g,) if t.g else ()):
            if x_shape[axes.index(lb)] != weight_shape[t.w.index(lb)]:
                return f"input has {x_shape[axes.index(lb)]} along '{lb}', the weight {weight_shape[t.w.index(lb)]}"
        return None

    def positions_per_sample(self, x_shape, weight_shape):
        axes = self._x_axes(len(x_shape))
        skip = self._not_pos() | ({axes[0]} if self.rows_are_samples else set())
        return int(np.prod([d for lb, d in zip(axes, x_shape) if lb not in skip] or [1]))

    def count_columns(self, x_shape, weight_shape, **aux):
        axes = self._x_axes(len(x_shape))
        return int(np.prod([d for lb, d in zip(axes, x_shape) if lb not in self._not_pos()] or [1]))

    def unfold(self, x, weight_shape):
        t = self.terms
        x = np.asarray(x, dtype=np.float64)
        axes = self._x_axes(x.ndim)
        pos = [i for i, lb in enumerate(axes) if lb not in self._not_pos()]
        order = pos + ([axes.index(t.g)] if t.g else []) + [axes.index(lb) for lb in t.k]
        g, _, c = self.matrix_shape(weight_shape)
        cols = np.transpose(x, order).reshape(-1, g, c)  # (positions, groups, K), K in W's order of the k labels
        return np.ascontiguousarray(cols.transpose(1, 2, 0))

    def gram(self, x, weight_shape, *, dtype=None):
        cols = self.unfold(x, weight_shape)
        return cols @ cols.transpose(0, 2, 1), int(cols.shape[-1])
