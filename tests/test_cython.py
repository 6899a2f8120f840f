"""The Cython API: a downstream extension, compiled here against the *installed* package
(``fastadam.get_include()`` + ``cimport fastadam.kernel``), calls the kernel inside
``with nogil:`` and must give the same bits as the Python API."""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastadam

from conftest import DTYPES, first_difference, in_ci, same_bits

PYX = textwrap.dedent(
    """
    # cython: language_level=3, boundscheck=False, wraparound=False
    # distutils: language = c++
    from fastadam cimport kernel

    kernel.import_fastadam()

    ctypedef fused real:
        float
        double

    def adam(real[::1] p, const real[::1] g, real[::1] m, real[::1] v, real[::1] vmax, long long step,
             double lr, double beta1, double beta2, double eps, double weight_decay,
             bint decoupled, bint amsgrad, bint maximize):
        cdef kernel.AdamHyperparams h
        h.lr = lr
        h.beta1 = beta1
        h.beta2 = beta2
        h.eps = eps
        h.weight_decay = weight_decay
        h.decoupled_weight_decay = decoupled
        h.amsgrad = amsgrad
        h.maximize = maximize
        cdef kernel.AdamTensor[real] t
        t.param = &p[0]
        t.grad = &g[0]
        t.exp_avg = &m[0]
        t.exp_avg_sq = &v[0]
        t.max_exp_avg_sq = &vmax[0] if amsgrad else NULL
        t.size = p.shape[0]
        t.step = step
        t.hyper = &h
        with nogil:
            kernel.adam_step(&t, 1)

    def sgd(real[::1] p, const real[::1] g, real[::1] buf, bint first_step,
            double lr, double momentum, double dampening, double weight_decay, bint nesterov):
        cdef kernel.SgdHyperparams h
        h.lr = lr
        h.momentum = momentum
        h.dampening = dampening
        h.weight_decay = weight_decay
        h.nesterov = nesterov
        h.maximize = False
        cdef kernel.SgdTensor[real] t
        t.param = &p[0]
        t.grad = &g[0]
        t.momentum_buffer = &buf[0]
        t.size = p.shape[0]
        t.first_step = first_step
        t.hyper = &h
        with nogil:
            kernel.sgd_step(&t, 1)

    def default_lr():
        cdef kernel.AdamHyperparams h
        return h.lr, h.beta1, h.beta2, h.eps
    """
)

SETUP = textwrap.dedent(
    """
    import sys
    import fastadam, numpy
    from Cython.Build import cythonize
    from setuptools import Extension, setup

    args = ["/std:c++17"] if sys.platform == "win32" else ["-std=c++17"]
    ext = Extension("fastadam_cython_user", ["fastadam_cython_user.pyx"], language="c++",
                    include_dirs=[fastadam.get_include(), numpy.get_include()], extra_compile_args=args)
    setup(name="fastadam_cython_user", ext_modules=cythonize([ext], quiet=True),
          script_args=["build_ext", "--inplace"])
    """
)


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} but CI=true: .ci/run must provide it (pip install '.[test]', which has cython and setuptools)")
    pytest.skip(f"{reason} -- Cython API test not run")


def _toolchain_or_skip() -> None:
    """Cython, setuptools and a C++ compiler, or a visible skip; in CI a missing one fails."""
    for module in ("Cython", "setuptools"):
        if importlib.util.find_spec(module) is None:
            _unavailable(f"{module} is not installed (pip install 'cython>=3' setuptools)")
    import Cython

    if int(Cython.__version__.split(".")[0]) < 3:
        _unavailable(f"Cython {Cython.__version__} is installed; the test needs cython>=3")
    cxx = sysconfig.get_config_var("CXX")
    if sys.platform != "win32" and cxx and shutil.which(shlex.split(cxx)[0]) is None:
        _unavailable(f"no C++ compiler ({cxx!r} not found)")


