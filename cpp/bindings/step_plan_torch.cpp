// _StepPlan's torch mode (step_plan.hpp): the plan reads each parameter's .grad and
// state['step'] itself, through Python-level calls (no torch headers, no link to torch).
//
// `torch` (given by fastadam/torch.py) has: tensors (the parameters, plan order; params[i]
// is tensors[i].detach().numpy()), steps (per tensor a 0-d float32/float64/int64 array
// viewing state['step'], or None), Tensor (torch.Tensor), strided (torch.strided),
// grad_error(i, grad) -> the exception for a gradient the checks reject, and
// bump_versions(tuple_of_tensors) or None, and meta: the torch helper's capsule
// (torch_meta.h) or None. With the helper, a step reads every tensor in one C++ call.
//
// For SGD, steps[i] may be None (the momentum buffer is not new: the kernel's count is 2)
// or a count like Adam's, where 0 means "the buffer is new: set it to the gradient".
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "step_plan.hpp"

namespace fastadam::bindings {

namespace {

struct Names {
    PyObject *grad, *dtype, *layout, *is_cpu, *is_neg, *is_contiguous, *shape;
};

const Names& names() {
    static const Names n{PyUnicode_InternFromString("grad"),   PyUnicode_InternFromString("dtype"),
                         PyUnicode_InternFromString("layout"),
                         PyUnicode_InternFromString("is_cpu"), PyUnicode_InternFromString("is_neg"),
                         PyUnicode_InternFromString("is_contiguous"), PyUnicode_InternFromString("shape")};
    return n;
}

// tensor.data_ptr() through the method descriptor; false (error set) if it raised.
bool data_ptr_of(PyObject* method, PyObject* tensor, std::uintptr_t* out) {
    PyObject* r = PyObject_Vectorcall(method, &tensor, 1, nullptr);
    if (r == nullptr) return false;
    *out = reinterpret_cast<std::uintptr_t>(PyLong_AsVoidPtr(r));
    Py_DECREF(r);
    return !PyErr_Occurred();
}

// getattr(o, name) is expected (identity), or == expected when `equal`.
bool attr_is(PyObject* o, PyObject* name, PyObject* expected, bool equal = false) {
    PyObject* v = PyObject_GetAttr(o, name);
    if (v == nullptr) return false;
    const bool ok = equal ? PyObject_RichCompareBool(v, expected, Py_EQ) == 1 : v == expected;
    Py_DECREF(v);
    return ok;
}

// o.name() is expected (True or False).
bool call_is(PyObject* o, PyObject* name, PyObject* expected) {
    PyObject* v = PyObject_VectorcallMethod(name, &o, 1, nullptr);
    if (v == nullptr) return false;
    const bool ok = v == expected;
    Py_DECREF(v);
    return ok;
}

// The object `ref` (a weak reference) points to, or nullptr once it died; only compared.
PyObject* weak_target(PyObject* ref) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject* target = nullptr;
    if (PyWeakref_GetRef(ref, &target) < 0) PyErr_Clear();
    Py_XDECREF(target);  // the caller holds the object it compares with
    return target;
#else
    PyObject* target = PyWeakref_GetObject(ref);
    return target == Py_None ? nullptr : target;
#endif
}

}  // namespace

