"""Smoke test of the benchmark harness (bench/bench.py and its modules, from the source tree): tiny cases,
result structure only, no timing assertions.

The C++ Google Benchmark binary (bench/cpp) is smoke-run by .ci/run, not here. The checks of the
DeepSpeed and optax contenders are marked ``peers``: .ci/run runs them in their own step, with the
peers installed (FASTADAM_REQUIRE_PEERS=1); elsewhere they skip when the peers are not installed.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import deepspeed_cpu_adam_or_skip, in_ci, optax_or_skip, torch_or_skip

from fastadam import reference

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():
    """bench/bench.py, imported from the repository beside tests/ (its sibling modules with it)."""
    if not (BENCH_DIR / "bench.py").is_file():
        message = f"{BENCH_DIR / 'bench.py'} not found: copy bench/ beside tests/ to run the harness's smoke test"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    module = importlib.import_module("bench")
    assert Path(module.__file__).resolve() == BENCH_DIR / "bench.py", module.__file__
    return module


def test_gpt2_small_shapes(bench):
    shapes = bench.gpt2_small_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808
    case = bench.gpt2_small_case()
    assert case.tensors == 148 and case.elements == 124_439_808 and case.kind == "multi"


def test_default_cases(bench):
    full = bench.default_cases()
    assert [c.elements for c in full if c.kind == "single"] == list(bench.SINGLE_SIZES)
    assert {c.name for c in full if c.kind == "multi"} == {"GPT-2 small", "1000 x 1k"}
    quick = bench.default_cases(quick=True)
    assert max(c.elements for c in quick) <= 1_000_000  # no 5e7, no GPT-2 in quick mode
    assert [c.elements for c in bench.default_cases(sizes=[7], groups=["single"])] == [7]
    with pytest.raises(ValueError):
        bench.default_cases(groups=["nope"])


def _check_results(bench, results, cases, contenders, threads):
    assert len(results) == len(cases)
    for r, case in zip(results, cases):
        assert r["case"] == case.name and r["kind"] == case.kind
        assert r["tensors"] == case.tensors and r["elements"] == case.elements
        assert r["bytes_per_step"] == bench.BYTES_PER_ELEMENT * case.elements
        assert r["threads"] == threads
        assert list(r["contenders"]) == list(contenders)
        for name, c in r["contenders"].items():
            assert math.isfinite(c["median_s"]) and c["median_s"] > 0, name
            assert 0 < c["min_s"] <= c["median_s"], name
            assert len(c["samples_s"]) == 2 and all(s > 0 and math.isfinite(s) for s in c["samples_s"]), name
            assert c["steps_per_sample"] >= 1
            assert c["gbs"] == pytest.approx(r["bytes_per_step"] / c["median_s"] / 1e9)
        fa = r["contenders"]["fastadam"]["median_s"]
        assert r["fastadam_gbs"] == r["contenders"]["fastadam"]["gbs"]
        assert set(r["ratios"]) == set(contenders) - {"fastadam"}
        for peer, ratio in r["ratios"].items():
            assert ratio == pytest.approx(r["contenders"][peer]["median_s"] / fa)
            assert math.isfinite(r["paired_ratios"][peer]) and r["paired_ratios"][peer] > 0


def test_run_quick_structure(bench):
    cases = [bench.single_case(1000), bench.many_case(count=20, size=100)]
    contenders = bench.available_contenders() + ["fastadam_optim"]
    results = bench.run(cases, threads=1, repeats=2, contenders=contenders, warmup=1, min_sample_time=0.002)
    _check_results(bench, results, cases, contenders, threads=1)
    table = bench.format_table(results, bound_gbs=40.0)
    for case in cases:
        assert case.name in table
    assert "fastadam GB/s" in table and "% of bound" in table
    json.dumps(results)  # plain data, ready for --json


def test_run_without_torch_contenders(bench):
    cases = [bench.single_case(64)]
    results = bench.run(cases, threads=2, repeats=2, contenders=["fastadam", "numpy"], warmup=0, min_sample_time=0.001)
    _check_results(bench, results, cases, ["fastadam", "numpy"], threads=2)
    with pytest.raises(ValueError):
        bench.run(cases, contenders=["fastadam", "nope"])


@pytest.mark.parametrize("name", ["torch", "torch_foreach", "torch_fused",
                                  pytest.param("deepspeed", marks=[pytest.mark.peers, pytest.mark.slow]),
                                  pytest.param("optax", marks=pytest.mark.peers)])
def test_peer_contenders_take_adams_step(bench, name):
    """What the bench times for each peer is Adam's step at the bench's lr: three steps match the reference."""
    if name == "deepspeed":
        deepspeed_cpu_adam_or_skip()
    elif name == "optax":
        optax_or_skip()
    else:
        torch_or_skip()
    case = bench.Case("odd sizes", ((1000,), (37,), (3, 129)), "multi")
    data = bench._init_data(case, seed=1)
    step = bench._make_contender(name, case, data)
    for _ in range(3):
        step()
    if name == "optax":
        got = step.params()
        adam_state = step._state[0]  # optax's ScaleByAdamState
        moments = [(np.asarray(mu), np.asarray(nu)) for mu, nu in zip(adam_state.mu, adam_state.nu)]
    else:
        opt = step.__self__
        tensors = opt.param_groups[0]["params"]
        got = [t.detach().numpy() for t in tensors]
        moments = [(opt.state[t]["exp_avg"].numpy(), opt.state[t]["exp_avg_sq"].numpy()) for t in tensors]
    assert len(got) == len(moments) == case.tensors
    for (p0, g), p_peer, (m_peer, v_peer) in zip(data, got, moments):
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for t in (1, 2, 3):
            reference.adam_step(p, g, m, v, step=t, lr=bench.LR)
        assert p_peer.shape == p0.shape and p_peer.dtype == np.float32
        assert np.abs(p_peer - p0).min() > 1e-4  # every element moved, by about 3 * lr
        # Compared as steps taken: the peers round differently (DeepSpeed also rounds 1 - beta2 to
        # float32 first, which moves its exp_avg_sq by 1.3e-5 relative and its step by ~5e-6). A
        # wrong lr would be off by its own error. The gradient is the same at every step, so the
        # bias-corrected step hardly depends on the betas: the moments check those.
        np.testing.assert_allclose(p_peer - p0, p - p0, rtol=1e-4, atol=0)
        np.testing.assert_allclose(m_peer, m, rtol=1e-4, atol=0)
        np.testing.assert_allclose(v_peer, v, rtol=1e-4, atol=0)
    if name in ("deepspeed", "optax"):
        threads = bench._usable_cpus() if name == "optax" else 1
        cases = [bench.single_case(100), bench.many_case(count=3, size=10)]
        results = bench.run(cases, threads=threads, repeats=2, contenders=["fastadam", name], warmup=0, min_sample_time=0.001)
        _check_results(bench, results, cases, ["fastadam", name], threads=threads)


@pytest.mark.parametrize("name, missing", [("deepspeed", "deepspeed.ops.adam"), ("optax", "optax"), ("optax", "jax")])
def test_missing_peer_library_names_the_install(bench, monkeypatch, name, missing):
    real = bench.contenders._optional
    monkeypatch.setattr(bench.contenders, "_optional", lambda module: None if module == missing else real(module))
    with pytest.raises(ValueError, match=rf"contender '{name}' needs .*\(pip install "):
        bench.run([bench.single_case(10)], threads=bench._usable_cpus(), contenders=["fastadam", name])
    with pytest.raises(SystemExit):  # the command line reports it as a usage error
        bench.main(["--cases", "single", "--sizes", "10", "--contenders", f"fastadam,{name}", "--threads", str(bench._usable_cpus())])


@pytest.mark.peers
def test_optax_needs_every_cpu(bench):
    optax_or_skip()
    with pytest.raises(ValueError, match="optax.*threads="):
        bench.run([bench.single_case(10)], threads=bench._usable_cpus() + 1, contenders=["fastadam", "optax"])


def test_main_quick_writes_json(bench, tmp_path, capsys):
    stream = tmp_path / "gbench.json"
    stream.write_text(json.dumps({"benchmarks": [
        {"name": "stream/avx512/threads:1/n:1000/real_time", "run_type": "iteration", "bytes_per_second": 9e10},
        {"name": "stream/avx512/threads:1/n:50000000/real_time", "run_type": "iteration", "bytes_per_second": 4.0e10},
        {"name": "stream/avx2/threads:1/n:50000000/real_time", "run_type": "iteration", "bytes_per_second": 4.2e10},
        {"name": "stream/avx2/threads:2/n:50000000/real_time", "run_type": "iteration", "bytes_per_second": 9.9e10},
    ]}))  # fmt: skip
    bound = bench.read_stream_bound(str(stream), threads=1)
    assert bound["gbs"] == pytest.approx(42.0) and bound["elements"] == 50_000_000

    out = tmp_path / "result.json"
    argv = ["--quick", "--threads", "1", "--repeats", "2", "--sizes", "1e3", "--cases", "single", "--contenders", "fastadam,numpy",
            "--min-sample-time", "0.001", "--stream-json", str(stream), "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 x 1k" in printed and "% of bound" in printed
    doc = json.loads(out.read_text())
    assert doc["bound"]["gbs"] == pytest.approx(42.0)
    for key in ("cpu_model", "logical_cpus", "numpy", "torch", "fastadam", "fastadam_isa", "threads", "date"):
        assert key in doc["machine"]
    assert doc["machine"]["threads"] == 1
    _check_results(bench, doc["results"], [bench.single_case(1000)], ["fastadam", "numpy"], threads=1)


def test_plot(bench, tmp_path):
    pytest.importorskip("matplotlib")
    cases = [bench.single_case(100), bench.single_case(1000), bench.many_case(count=5, size=100)]
    results = bench.run(cases, threads=1, repeats=2, contenders=["fastadam", "numpy"], warmup=0, min_sample_time=0.001)
    path = tmp_path / "plot.png"
    bench.plot(results, str(path), bound_gbs=40.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaved_stream_bound(bench, tmp_path):
    """--stream-bin plumbing, with a stand-in for bench/cpp's fastadam_bench (no C++ build needed)."""
    fake = tmp_path / "fake_bench"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:])\n"
        "n, t = int(args['--sizes']), int(args['--threads'])\n"
        "assert args['--benchmark_format'] == 'json' and args['--benchmark_filter'].startswith('^stream/')\n"
        "print(json.dumps({'benchmarks': [{'name': f'stream/x/threads:{t}/n:{n}/real_time', 'bytes_per_second': 5e10}]}))\n"
    )
    fake.chmod(0o755)
    cases = [bench.single_case(2000), bench.single_case(100)]
    results = bench.run(cases, threads=1, repeats=2, contenders=["fastadam", "numpy"], warmup=0, min_sample_time=0.001,
                        stream_bin=str(fake), stream_min_elements=1000)  # fmt: skip
    bound = results[0]["bound"]
    assert bound["samples_gbs"] == [50.0, 50.0] and bound["median_gbs"] == 50.0 and bound["elements"] == 2000
    assert bound["fastadam_fraction"] > 0
    assert "bound" not in results[1]  # below stream_min_elements
    table = bench.format_table(results)
    assert "bound GB/s" in table and "50.0" in table


