import importlib
import os

import numpy as np
import pytest

import fastadam

DTYPES = [np.float32, np.float64]


def pytest_configure(config):
    # pyproject.toml registers these; a copy of tests/ run outside the source tree (CI's
    # wheel check) has no pyproject, so they are registered here as well.
    for marker in ("slow: seconds each; deselect with -m \"not slow\"",
                   "peers: the benchmark's DeepSpeed and optax checks, bitsandbytes' and torchao's state dicts"):
        config.addinivalue_line("markers", marker)
THREADS = [1, 2, 3]


def _bits(a: np.ndarray) -> np.ndarray:
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]  # bfloat16 and float16: 2; codes: 1
    return np.ascontiguousarray(a).view(unsigned).ravel()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (tells -0.0 from 0.0, compares NaN payloads)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return bool(np.array_equal(_bits(a), _bits(b)))


def first_difference(a: np.ndarray, b: np.ndarray) -> str:
    i = np.flatnonzero(_bits(a) != _bits(b))
    if not i.size:
        return "identical"
    return f"{i.size} of {a.size} elements differ; first at {i[0]}: {a.ravel()[i[0]]!r} vs {b.ravel()[i[0]]!r}"


def nan_blind_difference(got: np.ndarray, want: np.ndarray) -> str | None:
    """None when `got` has NaN exactly where `want` has and the bits of `want` everywhere
    else; otherwise what differs. The sign and payload of a NaN are not compared: with two
    NaN operands x86 keeps the first, and NumPy's operand order is its own."""
    nan = np.isnan(want)
    if not np.array_equal(np.isnan(got), nan):
        return "NaN positions differ"
    a, b = np.where(nan, 0, got).astype(want.dtype), np.where(nan, 0, want).astype(want.dtype)
    return None if same_bits(a, b) else first_difference(a, b)


@pytest.fixture(autouse=True)
def _restore_isa_and_threads():
    isa = fastadam.get_isa()
    yield
    fastadam.set_isa(isa)
    fastadam.set_num_threads(0)


def in_ci():
    """CI=true: a missing test dependency fails instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def peers_required():
    """FASTADAM_REQUIRE_PEERS=1 (.ci/run's peers step): a missing benchmark peer (DeepSpeed,
    jax, optax, bitsandbytes, torchao) fails instead of skipping. The default test run, in CI too, skips them."""
    return os.environ.get("FASTADAM_REQUIRE_PEERS", "").lower() in ("1", "true", "yes")


def import_or_skip(module, pin, what, required=None):
    """``module``, or a visible skip saying that ``what`` was not run. When ``required``
    (default: in CI, CI=true) a missing module fails instead, naming the install (``pin``)
    .ci/run must do."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if in_ci() if required is None else required:
            pytest.fail(f"{module} is not importable but this run requires it: .ci/run must install {pin}")
        # allow_module_level: test files that need the module throughout call this at import
        pytest.skip(f"{module} is not installed (pip install {pin}) -- {what} not run", allow_module_level=True)


def torch_or_skip():
    return import_or_skip("torch", "torch==2.13.0", "torch comparison")


# .ci/run's peers step installs exactly these (torch's pin beside deepspeed's, so that it keeps this torch).
PEERS_PIN = "torch==2.13.0 deepspeed==0.19.8 jax==0.10.2 optax==0.2.8 bitsandbytes==0.50.2 torchao==0.18.0"


def deepspeed_cpu_adam_or_skip():
    """DeepSpeed's DeepSpeedCPUAdam: the benchmark's opt-in peer."""
    torch_or_skip()
    return import_or_skip("deepspeed.ops.adam", PEERS_PIN, "check of the bench's DeepSpeed contender",
                          required=peers_required()).DeepSpeedCPUAdam


def optax_or_skip():
    """jax and optax: the benchmark's opt-in JAX peer."""
    for module in ("jax", "optax"):
        import_or_skip(module, PEERS_PIN, "check of the bench's optax contender", required=peers_required())
