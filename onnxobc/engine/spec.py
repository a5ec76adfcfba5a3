"""What to do with ONE layer: :class:`LayerSpec`, the single source of truth for the per-layer options.

Every per-layer option is a field of :class:`LayerSpec` whose metadata says how the command line spells it
(``flag``, ``type``, ``metavar``, ``choices``, ``help``). The CLI builds its "what to do" arguments from these
fields, ``--plan`` rules accept the same names, and :class:`onnxobc.config.CompressConfig` (the run's options)
inherits them: nothing lists the fields by hand a second time. Validation raises ValueError with the CLI's
spelling of the options, so a message reads the same from the command line, the Python API or a plan file.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

METHODS = ("exact", "magnitude", "rtn", "gptq", "sparsegpt", "auto")
# methods whose solve needs the layer's Hessian (the baselines are data-free)
HESSIAN_METHODS = ("exact", "gptq", "sparsegpt", "auto")
GRIDS = ("minmax", "mse")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")


def parse_nm(text: str | tuple[int, int] | list | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); validates 0 < N < M."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        if len(text) != 2:
            raise ValueError(f"--nm must be a pair N:M (e.g. 2:4), got {text!r}")
        n, m = text
    else:
        m_ = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not m_:
            raise ValueError(f"--nm must look like N:M (e.g. 2:4), got {text!r}")
        n, m = int(m_.group(1)), int(m_.group(2))
    if not 0 < n < m:
        raise ValueError(f"--nm N:M needs 0 < N < M, got {n}:{m}")
    return int(n), int(m)


def _opt(default, *, type=None, metavar=None, choices=None, help: str, flag_action: str | None = None):
    """A LayerSpec field with its command-line spelling in the metadata."""
    return field(default=default, metadata=dict(type=type, metavar=metavar, choices=choices, help=help,
                                                action=flag_action))


@dataclass(frozen=True)
class LayerSpec:
    """How to compress one layer. Invalid or incompatible options raise ValueError on construction.

    method: 'auto' (default: 'exact' where affordable, with the fast mode kept where its layer error is lower;
    the fast mode alone beyond), 'exact' (ExactOBS / OBQ), 'gptq' / 'sparsegpt' (the fast modes), or the baselines 'magnitude' (pruning, + RTN for bits) and 'rtn'
    (round-to-nearest, + magnitude pruning when a pruning option is given). Pattern: ``sparsity`` alone
    (unstructured), ``nm`` (N:M) or ``block_size`` with ``sparsity`` (blocks); ``bits`` quantizes (after
    pruning, if any), per output channel or per ``group_size`` consecutive inputs.
    """

    method: str = _opt("auto", choices=METHODS,
                       help="auto (default): per layer exact where it is cheap (rows x C^3 <= 2e11), keeping the "
                            "better of exact and the fast mode by layer error, the fast mode alone otherwise; "
                            "exact: ExactOBS/OBQ on every layer (hours on 4096-wide layers); gptq / sparsegpt: the "
                            "fast modes (fixed column order, lazy block updates; sparsegpt prunes with the mask "
                            "chosen per block of 128 columns, and quantizes jointly with --bits); magnitude / rtn: "
                            "the baselines")
    sparsity: float | None = _opt(None, type=float, metavar="S", help="fraction of weights to zero per layer, e.g. 0.5")
    nm: tuple[int, int] | None = _opt(None, type=str, metavar="N:M",
                                      help="semi-structured sparsity: at most N non-zeros in every M, e.g. 2:4")
    block_size: int | None = _opt(None, type=int, metavar="B",
                                  help="zero weights in blocks of B consecutive inputs (with --sparsity)")
    bits: int | None = _opt(None, type=int, metavar="B", help="quantize weights to B bits (2..8), per output channel")
    group_size: int | None = _opt(
        None, type=int, metavar="G",
        help="with --bits: one scale and zero point per G consecutive inputs of each output channel (group-wise, "
             "e.g. 32 or 128) instead of one per channel; stored as blocked DequantizeLinear (opset 21) or "
             "MatMulNBits blocks. Convs whose Cin/groups G does not divide stay per-channel")
    sym: bool = _opt(False, flag_action="store_true", help="symmetric quantization grid (default asymmetric)")
    grid: str = _opt("minmax", choices=GRIDS, help="grid range: min-max or MSE search")
    damp: float = _opt(0.01, type=float, help="relative Hessian damping (default 0.01)")
    device: str = _opt("cpu", choices=DEVICES, help="engine device (cuda needs CuPy)")
    dtype: str = _opt("float32", choices=DTYPES, help="engine working precision")
    act_order: bool = _opt(False, flag_action="store_true",
                           help="with --method gptq or auto and --bits alone: quantize columns in order of "
                                "decreasing Hessian diagonal (GPTQ's act-order); group-wise grids stay static "
                                "(fitted on the original consecutive columns) so they remain exportable")

    def __post_init__(self) -> None:
        if self.nm is not None:
            object.__setattr__(self, "nm", parse_nm(self.nm))
        self._check_spec()

    def _check_spec(self) -> None:
        check_spec(self)

    @property
    def prunes(self) -> bool:
        return self.sparsity is not None or self.nm is not None

    @property
    def density(self) -> float:
        """Nominal fraction of weights kept."""
        if self.nm is not None:
            return self.nm[0] / self.nm[1]
        return 1.0 - (self.sparsity or 0.0)

    def label(self) -> str:
        """A short human label such as 'exact 50%+4b' or 'rtn 4b'."""
        parts = []
        if self.nm:
            parts.append(f"{self.nm[0]}:{self.nm[1]}")
        elif self.sparsity:
            parts.append(f"{self.sparsity:.0%}" + (f" b{self.block_size}" if self.block_size else ""))
        if self.bits:
            parts.append(f"{self.bits}b" + ("-sym" if self.sym else "") + (f"/g{self.group_size}" if self.group_size else "")
                         + ("-act" if self.act_order else ""))
        return f"{self.method} " + "+".join(parts)

    def to_rule(self) -> dict:
        """The spec as the fields of a ``--plan`` rule (nm as 'N:M'; the device is a run option, not part of it)."""
        d = {f.name: getattr(self, f.name) for f in spec_fields() if f.name != "device"}
        if d["nm"] is not None:
            d["nm"] = f"{d['nm'][0]}:{d['nm'][1]}"
        return d

    def spec(self) -> "LayerSpec":
        """This object's per-layer options as a plain LayerSpec (also for subclasses carrying more options)."""
        return LayerSpec(**{f.name: getattr(self, f.name) for f in spec_fields()})

    def to_dict(self) -> dict:
        return asdict(self)


