"""The private step plan (_core._StepPlan) and hyper-parameter table, driven directly.

The optimizers (optim.py, torch.py) are thin layers over this API; these tests pin what
they rely on: results bit-identical to fastadam.reference, counts kept by the plan,
hyper-parameters read by name at every step, stale plans reported (numpy mode: an
error; torch mode: False with nothing written), errors naming the tensor by its label,
and nothing written by a rejected step.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
from conftest import same_bits, torch_or_skip

from fastadam import _core, reference

ADAM_GROUP = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "decoupled_weight_decay": False,
              "amsgrad": False, "maximize": False}
SGD_GROUP = {"lr": 0.1, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.01, "nesterov": False, "maximize": False}


def arrays(rng, n, dtype=np.float32, shape=(3, 5)):
    return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]


def copies(xs):
    return [None if x is None else x.copy() for x in xs]


def assert_same(got, want):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert same_bits(g, w)


def adam_plan(rng, n=4, groups=(2, 2), amsgrad_state=False, labels=None, dtype=np.float32):
    params = arrays(rng, n, dtype)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    mx = [np.zeros_like(p) for p in params] if amsgrad_state else [None] * n
    plan = _core._StepPlan("adam", "Adam.step()", params, [m, v, mx], list(groups), labels)
    return plan, params, m, v, mx


# ----- the table ------------------------------------------------------------------------


def test_hyper_names_are_the_tables():
    assert _core._hyper_names("adam") == ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad", "maximize")
    assert _core._hyper_names("sgd") == ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    with pytest.raises(ValueError, match="kind must be 'adam' or 'sgd'"):
        _core._hyper_names("rmsprop")


def test_check_group_reads_by_name_and_ignores_other_keys():
    _core._check_group("adam", {**ADAM_GROUP, "params": [], "foreach": None, "fused": True, "capturable": False}, "Adam()")
    _core._check_group("sgd", dict(SGD_GROUP), "SGD()")


@pytest.mark.parametrize("kind, change, exc, message", [
    ("adam", {"lr": -1}, ValueError, "Adam(): param_groups[1]: lr must be >= 0, got -1"),
    ("adam", {"betas": (0.9, 1.0)}, ValueError, "betas must lie in [0, 1)"),
    ("adam", {"betas": 0.9}, TypeError, "betas must be a pair"),
    ("adam", {"eps": float("nan")}, ValueError, "eps must be finite"),
    ("adam", {"lr": "0.1"}, TypeError, "lr must be a real number"),
    ("adam", {"amsgrad": 1}, TypeError, "amsgrad must be True or False"),
    ("sgd", {"nesterov": True}, ValueError, "nesterov=True requires momentum > 0 and dampening = 0"),
    ("sgd", {"momentum": -0.5}, ValueError, "momentum must be >= 0"),
])
def test_check_group_errors_start_with_where(kind, change, exc, message):
    group = {**(ADAM_GROUP if kind == "adam" else SGD_GROUP), **change}
    with pytest.raises(exc) as info:
        _core._check_group(kind, group, "Adam(): param_groups[1]")
    assert str(info.value).startswith("Adam(): param_groups[1]: ")
    assert message in str(info.value)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_check_group_missing_key(kind):
    group = dict(ADAM_GROUP if kind == "adam" else SGD_GROUP)
    del group["lr"]
    with pytest.raises(ValueError, match=re.escape("X(): param_groups[0]: param group has no 'lr'")):
        _core._check_group(kind, group, "X(): param_groups[0]")


# ----- numpy mode -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_adam_matches_reference_and_counts_steps(dtype):
    rng = np.random.default_rng(1)
    plan, params, m, v, _ = adam_plan(rng, dtype=dtype)
    want_p, want_m, want_v = copies(params), copies(m), copies(v)
    steps = np.zeros(4, dtype=np.int64)
    groups = [{**ADAM_GROUP, "params": params[:2]},
              {**ADAM_GROUP, "lr": 3e-3, "decoupled_weight_decay": True, "foreach": None, "params": params[2:]}]
    for t in range(3):
        grads = arrays(rng, 4, dtype)
        grads[3] = None if t == 1 else grads[3]  # skipped once: its count lags by one
        plan.step(grads, steps, groups)
        for i in range(4):
            if grads[i] is not None:
                g = groups[i // 2]
                kw = {k: g[k] for k in _core._hyper_names("adam") if k != "amsgrad"}
                reference.adam_step(want_p[i], grads[i], want_m[i], want_v[i], step=int(steps[i]), **kw)
    assert steps.tolist() == [3, 3, 3, 2]
    assert_same(params, want_p)
    assert_same(m, want_m)
    assert_same(v, want_v)


def test_numpy_hyper_parameters_are_read_at_every_step():
    rng = np.random.default_rng(2)
    plan, params, *_ = adam_plan(rng)
    groups = [{**ADAM_GROUP, "params": params[:2]}, {**ADAM_GROUP, "params": params[2:]}]
    steps = np.zeros(4, dtype=np.int64)
    groups[1]["lr"] = 0.0  # a scheduler's write: the second group stops moving
    before = copies(params)
    plan.step(arrays(rng, 4), steps, groups)
    assert not same_bits(params[0], before[0])
    assert same_bits(params[2], before[2]) and same_bits(params[3], before[3])


def test_numpy_rejected_step_writes_nothing_and_counts_nothing():
    rng = np.random.default_rng(3)
    plan, params, m, v, _ = adam_plan(rng)
    steps = np.array([5, 5, 5, 5], dtype=np.int64)
    groups = [{**ADAM_GROUP, "params": params[:2]}, {**ADAM_GROUP, "params": params[2:]}]
    snapshot = copies(params + m + v)
    bad_grads = [
        (arrays(rng, 3) + [np.zeros((5, 3), np.float32)], ValueError, r"Adam\.step\(\): grads\[3\] has shape \(5,3\)"),
        (arrays(rng, 3) + [np.zeros((3, 5), np.float64)], TypeError, r"grads\[3\] has dtype float64"),
        (arrays(rng, 3) + [np.zeros((5, 3), np.float32).T], ValueError, r"grads\[3\] is not C-contiguous"),
        (arrays(rng, 3) + [[0.0] * 15], TypeError, r"grads\[3\] must be a numpy\.ndarray"),
        (arrays(rng, 3) + [params[0]], ValueError, r"share memory"),
    ]
    for grads, exc, pattern in bad_grads:
        with pytest.raises(exc, match=pattern):
            plan.step(grads, steps, groups)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr must be >= 0"):
        plan.step(arrays(rng, 4), steps, [groups[0], {**groups[1], "lr": -1.0}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: param group has no 'eps'"):
        plan.step(arrays(rng, 4), steps, [{k: x for k, x in groups[0].items() if k != "eps"}, groups[1]])
    # the groups no longer hold the plan's params (one group, a replaced or a missing array): False, nothing written
    assert plan.step(arrays(rng, 4), steps, [{**ADAM_GROUP, "params": params}]) is False
    assert plan.step(arrays(rng, 4), steps, [groups[0], {**groups[1], "params": [params[2], params[3].copy()]}]) is False
    assert plan.step(arrays(rng, 4), steps, [groups[0], dict(ADAM_GROUP)]) is False
    # amsgrad needs max_exp_avg_sq, which this plan does not have: the optimizer must rebuild it.
    with pytest.raises(RuntimeError, match=r"stale plan.*params\[2\] has a gradient but no state"):
        plan.step(arrays(rng, 4), steps, [groups[0], {**groups[1], "amsgrad": True}])
    assert_same(params + m + v, snapshot)
    assert steps.tolist() == [5, 5, 5, 5]


def test_numpy_labels_name_tensors():
    rng = np.random.default_rng(4)
    labels = [f"param_groups[0]['params'][{i}]" for i in range(2)]
    plan, params, *_ = adam_plan(rng, n=2, groups=(2,), labels=labels)
    with pytest.raises(ValueError, match=re.escape("Adam.step(): the gradient of param_groups[0]['params'][1] has shape")):
        plan.step([np.zeros((3, 5), np.float32), np.zeros(15, np.float32)], np.zeros(2, np.int64), [{**ADAM_GROUP, "params": params}])
    p = arrays(rng, 2)
    with pytest.raises(ValueError, match=re.escape("X.step(): param_groups[0]['params'][1] and exp_avg of param_groups[0]['params'][0] share memory")
                       + "|" + re.escape("X.step(): exp_avg of param_groups[0]['params'][0] and param_groups[0]['params'][1] share memory")):
        _core._StepPlan("adam", "X.step()", p, [[p[1], None], [np.zeros_like(p[0]), None], [None, None]], [2], labels)


def test_numpy_sgd_count_zero_means_new_buffer():
    rng = np.random.default_rng(5)
    params = arrays(rng, 2)
    bufs = [np.full_like(params[0], 7.0), np.full_like(params[1], 7.0)]
    plan = _core._StepPlan("sgd", "SGD.step()", params, [bufs], [2])
    want_p, want_b = copies(params), copies(bufs)
    steps = np.array([0, 3], dtype=np.int64)  # tensor 0's buffer is new: it becomes the gradient
    grads = arrays(rng, 2)
    assert plan.step(grads, steps, [{**SGD_GROUP, "params": params}])
    kw = {k: SGD_GROUP[k] for k in _core._hyper_names("sgd")}
    reference.sgd_step(want_p[0], grads[0], want_b[0], step=1, **kw)
    reference.sgd_step(want_p[1], grads[1], want_b[1], step=4, **kw)
    assert_same(params + bufs, want_p + want_b)
    assert steps.tolist() == [1, 4]


def test_numpy_build_checks_kind_and_state():
    rng = np.random.default_rng(6)
    p = arrays(rng, 1)
    with pytest.raises(ValueError, match="kind must be 'adam' or 'sgd'"):
        _core._StepPlan("adamw", "X", p, [[None]], [1])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] is read-only"):
        ro = np.zeros_like(p[0])
        ro.setflags(write=False)
        _core._StepPlan("adam", "X", p, [[None], [ro], [None]], [1])


# ----- torch mode -------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, tensors):
        self.calls.append(tensors)


def torch_plan(torch, params, kind="adam", steps=True, state=True, amsgrad_state=False, groups=None):
    """A torch-mode plan over `params` as fastadam.torch builds it; returns (plan, api, state, groups)."""
    n = len(params)
    labels = [f"param_groups[0]['params'][{i}]" for i in range(n)]
    if kind == "adam":
        st = {"exp_avg": [torch.zeros_like(p) if state else None for p in params],
              "exp_avg_sq": [torch.zeros_like(p) if state else None for p in params],
              "max_exp_avg_sq": [torch.zeros_like(p) if amsgrad_state else None for p in params],
              "step": [torch.tensor(0.0) if steps else None for _ in params]}
        states = [[None if t is None else t.numpy() for t in st[k]] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
        groups = groups or [{"params": list(params), **ADAM_GROUP, "foreach": None}]
    else:
        st = {"momentum_buffer": [torch.zeros_like(p) for p in params], "step": [None] * n}
        states = [[t.numpy() for t in st["momentum_buffer"]]]
        groups = groups or [{"params": list(params), **SGD_GROUP}]
    errors = []

    def grad_error(i, grad):
        errors.append((i, grad))
        return TypeError(f"bad gradient of {labels[i]}")

    api = types.SimpleNamespace(
        tensors=list(params), steps=[None if s is None else s.numpy().reshape(()) for s in st["step"]],
        Tensor=torch.Tensor, strided=torch.strided, grad_error=grad_error, bump_versions=Recorder(), errors=errors,
        meta=None)  # the Python-API path (tests/test_torch_helper.py: the helper's)
    plan = _core._StepPlan(kind, "fastadam.torch.Adam.step()", [p.detach().numpy() for p in params], states,
                           [len(g["params"]) for g in groups], labels, api)
    return plan, api, st, groups


def make_params(torch, n=3, shape=(4, 5), dtype=None):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, dtype=dtype or torch.float32)) for _ in range(n)]


def test_torch_adam_matches_reference_counts_and_bumps():
    torch = torch_or_skip()
    params = make_params(torch)
    plan, api, st, groups = torch_plan(torch, params)
    want = [p.detach().numpy().copy() for p in params]
    m = [np.zeros_like(w) for w in want]
    v = [np.zeros_like(w) for w in want]
    for t in range(1, 4):
        for p in params:
            p.grad = torch.randn(p.shape)
        if t == 2:
            params[1].grad = None
        assert plan.torch_step(groups) is True
        kw = {k: ADAM_GROUP[k] for k in _core._hyper_names("adam") if k != "amsgrad"}
        for i, p in enumerate(params):
            if p.grad is not None:
                reference.adam_step(want[i], p.grad.numpy(), m[i], v[i], step=int(st["step"][i]), **kw)
    assert [float(s) for s in st["step"]] == [3.0, 2.0, 3.0]
    assert st["step"][0].dtype == torch.float32
    assert_same([p.detach().numpy() for p in params], want)
    assert_same([s.numpy() for s in st["exp_avg"]], m)
    calls = api.bump_versions.calls
    assert len(calls) == 3 and all(isinstance(c, tuple) for c in calls)
    assert [len(c) for c in calls] == [3, 2, 3] and calls[1][1] is params[2]


def test_torch_reused_grad_sees_new_values_and_new_storage_is_rechecked():
    torch = torch_or_skip()
    params = make_params(torch, n=2)
    plan, api, st, groups = torch_plan(torch, params)
    want = [p.detach().numpy().copy() for p in params]
    m, v = [np.zeros_like(w) for w in want], [np.zeros_like(w) for w in want]
    kw = {k: ADAM_GROUP[k] for k in _core._hyper_names("adam") if k != "amsgrad"}
    for p in params:
        p.grad = torch.ones(p.shape)
    for step in (1, 2):
        assert plan.torch_step(groups)
        for i, p in enumerate(params):
            reference.adam_step(want[i], p.grad.numpy(), m[i], v[i], step=step, **kw)
        params[0].grad.mul_(-3.0)  # same tensor, same memory: reused, its new values read
    assert_same([p.detach().numpy() for p in params], want)
    params[1].grad.data = torch.ones(20)  # same object, new storage of another shape: checked again
    snap = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match=re.escape("bad gradient of param_groups[0]['params'][1]")):
        plan.torch_step(groups)
    assert api.errors[-1][0] == 1 and api.errors[-1][1] is params[1].grad
    assert all(torch.equal(a, b) for a, b in zip(snap, params))
    assert [float(s) for s in st["step"]] == [2.0, 2.0]


def fake_grad_params(torch, n=3):
    """Parameters whose .grad can be anything: torch refuses many bad gradients at
    assignment, the plan must refuse whatever reaches it."""

    class FreeGrad(torch.nn.Parameter):
        @property
        def grad(self):
            return self.__dict__.get("_free_grad")

        @grad.setter
        def grad(self, value):
            self.__dict__["_free_grad"] = value

    return [FreeGrad(p.detach()) for p in make_params(torch, n)]


@pytest.mark.parametrize("kind", ["dtype", "shape", "strided", "not_a_tensor", "neg_view", "sparse", "meta", "raises"])
def test_torch_bad_grads_raise_grad_error_and_write_nothing(kind):
    torch = torch_or_skip()
    params = fake_grad_params(torch)
    plan, api, st, groups = torch_plan(torch, params)
    for p in params:
        p.grad = torch.ones(p.shape)
    assert plan.torch_step(groups)

    class Raising(torch.Tensor):
        @property
        def layout(self):
            raise RuntimeError("no layout")

    params[2].grad = {
        "dtype": lambda: torch.ones(4, 5, dtype=torch.float64),
        "shape": lambda: torch.ones(5, 4),
        "strided": lambda: torch.ones(5, 4).t(),
        "not_a_tensor": lambda: np.ones((4, 5), np.float32),
        "neg_view": lambda: torch._neg_view(torch.ones(4, 5)),
        "sparse": lambda: torch.ones(4, 5).to_sparse(),
        "meta": lambda: torch.ones(4, 5, device="meta"),
        "raises": lambda: torch.ones(4, 5).as_subclass(Raising),
    }[kind]()
    snap = [p.detach().clone() for p in params] + [s.clone() for s in st["step"]]
    with pytest.raises(TypeError, match=re.escape("bad gradient of param_groups[0]['params'][2]")):
        plan.torch_step(groups)
    assert api.errors[-1][0] == 2 and api.errors[-1][1] is params[2].grad
    assert all(torch.equal(a, b) for a, b in zip(snap, params + st["step"]))
    assert len(api.bump_versions.calls) == 1


def test_torch_grad_sharing_a_params_memory_is_named():
    torch = torch_or_skip()
    params = make_params(torch, n=2)
    plan, api, st, groups = torch_plan(torch, params)
    params[0].grad = torch.ones(4, 5)
    params[1].grad = params[0].detach()  # reads param 0 while it is written
    with pytest.raises(ValueError, match=re.escape("param_groups[0]['params'][0] and the gradient of param_groups[0]['params'][1] share memory")):
        plan.torch_step(groups)


def test_torch_stale_plans_return_false_and_write_nothing():
    torch = torch_or_skip()
    params = make_params(torch)
    for p in params:
        p.grad = torch.ones(p.shape)

    def check_stale(plan, groups, st):
        snap = [p.detach().clone() for p in params] + [s.clone() for s in st["step"] if s is not None]
        assert plan.torch_step(groups) is False
        assert all(torch.equal(a, b) for a, b in zip(snap, params + [s for s in st["step"] if s is not None]))

    plan, api, st, groups = torch_plan(torch, params)
    check_stale(plan, groups + [{"params": [], **ADAM_GROUP}], st)  # a group added
    check_stale(plan, [{**groups[0], "params": params[:2] + [torch.nn.Parameter(torch.zeros(4, 5))]}], st)  # a param replaced
    check_stale(plan, [{**groups[0], "amsgrad": True}], st)  # amsgrad needs a buffer this plan lacks
    saved = params[1].data
    params[1].data = torch.zeros(4, 5)  # new storage behind the same parameter
    check_stale(plan, groups, st)
    params[1].data = saved
    assert plan.torch_step(groups) is True and api.bump_versions.calls

    plan, api, st, groups = torch_plan(torch, params, steps=False)  # state['step'] not there yet
    check_stale(plan, groups, st)
    for p in params:
        p.grad = None
    assert plan.torch_step(groups) is True and not api.bump_versions.calls  # nothing to step: nothing needed


def test_torch_bad_step_value_is_named():
    torch = torch_or_skip()
    params = make_params(torch, n=2)
    plan, api, st, groups = torch_plan(torch, params)
    for p in params:
        p.grad = torch.ones(p.shape)
    for bad in (1.5, -1.0, float("inf"), float("nan")):
        st["step"][1].fill_(bad)
        snap = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match=re.escape("state['step'] of param_groups[0]['params'][1] must be a whole number >= 0")):
            plan.torch_step(groups)
        assert all(torch.equal(a, b) for a, b in zip(snap, params))
        assert float(st["step"][0]) == 0.0


def test_torch_hyper_parameters_read_by_name_each_step():
    torch = torch_or_skip()
    params = make_params(torch, n=1)
    plan, api, st, groups = torch_plan(torch, params)
    params[0].grad = torch.ones(4, 5)
    groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=re.escape("fastadam.torch.Adam.step(): param_groups[0]: lr must be >= 0")):
        plan.torch_step(groups)
    groups[0]["lr"] = 0.0
    before = params[0].detach().clone()
    assert plan.torch_step(groups)
    assert torch.equal(params[0].detach(), before) and float(st["step"][0]) == 1.0


def test_torch_sgd_without_counts_and_first_step_through_numpy_mode():
    torch = torch_or_skip()
    params = make_params(torch, n=2)
    plan, api, st, groups = torch_plan(torch, params, kind="sgd")
    grads = [torch.randn(4, 5) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g
    want = [p.detach().numpy().copy() for p in params]
    bufs = [np.zeros_like(w) for w in want]
    kw = {k: SGD_GROUP[k] for k in _core._hyper_names("sgd")}
    # the buffers are new: the caller's counted numpy-mode step (count 0) sets them to the gradient
    counts = np.zeros(2, dtype=np.int64)
    plan.step([g.numpy() for g in grads], counts, groups)
    for i in range(2):
        reference.sgd_step(want[i], grads[i].numpy(), bufs[i], step=1, **kw)
    assert plan.torch_step(groups)  # later steps: no counts, the buffers blend
    for i in range(2):
        reference.sgd_step(want[i], grads[i].numpy(), bufs[i], step=2, **kw)
    assert_same([p.detach().numpy() for p in params], want)
    assert_same([b.numpy() for b in st["momentum_buffer"]], bufs)


def test_torch_plan_keeps_no_gradient_alive():
    """zero_grad(set_to_none=True) must free the gradients: the plan remembers the last
    validated one without holding it, and a new tensor at a recycled address is checked again."""
    import weakref

    torch = torch_or_skip()
    params = make_params(torch, n=2)
    plan, api, st, groups = torch_plan(torch, params)
    for p in params:
        p.grad = torch.ones(p.shape)
    assert plan.torch_step(groups)
    gone = weakref.ref(params[0].grad)
    params[0].grad = None
    assert gone() is None, "the plan kept a gradient alive"
    params[0].grad = torch.ones(4, 5, dtype=torch.float32)
    assert plan.torch_step(groups) and [float(s) for s in st["step"]] == [2.0, 2.0]
