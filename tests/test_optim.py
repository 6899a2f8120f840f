"""The optimizer classes: structure, groups, state, state_dict, and equivalence with the functional API."""

import copy
import subprocess
import sys

import numpy as np
import pytest
from conftest import same_bits

import fastadam
from fastadam import reference


def make_params(rng, shapes=((10,), (3, 4), (7,)), dtype=np.float32):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def grads_like(rng, params, scale=1.0):
    return [(rng.standard_normal(p.shape) * scale).astype(p.dtype) for p in params]


def reference_adam(params, grads_per_step, **kw):
    """Per-tensor reference run: what any optimizer step must equal bit for bit."""
    params = [p.copy() for p in params]
    ms, vs, vmaxs = ([np.zeros_like(p) for p in params] for _ in range(3))
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, m, v, vm in zip(params, grads, ms, vs, vmaxs):
            reference.adam_step(p, g, m, v, step=t, max_exp_avg_sq=vm if kw.get("amsgrad") else None, **kw)
    return params


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True, "weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}])
def test_adam_step_equals_reference_bitwise(kw):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    steps = [grads_like(rng, params) for _ in range(5)]
    want = reference_adam(params, steps, lr=0.01, **kw)
    opt = fastadam.Adam(params, lr=0.01, **kw)
    for g in steps:
        opt.step(g)
    for a, b in zip(params, want):
        assert same_bits(a, b)


def test_params_are_updated_in_place_and_state_is_lazy():
    rng = np.random.default_rng(1)
    params = make_params(rng)
    before = [p.copy() for p in params]
    ids = [id(p) for p in params]
    opt = fastadam.Adam(params, lr=0.1)
    assert opt.state == {} and opt.state_dict()["state"] == {}
    opt.step(grads_like(rng, params))
    assert [id(p) for p in opt.param_groups[0]["params"]] == ids
    assert all(not np.array_equal(p, b) for p, b in zip(params, before))
    state = opt.state
    assert sorted(state) == [0, 1, 2]
    for i, p in enumerate(params):
        assert state[i]["step"] == 1.0
        assert state[i]["exp_avg"].dtype == p.dtype and state[i]["exp_avg"].shape == p.shape
        assert "max_exp_avg_sq" not in state[i]


def test_none_gradient_skips_param_and_its_step_count():
    rng = np.random.default_rng(2)
    params = make_params(rng)
    frozen = params[1].copy()
    opt = fastadam.Adam(params, lr=0.1)
    g = grads_like(rng, params)
    opt.step([g[0], None, g[2]])
    opt.step([g[0], None, g[2]])
    assert np.array_equal(params[1], frozen)
    assert 1 not in opt.state and opt.state[0]["step"] == 2.0
    opt.step(g)  # first update of param 1: its own step count starts at 1
    assert opt.state[1]["step"] == 1.0 and opt.state[0]["step"] == 3.0
    want = frozen.copy()
    reference.adam_step(want, g[1], np.zeros_like(want), np.zeros_like(want), step=1, lr=0.1)
    assert same_bits(params[1], want)


def test_dict_params_and_grads_by_name():
    rng = np.random.default_rng(3)
    arrays = make_params(rng)
    named = dict(zip(["w1", "b1", "w2"], arrays))
    copies = [a.copy() for a in arrays]
    opt = fastadam.Adam(named, lr=0.05)
    g = grads_like(rng, arrays)
    opt.step({"w2": g[2], "w1": g[0], "b1": g[1]})
    want = reference_adam(copies, [g], lr=0.05)
    for a, b in zip(arrays, want):
        assert same_bits(a, b)
    opt.step({"w1": g[0]})  # missing names are skipped, like None
    assert opt.state[0]["step"] == 2.0 and opt.state[1]["step"] == 1.0
    with pytest.raises(ValueError, match="unknown parameter names.*w3"):
        opt.step({"w3": g[0]})
    with pytest.raises(TypeError, match="by name"):
        fastadam.Adam(arrays).step({"w1": g[0]})


