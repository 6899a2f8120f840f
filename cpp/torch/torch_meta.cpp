// The torch helper: torch's C++ API for the reads a torch-mode step makes on every
// parameter (torch_meta.h). No math here; compiled by fastadam/_torch_meta.py with
// torch.utils.cpp_extension against the torch it runs with (a wheel cannot link one).
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
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

void copy_error(const char* what, char* error, size_t size) {
    if (size == 0) return;
    std::strncpy(error, what, size - 1);
    error[size - 1] = '\0';
}

// A tensor whose methods a Python subclass may implement (__torch_dispatch__): reading it
// can call Python, which a thread without the GIL must not.
struct NeedsGil {};
void check_no_python(const at::Tensor& t, bool gil) {
    if (!gil && t.defined() && t.unsafeGetTensorImpl()->is_python_dispatch()) throw NeedsGil{};
}

// tensors[begin, end). Without `gil` no Python API call and no reference count is touched,
// so any thread may run it (read_range).
void read_tensors(PyObject* tensors, Py_ssize_t begin, Py_ssize_t end, fastadam_torch_meta* out, bool gil) {
    for (Py_ssize_t i = begin; i < end; ++i) {
        const at::Tensor& p = THPVariable_Unpack(PyTuple_GET_ITEM(tensors, i));
        check_no_python(p, gil);
        fastadam_torch_meta& m = out[i - begin];
        m.param_dtype = static_cast<int32_t>(p.scalar_type());
        m.param_shape = shape_key(p.sizes());
        const bool param_ok = dense_cpu(p) && !p.is_inference();  // torch forbids writing inference tensors
        m.param_ptr = param_ok ? reinterpret_cast<uintptr_t>(p.data_ptr()) : 0;
        m.param_nbytes = param_ok ? static_cast<int64_t>(p.nbytes()) : -1;
        m.grad_ptr = 0;
        const at::Tensor& g = p.unsafeGetTensorImpl()->grad();  // TensorBase::grad() also asks is_leaf()
        check_no_python(g, gil);
        if (!g.defined()) {
            m.grad_state = 0;
        } else if (g.scalar_type() == p.scalar_type() && dense_cpu(g) && g.sizes().equals(p.sizes())) {
            m.grad_state = 1;
            m.grad_ptr = reinterpret_cast<uintptr_t>(g.data_ptr());
        } else {
            m.grad_state = 2;
        }
    }
}

// The version counter is atomic (torch's VersionCounter): threads may bump ranges at once.
void bump_tensors(PyObject* tensors, Py_ssize_t begin, Py_ssize_t end, const unsigned char* stepped) {
    for (Py_ssize_t i = begin; i < end; ++i)
        if (stepped[i]) THPVariable_Unpack(PyTuple_GET_ITEM(tensors, i)).unsafeGetTensorImpl()->bump_version();
}

// Runs f, turning any C++ exception into -1 and a message (-2: a tensor needs the GIL,
// read_range): nothing may unwind through the C interface.
template <class F, class Fail>
int guarded(F&& f, Fail&& fail) {
    try {
        f();
        return 0;
    } catch (const NeedsGil&) {
        fail("a tensor with Python dispatch: read it with the GIL");
        return -2;
    } catch (const std::exception& e) {
        fail(e.what());
    } catch (...) {
        fail("fastadam's torch helper: unknown C++ exception");
    }
    return -1;
}

int read(PyObject* tensors, fastadam_torch_meta* out) {
    return guarded([&] { read_tensors(tensors, 0, PyTuple_GET_SIZE(tensors), out, true); }, set_error);
}
int bump_versions(PyObject* tensors, const unsigned char* stepped) {
    return guarded([&] { bump_tensors(tensors, 0, PyTuple_GET_SIZE(tensors), stepped); }, set_error);
}
int read_range(PyObject* tensors, Py_ssize_t begin, Py_ssize_t end, fastadam_torch_meta* out, char* error, size_t size) {
    return guarded([&] { read_tensors(tensors, begin, end, out, false); }, [&](const char* what) { copy_error(what, error, size); });
}
int bump_range(PyObject* tensors, Py_ssize_t begin, Py_ssize_t end, const unsigned char* stepped, char* error, size_t size) {
    return guarded([&] { bump_tensors(tensors, begin, end, stepped); }, [&](const char* what) { copy_error(what, error, size); });
}

const fastadam_torch_meta_api api{FASTADAM_TORCH_META_ABI, read, bump_versions, read_range, bump_range};

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
