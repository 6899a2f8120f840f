"""Mixed precision in the optimizer classes (issue 16): Adam/AdamW with bfloat16/float16
params, master weights, bf16 states, stochastic rounding, loss scaling, global-norm
clipping and params_out give the bits of fastadam.reference, step after step, on every
SIMD path and thread count; skipped steps leave no trace; bad settings raise first."""

import math

import ml_dtypes
import numpy as np
import pytest
from conftest import THREADS, first_difference, same_bits

import fastadam
from fastadam import reference

bf16 = np.dtype(ml_dtypes.bfloat16)
f16 = np.dtype(np.float16)
f32 = np.dtype(np.float32)

SHAPES = [(7, 5), (4099,), (1,), (300, 200)]  # 60000 elements: split over threads

# name: (param dtype, grad dtype, optimizer keywords, step keywords, params_out dtype)
MODES = {
    "master-bf16": (bf16, bf16, {"master_weights": True}, {}, None),
    "master-f16-scaled": (f16, f16, {"master_weights": True}, {"grad_scale": 3.0}, None),
    "bf16-direct": (bf16, bf16, {}, {}, None),
    "bf16-stochastic": (bf16, bf16, {"stochastic_rounding": True}, {}, None),
    "bf16-states": (f32, f32, {"state_dtype": ml_dtypes.bfloat16}, {}, None),
    "all-bf16": (bf16, bf16, {"state_dtype": ml_dtypes.bfloat16}, {}, None),
    "f32-bf16-grads": (f32, bf16, {}, {}, None),
    "f32-out-clip": (f32, bf16, {"max_grad_norm": 0.5}, {"grad_scale": 1024.0}, bf16),
    "master-clip-amsgrad": (bf16, bf16, {"master_weights": True, "max_grad_norm": 0.5, "amsgrad": True}, {"grad_scale": 8.0}, None),
}


