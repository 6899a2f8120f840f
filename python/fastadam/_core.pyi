"""Type stubs for fastadam's native module (argument checking + dispatch)."""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .quantized import QuantizedState

_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]
# Mixed precision: bfloat16 (ml_dtypes) and float16 arrays too; NumPy types bfloat16 as Any.
_AnyArray = _Array | npt.NDArray[np.float16] | npt.NDArray[Any]
# A state array, or blockwise-quantized codes with their absmax (fastadam.QuantizedState).
_State = _AnyArray | QuantizedState

min_elements_per_thread: int
_fenv: dict[str, int]  # this platform's <fenv.h> rounding modes and exception flags
min_elements_to_wake: int

def adam_step(
    param: _AnyArray,
    grad: _AnyArray,
    exp_avg: _State,
    exp_avg_sq: _State,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sq: _AnyArray | None = None,
    maximize: bool = False,
    param_out: _AnyArray | None = None,
    grad_scale: float | None = None,
) -> float | None: ...
def adam_step_multi(
    params: Sequence[_AnyArray],
    grads: Sequence[_AnyArray],
    exp_avgs: Sequence[_State],
    exp_avg_sqs: Sequence[_State],
    *,
    steps: int | Sequence[int],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sqs: Sequence[_AnyArray] | None = None,
    maximize: bool = False,
    params_out: Sequence[_AnyArray | None] | None = None,
    grad_scale: float | None = None,
    max_grad_norm: float | None = None,
) -> float | None: ...
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
def _check_params(params: Sequence[_AnyArray], fn: str, narrow_ok: bool = False) -> None: ...
def _adam_step_groups(
    fn: str,
    params: Sequence[_AnyArray],
    grads: Sequence[_AnyArray],
    exp_avgs: Sequence[_State | None],
    exp_avg_sqs: Sequence[_State | None],
    max_exp_avg_sqs: Sequence[_AnyArray | None],
    params_out: Sequence[_AnyArray | None],
    counts: npt.NDArray[np.int64] | Sequence[npt.NDArray[Any]],
    indices: Sequence[int],
    group_index: Sequence[int],
    groups: Sequence[Mapping[str, Any]],
    grad_scale: float | None,
    max_grad_norm: float | None,
    rounding_seeds: Sequence[int | None] | None,
    labels: Sequence[str] | None,
) -> float | None: ...
def _grad_sq_block_sums(grads: Sequence[_AnyArray], grad_scale: float | None = None) -> npt.NDArray[np.float64]: ...
def _check_group(kind: Literal["adam", "sgd"], group: Mapping[str, Any], where: str) -> None: ...
def _hyper_names(kind: Literal["adam", "sgd"]) -> tuple[str, ...]: ...
def _lane_sqrt(
    x: npt.NDArray[np.float32], out: npt.NDArray[np.float32], estimate: npt.NDArray[np.float32] | None = None
) -> None: ...

class _StepGuard:
    def __init__(self, name: str) -> None: ...
    def __enter__(self) -> None: ...
    def __exit__(self, *exc: object) -> None: ...

class _StepPlan:
    """An optimizer's validated params and state; one step at a time (the optimizer's lock).

    kind "adam": states = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs]; "sgd": [momentum_buffers];
    None where a tensor has no such buffer yet. labels[i] names tensor i in errors.
    torch: an object with tensors, steps, Tensor, strided, grad_error, bump_versions, meta
    (cpp/bindings/step_plan_torch.cpp); for SGD a steps entry may be None (the buffer is not new).
    """

    def __init__(
        self,
        kind: Literal["adam", "sgd"],
        fn: str,
        params: list[_Array],
        states: list[list[_Array | None]],
        group_sizes: list[int],
        labels: list[str] | None = None,
        torch: object | None = None,
    ) -> None: ...
    def step(
        self, grads: Sequence[_Array | None], steps: npt.NDArray[np.int64], groups: Sequence[Mapping[str, Any]]
    ) -> bool: ...
    def torch_step(self, groups: Sequence[Mapping[str, Any]]) -> bool: ...
    @property
    def completed(self) -> int: ...
    @property
    def torch_helper(self) -> bool:
        """This torch-mode plan reads tensors through the torch helper (fastadam/_torch_meta.py)."""
        ...

# Quantized states (python/fastadam/quantized.py; cpp/bindings/quantized.cpp)
def quant_map(bits: int, signed: bool) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def _quantize_blockwise(x: npt.NDArray[np.float32], state: QuantizedState) -> None: ...
def _dequantize_blockwise(state: QuantizedState, out: npt.NDArray[np.float32]) -> None: ...
def _quantize_codes(
    x: npt.NDArray[np.float32], out: npt.NDArray[np.uint8], bits: int, signed: bool, isa: str, bounded: bool = False
) -> None: ...
def _quantizer_mismatches(bits: int, signed: bool, isa: str, every: int = 1) -> tuple[int, int]: ...
