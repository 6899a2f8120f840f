// fastadam._core: argument checking and dispatch only; the math is in
// cpp/include/fastadam/kernels.hpp.
//
// Every buffer is taken as it is, never converted: a strided, Fortran-order,
// read-only, misaligned, byte-swapped or wrongly typed array, or a list, raises
// before the first byte of any buffer of the step is written.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastadam/fastadam.hpp"

namespace py = pybind11;
using fastadam::AdamHyperparams;
using fastadam::AdamTensor;
using fastadam::SgdHyperparams;
using fastadam::SgdTensor;

namespace {

enum class DType { f32, f64 };

// A validated array: where it is, how big, what type.
struct Buffer {
    char* data = nullptr;
    std::int64_t size = 0;
    std::int64_t nbytes = 0;
    DType dtype = DType::f32;
    PyObject* obj = nullptr;  // borrowed; kept alive by the caller's arguments
};

[[noreturn]] void throw_type(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] void throw_value(const std::string& msg) { throw py::value_error(msg); }

std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += std::to_string(a.shape(i)) + (a.ndim() == 1 || i + 1 < a.ndim() ? "," : "");
    return s + ")";
}

const char* dtype_name(DType d) { return d == DType::f32 ? "float32" : "float64"; }

// Names an argument as the user wrote it ("adam_step(): grad", "adam_step_multi():
// grads[3]"); the string is built only when an error needs it, off the hot path.
struct ArgName {
    const std::string* fn;
    int slot;  // index into kSingular / kPlural
    std::size_t index;
    bool multi;
    std::string str() const;
};

