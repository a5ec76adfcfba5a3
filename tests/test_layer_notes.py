"""Per-layer notes (issue 15, part 4): dead kernel taps that only see padding at the calibration input size,
damping escalations, and a layer much slower than its peers."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxobc import CompressConfig, compress
from onnxobc.engine.solver import _damp_notes
from onnxobc.engine.spec import LayerSpec
from onnxobc.layer_notes import slow_layer_notes
from onnxobc.pipeline import LayerReport


def _conv_on(size):
    """Conv(4->8, 3x3, pads 1) on a size x size input, then a 1x1 Conv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["X", "w1"], ["a"], name="conv3x3", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["Y"], name="conv1x1", kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, size, size])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8, size, size])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=graphs.IR_VERSION)


def _layer(res, name):
    return next(l for l in res.layers if l.name == name)


def test_kernel_taps_that_only_see_padding_are_noted():
    model = _conv_on(1)  # a 1x1 input: of the 3x3 taps only the centre ever reads data
    res = compress(model, None, [graphs.make_feed(model, 32)], CompressConfig(sparsity=0.5, method="exact"))
    l = _layer(res, "conv3x3")
    assert l.sparsity > 0.85  # 8 of 9 taps zeroed, then half of the centre tap pruned
    note = next(n for n in l.notes if n["kind"] == "dead_taps")
    assert "8 of the 3x3 kernel taps" in note["text"] and "dead for this input length only" in note["text"]
    assert "where 50% was asked" in note["text"] and abs(note["value"] - 8 / 9) < 1e-6
    assert not [n for n in _layer(res, "conv1x1").notes if n["kind"] == "dead_taps"]
    # at 6x6 every tap reads data: no note, and the layer is pruned to what was asked
    big = _conv_on(6)
    res = compress(big, None, [graphs.make_feed(big, 32)], CompressConfig(sparsity=0.5, method="exact"))
    l = _layer(res, "conv3x3")
    assert not [n for n in l.notes if n["kind"] == "dead_taps"] and abs(l.sparsity - 0.5) < 0.02


def test_dead_inputs_that_are_not_kernel_taps_get_no_note():
    model = graphs.matmul_2d()
    feed = graphs.make_feed(model, 32)
    name = next(iter(feed))
    feed[name][:, :3] = 0.0  # three input features never nonzero: pruned first, within the requested 50%
    res = compress(model, None, [feed], CompressConfig(sparsity=0.5, method="exact"))
    assert all(abs(l.sparsity - 0.5) < 0.02 for l in res.layers)
    assert not [n for l in res.layers for n in l.notes if n["kind"] == "dead_taps"]


def test_damp_note_counts_escalations():
    spec = LayerSpec(method="exact", bits=4, damp=0.01)
    assert _damp_notes([0.01], spec) == []
    n = _damp_notes([0.01, 1.0], spec)[0]
    assert n.kind == "damp_raised" and "2 escalations from 0.01" in n.text and n.value == 1.0


def _rep(name, seconds, notes=()):
    return LayerReport(name=name, op="MatMul", shape="384x1536", groups=1, params=1, macs=1, method="exact 50%",
                       sparsity=0.5, bits=None, error=0.0, seconds=seconds, notes=list(notes))


def test_a_layer_much_slower_than_its_peers_is_noted():
    layers = [_rep("a", 72.0), _rep("b", 75.0), _rep("c", 78.0), _rep("d", 375.0)]
    slow_layer_notes(layers)
    assert [l.name for l in layers if l.notes] == ["d"]
    assert "5.0x the median" in layers[3].note and "the machine" in layers[3].note
    damped = [_rep("a", 72.0), _rep("b", 75.0), _rep("c", 78.0),
              _rep("d", 375.0, [dict(kind="damp_raised", text="damp raised to 1", value=1.0)])]
    slow_layer_notes(damped)
    assert "damping was raised" in damped[3].notes[-1]["text"]
    few = [_rep("a", 1.0), _rep("b", 10.0)]  # fewer than three peers: no claim
    slow_layer_notes(few)
    assert not any(l.notes for l in few)
    fast = [_rep("a", 0.01), _rep("b", 0.01), _rep("c", 0.01), _rep("d", 0.05)]  # milliseconds: noise
    slow_layer_notes(fast)
    assert not any(l.notes for l in fast)
