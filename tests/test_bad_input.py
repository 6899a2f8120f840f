"""Bad input: a clear TypeError/ValueError that names the argument, and nothing written.

Every rejected call is made through :func:`assert_rejected`, which snapshots every array
involved (params, grads, state, and the memory behind views) before the call and checks
it bit for bit afterwards. fastadam validates every array of a step before it writes the
first byte, and never updates a temporary copy of the caller's array.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

import fastadam
from fastadam import reference

SHAPE = (4, 4)  # 2-D, so Fortran order and transposition are real layouts
N_TENSORS = 8
BAD = 4  # the 5th tensor of a multi-tensor step carries the bad input
NAN, INF = float("nan"), float("inf")

# ----- snapshots ----------------------------------------------------------------------


def _buffers(obj: Any):
    """Every array or raw buffer reachable from obj: containers, and the bases of views."""
    if isinstance(obj, np.ndarray):
        yield obj
        if obj.base is not None:
            yield from _buffers(obj.base)
    elif isinstance(obj, (bytearray, memoryview)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _buffers(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _buffers(x)


def snapshot(*objs: Any) -> list[tuple[Any, Any]]:
    seen: dict[int, tuple[Any, Any]] = {}
    for b in _buffers(objs):
        if id(b) not in seen:
            seen[id(b)] = (b, b.copy() if isinstance(b, np.ndarray) else bytes(b))
    return list(seen.values())


def assert_unchanged(snap: list[tuple[Any, Any]]) -> None:
    for obj, before in snap:
        if isinstance(obj, np.ndarray):
            assert obj.shape == before.shape and obj.dtype == before.dtype
            assert obj.tobytes() == before.tobytes(), f"a rejected call changed an array of shape {obj.shape}"
        else:
            assert bytes(obj) == before, "a rejected call changed a raw buffer"


def assert_rejected(exc: type[Exception], match: str, fn: Callable[[], Any], *arrays: Any) -> pytest.ExceptionInfo:
    """fn() raises exactly `exc` with a message matching `match`, and every array in `arrays`
    (nested in lists/dicts, including the memory behind views) is bit-for-bit unchanged."""
    snap = snapshot(*arrays)
    with pytest.raises(Exception) as info:
        fn()
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    assert re.search(match, str(info.value)), f"message {str(info.value)!r} does not match {match!r}"
    assert_unchanged(snap)
    return info


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_state_dict_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, sa in a["state"].items():
        sb = b["state"][i]
        assert sa.keys() == sb.keys(), i
        for k, v in sa.items():
            if isinstance(v, np.ndarray):
                assert same_bits(v, sb[k]), (i, k)
            else:
                assert v == sb[k], (i, k)


def live_state(opt: fastadam.Optimizer) -> list[dict]:
    return list(opt.state.values())


# ----- valid inputs -------------------------------------------------------------------


def rand(rng: np.random.Generator, dtype=np.float32, positive: bool = False) -> np.ndarray:
    x = rng.standard_normal(SHAPE)
    return (np.abs(x) * 0.01 if positive else x).astype(dtype)


def dtype_of(i: int):
    return np.float32 if i % 2 == 0 else np.float64  # multi-tensor steps mix dtypes


def adam_arrays(rng, dtype=np.float32) -> dict[str, np.ndarray]:
    exp_avg_sq = rand(rng, dtype, positive=True)
    return {
        "param": rand(rng, dtype),
        "grad": rand(rng, dtype),
        "exp_avg": rand(rng, dtype) * dtype(0.1),
        "exp_avg_sq": exp_avg_sq,
        "max_exp_avg_sq": exp_avg_sq * dtype(0.5),  # below the next exp_avg_sq, so a step raises all of it
    }


def sgd_arrays(rng, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"param": rand(rng, dtype), "grad": rand(rng, dtype), "momentum_buffer": rand(rng, dtype)}


def multi_arrays(rng) -> dict[str, list[np.ndarray]]:
    tensors = [adam_arrays(rng, dtype_of(i)) for i in range(N_TENSORS)]
    return {k + "s": [t[k] for t in tensors] for k in tensors[0]}


ADAM_KW = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=0.01)


def call_adam(a, step=3, **kw):
    kw = {**ADAM_KW, **kw}
    fastadam.adam_step(a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], step=step, max_exp_avg_sq=a["max_exp_avg_sq"], **kw)


def call_sgd(a, step=3, **kw):
    fastadam.sgd_step(a["param"], a["grad"], a["momentum_buffer"], step=step, **{**SGD_KW, **kw})


def call_multi(a, steps=3, **kw):
    kw = {**ADAM_KW, **kw}
    fastadam.adam_step_multi(
        a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], steps=steps, max_exp_avg_sqs=a["max_exp_avg_sqs"], **kw
    )


OPTIMIZERS: dict[str, Callable[..., fastadam.Optimizer]] = {
    "Adam": lambda params, **kw: fastadam.Adam(params, **{**ADAM_KW, **kw}),
    "AdamW": lambda params, **kw: fastadam.AdamW(params, **{"lr": 1e-2, **kw}),
    "SGD": lambda params, **kw: fastadam.SGD(params, **{**SGD_KW, **kw}),
}


def make_params(rng) -> list[np.ndarray]:
    return [rand(rng, dtype_of(i)) for i in range(N_TENSORS)]


def make_grads(rng, params) -> list[np.ndarray]:
    return [rand(rng, p.dtype) for p in params]


def groups_of(params, **group1):
    """Two groups, so the bad 5th tensor sits in the middle of the second one."""
    return [{"params": params[:3]}, {"params": params[3:], "lr": 5e-3, **group1}]


def optimizer_pair(name, rng, warm):
    """An optimizer and a twin on copies of the same params, optionally one valid step in."""
    params = make_params(rng)
    twin_params = [p.copy() for p in params]
    opt, twin = OPTIMIZERS[name](groups_of(params)), OPTIMIZERS[name](groups_of(twin_params))
    if warm:
        grads = make_grads(rng, params)
        opt.step(grads)
        twin.step([g.copy() for g in grads])
    return opt, params, twin, twin_params


def assert_recovers(opt, params, twin, twin_params, rng):
    """After a rejected step, a valid step gives exactly what an optimizer that never saw it gives."""
    grads = make_grads(rng, params)
    opt.step(grads)
    twin.step([g.copy() for g in grads])
    for p, q in zip(params, twin_params):
        assert same_bits(p, q)
    assert_state_dict_equal(opt.state_dict(), twin.state_dict())


# ----- the bad buffers ----------------------------------------------------------------


def _strided(a):  # a[::2] of a buffer twice as long: same shape and values, every other row
    base = np.full((2 * a.shape[0],) + a.shape[1:], 7, dtype=a.dtype)
    base[::2] = a
    return base[::2]


def _transposed(a):  # a transposed view holding a's values
    return np.ascontiguousarray(a.T).T


def _misaligned(a):  # writeable, one byte off its dtype's alignment
    raw = bytearray(a.nbytes + 1)
    m = np.frombuffer(raw, dtype=a.dtype, offset=1, count=a.size).reshape(a.shape)
    m[...] = a
    return m


def _read_only(a):
    b = a.copy()
    b.setflags(write=False)
    return b


def _other_float(a):
    return a.astype(np.float64 if a.dtype == np.float32 else np.float32)


class Kind(NamedTuple):
    make: Callable[[np.ndarray], Any]
    exc: type[Exception]
    hint: str  # what the message must tell the user (what is wrong / what to do)
    where: str  # "any" buffer; "written" ones only (read-only is fine for grad); "paired" with a param


LAYOUT = r"C-contiguous.*ascontiguousarray"
DTYPE = r"float32 and float64|share one dtype, float32 or float64|float32, float64, bfloat16 \(ml_dtypes.bfloat16\) and float16"
NOT_ARRAY = r"numpy\.ndarray.*ascontiguousarray"
KINDS: dict[str, Kind] = {
    "strided": Kind(_strided, ValueError, LAYOUT, "any"),
    "fortran": Kind(np.asfortranarray, ValueError, LAYOUT, "any"),
    "transposed": Kind(_transposed, ValueError, LAYOUT, "any"),
    "broadcast-row": Kind(lambda a: np.broadcast_to(a[0].copy(), a.shape), ValueError, LAYOUT, "any"),
    "misaligned": Kind(_misaligned, ValueError, r"not aligned.*numpy\.require", "any"),
    "float16": Kind(lambda a: a.astype(np.float16), TypeError, DTYPE, "any"),
    "int32": Kind(lambda a: a.astype(np.int32), TypeError, DTYPE, "any"),
    "complex64": Kind(lambda a: a.astype(np.complex64), TypeError, DTYPE, "any"),
    "object": Kind(lambda a: a.astype(object), TypeError, DTYPE, "any"),
    "big-endian": Kind(lambda a: a.astype(a.dtype.newbyteorder(">")), TypeError, r"byte order.*newbyteorder", "any"),
    "list": Kind(lambda a: a.tolist(), TypeError, NOT_ARRAY, "any"),
    "scalar": Kind(lambda a: 1.0, TypeError, NOT_ARRAY, "any"),
    "none": Kind(lambda a: None, TypeError, NOT_ARRAY, "any"),
    "read-only": Kind(_read_only, ValueError, r"read-only.*writeable", "written"),
    "broadcast-to": Kind(lambda a: np.broadcast_to(a.copy(), a.shape), ValueError, r"read-only.*writeable", "written"),
    "mixed-dtype": Kind(_other_float, TypeError, r"share one dtype|a gradient has its param.s dtype", "paired"),
    "other-size": Kind(lambda a: a[:2].copy(), ValueError, r"same shape", "paired"),
    "same-size-other-shape": Kind(lambda a: a.reshape(2, 8).copy(), ValueError, r"same shape", "paired"),
    "flat": Kind(lambda a: a.ravel().copy(), ValueError, r"same shape", "paired"),
}
OPTIONAL = {"max_exp_avg_sq", "momentum_buffer"}  # None means "absent": required here, so ValueError


def expected(kind: str, slot: str, adam: bool = False) -> tuple[type[Exception], str]:
    if kind == "none" and slot in OPTIONAL:
        return ValueError, r"required"
    if kind == "float16" and adam:
        # Adam's functions take float16 (mixed precision, test_mixed_precision.py): here
        # it breaks the pairing with the float32 arrays, and the message gives the rule.
        return TypeError, r"a gradient has its param's dtype|state arrays share one dtype"
    return KINDS[kind].exc, KINDS[kind].hint


def kinds_for(slot: str, *, paired: bool = True, none_ok: bool = False) -> list[str]:
    out = []
    for name, kind in KINDS.items():
        if kind.where == "written" and slot == "grad":
            continue  # grad is only read: a read-only grad is valid (test_read_only_grad_is_accepted)
        if kind.where == "paired" and not paired:
            continue
        if name == "none" and none_ok:
            continue
        out.append(name)
    return out


def _check_hint(info, hint):
    assert re.search(hint, str(info.value)), f"message {str(info.value)!r} does not say {hint!r}"


# ----- every buffer argument, every bad kind ------------------------------------------

FUNCTIONAL = {
    "adam_step": (adam_arrays, call_adam, ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    "sgd_step": (sgd_arrays, call_sgd, ["param", "grad", "momentum_buffer"]),
}


@pytest.mark.parametrize(
    "api, slot, kind",
    [(api, slot, kind) for api, (_, _, slots) in FUNCTIONAL.items() for slot in slots for kind in kinds_for(slot)
     if not (api == "adam_step" and slot == "grad" and kind == "float16")],  # a float16 grad of a float32 param is valid
)
def test_bad_buffer_functional(api, slot, kind):
    make, call, _ = FUNCTIONAL[api]
    arrays = make(np.random.default_rng(0))
    arrays[slot] = KINDS[kind].make(arrays[slot])
    exc, hint = expected(kind, slot, adam=api == "adam_step")
    # Blamed first ("adam_step(): param ...") or as the array another fails to match
    # ("adam_step(): grad has dtype float32 but param has dtype float64").
    blamed = re.escape(f"{api}(): {slot}") + r"\b|\bbut " + re.escape(slot) + r" has\b"
    info = assert_rejected(exc, blamed, lambda: call(arrays), arrays)
    assert str(info.value).count(f"{api}():") == 1, str(info.value)
    _check_hint(info, hint)


MULTI_SLOTS = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]


@pytest.mark.parametrize("slot, kind", [(s, k) for s in MULTI_SLOTS for k in kinds_for(s[:-1]) if (s, k) != ("grads", "float16")])
def test_bad_5th_buffer_multi_changes_no_tensor(slot, kind):
    """adam_step_multi validates all 8 tensors before writing any; then a valid call works."""
    rng = np.random.default_rng(1)
    arrays = multi_arrays(rng)
    twin = {k: [a.copy() for a in v] for k, v in arrays.items()}
    good = arrays[slot][BAD]
    arrays[slot][BAD] = KINDS[kind].make(good)
    exc, hint = expected(kind, slot[:-1], adam=True)
    blamed = re.escape(f"adam_step_multi(): {slot}[{BAD}]") + r"|\bbut " + re.escape(f"{slot}[{BAD}]") + r" has\b"
    info = assert_rejected(exc, blamed, lambda: call_multi(arrays), arrays)
    assert str(info.value).count("adam_step_multi():") == 1, str(info.value)
    _check_hint(info, hint)

    arrays[slot][BAD] = good
    call_multi(arrays)
    call_multi(twin)
    for k in arrays:
        for a, b in zip(arrays[k], twin[k]):
            assert same_bits(a, b), k


@pytest.mark.parametrize(
    "opt_name, kind",
    [(o, k) for o in OPTIMIZERS for k in kinds_for("param", paired=False) if not (o != "SGD" and k == "float16")],
)  # Adam takes float16 params (test_optim_mixed_precision.py)
def test_bad_param_optimizer_constructor(opt_name, kind):
    params = make_params(np.random.default_rng(2))
    params[BAD] = KINDS[kind].make(params[BAD])
    info = assert_rejected(
        KINDS[kind].exc, re.escape(f"{opt_name}(): params[{BAD}]"), lambda: OPTIMIZERS[opt_name](groups_of(params)), params
    )
    _check_hint(info, KINDS[kind].hint)


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-a-step"])
@pytest.mark.parametrize(
    "opt_name, kind",
    [(o, k) for o in OPTIMIZERS for k in kinds_for("grad", none_ok=True) if not (o != "SGD" and k == "float16")],
)  # a float16 gradient of a float32 param is valid for Adam (test_optim_mixed_precision.py)
def test_bad_5th_grad_optimizer_step_changes_nothing(opt_name, kind, warm):
    """Params, state (including lazily created state) and step counts are untouched, the
    state dict is the same, and the next valid step equals a fresh optimizer's."""
    rng = np.random.default_rng(3)
    opt, params, twin, twin_params = optimizer_pair(opt_name, rng, warm)
    before = opt.state_dict()
    grads = make_grads(rng, params)
    grads[BAD] = KINDS[kind].make(grads[BAD])
    info = assert_rejected(
        KINDS[kind].exc, r"\.step\(\): " + re.escape(f"grads[{BAD}]"), lambda: opt.step(grads), params, grads, live_state(opt)
    )
    _check_hint(info, KINDS[kind].hint)
    assert_state_dict_equal(opt.state_dict(), before)
    if not warm:
        assert opt.state_dict()["state"] == {} and opt.state == {}, "a rejected step left lazily created state behind"
    assert_recovers(opt, params, twin, twin_params, rng)


