"""The AVX-512 float loops take some square roots on the FMA units (cpp/include/fastadam/lanes.hpp).
Those must be the IEEE square root, bit for bit, for every input."""

import ctypes
import ctypes.util
import os
import sys

import numpy as np
import pytest
from conftest import nan_blind_difference

import fastadam
from fastadam import _core, reference

FENV = _core._fenv  # this platform's <fenv.h> values

CHUNK = 1 << 24


# conftest.py restores the path after each test.
@pytest.fixture(params=fastadam.available_isas())
def isa(request):
    fastadam.set_isa(request.param)
    return request.param


# Where AVX-512 is missing, the FMA square root is not used; .ci/run sets
# FASTADAM_REQUIRE_AVX512=1 so that these tests cannot be skipped there.
needs_avx512 = pytest.mark.skipif(
    "avx512" not in fastadam.available_isas(), reason="this CPU has no AVX-512: the FMA square root is not used here"
)


@pytest.fixture
def avx512():
    fastadam.set_isa("avx512")


def test_ci_machine_has_the_fma_square_root():
    if os.environ.get("FASTADAM_REQUIRE_AVX512") == "1":
        assert "avx512" in fastadam.available_isas(), "FASTADAM_REQUIRE_AVX512=1 but this CPU has no AVX-512"
    elif "avx512" not in fastadam.available_isas():
        pytest.skip("this CPU has no AVX-512: the FMA square root is not used here")


def lane_sqrt_bits(x, estimate=None):
    out = np.empty_like(x)
    _core._lane_sqrt(x, out, estimate)
    return out.view(np.uint32)


def ieee_sqrt_bits(x):
    with np.errstate(invalid="ignore"):
        return np.sqrt(x).view(np.uint32)


@pytest.mark.slow  # seconds: every float of a range
@needs_avx512
def test_every_non_negative_float(avx512):
    # All 2^31 bit patterns with the sign bit clear: zero, subnormals, the FMA range
    # [2^-64, 2^64) and its edges, huge values, infinity and every NaN payload.
    offsets = np.arange(CHUNK, dtype=np.uint32)
    bits = np.empty_like(offsets)
    for start in range(0, 1 << 31, CHUNK):
        np.add(offsets, np.uint32(start), out=bits)
        x = bits.view(np.float32)
        got, want = lane_sqrt_bits(x), ieee_sqrt_bits(x)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"sqrt({x[bad[0]]!r}) bits {got[bad[0]]:08x}, IEEE {want[bad[0]]:08x}"