void StepPlan::build_torch(py::handle torch) {
    auto t = std::make_unique<Torch>();
    const char* fn = fn_.c_str();
    const std::size_t n = entries_.size();
    py::object tensors = torch.attr("tensors"), steps = torch.attr("steps");
    t->tensor_type = torch.attr("Tensor");
    t->strided = torch.attr("strided");
    t->grad_error = torch.attr("grad_error");
    t->bump_versions = torch.attr("bump_versions");
    if (!PyType_Check(t->tensor_type.ptr())) throw_type(fn_ + ": internal error: torch.Tensor must be the tensor type");
    check_list(tensors, fn, "torch.tensors", n, true, "tensors");
    t->tensors = py::reinterpret_steal<py::tuple>(PySequence_Tuple(tensors.ptr()));
    if (!t->tensors) throw py::error_already_set();
    t->data_ptr = t->tensor_type.attr("data_ptr");
    t->t.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
        Torch::Tensor& e = t->t[i];
        e.tensor = PyTuple_GET_ITEM(t->tensors.ptr(), i);
        if (!PyObject_TypeCheck(e.tensor, reinterpret_cast<PyTypeObject*>(t->tensor_type.ptr())))
            throw_type(name(kParam, i).str() + ": internal error: torch.tensors holds a " + type_name(e.tensor));
        e.dtype = py::reinterpret_borrow<py::object>(e.tensor).attr("dtype");
        e.shape = py::reinterpret_borrow<py::object>(e.tensor).attr("shape");
        if (!data_ptr_of(t->data_ptr.ptr(), e.tensor, &e.param_ptr)) throw py::error_already_set();
        if (entries_[i].param.nbytes > 0 && e.param_ptr != reinterpret_cast<std::uintptr_t>(entries_[i].param.data))
            throw_value(name(kParam, i).str() + ": internal error: params[i] is not a view of torch.tensors[i]");
    }
    if (!steps.is_none()) {
        check_list(steps, fn, "torch.steps", n, true, "0-d arrays or None");
        const int int64_num = py::dtype::of<std::int64_t>().num();
        for (std::size_t i = 0; i < n; ++i) {
            py::handle s = item(steps, i);
            if (s.is_none()) continue;
            const ArgName arg = name(kStep, i);
            if (!py::isinstance<py::array>(s)) throw_type(arg.str() + ": internal error: expected a 0-d numpy view, got " + type_name(s));
            auto a = py::reinterpret_borrow<py::array>(s);
            const int num = a.dtype().num();
            const char type = num == py::detail::npy_api::NPY_FLOAT_ ? 'f' : num == py::detail::npy_api::NPY_DOUBLE_ ? 'd' : num == int64_num ? 'q' : 0;
            if (type == 0 || a.size() != 1 || !a.writeable() || !(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) ||
                !a.dtype().attr("isnative").cast<bool>())
                throw_type(arg.str() + " must be a float32, float64 or int64 scalar tensor (writeable, aligned, native byte order), got " +
                           std::string(py::repr(a.dtype())) + " of shape " + shape_str(a));
            t->t[i].step = static_cast<char*>(a.mutable_data());
            t->t[i].step_type = type;
            footprint_.add(t->t[i].step, a.itemsize(), kStep, i);
        }
    }
    t->step_arrays = steps;
    py::object meta = torch.attr("meta");
    if (!meta.is_none()) {
        t->meta = static_cast<const fastadam_torch_meta_api*>(PyCapsule_GetPointer(meta.ptr(), FASTADAM_TORCH_META_CAPSULE));
        if (t->meta == nullptr) throw py::error_already_set();
        if (t->meta->abi != FASTADAM_TORCH_META_ABI)
            throw_type(fn_ + ": internal error: the torch helper's ABI is " + std::to_string(t->meta->abi) + ", expected " +
                       std::to_string(FASTADAM_TORCH_META_ABI) + " (delete its cache directory)");
        t->now.resize(n);
        t->built.resize(n);
        if (n > 0 && t->meta->read(t->tensors.ptr(), t->built.data()) < 0) throw py::error_already_set();
        for (std::size_t i = 0; i < n; ++i)
            if (t->built[i].param_nbytes != static_cast<std::int64_t>(entries_[i].param.nbytes) ||
                (t->built[i].param_nbytes > 0 && t->built[i].param_ptr != t->t[i].param_ptr))
                throw_value(name(kParam, i).str() + ": internal error: the torch helper reads another tensor than params[i]");
    }
    torch_ = std::move(t);
}

