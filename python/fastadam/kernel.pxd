# cython: language_level=3
"""fastadam's kernel for Cython: ``cimport fastadam.kernel`` and call it without the GIL.

The kernel is compiled once, inside fastadam._core; this module reaches it through the
function table _core exports as the capsule ``fastadam._core._C_API`` (the pattern of
NumPy's ``import_array``). Calls run the same SIMD dispatch, thread settings and code as
``fastadam.adam_step`` / ``sgd_step`` and give the same bits.

Build your extension as C++ (``language="c++"``) with
``include_dirs=[fastadam.get_include()]``, then::

    from fastadam cimport kernel
    kernel.import_fastadam()            # once, at module import (needs the GIL)

    cdef kernel.AdamHyperparams h       # C++ defaults: torch.optim.Adam's
    cdef kernel.AdamTensor[float] t
    t.param = ...; t.grad = ...; t.exp_avg = ...; t.exp_avg_sq = ...
    t.size = n; t.step = 1; t.hyper = &h
    with nogil:
        kernel.adam_step(&t, 1)

Nothing is checked here: every pointer must be valid for ``size`` elements, the written
buffers (param, exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer) must not overlap each
other or grad, ``hyper`` must be set, ``step >= 1``, and ``max_exp_avg_sq`` must be set when
``amsgrad`` (``momentum_buffer`` when ``momentum != 0``). See fastadam/types.hpp.
"""

from libc.stdint cimport int64_t, uint32_t
from libcpp cimport bool


cdef extern from "fastadam/types.hpp" namespace "fastadam" nogil:
    cdef cppclass AdamHyperparams:
        double lr              # default 1e-3
        double beta1           # 0.9
        double beta2           # 0.999
        double eps             # 1e-8
        double weight_decay    # 0.0
        bool decoupled_weight_decay  # False (True: AdamW)
        bool amsgrad           # False
        bool maximize          # False

    cdef cppclass AdamTensor[T]:
        T* param
        const T* grad
        T* exp_avg
        T* exp_avg_sq
        T* max_exp_avg_sq      # only used when hyper.amsgrad
        int64_t size
        int64_t step           # 1-based count of this update
        const AdamHyperparams* hyper

    cdef cppclass SgdHyperparams:
        double lr
        double momentum
        double dampening
        double weight_decay
        bool nesterov
        bool maximize

    cdef cppclass SgdTensor[T]:
        T* param
        const T* grad
        T* momentum_buffer     # only used when hyper.momentum != 0
        int64_t size
        bool first_step        # True on a buffer's first step (torch copies the gradient into it)
        const SgdHyperparams* hyper


cdef extern from "fastadam/capi.hpp" namespace "fastadam::capi":
    # 0, or -1 with a Python exception set (ImportError on a version mismatch).
    int _import_api "fastadam::capi::import"() except -1


cdef extern from "fastadam/capi.hpp" namespace "fastadam::capi" nogil:
    # Multi-tensor steps over `count` tensors: one parallel region. No GIL needed.
    void adam_step(const AdamTensor[float]* tensors, size_t count) noexcept
    void adam_step(const AdamTensor[double]* tensors, size_t count) noexcept
    void sgd_step(const SgdTensor[float]* tensors, size_t count) noexcept
    void sgd_step(const SgdTensor[double]* tensors, size_t count) noexcept


cdef inline int import_fastadam() except -1:
    """Fetch the kernel table from fastadam._core (imports fastadam). Call once, with the GIL."""
    return _import_api()
