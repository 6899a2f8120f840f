"""What fastadam's NumPy optimizers (optim.py) and torch adapters (torch.py) share.

Both keep the same things around the native step plan (``_core._StepPlan``): which
state buffers an algorithm needs, how a group's hyper-parameters are checked (by name,
through the native table), the one-step-at-a-time guard, and the rollback of state
created by a step that did not happen. See docs/design.md, "Optimizer core".
"""

from __future__ import annotations

import collections
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _core
from .quantized import QuantizedState, is_quantized_entry

__all__ = [
    "ADAM", "SGD", "Algorithm", "StepGuard", "Rollback", "check_group", "check_loaded_entry", "check_max_grad_norm",
    "check_mixed_precision",
    "zeros_packed", "state_stagger",
]


@dataclass(frozen=True)
class Algorithm:
    """An update rule as the native plan knows it: ``kind`` selects the kernel and the
    hyper-parameter table; ``state_keys`` are the per-parameter buffers, in the plan's order."""

    kind: Literal["adam", "sgd"]
    state_keys: tuple[str, ...]
    counts_steps: bool  # torch keeps state["step"] for Adam, not for SGD
    needed: Callable[[Mapping[str, Any]], int]  # how many of state_keys a group uses

    def needed_keys(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return self.state_keys[: self.needed(group)]


ADAM = Algorithm("adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), True, lambda g: 3 if g.get("amsgrad") else 2)
SGD = Algorithm("sgd", ("momentum_buffer",), False, lambda g: 1 if g.get("momentum", 0) != 0 else 0)


def check_group(algorithm: Algorithm, group: Mapping[str, Any], where: str) -> None:
    """TypeError/ValueError (starting with ``where``) unless the group's hyper-parameters are valid."""
    _core._check_group(algorithm.kind, group, where)


def check_max_grad_norm(value: object, where: str) -> float | None:
    """``max_grad_norm`` as a float (None: no clipping); TypeError/ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{where}: max_grad_norm must be a number > 0 or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: max_grad_norm must be a finite number > 0 or None, got {value!r}")
    return float(value)


def check_mixed_precision(
    group: Mapping[str, Any], kinds: Sequence[str], state: str | None, clips: bool, where: str
) -> None:
    """TypeError/ValueError (starting with ``where``) unless Adam's mixed-precision keys of a
    group go with its params: ``kinds`` the params' dtype names ("bfloat16", "float32", ...),
    ``state`` the name of the group's ``state_dtype`` (None: the default), ``clips`` whether
    the optimizer has a ``max_grad_norm``. Shared by fastadam.Adam and fastadam.torch.Adam."""
    for key in ("master_weights", "stochastic_rounding"):
        if not isinstance(group.get(key, False), (bool, np.bool_)):
            raise TypeError(f"{where}: {key} must be True or False, got {group[key]!r}")
    master = bool(group.get("master_weights"))
    for j, kind in enumerate(kinds):
        if kind == "float64" and clips:
            raise TypeError(
                f"{where}: params[{j}] is float64; max_grad_norm works on float32, bfloat16 and float16 params "
                "(put float64 params in another optimizer)"
            )
        if master and kind not in ("bfloat16", "float16"):
            raise ValueError(
                f"{where}: master_weights=True keeps float32 copies of bfloat16/float16 params, but params[{j}] is "
                f"{kind}; leave master_weights off for it (put it in another param group)"
            )
        if group.get("stochastic_rounding") and (kind != "bfloat16" or master):
            raise ValueError(
                f"{where}: stochastic_rounding=True rounds bfloat16 params updated directly; params[{j}] is {kind}"
                + (" with master_weights=True (its float32 master is never rounded)" if master else "")
            )
        if state is not None:
            ok = (
                state == "float64" if kind == "float64"
                else state in ("float32", "bfloat16") or (state == "float16" and kind == "float16" and not master)
            )
            if not ok:
                raise ValueError(
                    f"{where}: state_dtype {state} does not go with params[{j}] of dtype {kind}; states are float32 "
                    "or bfloat16 (float16 for float16 params without master weights, float64 for float64 params)"
                )


# One step of an optimizer at a time: a second thread's step raises RuntimeError (a step
# writes params and state in place, partly without the GIL, and rebuilds the plan it
# runs). In C++ so that a KeyboardInterrupt cannot leave it taken (step_guard.hpp).
StepGuard = _core._StepGuard


_CALL = operator.methodcaller("__call__")


class Rollback:
    """Undo actions for what a step created before it knew the step would happen (fresh
    state), so that a rejected step leaves no trace.

    Each undo is a ``functools.partial`` of a builtin method (``dict.pop``, ``list.__setitem__``),
    idempotent and independent of the others, registered before the change it undoes.
    ``run()`` runs them all; a KeyboardInterrupt raised among them (a torch tensor's
    ``__hash__`` is Python code) restarts the run, and is raised once everything is undone.
    """

    __slots__ = ("_undo",)

    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []

    def add(self, undo: Callable[[], object]) -> None:
        self._undo.append(undo)

    def __bool__(self) -> bool:
        return bool(self._undo)

    def run(self) -> None:
        interrupt: BaseException | None = None
        for _ in range(1000):
            try:
                # Every undo again from the first (they are idempotent), in one C-level call:
                # no bytecode of this module runs between two undos.
                collections.deque(map(_CALL, self._undo), 0)
                break
            except KeyboardInterrupt as error:
                interrupt = error
        if interrupt is not None:
            raise interrupt


# The optimizers place their own state buffers (docs/performance.md, "4K aliasing"): all
# buffers of one kind created together share one zeroed block, each on a 64-byte
# boundary, and the blocks of different kinds start at different offsets within a page.
_LINE = 64
_PAGE = 4096
_STAGGER = 1088  # 17 cache lines between the page offsets of successive kinds


def state_stagger(kind_index: int) -> int:
    """The page offset of the block of state kind number ``kind_index``."""
    return (kind_index + 1) * _STAGGER


def zeros_packed(likes: Sequence[tuple[tuple[int, ...], np.dtype[Any]]], stagger: int) -> list[np.ndarray]:
    """Zeroed C-contiguous arrays of the given (shape, dtype), packed in one block on 64-byte
    boundaries, the first ``stagger`` bytes past a page boundary."""
    if not likes:
        return []
    offsets, total = [], 0
    for shape, dtype in likes:
        offsets.append(total)
        total += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // _LINE) * _LINE
    raw = np.zeros(total + _PAGE, dtype=np.uint8)
    base = (stagger - raw.ctypes.data) % _PAGE
    out = []
    for (shape, dtype), offset in zip(likes, offsets):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out.append(raw[base + offset : base + offset + nbytes].view(dtype).reshape(shape))
    return out


def check_loaded_entry(
    algorithm: Algorithm, entry: Mapping[str, Any], group: Mapping[str, Any], where: str, quantized: bool = False
) -> None:
    """ValueError/TypeError (starting with ``where``) unless a loaded per-parameter state
    entry is complete for its group and of real numbers, as a step of torch.optim would
    need it: a step count that is a whole number >= 0 (not a bool or a string), and every
    buffer the group's hyper-parameters need, each of a real floating dtype (or a
    QuantizedState). ``quantized``: the loading optimizer keeps quantized states, so
    ``exp_avg_codes`` etc. stand for ``exp_avg`` (their checks are the optimizer's);
    otherwise an entry holding them is refused, naming the conversion."""
    if is_quantized_entry(entry) and not quantized:
        raise ValueError(
            f"{where}: the state is quantized (exp_avg_codes, ...): load it into fastadam.AdamW8bit/AdamW4bit (or "
            "fastadam.torch's), or convert it with fastadam.dequantize_state_dict(sd) first"
        )
    buffers = [k for k in algorithm.state_keys if entry.get(k) is not None]
    if quantized:
        buffers += [k for k in algorithm.state_keys if entry.get(f"{k}_codes") is not None]
    if not buffers and "step" not in entry:
        return
    if algorithm.counts_steps:
        if "step" not in entry:
            raise ValueError(f"{where}: the state has {', '.join(buffers)} but no 'step'")
        step = entry["step"]
        if hasattr(step, "detach"):  # a torch tensor
            step = step.detach().cpu().numpy()
        step = np.asarray(step) if isinstance(step, (np.ndarray, np.generic)) else step
        is_number = (
            (isinstance(step, (int, float)) and not isinstance(step, bool))
            or (isinstance(step, np.ndarray) and step.size == 1 and step.dtype.kind in "iuf")
        )
        if not is_number:
            raise TypeError(f"{where}: 'step' must be a number (int, float or a 1-element real tensor), got {entry['step']!r}")
        value = float(step.reshape(())) if isinstance(step, np.ndarray) else float(step)
        if not (math.isfinite(value) and value >= 0 and value == int(value)):
            raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {value}")
    for key in algorithm.needed_keys(group):
        if entry.get(key) is None and not (quantized and entry.get(f"{key}_codes") is not None):
            raise ValueError(
                f"{where}: the state lacks {key!r}, which this group's hyper-parameters need "
                f"(a state dict saved with other settings? load it into an optimizer with the same ones)"
            )
    for key in buffers:
        buffer = entry.get(key)
        if buffer is None or isinstance(buffer, QuantizedState):  # quantized: checked by the optimizer
            continue
        dtype = getattr(buffer, "dtype", None)
        kind = ("f" if dtype.name == "bfloat16" else dtype.kind) if isinstance(dtype, np.dtype) else None  # ml_dtypes: kind "V"
        if kind is None and hasattr(buffer, "is_floating_point"):  # a torch tensor
            kind = "f" if buffer.is_floating_point() else ("c" if buffer.is_complex() else "i")
        if kind != "f":
            raise TypeError(
                f"{where}: {key!r} must be an array or tensor of real floating-point numbers, got "
                f"{type(buffer).__name__} of dtype {dtype}"
            )
