"""The benchmark's contenders: one zero-argument callable per optimizer step, each on its own
copies of a case's data. torch, DeepSpeed, jax and optax are imported only when asked for."""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from cases import Case

import fastadam
from fastadam import reference

CONTENDERS = ("fastadam", "fastadam_optim", "numpy", "torch", "torch_foreach", "torch_fused", "deepspeed", "optax")
DEFAULT_CONTENDERS = ("fastadam", "numpy", "torch", "torch_foreach", "torch_fused")
TORCH_CONTENDERS = {"torch": {"foreach": False}, "torch_foreach": {"foreach": True}, "torch_fused": {"fused": True}}
LABELS = {
    "fastadam": "fastadam",
    "fastadam_optim": "fastadam.Adam",
    "numpy": "NumPy ref",
    "torch": "torch",
    "torch_foreach": "torch foreach",
    "torch_fused": "torch fused",
    "deepspeed": "DeepSpeed",
    "optax": "optax",
}
LR = 1e-3  # torch's default, for every contender


def _optional(module: str) -> Any:
    """An optional peer's module, or None. Imported by name: deepspeed, jax and optax ship no type information."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _torch() -> Any:
    return _optional("torch")


def _deepspeed_cpu_adam() -> Any:
    """DeepSpeed's DeepSpeedCPUAdam class, or None when deepspeed is not importable."""
    adam = _optional("deepspeed.ops.adam")
    return None if adam is None else adam.DeepSpeedCPUAdam


def _optax_ready() -> bool:
    return _optional("jax") is not None and _optional("optax") is not None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _OptaxAdam:
    """One jitted ``optax.adam`` step over the case's tensors, params and state donated."""

    def __init__(self, data: list[tuple[np.ndarray, np.ndarray]]) -> None:
        jax, jnp, optax = _optional("jax"), _optional("jax.numpy"), _optional("optax")
        self._params = [jnp.array(p) for p, _ in data]  # jnp.array copies: JAX owns its buffers
        self._grads = [jnp.array(g) for _, g in data]
        tx = optax.adam(LR)
        self._state = tx.init(self._params)

        def step(params: Any, state: Any, grads: Any) -> Any:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        # Compiled here, not on the first (possibly timed) call.
        self._step = jax.jit(step, donate_argnums=(0, 1)).lower(self._params, self._state, self._grads).compile()
        self._block = jax.block_until_ready

    def __call__(self) -> None:
        self._params, self._state = self._step(self._params, self._state, self._grads)
        self._block(self._params)  # JAX dispatches asynchronously; a training loop waits for its params

    def params(self) -> list[np.ndarray]:
        return [np.asarray(p) for p in self._params]


def _missing_peer(name: str) -> str | None:
    """Why contender ``name`` cannot run here (with the fix), or None."""
    if name in TORCH_CONTENDERS or name == "deepspeed":
        if _torch() is None:
            return f"contender {name!r} needs torch, which is not importable (pip install torch)"
    if name == "deepspeed" and _deepspeed_cpu_adam() is None:
        return "contender 'deepspeed' needs deepspeed, which is not importable (pip install deepspeed)"
    if name == "optax" and not _optax_ready():
        return "contender 'optax' needs jax and optax, which are not importable (pip install jax optax)"
    return None


def check_contenders(names: Sequence[str], threads: int) -> None:
    """Raises ValueError (naming the fix) unless every contender in ``names`` can run here with ``threads``."""
    if not names:
        raise ValueError("no contenders")
    for name in names:
        if name not in CONTENDERS:
            raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
        problem = _missing_peer(name)
        if problem:
            raise ValueError(problem)
        if name == "optax" and threads != _usable_cpus():
            raise ValueError(f"contender 'optax' runs on XLA's pool of one thread per CPU: use threads={_usable_cpus()}, "
                             f"not {threads}, or leave optax out")  # fmt: skip
    if len(set(names)) != len(names):
        raise ValueError("a contender is listed twice")


def available_contenders() -> list[str]:
    """The default contenders that can run here: fastadam and NumPy, plus torch's three when importable."""
    names = ["fastadam", "numpy"]
    if _torch() is not None:
        names += list(TORCH_CONTENDERS)
    return names


def _init_data(case: Case, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(param, grad) per tensor, fp32. Gradients ~ N(0, 1e-2): no denormals in g*g."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in case.shapes:
        p = rng.standard_normal(shape, dtype=np.float32)
        p *= np.float32(0.02)
        g = rng.standard_normal(shape, dtype=np.float32)
        g *= np.float32(1e-2)
        out.append((p, g))
    return out


def _make_contender(name: str, case: Case, data: list[tuple[np.ndarray, np.ndarray]]) -> Callable[[], None]:
    """A zero-argument callable doing one optimizer step on the contender's own copies."""
    if name in ("fastadam", "fastadam_optim", "numpy"):
        params = [p.copy() for p, _ in data]
        grads = [g.copy() for _, g in data]
        if name == "fastadam" and case.kind == "single":
            p, g = params[0], grads[0]
            m, v = np.zeros_like(p), np.zeros_like(p)
            counter = itertools.count(1)
            adam_step = fastadam.adam_step

            def fastadam_single() -> None:
                adam_step(p, g, m, v, step=next(counter), lr=LR)

            return fastadam_single
        if name in ("fastadam", "fastadam_optim"):
            opt = fastadam.Adam(params, lr=LR)

            def fastadam_optim() -> None:
                opt.step(grads)

            return fastadam_optim
        exp_avgs = [np.zeros_like(p) for p in params]
        exp_avg_sqs = [np.zeros_like(p) for p in params]
        counter = itertools.count(1)
        ref_step = reference.adam_step
        quads = list(zip(params, grads, exp_avgs, exp_avg_sqs))

        def numpy_reference() -> None:
            step = next(counter)
            for p, g, m, v in quads:
                ref_step(p, g, m, v, step=step, lr=LR)

        return numpy_reference
    problem = _missing_peer(name)
    if problem:
        raise ValueError(problem)
    if name == "optax":
        return _OptaxAdam(data)
    if name in TORCH_CONTENDERS or name == "deepspeed":
        torch = _torch()
        cpu_adam = _deepspeed_cpu_adam() if name == "deepspeed" else None
        tensors = []
        for p, g in data:
            t = torch.from_numpy(p.copy()).requires_grad_(True)  # own memory: copies, not views of fastadam's arrays
            t.grad = torch.from_numpy(g.copy())
            tensors.append(t)
        if cpu_adam is not None:
            # adamw_mode=False: Adam's L2 weight decay, as torch.optim.Adam (no decay is used here anyway).
            # One tensor per parameter, as a model's parameters are handed to an optimizer. ZeRO-Offload
            # instead hands DeepSpeedCPUAdam one flat buffer per group: that use is the single-tensor cases.
            opt = cpu_adam(tensors, lr=LR, adamw_mode=False)
        else:
            opt = torch.optim.Adam(tensors, lr=LR, **TORCH_CONTENDERS[name])
        return opt.step  # type: ignore[no-any-return]
    raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
