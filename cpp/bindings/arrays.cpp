// Array checks and the overlap Footprint (arrays.hpp).
#include "arrays.hpp"

#include <algorithm>
#include <cstring>

namespace fastadam::bindings {

void throw_type(const std::string& msg) { throw py::type_error(msg); }
void throw_value(const std::string& msg) { throw py::value_error(msg); }

std::string type_name(py::handle h) { return Py_TYPE(h.ptr())->tp_name; }

namespace {
const char* const kSingular[] = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step", "steps", "param_out"};
const char* const kPlural[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers", "steps", "steps", "params_out"};

bool native_byte_order(char order) {
    static const bool little_endian = [] {
        const std::uint16_t probe = 1;
        unsigned char first;
        std::memcpy(&first, &probe, 1);
        return first == 1;
    }();
    return order != (little_endian ? '>' : '<');
}
}  // namespace

std::string ArgName::bare() const {
    if (labels != nullptr && slot != kSteps) {
        const std::string& label = (*labels)[index];
        if (slot == kParam) return label;
        if (slot == kGrad) return "the gradient of " + label;
        if (slot == kStep) return "state['step'] of " + label;
        return std::string(kSingular[slot]) + " of " + label;
    }
    return multi ? std::string(kPlural[slot]) + "[" + std::to_string(index) + "]" : kSingular[slot];
}

const char* dtype_name(DType d) {
    switch (d) {
        case DType::f32: return "float32";
        case DType::f64: return "float64";
        case DType::bf16: return "bfloat16";
        case DType::f16: return "float16";
    }
    return "?";
}

namespace {
// ml_dtypes.bfloat16, once an array of it is seen (ml_dtypes is then imported): the
// core needs only NumPy, and NumPy numbers such user dtypes at run time.
bool is_bfloat16(const py::dtype& dt) {
    static PyObject* bfloat16_type = nullptr;  // kept alive by ml_dtypes' module, never unloaded
    const PyObject* type = reinterpret_cast<const PyObject*>(py::detail::array_descriptor_proxy(dt.ptr())->typeobj);
    if (bfloat16_type != nullptr) return type == bfloat16_type;
    if (dt.num() < 256) return false;  // NPY_USERDEF
    PyObject* module = PyImport_GetModule(py::str("ml_dtypes").ptr());
    if (module == nullptr) {
        PyErr_Clear();
        return false;
    }
    PyObject* found = PyObject_GetAttrString(module, "bfloat16");
    Py_DECREF(module);
    if (found == nullptr) {
        PyErr_Clear();
        return false;
    }
    bfloat16_type = found;  // a new reference, kept
    return type == bfloat16_type;
}
constexpr int kNpyHalf = 23;  // NPY_HALF
}  // namespace

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += std::to_string(a.shape(i)) + (a.ndim() == 1 || i + 1 < a.ndim() ? "," : "");
    return s + ")";
}

Buffer check_array(py::handle h, const ArgName& arg, bool writable, bool narrow_ok) {
    if (!py::isinstance<py::array>(h))
        throw_type(arg.str() + " must be a numpy.ndarray of " + (narrow_ok ? "float32, float64, bfloat16 or float16" : "float32 or float64") +
                   ", got " + type_name(h) +
                   "; create the array once with numpy.ascontiguousarray(x, dtype=numpy.float32) and keep "
                   "passing that array (fastadam works in place and never updates a copy)");
    auto a = py::reinterpret_borrow<py::array>(h);
    const py::dtype dt = a.dtype();
    Buffer b;
    const int num = dt.num();
    if (num == py::detail::npy_api::NPY_FLOAT_) b.dtype = DType::f32;
    else if (num == py::detail::npy_api::NPY_DOUBLE_) b.dtype = DType::f64;
    else if (num == kNpyHalf) b.dtype = DType::f16;
    else if (is_bfloat16(dt)) b.dtype = DType::bf16;
    else
        throw_type(arg.str() + " has dtype " + std::string(py::str(dt)) +
                   (narrow_ok ? "; fastadam's Adam takes float32, float64, bfloat16 (ml_dtypes.bfloat16) and float16"
                              : "; fastadam supports float32 and float64 (a parameter, its gradient and its state share one dtype)"));
    if (!narrow_ok && is_narrow(b.dtype))
        throw_type(arg.str() + " has dtype " + dtype_name(b.dtype) +
                   "; only fastadam.adam_step and adam_step_multi take bfloat16/float16 arrays (the optimizers do not yet); "
                   "here a parameter, its gradient and its state share one dtype, float32 or float64");
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

void check_same_shape(const Buffer& b, const Buffer& ref, const ArgName& arg, const ArgName& ref_arg, bool any_dtype) {
    if (!any_dtype && b.dtype != ref.dtype)
        throw_type(arg.str() + " has dtype " + dtype_name(b.dtype) + " but " + ref_arg.bare() + " has dtype " +
                   dtype_name(ref.dtype) + "; a parameter, its gradient and its state must share one dtype");
    auto a = py::reinterpret_borrow<py::array>(b.obj), r = py::reinterpret_borrow<py::array>(ref.obj);
    bool same = a.ndim() == r.ndim();
    for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == r.shape(i);
    if (!same)
        throw_value(arg.str() + " has shape " + shape_str(a) + " but " + ref_arg.bare() + " has shape " + shape_str(r) +
                    "; they must have the same shape");
}

std::size_t check_list(py::handle seq, const char* fn, const char* name, std::size_t expected, bool has_expected, const char* what) {
    if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr()))
        throw_type(std::string(fn) + ": " + name + " must be a list or tuple of " + what + ", got " + type_name(seq));
    const auto n = static_cast<std::size_t>(Py_SIZE(seq.ptr()));
    if (has_expected && n != expected)
        throw_value(std::string(fn) + ": " + name + " has " + std::to_string(n) + " entries but params has " + std::to_string(expected));
    return n;
}

