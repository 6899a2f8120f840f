// fastadam._core: argument checking and dispatch only; the math is in
// cpp/include/fastadam/kernels.hpp.
//
// Every buffer is taken as it is, never converted: a strided, Fortran-order,
// read-only, misaligned, byte-swapped or wrongly typed array, or a list, raises
// before the first byte of any buffer of the step is written.
//
// The public step functions are METH_FASTCALL functions with their own keyword
// parser: pybind11's generic dispatcher builds a Python string per keyword per call,
// which alone costs more than an Adam step on a thousand elements.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "fastadam/fastadam.hpp"
#define FASTADAM_CAPI_NO_IMPORT  // this module exports the table; it does not import it
#include "fastadam/capi.hpp"

namespace py = pybind11;
using fastadam::AdamHyperparams;
using fastadam::AdamTensor;
using fastadam::SgdHyperparams;
using fastadam::SgdTensor;

namespace {

// ----- errors and names ------------------------------------------------------------

[[noreturn]] void throw_type(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] void throw_value(const std::string& msg) { throw py::value_error(msg); }

std::string type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

const char* const kSingular[] = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step", "steps"};
const char* const kPlural[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers", "steps", "steps"};
enum Slot { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMomentumBuffer, kStep, kSteps /* one int for all tensors */ };

// Names an argument as the user wrote it ("adam_step(): grad", "adam_step_multi():
// grads[3]"). Built only when an error needs it: strings are off the hot path.
struct ArgName {
    const char* fn;
    Slot slot;
    std::size_t index;
    bool multi;
    std::string str() const { return std::string(fn) + ": " + bare(); }
    // Without the function, for a second argument in one message.
    std::string bare() const { return multi ? std::string(kPlural[slot]) + "[" + std::to_string(index) + "]" : kSingular[slot]; }
};

// ----- arrays ----------------------------------------------------------------------

enum class DType { f32, f64 };
const char* dtype_name(DType d) { return d == DType::f32 ? "float32" : "float64"; }

// A validated array: where it is, how big, what type.
struct Buffer {
    char* data = nullptr;
    std::int64_t size = 0;
    std::int64_t nbytes = 0;
    DType dtype = DType::f32;
    PyObject* obj = nullptr;  // borrowed; the caller's arguments keep it alive
};

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += std::to_string(a.shape(i)) + (a.ndim() == 1 || i + 1 < a.ndim() ? "," : "");
    return s + ")";
}

bool native_byte_order(char order) {
    static const bool little_endian = [] {
        const std::uint16_t probe = 1;
        unsigned char first;
        std::memcpy(&first, &probe, 1);
        return first == 1;
    }();
    return order != (little_endian ? '>' : '<');
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
                   "; fastadam supports float32 and float64 (a parameter, its gradient and its state share one dtype)");
    if (!native_byte_order(dt.byteorder()))
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
    if (b.dtype != ref.dtype)
        throw_type(arg.str() + " has dtype " + dtype_name(b.dtype) + " but " + ref_arg.bare() + " has dtype " +
                   dtype_name(ref.dtype) + "; a parameter, its gradient and its state must share one dtype");
    auto a = py::reinterpret_borrow<py::array>(b.obj), r = py::reinterpret_borrow<py::array>(ref.obj);
    bool same = a.ndim() == r.ndim();
    for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == r.shape(i);
    if (!same)
        throw_value(arg.str() + " has shape " + shape_str(a) + " but " + ref_arg.bare() + " has shape " + shape_str(r) +
                    "; they must have the same shape");
}

// ----- overlap ---------------------------------------------------------------------

// The memory a step touches. A written buffer may share no byte with any other
// buffer of the step; gradients are only read, so tensors may share one gradient.
class Footprint {
public:
    Footprint(const char* fn, bool multi, std::size_t capacity) : fn_(fn), multi_(multi) { written_.reserve(capacity); }

    void add(const Buffer& b, Slot slot, std::size_t tensor) {
        if (b.nbytes == 0) return;
        const auto begin = reinterpret_cast<std::uintptr_t>(b.data);
        (slot == kGrad ? read_ : written_).push_back(Range{begin, begin + static_cast<std::uintptr_t>(b.nbytes), tensor, slot});
    }

    // Sort + sweep over the written buffers, O(n log n); then a binary search per
    // gradient. Repeated calls with the same written buffers (a loop calling
    // adam_step_multi on the same state) reuse the previous call's sorted set.
    void check() const { check_reads(sorted_written(), read_); }

    // For a StepPlan: verify the written buffers once, then check each step's
    // gradients against them as they arrive.
    void freeze() { frozen_ = sorted_written(); }
    void check_read_against_frozen(const Buffer& b, std::size_t tensor) const {
        if (b.nbytes == 0) return;
        const auto begin = reinterpret_cast<std::uintptr_t>(b.data);
        check_read(frozen_, Range{begin, begin + static_cast<std::uintptr_t>(b.nbytes), tensor, kGrad});
    }

private:
    struct Range {
        std::uintptr_t begin, end;
        std::size_t tensor;
        Slot slot;
        bool operator==(const Range& o) const { return begin == o.begin && end == o.end; }
    };

    void check_reads(const std::vector<Range>& sorted, const std::vector<Range>& reads) const {
        for (const Range& r : reads) check_read(sorted, r);
    }

    // The written ranges are sorted and disjoint, so only the last one starting
    // before r ends can overlap r. The search is branch-free: on a 1000-tensor
    // model, mispredicted branches of std::upper_bound cost more than the update.
    void check_read(const std::vector<Range>& sorted, const Range& r) const {
        if (sorted.empty()) return;
        const Range* base = sorted.data();
        for (std::size_t n = sorted.size(); n > 1; n -= n / 2) base = base[n / 2].begin < r.end ? base + n / 2 : base;
        if (base->begin < r.end && base->end > r.begin) overlap(*base, r);
    }

