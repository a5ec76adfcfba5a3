"""Tiny hand-built ONNX graphs used as fixtures by the onnxobc tests.

Every builder returns an ``onnx.ModelProto`` that

* passes ``onnx.checker.check_model(model, full_check=True)``,
* runs in onnxruntime on the CPU,
* has a symbolic batch dimension ``"N"`` as dim 0 of its first graph input,
* gives every node (subgraphs included) a unique, non-empty name.

Weights are float32 drawn from a seeded generator, so every call to a
builder returns bit-identical weights.

``BUILDERS`` maps case names to builders, ``EXPECTED`` maps the same names to
what a compressor is expected to find in the main graph::

    {
        "layers":  {node_name: (op_type, rows, C, groups)},
        "skipped": {node_name: reason_keyword},
        # optional
        "shared":  {initializer_name: [consumer descriptions]},
    }

``rows x C`` is the weight seen as a matrix:

* Gemm: rows = output features, C = K (``W = B`` if transB=1 else ``B^T``);
* MatMul with constant ``B [K, N]``: rows = N, C = K;
* Conv with ``W [Cout, Cin/g, k...]``: rows = Cout, C = Cin/g * prod(k),
  groups = g.

Reason keywords used in ``skipped``: ``"subgraph"`` (layer lives inside an
If/Loop body), ``"quantized"`` (already quantized: QDQ weights,
MatMulInteger, ConvInteger) and ``"not constant"`` (the weight operand is
computed from graph inputs, including activation x activation MatMuls such
as attention scores; a compressor may also silently ignore those).

``make_feed`` builds matching random inputs and ``save_with_external_data``
writes any model with its tensors in a side ``.data`` file.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["BUILDERS", "EXPECTED", "IR_VERSION", "make_feed", "save_with_external_data"]

# onnxruntime 1.32 accepts IR 10 for every opset used here (opset 21 needs IR >= 10).
IR_VERSION = 10
DEFAULT_OPSET = 17
FLOAT = TensorProto.FLOAT


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _weights(seed: int, *shape: int, scale: float | None = None) -> np.ndarray:
    """Deterministic float32 weights, roughly unit-variance outputs."""
    rng = np.random.default_rng(seed)
    if scale is None:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / np.sqrt(max(fan_in, 1))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _i64(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _vi(name: str, shape, elem_type: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _node(op: str, inputs, outputs, name: str, domain: str = "", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs)


def _const(name: str, out: str, array: np.ndarray) -> onnx.NodeProto:
    """A Constant node carrying ``array`` in its ``value`` attribute."""
    return _node("Constant", [], [out], name, value=numpy_helper.from_array(np.asarray(array), out + "_value"))


def _model(
    name: str,
    nodes,
    inputs,
    outputs,
    initializers=(),
    opset: int = DEFAULT_OPSET,
    value_info=(),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), name, list(inputs), list(outputs), initializer=list(initializers), value_info=list(value_info)
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="onnxobc-tests",
        ir_version=IR_VERSION,
    )
    return model


def _conv_out(size: int, k: int, stride: int = 1, pad_total: int = 0, dilation: int = 1) -> int:
    return (size + pad_total - dilation * (k - 1) - 1) // stride + 1


# --------------------------------------------------------------------------
# Gemm
# --------------------------------------------------------------------------


def gemm_transB1() -> onnx.ModelProto:
    inits = [_init("gemm.B", _weights(1, 16, 8)), _init("gemm.C", _weights(2, 16, scale=0.1))]
    nodes = [_node("Gemm", ["X", "gemm.B", "gemm.C"], ["Y"], "gemm", alpha=1.0, beta=1.0, transB=1)]
    return _model("gemm_transB1", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 16])], inits)


def gemm_transB0() -> onnx.ModelProto:
    inits = [_init("gemm.B", _weights(3, 8, 16, scale=0.35)), _init("gemm.C", _weights(4, 16, scale=0.1))]
    nodes = [_node("Gemm", ["X", "gemm.B", "gemm.C"], ["Y"], "gemm", transB=0)]
    return _model("gemm_transB0", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 16])], inits)


def gemm_alpha_beta() -> onnx.ModelProto:
    inits = [_init("gemm.B", _weights(5, 16, 8)), _init("gemm.C", _weights(6, 16, scale=0.1))]
    nodes = [_node("Gemm", ["X", "gemm.B", "gemm.C"], ["Y"], "gemm", alpha=0.5, beta=2.0, transB=1)]
    return _model("gemm_alpha_beta", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 16])], inits)


def gemm_no_bias() -> onnx.ModelProto:
    inits = [_init("gemm.B", _weights(7, 12, 8))]
    nodes = [_node("Gemm", ["X", "gemm.B"], ["Y"], "gemm", transB=1)]
    return _model("gemm_no_bias", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 12])], inits)


def gemm_opset9() -> onnx.ModelProto:
    # Gemm-9 requires C.
    inits = [_init("gemm.B", _weights(8, 10, 8)), _init("gemm.C", _weights(9, 10, scale=0.1))]
    nodes = [
        _node("Gemm", ["X", "gemm.B", "gemm.C"], ["H"], "gemm", transB=1),
        _node("Relu", ["H"], ["Y"], "relu"),
    ]
    return _model("gemm_opset9", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 10])], inits, opset=9)


# --------------------------------------------------------------------------
# MatMul
# --------------------------------------------------------------------------


def matmul_2d() -> onnx.ModelProto:
    inits = [_init("mm.B", _weights(10, 8, 12, scale=0.35))]
    nodes = [_node("MatMul", ["X", "mm.B"], ["Y"], "matmul")]
    return _model("matmul_2d", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 12])], inits)


def matmul_3d() -> onnx.ModelProto:
    inits = [
        _init("fc1.weight", _weights(11, 8, 12, scale=0.35)),
        _init("fc1.bias", _weights(12, 12, scale=0.1)),
        _init("fc2.weight", _weights(13, 12, 8, scale=0.3)),
        _init("fc2.bias", _weights(14, 8, scale=0.1)),
    ]
    nodes = [
        _node("MatMul", ["X", "fc1.weight"], ["h0"], "fc1/MatMul"),
        _node("Add", ["h0", "fc1.bias"], ["h1"], "fc1/Add"),
        _node("Relu", ["h1"], ["h2"], "act/Relu"),
        _node("MatMul", ["h2", "fc2.weight"], ["h3"], "fc2/MatMul"),
        _node("Add", ["h3", "fc2.bias"], ["Y"], "fc2/Add"),
    ]
    return _model("matmul_3d", nodes, [_vi("X", ["N", 5, 8])], [_vi("Y", ["N", 5, 8])], inits)


def matmul_4d() -> onnx.ModelProto:
    inits = [_init("mm.B", _weights(15, 8, 12, scale=0.35))]
    nodes = [_node("MatMul", ["X", "mm.B"], ["Y"], "matmul")]
    return _model("matmul_4d", nodes, [_vi("X", ["N", 2, 3, 8])], [_vi("Y", ["N", 2, 3, 12])], inits)


def matmul_both_dynamic() -> onnx.ModelProto:
    nodes = [_node("MatMul", ["A", "B"], ["Y"], "matmul")]
    return _model(
        "matmul_both_dynamic",
        nodes,
        [_vi("A", ["N", 3, 8]), _vi("B", ["N", 8, 5])],
        [_vi("Y", ["N", 3, 5])],
    )


# --------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------


def _single_conv(
    case: str,
    x_shape,
    w_shape,
    y_shape,
    seed: int,
    bias: bool = True,
    opset: int = DEFAULT_OPSET,
    **attrs,
) -> onnx.ModelProto:
    inits = [_init("conv.weight", _weights(seed, *w_shape))]
    ins = ["X", "conv.weight"]
    if bias:
        inits.append(_init("conv.bias", _weights(seed + 1000, w_shape[0], scale=0.1)))
        ins.append("conv.bias")
    nodes = [_node("Conv", ins, ["Y"], "conv", **attrs)]
    return _model(case, nodes, [_vi("X", x_shape)], [_vi("Y", y_shape)], inits, opset=opset)


def conv1d() -> onnx.ModelProto:
    lo = _conv_out(10, 3, stride=2, pad_total=2)  # 5
    return _single_conv(
        "conv1d", ["N", 4, 10], (6, 4, 3), ["N", 6, lo], 20, kernel_shape=[3], pads=[1, 1], strides=[2]
    )


def conv2d_basic() -> onnx.ModelProto:
    return _single_conv(
        "conv2d_basic", ["N", 3, 8, 8], (8, 3, 3, 3), ["N", 8, 8, 8], 21, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )


def conv2d_grouped() -> onnx.ModelProto:
    o = _conv_out(10, 3, stride=2, pad_total=4, dilation=2)  # 5
    return _single_conv(
        "conv2d_grouped",
        ["N", 8, 10, 10],
        (8, 2, 3, 3),
        ["N", 8, o, o],
        22,
        group=4,
        kernel_shape=[3, 3],
        strides=[2, 2],
        dilations=[2, 2],
        pads=[2, 2, 2, 2],
    )


def conv2d_depthwise() -> onnx.ModelProto:
    return _single_conv(
        "conv2d_depthwise",
        ["N", 8, 6, 6],
        (8, 1, 3, 3),
        ["N", 8, 6, 6],
        23,
        group=8,
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )


def conv2d_depthwise_multiplier() -> onnx.ModelProto:
    return _single_conv(
        "conv2d_depthwise_multiplier",
        ["N", 4, 6, 6],
        (8, 1, 3, 3),
        ["N", 8, 6, 6],
        24,
        group=4,
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )


def conv2d_asym_pads() -> onnx.ModelProto:
    # pads = [top, left, bottom, right]
    h = _conv_out(8, 3, stride=1, pad_total=0 + 2)  # 8
    w = _conv_out(8, 3, stride=2, pad_total=1 + 1)  # 4
    return _single_conv(
        "conv2d_asym_pads",
        ["N", 3, 8, 8],
        (4, 3, 3, 3),
        ["N", 4, h, w],
        25,
        kernel_shape=[3, 3],
        pads=[0, 1, 2, 1],
        strides=[1, 2],
    )


def conv2d_autopad_same_upper() -> onnx.ModelProto:
    # 8x8 input, stride 2, k 3: total pad 1 -> asymmetric, extra pad at the end.
    return _single_conv(
        "conv2d_autopad_same_upper",
        ["N", 3, 8, 8],
        (4, 3, 3, 3),
        ["N", 4, 4, 4],
        26,
        kernel_shape=[3, 3],
        strides=[2, 2],
        auto_pad="SAME_UPPER",
    )


def conv2d_autopad_same_lower() -> onnx.ModelProto:
    # Same geometry as SAME_UPPER but the odd pad goes at the beginning.
    return _single_conv(
        "conv2d_autopad_same_lower",
        ["N", 3, 8, 8],
        (4, 3, 3, 3),
        ["N", 4, 4, 4],
        27,
        kernel_shape=[3, 3],
        strides=[2, 2],
        auto_pad="SAME_LOWER",
    )


def conv2d_autopad_valid() -> onnx.ModelProto:
    return _single_conv(
        "conv2d_autopad_valid",
        ["N", 3, 8, 8],
        (4, 3, 3, 3),
        ["N", 4, 6, 6],
        28,
        kernel_shape=[3, 3],
        auto_pad="VALID",
    )


def conv3d() -> onnx.ModelProto:
    d = _conv_out(4, 2, stride=1, pad_total=2)  # 5
    hw = _conv_out(6, 3, stride=2, pad_total=2)  # 3
    return _single_conv(
        "conv3d",
        ["N", 2, 4, 6, 6],
        (4, 1, 2, 3, 3),
        ["N", 4, d, hw, hw],
        29,
        group=2,
        kernel_shape=[2, 3, 3],
        strides=[1, 2, 2],
        pads=[1, 1, 1, 1, 1, 1],
    )


def conv2d_no_bias() -> onnx.ModelProto:
    return _single_conv(
        "conv2d_no_bias",
        ["N", 3, 6, 6],
        (6, 3, 3, 3),
        ["N", 6, 6, 6],
        30,
        bias=False,
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )


def conv2d_rect_kernel() -> onnx.ModelProto:
    inits = [
        _init("conv1x3.weight", _weights(31, 6, 3, 1, 3)),
        _init("conv1x3.bias", _weights(32, 6, scale=0.1)),
        _init("conv3x1.weight", _weights(33, 6, 6, 3, 1)),
        _init("conv3x1.bias", _weights(34, 6, scale=0.1)),
    ]
    nodes = [
        _node("Conv", ["X", "conv1x3.weight", "conv1x3.bias"], ["h"], "conv1x3", kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
        _node("Conv", ["h", "conv3x1.weight", "conv3x1.bias"], ["Y"], "conv3x1", kernel_shape=[3, 1], pads=[1, 0, 1, 0]),
    ]
    return _model("conv2d_rect_kernel", nodes, [_vi("X", ["N", 3, 7, 9])], [_vi("Y", ["N", 6, 7, 9])], inits)


def conv_opset21() -> onnx.ModelProto:
    return _single_conv(
        "conv_opset21",
        ["N", 3, 6, 6],
        (5, 3, 3, 3),
        ["N", 5, 6, 6],
        35,
        opset=21,
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )


# --------------------------------------------------------------------------
# weights that are not plain initializers
# --------------------------------------------------------------------------


def const_weights() -> onnx.ModelProto:
    """PaddlePaddle-style: no initializers, every tensor is a Constant node."""
    nodes = [
        _const("conv_w_const", "conv.w", _weights(40, 4, 3, 3, 3)),
        _const("conv_b_const", "conv.b", _weights(41, 4, scale=0.1)),
        _node("Conv", ["X", "conv.w", "conv.b"], ["c"], "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("Relu", ["c"], ["r"], "relu"),
        _node("GlobalAveragePool", ["r"], ["p"], "gap"),
        _node("Flatten", ["p"], ["f"], "flatten", axis=1),
        _const("fc_w_const", "fc.w", _weights(42, 10, 4)),
        _const("fc_b_const", "fc.b", _weights(43, 10, scale=0.1)),
        _node("Gemm", ["f", "fc.w", "fc.b"], ["Y"], "fc", transB=1),
    ]
    return _model("const_weights", nodes, [_vi("X", ["N", 3, 6, 6])], [_vi("Y", ["N", 10])])


def weight_through_identity() -> onnx.ModelProto:
    inits = [_init("conv.weight", _weights(50, 8, 3, 3, 3)), _init("conv.bias", _weights(51, 8, scale=0.1))]
    nodes = [
        _node("Identity", ["conv.weight"], ["conv.weight_id"], "weight_identity"),
        _node("Conv", ["X", "conv.weight_id", "conv.bias"], ["Y"], "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    return _model("weight_through_identity", nodes, [_vi("X", ["N", 3, 6, 6])], [_vi("Y", ["N", 8, 6, 6])], inits)


def weight_through_transpose() -> onnx.ModelProto:
    """tf2onnx style: the stored kernel is [out, in] and transposed at run time."""
    inits = [_init("dense/kernel", _weights(52, 16, 8))]
    nodes = [
        _node("Transpose", ["dense/kernel"], ["dense/kernel_t"], "dense/kernel_transpose", perm=[1, 0]),
        _node("MatMul", ["X", "dense/kernel_t"], ["Y"], "dense/MatMul"),
    ]
    return _model("weight_through_transpose", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 16])], inits)


def weight_through_reshape() -> onnx.ModelProto:
    inits = [
        _init("conv.weight_flat", _weights(53, 8, 3, 3, 3).reshape(-1)),
        _i64("conv.weight_shape", [8, 3, 3, 3]),
        _init("conv.bias", _weights(54, 8, scale=0.1)),
    ]
    nodes = [
        _node("Reshape", ["conv.weight_flat", "conv.weight_shape"], ["conv.weight"], "weight_reshape"),
        _node("Conv", ["X", "conv.weight", "conv.bias"], ["Y"], "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    return _model("weight_through_reshape", nodes, [_vi("X", ["N", 3, 6, 6])], [_vi("Y", ["N", 8, 6, 6])], inits)


def weight_through_cast() -> onnx.ModelProto:
    inits = [
        _init("gemm.B_fp16", _weights(55, 16, 8).astype(np.float16)),
        _init("gemm.C", _weights(56, 16, scale=0.1)),
    ]
    nodes = [
        _node("Cast", ["gemm.B_fp16"], ["gemm.B"], "weight_cast", to=FLOAT),
        _node("Gemm", ["X", "gemm.B", "gemm.C"], ["Y"], "gemm", transB=1),
    ]
    return _model("weight_through_cast", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 16])], inits)


def weight_chain() -> onnx.ModelProto:
    nodes = [
        _const("weight_const", "w0", _weights(57, 12, 8)),
        _node("Identity", ["w0"], ["w1"], "weight_identity"),
        _node("Transpose", ["w1"], ["w2"], "weight_transpose", perm=[1, 0]),
        _node("MatMul", ["X", "w2"], ["Y"], "matmul"),
    ]
    return _model("weight_chain", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 12])])


# --------------------------------------------------------------------------
# shared weights
# --------------------------------------------------------------------------


def shared_weight() -> onnx.ModelProto:
    inits = [_init("shared.W", _weights(60, 8, 8))]
    nodes = [
        _node("MatMul", ["X", "shared.W"], ["h"], "matmul_1"),
        _node("Relu", ["h"], ["r"], "relu"),
        _node("MatMul", ["r", "shared.W"], ["Y"], "matmul_2"),
    ]
    return _model("shared_weight", nodes, [_vi("X", ["N", 8])], [_vi("Y", ["N", 8])], inits)


def shared_weight_mixed() -> onnx.ModelProto:
    """``shared.W`` is the MatMul weight *and* a plain data operand of an Add."""
    inits = [_init("shared.W", _weights(61, 8, 8))]
    nodes = [
        _node("MatMul", ["X", "shared.W"], ["h"], "matmul"),
        _node("Add", ["h", "shared.W"], ["Y"], "add"),
    ]
    return _model("shared_weight_mixed", nodes, [_vi("X", ["N", 8, 8])], [_vi("Y", ["N", 8, 8])], inits)


# --------------------------------------------------------------------------
# control flow
# --------------------------------------------------------------------------


def if_subgraph() -> onnx.ModelProto:
    """Main-graph Gemm followed by an If whose branches hold a Gemm / a Conv.

    The branch weights are initializers of the branch subgraphs; the branches
    read the outer-scope value ``h``.
    """
    then_graph = helper.make_graph(
        [_node("Gemm", ["h", "then.gemm.B", "then.gemm.C"], ["then_out"], "then_gemm", transB=1)],
        "then_branch",
        [],
        [_vi("then_out", ["N", 12])],
        initializer=[_init("then.gemm.B", _weights(70, 12, 16)), _init("then.gemm.C", _weights(71, 12, scale=0.1))],
    )
    else_graph = helper.make_graph(
        [
            _node("Reshape", ["h", "else.shape4d"], ["else_x4"], "else_reshape_in"),
            _node("Conv", ["else_x4", "else.conv.weight", "else.conv.bias"], ["else_c"], "else_conv", kernel_shape=[1, 1]),
            _node("Reshape", ["else_c", "else.shape2d"], ["else_out"], "else_reshape_out"),
        ],
        "else_branch",
        [],
        [_vi("else_out", ["N", 12])],
        initializer=[
            _i64("else.shape4d", [0, 4, 2, 2]),
            _init("else.conv.weight", _weights(72, 3, 4, 1, 1)),
            _init("else.conv.bias", _weights(73, 3, scale=0.1)),
            _i64("else.shape2d", [0, 12]),
        ],
    )
    inits = [_init("gemm.B", _weights(74, 16, 8)), _init("gemm.C", _weights(75, 16, scale=0.1))]
    nodes = [
        _node("Gemm", ["X", "gemm.B", "gemm.C"], ["h"], "gemm", transB=1),
        _node("If", ["cond"], ["Y"], "if", then_branch=then_graph, else_branch=else_graph),
    ]
    return _model(
        "if_subgraph",
        nodes,
        [_vi("X", ["N", 8]), _vi("cond", [], TensorProto.BOOL)],
        [_vi("Y", ["N", 12])],
        inits,
    )


# --------------------------------------------------------------------------
# already quantized / not constant
# --------------------------------------------------------------------------


def already_quantized() -> onnx.ModelProto:
    """(a) QDQ Conv, (b) MatMulInteger, (c) ConvInteger - all already quantized."""
    rng = np.random.default_rng(80)
    w_q = rng.integers(-127, 128, size=(4, 3, 3, 3), dtype=np.int8)
    w_scale = np.full((4,), 0.02, dtype=np.float32)  # per output channel
    w_zp = np.zeros((4,), dtype=np.int8)
    b_mm = rng.integers(-127, 128, size=(8, 12), dtype=np.int8)
    w_ci = rng.integers(0, 256, size=(4, 2, 3, 3), dtype=np.uint8)
    inits = [
        # (a) QDQ: activation Q/DQ + weight DQ
        _init("x_scale", np.array(0.05, dtype=np.float32)),
        _init("x_zp", np.array(128, dtype=np.uint8)),
        _init("conv.weight_q", w_q),
        _init("conv.weight_scale", w_scale),
        _init("conv.weight_zp", w_zp),
        _init("conv.bias", _weights(81, 4, scale=0.1)),
        # (b) MatMulInteger
        _init("mmi.B", b_mm),
        _init("mmi.a_zp", np.array(128, dtype=np.uint8)),
        _init("mmi.b_zp", np.array(0, dtype=np.int8)),
        # (c) ConvInteger
        _init("convi.W", w_ci),
        _init("convi.x_zp", np.array(128, dtype=np.uint8)),
        _init("convi.w_zp", np.array(128, dtype=np.uint8)),
    ]
    nodes = [
        _node("QuantizeLinear", ["X", "x_scale", "x_zp"], ["X_q"], "x_quant"),
        _node("DequantizeLinear", ["X_q", "x_scale", "x_zp"], ["X_dq"], "x_dequant"),
        _node(
            "DequantizeLinear",
            ["conv.weight_q", "conv.weight_scale", "conv.weight_zp"],
            ["conv.weight_dq"],
            "weight_dequant",
            axis=0,
        ),
        _node("Conv", ["X_dq", "conv.weight_dq", "conv.bias"], ["Y_conv"], "conv_qdq", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("MatMulInteger", ["A_u8", "mmi.B", "mmi.a_zp", "mmi.b_zp"], ["Y_mmi"], "matmul_integer"),
        _node("ConvInteger", ["Xc_u8", "convi.W", "convi.x_zp", "convi.w_zp"], ["Y_convi"], "conv_integer", kernel_shape=[3, 3]),
    ]
    return _model(
        "already_quantized",
        nodes,
        [
            _vi("X", ["N", 3, 6, 6]),
            _vi("A_u8", ["N", 8], TensorProto.UINT8),
            _vi("Xc_u8", ["N", 2, 5, 5], TensorProto.UINT8),
        ],
        [
            _vi("Y_conv", ["N", 4, 6, 6]),
            _vi("Y_mmi", ["N", 12], TensorProto.INT32),
            _vi("Y_convi", ["N", 4, 3, 3], TensorProto.INT32),
        ],
        inits,
        # opset 19: onnx.reference has no DequantizeLinear kernel below 19.
        opset=19,
    )


def dynamic_weight() -> onnx.ModelProto:
    inits = [_init("conv.bias", _weights(90, 4, scale=0.1))]
    nodes = [_node("Conv", ["X", "W", "conv.bias"], ["Y"], "conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    return _model(
        "dynamic_weight",
        nodes,
        [_vi("X", ["N", 3, 6, 6]), _vi("W", [4, 3, 3, 3])],
        [_vi("Y", ["N", 4, 6, 6])],
        inits,
    )


# --------------------------------------------------------------------------
# realistic small networks
# --------------------------------------------------------------------------


def mixed_cnn() -> onnx.ModelProto:
    """Conv+Relu -> grouped Conv (stride 2)+Relu -> MaxPool -> Flatten -> Gemm -> Relu -> Gemm (opset 13)."""
    inits = [
        _init("conv1.weight", _weights(100, 8, 3, 3, 3)),
        _init("conv1.bias", _weights(101, 8, scale=0.1)),
        _init("conv2.weight", _weights(102, 8, 2, 3, 3)),
        _init("conv2.bias", _weights(103, 8, scale=0.1)),
        _init("fc1.weight", _weights(104, 16, 32)),
        _init("fc1.bias", _weights(105, 16, scale=0.1)),
        _init("fc2.weight", _weights(106, 10, 16)),
        _init("fc2.bias", _weights(107, 10, scale=0.1)),
    ]
    nodes = [
        _node("Conv", ["X", "conv1.weight", "conv1.bias"], ["c1"], "conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _node("Relu", ["c1"], ["r1"], "relu1"),
        _node(
            "Conv",
            ["r1", "conv2.weight", "conv2.bias"],
            ["c2"],
            "conv2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[2, 2],
            group=4,
        ),
        _node("Relu", ["c2"], ["r2"], "relu2"),
        _node("MaxPool", ["r2"], ["p"], "maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        _node("Flatten", ["p"], ["f"], "flatten", axis=1),
        _node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["g1"], "fc1", transB=1),
        _node("Relu", ["g1"], ["r3"], "relu3"),
        _node("Gemm", ["r3", "fc2.weight", "fc2.bias"], ["Y"], "fc2", transB=1),
    ]
    return _model("mixed_cnn", nodes, [_vi("X", ["N", 3, 10, 10])], [_vi("Y", ["N", 10])], inits, opset=13)


def bert_like() -> onnx.ModelProto:
    """One post-LN transformer encoder block, hidden 16, 2 heads, FFN 32."""
    hidden, heads, ffn = 16, 2, 32
    head_dim = hidden // heads
    inits = [
        _init("attn.q.weight", _weights(110, hidden, hidden)),
        _init("attn.q.bias", _weights(111, hidden, scale=0.1)),
        _init("attn.k.weight", _weights(112, hidden, hidden)),
        _init("attn.k.bias", _weights(113, hidden, scale=0.1)),
        _init("attn.v.weight", _weights(114, hidden, hidden)),
        _init("attn.v.bias", _weights(115, hidden, scale=0.1)),
        _init("attn.o.weight", _weights(116, hidden, hidden)),
        _init("attn.o.bias", _weights(117, hidden, scale=0.1)),
        _init("ln1.weight", (1.0 + _weights(118, hidden, scale=0.1)).astype(np.float32)),
        _init("ln1.bias", _weights(119, hidden, scale=0.1)),
        _init("ffn.fc1.weight", _weights(120, hidden, ffn)),
        _init("ffn.fc1.bias", _weights(121, ffn, scale=0.1)),
        _init("ffn.fc2.weight", _weights(122, ffn, hidden)),
        _init("ffn.fc2.bias", _weights(123, hidden, scale=0.1)),
        _init("ln2.weight", (1.0 + _weights(124, hidden, scale=0.1)).astype(np.float32)),
        _init("ln2.bias", _weights(125, hidden, scale=0.1)),
        _i64("heads_shape", [0, 0, heads, head_dim]),
        _i64("merge_shape", [0, 0, hidden]),
        _init("attn.scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32)),
        _init("gelu.half", np.array(0.5, dtype=np.float32)),
        _init("gelu.one", np.array(1.0, dtype=np.float32)),
        _init("gelu.inv_sqrt2", np.array(1.0 / np.sqrt(2.0), dtype=np.float32)),
    ]
    nodes = []
    for p in ("q", "k", "v"):
        perm = [0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]
        nodes += [
            _node("MatMul", ["X", f"attn.{p}.weight"], [f"{p}_mm"], f"attn/{p}/MatMul"),
            _node("Add", [f"{p}_mm", f"attn.{p}.bias"], [f"{p}_lin"], f"attn/{p}/Add"),
            _node("Reshape", [f"{p}_lin", "heads_shape"], [f"{p}_split"], f"attn/{p}/Reshape"),
            _node("Transpose", [f"{p}_split"], [f"{p}_heads"], f"attn/{p}/Transpose", perm=perm),
        ]
    nodes += [
        # [N,h,S,d] @ [N,h,d,S] -> [N,h,S,S]: both operands are activations.
        _node("MatMul", ["q_heads", "k_heads"], ["scores_raw"], "attn/scores/MatMul"),
        _node("Mul", ["scores_raw", "attn.scale"], ["scores"], "attn/scores/Mul"),
        _node("Softmax", ["scores"], ["probs"], "attn/Softmax", axis=-1),
        _node("MatMul", ["probs", "v_heads"], ["ctx_heads"], "attn/context/MatMul"),
        _node("Transpose", ["ctx_heads"], ["ctx_t"], "attn/context/Transpose", perm=[0, 2, 1, 3]),
        _node("Reshape", ["ctx_t", "merge_shape"], ["ctx"], "attn/context/Reshape"),
        _node("MatMul", ["ctx", "attn.o.weight"], ["o_mm"], "attn/o/MatMul"),
        _node("Add", ["o_mm", "attn.o.bias"], ["attn_out"], "attn/o/Add"),
        _node("Add", ["X", "attn_out"], ["res1"], "residual1/Add"),
        _node("LayerNormalization", ["res1", "ln1.weight", "ln1.bias"], ["ln1"], "ln1", axis=-1, epsilon=1e-5),
        _node("MatMul", ["ln1", "ffn.fc1.weight"], ["f1_mm"], "ffn/fc1/MatMul"),
        _node("Add", ["f1_mm", "ffn.fc1.bias"], ["f1"], "ffn/fc1/Add"),
        # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
        _node("Mul", ["f1", "gelu.inv_sqrt2"], ["g_scaled"], "ffn/gelu/Mul_in"),
        _node("Erf", ["g_scaled"], ["g_erf"], "ffn/gelu/Erf"),
        _node("Add", ["g_erf", "gelu.one"], ["g_plus"], "ffn/gelu/Add"),
        _node("Mul", ["f1", "g_plus"], ["g_prod"], "ffn/gelu/Mul"),
        _node("Mul", ["g_prod", "gelu.half"], ["gelu"], "ffn/gelu/Mul_half"),
        _node("MatMul", ["gelu", "ffn.fc2.weight"], ["f2_mm"], "ffn/fc2/MatMul"),
        _node("Add", ["f2_mm", "ffn.fc2.bias"], ["f2"], "ffn/fc2/Add"),
        _node("Add", ["ln1", "f2"], ["res2"], "residual2/Add"),
        _node("LayerNormalization", ["res2", "ln2.weight", "ln2.bias"], ["Y"], "ln2", axis=-1, epsilon=1e-5),
    ]
    return _model("bert_like", nodes, [_vi("X", ["N", "S", hidden])], [_vi("Y", ["N", "S", hidden])], inits)


# --------------------------------------------------------------------------
# ConvTranspose (W [Cin, Cout/g, k...]; rows = Cout, C = Cin/g * prod(k))
# --------------------------------------------------------------------------


def _single_convtranspose(case, x_shape, w_shape, y_shape, seed, bias=True, **attrs) -> onnx.ModelProto:
    g = attrs.get("group", 1)
    inits = [_init("deconv.weight", _weights(seed, *w_shape))]
    ins = ["X", "deconv.weight"]
    if bias:
        inits.append(_init("deconv.bias", _weights(seed + 1000, w_shape[1] * g, scale=0.1)))
        ins.append("deconv.bias")
    nodes = [_node("ConvTranspose", ins, ["Y"], "deconv", **attrs)]
    return _model(case, nodes, [_vi("X", x_shape)], [_vi("Y", y_shape)], inits)


def convtranspose2d_grouped() -> onnx.ModelProto:
    """2-D, stride 2, output_padding 1, asymmetric pads, groups=2: Cin 4 -> Cout 6, 5x6 -> 11x13."""
    return _single_convtranspose(
        "convtranspose2d_grouped", ["N", 4, 5, 6], (4, 3, 3, 3), ["N", 6, 11, 13], 120,
        kernel_shape=[3, 3], strides=[2, 2], output_padding=[1, 1], pads=[1, 0, 0, 1], group=2,
    )


def convtranspose1d() -> onnx.ModelProto:
    """1-D, stride 3, dilation 2: Cin 5 -> Cout 4, length 7 -> 20."""
    return _single_convtranspose(
        "convtranspose1d", ["N", 5, 7], (5, 4, 3), ["N", 4, 20], 121, bias=False,
        kernel_shape=[3], strides=[3], dilations=[2], pads=[1, 2],
    )


# --------------------------------------------------------------------------
# registry and expectations
# --------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    f.__name__: f
    for f in [
        gemm_transB1,
        gemm_transB0,
        gemm_alpha_beta,
        gemm_no_bias,
        gemm_opset9,
        matmul_2d,
        matmul_3d,
        matmul_4d,
        matmul_both_dynamic,
        conv1d,
        conv2d_basic,
        conv2d_grouped,
        conv2d_depthwise,
        conv2d_depthwise_multiplier,
        conv2d_asym_pads,
        conv2d_autopad_same_upper,
        conv2d_autopad_same_lower,
        conv2d_autopad_valid,
        conv3d,
        conv2d_no_bias,
        conv2d_rect_kernel,
        conv_opset21,
        const_weights,
        weight_through_identity,
        weight_through_transpose,
        weight_through_reshape,
        weight_through_cast,
        weight_chain,
        shared_weight,
        shared_weight_mixed,
        if_subgraph,
        already_quantized,
        dynamic_weight,
        mixed_cnn,
        bert_like,
        convtranspose2d_grouped,
        convtranspose1d,
    ]
}


def _exp(layers=None, skipped=None, **extra) -> dict:
    return {"layers": dict(layers or {}), "skipped": dict(skipped or {}), **extra}


EXPECTED: dict[str, dict] = {
    "gemm_transB1": _exp(layers={"gemm": ("Gemm", 16, 8, 1)}),
    "gemm_transB0": _exp(layers={"gemm": ("Gemm", 16, 8, 1)}),
    "gemm_alpha_beta": _exp(layers={"gemm": ("Gemm", 16, 8, 1)}),
    "gemm_no_bias": _exp(layers={"gemm": ("Gemm", 12, 8, 1)}),
    "gemm_opset9": _exp(layers={"gemm": ("Gemm", 10, 8, 1)}),
    "matmul_2d": _exp(layers={"matmul": ("MatMul", 12, 8, 1)}),
    "matmul_3d": _exp(layers={"fc1/MatMul": ("MatMul", 12, 8, 1), "fc2/MatMul": ("MatMul", 8, 12, 1)}),
    "matmul_4d": _exp(layers={"matmul": ("MatMul", 12, 8, 1)}),
    "matmul_both_dynamic": _exp(skipped={"matmul": "not constant"}),
    "conv1d": _exp(layers={"conv": ("Conv", 6, 12, 1)}),
    "conv2d_basic": _exp(layers={"conv": ("Conv", 8, 27, 1)}),
    "conv2d_grouped": _exp(layers={"conv": ("Conv", 8, 18, 4)}),
    "conv2d_depthwise": _exp(layers={"conv": ("Conv", 8, 9, 8)}),
    "conv2d_depthwise_multiplier": _exp(layers={"conv": ("Conv", 8, 9, 4)}),
    "conv2d_asym_pads": _exp(layers={"conv": ("Conv", 4, 27, 1)}),
    "conv2d_autopad_same_upper": _exp(layers={"conv": ("Conv", 4, 27, 1)}),
    "conv2d_autopad_same_lower": _exp(layers={"conv": ("Conv", 4, 27, 1)}),
    "conv2d_autopad_valid": _exp(layers={"conv": ("Conv", 4, 27, 1)}),
    "conv3d": _exp(layers={"conv": ("Conv", 4, 18, 2)}),
    "conv2d_no_bias": _exp(layers={"conv": ("Conv", 6, 27, 1)}),
    "conv2d_rect_kernel": _exp(layers={"conv1x3": ("Conv", 6, 9, 1), "conv3x1": ("Conv", 6, 18, 1)}),
    "conv_opset21": _exp(layers={"conv": ("Conv", 5, 27, 1)}),
    "const_weights": _exp(layers={"conv": ("Conv", 4, 27, 1), "fc": ("Gemm", 10, 4, 1)}),
    "weight_through_identity": _exp(layers={"conv": ("Conv", 8, 27, 1)}),
    "weight_through_transpose": _exp(layers={"dense/MatMul": ("MatMul", 16, 8, 1)}),
    "weight_through_reshape": _exp(layers={"conv": ("Conv", 8, 27, 1)}),
    "weight_through_cast": _exp(layers={"gemm": ("Gemm", 16, 8, 1)}),
    "weight_chain": _exp(layers={"matmul": ("MatMul", 12, 8, 1)}),
    # One initializer feeds two layers: both are layers, but they share storage.
    "shared_weight": _exp(
        layers={"matmul_1": ("MatMul", 8, 8, 1), "matmul_2": ("MatMul", 8, 8, 1)},
        shared={"shared.W": ["matmul_1", "matmul_2"]},
    ),
    # The weight is also read as data by "add": compressing it in place would
    # change the Add; the compressor must untie it (or refuse) - policy is its own.
    "shared_weight_mixed": _exp(
        layers={"matmul": ("MatMul", 8, 8, 1)},
        shared={"shared.W": ["matmul", "add (data operand)"]},
    ),
    "if_subgraph": _exp(
        layers={"gemm": ("Gemm", 16, 8, 1)},
        skipped={"then_gemm": "subgraph", "else_conv": "subgraph"},
    ),
    "already_quantized": _exp(
        skipped={"conv_qdq": "quantized", "matmul_integer": "quantized", "conv_integer": "quantized"},
    ),
    "dynamic_weight": _exp(skipped={"conv": "not constant"}),
    "mixed_cnn": _exp(
        layers={
            "conv1": ("Conv", 8, 27, 1),
            "conv2": ("Conv", 8, 18, 4),
            "fc1": ("Gemm", 16, 32, 1),
            "fc2": ("Gemm", 10, 16, 1),
        }
    ),
    "bert_like": _exp(
        layers={
            "attn/q/MatMul": ("MatMul", 16, 16, 1),
            "attn/k/MatMul": ("MatMul", 16, 16, 1),
            "attn/v/MatMul": ("MatMul", 16, 16, 1),
            "attn/o/MatMul": ("MatMul", 16, 16, 1),
            "ffn/fc1/MatMul": ("MatMul", 32, 16, 1),
            "ffn/fc2/MatMul": ("MatMul", 16, 32, 1),
        },
        skipped={"attn/scores/MatMul": "not constant", "attn/context/MatMul": "not constant"},
    ),
    "convtranspose2d_grouped": _exp(layers={"deconv": ("ConvTranspose", 6, 18, 2)}),
    "convtranspose1d": _exp(layers={"deconv": ("ConvTranspose", 4, 15, 1)}),
}


# --------------------------------------------------------------------------
# feeds and saving
# --------------------------------------------------------------------------


def _graph_inputs(model: onnx.ModelProto):
    init_names = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in init_names]


def make_feed(model: onnx.ModelProto, n: int, seed: int = 0, other_dim: int = 3) -> dict[str, np.ndarray]:
    """Random inputs for every graph input of ``model``.

    A symbolic (or unknown) dim 0 becomes ``n``; any other symbolic dim becomes
    ``other_dim``. Floats are standard normal, integers cover their full
    8-bit range (or small values for wider ints), bools are random.
    """
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for vi in _graph_inputs(model):
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(n if i == 0 else other_dim)
        if dtype == np.bool_:
            value = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            lo, hi = (info.min, info.max) if info.bits <= 8 else (0, 10)
            value = rng.integers(lo, int(hi) + 1, size=shape).astype(dtype)
        else:  # pragma: no cover - no such fixture
            raise TypeError(f"make_feed: unsupported input dtype {dtype} for {vi.name!r}")
        feed[vi.name] = np.asarray(value, dtype=dtype)
    return feed


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def save_with_external_data(
    model: onnx.ModelProto, path: str | os.PathLike, shape_tensors_inline: bool = True
) -> str:
    """Save ``model`` at ``path`` with its tensors in ``<basename>.data`` next to it.

    Returns the path of the data file. ``model`` itself is not modified.

    With ``shape_tensors_inline=False`` this is exactly
    ``onnx.save_model(..., save_as_external_data=True,
    all_tensors_to_one_file=True, size_threshold=0)``: every initializer,
    subgraph initializers and int64 Reshape shapes included, goes to the data
    file. onnxruntime 1.32 then refuses to load models whose Reshape shape is
    an external initializer ("Cannot parse data from external tensors";
    weight_through_reshape, if_subgraph, bert_like), and so does
    ``onnx.checker.check_model(path, full_check=True)``.

    The default (``True``) therefore keeps INT64 initializers (shapes, axes)
    inline in the .onnx file and moves every other initializer - float,
    float16 and int8/uint8 weights, zero points, scales - to the data file.
    Constant-node ``value`` attributes stay inline in both modes.
    """
    path = os.fspath(path)
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path) or ".", location)
    if os.path.exists(data_path):  # onnx appends to an existing data file
        os.remove(data_path)
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    if not shape_tensors_inline:
        onnx.save_model(
            copy,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=0,
        )
        return data_path
    from onnx.external_data_helper import set_external_data

    for tensor in _all_initializers(copy.graph):
        if tensor.data_type == TensorProto.INT64:
            continue
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        set_external_data(tensor, location)
    onnx.save_model(copy, path)  # writes every tensor marked external into data_path
    return data_path