def test_param_groups_with_own_hyper_parameters():
    rng = np.random.default_rng(4)
    a, b = make_params(rng, ((8,), (5,))), make_params(rng, ((6,),), dtype=np.float64)
    ref_a, ref_b = [x.copy() for x in a], [x.copy() for x in b]
    opt = fastadam.Adam([{"params": a}, {"params": b, "lr": 0.5, "amsgrad": True}], lr=0.01)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    ga, gb = grads_like(rng, a), grads_like(rng, b)
    opt.step(ga + gb)            # flat list over all groups
    opt.step([ga, gb])           # or one list per group
    want_a = reference_adam(ref_a, [ga, ga], lr=0.01)
    want_b = reference_adam(ref_b, [gb, gb], lr=0.5, amsgrad=True)
    for x, y in zip(a + b, want_a + want_b):
        assert same_bits(x, y)
    assert "max_exp_avg_sq" in opt.state[2] and "max_exp_avg_sq" not in opt.state[0]


def test_one_gradient_list_per_group_with_one_param_each():
    """[[gw], [gb]] for two groups of one param each is one list per group, as with larger groups."""
    rng = np.random.default_rng(5)
    w, b = make_params(rng, ((4, 3), (3,)))
    ref = [w.copy(), b.copy()]
    opt = fastadam.Adam([{"params": [w]}, {"params": [b], "lr": 0.1}], lr=0.01)
    gw, gb = grads_like(rng, [w, b])
    opt.step([[gw], [gb]])
    assert same_bits(w, reference_adam([ref[0]], [[gw]], lr=0.01)[0])
    assert same_bits(b, reference_adam([ref[1]], [[gb]], lr=0.1)[0])
    with pytest.raises(ValueError, match=r"gradient lists of sizes \[2, 0\] for param groups of sizes \[1, 1\]"):
        opt.step([[gw, gb], []])


def test_mutable_lr_takes_effect_next_step():
    rng = np.random.default_rng(5)
    params = make_params(rng)
    copies = [p.copy() for p in params]
    opt = fastadam.Adam(params, lr=0.1)
    g1, g2 = grads_like(rng, params), grads_like(rng, params)
    opt.step(g1)
    opt.param_groups[0]["lr"] = 0.001
    opt.step(g2)
    ms, vs = [np.zeros_like(p) for p in copies], [np.zeros_like(p) for p in copies]
    for t, (g, lr) in enumerate([(g1, 0.1), (g2, 0.001)], start=1):
        for p, gi, m, v in zip(copies, g, ms, vs):
            reference.adam_step(p, gi, m, v, step=t, lr=lr)
    for a, b in zip(params, copies):
        assert same_bits(a, b)


def test_add_param_group_later():
    rng = np.random.default_rng(6)
    a, b = make_params(rng, ((4,),)), make_params(rng, ((3,),))
    opt = fastadam.Adam(a, lr=0.1)
    opt.step(grads_like(rng, a))
    opt.add_param_group({"params": b, "lr": 0.2})
    opt.step(grads_like(rng, a) + grads_like(rng, b))
    assert opt.state[0]["step"] == 2.0 and opt.state[1]["step"] == 1.0
    assert opt.state_dict()["param_groups"][1]["params"] == [1]
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [a[0]]})