const char* const kSingular[] = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"};
const char* const kPlural[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers"};
enum Slot { kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kMomentumBuffer = 5 };

std::string ArgName::str() const {
    return multi ? *fn + ": " + kPlural[slot] + "[" + std::to_string(index) + "]" : *fn + ": " + kSingular[slot];
}

Buffer check_array(py::handle h, const ArgName& arg, bool writable) {
    if (!py::isinstance<py::array>(h))
        throw_type(arg.str() + " must be a numpy.ndarray of float32 or float64, got " + type_name(h) +
                   "; create the array once with numpy.ascontiguousarray(x, dtype=numpy.float32) and keep "
                   "passing that array (fastadam works in place and never updates a copy)");
    auto a = py::reinterpret_borrow<py::array>(h);
    const py::dtype dt = a.dtype();
    Buffer b;
    const int num = dt.num();
    if (num == py::detail::npy_api::NPY_FLOAT_) b.dtype = DType::f32;
    else if (num == py::detail::npy_api::NPY_DOUBLE_) b.dtype = DType::f64;
    else
        throw_type(arg.str() + " has dtype " + std::string(py::str(dt)) +
                   "; fastadam supports float32 and float64 (all arrays of one parameter share its dtype): "
                   "keep the parameter and its state in one of those dtypes");
    const char order = dt.byteorder();
    static const bool little_endian = [] {
        const std::uint16_t probe = 1;
        return *reinterpret_cast<const std::uint8_t*>(&probe) == 1;
    }();
    if (order == (little_endian ? '>' : '<'))
        throw_type(arg.str() + " has non-native byte order (dtype " + std::string(py::str(dt.attr("str"))) +
                   "); convert it once with x.astype(x.dtype.newbyteorder('=')) and keep that array");
    if (!(a.flags() & py::array::c_style))
        throw_value(arg.str() + " is not C-contiguous (shape " + shape_str(a) +
                    "); fastadam updates memory in place and will not work on a temporary copy: "
                    "pass numpy.ascontiguousarray(x) and keep using that array");
    if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw_value(arg.str() + " is not aligned to its dtype; make an aligned copy once with numpy.require(x, requirements='A')");
    if (writable && !a.writeable())
        throw_value(arg.str() + " is read-only; fastadam writes it in place: pass a writeable array "
                           "(e.g. x.copy(), or x.setflags(write=True) if you own its memory)");
    b.data = static_cast<char*>(const_cast<void*>(a.data()));
    b.size = static_cast<std::int64_t>(a.size());
    b.nbytes = b.size * static_cast<std::int64_t>(a.itemsize());
    b.obj = h.ptr();
    return b;
}

void check_same_shape(const Buffer& b, const Buffer& ref, const ArgName& arg, const ArgName& ref_arg) {
    auto a = py::reinterpret_borrow<py::array>(b.obj), r = py::reinterpret_borrow<py::array>(ref.obj);
    if (b.dtype != ref.dtype)
        throw_type(arg.str() + " has dtype " + dtype_name(b.dtype) + " but " + ref_arg.str() + " has dtype " + dtype_name(ref.dtype) +
                   "; a parameter, its gradient and its state must share one dtype");
    bool same = a.ndim() == r.ndim();
    for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == r.shape(i);
    if (!same)
        throw_value(arg.str() + " has shape " + shape_str(a) + " but " + ref_arg.str() + " has shape " + shape_str(r) +
                    "; they must have the same shape");
}

struct Range {
    std::uintptr_t begin, end;
    ArgName arg;
};

// Raises if any two of the ranges share a byte. Sort + sweep: O(n log n) over a
// multi-tensor step, so two parameters that alias each other are caught too.
void check_no_overlap(std::vector<Range>& ranges) {
    ranges.erase(std::remove_if(ranges.begin(), ranges.end(), [](const Range& r) { return r.begin == r.end; }), ranges.end());
    std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
    for (std::size_t i = 1; i < ranges.size(); ++i)
        if (ranges[i].begin < ranges[i - 1].end)
            throw_value(ranges[i - 1].arg.str() + " and " + ranges[i].arg.str().substr(ranges[i].arg.fn->size() + 2) +
                        " share memory; every written buffer (param, exp_avg, exp_avg_sq, max_exp_avg_sq, "
                        "momentum_buffer) must be its own array, and grad must not overlap them");
}

Range range_of(const Buffer& b, const ArgName& arg) {
    const auto begin = reinterpret_cast<std::uintptr_t>(b.data);
    return Range{begin, begin + static_cast<std::uintptr_t>(b.nbytes), arg};
}

double check_real(py::handle h, const char* fn, const char* name) {
    if (PyBool_Check(h.ptr()) || !(PyFloat_Check(h.ptr()) || PyLong_Check(h.ptr()) || PyNumber_Check(h.ptr())))
        throw_type(std::string(fn) + ": " + name + " must be a real number, got " + type_name(h));
    const double v = PyFloat_AsDouble(h.ptr());
    if (v == -1.0 && PyErr_Occurred()) throw py::error_already_set();
    if (!std::isfinite(v)) throw_value(std::string(fn) + ": " + name + " must be finite, got " + std::to_string(v));
    return v;
}

double check_nonnegative(py::handle h, const char* fn, const char* name) {
    const double v = check_real(h, fn, name);
    if (v < 0) throw_value(std::string(fn) + ": " + name + " must be >= 0, got " + std::string(py::repr(h)));
    return v;
}

std::int64_t check_step(py::handle h, const std::string& what) {
    if (PyBool_Check(h.ptr()) || PyFloat_Check(h.ptr()))
        throw_type(what + " must be an integer (the 1-based count of this update), got " + type_name(h));
    PyObject* index = PyNumber_Index(h.ptr());
    if (index == nullptr) {
        PyErr_Clear();
        throw_type(what + " must be an integer (the 1-based count of this update), got " + type_name(h));
    }
    const long long v = PyLong_AsLongLong(index);
    Py_DECREF(index);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        throw_value(what + " is too large");
    }
    if (v < 1) throw_value(what + " must be >= 1 (the count of this update, starting at 1), got " + std::to_string(v));
    return static_cast<std::int64_t>(v);
}

