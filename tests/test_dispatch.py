"""Run-time SIMD dispatch, FASTADAM_ISA, threads, and what the compiler emitted."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import in_ci

import fastadam

ALL_ISAS = ("baseline", "avx2", "avx512")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTADAM_ISA", "OMP_NUM_THREADS")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_available_isas_and_default_is_best():
    isas = fastadam.available_isas()
    assert isas[0] == "baseline" and set(isas) <= set(ALL_ISAS)
    assert list(isas) == [i for i in ALL_ISAS if i in isas]  # best last
    out = run_python("import fastadam; print(fastadam.get_isa())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == isas[-1]


@pytest.mark.parametrize("isa", ALL_ISAS)
def test_set_isa_chooses_or_refuses(isa):
    if isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        assert fastadam.get_isa() == isa
    else:
        before = fastadam.get_isa()
        with pytest.raises(ValueError, match=f"'{isa}' is not available"):
            fastadam.set_isa(isa)
        assert fastadam.get_isa() == before


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown ISA 'sse9'.*baseline.*avx2.*avx512"):
        fastadam.set_isa("sse9")


def test_environment_forces_each_available_path_with_identical_results():
    code = (
        "import numpy as np, hashlib, fastadam\n"
        "rng = np.random.default_rng(0)\n"
        "p, g = rng.standard_normal(100003).astype(np.float32), rng.standard_normal(100003).astype(np.float32)\n"
        "m, v = np.zeros_like(p), np.zeros_like(p)\n"
        "for t in range(1, 4): fastadam.adam_step(p, g, m, v, step=t, lr=0.01, weight_decay=0.1)\n"
        "print(fastadam.get_isa(), hashlib.sha256(p.tobytes() + m.tobytes() + v.tobytes()).hexdigest())\n"
    )
    digests = set()
    for isa in fastadam.available_isas():
        out = run_python(code, FASTADAM_ISA=isa)
        assert out.returncode == 0, out.stderr
        chosen, digest = out.stdout.split()
        assert chosen == isa
        digests.add(digest)
    assert len(digests) == 1


@pytest.mark.parametrize("value", ["sse9", "AVX512 ", *[i for i in ALL_ISAS if i not in fastadam.available_isas()]])
def test_environment_with_bad_or_unavailable_isa_fails_at_import(value):
    out = run_python("import fastadam", FASTADAM_ISA=value)
    assert out.returncode != 0
    assert "ValueError" in out.stderr and "FASTADAM_ISA" in out.stderr


def test_num_threads_control():
    fastadam.set_num_threads(1)
    assert fastadam.get_num_threads() == 1
    fastadam.set_num_threads(3)
    assert fastadam.get_num_threads() == 3
    fastadam.set_num_threads(0)
    assert fastadam.get_num_threads() >= 1
    with pytest.raises(ValueError, match="n must be >= 1"):
        fastadam.set_num_threads(-2)


def test_default_threads_follow_omp_num_threads():
    assert fastadam._core.has_openmp()
    out = run_python("import fastadam; print(fastadam.get_num_threads())", OMP_NUM_THREADS="1")
    assert out.stdout.strip() == "1", out.stderr
    out = run_python("import fastadam, os; print(fastadam.get_num_threads(), os.cpu_count())")
    threads, cores = out.stdout.split()
    assert threads == cores


def disassembly():
    # Under qemu-user (.ci/aarch64.sh) the host's objdump is x86-only; the cross binutils'
    # one reads the aarch64 module (and runs natively when this emulated Python calls it).
    objdump = (os.uname().machine == "aarch64" and shutil.which("aarch64-linux-gnu-objdump")) or shutil.which("objdump")
    if objdump is None:
        if in_ci():
            pytest.fail("objdump (binutils) is missing in CI")
        pytest.skip("objdump (binutils) is not installed")
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", fastadam._core.__file__], capture_output=True, text=True, check=True)
    functions = {}
    for block in re.split(r"\n\n(?=[0-9a-f]+ <)", out.stdout):
        header = block.split("\n", 1)[0]
        m = re.match(r"[0-9a-f]+ <(.*)>:", header)
        if m and "@plt" not in header:
            functions[m.group(1)] = block
    return functions


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86-64 paths exist only on x86-64")
def test_each_path_uses_its_registers_and_no_fma():
    functions = disassembly()
    for isa, must, must_not in [("avx512", "zmm", None), ("avx2", "ymm", "zmm"), ("baseline", "xmm", "ymm")]:
        bodies = [b for name, b in functions.items() if re.search(rf"fastadam::{isa}::adam_", name)]
        assert bodies, f"no fastadam::{isa}::adam_* functions in the module"
        text = "\n".join(bodies)
        assert must in text, f"{isa} Adam kernel does not use {must} registers"
        if must_not:
            assert must_not not in text, f"{isa} Adam kernel uses {must_not} registers"
        assert "sqrtp" in text and "divp" in text, f"{isa} Adam kernel is not vectorised (no packed sqrt/div)"
        # The only FMAs allowed are the five of each AVX-512 float square root by FMA
        # (lanes.hpp), one vrsqrt14ps each; any other FMA is a contraction.
        for name, body in ((n, b) for n, b in functions.items() if re.search(rf"fastadam::{isa}::adam_", n)):
            fmas = len(re.findall(r"\bvfn?m(?:add|sub)\w*(?:ps|ss|pd|sd)\b", body))
            estimates = len(re.findall(r"\bvrsqrt14ps", body))
            assert fmas == 5 * estimates, f"{name}: {fmas} FMAs for {estimates} square roots by FMA: -ffp-contract=off is missing"
            if isa != "avx512" or "<double" in name:
                assert estimates == 0, f"{name} computes a square root by FMA"
        if isa == "avx512":
            assert "vrsqrt14ps" in text, "the avx512 Adam kernel does not take any square root by FMA"
        assert not re.search(r"call\s.*sqrt", text), f"{isa} Adam kernel calls libm sqrt (errno): -fno-math-errno is missing"


@pytest.mark.skipif(os.uname().machine != "aarch64" or not sys.platform.startswith("linux"),
                    reason="checks the Linux aarch64 build with GNU objdump (.ci/aarch64.sh runs it under qemu)")
def test_aarch64_kernel_is_neon_with_ieee_sqrt_and_div_and_no_fma():
    # The baseline path on aarch64 is GCC's auto-vectorisation to NEON: packed square roots
    # and divisions of 4 floats and 2 doubles, and no fused multiply-add anywhere in the
    # kernel (-ffp-contract=off: a contraction would change the bits).
    functions = disassembly()
    kernel = {name: body for name, body in functions.items() if "fastadam::" in name}
    adam = "\n".join(body for name, body in kernel.items() if re.search(r"fastadam::baseline::adam_", name))
    assert adam, "no fastadam::baseline::adam_* functions in the module"
    for op in ("fsqrt", "fdiv"):
        for lanes in ("4s", "2d"):
            assert re.search(rf"\b{op}\s+v\d+\.{lanes}", adam), f"the Adam kernel has no NEON {op} on .{lanes}: not vectorised"
    for name, body in kernel.items():
        fmas = re.findall(r"^\s*[0-9a-f]+:\s+(fn?m(?:add|sub)|fml[as])\s.*$", body, re.M)
        assert not fmas, f"{name}: {len(fmas)} fused multiply-adds ({fmas[:3]}): -ffp-contract=off is missing"
    assert not re.search(r"\bbl\s.*sqrt", adam), "the Adam kernel calls libm sqrt (errno): -fno-math-errno is missing"


MEMORY_OPERAND = re.compile(r"(-?0x[0-9a-f]+)?\((%\w+)(?:,(%\w+),(\d))?\)")


def loads_after_stores(function: str, marker: str) -> tuple[int, list[str]]:
    """In each loop of a disassembled function (a conditional jump back over a body
    containing `marker`), the zmm loads that read the element offset a zmm store earlier
    in the same pass wrote, in another array: the 4K-aliasing pattern that lanes.hpp's
    loads_before_stores prevents. Offsets follow the pointer and index increments
    (add/sub $imm). Returns (loops found, offending instructions). An unconditional jmp
    back is no loop's latch: GCC jumps from the pipelined loop's last group back into
    the one-vector loop laid out before it. Only innermost loops count: a conditional
    jump back from a cold block laid out after the loops (the tail's element-by-element
    stores) spans code that no single pass runs."""
    insns = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"^\s*([0-9a-f]+):\s+(.*)$", function, re.M)]
    latches = []
    for at, text in insns:
        jump = re.match(r"j(?!mp\b)\w+\s+([0-9a-f]+)\b", text)
        if jump and int(jump.group(1), 16) < at:
            latches.append((int(jump.group(1), 16), at))
    loops, bad = 0, []
    for start, at in latches:
        if any(start <= inner_start and inner_at < at for inner_start, inner_at in latches if (inner_start, inner_at) != (start, at)):
            continue
        body = [t for a, t in insns if start <= a <= at]
        if not any(marker in t for t in body):
            continue
        loops += 1
        shift: dict[str, int] = {}
        stored: set[int] = set()
        for t in body:
            step = re.match(r"(add|sub)\s+\$(0x[0-9a-f]+),(%\w+)$", t)
            if step:
                shift[step.group(3)] = shift.get(step.group(3), 0) + int(step.group(2), 16) * (1 if step.group(1) == "add" else -1)
                continue
            if "%zmm" not in t or "%rsp" in t or "%rip" in t:
                continue
            m = MEMORY_OPERAND.search(t)
            if not m:
                continue
            disp, base, index, scale = int(m.group(1) or "0", 16), m.group(2), m.group(3), int(m.group(4) or 1)
            offset = disp + shift.get(base, 0) + (shift.get(index, 0) * scale if index else 0)
            if re.match(r"vmov\w*\s+%zmm\d+,\S*\)$", t):
                stored.add(offset)
            elif offset in stored:
                bad.append(t)
    return loops, bad


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86-64 paths exist only on x86-64")
def test_vector_loops_load_before_they_store():
    # With NumPy's arrays all at one page offset, a load behind a store to the same element
    # of another array waits for it; lanes.hpp keeps every update's loads ahead of its
    # stores. Checked on the AVX-512 float loop's vector groups, the loops with vrsqrt14ps:
    # only lanes.hpp emits that instruction, so no loop GCC vectorised by itself (float64's,
    # which re-read) is mistaken for them. Without the hint GCC re-reads param after the
    # state's stores in every group.
    functions = disassembly()
    found = 0
    for name, body in functions.items():
        if re.search(r"fastadam::avx512::adam_", name):
            loops, bad = loads_after_stores(body, "vrsqrt14ps")
            found += loops
            assert not bad, f"{name}: loads after a store to the same element: {bad[:3]}"
            # every function with the FMA root is checked: none of them may lose its loop to
            # the innermost-loop rule (a branch back inside the pipelined loop would hide it)
            assert loops or "vrsqrt14ps" not in body, f"{name}: its vrsqrt14ps loop was not found"
    assert found, "no avx512 float loop with square roots by FMA found in the module"