def test_amsgrad_switched_on_later_creates_its_buffer():
    rng = np.random.default_rng(7)
    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.step(grads_like(rng, params))
    opt.param_groups[0]["amsgrad"] = True
    opt.step(grads_like(rng, params))
    assert all("max_exp_avg_sq" in s for s in opt.state.values())


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(8)
    params = make_params(rng)
    twin = [p.copy() for p in params]
    opt = fastadam.Adam(params, lr=0.01, amsgrad=True, weight_decay=0.01)
    g = [grads_like(rng, params) for _ in range(6)]
    for gi in g[:3]:
        opt.step(gi)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["params"] == [0, 1, 2] and sd["param_groups"][0]["amsgrad"] is True
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    live = opt.state_dict()
    opt.step(g[3])
    # state_dict() is a snapshot: later steps don't write into it
    assert np.array_equal(live["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])
    assert not np.array_equal(opt.state[0]["exp_avg"], sd["state"][0]["exp_avg"])
    for gi in g[4:]:
        opt.step(gi)

    # A new optimizer on the params as they were after step 3 continues the same way.
    fresh = fastadam.Adam(twin, lr=0.01, amsgrad=True, weight_decay=0.01)
    for gi in g[:3]:
        fresh.step(gi)
    other_params = [p.copy() for p in twin]
    other = fastadam.Adam(other_params, lr=0.5)  # different lr: load_state_dict restores 0.01
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.01
    for gi in g[3:]:
        other.step(gi)
    for a, b in zip(params, other_params):
        assert same_bits(a, b)


def test_load_state_dict_rejects_mismatch_and_changes_nothing():
    rng = np.random.default_rng(9)
    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.step(grads_like(rng, params))
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][1]["exp_avg"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    assert all(np.array_equal(opt.state[i]["exp_avg"], sd["state"][i]["exp_avg"]) for i in range(3))
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = [0, 1]
    with pytest.raises(ValueError, match="params"):
        opt.load_state_dict(bad)


def test_adamw_defaults_and_equivalence():
    rng = np.random.default_rng(10)
    params = make_params(rng)
    copies = [p.copy() for p in params]
    opt = fastadam.AdamW(params, lr=0.01)
    assert opt.defaults["weight_decay"] == 1e-2 and opt.defaults["decoupled_weight_decay"] is True
    g = [grads_like(rng, params) for _ in range(3)]
    for gi in g:
        opt.step(gi)
    want = reference_adam(copies, g, lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True)
    for a, b in zip(params, want):
        assert same_bits(a, b)


def test_sgd_optimizer_matches_reference_and_loaded_buffer_is_not_first_step():
    rng = np.random.default_rng(11)
    params = make_params(rng)
    copies = [p.copy() for p in params]
    opt = fastadam.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    g = [grads_like(rng, params) for _ in range(4)]
    for gi in g[:2]:
        opt.step(gi)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"momentum_buffer"}  # torch's SGD layout: no step
    bufs = [np.zeros_like(p) for p in copies]
    for t, gi in enumerate(g, start=1):
        for p, gg, b in zip(copies, gi, bufs):
            reference.sgd_step(p, gg, b, step=t, lr=0.1, momentum=0.9, nesterov=True)
    resumed = [p.copy() for p in params]
    opt2 = fastadam.SGD(resumed, lr=0.1, momentum=0.9, nesterov=True)
    opt2.load_state_dict(sd)
    for gi in g[2:]:
        opt.step(gi)
        opt2.step(gi)
    for a, b, c in zip(params, copies, resumed):
        assert same_bits(a, b) and same_bits(c, b)


def test_optimizer_is_deterministic_across_threads_and_isas():
    rng = np.random.default_rng(12)
    shapes = [(1000, 100), (3,), (70001,)]  # large enough to split across threads
    base = make_params(rng, shapes)
    g = [grads_like(rng, base) for _ in range(3)]
    results = []
    for isa in fastadam.available_isas():
        for threads in (1, 2, 3):
            fastadam.set_isa(isa)
            fastadam.set_num_threads(threads)
            params = [p.copy() for p in base]
            opt = fastadam.Adam(params, lr=0.01, amsgrad=True)
            for gi in g:
                opt.step(gi)
            results.append(params)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert same_bits(a, b)


def test_repr_lists_groups():
    opt = fastadam.Adam([np.zeros(3, np.float32)], lr=0.25)
    assert "lr: 0.25" in repr(opt) and "Parameter Group 0" in repr(opt)


def test_concurrent_steps_of_one_optimizer_are_refused_not_raced():
    """The step's buffers are reused and read with the GIL released: a second thread
    stepping the same optimizer meanwhile gets RuntimeError, and the first thread's
    steps are unaffected (same bits as the same steps run alone)."""
    import threading

    rng = np.random.default_rng(7)
    start = rng.standard_normal(2_000_000).astype(np.float32)
    grad = rng.standard_normal(start.size).astype(np.float32)

    param = start.copy()
    opt = fastadam.Adam([param], lr=1e-3)
    refused: list[str] = []
    stop = threading.Event()

    def intruder() -> None:
        while not stop.is_set() and not refused:
            try:
                opt.step([grad])
            except RuntimeError as e:
                refused.append(str(e))

    steps_done = 0
    thread = threading.Thread(target=intruder)
    opt.step([grad])
    steps_done += 1
    thread.start()
    try:
        for _ in range(200):
            if refused:
                break
            opt.step([grad])
            steps_done += 1
    except RuntimeError as e:  # the intruder may hold the step when we call
        refused.append(str(e))
    finally:
        stop.set()
        thread.join()
    assert refused, "no concurrent step was ever refused"
    assert "another thread is running a step of this optimizer" in refused[0]
    # Every step that ran was whole: param equals the reference after as many steps.
    total = int(opt.state[0]["step"])
    assert total >= steps_done
    ref_p, m, v = start.copy(), np.zeros_like(start), np.zeros_like(start)
    for t in range(1, total + 1):
        reference.adam_step(ref_p, grad, m, v, step=t, lr=1e-3)
    assert same_bits(param, ref_p)


def test_gradients_off_the_fast_path_are_accepted_and_checked_the_same():
    """A step recognises the usual gradient from its array header alone; an equal dtype
    that is another object (dtype metadata), an ndarray subclass, or a different array
    each step take the full check and give the same bits."""

    class Sub(np.ndarray):
        pass

    rng = np.random.default_rng(11)
    start = [rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    grad_values = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(4)]
    meta = np.dtype(np.float32, metadata={"unit": "1"})
    assert meta == np.float32 and meta is not np.dtype(np.float32)

    def run(wrap):
        params = [p.copy() for p in start]
        opt = fastadam.Adam(params, lr=1e-2)
        for grads in grad_values:
            opt.step([wrap(g) for g in grads])
        return params

    plain = run(lambda g: g)
    for wrap in (lambda g: g.astype(meta), lambda g: g.view(Sub), lambda g: g.copy()):
        for a, b in zip(run(wrap), plain):
            assert same_bits(a, b)

    # The full check still refuses what it refused: a float64 gradient for a float32 param.
    opt = fastadam.Adam([start[0].copy()], lr=1e-2)
    opt.step([grad_values[0][0]])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float64 but params\[0\] has dtype float32"):
        opt.step([grad_values[0][0].astype(np.float64)])


def test_deepcopy_continues_on_its_own_copies():
    """copy.deepcopy (and pickle) copies params and state, not the native plan: the copy
    steps its own arrays, bit-identically to the original, and leaves the original alone."""
    import pickle

    rng = np.random.default_rng(5)
    params = [rng.standard_normal(9).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float64)]
    grads = [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(3)]
    opt = fastadam.Adam(params, lr=1e-2, amsgrad=True)
    opt.step(grads[0])
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        before = [p.copy() for p in params]
        clone.step(grads[1])
        assert all(same_bits(p, b) for p, b in zip(params, before)), "the copy wrote the original's params"
        opt_twin = fastadam.Adam([b.copy() for b in before], lr=1e-2, amsgrad=True)
        opt_twin.load_state_dict(opt.state_dict())
        opt_twin.step(grads[1])
        assert all(same_bits(a, b) for a, b in zip(clone._params, opt_twin._params))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_steps_with_skipped_and_mixed_dtype_tensors_split_across_threads(kind):
    """The optimizer keeps its kernel descriptors between steps and passes only each
    step's gradients and counts: tensors skipped (None) in some steps, float32 and
    float64 groups, a hyper-parameter changed between steps, big enough to split
    across threads; every path and thread count gives the reference's bits."""
    rng = np.random.default_rng(21)
    shapes32, shapes64 = [(30000,), (5,), (40000,)], [(20000,), (3, 11111)]
    base32, base64 = make_params(rng, shapes32), make_params(rng, shapes64, dtype=np.float64)
    base = base32 + base64
    skips = [set(), {1}, {0, 3}, set(), {2, 4}, {0, 1, 2, 3, 4}, set()]
    grads = [[None if i in skip else g for i, g in enumerate(grads_like(rng, base))] for skip in skips]
    lr32 = [0.01, 0.01, 0.02, 0.02, 0.02, 0.02, 0.03]  # group 0's lr, changed between steps

    # The reference, tensor by tensor, each with its own step count.
    want = [p.copy() for p in base]
    bufs = [[np.zeros_like(p) for p in base] for _ in range(3)]
    counts = [0] * len(base)
    for gi, lr in zip(grads, lr32):
        for i, g in enumerate(gi):
            if g is None:
                continue
            counts[i] += 1
            group32 = i < len(base32)
            if kind == "adam":
                reference.adam_step(want[i], g, bufs[0][i], bufs[1][i], step=counts[i], lr=lr if group32 else 0.5,
                                    amsgrad=not group32, max_exp_avg_sq=None if group32 else bufs[2][i])
            else:
                reference.sgd_step(want[i], g, bufs[0][i], step=counts[i], lr=lr if group32 else 0.5, momentum=0.9)

    for isa in fastadam.available_isas():
        for threads in (1, 2):
            fastadam.set_isa(isa)
            fastadam.set_num_threads(threads)
            params = [p.copy() for p in base]
            groups = [{"params": params[:len(base32)]}, {"params": params[len(base32):], "lr": 0.5}]
            if kind == "adam":
                groups[1]["amsgrad"] = True
                opt: fastadam.Optimizer = fastadam.Adam(groups, lr=lr32[0])
            else:
                opt = fastadam.SGD(groups, lr=lr32[0], momentum=0.9)
            for gi, lr in zip(grads, lr32):
                opt.param_groups[0]["lr"] = lr
                opt.step(gi)
            for i, (a, b) in enumerate(zip(params, want)):
                assert same_bits(a, b), (kind, isa, threads, i)
            if kind == "adam":
                assert [opt.state[i]["step"] for i in range(len(base))] == counts