AdamHyperparams adam_hyper(const char* fn, py::handle lr, py::handle betas, py::handle eps, py::handle weight_decay,
                           bool decoupled_weight_decay, bool amsgrad, bool maximize) {
    AdamHyperparams h;
    h.lr = check_nonnegative(lr, fn, "lr");
    h.eps = check_nonnegative(eps, fn, "eps");
    h.weight_decay = check_nonnegative(weight_decay, fn, "weight_decay");
    if (!PySequence_Check(betas.ptr()) || PyUnicode_Check(betas.ptr()) || PySequence_Size(betas.ptr()) != 2) {
        PyErr_Clear();
        throw_type(std::string(fn) + ": betas must be a pair (beta1, beta2), got " + std::string(py::repr(betas)));
    }
    auto seq = py::reinterpret_borrow<py::sequence>(betas);
    h.beta1 = check_real(seq[0], fn, "betas[0]");
    h.beta2 = check_real(seq[1], fn, "betas[1]");
    for (double b : {h.beta1, h.beta2})
        if (!(b >= 0.0 && b < 1.0))
            throw_value(std::string(fn) + ": betas must lie in [0, 1), got " + std::string(py::repr(betas)));
    h.decoupled_weight_decay = decoupled_weight_decay;
    h.amsgrad = amsgrad;
    h.maximize = maximize;
    return h;
}

SgdHyperparams sgd_hyper(const char* fn, py::handle lr, py::handle momentum, py::handle dampening, py::handle weight_decay,
                         bool nesterov, bool maximize) {
    SgdHyperparams h;
    h.lr = check_nonnegative(lr, fn, "lr");
    h.momentum = check_nonnegative(momentum, fn, "momentum");
    h.dampening = check_real(dampening, fn, "dampening");
    h.weight_decay = check_nonnegative(weight_decay, fn, "weight_decay");
    h.nesterov = nesterov;
    h.maximize = maximize;
    if (nesterov && (h.momentum <= 0 || h.dampening != 0))
        throw_value(std::string(fn) + ": nesterov=True requires momentum > 0 and dampening = 0");
    return h;
}

py::handle item(py::handle seq, std::size_t i) {
    return PyList_Check(seq.ptr()) ? PyList_GET_ITEM(seq.ptr(), i) : PyTuple_GET_ITEM(seq.ptr(), i);
}

std::size_t check_list(py::handle seq, const std::string& fn, const char* name, std::size_t expected, bool has_expected) {
    if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr()))
        throw_type(fn + ": " + name + " must be a list or tuple of numpy arrays, got " + type_name(seq));
    const auto n = static_cast<std::size_t>(Py_SIZE(seq.ptr()));
    if (has_expected && n != expected)
        throw_value(fn + ": " + name + " has " + std::to_string(n) + " entries but params has " + std::to_string(expected));
    return n;
}

std::string indexed(const std::string& fn, const char* name, std::size_t i) { return fn + ": " + name + "[" + std::to_string(i) + "]"; }

// ----- Adam -------------------------------------------------------------------------

// Validates the arrays of tensor i: `handles` in slot order (param, grad, then the
// written state), `slots` their names. The first array is the reference for dtype
// and shape. Appends their memory ranges for the overlap check.
void validate_tensor(const std::string& fn, std::size_t i, bool multi, const py::handle* handles, const Slot* slots, int n,
                     std::vector<Range>& ranges, Buffer* out) {
    const ArgName param_name{&fn, slots[0], i, multi};
    for (int k = 0; k < n; ++k) {
        const ArgName arg{&fn, slots[k], i, multi};
        out[k] = check_array(handles[k], arg, slots[k] != kGrad);
        if (k > 0) check_same_shape(out[k], out[0], arg, param_name);
    }
    for (int k = 0; k < n; ++k) ranges.push_back(range_of(out[k], ArgName{&fn, slots[k], i, multi}));
}

// An optional state buffer (max_exp_avg_sq, momentum_buffer): required exactly when
// `needed`. Returns whether it takes part.
bool check_optional(py::handle h, bool needed, const ArgName& arg, const char* when) {
    if (needed && h.is_none())
        throw_value(arg.str() + " is required with " + when + ": pass an array of zeros shaped like param, kept across steps");
    if (!needed && !h.is_none()) throw_value(arg.str() + " is only used with " + when + "; pass None");
    return needed;
}

