// Array checks: which arrays fastadam accepts (taken as they are, never converted), how
// an argument is named in an error, and the overlap check of a step's buffers.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fastadam::bindings {

namespace py = pybind11;

[[noreturn]] void throw_type(const std::string& msg);
[[noreturn]] void throw_value(const std::string& msg);
std::string type_name(py::handle h);

enum Slot { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMomentumBuffer, kStep, kSteps /* one int for all tensors */, kParamOut };

// Names an argument as the user wrote it ("adam_step(): grad", "adam_step_multi():
// grads[3]"), or through a caller's labels ("...: the gradient of param_groups[0]['params'][3]").
// Built only when an error needs it: strings are off the hot path.
struct ArgName {
    const char* fn;
    Slot slot;
    std::size_t index;
    bool multi;
    const std::vector<std::string>* labels = nullptr;  // labels[index] names tensor `index`
    std::string str() const { return std::string(fn) + ": " + bare(); }
    // Without the function, for a second argument in one message.
    std::string bare() const;
};

// bf16 is ml_dtypes.bfloat16, f16 NumPy's float16: the 2-byte storages of mixed
// precision, taken by the Adam functions only.
enum class DType { f32, f64, bf16, f16 };
const char* dtype_name(DType d);
inline bool is_narrow(DType d) { return d == DType::bf16 || d == DType::f16; }

// A validated array: where it is, how big, what type.
struct Buffer {
    char* data = nullptr;
    std::int64_t size = 0;
    std::int64_t nbytes = 0;
    DType dtype = DType::f32;
    PyObject* obj = nullptr;  // borrowed; the caller's arguments keep it alive
};

std::string shape_str(const py::array& a);
// A float32/float64 ndarray (or bfloat16/float16 where `narrow_ok`), native byte order,
// C-contiguous, aligned (and writeable if `writable`).
Buffer check_array(py::handle h, const ArgName& arg, bool writable, bool narrow_ok = false);
// Same shape and (unless `any_dtype`) the same dtype as ref.
void check_same_shape(const Buffer& b, const Buffer& ref, const ArgName& arg, const ArgName& ref_arg, bool any_dtype = false);

inline py::handle item(py::handle seq, std::size_t i) { return PySequence_Fast_GET_ITEM(seq.ptr(), static_cast<Py_ssize_t>(i)); }
// A list or tuple (of `expected` entries when has_expected); returns its length.
std::size_t check_list(py::handle seq, const char* fn, const char* name, std::size_t expected, bool has_expected,
                       const char* what = "numpy arrays");

// The memory a step touches. A written buffer may share no byte with any other
// buffer of the step; gradients are only read, so tensors may share one gradient.
class Footprint {
public:
    Footprint(const char* fn, bool multi, std::size_t capacity, const std::vector<std::string>* labels = nullptr)
        : fn_(fn), multi_(multi), labels_(labels) {
        written_.reserve(capacity);
    }

    void add(const Buffer& b, Slot slot, std::size_t tensor) { add(b.data, b.nbytes, slot, tensor); }
    void add(const char* data, std::int64_t nbytes, Slot slot, std::size_t tensor) {
        if (nbytes == 0) return;
        const auto begin = reinterpret_cast<std::uintptr_t>(data);
        (slot == kGrad ? read_ : written_).push_back(Range{begin, begin + static_cast<std::uintptr_t>(nbytes), tensor, slot});
    }

    // Sort + sweep over the written buffers, O(n log n); then a binary search per
    // gradient. Repeated calls with the same written buffers (a loop calling
    // adam_step_multi on the same state) reuse the previous call's sorted set.
    void check() const;

    // For a StepPlan: verify the written buffers once, then check each step's
    // gradients against them as they arrive.
    void freeze() { frozen_ = sorted_written(); }
    void check_read_against_frozen(const char* data, std::int64_t nbytes, std::size_t tensor) const {
        if (nbytes == 0) return;
        const auto begin = reinterpret_cast<std::uintptr_t>(data);
        check_read(frozen_, Range{begin, begin + static_cast<std::uintptr_t>(nbytes), tensor, kGrad});
    }

private:
    struct Range {
        std::uintptr_t begin, end;
        std::size_t tensor;
        Slot slot;
        bool operator==(const Range& o) const { return begin == o.begin && end == o.end; }
    };

    // The written ranges are sorted and disjoint, so only the last one starting
    // before r ends can overlap r. The search is branch-free: on a 1000-tensor
    // model, mispredicted branches of std::upper_bound cost more than the update.
    void check_read(const std::vector<Range>& sorted, const Range& r) const {
        if (sorted.empty()) return;
        const Range* base = sorted.data();
        for (std::size_t n = sorted.size(); n > 1; n -= n / 2) base = base[n / 2].begin < r.end ? base + n / 2 : base;
        if (base->begin < r.end && base->end > r.begin) overlap(*base, r);
    }

    const std::vector<Range>& sorted_written() const;
    [[noreturn]] void overlap(const Range& a, const Range& b) const;

    const char* fn_;
    bool multi_;
    const std::vector<std::string>* labels_;
    std::vector<Range> written_, read_, frozen_;
};

// Validates tensor i's arrays, `handles` in `slots` order (param first: the reference
// for dtype and shape; then grad; then written state), and records their memory.
// With `mixed`, the dtypes may differ (bfloat16/float16 included) and the caller checks their pairing.
void validate_tensor(const char* fn, std::size_t i, bool multi, const py::handle* handles, const Slot* slots, int n,
                     Footprint& footprint, Buffer* out, bool mixed = false, const std::vector<std::string>* labels = nullptr);

// An optional state buffer (max_exp_avg_sq, momentum_buffer): required exactly when
// `needed`. Returns whether it takes part.
bool check_optional(py::handle h, bool needed, const ArgName& arg, const char* when);

// A fastadam.QuantizedState (a tuple: codes, absmax, bits, signed) in place of a state array.
inline bool is_quantized_state(py::handle h) { return PyTuple_Check(h.ptr()) && PyTuple_GET_SIZE(h.ptr()) == 4; }
struct QuantizedBuffers {
    Buffer codes, absmax;
    int bits = 8;
};
// The state of a tensor of `size` elements: codes uint8 of size elements (8 bits) or
// (size + 1) / 2 (4 bits), absmax float32 of one per block, both C-contiguous and
// writeable; `is_signed` the book the slot takes (exp_avg signed, exp_avg_sq not).
QuantizedBuffers check_quantized(py::handle h, const ArgName& arg, std::int64_t size, bool is_signed);

// Optimizer construction: every param is a writeable float array and no two share memory.
void check_params(py::handle params, const std::string& fn, bool narrow_ok = false);

}  // namespace fastadam::bindings
