"""fastadam's native kernel behind ``torch.optim``'s interface: :class:`Adam`, :class:`AdamW`, :class:`SGD`.

Drop-in replacements for ``torch.optim.Adam`` / ``AdamW`` / ``SGD`` on dense CPU
float32/float64 tensors::

    import fastadam.torch

    opt = fastadam.torch.Adam(model.parameters(), lr=1e-3)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

How it works: a step hands every parameter that has a gradient, in every param group,
to fastadam's kernel at once (one validation pass, one GIL release, one parallel region),
as NumPy views of the tensors' own memory (``tensor.detach().numpy()`` shares storage). The kernel updates ``param.data`` and the
optimizer state in place; nothing is copied, and the parameter tensors are the same
objects at the same addresses after the step. The state is torch's own: ``state[p]``
holds ``step`` (a scalar float tensor, as torch keeps it) and ``exp_avg``,
``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), or ``momentum_buffer`` for SGD, as
tensors. So ``state_dict()`` has torch.optim's layout and loads into the matching
``torch.optim`` optimizer, and torch's state dicts load here.

Supported tensors: CPU, dense (strided), contiguous, float32 or float64, the gradient
of the parameter's dtype. Anything else -- CUDA or meta tensors, sparse tensors or
gradients, complex, float16/bfloat16 or integer dtypes, non-contiguous tensors --
raises ``TypeError`` (device, layout, dtype) or ``ValueError`` (memory layout) naming
the tensor, before anything is updated. Parameters whose ``.grad`` is None are skipped,
as torch skips them.

The arithmetic is fastadam's, specified in :mod:`fastadam.reference` and bit-identical
on every SIMD path and thread count; it agrees with ``torch.optim`` (``foreach=False``)
to rounding (torch's CPU kernels use fused multiply-add in places, fastadam never does).
Threads: the kernel uses :func:`fastadam.get_num_threads` threads: ``fastadam.set_num_threads(n)``,
or by default OpenMP's count (``OMP_NUM_THREADS``, ``threadpoolctl.threadpool_limits``). When
torch and fastadam load the same OpenMP runtime (both link ``libgomp.so.1``; the first one
loaded serves both), ``torch.set_num_threads(n)`` changes that default too; call
``fastadam.set_num_threads(n)`` to choose independently of torch.

``import fastadam`` never imports torch; this module does (``pip install fastadam[torch]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, overload

import numpy as np
import numpy.typing as npt
import torch

from . import _core

__all__ = ["Adam", "AdamW", "SGD"]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]
_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]

_FLOATS = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)

# The kernel's error messages name tensors by their index in the lists of one step.
_INDEXED = re.compile(r"\b(?:params|grads|exp_avgs|exp_avg_sqs|max_exp_avg_sqs|momentum_buffers)\[(\d+)\]")


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps state["step"] in the default float dtype's precision (float32 unless
    # torch.set_default_dtype(torch.float64)).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _tensor_error(t: object, what: str, torch_name: str) -> Exception:
    """The error for a tensor fastadam cannot update in place (called once a check failed)."""
    if not isinstance(t, torch.Tensor):
        return TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    desc = f"{what} ({tuple(t.shape)}, {t.dtype}, {t.layout}, {t.device})"
    if not t.is_cpu:
        return TypeError(
            f"{desc} is not on the CPU: fastadam.torch updates CPU tensors only; "
            f"use torch.optim.{torch_name} for {t.device.type} tensors"
        )
    if t.layout != torch.strided:
        hint = "torch.optim.SparseAdam" if torch_name.startswith("Adam") else f"torch.optim.{torch_name}"
        return TypeError(f"{desc} is not a dense tensor: fastadam.torch needs strided (dense) tensors; use {hint}")
    if t.is_complex():
        return TypeError(
            f"{desc} is complex: fastadam.torch handles real float32 and float64 tensors; "
            f"use torch.optim.{torch_name} for complex parameters"
        )
    if t.dtype not in _FLOATS:
        hint = (
            "; for mixed precision keep float32 master parameters (e.g. torch.autocast) and optimize those"
            if t.dtype in _HALF
            else ""
        )
        return TypeError(f"{desc} has dtype {t.dtype}: fastadam.torch handles float32 and float64 only{hint}")
    if not t.is_contiguous():
        return ValueError(
            f"{desc} is not contiguous (strides {t.stride()}): fastadam updates memory in place and never a "
            "temporary copy; make it contiguous first (param.data = param.data.contiguous(), before the optimizer "
            "is created or its state loaded)"
        )
    return ValueError(f"{desc} cannot be updated in place by fastadam")


def _ok(t: object) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.is_cpu
        and t.layout == torch.strided
        and t.dtype in _FLOATS
        and t.is_contiguous()
    )


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    # What torch's in-place ops do: autograd then notices a parameter that a retained graph
    # saved for backward was modified, instead of silently using the new values.
    bump: Callable[[Any], None] | None = getattr(torch.autograd.graph, "increment_version", None)
    if bump is None:  # torch < 2.1
        return
    try:
        bump(tensors)
    except TypeError:  # a torch whose increment_version takes one tensor
        for t in tensors:
            bump(t)


class _NativeOptimizer(torch.optim.Optimizer):
    """Machinery common to the adapters: tensor and flag checks, state loading, error legends."""

    _torch_name: ClassVar[str] = ""
    _hyper_keys: ClassVar[tuple[str, ...]] = ()
    # torch.optim's implementation switches: fastadam has one implementation (the native CPU
    # kernel), so only the values that select nothing are accepted.
    _impl_flags: ClassVar[dict[str, bool | None]] = {}
    _flag_defaults: ClassVar[dict[str, bool]] = {}

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        for key in self._impl_flags:
            self._check_flag(key, defaults[key], f"{type(self).__name__}()")
        super().__init__(params, defaults)

    @property
    def _step_name(self) -> str:
        # Not an attribute: torch's __getstate__ pickles only defaults, state and param_groups.
        return f"fastadam.torch.{type(self).__name__}.step()"

    def _check_flag(self, key: str, value: object, where: str) -> None:
        if value is not None and value is not False:
            raise ValueError(
                f"fastadam.torch.{where}: {key}={value!r} is not supported: fastadam.torch has one implementation, "
                f"the native CPU kernel (leave {key} at its default, or use torch.optim.{self._torch_name})"
            )

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        raise NotImplementedError

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step on every parameter with a gradient, in place, all in one kernel call.

        Args:
            closure: optional; re-evaluates the model (with grad enabled) and returns the loss.

        Returns the closure's loss (None without a closure). All tensors are checked before
        any is written: a TypeError/ValueError leaves parameters and state untouched.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        per_group, where = self._grads()
        if where:
            self._native_step(per_group, where)
        return loss

    def _native_step(self, per_group: list[list[tuple[int, torch.Tensor, torch.Tensor]]], where: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group``; its tensors and
        hyper-parameters are checked first (TypeError/ValueError, and the group is not added)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        g = len(self.param_groups) - 1
        name = f"{type(self).__name__}()"
        try:
            for i, p in enumerate(group["params"]):
                if not _ok(p):
                    raise _tensor_error(p, f"fastadam.torch.{name}: param_groups[{g}]['params'][{i}]", self._torch_name)
            for key in self._impl_flags:
                self._check_flag(key, group[key], f"{name}: param_groups[{g}]")
            self._check_group(group, f"fastadam.torch.{name}: param_groups[{g}]")
        except BaseException:
            self.param_groups.pop()
            raise

    def _hypers(self) -> list[tuple[Any, ...]]:
        return [tuple(group[k] for k in self._hyper_keys) for group in self.param_groups]

    def _grads(self) -> tuple[list[list[tuple[int, torch.Tensor, torch.Tensor]]], list[tuple[int, int]]]:
        """Per group, (index, param, grad) of the params with a gradient, all checked; and each
        one's (group, index) in the flat order handed to the kernel."""
        per_group: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []
        where: list[tuple[int, int]] = []
        name = self._step_name
        cls = type(self).__name__
        for g, group in enumerate(self.param_groups):
            for key in self._impl_flags:
                self._check_flag(key, group.get(key), f"{cls}.step(): param_groups[{g}]")
            entries = []
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if not _ok(p):
                    raise _tensor_error(p, f"{name}: param_groups[{g}]['params'][{i}]", self._torch_name)
                if not _ok(grad) or grad.dtype != p.dtype:
                    what = f"{name}: the gradient of param_groups[{g}]['params'][{i}]"
                    if _ok(grad):
                        raise TypeError(f"{what} has dtype {grad.dtype}, the parameter {p.dtype}: they must match")
                    raise _tensor_error(grad, what, self._torch_name)
                entries.append((i, p, grad))
                where.append((g, i))
            per_group.append(entries)
        return per_group, where

    def _explained(self, error: Exception, where: list[tuple[int, int]]) -> Exception:
        """``error`` from the kernel with its flat tensor indices translated to param groups."""
        indices = sorted({int(m.group(1)) for m in _INDEXED.finditer(str(error))})
        legend = [f"[{k}] is param_groups[{where[k][0]}]['params'][{where[k][1]}]" for k in indices if k < len(where)]
        if not legend:
            return error
        return type(error)(f"{error} (in this step's tensor lists, {', '.join(legend)})")

    # ----- state ------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()``, from the matching ``torch.optim`` optimizer,
        or from fastadam's NumPy optimizer of the same kind (its arrays become tensors).

        As in torch, tensors of the dict that already have the parameter's dtype are used as
        they are, not copied: deep-copy the dict (``copy.deepcopy``, or ``torch.save`` /
        ``torch.load``) to give two optimizers independent state. torch.optim's
        implementation switches (``foreach``, ``fused``, ``capturable``, ``differentiable``)
        are loaded as they are when None or False, and reset to their defaults otherwise:
        the kernel is this optimizer's only implementation.
        """
        state = state_dict.get("state", {})
        if any(isinstance(v, np.ndarray) for entry in state.values() for v in entry.values()):
            state_dict = dict(state_dict)
            state_dict["state"] = {
                k: {key: (torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v) for key, v in entry.items()}
                for k, entry in state.items()
            }
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._impl_flags.items():
                if group.get(key, value) is not None and group.get(key, value) is not False:
                    group[key] = value  # e.g. foreach=True from a torch optimizer's state dict
                group.setdefault(key, value)
            for key, flag in self._flag_defaults.items():
                group.setdefault(key, flag)
            for p in group["params"]:
                entry = self.state.get(p)
                if not entry:
                    continue
                if "step" in entry and not torch.is_tensor(entry["step"]):
                    entry["step"] = torch.tensor(float(entry["step"]), dtype=_scalar_dtype())
                for key, value in list(entry.items()):
                    # The kernel writes state in place, so it must be contiguous; a loaded
                    # buffer that is not gets a contiguous copy here, once.
                    if key != "step" and isinstance(value, torch.Tensor) and not value.is_contiguous():
                        entry[key] = value.contiguous()


class Adam(_NativeOptimizer):
    r"""Adam (Kingma & Ba, 2015) on CPU tensors through fastadam's kernel; drop-in for ``torch.optim.Adam``.

    Per element, with :math:`t` the step count after this update (1 on the first step),
    ``g`` the gradient (negated with ``maximize``)::

        g = g + weight_decay * p                     (L2, unless decoupled_weight_decay)
        p = p * (1 - lr * weight_decay)              (decoupled_weight_decay: AdamW)
        m = beta1 * m + (1 - beta1) * g              (exp_avg)
        v = beta2 * v + (1 - beta2) * g * g          (exp_avg_sq; amsgrad: v_max = max(v_max, v))
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Units: ``lr`` is in parameter units per step (Adam's steps are about ``lr`` in size),
    ``eps`` in gradient units, ``weight_decay`` per parameter unit (L2) or per step and
    unit of ``lr`` (decoupled). The exact order of operations is :func:`fastadam.reference.adam_step`'s.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts, as for torch.optim.
            CPU, dense, contiguous, float32 or float64.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as in
            ``torch.optim.Adam``.
        foreach, capturable, differentiable, fused: accepted for signature compatibility
            with ``torch.optim.Adam``, only at their defaults (None/False); anything else
            raises ValueError.

    ``step(closure=None)`` updates every parameter with a ``.grad`` in place, all in one
    kernel call, and returns the closure's loss. ``state[p]`` holds ``step`` (a scalar
    float tensor), ``exp_avg``, ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``.
    """

    _torch_name = "Adam"
    _hyper_keys = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad", "maximize")
    _impl_flags = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}
    _flag_defaults = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        _core._check_adam_group(tuple(group[k] for k in self._hyper_keys), where)

    def _native_step(self, per_group: list[list[tuple[int, torch.Tensor, torch.Tensor]]], where: list[tuple[int, int]]) -> None:
        params: list[_Array] = []
        grads: list[_Array | None] = []
        exp_avgs: list[_Array | None] = []
        exp_avg_sqs: list[_Array | None] = []
        max_exp_avg_sqs: list[_Array | None] = []
        step_tensors: list[torch.Tensor] = []
        updated: list[torch.Tensor] = []
        steps = np.empty(len(where), dtype=np.int64)
        created: list[tuple[torch.Tensor, str]] = []
        try:
            for g, (group, entries) in enumerate(zip(self.param_groups, per_group)):
                amsgrad = bool(group["amsgrad"])
                for i, p, grad in entries:
                    state = self.state[p]
                    if "step" not in state:
                        state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                        created.append((p, "step"))
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq"):
                        if state.get(key) is None:
                            state[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                            created.append((p, key))
                    step_t = state["step"]
                    step = float(step_t)
                    if not (step >= 0 and step.is_integer()):
                        raise ValueError(
                            f"{self._step_name}: state['step'] of param_groups[{g}]['params'][{i}] must be a whole "
                            f"number >= 0, got {step}"
                        )
                    steps[len(params)] = int(step)
                    params.append(p.detach().numpy())
                    grads.append(grad.detach().numpy())
                    exp_avgs.append(state["exp_avg"].detach().numpy())
                    exp_avg_sqs.append(state["exp_avg_sq"].detach().numpy())
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"].detach().numpy() if amsgrad else None)
                    step_tensors.append(step_t)
                    updated.append(p)
            # One plan per step: it validates every array (params and state once, then the
            # gradients) before the kernel writes anything, and the tensors behind the views
            # may change between steps (param.data = ..., load_state_dict), so it is not kept.
            plan = _core._StepPlan(
                self._step_name, params, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs], [len(e) for e in per_group]
            )
            plan.adam_step(grads, steps, self._hypers())
        except BaseException as error:
            for p, key in created:  # a rejected step leaves no trace, not even fresh state
                del self.state[p][key]
                if not self.state[p]:
                    del self.state[p]
            if isinstance(error, (TypeError, ValueError)):
                raise self._explained(error, where) from None
            raise
        # The kernel counted the steps of the tensors it updated (all of them) in `steps`;
        # torch keeps each count in a float tensor, which `float(step)` read above.
        torch._foreach_add_(step_tensors, 1.0)  # what torch.optim does; one call for all of them
        _bump_versions(updated)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay; drop-in for ``torch.optim.AdamW``.

    Before the Adam update, ``p = p * (1 - lr * weight_decay)`` (``weight_decay`` defaults
    to 1e-2); the gradient is not changed. Everything else is :class:`Adam`'s.
    """

    _torch_name = "AdamW"

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch.optim.AdamW


