"""fastadam: the fastest exact Adam optimizer for NumPy.

An in-place SIMD + OpenMP kernel (x86-64 baseline, AVX2, AVX-512, chosen at run
time) that gives the same bits on every path, every thread count, and as the
readable NumPy reference in :mod:`fastadam.reference`.

Functional API (in place): :func:`adam_step`, :func:`adam_step_multi`, :func:`sgd_step`.
Optimizers (torch.optim's interface): :class:`Adam`, :class:`AdamW`, :class:`SGD`, and with
8-bit/4-bit blockwise-quantized states :class:`Adam8bit`, :class:`AdamW8bit`, :class:`Adam4bit`,
:class:`AdamW4bit` (state dicts converted by :func:`dequantize_state_dict` /
:func:`quantize_state_dict`); for torch tensors, ``fastadam.torch.Adam`` / ``AdamW`` / ``SGD``
and the quantized four (imported on request only).
Sharded over MPI ranks (ZeRO stage 1): ``fastadam.distributed.ShardedAdam`` / ``ShardedAdamW``
(imported on request only; ``pip install "fastadam[mpi]"``).
C++/Cython: :func:`get_include` (headers; ``cimport fastadam.kernel``, see kernel.pxd).
Control: :func:`set_isa` / :func:`get_isa` / :func:`available_isas` (or the
environment variable ``FASTADAM_ISA``), :func:`set_num_threads` / :func:`get_num_threads`.
"""

from . import _core, reference
from ._core import (
    adam_step,
    adam_step_multi,
    available_isas,
    get_isa,
    get_num_threads,
    set_isa,
    set_num_threads,
    sgd_step,
)
from ._version import __version__
from .optim import SGD, Adam, Adam4bit, Adam8bit, AdamW, AdamW4bit, AdamW8bit, Optimizer
from .quantized import QuantizedState, dequantize_state_dict, quantize, quantize_state_dict

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "Adam8bit",
    "AdamW8bit",
    "Adam4bit",
    "AdamW4bit",
    "Optimizer",
    "QuantizedState",
    "quantize",
    "dequantize_state_dict",
    "quantize_state_dict",
    "adam_step",
    "adam_step_multi",
    "sgd_step",
    "available_isas",
    "get_isa",
    "set_isa",
    "get_num_threads",
    "set_num_threads",
    "reference",
    "get_include",
    "__version__",
]


def get_include() -> str:
    """The directory of fastadam's C++ headers (``fastadam/types.hpp``, ``fastadam/capi.hpp``).

    Add it to ``include_dirs`` to build a C++ or Cython extension that calls the kernel
    through ``cimport fastadam.kernel`` (compile with ``language="c++"``)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


_core._set_isa_from_environment()