// Adam: returns false for a tensor to skip (grad is None, only when allowed).
bool validate_adam_tensor(const std::string& fn, std::size_t i, bool multi, py::handle param, py::handle grad, py::handle exp_avg,
                          py::handle exp_avg_sq, py::handle max_exp_avg_sq, const AdamHyperparams& h, bool allow_none_grad,
                          std::vector<Range>& ranges, Buffer out[5]) {
    if (allow_none_grad && grad.is_none()) return false;
    static const Slot slots[5] = {kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq};
    const py::handle handles[5] = {param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq};
    const bool ams = check_optional(max_exp_avg_sq, h.amsgrad, ArgName{&fn, kMaxExpAvgSq, i, multi}, "amsgrad=True");
    validate_tensor(fn, i, multi, handles, slots, ams ? 5 : 4, ranges, out);
    return true;
}

template <class T>
AdamTensor<T> adam_tensor(const Buffer b[5], std::int64_t step, const AdamHyperparams* h) {
    AdamTensor<T> t;
    t.param = reinterpret_cast<T*>(b[0].data);
    t.grad = reinterpret_cast<const T*>(b[1].data);
    t.exp_avg = reinterpret_cast<T*>(b[2].data);
    t.exp_avg_sq = reinterpret_cast<T*>(b[3].data);
    t.max_exp_avg_sq = h->amsgrad ? reinterpret_cast<T*>(b[4].data) : nullptr;
    t.size = b[0].size;
    t.step = step;
    t.hyper = h;
    return t;
}

void adam_step(py::handle param, py::handle grad, py::handle exp_avg, py::handle exp_avg_sq, py::handle step, py::handle lr,
               py::handle betas, py::handle eps, py::handle weight_decay, bool decoupled_weight_decay, bool amsgrad,
               py::handle max_exp_avg_sq, bool maximize) {
    static const std::string fn = "adam_step()";
    const AdamHyperparams h = adam_hyper("adam_step()", lr, betas, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize);
    const std::int64_t s = check_step(step, fn + ": step");
    std::vector<Range> ranges;
    ranges.reserve(5);
    Buffer b[5];
    validate_adam_tensor(fn, 0, false, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, h, false, ranges, b);
    check_no_overlap(ranges);
    py::gil_scoped_release release;
    if (b[0].dtype == DType::f32) {
        const auto t = adam_tensor<float>(b, s, &h);
        fastadam::adam_step(&t, 1);
    } else {
        const auto t = adam_tensor<double>(b, s, &h);
        fastadam::adam_step(&t, 1);
    }
}

// The multi-tensor step. `hypers` holds one entry per group and `group_of(i)` says
// which entry tensor i uses; `steps_out`, when given, is an int64 array whose entry
// i is incremented (after validation) and used as tensor i's step.
struct AdamBatch {
    std::vector<AdamTensor<float>> f32;
    std::vector<AdamTensor<double>> f64;
    void run() {
        py::gil_scoped_release release;
        if (!f32.empty()) fastadam::adam_step(f32.data(), f32.size());
        if (!f64.empty()) fastadam::adam_step(f64.data(), f64.size());
    }
};

void adam_step_multi(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs, py::handle steps,
                     py::handle lr, py::handle betas, py::handle eps, py::handle weight_decay, bool decoupled_weight_decay,
                     bool amsgrad, py::handle max_exp_avg_sqs, bool maximize) {
    static const std::string fn = "adam_step_multi()";
    const AdamHyperparams h = adam_hyper("adam_step_multi()", lr, betas, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize);
    const std::size_t n = check_list(params, fn, "params", 0, false);
    check_list(grads, fn, "grads", n, true);
    check_list(exp_avgs, fn, "exp_avgs", n, true);
    check_list(exp_avg_sqs, fn, "exp_avg_sqs", n, true);
    const bool has_max = !max_exp_avg_sqs.is_none();
    if (has_max) check_list(max_exp_avg_sqs, fn, "max_exp_avg_sqs", n, true);
    if (amsgrad != has_max)
        throw_value(fn + (amsgrad ? ": max_exp_avg_sqs is required with amsgrad=True (one zero-initialised array per param)"
                                  : ": max_exp_avg_sqs is only used with amsgrad=True; pass None or set amsgrad=True"));
    const bool one_step = PyLong_Check(steps.ptr()) || (!PyList_Check(steps.ptr()) && !PyTuple_Check(steps.ptr()) && PyIndex_Check(steps.ptr()));
    std::int64_t common_step = 0;
    if (one_step) common_step = check_step(steps, fn + ": steps");
    else check_list(steps, fn, "steps", n, true);

    std::vector<Range> ranges;
    ranges.reserve(5 * n);
    AdamBatch batch;
    for (std::size_t i = 0; i < n; ++i) {
        Buffer b[5];
        validate_adam_tensor(fn, i, true, item(params, i), item(grads, i), item(exp_avgs, i), item(exp_avg_sqs, i),
                             has_max ? item(max_exp_avg_sqs, i) : py::none(), h, false, ranges, b);
        const std::int64_t s = one_step ? common_step : check_step(item(steps, i), indexed(fn, "steps", i));
        if (b[0].dtype == DType::f32) batch.f32.push_back(adam_tensor<float>(b, s, &h));
        else batch.f64.push_back(adam_tensor<double>(b, s, &h));
    }
    check_no_overlap(ranges);
    batch.run();
}

