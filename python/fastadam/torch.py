"""fastadam's native kernel behind ``torch.optim``'s interface: :class:`Adam`, :class:`AdamW`, :class:`SGD`,
and with 8-bit/4-bit quantized states :class:`Adam8bit`, :class:`AdamW8bit`, :class:`Adam4bit`,
:class:`AdamW4bit` (bitsandbytes' and torchao's state dicts: :func:`from_bitsandbytes`,
:func:`to_bitsandbytes`, :func:`from_torchao`, :func:`to_torchao`).

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

Supported tensors: CPU, dense (strided), contiguous, float32 or float64 (Adam/AdamW:
bfloat16 and float16 too, with master weights, bf16 states, stochastic rounding,
max_grad_norm and ``torch.amp.GradScaler``; docs/design.md, "Mixed precision"), the
gradient of the parameter's dtype. ``foreach`` and ``fused`` are accepted and change
nothing (fastadam's step is always fused and multi-tensor); ``capturable`` and
``differentiable`` are refused. Anything else -- CUDA or meta tensors, sparse tensors or
gradients, complex or integer dtypes, float16/bfloat16 for SGD, non-contiguous tensors --
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

Speed: the optimizer keeps its native step plan from step to step. A step reads each
parameter's ``.grad`` and checks that the parameter still has the memory the plan
holds; everything else (state lookups, NumPy views, step counts) stays in the plan,
which is rebuilt when parameters, groups or state change (``param.data = ...``,
``add_param_group``, ``load_state_dict``, an entry of ``state`` set or removed).

``import fastadam`` never imports torch; this module does (``pip install "fastadam[torch]"``).
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, overload

import numpy as np

try:
    import torch
except ImportError as _error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        'fastadam.torch needs PyTorch: pip install "fastadam[torch]" '
        "(on a machine without a GPU, pin the CPU build first, e.g. pip install torch==2.13.0)"
    ) from _error

from . import _core, _torch_meta
from ._common import (
    ADAM,
    SGD as _SGD_ALGORITHM,
    Algorithm,
    Rollback,
    StepGuard,
    check_group,
    check_loaded_entry,
    check_max_grad_norm,
    check_mixed_precision,
    state_stagger,
    zeros_packed,
)
from .optim import check_min_size, refuse_quantized_extras
from .quantized import QUANT_BLOCK, QUANTIZED_KEYS, QuantizedState, convert_entry, entry_bits, is_quantized_entry, read_quantized_entry

__all__ = [
    "Adam", "AdamW", "SGD", "Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit",
    "from_bitsandbytes", "to_bitsandbytes", "from_torchao", "to_torchao",
]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

_FLOATS = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_STEP_DTYPES = (torch.float32, torch.float64, torch.int64)
# torch._C._increment_version(tensors): what torch's in-place ops do to a tensor's version,
# so autograd notices a parameter that a retained graph saved was modified by the step.
_increment_version: Callable[[Any], None] | None = getattr(torch._C, "_increment_version", None)
# What torch.optim's step wrapper serves (step() below): a profiler on, global step hooks.
# Where a torch lacks these private names, the wrapper runs at every step.
_profiler_enabled: Callable[[], bool] = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)
_global_step_hooks: tuple[Mapping[Any, Any], Mapping[Any, Any]] = (
    getattr(sys.modules["torch.optim.optimizer"], "_global_optimizer_pre_hooks", {None: None}),
    getattr(sys.modules["torch.optim.optimizer"], "_global_optimizer_post_hooks", {None: None}),
)


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps state["step"] in the default float dtype's precision (float32 unless
    # torch.set_default_dtype(torch.float64)).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _tensor_error(
    t: object,
    what: str,
    torch_name: str,
    fix: str = "param.data = param.data.contiguous(), before the optimizer is created or its state loaded",
    half_ok: bool = False,
) -> Exception:
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
    if t.dtype not in _FLOATS and not (half_ok and t.dtype in _HALF):
        hint = (
            "; bfloat16/float16 params: fastadam.torch.Adam/AdamW take them (mixed precision)"
            if t.dtype in _HALF
            else ""
        )
        kinds = "float32, float64, bfloat16 and float16" if half_ok else "float32 and float64 only"
        return TypeError(f"{desc} has dtype {t.dtype}: fastadam.torch.{torch_name} handles {kinds}{hint}")
    if not t.is_contiguous():
        return ValueError(
            f"{desc} is not contiguous (strides {t.stride()}): fastadam updates memory in place and never a "
            f"temporary copy; make it contiguous first ({fix})"
        )
    if t.is_neg():
        return ValueError(f"{desc} is a negative view (torch._neg_view): call .resolve_neg() first")
    if t.data_ptr() == 0 and t.numel() > 0:
        return TypeError(f"{desc} has no memory of its own (data_ptr() is 0, a tensor subclass): fastadam reads and "
                         f"writes memory directly; use torch.optim.{torch_name}")
    if t.is_inference():
        return TypeError(f"{desc} is an inference tensor (made under torch.inference_mode()), which torch forbids "
                         "updating in place: create the parameter outside inference mode")
    return ValueError(f"{desc} cannot be updated in place by fastadam")


def _ok(t: object, dtypes: tuple[torch.dtype, ...] = _FLOATS) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.is_cpu
        and t.layout == torch.strided
        and t.dtype in dtypes
        and t.is_contiguous()
        and not t.is_neg()
        and (t.data_ptr() != 0 or t.numel() == 0)  # a wrapper subclass has no memory of its own
    )


def _param_ok(p: object, dtypes: tuple[torch.dtype, ...] = _FLOATS) -> bool:
    # torch forbids in-place updates of inference tensors (made under torch.inference_mode())
    return _ok(p, dtypes) and isinstance(p, torch.Tensor) and not p.is_inference()


_ANY_FLOAT = _FLOATS + _HALF  # Adam's mixed-precision step


def _tensor_of(a: np.ndarray) -> torch.Tensor:
    """A tensor copy of a NumPy array (bfloat16 through its bits: torch.from_numpy has no bfloat16)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


@functools.cache
def _bf16() -> np.dtype[Any]:
    """ml_dtypes.bfloat16, imported on first use."""
    try:
        import ml_dtypes
    except ImportError as error:
        raise ImportError('bfloat16 tensors need ml_dtypes: pip install "fastadam[bf16]"') from error
    bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return bf16


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor's memory (bfloat16 as ml_dtypes.bfloat16).
    Detached only when it requires grad (a gradient does not: that call costs a microsecond)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bf16())
    return t.numpy()


def _grad_error(step_name: str, torch_name: str, p: torch.Tensor, label: str, grad: object, half_ok: bool = False) -> Exception:
    what = f"{step_name}: the gradient of {label}"
    if _ok(grad, _ANY_FLOAT if half_ok else _FLOATS):
        assert isinstance(grad, torch.Tensor)
        if grad.dtype != p.dtype:
            return TypeError(f"{what} has dtype {grad.dtype}, the parameter {p.dtype}: they must match")
        if grad.shape != p.shape:
            return ValueError(f"{what} has shape {tuple(grad.shape)}, the parameter {tuple(p.shape)}: they must match")
    return _tensor_error(grad, what, torch_name, fix="p.grad = p.grad.contiguous()", half_ok=half_ok)


# ----- state that tells the optimizer when it changes ------------------------------------
# The plan holds pointers into the state tensors, so setting or removing an entry of
# ``state`` must rebuild it; a counter shared by the optimizer and its state dicts says so
# for the price of one comparison per step (docs/design.md, "torch adapter").


class _Entry(dict):  # type: ignore[type-arg]
    """``state[p]``: a dict that counts its changes in the optimizer's epoch."""

    __slots__ = ("_epoch",)

    def __init__(self, epoch: list[int], *args: Any) -> None:
        super().__init__(*args)
        self._epoch = epoch

    def _touch(self) -> None:
        epoch = getattr(self, "_epoch", None)  # not set yet while unpickling
        if epoch is not None:
            epoch[0] += 1

    def __setitem__(self, key: Any, value: Any) -> None:
        self._touch()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._touch()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._touch()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._touch()
        return super().popitem()

    def clear(self) -> None:
        self._touch()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._touch()
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._touch()
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> _Entry:  # type: ignore[misc]  # dict's |= takes more than its |
        self._touch()
        super().update(other)
        return self

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))  # pickles and copies as a plain dict


