"""Blockwise-quantized states (issue 17): 8-bit and 4-bit codes with one absmax per block,
dequantized, updated and quantized in one pass, with the bits of fastadam.reference on
every SIMD path and thread count, at odd sizes and block edges, and with zero blocks,
tiny and huge values, NaN and inf in a block."""

import platform

import ml_dtypes
import numpy as np
import pytest
from conftest import THREADS, first_difference, same_bits

import fastadam
from fastadam import _core, reference
from fastadam.quantized import QUANT_BLOCK, QuantizedState, quantize

ISAS = fastadam.available_isas()
BOOKS = [(8, True), (8, False), (4, True), (4, False)]
bf16 = np.dtype(ml_dtypes.bfloat16)


def states(n, bits):
    return QuantizedState.zeros(n, bits=bits, signed=True), QuantizedState.zeros(n, bits=bits, signed=False)


def copy_state(q):
    return QuantizedState(q.codes.copy(), q.absmax.copy(), q.bits, q.signed)


def same_state(a, b):
    return same_bits(a.codes, b.codes) and same_bits(a.absmax, b.absmax)


# ----- the code books ---------------------------------------------------------------------


@pytest.mark.parametrize("bits,signed", BOOKS)
def test_the_kernels_books_are_the_references(bits, signed):
    values, thresholds = _core.quant_map(bits, signed)
    assert same_bits(values, reference.quant_map(bits, signed))
    assert same_bits(thresholds, reference.quant_thresholds(bits, signed))
    assert values.size == 2**bits and np.all(np.diff(values) > 0) and values[-1] == 1.0
    # each threshold is the smallest float not nearer the lower code: at or past the exact midpoint
    mids = (values[:-1].astype(np.float64) + values[1:]) / 2
    assert np.all(thresholds >= mids)
    below = np.nextafter(thresholds, np.float32(-np.inf)).astype(np.float64)
    assert np.all(below < mids)


def test_the_books_are_the_dynamic_map_and_torchaos_linear_one():
    # the dynamic map has 0, 1, and per decade evenly spaced values (their negatives when signed)
    signed = reference.quant_map(8, True)
    assert signed[0] == -signed[-2] and 0.0 in signed and (signed > 0).sum() == 128 and (signed < 0).sum() == 127
    unsigned = reference.quant_map(8, False)
    assert unsigned[0] == 0.0 and unsigned.min() >= 0 and np.isclose(unsigned[1], 0.325e-6, rtol=1e-6)
    assert np.array_equal(reference.quant_map(4, False), np.arange(1, 17, dtype=np.float32) / 16)
    assert reference.quant_map(4, True).size == 16 and 0.0 in reference.quant_map(4, True)


@pytest.mark.parametrize("bits,signed", BOOKS)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_gives_the_nearest_code(bits, signed, isa):
    # every float in each run of 2^16 bit patterns that holds a threshold, and 1/256 of the rest
    count, first = _core._quantizer_mismatches(bits, signed, isa, 256)  # both loops (bounded: |x| < 2)
    assert count == 0, f"{count} codes differ, first for the float bits {first:#010x}"


@pytest.mark.slow
@pytest.mark.parametrize("bits,signed", BOOKS)
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_every_float_below_2_gets_the_nearest_code_on_the_vector_paths(bits, signed, isa):
    if isa not in ISAS:
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        pytest.skip(f"this CPU has no {isa.upper()}" if x86 else "the x86-64 paths exist only on x86-64")
    # every float with |x| < 2 (all a block's x / absmax can be), every run of 2^16 bit
    # patterns with a threshold, and 1/64 of the rest (huge values, inf, NaN: the table's path)
    count, first = _core._quantizer_mismatches(bits, signed, isa, 1)
    assert count == 0, f"{count} codes differ, first for the float bits {first:#010x}"