def spec_fields():
    """The per-layer option fields, in order (the CLI and plan files are built from these)."""
    return fields(LayerSpec)


SPEC_NAMES = tuple(f.name for f in fields(LayerSpec))


def check_spec(s: LayerSpec, *, bits_to_come: bool = False) -> None:
    """Raise ValueError for invalid or incompatible per-layer options (messages use the CLI's spelling).
    ``bits_to_come``: the bit width is chosen later (candidates of a target), so options that need one pass."""
    if s.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {s.method!r}")
    if s.sparsity is not None and not 0.0 <= s.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {s.sparsity}")
    if s.bits is not None and not 2 <= s.bits <= 8:
        raise ValueError(f"--bits must be between 2 and 8, got {s.bits}")
    if s.block_size is not None:
        if s.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {s.block_size}")
        if s.sparsity is None:
            raise ValueError("--block-size needs --sparsity (the fraction of weights to zero in blocks)")
    if s.nm is not None and s.sparsity is not None:
        raise ValueError("--nm and --sparsity are two different patterns: give one of them")
    if s.nm is not None and s.block_size is not None:
        raise ValueError("--nm and --block-size cannot be combined")
    if s.grid not in GRIDS:
        raise ValueError(f"--grid must be one of {', '.join(GRIDS)}, got {s.grid!r}")
    if not 0 < s.damp < 1e6:
        raise ValueError(f"--damp must be positive, got {s.damp}")
    if s.device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {s.device!r}")
    if s.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {s.dtype!r}")
    if s.group_size is not None:
        if s.bits is None and not bits_to_come:
            raise ValueError("--group-size sets the quantization grid's granularity: give --bits B too")
        if s.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (consecutive inputs per scale), got {s.group_size}")
    if s.act_order:
        if s.method not in ("gptq", "auto"):
            raise ValueError(f"--act-order is an option of --method gptq or auto, not {s.method}")
        if (s.bits is None and not bits_to_come) or s.sparsity is not None or s.nm is not None or s.block_size is not None:
            raise ValueError("--act-order orders the columns of a quantization: give --bits B and no pruning option")


def check_method(s: LayerSpec) -> None:
    """The checks that need the whole spec to be final (something to do, and a method that can do it)."""
    if not s.prunes and s.bits is None:
        raise ValueError("nothing to do: give --sparsity S, --nm N:M, --block-size B --sparsity S and/or --bits B")
    if s.method == "magnitude" and not s.prunes:
        raise ValueError("--method magnitude prunes: give --sparsity S or --nm N:M (use --method rtn for --bits alone)")
    if s.method == "magnitude" and s.block_size is not None:
        raise ValueError("--block-size is implemented by --method exact only")
    if s.method == "rtn" and s.bits is None:
        raise ValueError("--method rtn quantizes: give --bits B (use --method magnitude for pruning alone)")
    if s.method == "rtn" and s.block_size is not None:
        raise ValueError("--block-size is implemented by --method exact only")
    if s.method == "gptq" and s.bits is None:
        raise ValueError("--method gptq quantizes: give --bits B (use --method sparsegpt for pruning alone)")
    if s.method == "sparsegpt" and not s.prunes:
        raise ValueError("--method sparsegpt prunes: give --sparsity S or --nm N:M (use --method gptq for --bits alone)")
    if s.method in ("gptq", "sparsegpt") and s.block_size is not None:
        raise ValueError("--block-size is implemented by --method exact (and auto, which uses exact for it) only")
