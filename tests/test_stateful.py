"""A stateful property test: steps, failing steps, param groups added, lr changed, state
dicts saved and loaded, thread counts and SIMD paths changed, in any order, against
fastadam.reference as the model. Every param and state buffer must keep the model's bits.

Bounded for CI (settings below); FASTADAM_STATEFUL_EXAMPLES raises the number of runs.
"""

import os

import numpy as np
from conftest import same_bits
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fastadam
from fastadam import reference

HYPER = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": True}


class AdamMachine(RuleBasedStateMachine):
    @initialize(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3), seed=st.integers(0, 2**16))
    def start(self, sizes, seed):
        self.rng = np.random.default_rng(seed)
        self.params = [self.rng.standard_normal(n).astype(np.float32) for n in sizes]
        self.model = [{"p": p.copy(), "m": None, "v": None, "vmax": None, "step": 0, "group": 0} for p in self.params]
        self.lrs = [1e-2]
        self.opt = fastadam.Adam(self.params, lr=1e-2, **HYPER)

    def _grads(self, skip):
        return [None if k in skip else self.rng.standard_normal(p.shape).astype(np.float32) for k, p in enumerate(self.params)]

    @rule(skip=st.sets(st.integers(0, 8), max_size=2))
    def step(self, skip):
        grads = self._grads(skip)
        self.opt.step(grads)
        for entry, g in zip(self.model, grads):
            if g is None:
                continue
            if entry["m"] is None:
                entry["m"], entry["v"], entry["vmax"] = (np.zeros_like(entry["p"]) for _ in range(3))
            entry["step"] += 1
            reference.adam_step(
                entry["p"], g, entry["m"], entry["v"], step=entry["step"], lr=self.lrs[entry["group"]],
                max_exp_avg_sq=entry["vmax"], **HYPER,
            )

    @rule(which=st.integers(0, 8), bad=st.sampled_from(["dtype", "shape", "count"]))
    def failing_step(self, which, bad):
        grads = self._grads(set())
        k = which % len(grads)
        if bad == "dtype":
            grads[k] = grads[k].astype(np.float64)
        elif bad == "shape":
            grads[k] = np.zeros(grads[k].size + 1, np.float32)
        else:
            grads[k] = None
            grads = grads + [np.zeros(1, np.float32)]  # one gradient too many
        try:
            self.opt.step(grads)
        except (TypeError, ValueError):
            pass
        else:
            raise AssertionError(f"a bad gradient ({bad}) was accepted")

    @precondition(lambda self: len(self.params) < 6)
    @rule(n=st.integers(1, 40), lr=st.sampled_from([1e-3, 5e-2]))
    def add_group(self, n, lr):
        p = self.rng.standard_normal(n).astype(np.float32)
        self.opt.add_param_group({"params": [p], "lr": lr})
        self.params.append(p)
        self.lrs.append(lr)
        self.model.append({"p": p.copy(), "m": None, "v": None, "vmax": None, "step": 0, "group": len(self.lrs) - 1})

    @rule(group=st.integers(0, 8), lr=st.sampled_from([0.0, 1e-3, 3e-2]))
    def set_lr(self, group, lr):
        g = group % len(self.lrs)
        self.opt.param_groups[g]["lr"] = lr
        self.lrs[g] = lr

    @rule()
    def save_and_load(self):
        saved = self.opt.state_dict()
        self.opt.load_state_dict(saved)

    @rule(threads=st.integers(0, 3))
    def set_threads(self, threads):
        fastadam.set_num_threads(threads)

    @rule(isa=st.sampled_from(fastadam.available_isas()))
    def set_isa(self, isa):
        fastadam.set_isa(isa)

    @invariant()
    def same_bits_as_the_model(self):
        if not hasattr(self, "opt"):
            return
        state = self.opt.state
        for k, (p, entry) in enumerate(zip(self.params, self.model)):
            assert same_bits(p, entry["p"]), f"param {k}"
            if entry["m"] is None:
                assert k not in state or "exp_avg" not in state[k], f"param {k} has state before its first step"
                continue
            assert int(state[k]["step"]) == entry["step"], f"param {k}: step"
            assert same_bits(state[k]["exp_avg"], entry["m"]) and same_bits(state[k]["exp_avg_sq"], entry["v"]), f"param {k}"
            assert same_bits(state[k]["max_exp_avg_sq"], entry["vmax"]), f"param {k}"


AdamMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("FASTADAM_STATEFUL_EXAMPLES", "40")), stateful_step_count=25, deadline=None
)
TestAdamMachine = AdamMachine.TestCase
