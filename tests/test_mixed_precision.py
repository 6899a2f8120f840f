"""Mixed precision (issue 16): bfloat16/float16 params, grads and states, a low-precision
copy out, loss scaling and global-norm clipping give the bits of fastadam.reference on
every SIMD path and thread count."""

import ctypes
import ctypes.util
import sys

import ml_dtypes
import numpy as np
import pytest
from conftest import THREADS, first_difference, same_bits

import fastadam
from fastadam import _core, reference

FENV = _core._fenv  # this platform's <fenv.h> values

bf16 = np.dtype(ml_dtypes.bfloat16)
f16 = np.dtype(np.float16)
f32 = np.dtype(np.float32)

# (param, grad, states, param_out): every pairing adam_step accepts besides all-float32/64.
COMBOS = {
    "master-bf16": (f32, bf16, f32, bf16),
    "master-f16": (f32, f16, f32, f16),
    "f32-bf16-states": (f32, f32, bf16, None),
    "f32-out-bf16": (f32, f32, f32, bf16),
    "bf16-f32-states": (bf16, bf16, f32, None),
    "all-bf16": (bf16, bf16, bf16, None),
    "f16-f32-states": (f16, f16, f32, None),
    "all-f16": (f16, f16, f16, None),
    "f32-scaled": (f32, f32, f32, None),
}
# grad_scale 1024 is a power of two (the kernel multiplies by its reciprocal, same bits),
# 3 is not (it divides); max_grad_norm 0.5 clips these gradients, 1e30 does not.
MODES = {
    "plain": {},
    "scale-pow2": {"grad_scale": 1024.0},
    "scale-3": {"grad_scale": 3.0},
    "clip": {"max_grad_norm": 0.5},
    "scale-clip": {"grad_scale": 1024.0, "max_grad_norm": 0.5},
    "no-clip": {"max_grad_norm": 1e30},
}
VARIANTS = {
    "adam": {},
    "adamw": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "amsgrad-l2-maximize": {"amsgrad": True, "weight_decay": 0.05, "maximize": True},
    "beta1-low-l2": {"betas": (0.3, 0.999), "weight_decay": 0.1},
}
SIZES = [1, 17, 4099, 200003]  # vector tails, norm blocks of 4096, past the one-thread threshold


def buf(values, dtype, offset):
    base = np.empty(values.size + offset, dtype=dtype)
    view = base[offset:]
    view[...] = values.astype(dtype)
    return view


def make_case(rng, n, combo, offset, grad_scale=1.0, steps=2):
    param_dtype, grad_dtype, state_dtype, out_dtype = combo
    state = {
        "param": buf(rng.standard_normal(n), param_dtype, offset),
        "exp_avg": buf(rng.standard_normal(n) * 0.1, state_dtype, offset),
        "exp_avg_sq": buf(rng.random(n) * 0.01, state_dtype, offset),
        "max_exp_avg_sq": buf(rng.random(n) * 0.02, state_dtype, offset),
    }
    if out_dtype is not None:
        state["param_out"] = buf(np.zeros(n), out_dtype, offset)
    grads = [buf(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 2, n) * grad_scale, grad_dtype, offset) for _ in range(steps)]
    return state, grads


def run(step_multi, state, grads, kwargs):
    """Steps through step_multi on the state, two tensors (the state split in two) per step."""
    kwargs = {"lr": 0.01, **kwargs}
    norms = []
    cut = state["param"].size // 3
    parts = [{k: v[:cut] for k, v in state.items()}, {k: v[cut:] for k, v in state.items()}]
    for t, grad in enumerate(grads, start=1):
        norms.append(
            step_multi(
                [p["param"] for p in parts], [grad[:cut], grad[cut:]], [p["exp_avg"] for p in parts],
                [p["exp_avg_sq"] for p in parts], steps=t,
                max_exp_avg_sqs=[p["max_exp_avg_sq"] for p in parts] if kwargs.get("amsgrad") else None,
                params_out=[p["param_out"] for p in parts] if "param_out" in state else None, **kwargs,
            )
        )
    return norms


def assert_same_state(got, want, where):
    for name in want:
        if name == "max_exp_avg_sq" and not where.get("amsgrad"):
            continue
        assert same_bits(got[name], want[name]), f"{name} {where}: {first_difference(got[name], want[name])}"