// ----- the optimizers' whole-step entry points --------------------------------------

std::int64_t* check_steps_array(py::handle steps, const std::string& fn, std::size_t n) {
    if (!py::isinstance<py::array>(steps)) throw_type(fn + ": steps must be an int64 numpy array");
    auto a = py::reinterpret_borrow<py::array>(steps);
    if (a.dtype().num() != py::dtype::of<std::int64_t>().num() || !(a.flags() & py::array::c_style) || !a.writeable() ||
        static_cast<std::size_t>(a.size()) != n)
        throw_value(fn + ": steps must be a writeable C-contiguous int64 array with one entry per param");
    return static_cast<std::int64_t*>(a.mutable_data());
}

std::vector<std::size_t> group_of_tensors(py::handle group_sizes, std::size_t n_groups, std::size_t n, const std::string& fn) {
    std::vector<std::size_t> group_of;
    group_of.reserve(n);
    if (static_cast<std::size_t>(py::len(group_sizes)) != n_groups) throw_value(fn + ": one size per group expected");
    for (std::size_t g = 0; g < n_groups; ++g) {
        const auto size = py::cast<std::size_t>(item(group_sizes, g));
        group_of.insert(group_of.end(), size, g);
    }
    if (group_of.size() != n) throw_value(fn + ": group sizes do not add up to the number of params");
    return group_of;
}

// Optimizer.step: all groups in one call. Tensors whose grad is None are skipped
// (their step count is not advanced), as torch skips params whose .grad is None.
void adam_step_groups(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs, py::handle max_exp_avg_sqs,
                      py::handle steps, py::handle group_sizes, py::handle group_hypers) {
    static const std::string fn = "Adam.step()";
    const std::size_t n = check_list(params, fn, "params", 0, false);
    check_list(grads, fn, "grads", n, true);
    check_list(exp_avgs, fn, "exp_avgs", n, true);
    check_list(exp_avg_sqs, fn, "exp_avg_sqs", n, true);
    check_list(max_exp_avg_sqs, fn, "max_exp_avg_sqs", n, true);
    std::int64_t* step_counts = check_steps_array(steps, fn, n);
    const std::size_t n_groups = check_list(group_hypers, fn, "group_hypers", 0, false);
    std::vector<AdamHyperparams> hypers(n_groups);
    for (std::size_t g = 0; g < n_groups; ++g) {
        auto t = py::reinterpret_borrow<py::tuple>(item(group_hypers, g));
        if (t.size() != 7) throw_value(fn + ": bad group hyper-parameters");
        const std::string gfn = "Adam.step(): param_groups[" + std::to_string(g) + "]";
        hypers[g] = adam_hyper(gfn.c_str(), t[0], t[1], t[2], t[3], py::cast<bool>(t[4]), py::cast<bool>(t[5]), py::cast<bool>(t[6]));
    }
    const std::vector<std::size_t> group_of = group_of_tensors(group_sizes, n_groups, n, fn);

    std::vector<Range> ranges;
    ranges.reserve(5 * n);
    AdamBatch batch;
    std::vector<std::size_t> updated;
    updated.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
        Buffer b[5];
        const AdamHyperparams* h = &hypers[group_of[i]];
        if (!validate_adam_tensor(fn, i, true, item(params, i), item(grads, i), item(exp_avgs, i), item(exp_avg_sqs, i),
                                  item(max_exp_avg_sqs, i), *h, true, ranges, b))
            continue;
        const std::int64_t s = step_counts[i] + 1;
        if (b[0].dtype == DType::f32) batch.f32.push_back(adam_tensor<float>(b, s, h));
        else batch.f64.push_back(adam_tensor<double>(b, s, h));
        updated.push_back(i);
    }
    check_no_overlap(ranges);
    for (std::size_t i : updated) ++step_counts[i];
    batch.run();
}