void StepPlan::raise_grad_error(std::size_t i, PyObject* grad) const {
    PyErr_Clear();
    py::object exc = py::reinterpret_steal<py::object>(
        PyObject_CallFunction(torch_->grad_error.ptr(), "nO", static_cast<Py_ssize_t>(i), grad));
    if (!exc) throw py::error_already_set();
    if (!PyExceptionInstance_Check(exc.ptr())) throw_type(fn_ + ": internal error: torch.grad_error must return an exception");
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    throw py::error_already_set();
}

// A gradient not seen before: a dense, contiguous CPU tensor of the param's dtype and
// shape, not a lazily negated view. Returns its data pointer.
std::uintptr_t StepPlan::torch_grad(std::size_t i, PyObject* grad) {
    const Torch& t = *torch_;
    const Names& nm = names();
    std::uintptr_t ptr = 0;
    const bool ok = PyObject_TypeCheck(grad, reinterpret_cast<PyTypeObject*>(t.tensor_type.ptr())) &&
                    attr_is(grad, nm.dtype, t.t[i].dtype.ptr()) && attr_is(grad, nm.layout, t.strided.ptr()) &&
                    attr_is(grad, nm.is_cpu, Py_True) && call_is(grad, nm.is_neg, Py_False) &&
                    call_is(grad, nm.is_contiguous, Py_True) && attr_is(grad, nm.shape, t.t[i].shape.ptr(), true) &&
                    data_ptr_of(t.data_ptr.ptr(), grad, &ptr) && (ptr != 0 || entries_[i].param.nbytes == 0);
    if (!ok) raise_grad_error(i, grad);
    return ptr;
}

// state['step'] of tensor i, checked, plus one: this update's 1-based count.
std::int64_t StepPlan::torch_count(std::size_t i) const {
    const Torch::Tensor& s = torch_->t[i];
    if (s.step == nullptr) return 2;  // SGD without a count: the momentum buffer is not new
    if (s.step_type == 'q') {
        const std::int64_t v = *reinterpret_cast<const std::int64_t*>(s.step);
        if (v < 0) throw_value(name(kStep, i).str() + " must be a whole number >= 0, got " + std::to_string(v));
        return v + 1;
    }
    const double v = s.step_type == 'f' ? static_cast<double>(*reinterpret_cast<const float*>(s.step)) : *reinterpret_cast<const double*>(s.step);
    if (!(v >= 0 && v == std::floor(v) && v < 9.0e18))
        throw_value(name(kStep, i).str() + " must be a whole number >= 0, got " + std::string(py::repr(py::float_(v))));
    return static_cast<std::int64_t>(v) + 1;
}

// torch_count without raising: false where the count is not a whole number >= 0 (the
// caller's thread then calls torch_count, which says so).
bool StepPlan::torch_count_quick(std::size_t i, std::int64_t* count) const {
    const Torch::Tensor& s = torch_->t[i];
    if (s.step == nullptr) {
        *count = 2;
        return true;
    }
    if (s.step_type == 'q') {
        const std::int64_t v = *reinterpret_cast<const std::int64_t*>(s.step);
        *count = v + 1;
        return v >= 0;
    }
    const double v = s.step_type == 'f' ? static_cast<double>(*reinterpret_cast<const float*>(s.step)) : *reinterpret_cast<const double*>(s.step);
    if (!(v >= 0 && v == std::floor(v) && v < 9.0e18)) return false;
    *count = static_cast<std::int64_t>(v) + 1;
    return true;
}

