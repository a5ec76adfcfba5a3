"""Layer solves on a Ray cluster (--executor ray, issue 12): the same bytes out as the local executor.

One real local Ray cluster for the whole module (ray.init in this process; the CLI test connects to it by
address from a subprocess). Tests that need Ray skip cleanly where it is not installed; the scheduling rule and
the missing-Ray error are tested everywhere.
"""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphs
from golden_cases import calib as golden_calib
from onnxobc import CompressConfig, UsageError, compress
from onnxobc.cli import EXIT_USAGE, main
from onnxobc.engine.solver import AUTO_EXACT_MAX_COST, Problem
from onnxobc.engine.spec import LayerSpec
from onnxobc.executor import LocalExecutor, RayExecutor, SolveJob, _check_reachable, schedule, solve_cost
from test_gather import _embed, _feed

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "fmnist_cnn.onnx"
SHIPPED_CALIB = ROOT / "models" / "fmnist_calib.npz"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster (2 CPUs, no GPU, no dashboard), its GCS port; shut down after the module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield int(ctx.address_info["gcs_address"].rsplit(":", 1)[1])
    ray.shutdown()


def _strip(d):
    """A report without what may differ between the runs: timings, the executor options, the database folder."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in ("seconds", "executor", "ray_address", "database", "budget_bytes")}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _same(a, b):
    assert a.extra["model"].SerializeToString() == b.extra["model"].SerializeToString()
    assert _strip(a.to_dict()) == _strip(b.to_dict())


def _shipped_feeds(n=64):
    return [{"image": np.load(SHIPPED_CALIB)["image"][:n]}]


CASES = {
    "grouped-exact-s50b4": ("conv2d_grouped", dict(method="exact", sparsity=0.5, bits=4)),
    "bert-gptq-g8": ("bert_like", dict(method="gptq", bits=4, group_size=8, act_order=True)),
    "bert-auto-nm24": ("bert_like", dict(method="auto", nm=(2, 4))),
    "conv3d-magnitude": ("conv3d", dict(method="magnitude", sparsity=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fixture_models_byte_identical(ray_cluster, case):
    name, opts = CASES[case]
    model = graphs.BUILDERS[name]()
    feeds = [golden_calib(model)]
    local = compress(model, None, feeds, CompressConfig(**opts))
    on_ray = compress(model, None, feeds, CompressConfig(**opts, executor="ray"))
    _same(local, on_ray)
    assert any(l.method != "dense" for l in on_ray.layers)


def test_lookup_table_byte_identical(ray_cluster):
    m, feeds = _embed(), [_feed(16)]
    local = compress(m, None, feeds, CompressConfig(bits=4))
    on_ray = compress(m, None, feeds, CompressConfig(bits=4, executor="ray"))
    _same(local, on_ray)
    assert {l.op for l in on_ray.layers} == {"Gather", "MatMul"}


def test_shipped_model_with_a_target_byte_identical(ray_cluster, tmp_path):
    """The allocation's variant database is built through the executor too (several specs per job)."""
    opts = dict(target_flops=0.5, cand_sparsity=(0.3, 0.6), cand_bits=(8, 4), allocation_error="layer")
    local = compress(str(SHIPPED), None, _shipped_feeds(), CompressConfig(**opts, database=str(tmp_path / "a")))
    on_ray = compress(str(SHIPPED), None, _shipped_feeds(),
                      CompressConfig(**opts, database=str(tmp_path / "b"), executor="ray"))
    _same(local, on_ray)
    assert on_ray.allocation["variants_solved"] > len(on_ray.layers)
    ia = json.loads((tmp_path / "a" / "index.json").read_text())
    ib = json.loads((tmp_path / "b" / "index.json").read_text())
    assert list(ia) == list(ib) and _strip(ia) == _strip(ib)