def test_state_buffers_are_line_aligned_and_at_different_page_offsets():
    """The optimizer places its own state: every buffer starts on a 64-byte boundary,
    and a tensor's buffers of different kinds start at different offsets within a 4 KiB
    page (so the kernel's loads from one are not taken for reloads of stores to another),
    also after load_state_dict, which copies the loaded arrays."""
    rng = np.random.default_rng(5)
    shapes = ((1000,), (3, 4), (70001,), (0,), (5,))
    params = make_params(rng, shapes)
    start = [p.copy() for p in params]
    opt = fastadam.Adam(params, lr=0.01, amsgrad=True)
    g = grads_like(rng, params)

    def check(o, arrays):
        for i, p in enumerate(arrays):
            offsets = []
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                b = o.state[i][k]
                assert b.shape == p.shape and b.dtype == p.dtype and b.flags.c_contiguous and b.flags.writeable
                offsets.append(b.ctypes.data % 4096)
            if p.size == 0:
                continue  # no element: NumPy may point an empty view anywhere
            assert all(offset % 64 == 0 for offset in offsets), (i, offsets)
            for x in range(3):
                for y in range(x):
                    d = (offsets[x] - offsets[y]) % 4096
                    assert min(d, 4096 - d) >= 64, (i, offsets)

    opt.step(g)
    check(opt, params)
    sd = opt.state_dict()
    resumed = [p.copy() for p in params]
    opt2 = fastadam.Adam(resumed, lr=0.01, amsgrad=True)
    opt2.load_state_dict(sd)
    check(opt2, resumed)
    assert not any(np.shares_memory(opt2.state[0][k], sd["state"][0][k]) for k in ("exp_avg", "exp_avg_sq"))
    opt.step(g)
    opt2.step(g)
    want = reference_adam(start, [g, g], lr=0.01, amsgrad=True)
    for a, b, c in zip(params, resumed, want):
        assert same_bits(a, c) and same_bits(b, c)