@pytest.mark.parametrize("bits,signed", BOOKS)
@pytest.mark.parametrize("isa", ISAS)
def test_special_values_and_ties(bits, signed, isa):
    values, thresholds = _core.quant_map(bits, signed)
    x = np.concatenate([values, thresholds, np.nextafter(thresholds, np.float32(-np.inf)),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 2.0, -2.0, 3e38], np.float32)])
    x = x.astype(np.float32)
    got = np.zeros(x.size, np.uint8)
    _core._quantize_codes(x, got, bits, signed, isa)
    bounded = np.abs(x) < 2
    got_bounded = np.zeros(int(bounded.sum()), np.uint8)
    _core._quantize_codes(x[bounded], got_bounded, bits, signed, isa, True)
    assert np.array_equal(got_bounded, got[bounded])
    want = np.searchsorted(thresholds, x, side="right")
    want[np.isnan(x)] = 2**bits - 1
    assert np.array_equal(got, want)
    # a value exactly at a threshold takes the larger code; a code's own value maps to itself
    assert np.array_equal(got[2**bits : 2**bits + thresholds.size], np.arange(1, 2**bits))
    assert np.array_equal(got[: 2**bits], np.arange(2**bits))


# ----- whole states -----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 255, 256, 257, 1000, 4097])
def test_quantize_and_dequantize_give_the_references_bits(bits, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 5, n))).astype(np.float32)
    for signed in (True, False):
        y = x if signed else np.abs(x)
        q = quantize(y, bits=bits, signed=signed)
        codes, absmax = reference.quantize_blockwise(y, bits, signed)
        assert same_bits(q.codes, codes) and same_bits(q.absmax, absmax)
        assert q.codes.size == (n if bits == 8 else (n + 1) // 2) and q.absmax.size == -(-n // QUANT_BLOCK[bits])
        assert same_bits(q.dequantize(n), reference.dequantize_blockwise(codes, absmax, bits, signed, n))


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_values_are_the_nearest_in_the_book(bits):
    # each value comes back as the book's value nearest to it over its block's absmax
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10 * QUANT_BLOCK[bits]).astype(np.float32)
    for signed, y in ((True, x), (False, x * x)):
        q = quantize(y, bits=bits, signed=signed)
        values = reference.quant_map(bits, signed).astype(np.float64)
        scale = np.repeat(q.absmax, QUANT_BLOCK[bits]).astype(np.float64)
        nearest = np.abs(y[:, None] / scale[:, None] - values[None, :]).min(axis=1) * scale
        rounding = 2 * np.spacing(np.abs(y)).astype(np.float64)  # of the float32 multiply and difference
        assert np.all(np.abs(q.dequantize(y.size).astype(np.float64) - y) <= nearest * (1 + 1e-6) + rounding)


# ----- the step ---------------------------------------------------------------------------

VARIANTS = {
    "adam": {},
    "adamw": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "l2-maximize": {"weight_decay": 0.05, "maximize": True},
    "beta1-low": {"betas": (0.3, 0.99), "weight_decay": 0.1},
}
# (param dtype, grad dtype, param_out dtype, extra keywords): the mixed-precision modes
MODES = {
    "fp32": (np.float32, np.float32, None, {}),
    "bf16-grads": (np.float32, bf16, None, {}),
    "master-bf16-out": (np.float32, bf16, bf16, {"grad_scale": 1024.0, "max_grad_norm": 0.5}),
    "bf16-params": (bf16, bf16, None, {}),
    "f16-params-clip": (np.float16, np.float16, None, {"max_grad_norm": 0.5}),
}
SIZES = [1, 129, 256, 257, 1023, 70001]


def gradient(rng, n, dtype, special=False):
    g = rng.standard_normal(n) * np.exp(rng.uniform(-12, 3, n))
    if special and n >= 600:
        g[:256] = 0.0               # a zero block (8-bit) / two (4-bit)
        g[300:310] = 1e-40          # subnormals
        g[310:320] = 3e30           # huge: g*g overflows to inf in exp_avg_sq
        g[400] = np.inf
        g[520] = np.nan
    return g.astype(dtype)