    const std::vector<Range>& sorted_written() const {
        static thread_local std::vector<Range> last_key, last_sorted;  // no overlap among last_key
        if (written_ == last_key) return last_sorted;
        std::vector<Range> sorted = written_;
        std::sort(sorted.begin(), sorted.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
        for (std::size_t i = 1; i < sorted.size(); ++i)
            if (sorted[i].begin < sorted[i - 1].end) overlap(sorted[i - 1], sorted[i]);
        last_key = written_;
        last_sorted = std::move(sorted);
        return last_sorted;
    }

    [[noreturn]] void overlap(const Range& a, const Range& b) const {
        throw_value(ArgName{fn_, a.slot, a.tensor, multi_}.str() + " and " + ArgName{fn_, b.slot, b.tensor, multi_}.bare() +
                    " share memory; every written buffer (param, exp_avg, exp_avg_sq, max_exp_avg_sq, "
                    "momentum_buffer) must be its own array, and no gradient may overlap one");
    }

    const char* fn_;
    bool multi_;
    std::vector<Range> written_, read_, frozen_;
};

// ----- scalars ---------------------------------------------------------------------

double check_real(py::handle h, const char* fn, const char* name) {
    PyObject* o = h.ptr();
    if (PyBool_Check(o) || PyComplex_Check(o) || !(PyFloat_Check(o) || PyLong_Check(o) || PyNumber_Check(o)))
        throw_type(std::string(fn) + ": " + name + " must be a real number, got " + type_name(h));
    const double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw_type(std::string(fn) + ": " + name + " must be a real number, got " + type_name(h));
    }
    if (!std::isfinite(v)) throw_value(std::string(fn) + ": " + name + " must be finite, got " + std::string(py::repr(h)));
    return v;
}

double check_nonnegative(py::handle h, const char* fn, const char* name) {
    const double v = check_real(h, fn, name);
    if (v < 0) throw_value(std::string(fn) + ": " + name + " must be >= 0, got " + std::string(py::repr(h)));
    return v;
}

bool check_bool(py::handle h, const char* fn, const char* name) {
    if (h.ptr() == Py_True) return true;
    if (h.ptr() == Py_False) return false;
    const char* type = Py_TYPE(h.ptr())->tp_name;
    if (std::strcmp(type, "numpy.bool") == 0 || std::strcmp(type, "numpy.bool_") == 0) return PyObject_IsTrue(h.ptr()) == 1;
    throw_type(std::string(fn) + ": " + name + " must be True or False, got " + std::string(py::repr(h)));
}

std::int64_t check_step(py::handle h, const ArgName& arg) {
    PyObject* o = h.ptr();
    if (PyBool_Check(o) || PyFloat_Check(o) || !PyIndex_Check(o))
        throw_type(arg.str() + " must be an integer (the 1-based count of this update), got " + type_name(h));
    int overflow = 0;
    long long v = PyLong_Check(o) ? PyLong_AsLongLongAndOverflow(o, &overflow) : 0;
    if (!PyLong_Check(o)) {
        py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
        if (!index) throw py::error_already_set();
        v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    }
    if (overflow != 0) throw_value(arg.str() + " is out of range");
    if (v < 1) throw_value(arg.str() + " must be >= 1 (the count of this update, starting at 1), got " + std::to_string(v));
    return static_cast<std::int64_t>(v);
}

// Hyper-parameters as handles in a fixed order; a null handle takes the default.
enum AdamKey { kLr, kBetas, kEps, kWeightDecay, kDecoupled, kAmsgrad, kMaximize, kAdamKeys };

AdamHyperparams adam_hyper(const char* fn, const py::handle* v) {
    AdamHyperparams h;
    if (v[kLr]) h.lr = check_nonnegative(v[kLr], fn, "lr");
    if (v[kEps]) h.eps = check_nonnegative(v[kEps], fn, "eps");
    if (v[kWeightDecay]) h.weight_decay = check_nonnegative(v[kWeightDecay], fn, "weight_decay");
    if (v[kBetas]) {
        PyObject* b = v[kBetas].ptr();
        if (!(PyTuple_Check(b) || PyList_Check(b)) || Py_SIZE(b) != 2)
            throw_type(std::string(fn) + ": betas must be a pair (beta1, beta2), got " + std::string(py::repr(v[kBetas])));
        h.beta1 = check_real(PySequence_Fast_GET_ITEM(b, 0), fn, "betas[0]");
        h.beta2 = check_real(PySequence_Fast_GET_ITEM(b, 1), fn, "betas[1]");
        for (double beta : {h.beta1, h.beta2})
            if (!(beta >= 0.0 && beta < 1.0))
                throw_value(std::string(fn) + ": betas must lie in [0, 1), got " + std::string(py::repr(v[kBetas])));
    }
    if (v[kDecoupled]) h.decoupled_weight_decay = check_bool(v[kDecoupled], fn, "decoupled_weight_decay");
    if (v[kAmsgrad]) h.amsgrad = check_bool(v[kAmsgrad], fn, "amsgrad");
    if (v[kMaximize]) h.maximize = check_bool(v[kMaximize], fn, "maximize");
    return h;
}

enum SgdKey { kSgdLr, kMomentum, kDampening, kSgdWeightDecay, kNesterov, kSgdMaximize, kSgdKeys };

SgdHyperparams sgd_hyper(const char* fn, const py::handle* v) {
    SgdHyperparams h;
    if (!v[kSgdLr]) throw_type(std::string(fn) + ": missing required argument lr");
    h.lr = check_nonnegative(v[kSgdLr], fn, "lr");
    if (v[kMomentum]) h.momentum = check_nonnegative(v[kMomentum], fn, "momentum");
    if (v[kDampening]) h.dampening = check_real(v[kDampening], fn, "dampening");
    if (v[kSgdWeightDecay]) h.weight_decay = check_nonnegative(v[kSgdWeightDecay], fn, "weight_decay");
    if (v[kNesterov]) h.nesterov = check_bool(v[kNesterov], fn, "nesterov");
    if (v[kSgdMaximize]) h.maximize = check_bool(v[kSgdMaximize], fn, "maximize");
    if (h.nesterov && (h.momentum <= 0 || h.dampening != 0))
        throw_value(std::string(fn) + ": nesterov=True requires momentum > 0 and dampening = 0");
    return h;
}

// ----- lists of tensors ------------------------------------------------------------

py::handle item(py::handle seq, std::size_t i) { return PySequence_Fast_GET_ITEM(seq.ptr(), static_cast<Py_ssize_t>(i)); }