def test_read_only_grad_is_accepted():
    """grad is only read, so a read-only grad (or a same-shape np.broadcast_to view) is valid."""
    rng = np.random.default_rng(4)
    for make in (_read_only, lambda g: np.broadcast_to(g.copy(), g.shape)):
        a = adam_arrays(rng)
        expect = {k: v.copy() for k, v in a.items()}
        a["grad"] = make(a["grad"])
        call_adam(a)
        reference.adam_step(
            expect["param"], expect["grad"], expect["exp_avg"], expect["exp_avg_sq"], step=3,
            max_exp_avg_sq=expect["max_exp_avg_sq"], **ADAM_KW,
        )
        for k in expect:
            assert same_bits(a[k], expect[k]), k


# ----- aliasing and overlapping memory ------------------------------------------------


def shifted_pair(arrays, k1, k2, i1=None, i2=None):
    """Make arrays[k1] and arrays[k2] views of one buffer, the second one element further on."""
    a1 = arrays[k1] if i1 is None else arrays[k1][i1]
    buf = np.empty(a1.size + 1, dtype=a1.dtype)
    v1, v2 = buf[:-1].reshape(a1.shape), buf[1:].reshape(a1.shape)
    v1[...] = a1
    if i1 is None:
        arrays[k1], arrays[k2] = v1, v2
    else:
        arrays[k1][i1], arrays[k2][i2] = v1, v2


