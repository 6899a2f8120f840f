"""`python -m fastadam`: what this machine runs, a self-check against the reference, and a quick timing."""

import subprocess
import sys

import fastadam
from fastadam import __main__ as cli


def test_main_reports_machine_self_check_and_timing():
    out = subprocess.run([sys.executable, "-m", "fastadam"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"fastadam {fastadam.__version__}" in text
    assert f"SIMD path in use : {fastadam.get_isa()}" in text
    assert "self-check       : OK" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("1,000", "100,000", "1,000,000"))]
    assert len(rows) == 3 and all(r[-1].endswith("x") and float(r[-1][:-1]) > 0 for r in rows)


def test_self_check_detects_a_wrong_kernel(monkeypatch):
    """The self-check can fail: a kernel that differs from the reference is reported."""
    real = fastadam.adam_step

    def off_by_one_ulp(param, *args, **kwargs):
        real(param, *args, **kwargs)
        param.view(param.dtype.str.replace("f", "u"))[0] += 1

    monkeypatch.setattr(fastadam, "adam_step", off_by_one_ulp)
    failures = cli.self_check(n=1000, steps=1)
    assert failures and "float32 adam isa=baseline" in failures[0]


def test_benchmark_harness_is_not_in_the_package():
    """The DeepSpeed/optax/GPT-2 harness lives in the repository's bench/, not in the installed package."""
    import importlib.util

    assert importlib.util.find_spec("fastadam.benchmark") is None
    out = subprocess.run([sys.executable, "-m", "fastadam", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bench/bench.py" in out.stdout and "--bench" not in out.stdout