// ----- SGD --------------------------------------------------------------------------

template <class T>
SgdTensor<T> sgd_tensor(const Buffer b[3], bool first_step, const SgdHyperparams* h) {
    SgdTensor<T> t;
    t.param = reinterpret_cast<T*>(b[0].data);
    t.grad = reinterpret_cast<const T*>(b[1].data);
    t.momentum_buffer = h->momentum != 0.0 ? reinterpret_cast<T*>(b[2].data) : nullptr;
    t.size = b[0].size;
    t.first_step = first_step;
    t.hyper = h;
    return t;
}

bool validate_sgd_tensor(const std::string& fn, std::size_t i, bool multi, py::handle param, py::handle grad, py::handle buffer,
                         const SgdHyperparams& h, bool allow_none_grad, std::vector<Range>& ranges, Buffer out[3]) {
    if (allow_none_grad && grad.is_none()) return false;
    static const Slot slots[3] = {kParam, kGrad, kMomentumBuffer};
    const py::handle handles[3] = {param, grad, buffer};
    const bool mom = check_optional(buffer, h.momentum != 0.0, ArgName{&fn, kMomentumBuffer, i, multi}, "momentum != 0");
    validate_tensor(fn, i, multi, handles, slots, mom ? 3 : 2, ranges, out);
    return true;
}

struct SgdBatch {
    std::vector<SgdTensor<float>> f32;
    std::vector<SgdTensor<double>> f64;
    void add(const Buffer b[3], bool first_step, const SgdHyperparams* h) {
        if (b[0].dtype == DType::f32) f32.push_back(sgd_tensor<float>(b, first_step, h));
        else f64.push_back(sgd_tensor<double>(b, first_step, h));
    }
    void run() {
        py::gil_scoped_release release;
        if (!f32.empty()) fastadam::sgd_step(f32.data(), f32.size());
        if (!f64.empty()) fastadam::sgd_step(f64.data(), f64.size());
    }
};

void sgd_step(py::handle param, py::handle grad, py::handle momentum_buffer, py::handle step, py::handle lr, py::handle momentum,
              py::handle dampening, py::handle weight_decay, bool nesterov, bool maximize) {
    static const std::string fn = "sgd_step()";
    const SgdHyperparams h = sgd_hyper("sgd_step()", lr, momentum, dampening, weight_decay, nesterov, maximize);
    const std::int64_t s = check_step(step, fn + ": step");
    std::vector<Range> ranges;
    Buffer b[3];
    validate_sgd_tensor(fn, 0, false, param, grad, momentum_buffer, h, false, ranges, b);
    check_no_overlap(ranges);
    SgdBatch batch;
    batch.add(b, s == 1, &h);
    batch.run();
}