std::size_t check_list(py::handle seq, const char* fn, const char* name, std::size_t expected, bool has_expected,
                       const char* what = "numpy arrays") {
    if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr()))
        throw_type(std::string(fn) + ": " + name + " must be a list or tuple of " + what + ", got " + type_name(seq));
    const auto n = static_cast<std::size_t>(Py_SIZE(seq.ptr()));
    if (has_expected && n != expected)
        throw_value(std::string(fn) + ": " + name + " has " + std::to_string(n) + " entries but params has " + std::to_string(expected));
    return n;
}

// Validates tensor i's arrays, `handles` in `slots` order (param first: the reference
// for dtype and shape; then grad; then written state), and records their memory.
void validate_tensor(const char* fn, std::size_t i, bool multi, const py::handle* handles, const Slot* slots, int n,
                     Footprint& footprint, Buffer* out) {
    const ArgName param_name{fn, slots[0], i, multi};
    for (int k = 0; k < n; ++k) {
        const ArgName arg{fn, slots[k], i, multi};
        out[k] = check_array(handles[k], arg, slots[k] != kGrad);
        if (k > 0) check_same_shape(out[k], out[0], arg, param_name);
    }
    for (int k = 0; k < n; ++k) footprint.add(out[k], slots[k], i);
}

// An optional state buffer (max_exp_avg_sq, momentum_buffer): required exactly when
// `needed`. Returns whether it takes part.
bool check_optional(py::handle h, bool needed, const ArgName& arg, const char* when) {
    if (needed && h.is_none())
        throw_value(arg.str() + " is required with " + when + ": pass an array of zeros shaped like param, kept across steps");
    if (!needed && !h.is_none()) throw_value(arg.str() + " is only used with " + when + "; pass None");
    return needed;
}

// ----- kernel descriptors of the one-shot calls (StepPlan keeps its own: Kept) -------

// buffers: param, grad, then the state in slot order (Adam: exp_avg, exp_avg_sq,
// max_exp_avg_sq; SGD: momentum_buffer); unused state may be null. They fill the
// descriptor where it lives: returning it by value made GCC assemble it on the stack
// from 8-byte stores and copy it with 16-byte loads, a store-forwarding stall per tensor.
template <class T>
void set_tensor(AdamTensor<T>& t, char* const* buffers, std::int64_t size, std::int64_t step, const AdamHyperparams* h) {
    t.param = reinterpret_cast<T*>(buffers[0]);
    t.grad = reinterpret_cast<const T*>(buffers[1]);
    t.exp_avg = reinterpret_cast<T*>(buffers[2]);
    t.exp_avg_sq = reinterpret_cast<T*>(buffers[3]);
    t.max_exp_avg_sq = h->amsgrad ? reinterpret_cast<T*>(buffers[4]) : nullptr;
    t.size = size;
    t.step = step;
    t.hyper = h;
}

template <class T>
void set_tensor(SgdTensor<T>& t, char* const* buffers, std::int64_t size, bool first_step, const SgdHyperparams* h) {
    t.param = reinterpret_cast<T*>(buffers[0]);
    t.grad = reinterpret_cast<const T*>(buffers[1]);
    t.momentum_buffer = h->momentum != 0.0 ? reinterpret_cast<T*>(buffers[2]) : nullptr;
    t.size = size;
    t.first_step = first_step;
    t.hyper = h;
}

void kernel(const AdamTensor<float>* t, std::size_t n) { fastadam::adam_step(t, n); }
void kernel(const AdamTensor<double>* t, std::size_t n) { fastadam::adam_step(t, n); }
void kernel(const SgdTensor<float>* t, std::size_t n) { fastadam::sgd_step(t, n); }
void kernel(const SgdTensor<double>* t, std::size_t n) { fastadam::sgd_step(t, n); }
template <class T>
void kernel(const AdamTensor<T>* t, const T* const* grads, const std::int64_t* steps, std::size_t n) { fastadam::adam_step(t, grads, steps, n); }
template <class T>
void kernel(const SgdTensor<T>* t, const T* const* grads, const std::int64_t* steps, std::size_t n) { fastadam::sgd_step(t, grads, steps, n); }

// The validated tensors of one step, by dtype; run() releases the GIL once for both.
template <template <class> class Tensor>
struct Tensors {
    std::vector<Tensor<float>> f32;
    std::vector<Tensor<double>> f64;
    explicit Tensors(std::size_t n) { f32.reserve(n); }
    void clear() {
        f32.clear();
        f64.clear();
    }
    template <class... Args>
    void add(DType dtype, Args... args) {
        if (dtype == DType::f32) set_tensor(f32.emplace_back(), args...);
        else set_tensor(f64.emplace_back(), args...);
    }
    void run() {
        py::gil_scoped_release release;
        if (!f32.empty()) kernel(f32.data(), f32.size());
        if (!f64.empty()) kernel(f64.data(), f64.size());
    }
};

// A plan's descriptors, built once (kernel pointers that do not change between
// steps) and handed to the kernel with this step's gradients and counts beside them
// (fastadam.hpp): rewriting 64 bytes per tensor per step moved each descriptor's cache
// line between cores.
template <template <class> class Tensor>
struct Kept {
    std::vector<Tensor<float>> f32;
    std::vector<Tensor<double>> f64;
    std::vector<const float*> grads_f32;
    std::vector<const double*> grads_f64;
    std::vector<std::int64_t> steps_f32, steps_f64;
    bool built = false;