// Tensor i's part of a step, checked in the order that keeps a stale plan from raising:
// its param's identity and address, its state, then its gradient and count.
int StepPlan::torch_tensor(std::size_t i) {
    Torch& t = *torch_;
    Torch::Tensor& e = t.t[i];
    const Names& nm = names();
    const py::object grad = py::reinterpret_steal<py::object>(PyObject_GetAttr(e.tensor, nm.grad));
    if (!grad) throw py::error_already_set();
    if (grad.is_none()) return 0;
    std::uintptr_t ptr = 0;
    if (!data_ptr_of(t.data_ptr.ptr(), e.tensor, &ptr)) throw py::error_already_set();
    // The same memory is not enough: `param.data = param.data.view(...)` keeps the address
    // with another dtype, shape or layout. Any change makes the plan stale (rebuilt, checked).
    if (ptr != e.param_ptr || !attr_is(e.tensor, nm.dtype, e.dtype.ptr()) || !attr_is(e.tensor, nm.shape, e.shape.ptr(), true) ||
        !call_is(e.tensor, nm.is_contiguous, Py_True) || state_missing(i) || (adam_ && e.step == nullptr)) {
        PyErr_Clear();
        return -1;
    }
    // The gradient validated last time, at its old address, with the same dtype, shape and
    // layout, is reused. A weak reference: holding it would keep a model's worth of
    // gradients alive across zero_grad(set_to_none=True).
    bool same = e.grad && weak_target(e.grad.ptr()) == grad.ptr();
    if (same && !(data_ptr_of(t.data_ptr.ptr(), grad.ptr(), &ptr) && attr_is(grad.ptr(), nm.dtype, e.dtype.ptr()) &&
                  attr_is(grad.ptr(), nm.shape, e.shape.ptr(), true) && call_is(grad.ptr(), nm.is_contiguous, Py_True))) {
        PyErr_Clear();  // the full check names the problem
        same = false;
    }
    if (!same || ptr != e.grad_ptr) {
        ptr = torch_grad(i, grad.ptr());
        e.grad = py::reinterpret_steal<py::object>(PyWeakref_NewRef(grad.ptr(), nullptr));
        if (!e.grad) PyErr_Clear();  // not weakly referenceable: checked at every step
        e.grad_ptr = ptr;
    }
    const char* data = reinterpret_cast<const char*>(ptr);
    check_grad_overlap(entries_[i], i, data);
    set_kept(entries_[i], data, torch_count(i));
    return 1;
}

// torch_tensor_meta where it needs neither Python nor a search, so any thread may run it:
// 2 where the caller's thread must (a gradient to name in an error, a gradient at a new
// address to check against the params' and states' memory, a count to refuse).
int StepPlan::torch_tensor_meta_quick(std::size_t i) {
    const Torch& t = *torch_;
    const fastadam_torch_meta &m = t.now[i], &b = t.built[i];
    if (m.grad_state == 0) return 0;
    if (m.param_ptr != b.param_ptr || m.param_nbytes != b.param_nbytes || m.param_dtype != b.param_dtype ||
        m.param_shape != b.param_shape || state_missing(i) || (adam_ && t.t[i].step == nullptr))
        return -1;
    const Entry& e = entries_[i];
    const char* data = reinterpret_cast<const char*>(m.grad_ptr);
    std::int64_t count = 0;
    if (m.grad_state != 1 || data != e.checked_grad || e.param.nbytes != e.checked_grad_bytes || !torch_count_quick(i, &count)) return 2;
    set_kept(e, data, count);
    return 1;
}

// torch_tensor's checks, in the same order, on what the helper read for tensor i.
int StepPlan::torch_tensor_meta(std::size_t i) {
    Torch& t = *torch_;
    const fastadam_torch_meta &m = t.now[i], &b = t.built[i];
    if (m.grad_state == 0) return 0;
    if (m.param_ptr != b.param_ptr || m.param_nbytes != b.param_nbytes || m.param_dtype != b.param_dtype ||
        m.param_shape != b.param_shape || state_missing(i) || (adam_ && t.t[i].step == nullptr))
        return -1;
    if (m.grad_state != 1) {
        const py::object grad = py::reinterpret_steal<py::object>(PyObject_GetAttr(t.t[i].tensor, names().grad));
        if (!grad) throw py::error_already_set();
        raise_grad_error(i, grad.ptr());
    }
    const char* data = reinterpret_cast<const char*>(m.grad_ptr);
    check_grad_overlap(entries_[i], i, data);
    set_kept(entries_[i], data, torch_count(i));
    return 1;
}