def _strict_cases(dtype_complex):
    # (what changes in a good state dict, the exception): each as strict as torch.optim's step
    return {
        "no exp_avg_sq": (lambda e, g: e.pop("exp_avg_sq"), ValueError),
        "amsgrad without max_exp_avg_sq": (lambda e, g: g.update(amsgrad=True), ValueError),
        "step a string": (lambda e, g: e.update(step="5"), TypeError),
        "step a bool": (lambda e, g: e.update(step=True), TypeError),
        "step negative": (lambda e, g: e.update(step=-1.0), ValueError),
        "step infinite": (lambda e, g: e.update(step=float("inf")), ValueError),
        "complex exp_avg": (lambda e, g: e.update(exp_avg=e["exp_avg"].astype(dtype_complex)), TypeError),
        "buffers but no step": (lambda e, g: e.pop("step"), ValueError),
    }


@pytest.mark.parametrize("case", list(_strict_cases(np.complex64)))
def test_load_state_dict_is_strict_and_changes_nothing(case):
    change, error = _strict_cases(np.complex64)[case]
    p = np.ones(4, np.float32)
    opt = fastadam.Adam([p], lr=0.1)
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    change(sd["state"][0], sd["param_groups"][0])
    before = (p.copy(), {k: np.copy(v) for k, v in opt.state[0].items()}, dict(opt.param_groups[0]))
    with pytest.raises(error, match="parameter 0"):
        opt.load_state_dict(sd)
    assert np.array_equal(p, before[0]) and opt.param_groups[0] == before[2]
    assert {k: np.copy(v) for k, v in opt.state[0].items()}.keys() == before[1].keys()
    for k, v in opt.state[0].items():
        assert np.array_equal(v, before[1][k])
    opt.step([np.ones(4, np.float32)])  # still steps from where it was
    assert int(opt.state[0]["step"]) == 2