def test_negative_floats(isa):
    # Every 1021st pattern with the sign bit set (-0, negative subnormals and normals, -inf, NaNs).
    bits = np.arange(1 << 31, 1 << 32, 1021, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    assert np.array_equal(lane_sqrt_bits(x), ieee_sqrt_bits(x))


@pytest.mark.slow  # seconds: every float of a range
@needs_avx512
def test_any_estimate_within_the_hardware_bound_gives_the_ieee_root(avx512):
    # The sequence starts from vrsqrt14ps, whose estimates the ISA bounds (relative error
    # < 2^-14) but does not fix: Intel and AMD CPUs may differ. Here the estimates are
    # 1/sqrt(x) off by k * 2^-14, for fixed k up to three times the bound and for
    # independent random k in [-3, 3] per element, for every float in [1, 4). Scaling
    # x by 4^j scales every intermediate by an exact power of two, so [1, 4) stands for
    # the whole range [2^-64, 2^64) the sequence is used on.
    lo, hi = np.float32(1.0).view(np.uint32), np.float32(4.0).view(np.uint32)
    x = np.arange(lo, hi, dtype=np.uint32).view(np.float32)
    want = ieee_sqrt_bits(x)
    inverse_root = 1.0 / np.sqrt(x.astype(np.float64))
    rng = np.random.default_rng(11)
    offsets = [-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, rng.uniform(-3, 3, x.size), rng.uniform(-3, 3, x.size)]
    for k in offsets:
        estimate = (inverse_root * (1.0 + k * 2.0**-14)).astype(np.float32)
        got = lane_sqrt_bits(x, estimate)
        bad = np.flatnonzero(got != want)
        name = f"k={k}" if np.isscalar(k) else "random k"
        assert bad.size == 0, f"{name}: sqrt({x[bad[0]]!r}) bits {got[bad[0]]:08x}, IEEE {want[bad[0]]:08x}"


@needs_avx512
def test_estimates_far_outside_the_bound_are_caught(avx512):
    # The check above can fail: with estimates 16 * 2^-14 off, the one refinement step is
    # not enough and some roots come out wrong.
    x = np.arange(np.float32(1.0).view(np.uint32), np.float32(4.0).view(np.uint32), dtype=np.uint32).view(np.float32)
    estimate = (1.0 / np.sqrt(x.astype(np.float64)) * (1.0 + 16 * 2.0**-14)).astype(np.float32)
    assert np.count_nonzero(lane_sqrt_bits(x, estimate) != ieee_sqrt_bits(x)) > 0


SPECIALS = np.array(
    [0.0, 1e-45, 1e-40, 2.0**-64, np.nextafter(np.float32(2.0**-64), np.float32(0)), 2.0**64,
     np.nextafter(np.float32(2.0**64), np.float32(0)), 3e38, np.inf, np.nan, 1.0, 0.25, 1e-20, 1e20, 5e-39, 7.0],
    dtype=np.float32,
)


def special_step_inputs(rng, n):
    """An amsgrad step whose max_exp_avg_sq, and so whose square-root argument, is exactly
    SPECIALS, rotated by one in each 16-element block: there grad and exp_avg_sq are 0,
    so v = 0 and maximum(max_exp_avg_sq, v) = max_exp_avg_sq. Every vector holds special
    values, whichever of its group's vectors take the FMA root (a build-time split), and
    wherever the loop's vectors start, so each value meets both paths."""
    param = rng.standard_normal(n).astype(np.float32)
    exp_avg = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    exp_avg_sq = (rng.random(n) * 1e-4).astype(np.float32)
    max_exp_avg_sq = (rng.random(n) * 1e-4).astype(np.float32)
    grad = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    for block in range(0, n - 15, 16):
        special = slice(block, block + 16)
        max_exp_avg_sq[special] = np.roll(SPECIALS, block // 16)
        grad[special] = 0.0
        exp_avg_sq[special] = 0.0
    return param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq


def test_adam_with_special_second_moments_in_every_vector_group():
    n = 64 * 16 + 5
    kwargs = dict(step=10**6, lr=1e-3, betas=(0.9, 0.999), eps=0.0, amsgrad=True)  # eps 0: v = 0 gives inf/NaN in both
    for isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        param, grad, *state = special_step_inputs(np.random.default_rng(3), n)
        want, got = [param.copy(), *(a.copy() for a in state)], [param.copy(), *(a.copy() for a in state)]
        with np.errstate(all="ignore"):
            reference.adam_step(want[0], grad, want[1], want[2], max_exp_avg_sq=want[3], **kwargs)
            fastadam.adam_step(got[0], grad, got[1], got[2], max_exp_avg_sq=got[3], **kwargs)
        for name, g, w in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, want):
            assert (difference := nan_blind_difference(g, w)) is None, f"{isa} {name}: {difference}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the exception flags through glibc")
def test_no_invalid_operation_flag_where_the_ieee_root_raises_none():
    # sqrt(0), sqrt(inf) and the rest of a step on finite data raise no invalid-operation
    # flag; the FMA sequence must not either (on 0 or inf it would compute 0 * inf).
    # With eps > 0 and no NaN or inf among the inputs, no path has an invalid operation.
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    fe_invalid = FENV["FE_INVALID"]
    n = 64 * 16 + 5
    for isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = special_step_inputs(np.random.default_rng(4), n)
        max_exp_avg_sq[~np.isfinite(max_exp_avg_sq)] = 0.0
        assert libm.feclearexcept(fe_invalid) == 0
        fastadam.adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq, amsgrad=True, step=3, lr=1e-3)
        assert libm.fetestexcept(fe_invalid) == 0, f"{isa}: a step on finite data raised the invalid-operation flag"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the exception flags through glibc")