void sgd_step_groups(py::handle params, py::handle grads, py::handle momentum_buffers, py::handle steps, py::handle group_sizes,
                     py::handle group_hypers) {
    static const std::string fn = "SGD.step()";
    const std::size_t n = check_list(params, fn, "params", 0, false);
    check_list(grads, fn, "grads", n, true);
    check_list(momentum_buffers, fn, "momentum_buffers", n, true);
    std::int64_t* step_counts = check_steps_array(steps, fn, n);
    const std::size_t n_groups = check_list(group_hypers, fn, "group_hypers", 0, false);
    std::vector<SgdHyperparams> hypers(n_groups);
    for (std::size_t g = 0; g < n_groups; ++g) {
        auto t = py::reinterpret_borrow<py::tuple>(item(group_hypers, g));
        if (t.size() != 6) throw_value(fn + ": bad group hyper-parameters");
        const std::string gfn = "SGD.step(): param_groups[" + std::to_string(g) + "]";
        hypers[g] = sgd_hyper(gfn.c_str(), t[0], t[1], t[2], t[3], py::cast<bool>(t[4]), py::cast<bool>(t[5]));
    }
    const std::vector<std::size_t> group_of = group_of_tensors(group_sizes, n_groups, n, fn);
    std::vector<Range> ranges;
    ranges.reserve(3 * n);
    SgdBatch batch;
    std::vector<std::size_t> updated;
    for (std::size_t i = 0; i < n; ++i) {
        Buffer b[3];
        const SgdHyperparams* h = &hypers[group_of[i]];
        if (!validate_sgd_tensor(fn, i, true, item(params, i), item(grads, i), item(momentum_buffers, i), *h, true, ranges, b))
            continue;
        batch.add(b, step_counts[i] == 0, h);
        updated.push_back(i);
    }
    check_no_overlap(ranges);
    for (std::size_t i : updated) ++step_counts[i];
    batch.run();
}

// Optimizer construction: every param is a writeable float array and no two share memory.
void check_params(py::handle params, const std::string& fn) {
    const std::size_t n = check_list(params, fn, "params", 0, false);
    std::vector<Range> ranges;
    ranges.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
        const ArgName arg{&fn, kParam, i, true};
        ranges.push_back(range_of(check_array(item(params, i), arg, true), arg));
    }
    check_no_overlap(ranges);
}

fastadam::Isa isa_arg(const std::string& name) {
    try {
        return fastadam::isa_from_name(name);
    } catch (const std::invalid_argument& e) {
        throw_value(e.what());
    }
}


const char* const kAdamStepDoc = R"doc(adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None, maximize=False)

One Adam step, in place: updates param, exp_avg, exp_avg_sq (and max_exp_avg_sq with
amsgrad) and returns None. Bit-identical to fastadam.reference.adam_step.

Per element, T the arrays' dtype, t = step (the 1-based count of this update)::

    g = -grad if maximize else grad
    p = p * T(1 - lr*weight_decay)                 # decoupled_weight_decay (AdamW)
    g = g + T(weight_decay) * p                    # otherwise, if weight_decay != 0 (L2)
    m = m + T(1 - beta1) * (g - m)
    v = v * T(beta2) + T(1 - beta2) * g * g
    v_max = maximum(v_max, v)                      # amsgrad
    denom = sqrt(v_max or v) / T(sqrt(1 - beta2**t)) + T(eps)
    p = p - T(lr / (1 - beta1**t)) * m / denom

Units: lr in parameter units per step, eps in gradient units.

All arrays: numpy.ndarray, float32 or float64 (one dtype), C-contiguous, aligned, same
shape; the written ones writeable and not overlapping each other or grad. Nothing is
converted or copied: anything else raises TypeError/ValueError before any write.
Hyper-parameters: lr, eps, weight_decay >= 0 and finite; betas in [0, 1); step >= 1.
)doc";

const char* const kAdamStepMultiDoc = R"doc(adam_step_multi(params, grads, exp_avgs, exp_avg_sqs, *, steps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sqs=None, maximize=False)

Adam steps on many tensors in one native call: lists of arrays, one entry per tensor
(float32 and float64 tensors may mix), ``steps`` an int for all or one int per tensor.
Every array is validated before any is written; then the GIL is released once and the
elements of all tensors are split across threads. Same formula and rules as adam_step.
)doc";

const char* const kSgdStepDoc = R"doc(sgd_step(param, grad, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)

One SGD step in place, torch.optim.SGD semantics; bit-identical to
fastadam.reference.sgd_step. Per element::

    g = -grad if maximize else grad
    g = g + T(weight_decay) * p                      # weight_decay != 0
    buf = g                                          # momentum != 0 and step == 1
    buf = buf * T(momentum) + T(1 - dampening) * g   # momentum != 0 and step > 1
    g = g + T(momentum) * buf if nesterov else buf   # momentum != 0
    p = p - T(lr) * g

