"""What to do: one frozen, validated configuration shared by the Python API and the CLI."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

METHODS = ("exact", "magnitude", "rtn")
GRIDS = ("minmax", "mse")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
ACT_CALIB = ("minmax", "percentile", "mse", "search")


def parse_nm(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); validates 0 < N < M."""
    if text is None:
        return None
    if isinstance(text, tuple):
        n, m = text
    else:
        m_ = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not m_:
            raise ValueError(f"--nm must look like N:M (e.g. 2:4), got {text!r}")
        n, m = int(m_.group(1)), int(m_.group(2))
    if not 0 < n < m:
        raise ValueError(f"--nm N:M needs 0 < N < M, got {n}:{m}")
    return int(n), int(m)


@dataclass(frozen=True)
class CompressConfig:
    """Options of one compression run. Invalid or incompatible options raise ValueError on construction.

    method: 'exact' (ExactOBS / OBQ), or the baselines 'magnitude' (pruning, + RTN for --bits) and
    'rtn' (round-to-nearest, + magnitude pruning when a pruning option is given).
    """

    method: str = "exact"
    sparsity: float | None = None
    nm: tuple[int, int] | None = None
    block_size: int | None = None
    bits: int | None = None
    group_size: int | None = None
    sym: bool = False
    grid: str = "minmax"
    damp: float = 0.01
    samples: int | None = None
    batch_size: int = 32
    include: str | None = None
    exclude: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    qdq: bool = False
    matmulnbits: bool = False
    accuracy_level: int = 0
    opset: int | None = None
    verify: bool = False
    sparse_storage: bool = False
    token_mask: str | None = "auto"
    verify_samples: int = 64
    layer_error: bool = True
    act_bits: int | None = None
    act_calib: str = "minmax"
    act_percentile: float = 99.99
    batch_axes: tuple[tuple[str, int | None], ...] | None = None  # --batch-axis NAME=AXIS (None: pass whole)
    verify_data: str | None = None  # --verify-data: held-out data for --verify (implies it); default calibration

    def __post_init__(self) -> None:
        if isinstance(self.batch_axes, dict):
            object.__setattr__(self, "batch_axes", tuple(self.batch_axes.items()) or None)
        if self.verify_data is not None:
            object.__setattr__(self, "verify_data", str(self.verify_data))
            object.__setattr__(self, "verify", True)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.nm is not None:
            object.__setattr__(self, "nm", parse_nm(self.nm))
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ValueError(f"--bits must be between 2 and 8, got {self.bits}")
        if self.block_size is not None:
            if self.block_size < 1:
                raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
            if self.sparsity is None:
                raise ValueError("--block-size needs --sparsity (the fraction of weights to zero in blocks)")
        if self.nm is not None and self.sparsity is not None:
            raise ValueError("--nm and --sparsity are two different patterns: give one of them")
        if self.nm is not None and self.block_size is not None:
            raise ValueError("--nm and --block-size cannot be combined")
        if self.grid not in GRIDS:
            raise ValueError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if not 0 < self.damp < 1e6:
            raise ValueError(f"--damp must be positive, got {self.damp}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for flag, rx in (("--include", self.include), ("--exclude", self.exclude)):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ValueError(f"{flag} {rx!r} is not a valid regular expression: {e}") from None
        if self.qdq and self.bits is None:
            raise ValueError("--qdq stores quantized weights: give --bits B")
        if self.matmulnbits and self.act_bits is not None:
            raise ValueError("--act-bits cannot be combined with --format matmulnbits (use --format qdq)")
        if self.matmulnbits and (self.bits is None or self.bits > 4):
            raise ValueError("--format matmulnbits stores 4-bit MatMul weights: give --bits 2, 3 or 4")
        if self.verify_samples < 1:
            raise ValueError(f"--verify-samples must be >= 1, got {self.verify_samples}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.opset is not None and not 7 <= self.opset <= 23:
            raise ValueError(f"--opset must be an ONNX opset between 7 and 23, got {self.opset}")
        if self.group_size is not None:
            if self.bits is None:
                raise ValueError("--group-size sets the quantization grid's granularity: give --bits B too")
            if self.group_size < 2:
                raise ValueError(f"--group-size must be >= 2 (consecutive inputs per scale), got {self.group_size}")
            if self.matmulnbits and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
                raise ValueError(f"--format matmulnbits needs a --group-size that is a power of two >= 16 (its block "
                                 f"size), got {self.group_size}: use 16, 32, 64 or 128, or --format qdq")
            if self.act_bits is not None:
                raise ValueError("--act-bits (integer kernels) needs one weight scale per output channel: drop --group-size")
        if self.act_bits is not None:
            if self.act_bits != 8:
                raise ValueError(f"--act-bits {self.act_bits}: only 8-bit activations are supported (ONNX Runtime's "
                                 "integer kernels are 8-bit)")
            if self.bits != 8:
                raise ValueError("--act-bits 8 is the W8A8 path: give --bits 8 too (integer kernels need 8-bit weights)")
            object.__setattr__(self, "qdq", True)  # activation Q/DQ pairs only make sense with QDQ weights
            # integer kernels want int8 weights with zero point 0 (u8s8): asymmetric uint8 weights ran a generic
            # QLinearConv path 11x slower than float on the shipped model's depthwise conv
            object.__setattr__(self, "sym", True)
        if self.act_calib not in ACT_CALIB:
            raise ValueError(f"--act-calib must be one of {', '.join(ACT_CALIB)}, got {self.act_calib!r}")
        if not 50.0 < self.act_percentile <= 100.0:
            raise ValueError(f"--act-percentile must be in (50, 100], got {self.act_percentile}")
        if not self.prunes and self.bits is None:
            raise ValueError("nothing to do: give --sparsity S, --nm N:M, --block-size B --sparsity S and/or --bits B")
        if self.method == "magnitude" and not self.prunes:
            raise ValueError("--method magnitude prunes: give --sparsity S or --nm N:M (use --method rtn for --bits alone)")
        if self.method == "magnitude" and self.block_size is not None:
            raise ValueError("--block-size is implemented by --method exact only")
        if self.method == "rtn" and self.bits is None:
            raise ValueError("--method rtn quantizes: give --bits B (use --method magnitude for pruning alone)")
        if self.method == "rtn" and self.block_size is not None:
            raise ValueError("--block-size is implemented by --method exact only")

    @property
    def prunes(self) -> bool:
        return self.sparsity is not None or self.nm is not None

    def describe(self) -> str:
        """A short human label such as 'exact 50%+4b' or 'rtn 4b'."""
        parts = []
        if self.nm:
            parts.append(f"{self.nm[0]}:{self.nm[1]}")
        elif self.sparsity:
            parts.append(f"{self.sparsity:.0%}" + (f" b{self.block_size}" if self.block_size else ""))
        if self.bits:
            parts.append(f"{self.bits}b" + ("-sym" if self.sym else "") + (f"/g{self.group_size}" if self.group_size else ""))
        if self.act_bits:
            parts.append(f"a{self.act_bits}")
        return f"{self.method} " + "+".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)
