// _StepPlan's torch mode (step_plan.hpp): the plan reads each parameter's .grad and
// state['step'] itself, through Python-level calls (no torch headers, no link to torch).
//
// `torch` (given by fastadam/torch.py) has: tensors (the parameters, plan order; params[i]
// is tensors[i].detach().numpy()), steps (per tensor a 0-d float32/float64/int64 array
// viewing state['step'], or None), Tensor (torch.Tensor), strided (torch.strided),
// grad_error(i, grad) -> the exception for a gradient the checks reject, and
// bump_versions(tuple_of_tensors) or None.
//
// For SGD, steps[i] may be None (the momentum buffer is not new: the kernel's count is 2)
// or a count like Adam's, where 0 means "the buffer is new: set it to the gradient".
#include <cmath>

#include "step_plan.hpp"

namespace fastadam::bindings {

namespace {

struct Names {
    PyObject *grad, *params, *dtype, *layout, *is_cpu, *is_neg, *is_contiguous, *shape;
};

const Names& names() {
    static const Names n{PyUnicode_InternFromString("grad"),   PyUnicode_InternFromString("params"),
                         PyUnicode_InternFromString("dtype"),  PyUnicode_InternFromString("layout"),
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

// Drops this step's .grad references however the step ends.
struct ReleaseAll {
    std::vector<PyObject*>& refs;
    ~ReleaseAll() {
        for (PyObject*& r : refs) {
            Py_XDECREF(r);
            r = nullptr;
        }
    }
};

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
    for (std::size_t i = 0; i < n; ++i) {
        PyObject* p = PyTuple_GET_ITEM(t->tensors.ptr(), i);
        if (!PyObject_TypeCheck(p, reinterpret_cast<PyTypeObject*>(t->tensor_type.ptr())))
            throw_type(name(kParam, i).str() + ": internal error: torch.tensors holds a " + type_name(p));
        t->dtype.push_back(py::reinterpret_borrow<py::object>(p).attr("dtype"));
        t->shape.push_back(py::reinterpret_borrow<py::object>(p).attr("shape"));
        std::uintptr_t ptr = 0;
        if (!data_ptr_of(t->data_ptr.ptr(), p, &ptr)) throw py::error_already_set();
        if (entries_[i].param.nbytes > 0 && ptr != reinterpret_cast<std::uintptr_t>(entries_[i].param.data))
            throw_value(name(kParam, i).str() + ": internal error: params[i] is not a view of torch.tensors[i]");
        t->param_ptr.push_back(ptr);
    }
    t->steps.resize(n);
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
            t->steps[i] = Torch::Step{static_cast<char*>(a.mutable_data()), type};
            footprint_.add(t->steps[i].data, a.itemsize(), kStep, i);
        }
    }
    t->step_arrays = steps;
    t->grad.resize(n);
    t->grad_ptr.assign(n, 0);
    t->now.assign(n, nullptr);
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
                    attr_is(grad, nm.dtype, t.dtype[i].ptr()) && attr_is(grad, nm.layout, t.strided.ptr()) &&
                    attr_is(grad, nm.is_cpu, Py_True) && call_is(grad, nm.is_neg, Py_False) &&
                    call_is(grad, nm.is_contiguous, Py_True) && attr_is(grad, nm.shape, t.shape[i].ptr(), true) &&
                    data_ptr_of(t.data_ptr.ptr(), grad, &ptr);
    if (!ok) raise_grad_error(i, grad);
    return ptr;
}

// state['step'] of tensor i, checked, plus one: this update's 1-based count.
std::int64_t StepPlan::torch_count(std::size_t i) const {
    const Torch::Step& s = torch_->steps[i];
    if (s.data == nullptr) return 2;  // SGD without a count: the momentum buffer is not new
    if (s.type == 'q') {
        const std::int64_t v = *reinterpret_cast<const std::int64_t*>(s.data);
        if (v < 0) throw_value(name(kStep, i).str() + " must be a whole number >= 0, got " + std::to_string(v));
        return v + 1;
    }
    const double v = s.type == 'f' ? static_cast<double>(*reinterpret_cast<const float*>(s.data)) : *reinterpret_cast<const double*>(s.data);
    if (!(v >= 0 && v == std::floor(v) && v < 9.0e18))
        throw_value(name(kStep, i).str() + " must be a whole number >= 0, got " + std::string(py::repr(py::float_(v))));
    return static_cast<std::int64_t>(v) + 1;
}

bool StepPlan::torch_step(py::handle groups) {
    if (!torch_) throw_value(fn_ + ": this plan was built without torch=...; call step()");
    Torch& t = *torch_;
    const Names& nm = names();
    const std::size_t n = entries_.size();
    // 1. The same tensors in the same groups, at the same addresses, with state.
    if (check_groups(groups) != n_groups_) return false;
    PyObject* const* tensors = n ? &PyTuple_GET_ITEM(t.tensors.ptr(), 0) : nullptr;
    for (std::size_t g = 0, i = 0; g < n_groups_; ++g) {
        PyObject* group = PySequence_Fast_GET_ITEM(groups.ptr(), g);
        if (!PyDict_Check(group)) throw_type(fn_ + ": param_groups[" + std::to_string(g) + "] must be a dict, got " + type_name(group));
        PyObject* ps = PyDict_GetItemWithError(group, nm.params);  // borrowed
        if (ps == nullptr) {
            if (PyErr_Occurred()) throw py::error_already_set();
            return false;
        }
        if (!(PyList_Check(ps) || PyTuple_Check(ps)) || static_cast<std::size_t>(Py_SIZE(ps)) != group_sizes_[g]) return false;
        PyObject* const* items = PySequence_Fast_ITEMS(ps);
        for (std::size_t j = 0; j < group_sizes_[g]; ++j, ++i)
            if (items[j] != tensors[i]) return false;
    }
    read_hypers(groups);  // which state a step needs depends on them (amsgrad, momentum)
    const ReleaseAll release{t.now};
    for (std::size_t i = 0; i < n; ++i) {
        PyObject* grad = PyObject_GetAttr(tensors[i], nm.grad);
        if (grad == nullptr) throw py::error_already_set();
        if (grad == Py_None) {
            Py_DECREF(grad);
            continue;
        }
        t.now[i] = grad;
        std::uintptr_t ptr = 0;
        if (!data_ptr_of(t.data_ptr.ptr(), tensors[i], &ptr)) throw py::error_already_set();
        if (ptr != t.param_ptr[i] || state_missing(i) || (adam_ && t.steps[i].data == nullptr)) return false;
    }
    prefetch();
    // 2. Gradients: a held one at its old address is reused; any other is checked.
    for (std::size_t i = 0; i < n; ++i) {
        PyObject* grad = t.now[i];
        stepped_[i] = grad != nullptr;
        if (grad == nullptr) continue;
        std::uintptr_t ptr = 0;
        bool same = grad == t.grad[i].ptr();
        if (same && !data_ptr_of(t.data_ptr.ptr(), grad, &ptr)) {
            PyErr_Clear();  // the full check below names the problem
            same = false;
        }
        if (!same || ptr != t.grad_ptr[i]) {
            ptr = torch_grad(i, grad);
            t.grad[i] = py::reinterpret_borrow<py::object>(grad);
            t.grad_ptr[i] = ptr;
        }
        grad_[i] = reinterpret_cast<const char*>(ptr);
        check_grad_overlap(entries_[i], i, grad_[i]);
    }
    // 3. Counts.
    for (std::size_t i = 0; i < n; ++i) set_kept(entries_[i], stepped_[i] ? grad_[i] : nullptr, stepped_[i] ? torch_count(i) : 0);
    // 4. Everything is checked: write.
    launch();
    torch_finish();
    return true;
}

// After the kernel: each updated tensor's state['step'] + 1 in its own dtype (float32
// addition for float32, as torch's _foreach_add_(steps, 1)), then one version bump.
void StepPlan::torch_finish() {
    Torch& t = *torch_;
    const std::size_t n = entries_.size();
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
        if (!stepped_[i]) continue;
        ++count;
        char* d = t.steps[i].data;
        if (d == nullptr) continue;
        if (t.steps[i].type == 'f') *reinterpret_cast<float*>(d) += 1.0f;
        else if (t.steps[i].type == 'd') *reinterpret_cast<double*>(d) += 1.0;
        else *reinterpret_cast<std::int64_t*>(d) += 1;
    }
    if (t.bump_versions.is_none() || count == 0) return;
    py::tuple updated = t.tensors;
    if (count != n) {
        updated = py::tuple(count);
        for (std::size_t i = 0, k = 0; i < n; ++i)
            if (stepped_[i]) updated[k++] = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(t.tensors.ptr(), i));
    }
    py::object r = py::reinterpret_steal<py::object>(PyObject_CallOneArg(t.bump_versions.ptr(), updated.ptr()));
    if (!r) throw py::error_already_set();
}

}  // namespace fastadam::bindings
