/* The C ABI between fastadam._core and the torch helper (torch_meta.cpp), which
 * fastadam/_torch_meta.py compiles against the installed torch on first use.
 * Why a helper: reading .grad and data_ptr() through torch's Python API costs
 * 300-500 ns per tensor per step; torch's C++ API reads the same in ~30 ns.
 * docs/design.md, "The torch helper". */
#ifndef FASTADAM_TORCH_META_H
#define FASTADAM_TORCH_META_H

#include <Python.h>
#include <stdint.h>

#define FASTADAM_TORCH_META_CAPSULE "fastadam.torch_meta.api"
#define FASTADAM_TORCH_META_ABI 3u

/* What one step needs to know of a parameter and its .grad. */
typedef struct fastadam_torch_meta {
    uintptr_t param_ptr;  /* data_ptr(), or 0 when param_nbytes is -1 */
    int64_t param_nbytes; /* nbytes(); -1: not a dense, contiguous, non-negated CPU tensor
                             with memory of its own, or an inference tensor */
    uint64_t param_shape; /* a hash of its sizes, compared only with itself */
    uintptr_t grad_ptr;   /* grad.data_ptr() when grad_state is 1, else 0 */
    int32_t param_dtype;  /* c10::ScalarType, compared only with itself */
    int32_t grad_state;   /* 0: no grad; 1: dense, contiguous, non-negated CPU tensor with
                             memory of its own, of the param's dtype and sizes; 2: else */
} fastadam_torch_meta;

typedef struct fastadam_torch_meta_api {
    uint32_t abi; /* FASTADAM_TORCH_META_ABI */
    /* tensors: a tuple of torch.Tensor (not checked: the caller built it of tensors).
     * Fills out[i] for tensors[i]; returns 0, or -1 with a Python exception set. */
    int (*read)(PyObject* tensors, fastadam_torch_meta* out);
    /* Bumps the version counter of each tensors[i] with stepped[i] != 0, as torch's
     * in-place ops do; returns 0, or -1 with a Python exception set. */
    int (*bump_versions)(PyObject* tensors, const unsigned char* stepped);
    /* read and bump_versions for tensors[begin, end) only, without the GIL and without
     * touching a Python object's reference count, so that several threads can each take
     * a range (the reads are cache misses, which two cores wait for at once): fills
     * out[i - begin]; returns 0, or -1 with a message in error[0, error_size), or -2 where
     * a tensor has Python dispatch (a subclass's methods may call Python): read it then
     * with read(). bump_versions needs no GIL (torch's version counter is atomic). */
    int (*read_range)(PyObject* tensors, Py_ssize_t begin, Py_ssize_t end, fastadam_torch_meta* out, char* error, size_t error_size);
    int (*bump_range)(PyObject* tensors, Py_ssize_t begin, Py_ssize_t end, const unsigned char* stepped, char* error, size_t error_size);
} fastadam_torch_meta_api;

#endif
