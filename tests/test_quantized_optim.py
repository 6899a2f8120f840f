"""fastadam.Adam8bit / AdamW8bit / Adam4bit / AdamW4bit (issue 17): the optimizer classes over
blockwise-quantized states. Their steps against fastadam.reference.adam_step_multi on
QuantizedState states (bits, on every path and thread count, in every mixed-precision mode),
the state layout and its placement, state_dict round trips, the conversion calls, bad input
(nothing changed), and the guarantees every fastadam optimizer gives."""

import copy
import pickle

import ml_dtypes
import numpy as np
import pytest
from conftest import THREADS, first_difference, same_bits

import fastadam
from fastadam import reference
from fastadam._common import state_stagger
from fastadam.quantized import QUANT_BLOCK, QuantizedState

ISAS = fastadam.available_isas()
BF16 = np.dtype(ml_dtypes.bfloat16)
CLASSES = {8: (fastadam.Adam8bit, fastadam.AdamW8bit), 4: (fastadam.Adam4bit, fastadam.AdamW4bit)}
MIN_KEYWORD = {8: "min_8bit_size", 4: "min_4bit_size"}
# 4096 and (65, 129) at and past the threshold, 70001 across threads' units and blocks;
# 4095, 257 and 3 below it (float32 states).
SHAPES = [(4096,), (65, 129), (4095,), (257,), (70001,), (3,)]
# name -> (param dtype, grad dtype, optimizer keywords, step keywords): mixed-precision modes
MODES = {
    "fp32": (np.float32, np.float32, {}, {}),
    "bf16-grads-scaled-clipped": (np.float32, BF16, {"max_grad_norm": 0.5}, {"grad_scale": 1024.0}),
    "params-out": (np.float32, np.float32, {}, {"params_out": True}),
    "bf16-master": (BF16, BF16, {"master_weights": True}, {}),
    "bf16-stochastic": (BF16, BF16, {"stochastic_rounding": True}, {}),
}


def make_params(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]


def make_grads(shapes, dtype, step, scale=1.0):
    rng = np.random.default_rng(100 + step)
    return [(rng.standard_normal(s) * np.exp(rng.uniform(-8, 2, s)) * scale).astype(np.float32).astype(dtype) for s in shapes]


def run_class(bits, decoupled, mode, shapes, min_size, steps=3):
    param_dtype, grad_dtype, opt_kw, step_kw = MODES[mode]
    params = make_params(shapes, param_dtype)
    cls = CLASSES[bits][decoupled]
    opt = cls(params, lr=0.01, **({} if decoupled else {"weight_decay": 0.05}), **{MIN_KEYWORD[bits]: min_size}, **opt_kw)
    outs = [np.zeros(s, BF16) for s in shapes] if step_kw.get("params_out") else None
    norms = []
    for t in range(1, steps + 1):
        grads = make_grads(shapes, grad_dtype, t, step_kw.get("grad_scale", 1.0))
        norms.append(opt.step(grads, grad_scale=step_kw.get("grad_scale"), params_out=outs))
    return params, opt, outs, norms


def run_reference(bits, decoupled, mode, shapes, min_size, steps=3):
    """What the class must do, in plain NumPy: QuantizedState moments for params of at least
    min_size elements, float32 ones below; fp32 masters and the bf16 params as params_out."""
    param_dtype, grad_dtype, opt_kw, step_kw = MODES[mode]
    params = make_params(shapes, param_dtype)
    master = opt_kw.get("master_weights", False)
    work = [p.astype(np.float32) for p in params] if master else params
    outs = params if master else ([np.zeros(s, BF16) for s in shapes] if step_kw.get("params_out") else None)
    n = [int(np.prod(s)) for s in shapes]
    m = [QuantizedState.zeros(k, bits=bits, signed=True) if k >= min_size else np.zeros(s, np.float32) for k, s in zip(n, shapes)]
    v = [QuantizedState.zeros(k, bits=bits, signed=False) if k >= min_size else np.zeros(s, np.float32) for k, s in zip(n, shapes)]
    hyper = {"weight_decay": 0.01, "decoupled_weight_decay": True} if decoupled else {"weight_decay": 0.05}
    seeds = list(range(len(shapes))) if opt_kw.get("stochastic_rounding") else None
    norms = []
    for t in range(1, steps + 1):
        grads = make_grads(shapes, grad_dtype, t, step_kw.get("grad_scale", 1.0))
        norms.append(reference.adam_step_multi(
            work, grads, m, v, steps=t, lr=0.01, **hyper, params_out=outs, grad_scale=step_kw.get("grad_scale"),
            max_grad_norm=opt_kw.get("max_grad_norm"), rounding_seeds=seeds))
    return params, work, m, v, outs, norms