# The tests that use it are marked slow: compiling the extension takes about 10 s.
@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    _toolchain_or_skip()
    include = Path(fastadam.get_include())
    for header in ("types.hpp", "capi.hpp", "fastadam.hpp"):
        assert (include / "fastadam" / header).is_file(), f"{header} is not installed under {include}"
    assert (Path(fastadam.__file__).parent / "kernel.pxd").is_file()
    work = tmp_path_factory.mktemp("cython_user")
    (work / "fastadam_cython_user.pyx").write_text(PYX)
    (work / "setup.py").write_text(SETUP)
    # A fresh interpreter in an empty directory: only the installed fastadam is visible.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "setup.py"], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"building the Cython extension failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    built = [f for f in work.iterdir() if f.name.startswith("fastadam_cython_user.") and f.suffix in (".so", ".pyd")]
    assert len(built) == 1, list(work.iterdir())
    spec = importlib.util.spec_from_file_location("fastadam_cython_user", built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_get_include_is_installed_package():
    include = Path(fastadam.get_include())
    assert include.parent == Path(fastadam.__file__).parent
    assert type(getattr(fastadam._core, "_C_API")).__name__ == "PyCapsule"


@pytest.mark.slow
def test_hyperparams_defaults_match_torch(ext):
    assert ext.default_lr() == (1e-3, 0.9, 0.999, 1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_nogil_bits_match_python_api(ext, dtype, decoupled):
    rng = np.random.default_rng(7)
    n = 3 * 4096 + 17  # several threads' worth, plus a SIMD tail
    p0 = rng.standard_normal(n).astype(dtype)
    a = [p0.copy(), np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)]
    b = [p0.copy(), np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)]
    hyper = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    for step in range(1, 8):
        g = rng.standard_normal(n).astype(dtype) * dtype(10.0 ** rng.integers(-3, 3))
        ext.adam(*a[:1], g, *a[1:], step, hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"],
                 decoupled, True, False)
        fastadam.adam_step(b[0], g, b[1], b[2], step=step, **hyper, decoupled_weight_decay=decoupled,
                           amsgrad=True, max_exp_avg_sq=b[3])
        for name, x, y in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), a, b):
            assert same_bits(x, y), f"step {step} {name}: {first_difference(x, y)}"
    assert not same_bits(a[0], p0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_nogil_bits_match_python_api(ext, dtype):
    rng = np.random.default_rng(8)
    n = 5000
    p0 = rng.standard_normal(n).astype(dtype)
    a, abuf = p0.copy(), np.zeros(n, dtype)
    b, bbuf = p0.copy(), np.zeros(n, dtype)
    for step in range(1, 6):
        g = rng.standard_normal(n).astype(dtype)
        ext.sgd(a, g, abuf, step == 1, 0.01, 0.9, 0.0, 1e-3, True)
        fastadam.sgd_step(b, g, bbuf, step=step, lr=0.01, momentum=0.9, weight_decay=1e-3, nesterov=True)
        assert same_bits(a, b), f"step {step}: {first_difference(a, b)}"
        assert same_bits(abuf, bbuf)


@pytest.mark.slow
def test_threads_and_isa_settings_apply(ext):
    """The capsule reaches the same kernel: every path and thread count, same bits."""
    rng = np.random.default_rng(9)
    n = 20000
    g = rng.standard_normal(n).astype(np.float32)
    p0 = rng.standard_normal(n).astype(np.float32)
    ref = [p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    fastadam.adam_step(ref[0], g, ref[1], ref[2], step=1)
    for isa in fastadam.available_isas():
        for threads in (1, 3):
            fastadam.set_isa(isa)
            fastadam.set_num_threads(threads)
            x = [p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)]
            ext.adam(x[0], g, x[1], x[2], x[2][:1], 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False)
            assert all(same_bits(u, v) for u, v in zip(x, ref)), (isa, threads)
