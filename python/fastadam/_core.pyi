"""Type stubs for fastadam's native module (argument checking + dispatch)."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]

min_elements_per_thread: int
min_elements_to_wake: int

def adam_step(
    param: _Array,
    grad: _Array,
    exp_avg: _Array,
    exp_avg_sq: _Array,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sq: _Array | None = None,
    maximize: bool = False,
) -> None: ...
def adam_step_multi(
    params: Sequence[_Array],
    grads: Sequence[_Array],
    exp_avgs: Sequence[_Array],
    exp_avg_sqs: Sequence[_Array],
    *,
    steps: int | Sequence[int],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sqs: Sequence[_Array] | None = None,
    maximize: bool = False,
) -> None: ...
def sgd_step(
    param: _Array,
    grad: _Array,
    momentum_buffer: _Array | None = None,
    *,
    step: int,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> None: ...
def available_isas() -> tuple[str, ...]: ...
def get_isa() -> str: ...
def set_isa(name: str) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def has_openmp() -> bool: ...
def _set_isa_from_environment() -> None: ...
def _check_params(params: Sequence[_Array], fn: str) -> None: ...
def _check_adam_group(hypers: tuple[object, ...], where: str) -> None: ...
def _check_sgd_group(hypers: tuple[object, ...], where: str) -> None: ...
def _lane_sqrt(
    x: npt.NDArray[np.float32], out: npt.NDArray[np.float32], estimate: npt.NDArray[np.float32] | None = None
) -> None: ...

class _StepPlan:
    """An optimizer's validated params and state (one list per state slot, None where absent)."""

    def __init__(
        self, fn: str, params: list[_Array], states: list[list[_Array | None]], group_sizes: list[int]
    ) -> None: ...
    def adam_step(
        self, grads: Sequence[_Array | None], steps: npt.NDArray[np.int64], group_hypers: Sequence[tuple[object, ...]]
    ) -> None: ...
    def sgd_step(
        self, grads: Sequence[_Array | None], steps: npt.NDArray[np.int64], group_hypers: Sequence[tuple[object, ...]]
    ) -> None: ...