def check_same(bits, decoupled, mode, shapes, min_size, where):
    got_params, opt, got_outs, got_norms = run_class(bits, decoupled, mode, shapes, min_size)
    params, work, m, v, outs, norms = want = run_reference(bits, decoupled, mode, shapes, min_size)
    del want
    for i, (g, w) in enumerate(zip(got_params, params)):
        assert same_bits(g, w), f"params[{i}] {where}: {first_difference(g, w)}"
    state = opt.state
    for i, (mi, vi) in enumerate(zip(m, v)):
        entry = state[i]
        assert entry["step"] == 3.0
        if isinstance(mi, QuantizedState):
            for key, q in (("exp_avg", mi), ("exp_avg_sq", vi)):
                assert same_bits(entry[f"{key}_codes"].reshape(-1), q.codes), f"{key} codes of params[{i}] {where}"
                assert same_bits(entry[f"{key}_absmax"], q.absmax), f"{key} absmax of params[{i}] {where}"
        else:
            assert same_bits(entry["exp_avg"], mi) and same_bits(entry["exp_avg_sq"], vi), f"states of params[{i}] {where}"
        if MODES[mode][2].get("master_weights"):
            assert same_bits(entry["master_param"], work[i]), f"master of params[{i}] {where}"
    if got_outs is not None:
        for i, (g, w) in enumerate(zip(got_outs, outs)):
            assert same_bits(g, w), f"params_out[{i}] {where}"
    assert [None if x is None else np.float64(x).tobytes() for x in got_norms] == \
           [None if x is None else np.float64(x).tobytes() for x in norms]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("mode", list(MODES))
def test_steps_give_the_references_bits_on_every_path_and_thread_count(bits, decoupled, mode):
    for isa in ISAS:
        fastadam.set_isa(isa)
        for threads in THREADS:
            fastadam.set_num_threads(threads)
            check_same(bits, decoupled, mode, SHAPES, 4096, f"{isa}, {threads} threads")


@pytest.mark.parametrize("bits", [8, 4])
def test_every_param_quantized_with_min_size_0(bits):
    shapes = [(1,), (2,), (127,), (128,), (129,), (255,), (256,), (257,), (3, 5)]
    check_same(bits, True, "fp32", shapes, 0, "min size 0")
    _, opt, _, _ = run_class(bits, True, "fp32", shapes, 0)
    assert all("exp_avg_codes" in e for e in opt.state.values())


def test_quantized_and_float32_params_share_nothing_but_the_call():
    # a param below the threshold steps exactly as fastadam.AdamW would step it
    shapes = [(5000,), (100,)]
    params, opt, _, _ = run_class(8, True, "fp32", shapes, 4096)
    plain = make_params(shapes, np.float32)
    plain_opt = fastadam.AdamW(plain, lr=0.01)
    for t in range(1, 4):
        plain_opt.step(make_grads(shapes, np.float32, t))
    assert same_bits(params[1], plain[1])
    assert same_bits(opt.state[1]["exp_avg_sq"], plain_opt.state[1]["exp_avg_sq"])
    assert not same_bits(params[0], plain[0])  # the quantized one did differ (a test that could fail)