def test_load_state_dict_takes_torchs_sgd_momentum_buffer_none():
    # torch.optim.SGD without momentum saves {"momentum_buffer": None}; it is no buffer.
    p = np.ones((), np.float32)  # 0-d: np.asarray(None, float32) would have been a NaN of its shape
    opt = fastadam.SGD([p], lr=0.1)
    opt.load_state_dict({"state": {0: {"momentum_buffer": None}}, "param_groups": [dict(opt.state_dict()["param_groups"][0])]})
    opt.step([np.ones((), np.float32)])
    assert p == np.float32(0.9)


def test_a_param_shrunk_in_place_is_refused_not_written():
    # ndarray.resize(refcheck=False) can shrink a param at the same address; writing its old
    # size would corrupt the heap, so this runs in a child process.
    code = """
import numpy as np, fastadam
p = np.ones(100_000, np.float32)
opt = fastadam.Adam([p], lr=0.1)
opt.step([np.ones(100_000, np.float32)])
address = p.ctypes.data
p.resize(1000, refcheck=False)
try:
    opt.step([np.ones(100_000, np.float32)])
except ValueError as e:
    assert "resized" in str(e), e
    print("refused", p.ctypes.data == address)
else:
    print("written")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("refused"), (out.returncode, out.stdout, out.stderr[-2000:])


def test_a_param_replaced_in_param_groups_is_taken_with_fresh_state():
    # As torch.optim: the new array is stepped, from fresh state; the old one no longer.
    w, b = np.ones(4, np.float32), np.ones(2, np.float32)
    opt = fastadam.Adam([{"params": [w]}, {"params": [b], "lr": 0.5}], lr=0.1)
    grads = [np.ones(4, np.float32), np.ones(2, np.float32)]
    opt.step(grads)
    old_w = w.copy()
    new_w = np.full(4, 3.0, np.float32)
    opt.param_groups[0]["params"][0] = new_w
    opt.step(grads)
    assert np.array_equal(w, old_w), "the replaced array was still written"
    fresh = np.full(4, 3.0, np.float32)
    fastadam.Adam([fresh], lr=0.1).step([grads[0]])
    assert same_bits(new_w, fresh) and int(opt.state[0]["step"]) == 1 and int(opt.state[1]["step"]) == 2


def test_param_groups_changed_in_other_ways_raise_and_change_nothing():
    w = np.ones(4, np.float32)
    opt = fastadam.Adam([w], lr=0.1)
    opt.step([np.ones(4, np.float32)])
    before = w.copy()
    opt.param_groups.append({"params": [np.ones(3, np.float32)]})
    with pytest.raises(ValueError, match="add_param_group"):
        opt.step([np.ones(4, np.float32)])
    opt.param_groups.pop()
    opt.param_groups[0]["params"].append(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] must stay a list of 1"):
        opt.step([np.ones(4, np.float32)])
    opt.param_groups[0]["params"].pop()
    opt.param_groups[0]["params"][0] = w.astype(np.int32)
    with pytest.raises(TypeError):
        opt.step([np.ones(4, np.float32)])
    opt.param_groups[0]["params"][0] = w
    assert np.array_equal(w, before)
    opt.step([np.ones(4, np.float32)])
    assert int(opt.state[0]["step"]) == 2