// ----- Footprint ---------------------------------------------------------------------

void Footprint::check() const {
    const std::vector<Range>& sorted = sorted_written();
    for (const Range& r : read_) check_read(sorted, r);
}

const std::vector<Footprint::Range>& Footprint::sorted_written() const {
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

void Footprint::overlap(const Range& a, const Range& b) const {
    throw_value(ArgName{fn_, a.slot, a.tensor, multi_, labels_}.str() + " and " + ArgName{fn_, b.slot, b.tensor, multi_, labels_}.bare() +
                " share memory; every written buffer (param, exp_avg, exp_avg_sq, max_exp_avg_sq, "
                "momentum_buffer, param_out, step) must be its own array, and no gradient may overlap one");
}

// ----- tensors -------------------------------------------------------------------------

void validate_tensor(const char* fn, std::size_t i, bool multi, const py::handle* handles, const Slot* slots, int n,
                     Footprint& footprint, Buffer* out, bool mixed, const std::vector<std::string>* labels) {
    const ArgName param_name{fn, slots[0], i, multi, labels};
    for (int k = 0; k < n; ++k) {
        const ArgName arg{fn, slots[k], i, multi, labels};
        out[k] = check_array(handles[k], arg, slots[k] != kGrad, mixed);
        if (k > 0) check_same_shape(out[k], out[0], arg, param_name, mixed);
    }
    for (int k = 0; k < n; ++k) footprint.add(out[k], slots[k], i);
}

QuantizedBuffers check_quantized(py::handle h, const ArgName& arg, std::int64_t size, bool is_signed) {
    const std::string what = arg.str();
    PyObject* t = h.ptr();
    QuantizedBuffers q;
    PyObject* bits = PyTuple_GET_ITEM(t, 2);
    const long b = PyLong_Check(bits) && !PyBool_Check(bits) ? PyLong_AsLong(bits) : -1;
    if (b != 8 && b != 4)
        throw_value(what + " is a QuantizedState with bits=" + py::repr(bits).cast<std::string>() + "; quantized states have 8 or 4 bits a code");
    q.bits = static_cast<int>(b);
    PyObject* sign = PyTuple_GET_ITEM(t, 3);
    if (!PyBool_Check(sign) || (sign == Py_True) != is_signed)
        throw_value(what + " is a QuantizedState with signed=" + py::repr(sign).cast<std::string>() + "; exp_avg takes the signed book " +
                    "(signed=True) and exp_avg_sq the unsigned one (signed=False): QuantizedState.zeros(n, bits=..., signed=...)");
    const std::int64_t block = b == 4 ? 128 : 256;
    const std::int64_t want_codes = b == 8 ? size : (size + 1) / 2, want_blocks = (size + block - 1) / block;
    const auto take = [&](int k, const char* field, bool uint8, std::int64_t want) {
        py::handle a = PyTuple_GET_ITEM(t, k);
        const std::string name = what + "." + field;
        if (!py::isinstance<py::array>(a)) throw_type(name + " must be a numpy.ndarray, got " + type_name(a));
        auto arr = py::reinterpret_borrow<py::array>(a);
        const int num = arr.dtype().num();
        if (num != (uint8 ? py::detail::npy_api::NPY_UBYTE_ : py::detail::npy_api::NPY_FLOAT_) ||
            (!uint8 && !native_byte_order(arr.dtype().byteorder())))
            throw_type(name + " has dtype " + std::string(py::str(arr.dtype())) + "; " + field + " is " +
                       (uint8 ? "uint8" : "float32 in native byte order"));
        if (!(arr.flags() & py::array::c_style) || !(arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
            throw_value(name + " is not C-contiguous and aligned; fastadam writes it in place: pass numpy.ascontiguousarray(x) and keep it");
        if (!arr.writeable()) throw_value(name + " is read-only; fastadam writes it in place: pass a writeable array");
        if (static_cast<std::int64_t>(arr.size()) != want)
            throw_value(name + " has " + std::to_string(arr.size()) + " elements but a " + std::to_string(b) + "-bit state of " +
                        std::to_string(size) + " elements has " + std::to_string(want) + " (" +
                        (uint8 ? (b == 8 ? "one code a byte" : "two codes a byte") : "one absmax per block of " + std::to_string(block)) +
                        "); a state of another size or block size cannot be used for this param");
        Buffer out;
        out.data = static_cast<char*>(arr.mutable_data());
        out.size = arr.size();
        out.nbytes = static_cast<std::int64_t>(arr.nbytes());
        out.obj = a.ptr();
        return out;
    };
    q.codes = take(0, "codes", true, want_codes);
    q.absmax = take(1, "absmax", false, want_blocks);
    return q;
}

bool check_optional(py::handle h, bool needed, const ArgName& arg, const char* when) {
    if (needed && h.is_none())
        throw_value(arg.str() + " is required with " + when + ": pass an array of zeros shaped like param, kept across steps");
    if (!needed && !h.is_none()) throw_value(arg.str() + " is only used with " + when + "; pass None");
    return needed;
}

void check_params(py::handle params, const std::string& fn_name, bool narrow_ok) {
    const char* fn = fn_name.c_str();
    const std::size_t n = check_list(params, fn, "params", 0, false);
    Footprint footprint(fn, true, n);
    for (std::size_t i = 0; i < n; ++i) {
        const Slot slots[1] = {kParam};
        const py::handle handles[1] = {item(params, i)};
        Buffer b;
        validate_tensor(fn, i, true, handles, slots, 1, footprint, &b, narrow_ok);
    }
    footprint.check();
}

}  // namespace fastadam::bindings
