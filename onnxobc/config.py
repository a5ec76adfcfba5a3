"""What to do: one frozen, validated configuration shared by the Python API and the CLI.

:class:`CompressConfig` is a :class:`~onnxobc.engine.spec.LayerSpec` (the per-layer options, which it applies to
every layer unless a plan says otherwise) plus the options of the run (data, selection, export format,
activation quantization, verification).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .engine.spec import DEVICES, DTYPES, GRIDS, METHODS, LayerSpec, check_method, parse_nm  # noqa: F401
from .plan import parse_rules

ACT_CALIB = ("minmax", "percentile", "mse", "search")


@dataclass(frozen=True)
class CompressConfig(LayerSpec):
    """Options of one compression run. Invalid or incompatible options raise ValueError on construction.

    The per-layer fields (method, sparsity, nm, block_size, bits, group_size, sym, grid, damp, device, dtype)
    are :class:`LayerSpec`'s; ``plan`` (a list of rules, see :mod:`onnxobc.plan`) overrides them per layer.
    """

    samples: int | None = None
    batch_size: int = 32
    include: str | None = None
    exclude: str | None = None
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
    act_bias_correction: bool = False  # W8A8: correct each layer's output mean shift in its bias (calibrate.biascorr)
    smooth_alpha: float | None = None  # W8A8: SmoothQuant migration strength (calibrate.smooth); None: off
    act_noise: bool = False  # W8A8: each quantized input's rounding noise (scale^2 / 12) added to its layer's Hessian
    act_search_target: float = 2.0  # --act-calib search: keep tensors float while W8A8 > this x weight-only (in-sample)
    act_search_samples: int = 64  # --act-calib search: calibration samples the search measures on
    act_search_metric: str = "logits"  # --act-calib search: error on the logits behind Softmax/Sigmoid, or 'output'
    plan: tuple | None = None  # rules (dicts) as in a --plan file, already parsed
    target_flops: float | None = None  # keep at most this fraction of the selected layers' dense MACs
    target_size: float | None = None  # stored weight bytes at most this fraction of their fp32 bytes
    target_bops: float | None = None  # BOPs at most this fraction of dense 8-bit weights x 8-bit activations
    cand_bits: tuple | None = None  # with a target: candidate bit widths (--bits 8,4,3)
    cand_sparsity: tuple | None = None  # with a target: candidate sparsities (--sparsity 0.5,0.7)
    database: str | None = None  # directory of the per-layer variant database (reused across targets)
    allocation_error: str = "output"  # a variant's error: 'output' (model output change, swap one layer) or 'layer'
    allocation_samples: int = 32  # calibration samples for --allocation-error output
    allocation_search: int = 0  # trials of the stitched-model search around the DP (0: the DP alone)
    stats_correction: str = "none"  # after compression: 'none', 'mean' or 'affine' per output channel
    correction_samples: int = 128  # calibration samples the correction measures on
    batch_axes: tuple[tuple[str, int | None], ...] | None = None  # --batch-axis NAME=AXIS (None: pass whole)
    verify_data: str | None = None  # --verify-data: held-out data for --verify (implies it); default calibration
    executor: str = "local"  # where the layer solves run: 'local' (this process) or 'ray' (Ray tasks; onnxobc[ray])
    ray_address: str | None = None  # --ray-address: the Ray cluster to use (implies executor 'ray'); None: a local one
    sequential: bool = False  # calibrate stage by stage on the model whose earlier stages are already compressed
    stage_memory: float | None = None  # MB of Hessians held at once (None: half the available memory); over it: stages
    low_memory: str = "auto"  # ONNX Runtime maps the weights, no prepacked copy: 'on', 'off', 'auto' (weights > 1 GiB)

    def __post_init__(self) -> None:
        if isinstance(self.batch_axes, dict):
            object.__setattr__(self, "batch_axes", tuple(self.batch_axes.items()) or None)
        if self.verify_data is not None:
            object.__setattr__(self, "verify_data", str(self.verify_data))
            object.__setattr__(self, "verify", True)
        if self.ray_address is not None:
            object.__setattr__(self, "executor", "ray")
        super().__post_init__()
        if self.low_memory not in ("auto", "on", "off"):
            raise ValueError(f"--low-memory must be auto, on or off, got {self.low_memory!r}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"--executor must be 'local' or 'ray', got {self.executor!r}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        for flag, rx in (("--include", self.include), ("--exclude", self.exclude)):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ValueError(f"{flag} {rx!r} is not a valid regular expression: {e}") from None
        if self.plan is not None:
            object.__setattr__(self, "plan", parse_rules(self.plan))
        targets = [(k, v) for k, v in (("flops", self.target_flops), ("size", self.target_size),
                                       ("bops", self.target_bops)) if v is not None]
        if len(targets) > 1:
            raise ValueError("give one target at a time: --target-flops, --target-size or --target-bops")
        for k, v in targets:
            if not 0.0 < v <= 1.0:
                raise ValueError(f"--target-{k} is a fraction of the dense cost in (0, 1], got {v}")
        if self.allocation_error not in ("layer", "output"):
            raise ValueError(f"--allocation-error must be 'layer' or 'output', got {self.allocation_error!r}")
        if self.stats_correction not in ("none", "mean", "affine"):
            raise ValueError(f"--stats-correction must be none, mean or affine, got {self.stats_correction!r}")
        if self.correction_samples < 1:
            raise ValueError(f"--correction-samples must be >= 1, got {self.correction_samples}")
        if self.allocation_search < 0:
            raise ValueError(f"--allocation-search must be >= 0, got {self.allocation_search}")
        if self.allocation_samples < 1:
            raise ValueError(f"--allocation-samples must be >= 1, got {self.allocation_samples}")
        if self.target_size is not None and not self.matmulnbits:
            object.__setattr__(self, "qdq", True)  # a size budget is about stored bytes: integer codes, not floats
        if targets and self.plan is not None:
            raise ValueError("--plan and a --target-* are two ways of choosing per-layer options: give one of them "
                             "(a target's report holds its plan, to edit and feed back with --plan)")
        for name, vals, check in (("--bits", self.cand_bits, lambda b: isinstance(b, int) and 2 <= b <= 8),
                                  ("--sparsity", self.cand_sparsity, lambda x: 0.0 <= x < 1.0)):
            if vals is not None:
                if not targets:
                    raise ValueError(f"a list of {name} values gives candidates to choose from: it needs "
                                     "--target-flops, --target-size or --target-bops")
                if not vals or not all(check(v) for v in vals):
                    raise ValueError(f"{name} candidates out of range: {', '.join(map(str, vals))}")
                object.__setattr__(self, "cand_bits" if name == "--bits" else "cand_sparsity", tuple(vals))
        if self.qdq and self.bits is None and self.plan is None and self.cand_bits is None and not self.target_size:
            raise ValueError("--qdq stores quantized weights: give --bits B")
        if self.matmulnbits and self.act_bits is not None:
            raise ValueError("--act-bits cannot be combined with --format matmulnbits (use --format qdq)")
        if self.matmulnbits and self.plan is None and self.cand_bits is None and not self.target_size and (
                self.bits is None or self.bits > 4):
            raise ValueError("--format matmulnbits stores 4-bit MatMul weights: give --bits 2, 3 or 4")
        if self.stage_memory is not None and not self.stage_memory > 0:
            raise ValueError(f"--stage-memory is in MB and must be > 0, got {self.stage_memory}")
        if self.sequential and targets:
            raise ValueError("--sequential cannot be combined with a --target-*: the allocation compares every layer's "
                             "variants on the same dense inputs, before any layer is chosen (compress to the target, "
                             "then rerun with --plan REPORT.json --sequential)")
        if self.verify_samples < 1:
            raise ValueError(f"--verify-samples must be >= 1, got {self.verify_samples}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.opset is not None and not 7 <= self.opset <= 23:
            raise ValueError(f"--opset must be an ONNX opset between 7 and 23, got {self.opset}")
        if self.act_bits is not None and self.act_bits != 8:
            raise ValueError(f"--act-bits {self.act_bits}: only 8-bit activations are supported (ONNX Runtime's "
                             "integer kernels are 8-bit)")
        self.check_export(self)
        if self.act_bits is not None:
            object.__setattr__(self, "qdq", True)  # activation Q/DQ pairs only make sense with QDQ weights
            # integer kernels want int8 weights with zero point 0 (u8s8): asymmetric uint8 weights ran a generic
            # QLinearConv path 11x slower than float on the shipped model's depthwise conv
            object.__setattr__(self, "sym", True)
        if self.act_calib not in ACT_CALIB:
            raise ValueError(f"--act-calib must be one of {', '.join(ACT_CALIB)}, got {self.act_calib!r}")
        if self.act_bits is None and (self.act_bias_correction or self.smooth_alpha is not None or self.act_noise):
            raise ValueError("--act-bias-correction, --smooth-alpha and --act-noise act on quantized activations: "
                             "give --act-bits 8")
        if not self.act_search_target >= 1.0:
            raise ValueError(f"--act-search-target must be >= 1 (a multiple of the weight-only error), got "
                             f"{self.act_search_target}")
        if self.act_search_metric not in ("logits", "output"):
            raise ValueError(f"--act-search-metric must be logits or output, got {self.act_search_metric!r}")
        if self.act_search_samples < 1:
            raise ValueError(f"--act-search-samples must be >= 1, got {self.act_search_samples}")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise ValueError(f"--smooth-alpha must be in (0, 1), got {self.smooth_alpha}")
        if not 50.0 < self.act_percentile <= 100.0:
            raise ValueError(f"--act-percentile must be in (50, 100], got {self.act_percentile}")
        if self.plan is None and self.target is None:
            check_method(self)

    def check_export(self, s: LayerSpec) -> None:
        """The per-layer options ``s`` that this run's export format cannot store raise ValueError."""
        if s.group_size is not None:
            if self.matmulnbits and (s.group_size < 16 or s.group_size & (s.group_size - 1)):
                raise ValueError(f"--format matmulnbits needs a --group-size that is a power of two >= 16 (its block "
                                 f"size), got {s.group_size}: use 16, 32, 64 or 128, or --format qdq")
            if self.act_bits is not None:
                raise ValueError("--act-bits (integer kernels) needs one weight scale per output channel: drop --group-size")
        if self.act_bits is not None and s is not self and s.bits is not None and s.bits != 8:
            raise ValueError("--act-bits 8 is the W8A8 path: every quantized layer needs 8-bit weights")
        if self.act_bits is not None and s is self and self.plan is None and self.target is None and s.bits != 8:
            raise ValueError("--act-bits 8 is the W8A8 path: give --bits 8 too (integer kernels need 8-bit weights)")

    def _check_spec(self) -> None:
        from .engine.spec import check_spec

        check_spec(self, bits_to_come=self.cand_bits is not None)  # with candidate bit widths, a target picks one

    @property
    def target(self) -> tuple[str, float] | None:
        """('flops' | 'size' | 'bops', fraction) when compressing to a budget."""
        for k in ("flops", "size", "bops"):
            v = getattr(self, f"target_{k}")
            if v is not None:
                return k, float(v)
        return None

    def layer_spec(self) -> LayerSpec:
        """The uniform per-layer spec of this run (what every layer gets without a plan)."""
        return self.spec()

    def describe(self) -> str:
        """A short human label such as 'exact 50%+4b' or 'rtn 4b' (with '+a8' for W8A8)."""
        return self.spec_label(self)

    def spec_label(self, s: LayerSpec) -> str:
        """The label of a layer compressed with ``s`` in this run ('+a8' when activations are quantized)."""
        return s.label() + (f"+a{self.act_bits}" if self.act_bits and s.bits else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.plan is not None:
            d["plan"] = [r.to_dict() for r in self.plan]
        return d