# ----- layout, placement, memory ----------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_state_layout(bits):
    shapes = [(65, 129), (300,)]
    params, opt, _, _ = run_class(bits, True, "fp32", shapes, 4096)
    big, small = opt.state[0], opt.state[1]
    keys = ["step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"] + (["param_shape"] if bits == 4 else [])
    assert list(big) == keys and list(small) == ["step", "exp_avg", "exp_avg_sq"]
    n = 65 * 129
    for key in ("exp_avg", "exp_avg_sq"):
        codes, absmax = big[f"{key}_codes"], big[f"{key}_absmax"]
        assert codes.dtype == np.uint8 and absmax.dtype == np.float32
        assert codes.shape == ((65, 129) if bits == 8 else ((n + 1) // 2,))
        assert absmax.shape == (-(-n // QUANT_BLOCK[bits]),) and absmax.min() > 0
    if bits == 4:
        assert big["param_shape"] == (65, 129)
    assert small["exp_avg"].dtype == np.float32 and small["exp_avg"].shape == (300,)
    # live arrays: a change shows in the next step's state
    opt.state[0]["exp_avg_absmax"][0] = 123.0
    assert opt.state[0]["exp_avg_absmax"][0] == 123.0


def test_states_are_packed_one_block_per_kind_with_the_stagger():
    shapes = [(5000,), (6000,), (100,), (7000,)]
    _, opt, _, _ = run_class(8, True, "fp32", shapes, 4096, steps=1)

    def root(a):
        while a.base is not None:
            a = a.base
        return a

    for kind, key in enumerate(("exp_avg", "exp_avg_sq")):
        arrays = []
        for i in range(len(shapes)):
            e = opt.state[i]
            arrays += [e[f"{key}_codes"], e[f"{key}_absmax"]] if f"{key}_codes" in e else [e[key]]
        assert len({id(root(a)) for a in arrays}) == 1, f"{key}: one block"
        addresses = [a.ctypes.data for a in arrays]
        assert all(a % 64 == 0 for a in addresses)
        assert addresses[0] % 4096 == state_stagger(kind)
    assert root(opt.state[0]["exp_avg_codes"]) is not root(opt.state[0]["exp_avg_sq_codes"])


@pytest.mark.parametrize("bits,most", [(8, 2.1), (4, 1.1)])
def test_memory_per_parameter_at_a_million_elements(bits, most):
    n = 1_000_000
    p = np.zeros(n, np.float32)
    opt = CLASSES[bits][1]([p], lr=1e-3)
    opt.step([np.ones(n, np.float32)])
    nbytes = sum(v.nbytes for v in opt.state[0].values() if isinstance(v, np.ndarray))
    assert nbytes / n <= most, nbytes / n
    fp32 = fastadam.AdamW([np.zeros(n, np.float32)])
    fp32.step([np.ones(n, np.float32)])
    assert sum(v.nbytes for v in fp32.state[0].values() if isinstance(v, np.ndarray)) / n == 8


# ----- state dicts and the conversion calls -----------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip_continues_with_the_same_bits(bits):
    shapes = [(5000,), (50,), (64, 80)]
    params, opt, _, _ = run_class(bits, True, "fp32", shapes, 4096)
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg_codes"] is not opt.state[0]["exp_avg_codes"]  # a snapshot
    resumed_params = [p.copy() for p in params]
    resumed = CLASSES[bits][1](resumed_params, lr=0.01)
    resumed.load_state_dict(pickle.loads(pickle.dumps(sd)))
    clone = copy.deepcopy(opt)
    clone_params = clone.param_groups[0]["params"]
    for t in (4, 5):
        grads = make_grads(shapes, np.float32, t)
        for o in (opt, resumed, clone):
            o.step(grads)
    for a, b, c in zip(params, resumed_params, clone_params):
        assert same_bits(a, b) and same_bits(a, c)
    for i in range(len(shapes)):
        for key, value in opt.state[i].items():
            if isinstance(value, np.ndarray):
                assert same_bits(value, resumed.state[i][key]), (i, key)


def test_loaded_states_are_the_optimizers_own_packed_copies():
    shapes = [(5000,), (6000,)]
    _, opt, _, _ = run_class(8, True, "fp32", shapes, 4096)
    sd = opt.state_dict()
    other = fastadam.AdamW8bit(make_params(shapes, np.float32))
    other.load_state_dict(sd)
    codes = other.state[0]["exp_avg_codes"]
    assert not np.shares_memory(codes, sd["state"][0]["exp_avg_codes"])
    assert codes.ctypes.data % 4096 == state_stagger(0)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_state_dict_gives_the_code_values_and_loads_into_adamw(bits):
    shapes = [(5000,), (50,), (64, 80)]
    params, opt, _, _ = run_class(bits, True, "fp32", shapes, 4096)
    sd = opt.state_dict()
    before = copy.deepcopy(sd)
    plain = fastadam.dequantize_state_dict(sd)
    for i, shape in enumerate(shapes):
        entry, q = plain["state"][i], sd["state"][i]
        assert sorted(entry) == ["exp_avg", "exp_avg_sq", "step"]
        assert entry["exp_avg"].dtype == np.float32 and entry["exp_avg"].shape == shape
        if "exp_avg_codes" in q:
            n = int(np.prod(shape))
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                want = reference.dequantize_blockwise(q[f"{key}_codes"], q[f"{key}_absmax"], bits, signed, n).reshape(shape)
                assert same_bits(entry[key], want)
    for i in range(len(shapes)):  # the input is unchanged
        for key, value in sd["state"][i].items():
            assert same_bits(np.asarray(value), np.asarray(before["state"][i][key])), key
    adamw = fastadam.AdamW([p.copy() for p in params], lr=0.01)
    adamw.load_state_dict(plain)
    assert same_bits(adamw.state[2]["exp_avg"], plain["state"][2]["exp_avg"])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_state_dict_and_loading_a_plain_state_dict(bits):
    shapes = [(5000,), (50,), (64, 80)]
    params = make_params(shapes, np.float32)
    adamw = fastadam.AdamW(params, lr=0.01)
    for t in (1, 2):
        adamw.step(make_grads(shapes, np.float32, t))
    sd = adamw.state_dict()
    q = fastadam.quantize_state_dict(sd, bits=bits)
    assert "exp_avg" in q["state"][1] and "exp_avg_codes" not in q["state"][1]  # 50 < 4096: as it was
    for i in (0, 2):
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = reference.quantize_blockwise(sd["state"][i][key], bits, signed)
            assert same_bits(q["state"][i][f"{key}_codes"].reshape(-1), codes)
            assert same_bits(q["state"][i][f"{key}_absmax"], absmax)
    via_call, direct = (CLASSES[bits][1]([p.copy() for p in params], lr=0.01) for _ in range(2))
    via_call.load_state_dict(q)
    direct.load_state_dict(sd)  # quantizes it itself
    for i in range(3):
        for key, value in via_call.state[i].items():
            if isinstance(value, np.ndarray):
                assert same_bits(value, direct.state[i][key]), (i, key)
    assert len(fastadam.quantize_state_dict(sd, bits=bits, min_size=0)["state"][1]["exp_avg_absmax"]) == 1


def test_a_small_params_quantized_state_loads_as_float32():
    # saved with min_8bit_size=0, loaded by an optimizer with the default: dequantized, exactly
    shapes = [(300,)]
    _, opt, _, _ = run_class(8, True, "fp32", shapes, 0)
    sd = opt.state_dict()
    other = fastadam.AdamW8bit(make_params(shapes, np.float32))
    other.load_state_dict(sd)
    want = reference.dequantize_blockwise(sd["state"][0]["exp_avg_codes"], sd["state"][0]["exp_avg_absmax"], 8, True, 300)
    assert same_bits(other.state[0]["exp_avg"], want)


# ----- bad input: a clear error, nothing changed --------------------------------------------


def snapshot(opt):
    return pickle.dumps((opt.state, opt.param_groups))


def bad_dicts():
    def codes_int8(sd):
        sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"].astype(np.int8)

    def absmax_short(sd):
        sd["state"][0]["exp_avg_sq_absmax"] = sd["state"][0]["exp_avg_sq_absmax"][:-1]

    def block_128(sd):  # another library's 128-element blocks
        sd["state"][0]["exp_avg_absmax"] = np.ones(-(-5000 // 128), np.float32)

    def absmax_float64(sd):
        sd["state"][0]["exp_avg_absmax"] = sd["state"][0]["exp_avg_absmax"].astype(np.float64)

    def four_bit(sd):
        sd["state"][0]["param_shape"] = (5000,)

    def missing(sd):
        del sd["state"][0]["exp_avg_sq_absmax"]

    def wrong_shape(sd):
        sd["state"][0]["exp_avg_codes"] = np.zeros(4000, np.uint8)

    return [
        (codes_int8, TypeError, r"exp_avg_codes has dtype int8; codes are uint8"),
        (absmax_short, ValueError, r"exp_avg_sq_absmax has 19 entries; .* has 20, one per block of 256: a state dict of another block size"),
        (block_128, ValueError, r"another block size"),
        (absmax_float64, TypeError, r"absmax has dtype float64; absmax is float32"),
        (four_bit, ValueError, r"codes|4-bit"),
        (missing, ValueError, r"lacks exp_avg_sq_absmax"),
        (wrong_shape, ValueError, r"shape|codes"),
    ]


@pytest.mark.parametrize("change,error,match", bad_dicts())
def test_bad_state_dicts_raise_and_change_nothing(change, error, match):
    shapes = [(5000,), (60,)]
    _, opt, _, _ = run_class(8, True, "fp32", shapes, 4096)
    sd = copy.deepcopy(opt.state_dict())
    change(sd)
    target = fastadam.AdamW8bit(make_params(shapes, np.float32), lr=0.01)
    target.step(make_grads(shapes, np.float32, 1))
    before = snapshot(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(sd)
    assert snapshot(target) == before


def test_a_state_dict_of_another_bit_width_names_the_conversion():
    shapes = [(5000,)]
    _, four, _, _ = run_class(4, True, "fp32", shapes, 4096)
    eight = fastadam.AdamW8bit(make_params(shapes, np.float32))
    with pytest.raises(ValueError, match=r"4-bit and AdamW8bit keeps 8-bit states: .*dequantize_state_dict"):
        eight.load_state_dict(four.state_dict())
    assert eight.state == {}
    eight.load_state_dict(fastadam.dequantize_state_dict(four.state_dict()))  # the named fix works
    assert eight.state[0]["exp_avg_codes"].dtype == np.uint8
    with pytest.raises(ValueError, match="4-bit"):
        fastadam.quantize_state_dict(four.state_dict(), bits=8)


def test_plain_optimizers_refuse_quantized_state_dicts_naming_the_fix():
    _, opt, _, _ = run_class(8, True, "fp32", [(5000,)], 4096)
    plain = fastadam.AdamW(make_params([(5000,)], np.float32))
    with pytest.raises(ValueError, match="dequantize_state_dict"):
        plain.load_state_dict(opt.state_dict())
    assert plain.state == {}


@pytest.mark.parametrize("bits", [8, 4])
def test_refused_keywords(bits):
    p = [np.zeros(5000, np.float32)]
    for cls in CLASSES[bits]:
        with pytest.raises(ValueError, match=r"amsgrad=True is not available with .*fastadam.AdamW\(amsgrad=True\)"):
            cls(p, amsgrad=True)
        with pytest.raises(ValueError, match="state_dtype"):
            cls(p, state_dtype=BF16)
        with pytest.raises(ValueError, match="amsgrad"):
            cls([{"params": p, "amsgrad": True}])
        with pytest.raises(TypeError, match=rf"float64 with 5000 elements; {bits}-bit states .* {MIN_KEYWORD[bits]}"):
            cls([np.zeros(5000)])
        cls([np.zeros(50)])  # a small float64 param keeps float64 states, as fastadam.Adam
        with pytest.raises(TypeError, match=MIN_KEYWORD[bits]):
            cls(p, **{MIN_KEYWORD[bits]: True})
        with pytest.raises(ValueError, match=MIN_KEYWORD[bits]):
            cls(p, **{MIN_KEYWORD[bits]: -1})


def test_amsgrad_set_between_steps_is_refused_before_any_write():
    p = np.ones(5000, np.float32)
    opt = fastadam.AdamW8bit([p])
    opt.step([np.ones(5000, np.float32)])
    state, values = pickle.dumps(opt.state), p.copy()
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step([np.ones(5000, np.float32)])
    assert pickle.dumps(opt.state) == state and same_bits(p, values)


# ----- the guarantees of every optimizer -----------------------------------------------------


def test_a_rejected_step_creates_no_state_and_writes_nothing():
    params = make_params([(5000,), (6000,)], np.float32)
    before = [p.copy() for p in params]
    opt = fastadam.AdamW8bit(params)
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(5000, np.float32), np.ones(5999, np.float32)])
    assert opt.state == {} and all(same_bits(a, b) for a, b in zip(params, before))
    opt.step([np.ones(5000, np.float32), np.ones(6000, np.float32)])
    assert opt.state[1]["step"] == 1.0


def test_a_skipped_step_leaves_no_state():
    params = make_params([(5000,)], np.float32)
    before = params[0].copy()
    opt = fastadam.AdamW8bit(params)
    grad = np.ones(5000, np.float32)
    grad[7] = np.inf
    norm = opt.step([grad], grad_scale=8.0)
    assert not np.isfinite(norm) and opt.last_step_skipped and opt.state == {} and same_bits(params[0], before)


def test_a_param_replaced_in_param_groups_starts_with_fresh_state():
    params = make_params([(5000,), (6000,)], np.float32)
    opt = fastadam.AdamW8bit(params)
    opt.step([np.ones(5000, np.float32), np.ones(6000, np.float32)])
    fresh = np.zeros(5000, np.float32)
    opt.param_groups[0]["params"][0] = fresh
    opt.step([np.ones(5000, np.float32), np.ones(6000, np.float32)])
    assert opt.state[0]["step"] == 1.0 and opt.state[1]["step"] == 2.0
    assert fresh[0] != 0.0


def test_errors_name_the_users_params():
    opt = fastadam.AdamW8bit({"w": np.zeros(5000, np.float32), "b": np.zeros(10, np.float32)})
    with pytest.raises(TypeError, match=r"params\['w'\]"):
        opt.step({"w": np.zeros(5000, np.float64), "b": np.zeros(10, np.float32)})