def run_steps(step_multi, bits, n, mode, hyper, steps=3, special=False):
    param_dtype, grad_dtype, out_dtype, extra = MODES[mode]
    rng = np.random.default_rng(n + bits)
    param = rng.standard_normal(n).astype(param_dtype)
    m, v = states(n, bits)
    out = None if out_dtype is None else np.zeros(n, out_dtype)
    norms = []
    for t in range(1, steps + 1):
        g = gradient(rng, n, grad_dtype, special and t == 2)
        kw = {"lr": 0.01, **hyper, **extra}
        norms.append(step_multi([param], [g], [m], [v], steps=t, params_out=None if out is None else [out], **kw))
    return param, m, v, out, norms


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_steps_give_the_references_bits_on_every_path_and_thread_count(bits, variant, mode):
    for n in SIZES:
        want = run_steps(reference.adam_step_multi, bits, n, mode, VARIANTS[variant])
        for isa in ISAS:
            fastadam.set_isa(isa)
            for threads in THREADS:
                fastadam.set_num_threads(threads)
                got = run_steps(fastadam.adam_step_multi, bits, n, mode, VARIANTS[variant])
                where = f"n={n} {isa} threads={threads}"
                assert same_bits(got[0], want[0]), f"param, {where}: {first_difference(got[0], want[0])}"
                assert same_state(got[1], want[1]) and same_state(got[2], want[2]), f"states, {where}"
                if want[3] is not None:
                    assert same_bits(got[3], want[3]), f"param_out, {where}"
                assert [x if x is None else np.float64(x).tobytes() for x in got[4]] == \
                       [x if x is None else np.float64(x).tobytes() for x in want[4]]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