# (all-float32 without grad checks is test_exactness's case)
@pytest.mark.parametrize("combo, mode", [(c, m) for c in COMBOS for m in MODES if (c, m) != ("f32-scaled", "plain")])
def test_mixed_precision_bit_identical_on_every_isa_and_thread_count(combo, mode):
    modes = MODES[mode]
    rng = np.random.default_rng(16)
    for variant, hyper in VARIANTS.items():
        kwargs = {**hyper, **modes}
        for n in SIZES:
            for offset in (0, 1):
                state0, grads = make_case(rng, n, COMBOS[combo], offset, modes.get("grad_scale", 1.0))
                expected = {k: v.copy() for k, v in state0.items()}
                want_norms = run(reference.adam_step_multi, expected, grads, kwargs)
                for isa in fastadam.available_isas():
                    fastadam.set_isa(isa)
                    for threads in THREADS:
                        fastadam.set_num_threads(threads)
                        state = {k: v.copy() for k, v in state0.items()}
                        got_norms = run(fastadam.adam_step_multi, state, grads, kwargs)
                        where = {"variant": variant, "n": n, "offset": offset, "isa": isa, "threads": threads, **kwargs}
                        assert got_norms == want_norms, where
                        assert_same_state(state, expected, where)


def test_returns_norm_only_with_grad_checks():
    rng = np.random.default_rng(0)
    state, grads = make_case(rng, 1000, COMBOS["master-bf16"], 0, steps=1)
    assert run(fastadam.adam_step_multi, state, grads, {}) == [None]
    norm = run(fastadam.adam_step_multi, state, grads, {"max_grad_norm": 1.0})[0]
    g = grads[0].astype(np.float64)
    assert norm == pytest.approx(float(np.sqrt(np.sum(g * g))), rel=1e-12)


def test_values_rounding_to_subnormal_inf_and_nan():
    # From zero moments the first step moves each param by about lr against its
    # gradient's sign: lr = 2.5 subnormal units lands updates on the narrow dtype's
    # subnormals, lr = 1% of its largest finite value pushes the largest past it (inf);
    # inf and NaN params and a NaN gradient (grad checks off: it flows through, as in torch).
    for combo in ("all-bf16", "all-f16", "master-f16", "master-bf16", "bf16-f32-states", "f16-f32-states"):
        param_dtype, grad_dtype, state_dtype, out_dtype = COMBOS[combo]
        narrow = out_dtype or param_dtype
        tiny, big = float(ml_dtypes.finfo(narrow).smallest_subnormal), float(ml_dtypes.finfo(narrow).max)
        values = np.array([tiny * 3, tiny, 0.0, -0.0, -tiny * 2, big, -big, big * 0.996, np.nan, np.inf, -np.inf] * 3)
        signs = np.array([1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0, np.nan] * 3)
        for lr, special in ((tiny * 2.5, lambda a: (a != 0) & (np.abs(a) < ml_dtypes.finfo(narrow).smallest_normal)),
                            (big * 0.01, np.isinf)):
            state0, grads = make_case(np.random.default_rng(1), values.size, COMBOS[combo], 1, steps=1)
            state0["param"][...] = values.astype(param_dtype)
            state0["exp_avg"][...] = 0
            state0["exp_avg_sq"][...] = 0
            grads[0][...] = signs.astype(grad_dtype)
            expected = {k: v.copy() for k, v in state0.items()}
            with np.errstate(all="ignore"):
                run(reference.adam_step_multi, expected, grads, {"lr": lr})
                result = expected["param_out" if out_dtype else "param"].astype(np.float32)
                assert special(result).sum() >= 3, (combo, lr, result)
                for isa in fastadam.available_isas():
                    fastadam.set_isa(isa)
                    state = {k: v.copy() for k, v in state0.items()}
                    run(fastadam.adam_step_multi, state, grads, {"lr": lr})
                    assert_same_state(state, expected, {"combo": combo, "isa": isa, "lr": lr})