class _State(defaultdict):  # type: ignore[type-arg]
    """``optimizer.state``: torch's defaultdict(dict), whose entries are :class:`_Entry`."""

    def __init__(self, epoch: list[int], items: Iterable[tuple[Any, Any]] = ()) -> None:
        super().__init__(None)
        self._epoch = epoch
        for key, value in items:
            self[key] = value

    def __missing__(self, key: Any) -> _Entry:
        entry = _Entry(self._epoch)
        self[key] = entry
        return entry

    def __setitem__(self, key: Any, value: Any) -> None:
        self._epoch[0] += 1
        if isinstance(value, dict) and not (isinstance(value, _Entry) and value._epoch is self._epoch):
            value = _Entry(self._epoch, value)
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._epoch[0] += 1
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._epoch[0] += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self._epoch[0] += 1
        return super().popitem()

    def clear(self) -> None:
        self._epoch[0] += 1
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def __reduce__(self) -> Any:
        return (_plain_state, (list(self.items()),))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        import copy

        return _plain_state(copy.deepcopy(list(self.items()), memo))


def _plain_state(items: list[tuple[Any, Any]]) -> defaultdict[Any, Any]:
    return defaultdict(dict, ((k, dict(v) if isinstance(v, dict) else v) for k, v in items))


class _TorchPlanApi:
    """What the native plan needs from torch in a torch-mode step (see cpp/bindings/step_plan.hpp)."""

    __slots__ = ("tensors", "steps", "Tensor", "strided", "grad_error", "bump_versions", "meta")

    def __init__(self, tensors: list[torch.Tensor], steps: list[np.ndarray | None] | None,
                 grad_error: Callable[[int, object], BaseException]) -> None:
        self.tensors = tensors
        self.steps = steps
        self.Tensor = torch.Tensor
        self.strided = torch.strided
        self.grad_error = grad_error
        self.bump_versions = _increment_version
        self.meta = _torch_meta.api()