class SGD(_NativeOptimizer):
    r"""Stochastic gradient descent with momentum and Nesterov momentum; drop-in for ``torch.optim.SGD``.

    Per element, ``g`` the gradient (negated with ``maximize``)::

        g = g + weight_decay * p                                  (weight_decay != 0)
        buf = g                                                   (momentum != 0, first step)
        buf = momentum * buf + (1 - dampening) * g                (momentum != 0, later steps)
        g = g + momentum * buf if nesterov else buf               (momentum != 0)
        p = p - lr * g

    Units: ``lr`` in parameter units per gradient unit, per step. The exact order of
    operations is :func:`fastadam.reference.sgd_step`'s.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts; CPU, dense,
            contiguous, float32 or float64.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in ``torch.optim.SGD``.
        foreach, differentiable, fused: accepted only at their defaults (None/False).

    ``state[p]["momentum_buffer"]`` (a tensor) exists once a parameter has taken a step
    with momentum, as in torch.
    """

    _torch_name = "SGD"
    _hyper_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _impl_flags = {"foreach": None, "differentiable": False, "fused": None}
    _flag_defaults = {"nesterov": False, "maximize": False}

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | torch.Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        _core._check_sgd_group(tuple(group[k] for k in self._hyper_keys), where)

    def _native_step(self, per_group: list[list[tuple[int, torch.Tensor, torch.Tensor]]], where: list[tuple[int, int]]) -> None:
        params: list[_Array] = []
        grads: list[_Array | None] = []
        buffers: list[_Array | None] = []
        updated: list[torch.Tensor] = []
        # steps[i] == 0 tells the kernel that buffer i is new: it becomes the gradient
        # (torch: clone), instead of momentum * buf + (1 - dampening) * g.
        steps = np.ones(len(where), dtype=np.int64)
        created: list[torch.Tensor] = []
        try:
            for group, entries in zip(self.param_groups, per_group):
                momentum = group["momentum"] != 0
                for _, p, grad in entries:
                    if momentum:
                        state = self.state[p]
                        if state.get("momentum_buffer") is None:
                            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                            created.append(p)
                            steps[len(params)] = 0
                        buffers.append(state["momentum_buffer"].detach().numpy())
                    else:
                        buffers.append(None)
                    params.append(p.detach().numpy())
                    grads.append(grad.detach().numpy())
                    updated.append(p)
            plan = _core._StepPlan(self._step_name, params, [buffers], [len(e) for e in per_group])
            plan.sgd_step(grads, steps, self._hypers())
        except BaseException as error:
            for p in created:
                del self.state[p]["momentum_buffer"]
                if not self.state[p]:
                    del self.state[p]
            if isinstance(error, (TypeError, ValueError)):
                raise self._explained(error, where) from None
            raise
        _bump_versions(updated)