def make(rng, param_dtype, grad_dtype, steps):
    params = [rng.standard_normal(s).astype(param_dtype) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * 0.3).astype(grad_dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def reference_run(params, grads, opt_kw, step_kw, out_dtype, hyper):
    """The same steps with fastadam.reference, state kept by hand: the expected bits."""
    amsgrad = opt_kw.get("amsgrad", False)
    master = opt_kw.get("master_weights", False)
    state_dtype = np.dtype(opt_kw.get("state_dtype") or np.float32)
    work = [p.astype(np.float32) if master else p for p in params]
    m = [np.zeros(p.shape, state_dtype) for p in params]
    v = [np.zeros(p.shape, state_dtype) for p in params]
    vmax = [np.zeros(p.shape, state_dtype) for p in params] if amsgrad else None
    outs_seen = []
    for t, g in enumerate(grads, start=1):
        outs = [np.zeros(p.shape, out_dtype) for p in params] if out_dtype else None
        if master:
            outs = params
        reference.adam_step_multi(
            work, g, m, v, steps=t, amsgrad=amsgrad, max_exp_avg_sqs=vmax, params_out=outs,
            grad_scale=step_kw.get("grad_scale"), max_grad_norm=opt_kw.get("max_grad_norm"),
            rounding_seeds=list(range(len(params))) if opt_kw.get("stochastic_rounding") else None, **hyper,
        )
        outs_seen.append(outs)
    return work, m, v, outs_seen


@pytest.mark.parametrize("mode", MODES)
def test_optimizer_steps_equal_the_reference_on_every_path(mode):
    param_dtype, grad_dtype, opt_kw, step_kw, out_dtype = MODES[mode]
    rng = np.random.default_rng(16)
    params0, grads = make(rng, param_dtype, grad_dtype, steps=3)
    hyper = {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}
    want_params = [p.copy() for p in params0]
    work, m, v, want_outs = reference_run(want_params, grads, opt_kw, step_kw, out_dtype, hyper)
    for isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        for threads in THREADS:
            fastadam.set_num_threads(threads)
            params = [p.copy() for p in params0]
            opt = fastadam.AdamW(params, lr=1e-2, weight_decay=0.1, **opt_kw)
            for t, g in enumerate(grads):
                outs = [np.zeros(p.shape, out_dtype) for p in params] if out_dtype else None
                norm = opt.step(g, params_out=outs, **step_kw)
                assert (norm is None) == ("grad_scale" not in step_kw and "max_grad_norm" not in opt_kw)
                assert not opt.last_step_skipped
                if outs is not None:
                    for got, want in zip(outs, want_outs[t]):
                        assert same_bits(got, want), (mode, isa, threads, first_difference(got, want))
            where = (mode, isa, threads)
            for i, p in enumerate(params):
                assert p.dtype == param_dtype
                assert same_bits(p, want_params[i]), (where, first_difference(p, want_params[i]))
                state = opt.state[i]
                assert state["step"] == 3.0
                assert same_bits(state["exp_avg"], m[i]) and same_bits(state["exp_avg_sq"], v[i]), where
                if opt_kw.get("master_weights"):
                    assert same_bits(state["master_param"], work[i]), where
                else:
                    assert "master_param" not in state


def test_bf16_gradients_of_float32_params_need_no_setting():
    rng = np.random.default_rng(1)
    params, grads = make(rng, f32, bf16, steps=2)
    want = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    opt = fastadam.Adam(params, lr=1e-2)
    for t, g in enumerate(grads, start=1):
        assert opt.step(g) is None
        reference.adam_step_multi(want, g, m, v, steps=t, lr=1e-2)
    for p, w in zip(params, want):
        assert same_bits(p, w)
    # and float32 gradients again afterwards
    g32 = [g.astype(np.float32) for g in grads[0]]
    opt.step(g32)
    reference.adam_step_multi(want, g32, m, v, steps=3, lr=1e-2)
    assert all(same_bits(p, w) for p, w in zip(params, want))


def test_param_groups_keep_their_own_settings():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((50, 3)).astype(bf16)
    b = rng.standard_normal(3).astype(np.float32)
    opt = fastadam.AdamW(
        [{"params": [w], "master_weights": True, "lr": 1e-2}, {"params": [b], "state_dtype": ml_dtypes.bfloat16, "lr": 1e-3}],
        max_grad_norm=1.0,
    )
    gw, gb = rng.standard_normal(w.shape).astype(bf16), rng.standard_normal(b.shape).astype(np.float32)
    want_w, want_b = w.astype(np.float32), b.copy()
    mw, vw = np.zeros(w.shape, np.float32), np.zeros(w.shape, np.float32)
    mb, vb = np.zeros(b.shape, bf16), np.zeros(b.shape, bf16)
    norm = opt.step([gw, gb])
    want_norm = math.sqrt(reference.grad_sq_sum([gw, gb]))
    assert norm == want_norm
    coef = np.float32(1.0 / (want_norm + 1e-6)) if 1.0 / (want_norm + 1e-6) < 1 else None
    for p, g, m, v, lr in ((want_w, gw, mw, vw, 1e-2), (want_b, gb, mb, vb, 1e-3)):
        g32 = g.astype(np.float32) * coef if coef is not None else g.astype(np.float32)
        reference.adam_step_multi([p], [g32], [m], [v], steps=1, lr=lr, weight_decay=1e-2, decoupled_weight_decay=True)
    assert same_bits(opt.state[0]["master_param"], want_w) and same_bits(w, want_w.astype(bf16))
    assert opt.state[1]["exp_avg"].dtype == bf16 and same_bits(opt.state[1]["exp_avg"], mb)
    assert same_bits(b, want_b)


@pytest.mark.parametrize("when", ["first", "later"])
def test_a_non_finite_gradient_skips_the_step_and_leaves_no_trace(when):
    rng = np.random.default_rng(3)
    params, grads = make(rng, bf16, bf16, steps=2)
    opt = fastadam.AdamW(params, master_weights=True, max_grad_norm=1.0)
    if when == "later":
        assert math.isfinite(opt.step(grads[0]))
    before_params = [p.copy() for p in params]
    before_state = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for i, s in opt.state.items()}
    bad = [g.copy() for g in grads[1]]
    bad[2][0] = np.nan if when == "first" else np.inf
    norm = opt.step(bad, grad_scale=2.0)
    assert not math.isfinite(norm) and opt.last_step_skipped
    assert all(same_bits(p, q) for p, q in zip(params, before_params))
    assert set(opt.state) == set(before_state)  # no fresh state on a skipped first step
    for i, s in opt.state.items():
        assert s["step"] == before_state[i]["step"]
        for k, v in s.items():
            if isinstance(v, np.ndarray):
                assert same_bits(v, before_state[i][k])
    assert math.isfinite(opt.step(grads[1])) and not opt.last_step_skipped


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(4)
    params, grads = make(rng, bf16, bf16, steps=4)
    twin = [p.copy() for p in params]
    opt = fastadam.AdamW(params, master_weights=True, state_dtype=ml_dtypes.bfloat16, lr=1e-2)
    for g in grads[:2]:
        opt.step(g)
    saved = opt.state_dict()
    assert saved["state"][0]["master_param"].dtype == f32 and saved["state"][0]["exp_avg"].dtype == bf16
    other = fastadam.AdamW(twin, master_weights=True, state_dtype=ml_dtypes.bfloat16, lr=1e-2)
    other.load_state_dict(saved)
    for p, q in zip(twin, params):
        q[...] = p  # the loaded optimizer's model is where the first left it
    twin[:] = [p.copy() for p in params]
    other = fastadam.AdamW(twin, master_weights=True, state_dtype=ml_dtypes.bfloat16, lr=1e-2)
    other.load_state_dict(saved)
    for g in grads[2:]:
        opt.step(g)
        other.step(g)
    for a, b in zip(params, twin):
        assert same_bits(a, b)
    assert same_bits(opt.state[1]["master_param"], other.state[1]["master_param"])


