"""What fastadam's NumPy optimizers (optim.py) and torch adapters (torch.py) share.

Both keep the same things around the native step plan (``_core._StepPlan``): which
state buffers an algorithm needs, how a group's hyper-parameters are checked (by name,
through the native table), the one-step-at-a-time guard, and the rollback of state
created by a step that did not happen. See docs/design.md, "Optimizer core".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _core

__all__ = ["ADAM", "SGD", "Algorithm", "StepGuard", "Rollback", "check_group", "zeros_packed", "state_stagger"]


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


ADAM = Algorithm("adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), True, lambda g: 3 if g["amsgrad"] else 2)
SGD = Algorithm("sgd", ("momentum_buffer",), False, lambda g: 1 if g["momentum"] != 0 else 0)


def check_group(algorithm: Algorithm, group: Mapping[str, Any], where: str) -> None:
    """TypeError/ValueError (starting with ``where``) unless the group's hyper-parameters are valid."""
    _core._check_group(algorithm.kind, group, where)


class StepGuard:
    """Refuses a second thread's step while one runs: a step writes params and state in
    place, partly without the GIL, and rebuilds the plan it runs."""

    __slots__ = ("_lock", "_name")

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._name = name

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{self._name}: another thread is running a step of this optimizer")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Rollback:
    """Undo actions for what a step created before it knew the step would happen (fresh
    state): run in reverse, whatever was raised, so a rejected step leaves no trace."""

    __slots__ = ("_undo",)

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def __bool__(self) -> bool:
        return bool(self._undo)

    def run(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


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
