// fastadam: the C function table that fastadam._core exports to other extension
// modules (Cython `cimport fastadam.kernel`, or plain C++ extensions).
//
// The kernel's code lives only inside fastadam/_core*.so (a static library with hidden
// visibility), so another extension cannot link against it. Instead _core publishes a
// PyCapsule, fastadam._core._C_API, holding a pointer to a `fastadam::CApi` table of
// function pointers into its own kernel -- the pattern of NumPy's import_array(). Calls
// through the table use the same run-time ISA dispatch, thread settings and code as the
// Python API, so the results are bit-identical to fastadam.adam_step / sgd_step.
//
// Use from C++ (after #include <Python.h>):
//     if (fastadam::capi::import() < 0) return nullptr;      // once, with the GIL
//     fastadam::capi::adam_step(tensors, count);              // then any thread, no GIL
//
// The caller owns all checking: every pointer valid for `size` elements, written
// buffers not overlapping each other or grad, `hyper` non-null, step >= 1 (see types.hpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastadam/types.hpp"

#define FASTADAM_CAPI_CAPSULE_NAME "fastadam._core._C_API"
// Bumped on any incompatible change of CApi or of the structs in types.hpp.
#define FASTADAM_CAPI_VERSION 1

namespace fastadam {

struct CApi {
    std::uint32_t version;      // FASTADAM_CAPI_VERSION of the exporting module
    std::uint32_t struct_size;  // sizeof(CApi) of the exporting module (fields are only appended)
    void (*adam_step_f32)(const AdamTensor<float>* tensors, std::size_t count) noexcept;
    void (*adam_step_f64)(const AdamTensor<double>* tensors, std::size_t count) noexcept;
    void (*sgd_step_f32)(const SgdTensor<float>* tensors, std::size_t count) noexcept;
    void (*sgd_step_f64)(const SgdTensor<double>* tensors, std::size_t count) noexcept;
};

}  // namespace fastadam

// ----- importing side: only where Python.h is included first ------------------------
#if defined(Py_PYTHON_H) && !defined(FASTADAM_CAPI_NO_IMPORT)
#include <cstdio>
#include <cstdlib>

namespace fastadam {
namespace capi {

// One table pointer per translation unit (per extension module), like NumPy's PyArray_API.
static const CApi* table = nullptr;

// Fetches the table (importing fastadam). Returns 0, or -1 with a Python exception set.
// Needs the GIL; cheap after the first call.
static inline int import() {
    if (table != nullptr) return 0;
    void* p = PyCapsule_Import(FASTADAM_CAPI_CAPSULE_NAME, 0);
    if (p == nullptr) return -1;
    const CApi* api = static_cast<const CApi*>(p);
    if (api->version != FASTADAM_CAPI_VERSION || api->struct_size < sizeof(CApi)) {
        PyErr_Format(PyExc_ImportError,
                     "fastadam C API version %u (table size %u) does not match the headers this module was "
                     "compiled with (version %d, size %u); rebuild it against the installed fastadam",
                     static_cast<unsigned>(api->version), static_cast<unsigned>(api->struct_size), FASTADAM_CAPI_VERSION,
                     static_cast<unsigned>(sizeof(CApi)));
        return -1;
    }
    table = api;
    return 0;
}

[[noreturn]] static inline void not_imported() noexcept {
    std::fputs("fastadam: the C API is used before import_fastadam() / fastadam::capi::import()\n", stderr);
    std::abort();
}

// The kernel entry points: no GIL needed, never throw. Same semantics as fastadam::adam_step / sgd_step.
static inline void adam_step(const AdamTensor<float>* tensors, std::size_t count) noexcept {
    if (table == nullptr) not_imported();
    table->adam_step_f32(tensors, count);
}
static inline void adam_step(const AdamTensor<double>* tensors, std::size_t count) noexcept {
    if (table == nullptr) not_imported();
    table->adam_step_f64(tensors, count);
}
static inline void sgd_step(const SgdTensor<float>* tensors, std::size_t count) noexcept {
    if (table == nullptr) not_imported();
    table->sgd_step_f32(tensors, count);
}
static inline void sgd_step(const SgdTensor<double>* tensors, std::size_t count) noexcept {
    if (table == nullptr) not_imported();
    table->sgd_step_f64(tensors, count);
}

}  // namespace capi
}  // namespace fastadam
#endif