def test_stochastic_rounding_is_unbiased_and_the_same_on_every_path():
    # 1 + 2**-9 lies a quarter of the way between two bfloat16 neighbours (spacing 2**-7)
    x = np.full(10**6, 1 + 2**-9, np.float32)
    rounded = reference.stochastic_round_bf16(x, seed=5, step=1).astype(np.float32)
    assert set(np.unique(rounded)) == {1.0, 1 + 2**-7}
    error = rounded - x
    sigma = 2**-7 * math.sqrt(0.25 * 0.75) / math.sqrt(x.size)
    assert abs(error.mean()) < 4 * sigma, (error.mean(), sigma)
    assert abs((rounded != 1.0).mean() - 0.25) < 0.005
    # the kernel: one seed gives the same bits on every path and thread count, other seeds others
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(100003).astype(bf16)
    g = rng.standard_normal(p0.shape).astype(bf16)
    results = []
    for isa in fastadam.available_isas():
        fastadam.set_isa(isa)
        for threads in THREADS:
            fastadam.set_num_threads(threads)
            p = p0.copy()
            fastadam.Adam([p], lr=1e-2, stochastic_rounding=True).step([g])
            results.append(p)
    assert all(same_bits(r, results[0]) for r in results)
    nearest = p0.copy()
    fastadam.Adam([nearest], lr=1e-2).step([g])
    assert not same_bits(nearest, results[0])
    # an unbiased update: the mean of the stochastically rounded params is the fp32 result's
    exact = p0.astype(np.float32)
    reference.adam_step_multi([exact], [g], [np.zeros_like(exact)], [np.zeros_like(exact)], steps=1, lr=1e-2)
    spacing = np.abs(np.spacing(exact.astype(bf16)).astype(np.float32))
    z = (results[0].astype(np.float32) - exact) / spacing
    assert abs(z.mean()) < 4 * 0.5 / math.sqrt(z.size)
    assert abs((nearest.astype(np.float32) - exact).mean() / spacing.mean()) < 0.05