momentum_buffer is required exactly when momentum != 0. Same array rules as adam_step.
)doc";

}  // namespace

PYBIND11_MODULE(_core, m, py::mod_gil_not_used()) {
    m.doc() = "fastadam's native kernels: argument checking and dispatch (see fastadam for the documented API).";

    m.def("adam_step", &adam_step, py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::kw_only(),
          py::arg("step"), py::arg("lr") = 1e-3, py::arg("betas") = py::make_tuple(0.9, 0.999), py::arg("eps") = 1e-8,
          py::arg("weight_decay") = 0.0, py::arg("decoupled_weight_decay") = false, py::arg("amsgrad") = false,
          py::arg("max_exp_avg_sq") = py::none(), py::arg("maximize") = false, kAdamStepDoc);
    m.def("adam_step_multi", &adam_step_multi, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
          py::kw_only(), py::arg("steps"), py::arg("lr") = 1e-3, py::arg("betas") = py::make_tuple(0.9, 0.999),
          py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0, py::arg("decoupled_weight_decay") = false,
          py::arg("amsgrad") = false, py::arg("max_exp_avg_sqs") = py::none(), py::arg("maximize") = false, kAdamStepMultiDoc);
    m.def("sgd_step", &sgd_step, py::arg("param"), py::arg("grad"), py::arg("momentum_buffer") = py::none(), py::kw_only(),
          py::arg("step"), py::arg("lr"), py::arg("momentum") = 0.0, py::arg("dampening") = 0.0, py::arg("weight_decay") = 0.0,
          py::arg("nesterov") = false, py::arg("maximize") = false, kSgdStepDoc);
    m.def("_adam_step_groups", &adam_step_groups);
    m.def("_check_params", [](py::handle params, const std::string& fn) { check_params(params, fn); });
    m.def("_check_adam_group", [](py::tuple t, const std::string& fn) {
        adam_hyper(fn.c_str(), t[0], t[1], t[2], t[3], py::cast<bool>(t[4]), py::cast<bool>(t[5]), py::cast<bool>(t[6]));
    });
    m.def("_check_sgd_group", [](py::tuple t, const std::string& fn) {
        sgd_hyper(fn.c_str(), t[0], t[1], t[2], t[3], py::cast<bool>(t[4]), py::cast<bool>(t[5]));
    });
    m.def("_sgd_step_groups", &sgd_step_groups);

    m.def("available_isas", [] {
        py::list out;
        for (auto isa : fastadam::available_isas()) out.append(fastadam::isa_name(isa));
        return py::tuple(out);
    }, "The SIMD paths this build carries and this CPU can run, best last: a tuple of 'baseline', 'avx2', 'avx512'.");
    m.def("get_isa", [] { return std::string(fastadam::isa_name(fastadam::get_isa())); },
          "The SIMD path in use: the best available unless set_isa() or $FASTADAM_ISA chose another.");
    m.def("set_isa", [](const std::string& name) {
        try {
            fastadam::set_isa(isa_arg(name));
        } catch (const std::invalid_argument& e) {
            throw_value(e.what());
        }
    }, py::arg("name"), "Use the SIMD path `name` ('baseline', 'avx2', 'avx512'); ValueError if this CPU lacks it. Results are bit-identical on every path.");
    m.def("_set_isa_from_environment", [] {
        try {
            fastadam::set_isa_from_environment();
        } catch (const std::invalid_argument& e) {
            throw_value(e.what());
        }
    });
    m.def("set_num_threads", [](int n) {
        if (n < 0) throw_value("set_num_threads(): n must be >= 1, or 0 to restore the default");
        fastadam::set_num_threads(n);
    }, py::arg("n"), "Use at most n OpenMP threads per step (n >= 1), or 0 to follow OpenMP's default (OMP_NUM_THREADS, else all cores). Results are bit-identical for every n.");
    m.def("get_num_threads", &fastadam::get_num_threads, "The number of threads a large step uses.");
    m.def("has_openmp", &fastadam::has_openmp, "Whether this build has OpenMP (else every step runs on one thread).");
    m.attr("min_elements_per_thread") = fastadam::kMinElementsPerThread;
}
