// The torch helper: torch's C++ API for the reads a torch-mode step makes on every
// parameter (torch_meta.h). No math here; compiled by fastadam/_torch_meta.py with
// torch.utils.cpp_extension against the torch it runs with (a wheel cannot link one).
#include <torch/csrc/autograd/python_variable.h>

#include <exception>

#include "torch_meta.h"

#define FASTADAM_STR2(x) #x
#define FASTADAM_STR(x) FASTADAM_STR2(x)

namespace {

// Memory fastadam can read (and, for a param, write) in place as a flat array.
bool dense_cpu(const at::Tensor& t) {
    return t.layout() == at::kStrided && t.device().is_cpu() && !t.is_neg() && !t.is_conj() && t.has_storage() &&
           t.is_contiguous() && (t.data_ptr() != nullptr || t.numel() == 0);  // a wrapper subclass has no memory
}

// FNV-1a of the sizes: a reshape at the same address makes the plan stale.
uint64_t shape_key(c10::IntArrayRef sizes) {
    uint64_t h = 1469598103934665603ull ^ sizes.size();
    for (const int64_t s : sizes) h = (h ^ static_cast<uint64_t>(s)) * 1099511628211ull;
    return h;
}

void set_error(const char* what) { PyErr_SetString(PyExc_RuntimeError, what); }

int read(PyObject* tensors, fastadam_torch_meta* out) {
    const Py_ssize_t n = PyTuple_GET_SIZE(tensors);
    try {
        for (Py_ssize_t i = 0; i < n; ++i) {
            const at::Tensor& p = THPVariable_Unpack(PyTuple_GET_ITEM(tensors, i));
            fastadam_torch_meta& m = out[i];
            m.param_dtype = static_cast<int32_t>(p.scalar_type());
            m.param_shape = shape_key(p.sizes());
            const bool param_ok = dense_cpu(p) && !p.is_inference();  // torch forbids writing inference tensors
            m.param_ptr = param_ok ? reinterpret_cast<uintptr_t>(p.data_ptr()) : 0;
            m.param_nbytes = param_ok ? static_cast<int64_t>(p.nbytes()) : -1;
            m.grad_ptr = 0;
            const at::Tensor& g = p.unsafeGetTensorImpl()->grad();  // TensorBase::grad() also asks is_leaf()
            if (!g.defined()) {
                m.grad_state = 0;
            } else if (g.scalar_type() == p.scalar_type() && dense_cpu(g) && g.sizes().equals(p.sizes())) {
                m.grad_state = 1;
                m.grad_ptr = reinterpret_cast<uintptr_t>(g.data_ptr());
            } else {
                m.grad_state = 2;
            }
        }
        return 0;
    } catch (const std::exception& e) {
        set_error(e.what());
    } catch (...) {  // nothing may unwind through the C interface
        set_error("fastadam's torch helper: unknown C++ exception");
    }
    return -1;
}

int bump_versions(PyObject* tensors, const unsigned char* stepped) {
    const Py_ssize_t n = PyTuple_GET_SIZE(tensors);
    try {
        for (Py_ssize_t i = 0; i < n; ++i)
            if (stepped[i]) THPVariable_Unpack(PyTuple_GET_ITEM(tensors, i)).unsafeGetTensorImpl()->bump_version();
        return 0;
    } catch (const std::exception& e) {
        set_error(e.what());
    } catch (...) {
        set_error("fastadam's torch helper: unknown C++ exception");
    }
    return -1;
}

const fastadam_torch_meta_api api{FASTADAM_TORCH_META_ABI, read, bump_versions};

PyModuleDef module{PyModuleDef_HEAD_INIT, FASTADAM_STR(TORCH_EXTENSION_NAME), "fastadam's torch helper (torch_meta.h)", -1, nullptr};

}  // namespace

#define FASTADAM_CAT(a, b) a##b
#define FASTADAM_INIT(name) FASTADAM_CAT(PyInit_, name)

PyMODINIT_FUNC FASTADAM_INIT(TORCH_EXTENSION_NAME)() {
    PyObject* m = PyModule_Create(&module);
    if (m == nullptr) return nullptr;
    PyObject* capsule = PyCapsule_New(const_cast<fastadam_torch_meta_api*>(&api), FASTADAM_TORCH_META_CAPSULE, nullptr);
    if (capsule == nullptr || PyModule_AddObject(m, "api", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