    // Adds tensor i's descriptor; returns its slot among tensors of its dtype.
    std::uint32_t add(DType dtype, const Tensor<float>& t32, const Tensor<double>& t64) {
        if (dtype == DType::f32) {
            f32.push_back(t32);
            grads_f32.push_back(nullptr);
            steps_f32.push_back(0);
            return static_cast<std::uint32_t>(f32.size() - 1);
        }
        f64.push_back(t64);
        grads_f64.push_back(nullptr);
        steps_f64.push_back(0);
        return static_cast<std::uint32_t>(f64.size() - 1);
    }
    // This step's gradient (nullptr: skip the tensor) and 1-based count for a slot.
    void set(DType dtype, std::uint32_t slot, const char* grad, std::int64_t step) {
        if (dtype == DType::f32) {
            grads_f32[slot] = reinterpret_cast<const float*>(grad);
            steps_f32[slot] = step;
        } else {
            grads_f64[slot] = reinterpret_cast<const double*>(grad);
            steps_f64[slot] = step;
        }
    }
    // Asks for this step's arrays in writable state ahead of set(): the workers read
    // them last step, and stores that each wait for a cache line from another core
    // ran one at a time.
    void prefetch_for_write() const {
        prefetch_lines(grads_f32.data(), grads_f32.size() * sizeof(grads_f32[0]));
        prefetch_lines(steps_f32.data(), steps_f32.size() * sizeof(steps_f32[0]));
        prefetch_lines(grads_f64.data(), grads_f64.size() * sizeof(grads_f64[0]));
        prefetch_lines(steps_f64.data(), steps_f64.size() * sizeof(steps_f64[0]));
    }
    static void prefetch_lines(const void* data, std::size_t bytes) {
        const char* p = static_cast<const char*>(data);
        for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1);
    }
    void run() {
        py::gil_scoped_release release;
        if (!f32.empty()) kernel(f32.data(), grads_f32.data(), steps_f32.data(), f32.size());
        if (!f64.empty()) kernel(f64.data(), grads_f64.data(), steps_f64.data(), f64.size());
    }
};

// ----- Adam ------------------------------------------------------------------------

// The validated tensors of one step, written only by run().
struct AdamBatch {
    const char* fn;
    bool multi;
    Footprint footprint;
    Tensors<AdamTensor> tensors;

    AdamBatch(const char* fn, bool multi, std::size_t n) : fn(fn), multi(multi), footprint(fn, multi, 4 * n), tensors(n) {}

    // Returns false for a tensor to skip (grad is None, where allowed).
    bool add(std::size_t i, const py::handle arrays[5], std::int64_t step, const AdamHyperparams* h, bool allow_none_grad) {
        if (allow_none_grad && arrays[1].is_none()) return false;
        static const Slot slots[5] = {kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq};
        const bool ams = check_optional(arrays[4], h->amsgrad, ArgName{fn, kMaxExpAvgSq, i, multi}, "amsgrad=True");
        Buffer b[5];
        validate_tensor(fn, i, multi, arrays, slots, ams ? 5 : 4, footprint, b);
        char* const buffers[5] = {b[0].data, b[1].data, b[2].data, b[3].data, b[4].data};
        tensors.add(b[0].dtype, buffers, b[0].size, step, h);
        return true;
    }
    // Every array is validated: check overlaps, then write.
    void run() {
        footprint.check();
        tensors.run();
    }
};

// ----- SGD -------------------------------------------------------------------------

struct SgdBatch {
    const char* fn;
    bool multi;
    Footprint footprint;
    Tensors<SgdTensor> tensors;

    SgdBatch(const char* fn, bool multi, std::size_t n) : fn(fn), multi(multi), footprint(fn, multi, 2 * n), tensors(n) {}

    bool add(std::size_t i, const py::handle arrays[3], bool first_step, const SgdHyperparams* h, bool allow_none_grad) {
        if (allow_none_grad && arrays[1].is_none()) return false;
        static const Slot slots[3] = {kParam, kGrad, kMomentumBuffer};
        const bool mom = check_optional(arrays[2], h->momentum != 0.0, ArgName{fn, kMomentumBuffer, i, multi}, "momentum != 0");
        Buffer b[3];
        validate_tensor(fn, i, multi, arrays, slots, mom ? 3 : 2, footprint, b);
        char* const buffers[3] = {b[0].data, b[1].data, b[2].data};
        tensors.add(b[0].dtype, buffers, b[0].size, first_step, h);
        return true;
    }
    void run() {
        footprint.check();
        tensors.run();
    }
};

// ----- a keyword parser for METH_FASTCALL functions ---------------------------------

// Fills out[i] with argument i (or a null handle when absent). The first
// `positional` names may be given by position; the rest are keyword-only. Keyword
// names from call sites are interned strings, so pointer comparison finds them.
void parse_args(const char* fn, const char* const* names, int count, int positional, int required_positional,
                PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, py::handle* out) {
    static thread_local std::vector<std::pair<const char* const*, std::vector<PyObject*>>> cache;
    std::vector<PyObject*>* interned = nullptr;
    for (auto& entry : cache)
        if (entry.first == names) interned = &entry.second;
    if (interned == nullptr) {
        cache.emplace_back(names, std::vector<PyObject*>());
        interned = &cache.back().second;
        for (int i = 0; i < count; ++i) interned->push_back(PyUnicode_InternFromString(names[i]));
    }
    for (int i = 0; i < count; ++i) out[i] = py::handle();
    if (nargs > positional)
        throw_type(std::string(fn) + " takes " + std::to_string(positional) + " positional arguments but " + std::to_string(nargs) +
                   " were given; the hyper-parameters are keyword-only");
    for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
    const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; ++k) {
        PyObject* key = PyTuple_GET_ITEM(kwnames, k);
        int found = -1;
        for (int i = 0; i < count && found < 0; ++i)
            if ((*interned)[i] == key) found = i;
        for (int i = 0; i < count && found < 0; ++i)
            if (PyUnicode_Compare((*interned)[i], key) == 0) found = i;
        if (found < 0) throw_type(std::string(fn) + " got an unexpected keyword argument '" + py::str(key).cast<std::string>() + "'");
        if (out[found]) throw_type(std::string(fn) + " got multiple values for argument '" + names[found] + "'");
        out[found] = args[nargs + k];
    }
    for (int i = 0; i < required_positional; ++i)
        if (!out[i]) throw_type(std::string(fn) + " missing required argument '" + names[i] + "'");
}