def test_narrowing_matches_ml_dtypes_and_numpy_on_every_float_class():
    # Every store rounds as ml_dtypes (bfloat16) and NumPy (float16) do: a float32 param
    # with a bf16/f16 param_out and lr=0 copies the param out, rounded, whatever it holds
    # (bits from every class of float: normal, subnormal, inf, NaN payloads, ties).
    rng = np.random.default_rng(2)
    bits = np.concatenate([
        rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32),  # every class, NaN payloads included
        np.arange(0x33000000, 0x33800000, 977, dtype=np.uint32),  # f16 subnormal range
        np.array([0x477FF000, 0x477FEFFF, 0x477FF001, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00800000, 0x00000001], dtype=np.uint32),
    ])
    # The update's arithmetic quiets a signalling NaN (as the reference's NumPy does), then the store narrows it.
    values = np.where(np.isnan(bits.view(np.float32)), bits | 0x00400000, bits).view(np.float32)
    for out_dtype in (bf16, f16):
        param = values.copy()
        out = np.zeros(values.size, dtype=out_dtype)
        for isa in fastadam.available_isas():
            fastadam.set_isa(isa)
            with np.errstate(all="ignore"):
                fastadam.adam_step(param.copy(), np.zeros_like(param), np.zeros_like(param), np.zeros_like(param), step=1, lr=0.0,
                                   param_out=out)
                want = values.astype(out_dtype)
            assert same_bits(out, want), f"{out_dtype} {isa}: {first_difference(out, want)}"


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("mode", ["scale-pow2", "clip"])
def test_non_finite_gradient_skips_the_whole_step(bad, mode):
    rng = np.random.default_rng(3)
    state0, grads = make_case(rng, 5000, COMBOS["master-bf16"], 0, steps=1)
    grads[0][4321] = bad  # in the second tensor: the first must not be written either
    for isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        state = {k: v.copy() for k, v in state0.items()}
        norms = run(fastadam.adam_step_multi, state, grads, MODES[mode])
        assert not np.isfinite(norms[0])
        assert_same_state(state, state0, {"isa": isa, "amsgrad": True})


def test_clipping_is_torchs_coefficient():
    # max_grad_norm clips exactly as torch.nn.utils.clip_grad_norm_ followed by Adam would
    # (coefficient max_norm / (norm + 1e-6), applied only when below 1), through the
    # reference, which spells it out.
    rng = np.random.default_rng(4)
    state, grads = make_case(rng, 3000, COMBOS["f32-scaled"], 0, steps=1)
    clipped = {k: v.copy() for k, v in state.items()}
    norm = run(fastadam.adam_step_multi, clipped, grads, {"max_grad_norm": 0.25})[0]
    g = grads[0].astype(np.float64)
    assert norm == pytest.approx(float(np.sqrt(np.sum(g * g))), rel=1e-12)
    by_hand = {k: v.copy() for k, v in state.items()}
    scaled = [(grads[0] * np.float32(0.25 / (norm + 1e-6))).astype(np.float32)]
    run(reference.adam_step_multi, by_hand, scaled, {})
    assert_same_state(clipped, by_hand, {})


def _master(n=64):
    rng = np.random.default_rng(5)
    state, grads = make_case(rng, n, COMBOS["master-bf16"], 0, steps=1)
    return state, grads[0]