def test_cli_connects_by_address_byte_identical(ray_cluster, tmp_path):
    """`--ray-address 127.0.0.1:PORT` from another process (the driver's onnxobc shipped to the workers)."""
    args = ["compress", str(SHIPPED), "--calib", str(SHIPPED_CALIB), "--samples", "64", "--method", "gptq",
            "--bits", "4", "--sparsity", "0.5", "-q"]
    assert main(args + ["-o", str(tmp_path / "local.onnx"), "--report", str(tmp_path / "local.json")]) == 0
    r = subprocess.run([sys.executable, "-m", "onnxobc", *args, "--ray-address", f"127.0.0.1:{ray_cluster}",
                        "-o", str(tmp_path / "ray.onnx"), "--report", str(tmp_path / "ray.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()
    rep, ref = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("ray", "local"))
    assert rep["config"]["executor"] == "ray" and ref["config"]["executor"] == "local"
    assert rep.pop("output").endswith("ray.onnx") and ref.pop("output").endswith("local.onnx")
    assert _strip(rep) == _strip(ref)


def _job(key, g, r, c, method="exact", **kw):
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    x = rng.standard_normal((g, c, 4 * c))
    return SolveJob(key, Problem(key, rng.standard_normal((g, r, c)).astype(np.float32), x @ x.transpose(0, 2, 1)),
                    LayerSpec(method=method, bits=4, **kw))


def test_jobs_submitted_biggest_first_and_assembled_by_key(ray_cluster):
    jobs = [_job("small", 1, 4, 8), _job("wide", 1, 4, 32), _job("tall", 1, 64, 16), _job("grouped", 4, 4, 16),
            _job("cheap-rtn", 1, 128, 32, method="rtn")]
    ex = RayExecutor()
    got = {k: res for k, res, _ in ex.solve(iter(jobs))}
    assert not ex.owned  # the running Ray was reused, not started (nor stopped) again
    # exact rows * C^3: tall 64*16^3 = 262144, wide 4*32^3 = 131072, grouped 4*4*16^3 = 65536, small 4*8^3 = 2048;
    # rtn rows * C: 128*32 = 4096
    assert ex.submitted == ["tall", "wide", "grouped", "cheap-rtn", "small"]
    local = {k: res for k, res, _ in LocalExecutor().solve(jobs)}
    assert list(local) == [j.key for j in jobs]  # local: in the order given
    for k in local:
        np.testing.assert_array_equal(got[k].mats, local[k].mats)
        assert got[k].error == local[k].error


def test_solve_cost_rule():
    shape = (1, 256, 512)
    exact = solve_cost(shape, LayerSpec(method="exact", bits=4))
    fast = solve_cost(shape, LayerSpec(method="gptq", bits=4))
    assert exact == 256 * 512.0 ** 3 and fast == 512.0 ** 3 + 256 * 512.0 ** 2
    assert solve_cost(shape, LayerSpec(method="rtn", bits=4)) == 256 * 512
    # auto: both solvers under its threshold, the fast mode alone beyond it
    assert solve_cost(shape, LayerSpec(method="auto", bits=4)) == exact + fast
    big = (1, 4096, 4096)
    assert 4096.0 ** 4 > AUTO_EXACT_MAX_COST
    assert solve_cost(big, LayerSpec(method="auto", bits=4)) == solve_cost(big, LayerSpec(method="gptq", bits=4))
    assert schedule([1.0, 5.0, 5.0, 3.0]) == [1, 2, 3, 0]


def test_solver_error_reaches_the_caller_unwrapped(ray_cluster):
    job = SolveJob("no-hessian", Problem("no-hessian", np.ones((1, 4, 8), np.float32), None), LayerSpec(method="exact", bits=4))
    with pytest.raises(ValueError, match="the exact method needs the layer's Hessian") as e:
        list(RayExecutor().solve([job]))
    assert type(e.value) is ValueError


def test_cuda_without_a_gpu_in_the_cluster(ray_cluster):
    job = _job("gpu", 1, 4, 8, device="cuda")
    with pytest.raises(UsageError, match="the Ray cluster has no GPU"):
        list(RayExecutor().solve([job]))


def test_without_ray_a_clear_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    model = graphs.BUILDERS["gemm_transB0"]()
    with pytest.raises(UsageError, match=r"pip install onnxobc\[ray\]"):
        compress(model, None, [golden_calib(model)], CompressConfig(bits=4, executor="ray"))
    rc = main(["compress", str(SHIPPED), "--calib", str(SHIPPED_CALIB), "--samples", "8", "--method", "rtn",
               "--bits", "4", "--executor", "ray", "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "pip install onnxobc[ray]" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_config_options():
    assert CompressConfig(bits=4).executor == "local"
    assert CompressConfig(bits=4, ray_address="127.0.0.1:6379").executor == "ray"  # an address implies Ray
    with pytest.raises(ValueError, match="--executor must be 'local' or 'ray'"):
        CompressConfig(bits=4, executor="dask")


def test_unreachable_address_is_a_usage_error_at_once():
    with socket.socket() as sock:  # a port where nothing listens (bound, then released)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UsageError, match=f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there"):
        _check_reachable(f"127.0.0.1:{port}")


def test_token_authentication_refusal_says_what_to_set():
    """Ray 2.5x's `ray start --head` asks clients for a token; Ray's own error only says it could not connect."""

    class AuthenticationError(Exception):  # ray.exceptions.AuthenticationError, by name (Ray may be missing here)
        pass

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kw):
            try:
                try:
                    raise AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing")
                except AuthenticationError as e:
                    raise RuntimeError("Failed to connect to GCS. Last connection error: ...") from e
            except RuntimeError as e:
                raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from e

    ex = RayExecutor.__new__(RayExecutor)
    ex.ray, ex.address, ex.num_cpus, ex.owned = FakeRay, "10.0.0.1:6379", None, False
    with pytest.raises(UsageError, match="--ray-address 10.0.0.1:6379: Failed to connect.*set RAY_AUTH_MODE=token"):
        ex._connect()
    FakeRay.init = staticmethod(lambda **kw: (_ for _ in ()).throw(ConnectionError("Failed to connect")))
    with pytest.raises(UsageError) as err:  # any other failure: no hint
        ex._connect()
    assert "RAY_AUTH_MODE" not in str(err.value)


def test_nothing_to_solve(ray_cluster):
    ex = RayExecutor()
    assert list(ex.solve([])) == [] and ex.submitted == []


def test_sweep_takes_the_executor_options(tmp_path, monkeypatch):
    """`onnxobc sweep --executor ray --ray-address A` reaches the config every compress of the sweep uses."""
    import onnxobc.sweep as sweep_mod
    from onnxobc.cli import main

    seen = {}

    def fake_sweep(model, calib, data, cfg, targets, **kw):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(sweep_mod, "sweep", fake_sweep)
    monkeypatch.setattr(sweep_mod, "write", lambda rows, out, title: [tmp_path / "a", tmp_path / "sweep.md"])
    (tmp_path / "sweep.md").write_text("table")
    rc = main(["sweep", "m.onnx", "--calib", "c.npz", "--data", "d.npz", "--out", str(tmp_path / "o"),
               "--target-flops", "0.5", "--executor", "ray", "--ray-address", "127.0.0.1:1", "-q"])
    assert rc == 0 and seen["cfg"].executor == "ray" and seen["cfg"].ray_address == "127.0.0.1:1"