// Runs `body` and turns C++ exceptions into Python ones, for METH_FASTCALL entry points.
template <class Body>
PyObject* guarded(Body&& body) {
    try {
        body();
        Py_RETURN_NONE;
    } catch (py::error_already_set& e) {
        e.restore();
    } catch (const py::builtin_exception& e) {
        e.set_error();
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return nullptr;
}

py::handle none_if_null(py::handle h) { return h ? h : py::handle(Py_None); }

// adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay,
//           decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize)
PyObject* adam_step(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return guarded([&] {
        static const char* const names[] = {"param", "grad", "exp_avg", "exp_avg_sq", "step", "lr", "betas", "eps",
                                            "weight_decay", "decoupled_weight_decay", "amsgrad", "max_exp_avg_sq", "maximize"};
        constexpr const char* fn = "adam_step()";
        py::handle a[13];
        parse_args(fn, names, 13, 4, 4, args, nargs, kwnames, a);
        if (!a[4]) throw_type("adam_step() missing required keyword argument 'step' (the 1-based count of this update)");
        const py::handle hyper[kAdamKeys] = {a[5], a[6], a[7], a[8], a[9], a[10], a[12]};
        const AdamHyperparams h = adam_hyper(fn, hyper);
        const std::int64_t step = check_step(a[4], ArgName{fn, kStep, 0, false});
        const py::handle arrays[5] = {a[0], a[1], a[2], a[3], none_if_null(a[11])};
        AdamBatch batch(fn, false, 1);
        batch.add(0, arrays, step, &h, false);
        batch.run();
    });
}

// adam_step_multi(params, grads, exp_avgs, exp_avg_sqs, *, steps, <adam_step's hyper-parameters>,
//                 max_exp_avg_sqs, ...)
PyObject* adam_step_multi(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return guarded([&] {
        static const char* const names[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "lr", "betas", "eps",
                                            "weight_decay", "decoupled_weight_decay", "amsgrad", "max_exp_avg_sqs", "maximize"};
        constexpr const char* fn = "adam_step_multi()";
        py::handle a[13];
        parse_args(fn, names, 13, 4, 4, args, nargs, kwnames, a);
        if (!a[4]) throw_type("adam_step_multi() missing required keyword argument 'steps' (an int, or one int per tensor)");
        const py::handle hyper[kAdamKeys] = {a[5], a[6], a[7], a[8], a[9], a[10], a[12]};
        const AdamHyperparams h = adam_hyper(fn, hyper);
        const std::size_t n = check_list(a[0], fn, "params", 0, false);
        check_list(a[1], fn, "grads", n, true);
        check_list(a[2], fn, "exp_avgs", n, true);
        check_list(a[3], fn, "exp_avg_sqs", n, true);
        const py::handle maxes = none_if_null(a[11]);
        if (!maxes.is_none()) check_list(maxes, fn, "max_exp_avg_sqs", n, true);
        if (h.amsgrad == maxes.is_none())
            throw_value(std::string(fn) + (h.amsgrad ? ": max_exp_avg_sqs is required with amsgrad=True (one zero-initialised array per param)"
                                                     : ": max_exp_avg_sqs is only used with amsgrad=True; pass None"));
        const py::handle steps = a[4];
        const bool per_tensor = PyList_Check(steps.ptr()) || PyTuple_Check(steps.ptr());
        if (per_tensor) check_list(steps, fn, "steps", n, true, "ints");
        const std::int64_t common_step = per_tensor ? 0 : check_step(steps, ArgName{fn, kSteps, 0, false});
        AdamBatch batch(fn, true, n);
        for (std::size_t i = 0; i < n; ++i) {
            const py::handle arrays[5] = {item(a[0], i), item(a[1], i), item(a[2], i), item(a[3], i),
                                          maxes.is_none() ? maxes : item(maxes, i)};
            const std::int64_t step = per_tensor ? check_step(item(steps, i), ArgName{fn, kStep, i, true}) : common_step;
            batch.add(i, arrays, step, &h, false);
        }
        batch.run();
    });
}

// sgd_step(param, grad, momentum_buffer=None, *, step, lr, momentum, dampening, weight_decay, nesterov, maximize)
PyObject* sgd_step(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return guarded([&] {
        static const char* const names[] = {"param", "grad", "momentum_buffer", "step", "lr", "momentum", "dampening",
                                            "weight_decay", "nesterov", "maximize"};
        constexpr const char* fn = "sgd_step()";
        py::handle a[10];
        parse_args(fn, names, 10, 3, 2, args, nargs, kwnames, a);
        if (!a[3]) throw_type("sgd_step() missing required keyword argument 'step' (the 1-based count of this update)");
        const py::handle hyper[kSgdKeys] = {a[4], a[5], a[6], a[7], a[8], a[9]};
        const SgdHyperparams h = sgd_hyper(fn, hyper);
        const std::int64_t step = check_step(a[3], ArgName{fn, kStep, 0, false});
        const py::handle arrays[3] = {a[0], a[1], none_if_null(a[2])};
        SgdBatch batch(fn, false, 1);
        batch.add(0, arrays, step == 1, &h, false);
        batch.run();
    });
}

// ----- the optimizers' whole-step entry points (private, positional) ----------------

std::int64_t* check_steps_array(py::handle steps, const char* fn, std::size_t n) {
    if (!py::isinstance<py::array>(steps)) throw_type(std::string(fn) + ": internal step counts must be an int64 array");
    auto a = py::reinterpret_borrow<py::array>(steps);
    if (a.dtype().num() != py::dtype::of<std::int64_t>().num() || !(a.flags() & py::array::c_style) || !a.writeable() ||
        static_cast<std::size_t>(a.size()) != n)
        throw_value(std::string(fn) + ": internal step counts must be a writeable C-contiguous int64 array, one per param");
    return static_cast<std::int64_t*>(a.mutable_data());
}

// Group g's hyper-parameters (a tuple in the kernel's key order) for each tensor.
template <class Hyper, class Parse>
std::vector<Hyper> group_hypers(py::handle hypers, std::size_t keys, const std::string& fn, Parse parse) {
    const std::size_t n_groups = check_list(hypers, fn.c_str(), "group_hypers", 0, false, "tuples");
    std::vector<Hyper> out(n_groups);
    for (std::size_t g = 0; g < n_groups; ++g) {
        py::handle t = item(hypers, g);
        if (!PyTuple_Check(t.ptr()) || static_cast<std::size_t>(PyTuple_GET_SIZE(t.ptr())) != keys)
            throw_value(fn + ": internal error: bad group hyper-parameters");
        std::vector<py::handle> v(keys);
        for (std::size_t k = 0; k < keys; ++k) v[k] = PyTuple_GET_ITEM(t.ptr(), k);
        const std::string where = fn + ": param_groups[" + std::to_string(g) + "]";
        out[g] = parse(where.c_str(), v.data());
    }
    return out;
}

std::vector<std::size_t> group_of_tensors(py::handle group_sizes, std::size_t n_groups, std::size_t n, const char* fn) {
    std::vector<std::size_t> group_of;
    group_of.reserve(n);
    if (static_cast<std::size_t>(py::len(group_sizes)) != n_groups) throw_value(std::string(fn) + ": internal error: one size per group expected");
    for (std::size_t g = 0; g < n_groups; ++g) group_of.insert(group_of.end(), py::cast<std::size_t>(item(group_sizes, g)), g);
    if (group_of.size() != n) throw_value(std::string(fn) + ": internal error: group sizes do not add up");
    return group_of;
}

// An optimizer's params and state, validated once and kept between steps (the
// optimizer rebuilds it whenever its params or state change). A step then checks
// what the caller can change: the gradients, and that each param is still the
// writeable buffer it was. Touching five arrays per tensor per step would cost more
// than the update itself on a model of many small tensors.
class StepPlan {
public:
    // states: one list per state slot (Adam: exp_avgs, exp_avg_sqs, max_exp_avg_sqs;
    // SGD: momentum_buffers), None where a tensor has no such buffer yet.
    StepPlan(std::string fn, py::list params, py::list states, py::list group_sizes)
        : fn_(std::move(fn)), params_(params), states_(states), n_groups_(group_sizes.size()),
          footprint_(fn_.c_str(), true, 4 * params.size()) {
        const char* fn_c = fn_.c_str();
        const std::size_t n = check_list(params, fn_c, "params", 0, false);
        for (std::size_t k = 0; k < states.size(); ++k) check_list(states[k], fn_c, "states", n, true);
        static const Slot state_slots[3] = {kExpAvg, kExpAvgSq, kMaxExpAvgSq};
        const bool sgd = states.size() == 1;
        entries_.resize(n);
        for (std::size_t i = 0; i < n; ++i) {
            Entry& e = entries_[i];
            const ArgName param_name{fn_c, kParam, i, true};
            const Buffer p = check_array(item(params, i), param_name, true);
            footprint_.add(p, kParam, i);
            e.param = p;
            auto a = py::reinterpret_borrow<py::array>(p.obj);
            e.shape_begin = shapes_.size();
            for (py::ssize_t d = 0; d < a.ndim(); ++d) shapes_.push_back(a.shape(d));
            e.ndim = static_cast<int>(a.ndim());
            e.descr = py::reinterpret_borrow<py::object>(py::detail::array_proxy(p.obj)->descr);
            for (std::size_t k = 0; k < states.size(); ++k) {
                py::handle h = item(states[k], i);
                if (h.is_none()) continue;
                const ArgName arg{fn_c, sgd ? kMomentumBuffer : state_slots[k], i, true};
                const Buffer b = check_array(h, arg, true);
                check_same_shape(b, p, arg, param_name);
                footprint_.add(b, arg.slot, i);
                e.state[k] = b.data;
            }
        }
        footprint_.freeze();  // params and state: no byte shared
        group_of_ = group_of_tensors(group_sizes, n_groups_, n, fn_c);
    }

    void adam_step(py::handle grads, py::handle steps, py::handle hypers_in) {
        const auto hypers = group_hypers<AdamHyperparams>(hypers_in, kAdamKeys, fn_, adam_hyper);
        const Busy busy(busy_, fn_);
        adam_kept_.prefetch_for_write();
        std::int64_t* step_counts = prepare(grads, steps, hypers.size());
        std::copy(hypers.begin(), hypers.end(), adam_hypers_.begin());  // in place: the kept descriptors point here
        if (!adam_kept_.built) build_kept(adam_kept_, adam_hypers_, [](auto& t, const Entry& e, const AdamHyperparams* h) {
            using T = std::remove_pointer_t<decltype(t.param)>;
            t.param = reinterpret_cast<T*>(e.param.data);
            t.exp_avg = reinterpret_cast<T*>(e.state[0]);
            t.exp_avg_sq = reinterpret_cast<T*>(e.state[1]);
            t.max_exp_avg_sq = reinterpret_cast<T*>(e.state[2]);  // read only when amsgrad
            t.hyper = h;
        });
        for (std::size_t i = 0; i < entries_.size(); ++i) {
            const Entry& e = entries_[i];
            if (grad_[i] && (!e.state[0] || !e.state[1] || (adam_hypers_[group_of_[i]].amsgrad && !e.state[2])))
                throw std::logic_error(fn_ + ": state missing (stale plan)");
            adam_kept_.set(e.param.dtype, e.slot, grad_[i], step_counts[i] + 1);
        }
        adam_kept_.run();
        for (std::size_t i = 0; i < entries_.size(); ++i) step_counts[i] += grad_[i] != nullptr;
    }

    void sgd_step(py::handle grads, py::handle steps, py::handle hypers_in) {
        const auto hypers = group_hypers<SgdHyperparams>(hypers_in, kSgdKeys, fn_, sgd_hyper);
        const Busy busy(busy_, fn_);
        sgd_kept_.prefetch_for_write();
        std::int64_t* step_counts = prepare(grads, steps, hypers.size());
        std::copy(hypers.begin(), hypers.end(), sgd_hypers_.begin());
        if (!sgd_kept_.built) build_kept(sgd_kept_, sgd_hypers_, [](auto& t, const Entry& e, const SgdHyperparams* h) {
            using T = std::remove_pointer_t<decltype(t.param)>;
            t.param = reinterpret_cast<T*>(e.param.data);
            t.momentum_buffer = reinterpret_cast<T*>(e.state[0]);  // used only when momentum != 0
            t.hyper = h;
        });
        for (std::size_t i = 0; i < entries_.size(); ++i) {
            const Entry& e = entries_[i];
            if (grad_[i] && sgd_hypers_[group_of_[i]].momentum != 0.0 && !e.state[0])
                throw std::logic_error(fn_ + ": state missing (stale plan)");
            sgd_kept_.set(e.param.dtype, e.slot, grad_[i], step_counts[i] + 1);
        }
        sgd_kept_.run();
        for (std::size_t i = 0; i < entries_.size(); ++i) step_counts[i] += grad_[i] != nullptr;
    }

private:
    struct Entry {
        Buffer param;
        char* state[3] = {nullptr, nullptr, nullptr};
        py::object descr;  // the param's dtype object (held: compared by identity)
        std::size_t shape_begin = 0;
        int ndim = 0;
        // The last gradient range found not to overlap params and state (which do not
        // change during the plan's life): fixed gradient buffers skip the search.
        char* checked_grad = nullptr;
        std::int64_t checked_grad_bytes = -1;
        std::uint32_t slot = 0;  // index among the kept descriptors of its dtype
    };

    // Builds the kept descriptors once; `hypers` must keep its storage afterwards
    // (the number of groups is fixed for a plan's life).
    template <class KeptT, class Hyper, class Fill>
    void build_kept(KeptT& kept, const std::vector<Hyper>& hypers, Fill fill) {
        kept = KeptT{};  // nothing left from an attempt that threw
        using T32 = std::remove_reference_t<decltype(kept.f32[0])>;
        using T64 = std::remove_reference_t<decltype(kept.f64[0])>;
        for (std::size_t i = 0; i < entries_.size(); ++i) {
            Entry& e = entries_[i];
            T32 t32;
            T64 t64;
            const Hyper* h = &hypers[group_of_[i]];
            if (e.param.dtype == DType::f32) fill(t32, e, h);
            else fill(t64, e, h);
            t32.size = t64.size = e.param.size;
            e.slot = kept.add(e.param.dtype, t32, t64);
        }
        kept.built = true;
    }

    // The plan's buffers are reused from step to step and read with the GIL
    // released: a second Python thread stepping the same optimizer meanwhile is refused.
    class Busy {
    public:
        Busy(std::atomic<bool>& flag, const std::string& fn) : flag_(flag) {
            if (flag_.exchange(true, std::memory_order_acquire))
                throw std::runtime_error(fn + ": another thread is running a step of this optimizer");
        }
        ~Busy() { flag_.store(false, std::memory_order_release); }
        Busy(const Busy&) = delete;
        Busy& operator=(const Busy&) = delete;

    private:
        std::atomic<bool>& flag_;
    };

    // The usual gradient, recognised from its array header alone: the param's own
    // array type and dtype object, C-contiguous, aligned, the param's shape. Anything
    // else takes check_array, which accepts it (another equal dtype object, a
    // subclass) or raises the error that names the problem.
    bool plain_grad(PyObject* g, const Entry& e) const {
        const auto* a = py::detail::array_proxy(g);
        constexpr int needed = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ | py::detail::npy_api::NPY_ARRAY_ALIGNED_;
        if (Py_TYPE(g) != Py_TYPE(e.param.obj) || a->descr != e.descr.ptr() || (a->flags & needed) != needed || a->nd != e.ndim) return false;
        const py::ssize_t* shape = shapes_.data() + e.shape_begin;  // one past the end for a trailing 0-d param
        bool same = true;
        for (int d = 0; d < e.ndim; ++d) same &= a->dimensions[d] == shape[d];  // no memcmp call for 1-4 dims
        return same;
    }

    // Validates the gradients (None: skip) and that every param is unchanged; fills grad_.
    std::int64_t* prepare(py::handle grads, py::handle steps, std::size_t n_groups) {
        const char* fn = fn_.c_str();
        const std::size_t n = entries_.size();
        check_list(grads, fn, "grads", n, true);
        if (n_groups != n_groups_) throw std::logic_error(fn_ + ": stale plan");
        std::int64_t* step_counts = check_steps_array(steps, fn, n);
        grad_.assign(n, nullptr);
        for (std::size_t i = 0; i < n; ++i) {
            py::handle g = item(grads, i);
            if (g.is_none()) continue;
            Entry& e = entries_[i];
            const ArgName param_name{fn, kParam, i, true};
            PyObject* p = e.param.obj;  // kept alive by params_
            if (py::detail::array_proxy(p)->data != e.param.data)  // resized with refcheck=False
                throw_value(param_name.str() + " was reallocated since the optimizer was built; its state no longer matches it");
            if (!(py::detail::array_proxy(p)->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_))
                throw_value(param_name.str() + " is read-only; fastadam writes it in place: pass a writeable array");
            Buffer b;
            if (plain_grad(g.ptr(), e)) {
                b.data = py::detail::array_proxy(g.ptr())->data;
                b.nbytes = e.param.nbytes;
            } else {
                const ArgName arg{fn, kGrad, i, true};
                b = check_array(g, arg, false);
                if (b.dtype != e.param.dtype)
                    throw_type(arg.str() + " has dtype " + dtype_name(b.dtype) + " but " + param_name.bare() + " has dtype " +
                               dtype_name(e.param.dtype) + "; a parameter, its gradient and its state must share one dtype");
                auto ga = py::reinterpret_borrow<py::array>(g);
                bool same = ga.ndim() == e.ndim;
                for (int d = 0; same && d < e.ndim; ++d) same = ga.shape(d) == shapes_[e.shape_begin + d];
                if (!same) check_same_shape(b, e.param, arg, param_name);  // raises with both shapes
            }
            if (b.data != e.checked_grad || b.nbytes != e.checked_grad_bytes) {
                footprint_.check_read_against_frozen(b, i);
                e.checked_grad = b.data;
                e.checked_grad_bytes = b.nbytes;
            }
            grad_[i] = b.data;
        }
        return step_counts;
    }

    std::string fn_;
    py::list params_, states_;  // keep every buffer alive while the plan points into it
    std::size_t n_groups_;
    Footprint footprint_;
    std::vector<Entry> entries_;
    std::vector<py::ssize_t> shapes_;
    std::vector<std::size_t> group_of_;
    std::vector<char*> grad_;
    // One entry per group, sized once (prepare() refuses another group count): the kept
    // descriptors hold pointers into them.
    std::vector<AdamHyperparams> adam_hypers_ = std::vector<AdamHyperparams>(n_groups_);
    std::vector<SgdHyperparams> sgd_hypers_ = std::vector<SgdHyperparams>(n_groups_);
    Kept<AdamTensor> adam_kept_;
    Kept<SgdTensor> sgd_kept_;
    std::atomic<bool> busy_{false};
};

// Optimizer construction: every param is a writeable float array and no two share memory.
void check_params(py::handle params, const std::string& fn_name) {
    const char* fn = fn_name.c_str();
    const std::size_t n = check_list(params, fn, "params", 0, false);
    Footprint footprint(fn, true, n);
    for (std::size_t i = 0; i < n; ++i) {
        const Slot slots[1] = {kParam};
        const py::handle handles[1] = {item(params, i)};
        Buffer b;
        validate_tensor(fn, i, true, handles, slots, 1, footprint, &b);
    }
    footprint.check();
}

// Validates one group's hyper-parameters (a tuple in the kernel's key order).
template <class Parse>
void check_group(py::handle t, std::size_t keys, const std::string& where, Parse parse) {
    if (!PyTuple_Check(t.ptr()) || static_cast<std::size_t>(PyTuple_GET_SIZE(t.ptr())) != keys) throw_value(where + ": internal error");
    std::vector<py::handle> v(keys);
    for (std::size_t k = 0; k < keys; ++k) v[k] = PyTuple_GET_ITEM(t.ptr(), k);
    parse(where.c_str(), v.data());
}

template <class F>
auto translate_invalid_argument(F f) {
    try {
        return f();
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
    denom = sqrt(v_max or v) * T(1 / sqrt(1 - beta2**t)) + T(eps)
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
elements of all tensors are split across threads. Same formula and rules as adam_step;
tensors may share one (read-only) gradient array.
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

PyMethodDef kStepMethods[] = {
    {"adam_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&adam_step)), METH_FASTCALL | METH_KEYWORDS, kAdamStepDoc},
    {"adam_step_multi", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&adam_step_multi)), METH_FASTCALL | METH_KEYWORDS,
     kAdamStepMultiDoc},
    {"sgd_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&sgd_step)), METH_FASTCALL | METH_KEYWORDS, kSgdStepDoc},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PYBIND11_MODULE(_core, m, py::mod_gil_not_used()) {
    m.doc() = "fastadam's native kernels: argument checking and dispatch (see fastadam for the documented API).";
    if (PyModule_AddFunctions(m.ptr(), kStepMethods) != 0) throw py::error_already_set();

    py::class_<StepPlan>(m, "_StepPlan")
        .def(py::init<std::string, py::list, py::list, py::list>())
        .def("adam_step", &StepPlan::adam_step)
        .def("sgd_step", &StepPlan::sgd_step);
    m.def("_check_params", &check_params);
    m.def("_check_adam_group", [](py::handle t, const std::string& where) { check_group(t, kAdamKeys, where, adam_hyper); });
    m.def("_check_sgd_group", [](py::handle t, const std::string& where) { check_group(t, kSgdKeys, where, sgd_hyper); });

    // Test hook (tests/test_exact_sqrt.py): the square root of the current path's FMA lanes.
    m.def("_lane_sqrt", [](const py::array& x, py::array& out, const py::object& estimate) {
        const auto is_f32 = [&](const py::handle& h, bool writeable) {
            if (!py::isinstance<py::array>(h)) return false;
            const auto a = py::reinterpret_borrow<py::array>(h);
            return a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style) && a.size() == x.size() &&
                   (!writeable || a.writeable());
        };
        if (!is_f32(x, false) || !is_f32(out, true) || (!estimate.is_none() && !is_f32(estimate, false)))
            throw_value("_lane_sqrt(): x, out and estimate must be C-contiguous float32 arrays of one size, out writeable");
        const float* est = estimate.is_none() ? nullptr : static_cast<const float*>(py::array(estimate).data());
        fastadam::lane_sqrt(static_cast<const float*>(x.data()), est, static_cast<float*>(out.mutable_data()), x.size(),
                            fastadam::get_isa());
    }, py::arg("x"), py::arg("out"), py::arg("estimate") = py::none());
    m.def("available_isas", [] {
        py::list out;
        for (auto isa : fastadam::available_isas()) out.append(fastadam::isa_name(isa));
        return py::tuple(out);
    }, "The SIMD paths this build carries and this CPU can run, best last: a tuple of 'baseline', 'avx2', 'avx512'.");
    m.def("get_isa", [] { return std::string(fastadam::isa_name(fastadam::get_isa())); },
          "The SIMD path in use: the best available unless set_isa() or $FASTADAM_ISA chose another.");
    m.def("set_isa", [](const std::string& name) { translate_invalid_argument([&] { fastadam::set_isa(fastadam::isa_from_name(name)); }); },
          py::arg("name"),
          "Use the SIMD path `name` ('baseline', 'avx2', 'avx512'); ValueError if this CPU lacks it. Results are bit-identical on every path.");
    m.def("_set_isa_from_environment", [] { translate_invalid_argument([] { fastadam::set_isa_from_environment(); }); });
    m.def("set_num_threads", [](int n) {
        if (n < 0) throw_value("set_num_threads(): n must be >= 1, or 0 to restore the default");
        fastadam::set_num_threads(n);
    }, py::arg("n"),
          "Use at most n OpenMP threads per step (n >= 1), or 0 to follow OpenMP's default (OMP_NUM_THREADS, else all cores). "
          "Results are bit-identical for every n.");
    m.def("get_num_threads", &fastadam::get_num_threads, "The number of threads a large step uses.");
    m.def("has_openmp", &fastadam::has_openmp, "Whether this build has OpenMP (else every step runs on one thread).");
    m.attr("min_elements_per_thread") = fastadam::kMinElementsPerThread;
    m.attr("min_elements_to_wake") = fastadam::kMinElementsToWake;

    // C API for other extension modules (fastadam/kernel.pxd, fastadam/capi.hpp): a table of
    // function pointers into this module's kernel, same dispatch and threads as above.
    static const fastadam::CApi c_api = {
        FASTADAM_CAPI_VERSION, static_cast<std::uint32_t>(sizeof(fastadam::CApi)),
        [](const AdamTensor<float>* t, std::size_t n) noexcept { fastadam::adam_step(t, n); },
        [](const AdamTensor<double>* t, std::size_t n) noexcept { fastadam::adam_step(t, n); },
        [](const SgdTensor<float>* t, std::size_t n) noexcept { fastadam::sgd_step(t, n); },
        [](const SgdTensor<double>* t, std::size_t n) noexcept { fastadam::sgd_step(t, n); },
    };
    m.attr("_C_API") = py::capsule(static_cast<const void*>(&c_api), FASTADAM_CAPI_CAPSULE_NAME);
}