BAD_CALLS = {
    # name: (keyword changes to a valid master-weights call, exception, what the message says)
    "param_out float32": (lambda s: {"param_out": np.zeros_like(s["param"])}, TypeError, r"param_out has dtype float32"),
    "param_out shape": (lambda s: {"param_out": np.zeros(s["param"].size - 1, bf16)}, ValueError, r"param_out has shape"),
    "param_out overlaps param": (lambda s: {"param_out": s["param"].view(bf16)[: s["param"].size]}, ValueError, r"overlap"),
    "param_out overlaps exp_avg": (lambda s: {"param_out": s["exp_avg"].view(bf16)[1 : s["param"].size + 1]}, ValueError, r"overlap"),
    "param_out read-only": (lambda s: {"param_out": np.broadcast_to(s["param_out"].copy(), s["param"].shape)}, ValueError, r"writeable"),
    "param_out strided": (lambda s: {"param_out": np.zeros(2 * s["param"].size, bf16)[::2]}, ValueError, r"contiguous"),
    "grad_scale zero": (lambda s: {"grad_scale": 0.0}, ValueError, r"grad_scale must be a finite number > 0"),
    "grad_scale nan": (lambda s: {"grad_scale": float("nan")}, ValueError, r"grad_scale must be a finite number > 0"),
    "grad_scale str": (lambda s: {"grad_scale": "2"}, TypeError, r"grad_scale must be a real number"),
    "grad_scale past float32": (lambda s: {"grad_scale": 1e300}, ValueError, r"grad_scale must be a positive finite float32 number"),
    "bf16 states for f16 grads": (lambda s: {"grad": s["grad"].astype(f16), "exp_avg": s["exp_avg"].astype(f16),
                                             "exp_avg_sq": s["exp_avg_sq"].astype(f16)}, TypeError, r"state"),  # fmt: skip
    "f32 grad of bf16 param": (lambda s: {"param": s["param"].astype(bf16), "param_out": None}, TypeError, r"a gradient has its param's dtype"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_mixed_precision_input_writes_nothing(case):
    state, grad = _master()
    change, exc, message = BAD_CALLS[case]
    args = {"param": state["param"], "grad": grad, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
            "param_out": state["param_out"]}  # fmt: skip
    args.update(change({**state, "grad": grad}))
    if case == "f32 grad of bf16 param":
        args["grad"] = grad.astype(f32)
    passed = [(a, a.copy()) for a in [*args.values(), *state.values()] if isinstance(a, np.ndarray)]
    with pytest.raises(exc, match=message) as info:
        fastadam.adam_step(args.pop("param"), args.pop("grad"), args.pop("exp_avg"), args.pop("exp_avg_sq"), step=1, **args)
    assert "adam_step()" in str(info.value)
    for array, before in passed:
        assert same_bits(array, before), f"{case}: an array was written"


def test_bad_multi_arguments():
    state, grad = _master()
    call = lambda **kw: fastadam.adam_step_multi([state["param"]], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], steps=1, **kw)  # noqa: E731
    for kw, exc, message in [
        ({"max_grad_norm": -1.0}, ValueError, r"max_grad_norm must be a finite number > 0"),
        ({"max_grad_norm": float("inf")}, ValueError, r"max_grad_norm must be a finite number > 0"),
        ({"params_out": [None, None]}, ValueError, r"params_out has 2 entries but params has 1"),
        ({"params_out": state["param_out"]}, TypeError, r"params_out"),
    ]:
        before = state["param"].copy()
        with pytest.raises(exc, match=message):
            call(**kw)
        assert same_bits(state["param"], before)
    p64 = [np.zeros(8)] * 1
    with pytest.raises(TypeError, match=r"float64; grad_scale and max_grad_norm work on float32"):
        fastadam.adam_step_multi([np.zeros(8)], [np.zeros(8)], [np.zeros(8)], [np.zeros(8)], steps=1, max_grad_norm=1.0)
    del p64


@pytest.mark.parametrize("mode", ["scale-clip", "clip"])
def test_empty_tensors_and_bf16_offsets_in_the_norm_and_step(mode):
    # Zero-size tensors among others (the norm pass's blocks skip them), bf16 arrays
    # starting at every 2-byte offset within a 32-byte half line (the peel's range).
    combo = COMBOS["master-bf16"]
    sizes = [0, 5000, 0, 4096, 1, 0, 300]
    rng = np.random.default_rng(6)
    for offset in (0, 3, 9, 15):
        tensors = [make_case(rng, n, combo, offset, MODES[mode].get("grad_scale", 1.0), steps=1) for n in sizes]
        runs = []
        for step_multi in (reference.adam_step_multi, fastadam.adam_step_multi):
            for isa in fastadam.available_isas() if step_multi is fastadam.adam_step_multi else ["reference"]:
                if isa != "reference":
                    fastadam.set_isa(isa)
                state = [{k: v.copy() for k, v in s.items()} for s, _ in tensors]
                norm = step_multi([s["param"] for s in state], [g[0] for _, g in tensors], [s["exp_avg"] for s in state],
                                  [s["exp_avg_sq"] for s in state], steps=1, lr=0.01, params_out=[s["param_out"] for s in state],
                                  **MODES[mode])  # fmt: skip
                runs.append((isa, norm, state))
        _, want_norm, want = runs[0]
        for isa, norm, state in runs[1:]:
            assert norm == want_norm, (isa, offset)
            for k, (got_tensor, want_tensor) in enumerate(zip(state, want)):
                assert_same_state(got_tensor, want_tensor, {"isa": isa, "offset": offset, "tensor": k})


@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16", "float16"])
def test_grad_sq_block_sums_are_the_norm_pass_in_parts(grad_dtype):
    # _core._grad_sq_block_sums (fastadam.distributed's norm): one sum per block of 4096
    # elements of each tensor; added in order from 0.0, they are grad_sq_sum's bits on
    # every path and thread count, and pieces cut on multiples of 4096 give the same blocks.
    dtype = ml_dtypes.bfloat16 if grad_dtype == "bfloat16" else np.dtype(grad_dtype)
    rng = np.random.default_rng(11)
    sizes = [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 70000]
    grads = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(dtype) for n in sizes]
    for grad_scale in (None, 3.0, 1024.0):
        want = reference.grad_sq_sum(grads, grad_scale)
        first = None
        for isa in fastadam.available_isas():
            fastadam.set_isa(isa)
            for threads in THREADS:
                fastadam.set_num_threads(threads)
                sums = _core._grad_sq_block_sums(grads, grad_scale)
                assert sums.dtype == np.float64 and sums.shape == (sum(-(-n // 4096) for n in sizes),)
                total = 0.0
                for s in sums:
                    total += float(s)
                assert total == want, (isa, threads, grad_scale)
                first = sums if first is None else first
                assert same_bits(sums, first), (isa, threads)
        pieces = [g[a:b] for g in grads for a, b in ((0, 4096), (4096, 3 * 4096), (3 * 4096, None)) if g[a:b].size]
        assert same_bits(_core._grad_sq_block_sums(pieces, grad_scale), first)
    with pytest.raises(TypeError, match=r"grads\[0\] is float64"):
        _core._grad_sq_block_sums([np.zeros(3)])
    with pytest.raises(ValueError, match=r"grad_scale must be a finite number > 0"):
        _core._grad_sq_block_sums(grads, 0.0)
    with pytest.raises(ValueError, match=r"grads\[0\] is not C-contiguous"):
        _core._grad_sq_block_sums([np.zeros(8, np.float32)[::2]])


def _f16_rounding_cases():
    # Every float whose exponent reaches float16 (subnormal grid to overflow), with every
    # pattern of the 13 bits a narrowing drops (ties included) under 8 of the kept 10;
    # and every NaN payload, quieted as the update's arithmetic quiets it.
    low = np.arange(1 << 13, dtype=np.uint32)
    high = np.array([0, 1, 2, 0x155, 0x2AA, 0x3FD, 0x3FE, 0x3FF], dtype=np.uint32) << 13
    exponents = np.arange(0x66, 0x90, dtype=np.uint32) << 23
    grid = (exponents[:, None, None] | high[None, :, None] | low[None, None, :]).ravel()
    nans = (np.uint32(0x7F800000) | np.arange(1, 1 << 23, dtype=np.uint32)) | np.uint32(0x00400000)
    bits = np.concatenate([grid, nans, np.array([0, 0x7F800000, 0x00000001, 0x007FFFFF], dtype=np.uint32)])
    return np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)


@pytest.mark.slow
def test_float16_narrowing_is_numpys_on_every_path_for_every_rounding_pattern():
    values = _f16_rounding_cases()
    with np.errstate(all="ignore"):
        want = values.astype(np.float16)
    zeros = np.zeros_like(values)
    for isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        out = np.zeros(values.size, dtype=np.float16)
        with np.errstate(all="ignore"):
            fastadam.adam_step(values.copy(), zeros, zeros.copy(), zeros.copy(), step=1, lr=0.0, param_out=out)
        assert same_bits(out, want), f"{isa}: {first_difference(out, want)}"


def test_every_float16_param_survives_a_step_of_lr_0_on_every_path():
    # Each of the 65536 halves is widened, updated by nothing and narrowed back: every
    # path gives it back (a signalling NaN quieted, as the reference's arithmetic does).
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exp, mant = halves & 0x7C00, halves & 0x03FF
    want = np.where((exp == 0x7C00) & (mant != 0), halves | 0x0200, halves).view(np.float16)
    for isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        param = halves.view(np.float16).copy()
        zeros = np.zeros(param.size, dtype=np.float32)
        with np.errstate(all="ignore"):
            fastadam.adam_step(param, np.zeros_like(param), zeros, zeros.copy(), step=1, lr=0.0)
        assert same_bits(param, want), f"{isa}: {first_difference(param, want)}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets the rounding mode through glibc's fesetround")
def test_float16_narrowing_rounds_to_nearest_even_in_any_rounding_mode():
    # NumPy's float16 conversion is integer arithmetic, to nearest even whatever the mode;
    # every path's is too (a float addition once rounded subnormal halves the mode's way).
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    values = _f16_rounding_cases()
    values = values[np.abs(values) < 2.0**-13]  # subnormal halves and their neighbours
    with np.errstate(all="ignore"):
        want = values.astype(np.float16)
    zeros = np.zeros_like(values)
    for mode in (FENV["FE_DOWNWARD"], FENV["FE_UPWARD"], FENV["FE_TOWARDZERO"]):
        for isa in fastadam.available_isas():
            fastadam.set_isa(isa)
            out = np.zeros(values.size, dtype=np.float16)
            assert libm.fesetround(mode) == 0
            try:
                fastadam.adam_step(values.copy(), zeros, zeros.copy(), zeros.copy(), step=1, lr=0.0, param_out=out)
            finally:
                libm.fesetround(FENV["FE_TONEAREST"])
            assert same_bits(out, want), f"mode {mode:#x}, {isa}: {first_difference(out, want)}"