class _NativeOptimizer(torch.optim.Optimizer):
    """Machinery common to the adapters: the kept plan, its rebuilds, flags, state loading."""

    _algorithm: ClassVar[Algorithm]
    _torch_name: ClassVar[str] = ""
    # torch.optim's implementation switches. fastadam has one implementation, always fused and
    # multi-tensor: foreach/fused are accepted and change nothing; the others must stay off.
    _impl_flags: ClassVar[dict[str, bool | None]] = {}
    _quantized: ClassVar[bool] = False  # keeps quantized states (Adam8bit, ...)
    _refused_flags: ClassVar[tuple[str, ...]] = ("capturable", "differentiable")
    _flag_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        for key in self._refused_flags:
            if key in defaults:
                self._check_flag(key, defaults[key], f"{type(self).__name__}()")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's own error
        self._plan: Any = None
        self._plan_epoch = -1
        self._epoch = [0]
        self._guard = StepGuard(self._step_name)
        self._half = False  # a param is bfloat16/float16: steps take the mixed path
        self._mixed_plan: Any = None  # Adam's kept views for mixed steps
        self._master_ptrs: dict[int, int] = {}  # id(param) -> its memory when its master was last used
        self.last_grad_norm: float | None = None  # the global gradient norm of the last mixed step
        self.last_step_skipped = False  # the last step met inf/NaN (or GradScaler's found_inf): nothing written
        super().__init__(params, defaults)
        self.state = _State(self._epoch, self.state.items())

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
        # torch.optim wraps step() for its step hooks and the profiler's record (several us
        # per call); this step runs that wrapper only while a hook or a profiler needs it.
        if type(self).step is _NativeOptimizer.step and (
            _profiler_enabled() or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
            or _global_step_hooks[0] or _global_step_hooks[1]
        ):
            return _step_with_hooks(self) if closure is None else _step_with_hooks(self, closure)  # hooks see torch's args
        return self._step_unhooked(closure)

    # step() is not wrapped by torch.optim (it runs the wrapper itself when needed); a
    # subclass's own step() is, and calls this one through super(), which then runs no hooks.
    step.hooked = True  # type: ignore[attr-defined]

    def _step_unhooked(self, closure: Callable[[], float] | None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._guard:
            if self._mixed_mode():
                self._mixed_step()
                return loss
            plan = self._plan
            if plan is None or self._plan_epoch != self._epoch[0] or not plan.torch_step(self.param_groups):
                try:
                    self._rebuild_and_step()
                except TypeError:
                    # a param turned bfloat16/float16 (param.data = ...): nothing was written
                    if not self._takes_half or not any(p.dtype in _HALF for g in self.param_groups for p in g["params"]):
                        raise
                    self._half = True
                    self._mixed_step()
        self.last_step_skipped = False
        return loss

    _takes_half: ClassVar[bool] = False  # Adam: bfloat16/float16 params, master weights, GradScaler

    def _mixed_mode(self) -> bool:
        return False

    def _mixed_step(self) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group``; its tensors and
        hyper-parameters are checked first (TypeError/ValueError, and the group is not added)."""
        if "max_grad_norm" in param_group:
            raise ValueError(
                f"fastadam.torch.{type(self).__name__}.add_param_group(): max_grad_norm is the optimizer's (one global "
                "norm over every group), not a param group's: pass it to the constructor"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.pop("max_grad_norm", None)  # copied from defaults by torch: it stays the optimizer's
        g = len(self.param_groups) - 1
        name = f"{type(self).__name__}()"
        try:
            dtypes = _ANY_FLOAT if self._takes_half else _FLOATS
            for i, p in enumerate(group["params"]):
                if not _param_ok(p, dtypes):
                    raise _tensor_error(
                        p, f"fastadam.torch.{name}: param_groups[{g}]['params'][{i}]", self._torch_name, half_ok=self._takes_half
                    )
            self._check_group(group, f"fastadam.torch.{name}: param_groups[{g}]", f"{name}: param_groups[{g}]")
            self._check_precision(group, f"fastadam.torch.{name}: param_groups[{g}]")
        except BaseException:
            self.param_groups.pop()
            raise
        self._half = self._half or any(p.dtype in _HALF for p in group["params"])
        self._plan = None
        self._mixed_plan = None

    def _check_precision(self, group: Mapping[str, Any], where: str) -> None:
        """Adam checks its mixed-precision keys against the group's params; SGD has none."""

    def _check_group(self, group: Mapping[str, Any], where: str, flag_where: str) -> None:
        for key in self._refused_flags:
            if key in group:
                self._check_flag(key, group[key], flag_where)
        check_group(self._algorithm, group, where)

    # ----- the plan ----------------------------------------------------------------------

    def _rebuild_and_step(self) -> None:
        """The slow path: create missing state, rebuild the plan from every group, and step."""
        self._plan = None
        algorithm = self._algorithm
        name = self._step_name
        created = Rollback()
        plan: Any = None
        try:
            missing = self._check_and_find_missing_state()
            fresh_buffers = self._create_state(missing, created)
            tensors: list[torch.Tensor] = []
            labels: list[str] = []
            params: list[np.ndarray] = []
            states: list[list[np.ndarray | None]] = [[] for _ in algorithm.state_keys]
            steps: list[np.ndarray | None] | None = [] if algorithm.counts_steps else None
            for g, group in enumerate(self.param_groups):
                for i, p in enumerate(group["params"]):
                    label = f"param_groups[{g}]['params'][{i}]"
                    entry = self.state.get(p)
                    tensors.append(p)
                    labels.append(label)
                    params.append(p.detach().numpy())
                    for k, key in enumerate(algorithm.state_keys):
                        value = entry.get(key) if entry else None
                        states[k].append(None if value is None else self._state_array(value, key, label))
                    if steps is not None:
                        steps.append(self._step_array(entry, label))

            def grad_error(k: int, grad: object) -> BaseException:
                return _grad_error(name, self_torch_name, tensors[k], labels[k], grad)

            self_torch_name = self._torch_name  # the plan must not reference the optimizer (a cycle GC cannot see)
            plan = _core._StepPlan(
                algorithm.kind, name, params, states, [len(g["params"]) for g in self.param_groups], labels,
                _TorchPlanApi(tensors, steps, grad_error),
            )
            self._plan_epoch = self._epoch[0]
            if fresh_buffers:
                self._first_sgd_step(plan, tensors, labels, fresh_buffers)
            elif not plan.torch_step(self.param_groups):
                raise RuntimeError(f"{name}: internal error: a plan built for this step found it stale")
            self._plan = plan
        except BaseException:
            # A rejected step leaves no trace, not even fresh state; a step that happened
            # (then interrupted, as by Ctrl-C, on its way out) keeps the state it created.
            if plan is None or plan.completed == 0:
                created.run()
            self._plan = None
            raise

    def _check_and_find_missing_state(self) -> list[tuple[torch.Tensor, tuple[str, ...]]]:
        """Checks every param and the flags of every group; returns the params with a
        gradient and the state keys each lacks."""
        cls = type(self).__name__
        missing = []
        for g, group in enumerate(self.param_groups):
            for key in self._refused_flags:
                if key in group:
                    self._check_flag(key, group[key], f"{cls}.step(): param_groups[{g}]")
            needed = self._algorithm.needed_keys(group)
            if self._algorithm.counts_steps:
                needed = ("step",) + needed
            for i, p in enumerate(group["params"]):
                if not _param_ok(p):
                    raise _tensor_error(p, f"{self._step_name}: param_groups[{g}]['params'][{i}]", self._torch_name)
                if p.grad is None:
                    continue
                entry = self.state.get(p) or {}
                lacking = tuple(key for key in needed if entry.get(key) is None)
                if lacking:
                    missing.append((p, lacking))
        return missing

    def _create_state(self, missing: list[tuple[torch.Tensor, tuple[str, ...]]], created: Rollback) -> list[torch.Tensor]:
        """Zero state for ``missing``, each kind packed in one block (docs/performance.md);
        returns the params that got a new momentum buffer (SGD)."""
        fresh: list[torch.Tensor] = []
        keys = ("step",) + self._algorithm.state_keys
        for kind, key in enumerate(keys):
            wanting = [p for p, lacking in missing if key in lacking]
            if not wanting:
                continue
            if key == "step":
                values = [torch.tensor(0.0, dtype=_scalar_dtype()) for _ in wanting]
            else:
                arrays = zeros_packed([(tuple(p.shape), p.detach().numpy().dtype) for p in wanting], state_stagger(kind - 1))
                values = [torch.from_numpy(a) for a in arrays]
            for p, value in zip(wanting, values):
                # C-level undos (Rollback): dict's own pop, past _State's and _Entry's
                # overrides; each registered before its change, so an interrupt between
                # the two leaves an undo with nothing to undo, never a change without one.
                if p not in self.state:
                    created.add(functools.partial(dict.pop, self.state, p, None))
                entry = self.state[p]
                created.add(functools.partial(dict.pop, entry, key, None))
                entry[key] = value
                if key == "momentum_buffer":
                    fresh.append(p)
        return fresh

    def _state_array(self, value: object, key: str, label: str) -> np.ndarray:
        if not _ok(value):
            raise _tensor_error(value, f"{self._step_name}: state[{key!r}] of {label}", self._torch_name)
        assert isinstance(value, torch.Tensor)
        return value.detach().numpy()

    def _step_array(self, entry: Mapping[str, Any] | None, label: str) -> np.ndarray | None:
        """A 0-d view of ``state[p]["step"]``, which the plan reads and counts on in place."""
        step = entry.get("step") if entry else None
        if step is None:
            return None
        if not torch.is_tensor(step):
            assert isinstance(entry, dict)
            entry["step"] = step = torch.tensor(float(step), dtype=_scalar_dtype())
        if not (step.is_cpu and step.layout == torch.strided and step.numel() == 1 and step.dtype in _STEP_DTYPES):
            raise TypeError(
                f"{self._step_name}: state['step'] of {label} must be a one-element CPU tensor of float32, float64 "
                f"or int64 (torch.optim's own), got {step.dtype} {tuple(step.shape)} on {step.device}"
            )
        return step.detach().numpy().reshape(())

    def _first_sgd_step(self, plan: Any, tensors: list[torch.Tensor], labels: list[str], fresh: list[torch.Tensor]) -> None:
        # A new momentum buffer becomes the gradient (torch: clone); the plan's counted step
        # (count 0 = new) knows that, the torch-mode step does not.
        grads: list[np.ndarray | None] = []
        fresh_ids = {id(p) for p in fresh}
        counts = np.ones(len(tensors), dtype=np.int64)
        for k, p in enumerate(tensors):
            grad = p.grad
            if grad is not None and not (_ok(grad) and grad.dtype == p.dtype and grad.shape == p.shape):
                raise _grad_error(self._step_name, self._torch_name, p, labels[k], grad)
            grads.append(None if grad is None else grad.detach().numpy())
            if id(p) in fresh_ids:
                counts[k] = 0
        updated = tuple(p for p, g in zip(tensors, grads) if g is not None)
        if _increment_version is not None and updated:
            _increment_version(updated)  # before, as torch_step does: an interrupt cannot skip it
        if not plan.step(grads, counts, self.param_groups):
            raise RuntimeError(f"{self._step_name}: internal error: a plan built for this step found it stale")

    # ----- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state_dict()``, with plain dicts per parameter (tensors by reference, as torch)."""
        out = super().state_dict()
        out["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in out["state"].items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()``, from the matching ``torch.optim`` optimizer,
        or from fastadam's NumPy optimizer of the same kind (its arrays become tensors).

        As in torch, tensors of the dict that already have the parameter's dtype are used as
        they are, not copied: deep-copy the dict (``copy.deepcopy``, or ``torch.save`` /
        ``torch.load``) to give two optimizers independent state. torch.optim's
        implementation switches (``foreach``, ``fused``, ``capturable``, ``differentiable``)
        are loaded as they are when None or False, and reset to their defaults otherwise.
        Entries of ``state`` that are not a parameter's are kept as they are, as torch does.
        """
        state = state_dict.get("state", {})
        groups = state_dict.get("param_groups")
        if isinstance(groups, (list, tuple)) and any(isinstance(g, Mapping) and isinstance(g.get("state_dtype"), np.dtype) for g in groups):
            # from fastadam's NumPy optimizer: its state_dtype as torch's dtype
            state_dict = dict(state_dict)
            state_dict["param_groups"] = [
                {**g, "state_dtype": getattr(torch, g["state_dtype"].name)} if isinstance(g.get("state_dtype"), np.dtype) else g
                for g in groups
            ]
        self._check_loaded_state(state_dict)
        if any(isinstance(v, np.ndarray) for entry in state.values() if isinstance(entry, Mapping) for v in entry.values()):
            state_dict = dict(state_dict)
            state_dict["state"] = {
                k: (
                    {key: (_tensor_of(v) if isinstance(v, np.ndarray) else v) for key, v in entry.items()}
                    if isinstance(entry, Mapping)
                    else entry
                )
                for k, entry in state.items()
            }
        super().load_state_dict(state_dict)
        self._restore_state_dtypes(state_dict)

    def _restore_state_dtypes(self, state_dict: Mapping[str, Any]) -> None:
        """torch's loading casts every state tensor to its param's dtype; Adam's master
        weights and states of another dtype (mixed precision) get theirs back."""
    def _check_loaded_state(self, state_dict: Mapping[str, Any]) -> None:
        # Before torch's loading replaces anything: each parameter's entry complete and
        # real for its (loaded) group. Group layouts that do not match are torch's to refuse.
        saved_groups = state_dict.get("param_groups")
        state = state_dict.get("state")
        if not isinstance(saved_groups, (list, tuple)) or not isinstance(state, Mapping) or len(saved_groups) != len(self.param_groups):
            return
        name = f"fastadam.torch.{type(self).__name__}.load_state_dict()"
        for group, saved in zip(self.param_groups, saved_groups):
            if not isinstance(saved, Mapping) or len(saved.get("params", ())) != len(group["params"]):
                return
        for group, saved in zip(self.param_groups, saved_groups):
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for index in saved["params"]:
                entry = state.get(index)
                if isinstance(entry, Mapping):
                    check_loaded_entry(self._algorithm, entry, merged, f"{name}: state[{index!r}]", self._quantized)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._impl_flags.items():
                if key in self._refused_flags and group.get(key) not in (None, False):
                    group[key] = value  # e.g. capturable=True from a torch optimizer's state dict
                group.setdefault(key, value)
            for key, flag in self._flag_defaults.items():
                group.setdefault(key, flag)
            for p in group["params"]:
                entry = self.state.get(p)
                if not isinstance(entry, dict) or not entry:
                    continue
                if "step" in entry and not torch.is_tensor(entry["step"]):
                    entry["step"] = torch.tensor(float(entry["step"]), dtype=_scalar_dtype())
                for key, value in list(entry.items()):
                    # The kernel writes state in place, so it must be contiguous; a loaded
                    # buffer that is not gets a contiguous copy here, once.
                    if key != "step" and isinstance(value, torch.Tensor) and not value.is_contiguous():
                        entry[key] = value.contiguous()
        self._epoch = [0]
        self.state = _State(self._epoch, self.state.items())
        self._plan = None
        self._plan_epoch = -1
        self._guard = StepGuard(self._step_name)
        self._half = any(p.dtype in _HALF for g in self.param_groups for p in g["params"])
        self._mixed_plan = None
        self._master_ptrs = {}
        self.last_grad_norm = None
        self.last_step_skipped = False


def _check_torch_scalars(lr: object, betas: tuple[object, ...] | None) -> None:
    """torch.optim's own checks of tensor hyper-parameters, with its messages."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if betas is None:
        return
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    both_floats = all(isinstance(b, (float, int)) and not isinstance(b, bool) for b in betas)
    if not (both_floats or all(isinstance(b, torch.Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")



def _step_through_hooks(self: _NativeOptimizer, closure: Callable[[], float] | None = None) -> float | None:
    return self._step_unhooked(closure)


# torch's own wrapper: pre-hooks (which may replace the arguments), post-hooks, the record.
_step_with_hooks = torch.optim.Optimizer.profile_hook_step(_step_through_hooks)


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
            CPU, dense, contiguous, float32, float64, bfloat16 or float16.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as in
            ``torch.optim.Adam``.
        max_grad_norm: clip the global L2 norm of all gradients to this, fused into the
            step (``torch.nn.utils.clip_grad_norm_``'s coefficient); the optimizer's, not a
            group's. The step's norm is ``opt.last_grad_norm``; ``opt.last_step_skipped``
            says an inf/NaN gradient (or GradScaler's found_inf) skipped the step.
        master_weights: (group key) bfloat16/float16 params keep a float32 copy,
            ``state[p]["master_param"]``; the step updates it and writes it, rounded, to ``p``.
        state_dtype: (group key) the dtype of ``exp_avg``/``exp_avg_sq``: None (the
            param's, as torch; float32 with master weights) or ``torch.bfloat16``/``torch.float32``.
        stochastic_rounding: (group key) bfloat16 params without master weights are
            rounded stochastically: unbiased, deterministic in (param index, step, element).
        foreach, fused: accepted and ignored: fastadam's step is always fused and
            multi-tensor (code written for ``torch.optim.Adam(..., fused=True)`` runs as it is).
        capturable, differentiable: only False (CUDA graphs and differentiating through the
            step are torch's); True raises ValueError.

    ``step(closure=None)`` updates every parameter with a ``.grad`` in place, all in one
    kernel call, and returns the closure's loss. ``state[p]`` holds ``step`` (a scalar
    float tensor), ``exp_avg``, ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``.
    """

    _algorithm = ADAM
    _torch_name = "Adam"
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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        _check_torch_scalars(lr, tuple(betas))
        clip = check_max_grad_norm(max_grad_norm, f"fastadam.torch.{type(self).__name__}()")
        # The mixed-precision keys join the groups only when set: torch's layout otherwise.
        mixed = {"master_weights": master_weights, "state_dtype": state_dtype, "stochastic_rounding": stochastic_rounding}
        defaults = {
            **{k: v for k, v in mixed.items() if v not in (None, False)},
            **({} if clip is None else {"max_grad_norm": clip}),
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


    _takes_half = True
    # torch.amp.GradScaler hands this optimizer grad_scale and found_inf (as torch's fused Adam)
    _step_supports_amp_scaling = True

    @property
    def max_grad_norm(self) -> float | None:
        """The largest global L2 norm of the gradients (None: no clipping); the optimizer's, not a group's."""
        value = self.defaults.get("max_grad_norm")
        return None if value is None else float(value)

    def _mixed_mode(self) -> bool:
        return (
            self._half
            or getattr(self, "grad_scale", None) is not None
            or getattr(self, "found_inf", None) is not None
            or self.defaults.get("max_grad_norm") is not None
            or any(g.get("master_weights") or g.get("stochastic_rounding") or g.get("state_dtype") is not None for g in self.param_groups)
        )

    def _check_precision(self, group: Mapping[str, Any], where: str) -> None:
        state = group.get("state_dtype")
        if state is not None and state not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(
                f"{where}: state_dtype must be None, torch.float32 or torch.bfloat16 (torch.float16 for float16 params, "
                f"torch.float64 for float64 params), got {state!r}"
            )
        kinds = [str(p.dtype).removeprefix("torch.") for p in group["params"]]
        state_name = None if state is None else str(state).removeprefix("torch.")
        check_mixed_precision(group, kinds, state_name, self.defaults.get("max_grad_norm") is not None, where)

    def _state_dtype(self, group: Mapping[str, Any], p: torch.Tensor) -> torch.dtype:
        state = group.get("state_dtype")
        if state is not None:
            return state  # type: ignore[no-any-return]
        return torch.float32 if group.get("master_weights") else p.dtype  # as torch: the param's dtype

    def _restore_state_dtypes(self, state_dict: Mapping[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        for group, saved in zip(self.param_groups, saved_groups):
            for p, index in zip(group["params"], saved.get("params", ())):
                entry, loaded = self.state.get(p), saved_state.get(index)
                if not entry or not isinstance(loaded, Mapping):
                    continue
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
                    value = loaded.get(key)
                    if not isinstance(value, torch.Tensor):
                        continue
                    want = torch.float32 if key == "master_param" else self._state_dtype(group, p)
                    if entry[key].dtype != want:
                        entry[key] = value.to(want)

    def _mixed_step(self) -> None:
        """Mixed precision (docs/design.md): bf16/fp16 params, fp32 masters, states of
        ``state_dtype``, GradScaler's grad_scale/found_inf, max_grad_norm; one native call.

        The NumPy views of params and state are kept from step to step (``_MixedPlan``)
        while the state, the groups' params and their memory stay; a step then only takes
        views of the gradients."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        plan = self._mixed_plan
        grads = None if plan is None or plan.epoch != self._epoch[0] else plan.grads(self.param_groups)
        if grads is None:
            self._mixed_plan = plan = None
            self._mixed_validate()  # every error before anything changes
            has_float64 = any(p.dtype == torch.float64 and p.grad is not None for g in self.param_groups for p in g["params"])
        else:
            has_float64 = plan.has_float64
        if has_float64 and self.defaults.get("max_grad_norm") is not None:
            raise TypeError(
                f"{self._step_name}: max_grad_norm works on float32, bfloat16 and float16 params; a param with a "
                "gradient is float64 (clip it with torch.nn.utils.clip_grad_norm_, or keep it in another optimizer)"
            )
        if grad_scale is not None and has_float64:
            # The kernel unscales in float32 arithmetic only: unscale in place as GradScaler.unscale_ does.
            found = torch.zeros(1) if found_inf is None else found_inf.clone()
            tensors = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, (1.0 / grad_scale.double()).float().reshape(1))
            found_inf, grad_scale = found, None
        if found_inf is not None and float(found_inf) != 0.0:
            self.last_step_skipped = True  # GradScaler found inf/NaN: torch's fused Adam skips the step
            self.last_grad_norm = None
            return
        created = Rollback()
        marker: list[float] | None = None  # the first count before the call: it changes once the step happened
        try:
            if plan is None:
                plan = self._build_mixed_plan(created)
                grads = plan.grads(self.param_groups)
                if grads is None:
                    raise RuntimeError(f"{self._step_name}: internal error: a mixed plan built for this step found it stale")
            assert grads is not None
            if _increment_version is not None and plan.tensors:
                _increment_version(plan.tensors)  # before, as torch_step does
            marker = [float(c) for c in plan.counts[:1]]
            try:
                norm = _core._adam_step_groups(
                    self._step_name, plan.params, grads, plan.exp_avgs, plan.exp_avg_sqs, plan.maxes, plan.outs, plan.counts,
                    plan.indices, plan.group_index, self.param_groups, None if grad_scale is None else float(grad_scale),
                    self.defaults.get("max_grad_norm"), plan.seeds, plan.kernel_labels,
                )
            except (TypeError, ValueError):
                self._mixed_validate()  # torch's names for a bad tensor; else the kernel's error
                raise
        except BaseException:
            if created and (marker is None or plan is None or [float(c) for c in plan.counts[:1]] == marker):
                created.run()  # the step did not happen
            self._mixed_plan = None
            raise
        self._mixed_plan = plan
        skipped = norm is not None and not np.isfinite(norm)
        if skipped and created:
            created.run()
            self._mixed_plan = None
        self.last_grad_norm = norm
        self.last_step_skipped = skipped

    def _mixed_validate(self) -> None:
        """Every param, gradient, state tensor and group of a mixed step, with torch's names."""
        name = self._step_name
        cls = type(self).__name__
        for g, group in enumerate(self.param_groups):
            where = f"{cls}.step(): param_groups[{g}]"
            self._check_group(group, f"fastadam.torch.{where}", where)
            self._check_precision(group, f"fastadam.torch.{where}")
            for i, p in enumerate(group["params"]):
                label = f"param_groups[{g}]['params'][{i}]"
                if not _param_ok(p, _ANY_FLOAT):
                    raise _tensor_error(p, f"{name}: {label}", self._torch_name, half_ok=True)
                grad = p.grad
                if grad is not None and not (_ok(grad, _ANY_FLOAT) and grad.dtype == p.dtype and grad.shape == p.shape):
                    raise _grad_error(name, self._torch_name, p, label, grad, half_ok=True)
                entry = self.state.get(p) or {}
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
                    if entry.get(key) is not None and not _ok(entry[key], _ANY_FLOAT):
                        raise _tensor_error(entry[key], f"{name}: state[{key!r}] of {label}", self._torch_name, half_ok=True)

    def _build_mixed_plan(self, created: Rollback) -> _MixedPlan:
        """Creates the missing state of the params with a gradient (undone by ``created``)
        and the views of this step's tensors."""
        plan = _MixedPlan(self.param_groups)
        self._create_moments(plan, created)
        for p, g, label in zip(plan.tensors, plan.group_index, plan.labels):
            group = self.param_groups[g]
            if p not in self.state:
                created.add(functools.partial(dict.pop, self.state, p, None))
            entry = self.state[p]
            moments = ["exp_avg", "exp_avg_sq"] if entry.get("exp_avg_codes") is None else []  # (quantized: their own keys)
            wanted = ["step", *moments] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            wanted += ["master_param"] if group.get("master_weights") else []
            for key in wanted:
                if entry.get(key) is not None:
                    continue
                if key == "step":
                    value = torch.tensor(0.0, dtype=_scalar_dtype())
                elif key == "master_param":
                    value = p.detach().to(torch.float32, copy=True)  # exact widening
                else:
                    value = torch.zeros(p.shape, dtype=self._state_dtype(group, p))
                created.add(functools.partial(dict.pop, entry, key, None))
                entry[key] = value
            master = entry.get("master_param") if group.get("master_weights") else None
            if master is None and entry.get("master_param") is not None:
                # master_weights turned off: the param goes on from its own value, and a
                # later master starts from it (not from a stale copy)
                created.add(functools.partial(dict.__setitem__, entry, "master_param", entry["master_param"]))
                del entry["master_param"]
            elif master is not None and self._master_ptrs.get(id(p), p.data_ptr()) != p.data_ptr():
                # param.data = new values: the master starts again from them (as a new master would)
                fresh = p.detach().to(torch.float32, copy=True)
                created.add(functools.partial(dict.__setitem__, entry, "master_param", master))
                entry["master_param"] = master = fresh
            plan.kernel_labels.append(label if master is None else f"{label} ({p.dtype}, with float32 master weights)")
            plan.params.append(_numpy(p) if master is None else _numpy(master))
            plan.outs.append(_numpy(p) if master is not None else None)
            plan.exp_avgs.append(self._moment_array(entry, "exp_avg"))
            plan.exp_avg_sqs.append(self._moment_array(entry, "exp_avg_sq"))
            plan.maxes.append(_numpy(entry["max_exp_avg_sq"]) if group["amsgrad"] else None)
            step = self._step_array(entry, label)
            assert step is not None
            plan.counts.append(step)
        plan.epoch = self._epoch[0]  # after the state it created
        self._master_ptrs = {id(p): p.data_ptr() for p in plan.tensors}
        return plan

    def _create_moments(self, plan: _MixedPlan, created: Rollback) -> None:
        """The quantized optimizers create the moments of the plan's params here, packed."""

    def _moment_array(self, entry: Mapping[str, Any], key: str) -> Any:
        """What the kernel takes as the moment ``key`` of a param: a NumPy view of its tensor
        (the quantized optimizers: a QuantizedState of its codes and absmax)."""
        return _numpy(entry[key])


class _MixedPlan:
    """The views of one mixed-precision step (``Adam._mixed_step``), kept while they hold:
    the same params (by identity, memory and dtype) with a gradient, the same state."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.epoch = -1
        self.flat: list[torch.Tensor] = []
        self.stepped: list[bool] = []
        self.tensors_list: list[torch.Tensor] = []
        self.labels: list[str] = []
        self.group_index: list[int] = []
        seeds: list[int | None] = []
        for g, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                self.flat.append(p)
                self.stepped.append(p.grad is not None)
                if p.grad is not None:
                    self.tensors_list.append(p)
                    self.labels.append(f"param_groups[{g}]['params'][{i}]")
                    self.group_index.append(g)
                    seeds.append(len(self.flat) - 1 if group.get("stochastic_rounding") else None)
        self.tensors = tuple(self.tensors_list)
        self.seeds = seeds if any(x is not None for x in seeds) else None
        self.keys = [(p.data_ptr(), p.dtype, p.shape) for p in self.tensors]
        self.kernel_labels: list[str] = []  # labels, the master weights' said
        self.modes = [(g.get("master_weights"), g.get("state_dtype"), g.get("stochastic_rounding"), g.get("amsgrad")) for g in groups]
        self.has_float64 = any(p.dtype == torch.float64 for p in self.tensors)
        self.indices = list(range(len(self.tensors)))
        self.params: list[np.ndarray] = []
        self.outs: list[np.ndarray | None] = []
        self.exp_avgs: list[Any] = []  # arrays, or QuantizedState (quantized optimizers)
        self.exp_avg_sqs: list[Any] = []
        self.maxes: list[np.ndarray | None] = []
        self.counts: list[np.ndarray] = []

    def grads(self, groups: list[dict[str, Any]]) -> list[np.ndarray] | None:
        """This step's gradient views, or None where the plan no longer holds (or a gradient
        is no plain CPU tensor: the slow path names it)."""
        flat = [p for group in groups for p in group["params"]]
        if len(flat) != len(self.flat) or any(a is not b for a, b in zip(flat, self.flat)):
            return None
        if [p.grad is not None for p in flat] != self.stepped:
            return None
        if [(p.data_ptr(), p.dtype, p.shape) for p in self.tensors] != self.keys:
            return None
        if [(g.get("master_weights"), g.get("state_dtype"), g.get("stochastic_rounding"), g.get("amsgrad")) for g in groups] != self.modes:
            return None
        if any(p.grad.dtype != p.dtype for p in self.tensors):  # type: ignore[union-attr]
            return None
        try:
            return [_numpy(p.grad) for p in self.tensors]  # type: ignore[arg-type]
        except (TypeError, RuntimeError):  # not on the CPU, sparse, a negative view: the slow path says so
            return None


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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
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
            max_grad_norm=max_grad_norm,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
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
        foreach, fused: accepted and ignored (the step is always fused and multi-tensor).
        differentiable: only False.

    ``state[p]["momentum_buffer"]`` (a tensor) exists once a parameter has taken a step
    with momentum, as in torch.
    """

    _algorithm = _SGD_ALGORITHM
    _torch_name = "SGD"
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
        _check_torch_scalars(lr, None)
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


# ----- quantized states -------------------------------------------------------------------


class Adam8bit(Adam):
    r"""Adam with 8-bit blockwise-quantized states on CPU tensors; drop-in for
    ``bitsandbytes.optim.Adam8bit`` / ``torchao.optim.Adam8bit``, with :class:`Adam`'s update.

    The states of each param of at least ``min_8bit_size`` elements (default 4096, as
    bitsandbytes and torchao) are ``state[p]["exp_avg_codes"]`` / ``["exp_avg_sq_codes"]``
    (uint8 tensors of the param's shape, one code per element) and ``["exp_avg_absmax"]`` /
    ``["exp_avg_sq_absmax"]`` (float32, one per block of 256 elements); smaller params keep
    float32 ``exp_avg``/``exp_avg_sq`` (tiny tensors pay most for the per-block absmax and
    the coarse codes, and are a negligible share of the memory). ``step`` is torch's float32
    scalar tensor. Each step dequantizes, updates in float32 and requantizes to the nearest
    code, in one pass through fastadam's kernel: the bits of
    :func:`fastadam.reference.adam_step_multi` (see :class:`fastadam.Adam8bit`).

    Mixed precision as :class:`Adam` (bf16/fp16 params, ``master_weights``,
    ``stochastic_rounding``, ``max_grad_norm``, ``torch.amp.GradScaler``); ``amsgrad=True``
    and ``state_dtype`` raise ValueError. ``load_state_dict`` takes this optimizer's state
    dicts, fastadam.Adam8bit's, plain fp32 Adam/AdamW ones (torch.optim's, fastadam's: the
    moments of large params are quantized), bitsandbytes' 8-bit and torchao's 8-bit/4-bit
    optimizers' (:func:`from_bitsandbytes`, :func:`from_torchao`); :func:`to_bitsandbytes`,
    :func:`to_torchao` and :func:`fastadam.dequantize_state_dict` go the other way.
    """

    _bits: ClassVar[int] = 8
    _min_keyword: ClassVar[str] = "min_8bit_size"
    _quantized = True

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable,
                             fused, decoupled_weight_decay, max_grad_norm, master_weights, state_dtype, stochastic_rounding,
                             min_8bit_size)

    def _init_quantized(
        self, params: Params, lr: float | torch.Tensor, betas: tuple[float | torch.Tensor, float | torch.Tensor], eps: float,
        weight_decay: float, amsgrad: bool, foreach: bool | None, maximize: bool, capturable: bool, differentiable: bool,
        fused: bool | None, decoupled_weight_decay: bool, max_grad_norm: float | None, master_weights: bool,
        state_dtype: torch.dtype | None, stochastic_rounding: bool, min_size: int,
    ) -> None:
        name = f"fastadam.torch.{type(self).__name__}()"
        refuse_quantized_extras(amsgrad, state_dtype, self._bits, name)
        # Checked before the groups (their check needs it); kept in defaults, which torch pickles.
        self._min_size = check_min_size(min_size, self._min_keyword, name)
        Adam.__init__(
            self, params, lr, betas, eps, weight_decay, False, foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay,
            max_grad_norm=max_grad_norm, master_weights=master_weights, stochastic_rounding=stochastic_rounding,
        )
        self.defaults[self._min_keyword] = self._min_size

    @property
    def bits(self) -> int:
        """Bits per code of the quantized states (8 or 4)."""
        return self._bits

    @property
    def min_size(self) -> int:
        """Params of fewer elements keep float32 states (``min_8bit_size``/``min_4bit_size``)."""
        return int(self.defaults.get(self._min_keyword, getattr(self, "_min_size", 4096)))

    def _quantizes(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_size

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Wrappers (ZeroRedundancyOptimizer) build groups from the defaults, this key included:
        # the optimizer's own value is taken, any other refused.
        if self._min_keyword in param_group and param_group[self._min_keyword] != self.min_size:
            raise ValueError(
                f"fastadam.torch.{type(self).__name__}.add_param_group(): {self._min_keyword} is the optimizer's, not a "
                f"param group's (this optimizer's is {self.min_size}, the group has {param_group[self._min_keyword]!r}): "
                "pass it to the constructor"
            )
        super().add_param_group(param_group)
        self.param_groups[-1].pop(self._min_keyword, None)  # copied from defaults by torch

    def _mixed_mode(self) -> bool:
        return True  # quantized states take the mixed path

    def _state_dtype(self, group: Mapping[str, Any], p: torch.Tensor) -> torch.dtype:
        return torch.float32  # small params' states (bitsandbytes' choice too)

    def _check_precision(self, group: Mapping[str, Any], where: str) -> None:
        refuse_quantized_extras(group.get("amsgrad"), group.get("state_dtype"), self._bits, where)
        super()._check_precision(group, where)
        for j, p in enumerate(group["params"]):
            if p.dtype == torch.float64 and self._quantizes(p):
                raise TypeError(
                    f"{where}: params[{j}] is float64 with {p.numel()} elements; {self._bits}-bit states are for float32, "
                    f"bfloat16 and float16 params: keep float64 params in fastadam.torch.Adam/AdamW (or raise "
                    f"{self._min_keyword} above their size)"
                )

    def _mixed_validate(self) -> None:
        super()._mixed_validate()
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                entry = self.state.get(p) or {}
                for key in QUANTIZED_KEYS:
                    value = entry.get(key)
                    want = torch.uint8 if key.endswith("codes") else torch.float32
                    if value is not None and not _ok(value, (want,)):
                        raise TypeError(
                            f"{self._step_name}: state[{key!r}] of param_groups[{g}]['params'][{i}] must be a contiguous "
                            f"CPU tensor of {want}, got {type(value).__name__}"
                            + (f" ({value.dtype}, {value.device})" if isinstance(value, torch.Tensor) else "")
                        )

    def _create_moments(self, plan: _MixedPlan, created: Rollback) -> None:
        """The moments of the plan's params that have none: codes and absmax for params of
        quantized size, float32 tensors for the others, one block per kind (the 4K-aliasing
        placement, fastadam._common.zeros_packed)."""
        lacking = [p for p in plan.tensors if not self.state.get(p) or (
            self.state[p].get("exp_avg") is None and self.state[p].get("exp_avg_codes") is None)]
        if not lacking:
            return
        block = QUANT_BLOCK[self._bits]
        for kind, key in enumerate(("exp_avg", "exp_avg_sq")):
            likes: list[tuple[tuple[int, ...], np.dtype[Any]]] = []
            for p in lacking:
                n = p.numel()
                if self._quantizes(p):
                    likes.append((tuple(p.shape) if self._bits == 8 else ((n + 1) // 2,), np.dtype(np.uint8)))
                    likes.append(((-(-n // block),), np.dtype(np.float32)))
                else:
                    likes.append((tuple(p.shape), np.dtype(np.float32)))
            arrays = iter(zeros_packed(likes, state_stagger(kind)))
            for p in lacking:
                if p not in self.state:
                    created.add(functools.partial(dict.pop, self.state, p, None))
                entry = self.state[p]
                values = {f"{key}_codes": next(arrays), f"{key}_absmax": next(arrays)} if self._quantizes(p) else {key: next(arrays)}
                if self._bits == 4 and self._quantizes(p) and kind == 0:
                    created.add(functools.partial(dict.pop, entry, "param_shape", None))
                    entry["param_shape"] = tuple(p.shape)
                for k, a in values.items():
                    created.add(functools.partial(dict.pop, entry, k, None))  # registered before the change
                    entry[k] = torch.from_numpy(a)

    def _moment_array(self, entry: Mapping[str, Any], key: str) -> Any:
        codes = entry.get(f"{key}_codes")
        if codes is None:
            return super()._moment_array(entry, key)
        return QuantizedState(_numpy(codes), _numpy(entry[f"{key}_absmax"]), entry_bits(entry), key == "exp_avg")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict: this optimizer's, fastadam's NumPy one of the same bits, a plain
        fp32 Adam/AdamW one (torch.optim's or fastadam's; the moments of params of quantized
        size are quantized, fastadam.quantize), bitsandbytes' 8-bit or torchao's 8-bit/4-bit
        optimizers' (their codes and absmax taken as they are, their code books checked
        against fastadam's). A small param's quantized state becomes float32 (exact).
        Everything is checked before anything changes: codes uint8, absmax float32 with one
        entry per block of 256 (8-bit) or 128 (4-bit), the bit width this optimizer's
        (other widths: convert with :func:`fastadam.dequantize_state_dict` first). Tensors
        already in this optimizer's layout are used as they are, as torch does."""
        state_dict = _from_peer(state_dict)
        state_dict = self._in_own_layout(state_dict)
        super().load_state_dict(state_dict)

    def _in_own_layout(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Each param's entry converted to this optimizer's layout (checked); the dict as it
        is when its groups do not match this optimizer's (torch's loading refuses it)."""
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping) or len(groups) != len(self.param_groups):
            return state_dict
        if any(not isinstance(s, Mapping) or len(s.get("params", ())) != len(g["params"]) for s, g in zip(groups, self.param_groups)):
            return state_dict
        params = {i: p for s, g in zip(groups, self.param_groups) for i, p in zip(s["params"], g["params"])}
        name = f"fastadam.torch.{type(self).__name__}.load_state_dict()"
        out = dict(state)
        for index, entry in state.items():
            p = params.get(index)
            if p is None or not isinstance(entry, Mapping):
                continue
            where = f"{name}: state[{index!r}]"
            want = self._bits if self._quantizes(p) else None
            quantized = is_quantized_entry(entry) or entry.get("param_shape") is not None
            if quantized:
                read_quantized_entry(entry, where, tuple(p.shape))  # checked, as it is
                if entry_bits(entry) != self._bits:
                    raise ValueError(
                        f"{where}: the state is {entry_bits(entry)}-bit and {type(self).__name__} keeps {self._bits}-bit "
                        "states: convert the state dict with fastadam.dequantize_state_dict(sd) first (float32 states, "
                        "which it quantizes)"
                    )
            if quantized == (want is not None):
                continue
            converted = convert_entry(entry, want, where, tuple(p.shape))
            out[index] = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) and v is not entry.get(k) else v)
                          for k, v in converted.items()}
        return {**state_dict, "state": out}

    def _restore_state_dtypes(self, state_dict: Mapping[str, Any]) -> None:
        """torch's loading casts every state tensor to its param's dtype: codes are uint8
        again (the loaded tensors themselves), absmax float32, small params' states float32."""
        super()._restore_state_dtypes(state_dict)
        saved_state = state_dict.get("state", {})
        for group, saved in zip(self.param_groups, state_dict.get("param_groups", [])):
            for p, index in zip(group["params"], saved.get("params", ())):
                entry, loaded = self.state.get(p), saved_state.get(index)
                if not entry or not isinstance(loaded, Mapping):
                    continue
                for key in QUANTIZED_KEYS:
                    value = loaded.get(key)
                    if isinstance(value, torch.Tensor):
                        want = torch.uint8 if key.endswith("codes") else torch.float32
                        entry[key] = value if value.dtype == want else value.to(want)


class AdamW8bit(Adam8bit):
    """:class:`Adam8bit` with decoupled weight decay (default ``weight_decay=1e-2``); drop-in
    for ``bitsandbytes.optim.AdamW8bit`` / ``torchao.optim.AdamW8bit``."""

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable,
                             fused, True, max_grad_norm, master_weights, state_dtype, stochastic_rounding, min_8bit_size)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch.optim.AdamW


class Adam4bit(Adam8bit):
    """:class:`Adam8bit` with 4-bit states (two codes a byte, the even element in the high
    nibble; one float32 absmax per block of 128; torchao's maps): ``state[p]`` of a
    quantized param also holds ``param_shape``. Drop-in for ``torchao.optim.Adam4bit``."""

    _bits: ClassVar[int] = 4
    _min_keyword: ClassVar[str] = "min_4bit_size"

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        min_4bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable,
                             fused, decoupled_weight_decay, max_grad_norm, master_weights, state_dtype, stochastic_rounding,
                             min_4bit_size)


class AdamW4bit(Adam4bit):
    """:class:`Adam4bit` with decoupled weight decay (default ``weight_decay=1e-2``); drop-in for ``torchao.optim.AdamW4bit``."""

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
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        min_4bit_size: int = 4096,
    ) -> None:
        self._init_quantized(params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable,
                             fused, True, max_grad_norm, master_weights, state_dtype, stochastic_rounding, min_4bit_size)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


# ----- bitsandbytes' and torchao's state dicts ---------------------------------------------
# Their codes and absmax are fastadam's layout already (256-element blocks, codes of the
# param's shape; torchao's 4-bit codes packed as fastadam's): they are taken as they are,
# once their code book is fastadam's within 2 units in the last place (both compute the
# dynamic map in float32 steps, fastadam as exact fractions rounded once).

_BNB_WRAPPER = "__bnb_optimizer_quant_state__"  # bitsandbytes >= 0.48 nests its quantized states under it
_ULPS = 2


def _check_book(qmap: object, bits: int, signed: bool, where: str) -> None:
    """ValueError unless ``qmap`` is fastadam's code book of (bits, signed) within 2 ulp."""
    ours = _core.quant_map(bits, signed)[0]
    theirs = qmap.detach().cpu().to(torch.float32).reshape(-1).numpy() if isinstance(qmap, torch.Tensor) else np.asarray(qmap, np.float32).reshape(-1)

    def ordered(a: np.ndarray) -> np.ndarray:  # float bits as integers in the floats' order
        i = a.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    if theirs.shape != ours.shape or not np.all(np.abs(ordered(theirs) - ordered(ours)) <= _ULPS):
        worst = "" if theirs.shape != ours.shape else f", {int(np.abs(ordered(theirs) - ordered(ours)).max())} ulp apart at most"
        raise ValueError(
            f"{where}: its code book ({theirs.size} values{worst}) is not fastadam's {bits}-bit "
            f"{'signed' if signed else 'unsigned'} map (fastadam._core.quant_map({bits}, {signed})): its codes mean other "
            "values; dequantize the state with its own library and load it as plain float32 exp_avg/exp_avg_sq"
        )


def _is_torchao_state(value: object) -> bool:
    return isinstance(value, torch.Tensor) and all(hasattr(value, a) for a in ("codes", "scale", "qmap", "signed"))


def _from_peer(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A bitsandbytes or torchao state dict in fastadam's layout; others as they are."""
    state = state_dict.get("state")
    if not isinstance(state, Mapping):
        return state_dict
    entries = [e for e in state.values() if isinstance(e, Mapping)]
    if any(_BNB_WRAPPER in e or "state1" in e for e in entries):
        return from_bitsandbytes(state_dict)
    if any(_is_torchao_state(v) for e in entries for v in e.values()):
        return from_torchao(state_dict)
    return state_dict


def from_bitsandbytes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """bitsandbytes' ``Adam8bit``/``AdamW8bit`` state dict (blockwise; its CPU backend's too)
    in fastadam's layout: ``state1``/``state2`` (uint8) become ``exp_avg_codes``/``exp_avg_sq_codes``,
    ``absmax1``/``absmax2`` the absmax, as they are (``qmap1``/``qmap2`` must be fastadam's
    maps within 2 ulp); its float32 states of small params become ``exp_avg``/``exp_avg_sq``;
    ``step`` a float32 tensor. Loadable by :class:`AdamW8bit` (which calls this itself).
    Not Adam's states (one state, AdEMAMix's three betas), non-blockwise 8-bit states or
    ``max_unorm`` raise ValueError."""
    name = "fastadam.torch.from_bitsandbytes()"
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise TypeError(f"{name}: state_dict must be an optimizer's state dict")
    out_state: dict[Any, Any] = {}
    for index, entry in state_dict["state"].items():
        if not isinstance(entry, Mapping):
            out_state[index] = entry
            continue
        where = f"{name}: state[{index!r}]"
        e = dict(entry)
        e.update(e.pop(_BNB_WRAPPER, {}))
        unknown = set(e) - {"step", "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
        if unknown:
            raise ValueError(
                f"{where}: bitsandbytes state entries {sorted(unknown)} have no fastadam equivalent (max1/new_max1: "
                "non-blockwise 8-bit states, block_wise=False; unorm_vec: max_unorm): save with bitsandbytes' defaults"
            )
        new: dict[str, Any] = {}
        if "step" in e:
            new["step"] = torch.tensor(float(e["step"]), dtype=_scalar_dtype())
        if "state1" in e:
            if "state2" not in e:
                raise ValueError(f"{where}: a bitsandbytes state with state1 only is not Adam's (momentum, Lion, ...)")
            s1, s2 = e["state1"], e["state2"]
            if s1.dtype == torch.uint8:
                for key in ("qmap1", "qmap2", "absmax1", "absmax2"):
                    if key not in e:
                        raise ValueError(f"{where}: an 8-bit bitsandbytes state lacks {key}")
                _check_book(e["qmap1"], 8, True, f"{where}: qmap1")
                _check_book(e["qmap2"], 8, False, f"{where}: qmap2")
                new.update(exp_avg_codes=s1, exp_avg_absmax=e["absmax1"], exp_avg_sq_codes=s2, exp_avg_sq_absmax=e["absmax2"])
            else:
                new.update(exp_avg=s1, exp_avg_sq=s2)
        out_state[index] = new
    groups = []
    for g, group in enumerate(state_dict.get("param_groups", [])):
        where = f"{name}: param_groups[{g}]"
        betas = tuple(group["betas"])
        if len(betas) != 2 or group.get("alpha", 0.0) != 0.0 or group.get("t_alpha") is not None or group.get("t_beta3") is not None:
            raise ValueError(f"{where}: betas {betas}, alpha, t_alpha, t_beta3 are AdEMAMix's, not Adam's")
        groups.append({**{k: v for k, v in group.items() if k not in ("alpha", "t_alpha", "t_beta3")}, "betas": betas})
    return {**state_dict, "state": out_state, "param_groups": groups}


def _torch_book(bits: int, signed: bool) -> torch.Tensor:
    return torch.from_numpy(_core.quant_map(bits, signed)[0].copy())


def to_bitsandbytes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict of :class:`Adam8bit`/:class:`AdamW8bit` (or plain fp32 Adam) in the
    layout ``bitsandbytes.optim.Adam8bit``/``AdamW8bit.load_state_dict`` takes: codes and
    absmax as ``state1``/``state2``/``absmax1``/``absmax2`` (codes of the param's shape),
    fastadam's maps as ``qmap1``/``qmap2``, small params' float32 states as ``state1``/``state2``,
    an int ``step``, groups with bitsandbytes' keys. 4-bit states (bitsandbytes has none),
    master weights, amsgrad and maximize raise ValueError."""
    name = "fastadam.torch.to_bitsandbytes()"
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise TypeError(f"{name}: state_dict must be an optimizer's state dict")
    out_state: dict[Any, Any] = {}
    for index, entry in state_dict["state"].items():
        if not isinstance(entry, Mapping):
            out_state[index] = entry
            continue
        where = f"{name}: state[{index!r}]"
        if entry.get("master_param") is not None or entry.get("max_exp_avg_sq") is not None:
            raise ValueError(f"{where}: bitsandbytes' optimizers keep no master_param or max_exp_avg_sq")
        new: dict[str, Any] = {}
        if "step" in entry:
            step = entry["step"]
            new["step"] = int(step.item() if isinstance(step, torch.Tensor) else step)
        if is_quantized_entry(entry) or entry.get("param_shape") is not None:
            m, v, shape = read_quantized_entry(entry, where)
            if m.bits != 8:
                raise ValueError(f"{where}: bitsandbytes has no 4-bit optimizer states: fastadam.dequantize_state_dict(sd) first")
            codes = [_as_tensor(entry[k]).reshape(shape) for k in ("exp_avg_codes", "exp_avg_sq_codes")]
            new[_BNB_WRAPPER] = {
                "state1": codes[0], "qmap1": _torch_book(8, True), "state2": codes[1], "qmap2": _torch_book(8, False),
                "absmax1": _as_tensor(entry["exp_avg_absmax"]), "absmax2": _as_tensor(entry["exp_avg_sq_absmax"]),
            }
        elif entry.get("exp_avg") is not None:
            new[_BNB_WRAPPER] = {"state1": _as_tensor(entry["exp_avg"]).to(torch.float32),
                                 "state2": _as_tensor(entry["exp_avg_sq"]).to(torch.float32)}
        out_state[index] = new
    groups = []
    for g, group in enumerate(state_dict.get("param_groups", [])):
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError(f"{name}: param_groups[{g}] has amsgrad or maximize, which bitsandbytes' 8-bit Adam lacks")
        lr = group["lr"]
        groups.append({"lr": float(lr.item() if isinstance(lr, torch.Tensor) else lr), "betas": tuple(float(b) for b in group["betas"]),
                       "eps": group["eps"], "weight_decay": group["weight_decay"], "alpha": 0.0, "t_alpha": None, "t_beta3": None,
                       "params": list(group["params"])})
    return {"state": out_state, "param_groups": groups}


def _as_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return _tensor_of(value)
    raise TypeError(f"expected a tensor or an array, got {type(value).__name__}")


def from_torchao(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchao's ``Adam8bit``/``AdamW8bit``/``Adam4bit``/``AdamW4bit`` state dict (its
    ``OptimState8bit``/``OptimState4bit`` tensors) in fastadam's layout: their ``codes`` and
    ``scale`` become codes and absmax, as they are (``qmap`` must be fastadam's within 2 ulp,
    the blocks 256 or 128 elements); plain state tensors and ``step`` stay; a tensor ``lr``
    becomes a float. Loadable by :class:`AdamW8bit`/:class:`AdamW4bit` (which call this)."""
    name = "fastadam.torch.from_torchao()"
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise TypeError(f"{name}: state_dict must be an optimizer's state dict")
    out_state: dict[Any, Any] = {}
    for index, entry in state_dict["state"].items():
        if not isinstance(entry, Mapping):
            out_state[index] = entry
            continue
        where = f"{name}: state[{index!r}]"
        new = dict(entry)
        if _is_torchao_state(entry.get("max_exp_avg_sq")):
            raise ValueError(f"{where}: amsgrad's max_exp_avg_sq has no quantized form in fastadam")
        subclass = [_is_torchao_state(entry.get(k)) for k in ("exp_avg", "exp_avg_sq")]
        if any(subclass) and not all(subclass):
            raise ValueError(f"{where}: exp_avg and exp_avg_sq are quantized alike in fastadam (one is torchao's, one plain)")
        if all(subclass):
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                x: Any = entry[key]
                bits = 8 if x.qmap.numel() == 256 else 4
                _check_book(x.qmap, bits, signed, f"{where}: {key}.qmap")
                if bool(x.signed) != signed:
                    raise ValueError(f"{where}: {key} is {'un' if signed else ''}signed; fastadam's {key} is the other")
                block = x.codes.numel() * (8 // bits) // max(x.scale.numel(), 1)
                if block != QUANT_BLOCK[bits]:
                    raise ValueError(
                        f"{where}: {key} has blocks of {block} elements; fastadam's {bits}-bit blocks are {QUANT_BLOCK[bits]} "
                        f"(torchao's default block_size): load it as a plain state (its dequantize())"
                    )
                del new[key]
                new[f"{key}_codes"], new[f"{key}_absmax"] = x.codes, x.scale
                if bits == 4:
                    new["param_shape"] = tuple(x.shape)
        out_state[index] = new
    groups = []
    for group in state_dict.get("param_groups", []):
        lr = group["lr"]
        groups.append({**group, "lr": float(lr.item()) if isinstance(lr, torch.Tensor) else lr})
    return {**state_dict, "state": out_state, "param_groups": groups}


def to_torchao(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict of the quantized optimizers (or plain fp32 Adam) in the layout
    ``torchao.optim.AdamW8bit``/``AdamW4bit.load_state_dict`` takes (needs torchao):
    quantized moments as ``OptimState8bit``/``OptimState4bit`` (the codes and absmax as
    they are, fastadam's maps), except those of params whose size is not a multiple of the
    block (torchao keeps such params' states plain): float32 tensors, dequantized exactly;
    ``lr`` a tensor, as torchao keeps it."""
    name = "fastadam.torch.to_torchao()"
    try:  # (by name: torchao ships no type information)
        OptimState4bit = importlib.import_module("torchao.optim.subclass_4bit").OptimState4bit
        OptimState8bit = importlib.import_module("torchao.optim.subclass_8bit").OptimState8bit
    except ImportError as error:
        raise ImportError(f"{name} needs torchao: pip install torchao (with your torch's pin)") from error
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise TypeError(f"{name}: state_dict must be an optimizer's state dict")
    out_state: dict[Any, Any] = {}
    for index, entry in state_dict["state"].items():
        if not isinstance(entry, Mapping) or not (is_quantized_entry(entry) or entry.get("param_shape") is not None):
            out_state[index] = entry
            continue
        where = f"{name}: state[{index!r}]"
        m, v, shape = read_quantized_entry(entry, where)
        n = int(np.prod(shape, dtype=np.int64))
        new = {k: val for k, val in entry.items() if k not in QUANTIZED_KEYS and k != "param_shape"}
        for key, q in (("exp_avg", m), ("exp_avg_sq", v)):
            if n % QUANT_BLOCK[q.bits]:
                new[key] = torch.from_numpy(q.dequantize(n).reshape(shape))
                continue
            codes, absmax, book = _as_tensor(entry[f"{key}_codes"]), _as_tensor(entry[f"{key}_absmax"]), _torch_book(q.bits, q.signed)
            new[key] = (OptimState8bit(codes.reshape(shape), absmax, book, q.signed, dtype=torch.float32) if q.bits == 8
                        else OptimState4bit(codes.reshape(-1), absmax, book, q.signed, shape, dtype=torch.float32))
        out_state[index] = new
    groups = []
    for group in state_dict.get("param_groups", []):
        lr = group["lr"]
        groups.append({**group, "lr": lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float32)})
    return {**state_dict, "state": out_state, "param_groups": groups}