BAD = {
    "master-on-f32": (lambda p: fastadam.Adam([p], master_weights=True), f32, ValueError, "master_weights=True keeps float32 copies"),
    "sr-on-f32": (lambda p: fastadam.Adam([p], stochastic_rounding=True), f32, ValueError, "stochastic_rounding=True rounds bfloat16"),
    "sr-with-master": (lambda p: fastadam.Adam([p], stochastic_rounding=True, master_weights=True), bf16, ValueError, "never rounded"),
    "state-int": (lambda p: fastadam.Adam([p], state_dtype=np.int8), f32, TypeError, "state_dtype must be None"),
    "state-f16-f32": (lambda p: fastadam.Adam([p], state_dtype=np.float16), f32, ValueError, "state_dtype float16 does not go"),
    "state-bf16-f64": (lambda p: fastadam.Adam([p], state_dtype=ml_dtypes.bfloat16), np.dtype(np.float64), ValueError, "float64"),
    "clip-negative": (lambda p: fastadam.Adam([p], max_grad_norm=-1.0), f32, ValueError, "max_grad_norm must be a finite number > 0"),
    "clip-str": (lambda p: fastadam.Adam([p], max_grad_norm="1"), f32, TypeError, "max_grad_norm must be a number"),
    "master-str": (lambda p: fastadam.Adam([p], master_weights="yes"), bf16, TypeError, "master_weights must be True or False"),
    "sgd-float16": (lambda p: fastadam.SGD([p], lr=0.1), f16, TypeError, "float32 or float64"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_settings_raise_at_construction(case):
    build, dtype, exc, match = BAD[case]
    p = np.ones(5, dtype)
    with pytest.raises(exc, match=match):
        build(p)
    assert np.all(p.astype(np.float32) == 1)


def _snapshot(opt, params):
    return [p.copy() for p in params], {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for i, s in opt.state.items()}


def _unchanged(opt, params, snap):
    ps, st = snap
    assert all(same_bits(a, b) for a, b in zip(params, ps))
    assert set(opt.state) == set(st)
    for i, s in opt.state.items():
        for k, v in s.items():
            assert same_bits(v, st[i][k]) if isinstance(v, np.ndarray) else v == st[i][k]


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize(
    "case",
    ["out-f32", "out-shape", "out-overlaps-param", "out-with-master", "scale-zero", "scale-nan", "grad-f64", "grad-shape"],
)
def test_bad_step_arguments_change_nothing(case, warm):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(bf16)
    opt = fastadam.Adam([{"params": [w]}, {"params": [b], "master_weights": True}], lr=1e-2)
    good = [rng.standard_normal(w.shape).astype(bf16), rng.standard_normal(b.shape).astype(bf16)]
    if warm:
        opt.step(good)
    snap = _snapshot(opt, [w, b])
    grads, kw = list(good), {}
    if case == "out-f32":
        kw, exc, match = {"params_out": [np.zeros(w.shape, np.float32), None]}, TypeError, r"param_out of params\[0\] has dtype float32"
    elif case == "out-shape":
        kw, exc, match = {"params_out": [np.zeros((4, 6), bf16), None]}, ValueError, r"param_out of params\[0\] has shape"
    elif case == "out-overlaps-param":
        overlapping = w.reshape(-1).view(bf16)[: w.size].reshape(w.shape)  # the first half of w's bytes
        kw, exc, match = {"params_out": [overlapping, None]}, ValueError, r"share memory"
    elif case == "out-with-master":
        kw, exc, match = {"params_out": [None, np.zeros(b.shape, bf16)]}, ValueError, "master_weights=True"
    elif case == "scale-zero":
        kw, exc, match = {"grad_scale": 0.0}, ValueError, "grad_scale must be a finite number > 0"
    elif case == "scale-nan":
        kw, exc, match = {"grad_scale": float("nan")}, ValueError, "grad_scale must be a finite number > 0"
    elif case == "grad-f64":
        grads[1] = grads[1].astype(np.float64)
        exc, match = TypeError, r"the gradient of params\[1\] has dtype float64"
    else:
        grads[1] = np.zeros(5, bf16)
        exc, match = ValueError, r"the gradient of params\[1\] .*has shape"
    with pytest.raises(exc, match=match):
        opt.step(grads, **kw)
    _unchanged(opt, [w, b], snap)


def test_sgd_takes_no_grad_scale():
    p = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="SGD takes neither"):
        fastadam.SGD([p], lr=0.1).step([np.ones(3, np.float32)], grad_scale=2.0)


def test_errors_name_the_users_params_not_the_kernels_list():
    ps = [np.ones(4, bf16), np.ones(4, bf16), np.ones(3, bf16)]
    with pytest.raises(ValueError, match=r"the gradient of params\[2\] has shape \(4,\) but params\[2\] has shape \(3,\)"):
        fastadam.AdamW(ps).step([None, None, np.ones(4, bf16)])
    p = np.ones(4, bf16)
    opt = fastadam.AdamW([p], master_weights=True)
    p.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] \(bfloat16, with float32 master weights\) is read-only"):
        opt.step([np.ones(4, bf16)])
    with pytest.raises(TypeError, match="float64; max_grad_norm works on float32"):
        fastadam.AdamW([np.ones(4)], max_grad_norm=1.0)


def test_switching_master_weights_off_and_on_goes_on_from_the_param():
    p = np.ones(4, bf16)
    opt = fastadam.AdamW([p], lr=0.1, master_weights=True, weight_decay=0.0)
    g = np.ones(4, bf16)
    opt.step([g])
    opt.param_groups[0]["master_weights"] = False
    for _ in range(3):
        opt.step([g])
    assert "master_param" not in opt.state[0]
    value = float(p[0])
    opt.param_groups[0]["master_weights"] = True
    opt.step([g])
    assert abs(float(p[0]) - value) < 0.2
    saved = opt.state_dict()
    other = fastadam.AdamW([p.copy()], lr=0.1)
    other.load_state_dict(saved)  # the saved group's master_weights=True comes with it
    assert other.param_groups[0]["master_weights"] and other.state[0]["master_param"].dtype == np.float32
    saved["param_groups"][0]["master_weights"] = False
    with pytest.raises(ValueError, match="has a master_param but its group has master_weights=False"):
        fastadam.AdamW([p.copy()], lr=0.1).load_state_dict(saved)
