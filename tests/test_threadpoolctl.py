"""threadpoolctl sees fastadam's OpenMP runtime, and its limits reach fastadam's kernel.

fastadam's default thread count (``set_num_threads(0)``) is OpenMP's ``omp_get_max_threads()``,
read at every step, so ``threadpool_limits(limits=1, user_api="openmp")`` -- which calls
``omp_set_num_threads(1)`` in every OpenMP runtime of the process -- limits fastadam too.
Which runtime is "fastadam's" is found from the running process, not assumed: the
library that the dynamic linker bound ``_core``'s ``omp_get_max_threads`` to (dladdr),
checked against ``ldd`` and ``/proc/self/maps`` on Linux. (When torch is imported first,
``_core`` binds to torch's bundled ``libgomp.so.1``, which has the same soname.)
"""

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import threadpoolctl

import fastadam
from fastadam import _core

pytestmark = pytest.mark.skipif(not _core.has_openmp(), reason="this fastadam build has no OpenMP: one thread always")


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def core_openmp_library() -> str:
    """Real path of the shared library that provides ``omp_get_max_threads`` to fastadam's ``_core``."""
    if sys.platform == "win32":
        pytest.skip("dladdr is POSIX; on Windows threadpoolctl lists vcomp140.dll")
    core = ctypes.CDLL(_core.__file__)  # already loaded: the same handle, with _core's own symbol scope
    address = ctypes.cast(core.omp_get_max_threads, ctypes.c_void_p)
    libc = ctypes.CDLL(None)
    dladdr = getattr(libc, "dladdr", None) or ctypes.CDLL(ctypes.util.find_library("dl")).dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    assert dladdr(address, ctypes.byref(info)) != 0, "dladdr found no library for omp_get_max_threads"
    return os.path.realpath(info.dli_fname.decode())


def openmp_entries() -> list[dict]:
    return [e for e in threadpoolctl.threadpool_info() if e["user_api"] == "openmp"]


def test_threadpool_info_lists_the_openmp_runtime_fastadam_uses():
    fastadam.set_num_threads(0)
    lib = core_openmp_library()
    matches = [e for e in openmp_entries() if os.path.realpath(e["filepath"]) == lib]
    assert len(matches) == 1, f"threadpoolctl lists {openmp_entries()}, fastadam's _core uses {lib}"
    assert matches[0]["num_threads"] == fastadam.get_num_threads()
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as f:
            mapped = {os.path.realpath(line.split()[-1]) for line in f if line.rstrip().endswith(".so") or ".so." in line}
        assert lib in mapped


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="needs Linux and ldd")
def test_the_library_ldd_names_is_the_one_threadpoolctl_lists():
    """In a process that imports fastadam first (no torch), the OpenMP runtime threadpoolctl
    lists is the file ``ldd`` resolves for ``_core``."""
    ldd = subprocess.run(["ldd", _core.__file__], capture_output=True, text=True, check=True).stdout
    lines = [line for line in ldd.splitlines() if "gomp" in line or "libomp" in line or "libiomp" in line]
    assert len(lines) == 1, ldd
    linked = os.path.realpath(lines[0].split("=>")[1].split("(")[0].strip())
    code = textwrap.dedent("""
        import os, fastadam, threadpoolctl
        print("\\n".join(os.path.realpath(e["filepath"]) for e in threadpoolctl.threadpool_info()
                         if e["user_api"] == "openmp"))
    """)
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert listed == [linked], (listed, linked)


def test_threadpool_limits_limit_fastadams_thread_count():
    """With OMP_NUM_THREADS=3 (so there is something to limit on any machine): fastadam's count
    follows threadpool_limits in and out of the context, through both of threadpoolctl's APIs."""
    code = textwrap.dedent("""
        import fastadam, threadpoolctl
        assert fastadam.get_num_threads() == 3, fastadam.get_num_threads()
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            assert fastadam.get_num_threads() == 1, fastadam.get_num_threads()
        assert fastadam.get_num_threads() == 3
        with threadpoolctl.threadpool_limits(limits=2):
            assert fastadam.get_num_threads() == 2
        with threadpoolctl.ThreadpoolController().limit(limits=1, user_api="openmp"):
            assert fastadam.get_num_threads() == 1
        assert fastadam.get_num_threads() == 3
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_threadpool_limits_in_this_process():
    fastadam.set_num_threads(0)
    outside = fastadam.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastadam.get_num_threads() == 1
    assert fastadam.get_num_threads() == outside


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux)")
def test_a_limited_step_really_runs_on_one_thread():
    """The kernel itself, not just the reported count: a large step under threadpool_limits(1)
    starts no worker thread; the same step outside starts min(3, CPUs) - 1 (OMP_NUM_THREADS=3;
    a step never runs more threads than the CPUs it may use). The pool creates its workers
    at the first step that needs them and keeps them."""
    code = textwrap.dedent("""
        import os
        import numpy as np
        import fastadam, threadpoolctl

        def threads():
            return len(os.listdir("/proc/self/task"))

        n = 1 << 20  # far above the 4,096 elements per thread fastadam needs to split a step
        p, g, m, v = (np.full(n, x, np.float32) for x in (1.0, 0.5, 0.0, 0.0))
        before = threads()
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            for step in range(1, 4):
                fastadam.adam_step(p, g, m, v, step=step)
            inside = threads()
        fastadam.adam_step(p, g, m, v, step=4)
        after = threads()
        print(before, inside, after)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="3", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    before, inside, after = map(int, out.stdout.split())
    assert inside == before, f"a step limited to one thread started {inside - before} thread(s)"
    workers = min(3, len(os.sched_getaffinity(0))) - 1
    assert workers >= 1, "this test needs 2 CPUs"
    assert after == before + workers, f"an unlimited step on 3 threads started {after - before} thread(s), not {workers}"