def both(n1, n2):
    """Matches a message naming both arguments and saying they share memory."""
    return rf"(?=.*{re.escape(n1)}(?![\w]))(?=.*{re.escape(n2)}(?![\w])).*share memory"


def _set(k, src):
    def f(a):
        a[k] = a[src]

    return f


def _set_i(k, i, src, j):
    def f(a):
        a[k][i] = a[src][j]

    return f


def _overlapping_params(a):  # params[2] and params[4]: two views of one buffer, half of them shared
    buf = np.zeros(3 * a["params"][2].size // 2, dtype=np.float32)
    a["params"][2] = buf[: a["params"][2].size].reshape(SHAPE)
    a["params"][4] = buf[-a["params"][4].size :].reshape(SHAPE)


ALIASES = [
    ("adam_step", "param-is-exp_avg", _set("exp_avg", "param"), both("param", "exp_avg")),
    ("adam_step", "exp_avg_sq-shifted-over-exp_avg", lambda a: shifted_pair(a, "exp_avg", "exp_avg_sq"), both("exp_avg", "exp_avg_sq")),
    ("adam_step", "max-is-exp_avg_sq", _set("max_exp_avg_sq", "exp_avg_sq"), both("exp_avg_sq", "max_exp_avg_sq")),
    ("adam_step", "max-shifted-over-param", lambda a: shifted_pair(a, "param", "max_exp_avg_sq"), both("param", "max_exp_avg_sq")),
    ("adam_step", "grad-is-param", _set("grad", "param"), both("param", "grad")),
    ("adam_step", "grad-shifted-over-exp_avg_sq", lambda a: shifted_pair(a, "exp_avg_sq", "grad"), both("exp_avg_sq", "grad")),
    ("sgd_step", "param-is-momentum_buffer", _set("momentum_buffer", "param"), both("param", "momentum_buffer")),
    ("sgd_step", "grad-is-momentum_buffer", _set("grad", "momentum_buffer"), both("grad", "momentum_buffer")),
    ("sgd_step", "grad-shifted-over-param", lambda a: shifted_pair(a, "param", "grad"), both("param", "grad")),
    ("multi", "same-param-twice", _set_i("params", BAD, "params", 0), both("params[0]", f"params[{BAD}]")),
    ("multi", "overlapping-param-views", _overlapping_params, both("params[2]", f"params[{BAD}]")),
    ("multi", "exp_avg-is-another-param", _set_i("exp_avgs", BAD, "params", 2), both("params[2]", f"exp_avgs[{BAD}]")),
    ("multi", "grad-shifted-over-other-state",
     lambda a: shifted_pair(a, "exp_avg_sqs", "grads", 2, BAD), both("exp_avg_sqs[2]", f"grads[{BAD}]")),
    ("multi", "max-is-own-exp_avg_sq", _set_i("max_exp_avg_sqs", BAD, "exp_avg_sqs", BAD), both(f"exp_avg_sqs[{BAD}]", f"max_exp_avg_sqs[{BAD}]")),
]
ALIAS_APIS = {"adam_step": (adam_arrays, call_adam), "sgd_step": (sgd_arrays, call_sgd), "multi": (lambda rng: multi_arrays(rng), call_multi)}


@pytest.mark.parametrize("api, case, alias, match", ALIASES, ids=[f"{a}-{c}" for a, c, _, _ in ALIASES])
def test_aliasing_is_rejected(api, case, alias, match):
    make, call = ALIAS_APIS[api]
    arrays = make(np.random.default_rng(5))
    alias(arrays)
    assert_rejected(ValueError, match, lambda: call(arrays), arrays)


def _same_twice(p):
    return [p[0], p[1], p[0]]


def _overlapping_views(p):
    buf = np.zeros(3 * p[0].size // 2, dtype=np.float32)
    return [buf[: p[0].size].reshape(SHAPE), buf[-p[0].size :].reshape(SHAPE)]


CTOR_ALIASES = {
    "same-array-twice": (lambda p: _same_twice(p), both("params[0]", "params[2]")),
    "overlapping-views": (_overlapping_views, both("params[0]", "params[1]")),
    "same-array-in-two-groups": (lambda p: [{"params": [p[0], p[1]]}, {"params": [p[2], p[0]]}], both("params[0]", "params[3]")),
    "same-array-under-two-names": (lambda p: {"a": p[0], "b": p[1], "c": p[0]}, both("params[0]", "params[2]")),
}


@pytest.mark.parametrize("case", CTOR_ALIASES)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_optimizer_constructed_with_aliased_params(opt_name, case):
    build, match = CTOR_ALIASES[case]
    params = build(make_params(np.random.default_rng(6)))
    assert_rejected(ValueError, match, lambda: OPTIMIZERS[opt_name](params), params)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_add_param_group_with_a_param_already_held(opt_name):
    rng = np.random.default_rng(7)
    params = make_params(rng)
    opt = OPTIMIZERS[opt_name](params[:4])
    groups_before = [dict(g) for g in opt.param_groups]
    new = {"params": [params[4], params[2]]}
    assert_rejected(ValueError, both("params[2]", "params[5]"), lambda: opt.add_param_group(new), params)
    assert opt.param_groups == groups_before
    opt.step(make_grads(rng, params[:4]))  # still a working 4-param optimizer


STEP_ALIASES = {  # (params, opt) -> (the bad 5th grad, what the message must say)
    "grad-is-own-param": lambda p, o: (p[BAD], both(f"params[{BAD}]", f"grads[{BAD}]")),
    "grad-is-other-param": lambda p, o: (p[6], both("params[6]", f"grads[{BAD}]")),
    "grad-is-own-state": lambda p, o: (
        o.state[BAD]["exp_avg" if "exp_avg" in o.state[BAD] else "momentum_buffer"], rf"grads\[{BAD}\].*share memory|share memory.*grads\[{BAD}\]"
    ),
}


@pytest.mark.parametrize("case", STEP_ALIASES)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_optimizer_step_with_aliased_grad(opt_name, case):
    rng = np.random.default_rng(8)
    opt, params, twin, twin_params = optimizer_pair(opt_name, rng, warm=True)
    before = opt.state_dict()
    grads = make_grads(rng, params)
    grads[BAD], match = STEP_ALIASES[case](params, opt)
    assert_rejected(ValueError, match, lambda: opt.step(grads), params, grads, live_state(opt))
    assert_state_dict_equal(opt.state_dict(), before)
    assert_recovers(opt, params, twin, twin_params, rng)


def test_read_only_grads_may_share_memory():
    """Only written buffers must not overlap (and grad must not overlap them): several
    tensors reading one gradient array is valid input, as in torch."""
    rng = np.random.default_rng(9)
    a = multi_arrays(rng)
    shared = [rand(rng, dtype_of(i % 2)) for i in range(2)]
    a["grads"] = [shared[i % 2] for i in range(N_TENSORS)]
    expect = {k: [x.copy() for x in v] for k, v in a.items()}
    call_multi(a)
    expect["grads"] = [x.copy() for x in a["grads"]]
    call_multi(expect)
    for k in a:
        for x, y in zip(a[k], expect[k]):
            assert same_bits(x, y), k

    params = make_params(rng)
    opt = fastadam.Adam(params)
    opt.step([shared[i % 2] for i in range(N_TENSORS)])


# ----- required / forbidden optional state ---------------------------------------------

OPTIONAL_STATE = [
    ("adam_step amsgrad without max_exp_avg_sq", lambda a: call_adam({**a, "max_exp_avg_sq": None}), adam_arrays,
     r"adam_step\(\): max_exp_avg_sq\b.*required"),
    ("adam_step max_exp_avg_sq without amsgrad", lambda a: call_adam(a, amsgrad=False), adam_arrays,
     r"adam_step\(\): max_exp_avg_sq\b.*only used"),
    ("multi amsgrad without max_exp_avg_sqs", lambda a: call_multi({**a, "max_exp_avg_sqs": None}), multi_arrays,
     r"max_exp_avg_sqs\b.*required"),
    ("multi max_exp_avg_sqs without amsgrad", lambda a: call_multi(a, amsgrad=False), multi_arrays,
     r"max_exp_avg_sqs\b.*only used"),
    ("multi 5th max_exp_avg_sq missing",
     lambda a: call_multi({**a, "max_exp_avg_sqs": a["max_exp_avg_sqs"][:BAD] + [None] + a["max_exp_avg_sqs"][BAD + 1 :]}),
     multi_arrays, re.escape(f"max_exp_avg_sqs[{BAD}]") + ".*required"),
    ("sgd_step momentum without momentum_buffer", lambda a: call_sgd({**a, "momentum_buffer": None}), sgd_arrays,
     r"sgd_step\(\): momentum_buffer\b.*required"),
    ("sgd_step momentum_buffer with momentum 0", lambda a: call_sgd(a, momentum=0.0), sgd_arrays,
     r"sgd_step\(\): momentum_buffer\b.*only used"),
]


@pytest.mark.parametrize("call, make, match", [c[1:] for c in OPTIONAL_STATE], ids=[c[0] for c in OPTIONAL_STATE])
def test_optional_state_required_exactly_when_used(call, make, match):
    arrays = make(np.random.default_rng(10))
    assert_rejected(ValueError, match, lambda: call(arrays), arrays)


# ----- structure of the multi-tensor and optimizer calls --------------------------------


def _replace(key, value):
    return lambda a: call_multi({**a, key: value(a)})


MULTI_STRUCTURE = [
    ("params-an-array", _replace("params", lambda a: a["params"][0]), TypeError, r"\bparams\b"),
    ("grads-one-short", _replace("grads", lambda a: a["grads"][:-1]), ValueError, r"\bgrads\b"),
    ("exp_avgs-one-long", _replace("exp_avgs", lambda a: a["exp_avgs"] + [a["exp_avgs"][0].copy()]), ValueError, r"\bexp_avgs\b"),
    ("steps-one-short", lambda a: call_multi(a, steps=[3] * (N_TENSORS - 1)), ValueError, r"\bsteps\b"),
    ("steps-5th-zero", lambda a: call_multi(a, steps=[3] * BAD + [0] + [3] * 3), ValueError, re.escape(f"steps[{BAD}]")),
    ("steps-5th-negative", lambda a: call_multi(a, steps=[3] * BAD + [-2] + [3] * 3), ValueError, re.escape(f"steps[{BAD}]")),
    ("steps-5th-float", lambda a: call_multi(a, steps=[3] * BAD + [3.0] + [3] * 3), TypeError, re.escape(f"steps[{BAD}]")),
    ("steps-5th-bool", lambda a: call_multi(a, steps=[3] * BAD + [True] + [3] * 3), TypeError, re.escape(f"steps[{BAD}]")),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in MULTI_STRUCTURE], ids=[c[0] for c in MULTI_STRUCTURE])
def test_multi_structure(call, exc, match):
    arrays = multi_arrays(np.random.default_rng(11))
    assert_rejected(exc, match, lambda: call(arrays), arrays)


OPT_STRUCTURE = [
    ("one-grad-short", lambda g: g[:-1], ValueError, r"grad"),
    ("a-single-array", lambda g: g[0], TypeError, r"\bgrads\b"),
    ("by-name-for-list-params", lambda g: {"w": g[0]}, TypeError, r"\bgrads\b"),
]


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("make, exc, match", [c[1:] for c in OPT_STRUCTURE], ids=[c[0] for c in OPT_STRUCTURE])
def test_optimizer_step_structure(opt_name, make, exc, match):
    rng = np.random.default_rng(12)
    opt, params, twin, twin_params = optimizer_pair(opt_name, rng, warm=False)
    grads = make_grads(rng, params)
    assert_rejected(exc, match, lambda: opt.step(make(grads)), params, grads)
    assert opt.state_dict()["state"] == {}
    assert_recovers(opt, params, twin, twin_params, rng)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_optimizer_step_unknown_name(opt_name):
    rng = np.random.default_rng(13)
    params = {f"w{i}": p for i, p in enumerate(make_params(rng))}
    opt = OPTIMIZERS[opt_name](params)
    grads = {name: rand(rng, p.dtype) for name, p in params.items()}
    grads["nope"] = grads["w0"]
    assert_rejected(ValueError, r"\bgrads\b.*nope", lambda: opt.step(grads), params, grads)
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("params, exc", [(lambda p: p[0], TypeError), (lambda p: [], ValueError)], ids=["single-array", "empty"])
def test_optimizer_params_structure(opt_name, params, exc):
    p = params(make_params(np.random.default_rng(14)))
    assert_rejected(exc, r"param", lambda: OPTIMIZERS[opt_name](p), p)


# ----- hyper-parameters ---------------------------------------------------------------

V, T = ValueError, TypeError
ADAM_HYPERS = [
    *[("lr", v, V) for v in (-1e-3, NAN, INF, -INF)],
    *[("lr", v, T) for v in (None, "0.1", True, 1j)],
    *[("eps", v, V) for v in (-1e-8, NAN, INF)],
    ("eps", None, T),
    *[("weight_decay", v, V) for v in (-0.1, NAN, INF)],
    ("weight_decay", "0", T),
    *[("betas", v, V) for v in ((1.0, 0.999), (-0.1, 0.999), (0.9, 1.0), (0.9, -0.1), (NAN, 0.999), (0.9, NAN), (INF, 0.999), (0.9, -INF))],
    *[("betas", v, T) for v in ((0.9,), (0.9, 0.99, 0.999), 0.9, None, (0.9, "x"), (None, 0.999))],
]
SGD_HYPERS = [
    *[("lr", v, V) for v in (-0.1, NAN, INF)],
    *[("lr", v, T) for v in (None, True, 1j)],
    *[("momentum", v, V) for v in (-0.1, NAN, INF)],
    ("momentum", None, T),
    *[("dampening", v, V) for v in (NAN, INF, -INF)],
    ("dampening", None, T),
    *[("weight_decay", v, V) for v in (-0.1, NAN, INF)],
]
SGD_NESTEROV = [  # nesterov needs momentum > 0 and dampening 0
    ({"nesterov": True, "momentum": 0.0}, V, "nesterov"),
    ({"nesterov": True, "dampening": 0.1}, V, "nesterov"),
]
STEPS = [(0, V), (-1, V), (1.0, T), (2.5, T), (True, T), (False, T), (np.float64(3.0), T), ("1", T), (None, T)]


def _hyper_cases(table):
    return [pytest.param({k: v}, e, k, id=f"{k}={v!r}") for k, v, e in table]


ADAM_CASES = _hyper_cases(ADAM_HYPERS)
SGD_CASES = _hyper_cases(SGD_HYPERS) + [pytest.param(kw, e, n, id=f"{kw}") for kw, e, n in SGD_NESTEROV]


def _name(n):
    return rf"\b{n}\b"


@pytest.mark.parametrize("kw, exc, name", ADAM_CASES)
@pytest.mark.parametrize("api", ["adam_step", "multi"])
def test_adam_hyper_parameters_functional(api, kw, exc, name):
    make, call = ALIAS_APIS[api]
    arrays = make(np.random.default_rng(15))
    assert_rejected(exc, _name(name), lambda: call(arrays, **kw), arrays)


@pytest.mark.parametrize("kw, exc, name", SGD_CASES)
def test_sgd_hyper_parameters_functional(kw, exc, name):
    arrays = sgd_arrays(np.random.default_rng(16))
    assert_rejected(exc, _name(name), lambda: call_sgd(arrays, **kw), arrays)


@pytest.mark.parametrize("step, exc", STEPS, ids=[repr(s) for s, _ in STEPS])
@pytest.mark.parametrize("api", ["adam_step", "multi", "sgd_step"])
def test_step_must_be_a_positive_integer(api, step, exc):
    make, call = ALIAS_APIS[api]
    arrays = make(np.random.default_rng(17))
    if api == "multi":
        assert_rejected(exc, _name("steps"), lambda: call(arrays, steps=step), arrays)
    else:
        assert_rejected(exc, _name("step"), lambda: call(arrays, step=step), arrays)


@pytest.mark.parametrize(
    "opt_name, kw, exc, name",
    [pytest.param(o, *c.values, id=f"{o}-{c.id}") for o in ("Adam", "AdamW") for c in ADAM_CASES]
    + [pytest.param("SGD", *c.values, id=f"SGD-{c.id}") for c in SGD_CASES],
)
def test_hyper_parameters_optimizer_constructor(opt_name, kw, exc, name):
    params = make_params(np.random.default_rng(18))
    assert_rejected(exc, _name(name), lambda: OPTIMIZERS[opt_name](params, **kw), params)
    # the same value in a param group of its own
    assert_rejected(exc, r"param_groups\[1\].*" + _name(name), lambda: OPTIMIZERS[opt_name](groups_of(params, **kw)), params)


GROUP_MUTATIONS = [
    *[("Adam", kw, e, n) for kw, e, n in [
        ({"lr": -1}, V, "lr"), ({"lr": NAN}, V, "lr"), ({"lr": "0.1"}, T, "lr"), ({"eps": -1e-8}, V, "eps"),
        ({"weight_decay": INF}, V, "weight_decay"), ({"betas": (0.9, 1.0)}, V, "betas"),
        ({"betas": (-0.1, 0.999)}, V, "betas"), ({"betas": 0.9}, T, "betas"),
    ]],
    ("AdamW", {"lr": -1}, V, "lr"),
    ("AdamW", {"weight_decay": NAN}, V, "weight_decay"),
    ("AdamW", {"betas": (1.0, 0.999)}, V, "betas"),
    *[("SGD", kw, e, n) for kw, e, n in [
        ({"lr": -1}, V, "lr"), ({"momentum": -0.1}, V, "momentum"), ({"dampening": NAN}, V, "dampening"),
        ({"weight_decay": -1}, V, "weight_decay"), ({"nesterov": True, "dampening": 0.5}, V, "nesterov"),
    ]],
]


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-a-step"])
@pytest.mark.parametrize("group", [0, 1])
@pytest.mark.parametrize("opt_name, kw, exc, name", GROUP_MUTATIONS, ids=[f"{o}-{kw}" for o, kw, _, _ in GROUP_MUTATIONS])
def test_mutated_param_group_rejected_at_step(opt_name, kw, exc, name, group, warm):
    """opt.param_groups[g][key] = bad, then step: raises naming the group and key, changes nothing."""
    rng = np.random.default_rng(19)
    opt, params, twin, twin_params = optimizer_pair(opt_name, rng, warm)
    saved = {k: opt.param_groups[group][k] for k in kw}
    opt.param_groups[group].update(kw)
    before = opt.state_dict()
    grads = make_grads(rng, params)
    assert_rejected(
        exc, rf"param_groups\[{group}\].*" + _name(name), lambda: opt.step(grads), params, grads, live_state(opt)
    )
    assert_state_dict_equal(opt.state_dict(), before)
    if not warm:
        assert opt.state == {}, "a rejected step left lazily created state behind"
    opt.param_groups[group].update(saved)
    assert_recovers(opt, params, twin, twin_params, rng)


# ----- no silent copies: a valid call writes into the caller's arrays ---------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_adam_step_writes_into_the_callers_memory(dtype):
    rng = np.random.default_rng(20)
    a = adam_arrays(rng, dtype)
    # param as an aligned C-contiguous view into a larger buffer: the write lands there, and only there
    base = np.full(a["param"].size + 2, 123.0, dtype=dtype)
    base[1:-1] = a["param"].ravel()
    a["param"] = base[1:-1].reshape(SHAPE)
    ids = {k: id(v) for k, v in a.items()}
    before = {k: v.copy() for k, v in a.items()}
    expect = {k: v.copy() for k, v in a.items()}
    call_adam(a)
    reference.adam_step(
        expect["param"], expect["grad"], expect["exp_avg"], expect["exp_avg_sq"], step=3,
        max_exp_avg_sq=expect["max_exp_avg_sq"], **ADAM_KW,
    )
    assert {k: id(v) for k, v in a.items()} == ids
    for k in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert not np.array_equal(a[k], before[k]), f"{k} was not updated in place"
        assert same_bits(a[k], expect[k]), k
    assert same_bits(a["grad"], before["grad"])
    assert base[0] == 123.0 and base[-1] == 123.0
    assert same_bits(base[1:-1].reshape(SHAPE), expect["param"])


def test_sgd_step_writes_into_the_callers_memory():
    a = sgd_arrays(np.random.default_rng(21))
    before = {k: v.copy() for k, v in a.items()}
    expect = {k: v.copy() for k, v in a.items()}
    call_sgd(a)
    reference.sgd_step(expect["param"], expect["grad"], expect["momentum_buffer"], step=3, **SGD_KW)
    for k in ("param", "momentum_buffer"):
        assert not np.array_equal(a[k], before[k]), f"{k} was not updated in place"
        assert same_bits(a[k], expect[k]), k
    assert same_bits(a["grad"], before["grad"])


def test_adam_step_multi_writes_into_the_callers_memory():
    a = multi_arrays(np.random.default_rng(22))
    before = {k: [x.copy() for x in v] for k, v in a.items()}
    call_multi(a)
    for i in range(N_TENSORS):
        t = {k[:-1]: before[k][i].copy() for k in before}
        reference.adam_step(
            t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], step=3, max_exp_avg_sq=t["max_exp_avg_sq"], **ADAM_KW
        )
        for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            assert not np.array_equal(a[k][i], before[k][i]), f"{k}[{i}] was not updated in place"
            assert same_bits(a[k][i], t[k[:-1]]), (k, i)
        assert same_bits(a["grads"][i], before["grads"][i])


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_optimizer_step_writes_into_the_callers_arrays(opt_name):
    rng = np.random.default_rng(23)
    params = make_params(rng)
    named = {f"w{i}": p for i, p in enumerate(params)}
    before = [p.copy() for p in params]
    opt = OPTIMIZERS[opt_name](named)
    for _ in range(2):
        opt.step({name: rand(rng, p.dtype) for name, p in named.items()})
    for i, p in enumerate(params):
        assert named[f"w{i}"] is p
        assert not np.array_equal(p, before[i]), f"param {i} was not updated in place"
    state = opt.state  # live buffers: the next step writes into these very arrays
    held = {(i, k): v for i, s in state.items() for k, v in s.items() if isinstance(v, np.ndarray)}
    held_before = {key: v.copy() for key, v in held.items()}
    assert held
    opt.step({name: rand(rng, p.dtype) for name, p in named.items()})
    for key, v in held.items():
        assert opt.state[key[0]][key[1]] is v
        assert not np.array_equal(v, held_before[key]), f"state {key} was not updated in place"