def test_zero_tiny_huge_nan_and_inf_in_a_block(bits):
    n = 2000
    want = run_steps(reference.adam_step_multi, bits, n, "fp32", {}, special=True)
    # the NaN and inf of step 2 poison their blocks (absmax NaN) and only those
    block = QUANT_BLOCK[bits]
    assert np.isnan(want[1].absmax[400 // block]) and np.isnan(want[1].absmax[520 // block])
    assert np.isfinite(want[1].absmax[(1000 // block)])
    for isa in ISAS:
        fastadam.set_isa(isa)
        for threads in THREADS:
            fastadam.set_num_threads(threads)
            got = run_steps(fastadam.adam_step_multi, bits, n, "fp32", {}, special=True)
            assert same_bits(got[0], want[0]) and same_state(got[1], want[1]) and same_state(got[2], want[2]), (isa, threads)


@pytest.mark.parametrize("bits", [8, 4])
def test_many_tensors_split_across_threads_at_block_edges(bits):
    # tensors whose sizes put the threads' units on every kind of boundary
    sizes = [300_000, 129, 70_001, 256 * 1000 + 1, 5]
    rng = np.random.default_rng(3)
    def make():
        r = np.random.default_rng(4)
        ps = [r.standard_normal(n).astype(np.float32) for n in sizes]
        ss = [states(n, bits) for n in sizes]
        return ps, ss
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    want_p, want_s = make()
    for t in (1, 2):
        reference.adam_step_multi(want_p, grads, [s[0] for s in want_s], [s[1] for s in want_s], steps=t, lr=1e-3)
    for isa in ISAS:
        fastadam.set_isa(isa)
        for threads in THREADS:
            fastadam.set_num_threads(threads)
            ps, ss = make()
            for t in (1, 2):
                fastadam.adam_step_multi(ps, grads, [s[0] for s in ss], [s[1] for s in ss], steps=t, lr=1e-3)
            for k in range(len(sizes)):
                assert same_bits(ps[k], want_p[k]) and same_state(ss[k][0], want_s[k][0]) and same_state(ss[k][1], want_s[k][1]), (isa, threads, k)


def test_one_step_error_is_within_the_books_resolution():
    # against the float32 state of the same step: the quantized moments lie within half a code gap
    n = 4096
    rng = np.random.default_rng(5)
    g = rng.standard_normal(n).astype(np.float32)
    p_q, p_f = (np.ones(n, np.float32) for _ in range(2))
    m, v = states(n, 8)
    mf, vf = np.zeros(n, np.float32), np.zeros(n, np.float32)
    fastadam.adam_step_multi([p_q], [g], [m], [v], steps=1, lr=1e-3)
    fastadam.adam_step_multi([p_f], [g], [mf], [vf], steps=1, lr=1e-3)
    assert same_bits(p_q, p_f)  # the first update uses the float moments, before quantization
    for q, f in ((m, mf), (v, vf)):
        values = reference.quant_map(8, q.signed).astype(np.float64)
        scale = np.repeat(q.absmax, 256).astype(np.float64)
        nearest = np.abs(f[:, None] / scale[:, None] - values[None, :]).min(axis=1) * scale
        got = q.dequantize(n).astype(np.float64)
        assert np.all(np.abs(got - f) <= nearest * (1 + 1e-6) + 2 * np.spacing(np.abs(f)))
        assert np.all(np.abs(got - f) <= 0.0071 * scale)  # the book's largest half gap, 0.0070 of absmax
        assert np.corrcoef(got, f)[0, 1] > 0.9999


# ----- bad input --------------------------------------------------------------------------


def snapshot(*arrays):
    return [a.copy() for a in arrays]


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda m, v: (m._replace(codes=m.codes.astype(np.int8)), v), TypeError, r"exp_avgs\[1\]\.codes has dtype int8"),
        (lambda m, v: (m._replace(absmax=m.absmax[:-1]), v), ValueError, r"exp_avgs\[1\]\.absmax has 3 elements .* has 4"),
        (lambda m, v: (m, v._replace(codes=np.zeros(500, np.uint8))), ValueError, r"exp_avg_sqs\[1\]\.codes has 500 elements"),
        (lambda m, v: (m._replace(signed=False), v), ValueError, r"signed=False; exp_avg takes the signed book"),
        (lambda m, v: (m, QuantizedState.zeros(1000, bits=4, signed=False)), ValueError, r"8-bit codes but exp_avg_sqs\[1\] 4-bit"),
        (lambda m, v: (m._replace(bits=6), v), ValueError, r"bits=6"),
        (lambda m, v: (m, np.zeros(1000, np.float32)), TypeError, r"both quantized"),
        (lambda m, v: (m._replace(codes=np.zeros((1000, 2), np.uint8)[:, 0]), v), ValueError, r"not C-contiguous"),
        (lambda m, v: (m._replace(absmax=np.zeros(4, np.float64)), v), TypeError, r"absmax has dtype float64"),
    ],
)
def test_bad_quantized_states_raise_and_write_nothing(change, error, match):
    n = 1000
    param, grad = np.ones(n, np.float32), np.ones(n, np.float32)
    m, v = states(n, 8)
    m.absmax[:] = 1.0
    m2, v2 = change(m, v)
    before = snapshot(param, m.codes, m.absmax, v.codes, v.absmax)
    ok_param, ok_m, ok_v = np.ones(n, np.float32), *states(n, 8)
    with pytest.raises(error, match=match):
        fastadam.adam_step_multi([ok_param, param], [grad, grad], [ok_m, m2], [ok_v, v2], steps=1)
    for a, b in zip(before, (param, m.codes, m.absmax, v.codes, v.absmax)):
        assert same_bits(a, b)
    assert np.all(ok_param == 1.0) and not ok_m.absmax.any()  # the valid tensor was not written either


def test_a_state_of_another_block_size_is_refused():
    n = 1024
    m, v = states(n, 8)
    other_block = QuantizedState(m.codes, np.zeros(n // 128, np.float32), 8, True)  # 128-element blocks
    with pytest.raises(ValueError, match="another size or block size"):
        fastadam.adam_step(np.ones(n, np.float32), np.ones(n, np.float32), other_block, v, step=1)


def test_quantized_states_refuse_amsgrad_float64_and_overlaps():
    n = 512
    m, v = states(n, 8)
    with pytest.raises(ValueError, match="amsgrad"):
        fastadam.adam_step_multi([np.ones(n, np.float32)], [np.ones(n, np.float32)], [m], [v], steps=1, amsgrad=True,
                                 max_exp_avg_sqs=[np.zeros(n, np.float32)])
    with pytest.raises(TypeError, match="float64"):
        fastadam.adam_step(np.ones(n), np.ones(n), m, v, step=1)
    shared = QuantizedState(m.codes, v.absmax, 8, True)  # exp_avg's absmax is exp_avg_sq's
    with pytest.raises(ValueError, match="share memory"):
        fastadam.adam_step(np.ones(n, np.float32), np.ones(n, np.float32), shared, v, step=1)
    read_only = m.codes.copy()
    read_only.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        fastadam.adam_step(np.ones(n, np.float32), np.ones(n, np.float32), m._replace(codes=read_only), v, step=1)


def test_memory_per_parameter():
    n = 1_000_000
    for bits, most in ((8, 2.1), (4, 1.1)):
        m, v = states(n, bits)
        assert (m.nbytes + v.nbytes) / n <= most