def test_mixed_precision_bench_runs():
    """bench/mixed_precision.py's single-tensor and norm cases on a tiny size (the offload case holds ~5 GB)."""
    torch_or_skip()
    import subprocess

    out = subprocess.run(
        [sys.executable, str(BENCH_DIR / "mixed_precision.py"), "--cases", "bf16-states,all-bf16,norm", "--sizes", "1e6", "--rounds", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    for row in ("| torch fused fp32 |", "| torch fused bf16 |", "| norm pass, fp32 grads |", "| Adam pass, offload layout |"):
        assert row in out, out
    assert out.count("| fastadam | ") == 3 and out.count("bytes/element") == 3, out


def test_quantized_bench_quick_runs(tmp_path):
    """bench/quantized.py --quick: every default contender's row, bytes per element, the JSON."""
    torch_or_skip()
    import subprocess

    out_json = tmp_path / "quantized.json"
    out = subprocess.run([sys.executable, str(BENCH_DIR / "quantized.py"), "--quick", "--json", str(out_json)],
                         capture_output=True, text=True, check=True, timeout=300).stdout  # fmt: skip
    for row in ("| fastadam 8-bit |", "| 8-bit functional |", "| fastadam 4-bit |", "| 4-bit functional |", "| fastadam fp32 |",
                "| torch fused fp32 |"):  # fmt: skip
        assert out.count(row) == 2, out
    rows = json.loads(out_json.read_text())["rows"]
    by = {(r["case"], r["contender"]): r for r in rows}
    single = "1 x 200k"
    assert by[single, "fastadam fp32"]["traffic_bytes"] == 28 and by[single, "fastadam fp32"]["state_bytes"] == 8
    assert by[single, "fastadam 8-bit"]["state_bytes"] == pytest.approx(2 + 8 * 782 / 200_000)
    assert by[single, "fastadam 4-bit"]["traffic_bytes"] == pytest.approx(12 + 2 * (1 + 8 * 1563 / 200_000))
    assert all(r["seconds"] > 0 and r["gbs"] > 0 for r in rows)