@pytest.mark.parametrize(
    "case",
    [
        # L2 decay on zero params: the elements' g is 0, but g = 1 + 1e21 would overflow g*g.
        dict(weight_decay=1e21, param=0.0, grad=0.0, exp_avg=0.0, exp_avg_sq=0.0),
        # An infinite float32 step size: the elements' m is -0.5, but m = 0 would give inf*0.
        dict(maximize=True, betas=(0.5, 0.999), lr=1e39, param=0.0, grad=1.0, exp_avg=0.0, exp_avg_sq=0.0),
    ],
    ids=["overflow", "invalid"],
)
def test_masked_ends_raise_only_the_flags_their_elements_raise(case):
    # The AVX-512 loop takes a range's first and last few elements as one masked vector
    # (lanes.hpp, Lane::load_first); its other lanes are computed too. Whatever they hold,
    # they must not raise a flag the elements do not: every path raises the same
    # invalid-operation, division-by-zero and overflow flags as the baseline one.
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    watched = {"invalid": FENV["FE_INVALID"], "divide-by-zero": FENV["FE_DIVBYZERO"], "overflow": FENV["FE_OVERFLOW"]}
    all_watched = sum(watched.values())
    case = dict(case)
    fill = {name: case.pop(name) for name in ("param", "grad", "exp_avg", "exp_avg_sq")}
    for n in (1, 5, 15, 17, 37, 48, 100):
        raised = {}
        for isa in fastadam.available_isas():
            fastadam.set_isa(isa)
            arrays = {name: np.full(n, value, dtype=np.float32) for name, value in fill.items()}
            assert libm.feclearexcept(all_watched) == 0
            fastadam.adam_step(arrays["param"], arrays["grad"], arrays["exp_avg"], arrays["exp_avg_sq"], step=1, **case)
            flags = libm.fetestexcept(all_watched)
            raised[isa] = sorted(name for name, bit in watched.items() if flags & bit)
        assert all(r == raised["baseline"] for r in raised.values()), f"n={n}: flags by path {raised}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets the rounding mode through glibc's fesetround")
def test_other_rounding_modes_keep_every_path_equal_to_the_reference():
    # The FMA square root is the IEEE one only when rounding to nearest; under another
    # MXCSR rounding mode the loops keep to the divide unit's root (lanes.hpp,
    # rounding_to_nearest). The roots of max_exp_avg_sq below are ones the FMA sequence
    # gets wrong in that mode (found with the unguarded test hook), so a step that
    # took it would differ from the reference. The mode is per thread, so the step
    # stays below the threading threshold.
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    modes = {"downward": FENV["FE_DOWNWARD"], "upward": FENV["FE_UPWARD"], "toward_zero": FENV["FE_TOWARDZERO"]}
    x = np.arange(np.float32(1.0).view(np.uint32), np.float32(4.0).view(np.uint32), dtype=np.uint32).view(np.float32)
    rng = np.random.default_rng(5)
    n = 4096 + 7
    for mode, value in modes.items():
        assert libm.fesetround(value) == 0
        try:
            wrong = x[lane_sqrt_bits(x) != ieee_sqrt_bits(x)] if "avx512" in fastadam.available_isas() else x[:0]
        finally:
            libm.fesetround(FENV["FE_TONEAREST"])
        if "avx512" in fastadam.available_isas():
            assert wrong.size > 100, f"{mode}: the FMA root is right for all of [1, 4): this test checks nothing"
            max_exp_avg_sq = np.resize(wrong, n)
        else:
            max_exp_avg_sq = rng.random(n).astype(np.float32)
        # param starts at 0, so the update's last bit, and with it the root's, shows in param.
        start = [np.zeros(n), rng.standard_normal(n) * 1e-2, rng.random(n) * 1e-4, max_exp_avg_sq]
        grad = (rng.standard_normal(n) * 1e-2).astype(np.float32)
        results = {}
        for isa in (*fastadam.available_isas(), "reference"):
            state = [a.astype(np.float32) for a in start]
            step = reference.adam_step if isa == "reference" else fastadam.adam_step
            if isa != "reference":
                fastadam.set_isa(isa)
            assert libm.fesetround(value) == 0
            try:
                step(state[0], grad, state[1], state[2], max_exp_avg_sq=state[3], amsgrad=True, step=3, lr=1e-3)
            finally:
                libm.fesetround(FENV["FE_TONEAREST"])
            results[isa] = state
        for isa in fastadam.available_isas():
            for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), results[isa], results["reference"]):
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{mode} {isa} {name}"
