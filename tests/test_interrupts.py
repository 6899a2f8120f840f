"""Ctrl-C during a step: a step is applied whole or not at all, in params, state and counts.

A one-shot timer raises KeyboardInterrupt at a random point of each step, in fastadam's
(or torch.optim's) Python code, as a Ctrl-C would, while optimizers take steps,
including their first (state creation, plan build). After each run every param must be
at one step count n, with the bits of a fresh optimizer stepped n times on the same
gradients.
"""

import signal

import numpy as np
import pytest
from conftest import torch_or_skip

import fastadam

ROUNDS = 120


def _interrupting(frame) -> bool:
    # Only inside the optimizers' code (the frame the signal lands in, or its caller): the
    # test's own lines must not be interrupted. Two frames only: the handler must be quick.
    for _ in range(2):
        if frame is None:
            return False
        name = frame.f_code.co_filename
        if "fastadam" in name and "tests" not in name or "torch/optim" in name:
            return True
        frame = frame.f_back
    return False


_armed = [False]  # a signal still pending after the timer stopped must not interrupt the checks


def _handler(signum, frame):
    if _armed[0] and _interrupting(frame):
        raise KeyboardInterrupt


def _arm(delay):
    # one signal, `delay` seconds from now (0: none): at most one interrupt per step, as a
    # person pressing Ctrl-C gives
    _armed[0] = delay > 0
    signal.setitimer(signal.ITIMER_REAL, delay)


def run_interrupted(make, step, check):
    """Steps fresh optimizers under interrupts; ``check(opt, round)`` asserts the invariant
    after every round. Returns how many steps were interrupted."""
    previous = signal.signal(signal.SIGALRM, _handler)
    hits = 0
    try:
        for r in range(ROUNDS):
            opt, grads = make()
            for k in range(12):
                _arm(1e-6 * (1 + (r * 12 + k) % 60))
                try:
                    step(opt, grads)
                except KeyboardInterrupt:
                    hits += 1
                _arm(0)
            check(opt, r)
    finally:
        _arm(0)
        signal.signal(signal.SIGALRM, previous)
    return hits


def whole_steps(make, step, counts_of, params_of):
    """The check for a counting optimizer: one count n for all params, the params of n whole steps."""

    def check(opt, r):
        counts = counts_of(opt)
        assert len(set(counts)) <= 1, f"round {r}: params at different step counts {counts}"
        n = counts[0] if counts else 0
        ref, ref_grads = make()
        for _ in range(n):
            step(ref, ref_grads)
        for i, (a, b) in enumerate(zip(params_of(opt), params_of(ref))):
            assert np.array_equal(a, b), f"round {r}: param {i} is not the param of {n} whole steps"

    return check


SHAPES = [(300,), (17, 5), (2000,), (3,)]


@pytest.mark.parametrize("cls", ["Adam", "SGD"])
def test_numpy_optimizer_steps_whole_under_interrupts(cls):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]

    def make():
        params = [a.copy() for a in init]
        kwargs = {"lr": 1e-2, "amsgrad": True} if cls == "Adam" else {"lr": 1e-2, "momentum": 0.9}
        return getattr(fastadam, cls)(params, **kwargs), grads

    def counts_of(opt):
        return [int(s["step"]) for s in opt.state.values() if "step" in s] if cls == "Adam" else [
            int(c) for c in opt._steps
        ]

    step = lambda o, g: o.step(g)  # noqa: E731
    hits = run_interrupted(make, step, whole_steps(make, step, counts_of, lambda o: o._params))
    assert hits > 0, "no step was interrupted: the test proves nothing"


@pytest.mark.parametrize("cls", ["Adam", "SGD"])
def test_torch_adapter_steps_whole_under_interrupts(cls):
    torch = torch_or_skip()
    import fastadam.torch as ft

    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]

    def make():
        params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
        for p, g in zip(params, grads):
            p.grad = g
        kwargs = {"lr": 1e-2, "amsgrad": True} if cls == "Adam" else {"lr": 1e-2, "momentum": 0.9}
        return getattr(ft, cls)(params, **kwargs), None

    def counts_of(opt):
        return [int(opt.state[p]["step"]) for p in opt.param_groups[0]["params"] if "step" in opt.state.get(p, {})]

    def params_of(opt):
        return [p.detach().numpy() for p in opt.param_groups[0]["params"]]

    def sgd_check(opt, r):
        # SGD keeps no count: every param's momentum buffer there or none, all params moved or none
        have = [p in opt.state and opt.state[p].get("momentum_buffer") is not None for p in opt.param_groups[0]["params"]]
        assert len(set(have)) == 1, f"round {r}: momentum buffers for some params only: {have}"
        moved = [not np.array_equal(p, a) for p, a in zip(params_of(opt), init)]
        assert len(set(moved)) == 1, f"round {r}: some params moved, others not: {moved}"

    step = lambda o, g: o.step()  # noqa: E731
    hits = run_interrupted(make, step, whole_steps(make, step, counts_of, params_of) if cls == "Adam" else sgd_check)
    assert hits > 0, "no step was interrupted: the test proves nothing"
