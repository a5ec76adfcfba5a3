"""Per-layer plans (--plan), the options' single source of truth, the cost model against written files, and the
package's import structure."""
import ast
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from golden_cases import calib
from onnxobc import CompressConfig, compress
from onnxobc.cli import build_parser, main
from onnxobc.engine.spec import SPEC_NAMES, LayerSpec
from onnxobc.export.cost import tensor_data_bytes
from onnxobc.graph import find_layers
from onnxobc.plan import parse_rules, plan_rules, resolve

ROOT = Path(__file__).resolve().parent.parent


# ---- rules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules,msg", [
    ({"match": "a"}, "list of rules"),
    ([{"bits": 4}], "needs \"match\""),
    ([{"match": "("}], "not a valid regular expression"),
    ([{"match": "a", "bitz": 4}], "unknown key bitz"),
    ([{"match": "a", "skip": True, "bits": 4}], "sets no options"),
    ([{"match": "a", "bits": "4"}], "bits must be an integer"),
    ([{"match": "a", "sym": 1}], "sym must be true or false"),
    ([{"match": "a", "sparsity": "half"}], "sparsity must be a number"),
    (["conv"], "expected an object"),
])
def test_malformed_rules_say_what_is_wrong(rules, msg):
    with pytest.raises(ValueError, match=msg):
        parse_rules(rules)


def test_first_match_wins_null_clears_and_skip():
    base = CompressConfig(sparsity=0.5, bits=4)
    rules = parse_rules([{"match": "conv1", "bits": 8}, {"match": "fc", "skip": True},
                         {"match": "conv", "sparsity": None, "nm": "2:4"}])
    specs = resolve(["conv1", "conv2", "fc1", "other"], base, rules)
    assert specs["conv1"] == LayerSpec(sparsity=0.5, bits=8)
    assert specs["conv2"] == LayerSpec(nm=(2, 4), bits=4)
    assert specs["fc1"] is None
    assert specs["other"] == base.spec()
    again = resolve(["conv1", "conv2", "fc1", "other"], CompressConfig(bits=3), parse_rules(plan_rules(
        ["conv1", "conv2", "fc1", "other"], specs)))
    assert again == specs  # the reported plan reproduces the specs whatever the global options


def test_invalid_resolved_spec_names_layer_and_rule():
    rules = parse_rules([{"match": "conv", "nm": "2:4"}])
    with pytest.raises(ValueError, match=r"layer 'conv2' \(plan rule 1.*--nm and --sparsity"):
        resolve(["conv2"], CompressConfig(sparsity=0.5), rules)
    with pytest.raises(ValueError, match=r"no plan rule matches.*nothing to do"):
        resolve(["fc"], CompressConfig(plan=[{"match": "conv", "bits": 4}]), rules)
    w8a8 = CompressConfig(bits=8, act_bits=8, plan=[{"match": "conv", "bits": 4}])
    with pytest.raises(ValueError, match="W8A8"):
        resolve(["conv"], w8a8, w8a8.plan, check=w8a8.check_export)


def test_cli_options_come_from_layerspec():
    parser = build_parser()
    compress_p = parser._subparsers._group_actions[0].choices["compress"]
    flags = {a.dest: a for a in compress_p._actions}
    for name in SPEC_NAMES:
        assert name in flags, name
        assert flags[name].default == LayerSpec.__dataclass_fields__[name].default
        assert flags[name].help == LayerSpec.__dataclass_fields__[name].metadata["help"]
    assert set(SPEC_NAMES) <= set(CompressConfig.__dataclass_fields__)


