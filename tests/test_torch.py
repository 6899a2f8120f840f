"""fastadam against torch.optim (foreach=False, the single-tensor path its formula follows)."""

import numpy as np
import pytest
from conftest import DTYPES, torch_or_skip

import fastadam

STEPS = 60
ADAM_CASES = {
    "adam": (fastadam.Adam, "Adam", {}),
    "l2": (fastadam.Adam, "Adam", {"weight_decay": 0.1}),
    "adamw": (fastadam.AdamW, "AdamW", {"weight_decay": 0.05}),
    "amsgrad": (fastadam.Adam, "Adam", {"amsgrad": True}),
    "maximize": (fastadam.Adam, "Adam", {"maximize": True}),
    "adamw-amsgrad-maximize": (fastadam.AdamW, "AdamW", {"amsgrad": True, "maximize": True}),
    "decoupled-flag": (fastadam.Adam, "Adam", {"weight_decay": 0.05, "decoupled_weight_decay": True}),
}
SGD_CASES = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening-l2": {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "nesterov-maximize": {"momentum": 0.5, "nesterov": True, "maximize": True},
}
# Relative error after 60 steps. torch's vectorised kernels use FMA (add with alpha),
# fastadam never does: the two differ by rounding only.
TOL = {np.float32: 1e-4, np.float64: 1e-12}


def shapes():
    return [(1000,), (33, 17), (5,), (4099,)]


def grad_stream(rng, shapes, dtype):
    while True:
        yield [rng.standard_normal(s).astype(dtype) * 0.1 for s in shapes]


def run_pair(fast_cls, torch_cls, kwargs, dtype, lr):
    torch = torch_or_skip()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes()]
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    fast = fast_cls(params, lr=lr, **kwargs)
    ref = getattr(torch.optim, torch_cls)(tparams, lr=lr, foreach=False, **kwargs)
    grads = grad_stream(rng, shapes(), dtype)
    for _ in range(STEPS):
        g = next(grads)
        for tp, gi in zip(tparams, g):
            tp.grad = torch.from_numpy(gi.copy())
        ref.step()
        fast.step(g)
    return params, [tp.detach().numpy() for tp in tparams], fast, ref


def assert_close(got, want, dtype):
    for a, b in zip(got, want):
        scale = np.maximum(np.abs(b), 1e-3)  # relative, with a floor for params near zero
        assert np.max(np.abs(a - b) / scale) <= TOL[dtype], np.max(np.abs(a - b) / scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_matches_torch_over_60_steps(case, dtype):
    fast_cls, torch_cls, kwargs = ADAM_CASES[case]
    got, want, fast, ref = run_pair(fast_cls, torch_cls, kwargs, dtype, lr=1e-2)
    assert_close(got, want, dtype)
    # the state too
    for p, s in zip(ref.param_groups[0]["params"], fast.state_dict()["state"].values()):
        ts = ref.state[p]
        assert s["step"] == float(ts["step"]) == STEPS
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kwargs.get("amsgrad") else ()):
            assert_close([s[key]], [ts[key].numpy()], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_torch_over_60_steps(case, dtype):
    got, want, _, _ = run_pair(fastadam.SGD, "SGD", SGD_CASES[case], dtype, lr=1e-2)
    assert_close(got, want, dtype)


def test_functional_adam_matches_torch_functional_single_tensor():
    torch = torch_or_skip()
    from torch.optim.adam import adam as torch_adam

    rng = np.random.default_rng(1)
    p, g = rng.standard_normal(777), rng.standard_normal(777)
    m, v, vmax = np.zeros(777), np.zeros(777), np.zeros(777)
    tp, tm, tv, tvmax = (torch.from_numpy(x.copy()) for x in (p, m, v, vmax))
    for step in range(1, 11):
        fastadam.adam_step(p, g, m, v, step=step, lr=0.01, weight_decay=0.1, amsgrad=True, max_exp_avg_sq=vmax)
        torch_adam([tp], [torch.from_numpy(g)], [tm], [tv], [tvmax], [torch.tensor(float(step - 1))], foreach=False,
                   amsgrad=True, beta1=0.9, beta2=0.999, lr=0.01, weight_decay=0.1, eps=1e-8, maximize=False)
    np.testing.assert_allclose(p, tp.numpy(), rtol=1e-12)
    np.testing.assert_allclose(vmax, tvmax.numpy(), rtol=1e-12)


@pytest.mark.parametrize("direction", ["torch->fastadam", "fastadam->torch"])
def test_state_dict_moves_between_torch_and_fastadam(direction):
    """Train 20 steps on one side, move the state, train 20 more on the other; compare
    with 40 steps on torch alone."""
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    dtype = np.float64
    init = [rng.standard_normal(s).astype(dtype) for s in shapes()]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes()] for _ in range(40)]
    kwargs = dict(lr=1e-2, amsgrad=True, weight_decay=0.01)

    def torch_opt(params):
        tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        return tp, torch.optim.Adam(tp, foreach=False, **kwargs)

    def torch_steps(tp, opt, gs):
        for g in gs:
            for t, gi in zip(tp, g):
                t.grad = torch.from_numpy(gi.copy())
            opt.step()

    tp_all, opt_all = torch_opt(init)
    torch_steps(tp_all, opt_all, grads)

    if direction == "torch->fastadam":
        tp, opt = torch_opt(init)
        torch_steps(tp, opt, grads[:20])
        params = [t.detach().numpy().copy() for t in tp]
        fast = fastadam.Adam(params, **kwargs)
        fast.load_state_dict(opt.state_dict())
        for g in grads[20:]:
            fast.step(g)
        final = params
    else:
        params = [p.copy() for p in init]
        fast = fastadam.Adam(params, **kwargs)
        for g in grads[:20]:
            fast.step(g)
        sd = fast.state_dict()
        sd["state"] = {i: {k: torch.tensor(v) if k == "step" else torch.from_numpy(v) for k, v in s.items()} for i, s in sd["state"].items()}
        tp, opt = torch_opt(params)
        opt.load_state_dict(sd)
        torch_steps(tp, opt, grads[20:])
        final = [t.detach().numpy() for t in tp]
    assert_close(final, [t.detach().numpy() for t in tp_all], dtype)