bool StepPlan::torch_step(py::handle groups) {
    if (!torch_) throw_value(fn_ + ": this plan was built without torch=...; call step()");
    const std::size_t n = entries_.size();
    // The same tensors in the same groups (a group's "params" list compared by identity).
    if (!groups_hold_params(groups)) return false;
    read_hypers(groups);  // which state a step needs depends on them (amsgrad, momentum)
    prefetch();
    Torch& t = *torch_;
    if (t.meta != nullptr && n > 0) {
        if (!torch_read_and_check()) return false;
    } else {
        for (std::size_t i = 0; i < n; ++i) {
            const int r = torch_tensor(i);
            if (r < 0) return false;
            stepped_[i] = static_cast<unsigned char>(r);
            if (r == 0) set_kept(entries_[i], nullptr, 0);
        }
    }
    // Everything is checked. The version bumps and the counts come first, while the
    // params' metadata and state['step'] are still in cache (the kernel's sweep evicts
    // them); the kernel takes its counts from the plan. Should it not start (no memory or
    // thread for its workers), the counts go back: the step did not happen.
    torch_bump_versions();
    torch_count_steps();
    try {
        launch();
    } catch (...) {
        torch_restore_steps();
        throw;
    }
    ++completed_;
    return true;
}

namespace {

// Tensors per unit when the helper's per-tensor work is split across threads: about 10 us
// of it, against a unit's claim of well under a microsecond.
constexpr std::size_t kTensorsPerUnit = 64;

// The helper's reads or bumps in units of kTensorsPerUnit tensors (fastadam::run_units):
// each tensor is a chain of cache misses (the previous kernel pass evicted its metadata),
// and two cores wait for two chains at once (docs/performance.md, "The torch adapter").
// Returns 0, or the first failing unit's code (-1 with `error` set, -2: a tensor needs the GIL).
template <class Range>
int run_in_units(std::size_t n, Range range, std::string* error) {
    struct Job {
        Range& range;
        std::size_t n;
        std::atomic<int> failed{0};
        char message[256] = {};
    } job{range, n};
    fastadam::run_units(static_cast<int>((n + kTensorsPerUnit - 1) / kTensorsPerUnit), [](void* context, int unit) {
        Job& j = *static_cast<Job*>(context);
        const std::size_t begin = static_cast<std::size_t>(unit) * kTensorsPerUnit;
        const std::size_t end = std::min(j.n, begin + kTensorsPerUnit);
        char message[256] = {};
        const int r = j.range(begin, end, message, sizeof message);
        int expected = 0;
        if (r != 0 && j.failed.compare_exchange_strong(expected, r)) std::memcpy(j.message, message, sizeof message);
    }, &job);
    *error = job.message;
    return job.failed.load();
}

}  // namespace

// The helper's reads and the checks of every tensor (torch_tensor_meta); false when the
// plan is stale. Many tensors go in units, each read then checked by one thread (the
// kernel's spinning workers too); what needs the caller's thread is done after, in order.
bool StepPlan::torch_read_and_check() {
    Torch& t = *torch_;
    const std::size_t n = entries_.size();
    bool read = false;
    if (n >= 4 * kTensorsPerUnit) {
        std::string error;
        PyObject* tensors = t.tensors.ptr();
        const auto* meta = t.meta;
        fastadam_torch_meta* out = t.now.data();
        unsigned char* stepped = stepped_.data();
        const int r = run_in_units(n, [&](std::size_t b, std::size_t e, char* message, std::size_t size) {
            const int got = meta->read_range(tensors, static_cast<Py_ssize_t>(b), static_cast<Py_ssize_t>(e), out + b, message, size);
            if (got != 0) return got;
            for (std::size_t i = b; i < e; ++i) {
                const int q = torch_tensor_meta_quick(i);
                stepped[i] = static_cast<unsigned char>(q < 0 ? 3 : q);  // 3: stale
                if (q == 0) set_kept(entries_[i], nullptr, 0);
            }
            return 0;
        }, &error);
        if (r == -1) throw std::runtime_error(error);
        read = r == 0;  // -2: a tensor with Python dispatch; all of them again, with the GIL
    }
    if (!read) {
        if (t.meta->read(t.tensors.ptr(), t.now.data()) < 0) throw py::error_already_set();
        std::fill(stepped_.begin(), stepped_.end(), static_cast<unsigned char>(2));
    }
    for (std::size_t i = 0; i < n; ++i)
        if (stepped_[i] == 3) return false;
    for (std::size_t i = 0; i < n; ++i) {
        if (stepped_[i] != 2) continue;
        const int r = torch_tensor_meta(i);
        if (r < 0) return false;
        stepped_[i] = static_cast<unsigned char>(r);
        if (r == 0) set_kept(entries_[i], nullptr, 0);
    }
    return true;
}