# ---- a plan on the shipped model -------------------------------------------------------------------------
def test_plan_on_the_shipped_model_round_trips_through_the_report(tmp_path, capsys):
    """First conv at 8 bits, the classifier dense, the rest 4 bits with groups of 16; the report's plan,
    fed back, gives the same file."""
    model, data = ROOT / "models" / "fmnist_cnn.onnx", ROOT / "models" / "fmnist_calib.npz"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"match": "conv1", "bits": 8, "group_size": None},
                                {"match": "^/MatMul$", "skip": True},
                                {"match": ".", "bits": 4, "group_size": 16}]))
    out1, out2, r1, r2 = (tmp_path / n for n in ("a.onnx", "b.onnx", "a.json", "b.json"))
    common = ["--calib", str(data), "--samples", "64", "--qdq", "--opset", "21", "-q"]
    assert main(["compress", str(model), "--plan", str(plan), "-o", str(out1), "--report", str(r1)] + common) == 0
    assert main(["compress", str(model), "--plan", str(r1), "-o", str(out2), "--report", str(r2), "--bits", "2",
                 "--method", "rtn"] + common) == 0  # the report's plan overrides the global options
    assert out1.read_bytes() == out2.read_bytes()
    rep = json.loads(r1.read_text())
    assert rep["plan"] == json.loads(r2.read_text())["plan"]
    by = {l["name"]: l for l in rep["layers"]}
    assert by["/conv1/conv1.0/Conv"]["bits"] == 8 and "/MatMul" not in by and rep["not_selected"] == ["/MatMul"]
    assert {l["bits"] for n, l in by.items() if "conv1" not in n} == {4}
    written = onnx.load(str(out1))
    src = onnx.load(str(model))
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    mm = next(n for n in written.graph.node if n.op_type == "MatMul")
    src_inits = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    np.testing.assert_array_equal(inits[mm.input[1]], src_inits[mm.input[1]])  # skipped: untouched
    dq = {n.output[0]: n for n in written.graph.node if n.op_type == "DequantizeLinear"}
    conv1 = next(n for n in written.graph.node if n.name == "/conv1/conv1.0/Conv")
    assert inits[dq[conv1.input[1]].input[0]].dtype == np.uint8  # 8-bit codes, per channel
    assert not any(a.name == "block_size" for a in dq[conv1.input[1]].attribute)
    fc = next(n for n in written.graph.node if n.name == "/fc1/Gemm")
    assert {a.name: a.i for a in dq[fc.input[1]].attribute}["block_size"] == 16


# ---- cost model ------------------------------------------------------------------------------------------
COST_CASES = [
    ("mixed_cnn", dict(sparsity=0.5)),
    ("weight_through_cast", dict(bits=4)),  # fp16 source written back in place: 2 bytes a weight
    ("mixed_cnn", dict(bits=8, qdq=True)),
    ("mixed_cnn", dict(bits=4, qdq=True, opset=21)),
    ("bert_like", dict(bits=3, qdq=True, opset=21, group_size=4)),
    ("conv2d_grouped", dict(bits=4, group_size=2, qdq=True, opset=21)),
    ("conv2d_depthwise", dict(bits=4, group_size=4, qdq=True, opset=21)),  # per-channel fallback
    ("bert_like", dict(bits=4, matmulnbits=True)),
    ("matmul_3d", dict(bits=4, group_size=16, matmulnbits=True)),
    ("gemm_transB0", dict(nm=(2, 4), bits=8, sym=True, qdq=True)),
]


@pytest.mark.parametrize("case,opts", COST_CASES, ids=[f"{c}-{'-'.join(map(str, o.values()))}" for c, o in COST_CASES])
def test_cost_bytes_match_the_written_file(case, opts):
    model = graphs.BUILDERS[case]()
    res = compress(model, None, [calib(model)], CompressConfig(**opts))
    layers, _ = find_layers(model)
    sources = {l.source_name for l in layers}
    kept = sum(tensor_data_bytes(t) for t in model.graph.initializer if t.name not in sources)
    written = sum(tensor_data_bytes(t) for t in res.extra["model"].graph.initializer)
    assert written - kept == sum(l.cost["bytes"] for l in res.layers) == res.cost["bytes"]
    assert all(l.cost["dense_bytes"] == 4 * l.params for l in res.layers)


def test_cost_macs_and_bops():
    model = graphs.mixed_cnn()
    res = compress(model, None, [calib(model)], CompressConfig(nm=(2, 4), bits=4))
    for l in res.layers:
        c = l.cost
        if l.method == "dense" or l.note.startswith("not pruned"):
            continue
        assert c["eff_macs"] == pytest.approx(0.5 * l.macs)
        assert c["bops"] == pytest.approx(c["eff_macs"] * 4 * 32)


# ---- structure -------------------------------------------------------------------------------------------
def _module_imports() -> dict[str, set[str]]:
    """Imports inside the package, module-level and deferred ones alike (a deferred import hides a cycle, it does
    not remove it)."""
    pkg = ROOT / "onnxobc"
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    graph = {}
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
                targets = [".".join(base)] + [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onnxobc"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("onnxobc")]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                for i in range(2, len(parts) + 1):  # a submodule import initialises its packages first
                    if ".".join(parts[:i]) in mods:
                        deps.add(".".join(parts[:i]))
        # a module's own packages are initialised before it runs: importing from them is no cycle
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_cycle_and_engine_imports_only_backend():
    graph = _module_imports()
    graph.pop("onnxobc", None)  # the root package only re-exports
    for deps in graph.values():
        deps.discard("onnxobc")
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [n, d]))
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    for n, deps in graph.items():
        if n.startswith("onnxobc.engine"):
            bad = {d for d in deps if not d.startswith(("onnxobc.engine", "onnxobc.backend", "onnxobc.errors"))}
            assert not bad, (n, bad)


def test_pipeline_compress_fits_one_screen():
    src = (ROOT / "onnxobc" / "pipeline.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "compress")
    assert fn.end_lineno - fn.lineno + 1 <= 60