// Each updated param's version, as torch's in-place ops bump it (autograd then refuses a
// retained graph that saved the old values); one call for all.
void StepPlan::torch_bump_versions() {
    Torch& t = *torch_;
    const std::size_t n = entries_.size();
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) count += stepped_[i];
    if (count == 0) return;
    if (t.meta != nullptr) {
        if (n >= 4 * kTensorsPerUnit) {
            std::string error;
            PyObject* tensors = t.tensors.ptr();
            const auto* meta = t.meta;
            const unsigned char* stepped = stepped_.data();
            const int r = run_in_units(n, [&](std::size_t b, std::size_t e, char* message, std::size_t size) {
                return meta->bump_range(tensors, static_cast<Py_ssize_t>(b), static_cast<Py_ssize_t>(e), stepped, message, size);
            }, &error);
            if (r != 0) throw std::runtime_error(error);
            return;
        }
        if (t.meta->bump_versions(t.tensors.ptr(), stepped_.data()) < 0) throw py::error_already_set();
        return;
    }
    if (t.bump_versions.is_none()) return;
    py::tuple updated = t.tensors;
    if (count != n) {
        updated = py::tuple(count);
        for (std::size_t i = 0, k = 0; i < n; ++i)
            if (stepped_[i]) updated[k++] = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(t.tensors.ptr(), i));
    }
    py::object r = py::reinterpret_steal<py::object>(PyObject_CallOneArg(t.bump_versions.ptr(), updated.ptr()));
    if (!r) throw py::error_already_set();
}

namespace {
std::size_t step_bytes(char type) { return type == 'f' ? 4 : 8; }
}  // namespace

// Each updated tensor's state['step'] + 1 in its own dtype (float32
// addition for float32, as torch's _foreach_add_(steps, 1)).
void StepPlan::torch_count_steps() {
    Torch& t = *torch_;
    saved_steps_.resize(entries_.size());
    for (std::size_t i = 0; i < entries_.size(); ++i) {
        char* d = t.t[i].step;
        if (!stepped_[i] || d == nullptr) continue;
        std::memcpy(&saved_steps_[i], d, step_bytes(t.t[i].step_type));
        if (t.t[i].step_type == 'f') *reinterpret_cast<float*>(d) += 1.0f;
        else if (t.t[i].step_type == 'd') *reinterpret_cast<double*>(d) += 1.0;
        else *reinterpret_cast<std::int64_t*>(d) += 1;
    }
}

// torch_count_steps undone, bytes for bytes (a float32 count of 2^24 or more does not come
// back by subtracting one).
void StepPlan::torch_restore_steps() {
    Torch& t = *torch_;
    for (std::size_t i = 0; i < entries_.size(); ++i) {
        char* d = t.t[i].step;
        if (!stepped_[i] || d == nullptr) continue;
        std::memcpy(d, &saved_steps_[i], step_bytes(t.t[i].step_type));
    }
}

}  // namespace fastadam::bindings
