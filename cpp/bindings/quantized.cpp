// Quantized states' functions (quantized.hpp): argument checks and calls into the kernel.
#include "quantized.hpp"

#include <pybind11/numpy.h>

#include <cstdint>
#include <string>

#include "arrays.hpp"
#include "fastadam/fastadam.hpp"

namespace fastadam::bindings {

namespace {

const QuantMap& book(int bits, bool is_signed) {
    if (bits != 8 && bits != 4) throw_value("bits must be 8 or 4, got " + std::to_string(bits));
    return quant_map(bits, is_signed);
}

// A C-contiguous, aligned array of `n` elements of the dtype `num` (writeable if `write`).
char* data_of(const py::handle& h, int num, std::int64_t n, bool write, const std::string& name, const char* dtype) {
    if (!py::isinstance<py::array>(h)) throw_type(name + " must be a numpy.ndarray of " + dtype + ", got " + type_name(h));
    auto a = py::reinterpret_borrow<py::array>(h);
    if (a.dtype().num() != num || a.dtype().byteorder() == '>') throw_type(name + " has dtype " + std::string(py::str(a.dtype())) + "; it must be " + dtype);
    if (!(a.flags() & py::array::c_style) || !(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw_value(name + " must be C-contiguous and aligned: pass numpy.ascontiguousarray(x)");
    if (write && !a.writeable()) throw_value(name + " is read-only; it is written in place");
    if (static_cast<std::int64_t>(a.size()) != n)
        throw_value(name + " has " + std::to_string(a.size()) + " elements; " + std::to_string(n) + " expected");
    return static_cast<char*>(const_cast<void*>(a.data()));
}

struct State {
    std::uint8_t* codes;
    float* absmax;
};
State state_of(const py::handle& state, std::int64_t n, int bits, const char* fn, bool write) {
    const std::int64_t block = bits == 4 ? 128 : 256;
    return {reinterpret_cast<std::uint8_t*>(data_of(item(state, 0), py::detail::npy_api::NPY_UBYTE_, bits == 8 ? n : (n + 1) / 2, write,
                                                   std::string(fn) + ": state.codes", "uint8")),
            reinterpret_cast<float*>(data_of(item(state, 1), py::detail::npy_api::NPY_FLOAT_, (n + block - 1) / block, write,
                                             std::string(fn) + ": state.absmax", "float32"))};
}

}  // namespace

void register_quantized(py::module_& m) {
    m.def("quant_map", [](int bits, bool is_signed) {
        const QuantMap& q = book(bits, is_signed);
        const py::ssize_t n = py::ssize_t{1} << bits;
        return py::make_tuple(py::array_t<float>(n, q.values), py::array_t<float>(n - 1, q.thresholds));
    }, py::arg("bits"), py::arg("signed"),
          "(values, thresholds) of the code book of `bits`-bit states, signed (exp_avg) or not (exp_avg_sq): the kernel's copy "
          "of fastadam.reference.quant_map and quant_thresholds.");
    m.def("_quantize_blockwise", [](const py::array& x, const py::object& state) {
        if (!is_quantized_state(state)) throw_type("quantize(): state must be a fastadam.QuantizedState, got " + type_name(state));
        const std::int64_t n = static_cast<std::int64_t>(x.size());
        const int bits = py::cast<int>(item(state, 2));
        const QuantMap& q = book(bits, py::cast<bool>(item(state, 3)));
        const float* in = reinterpret_cast<const float*>(data_of(x, py::detail::npy_api::NPY_FLOAT_, n, false, "quantize(): x", "float32"));
        const State s = state_of(state, n, bits, "quantize()", true);
        py::gil_scoped_release release;
        quantize_blockwise(in, n, s.codes, s.absmax, q);
    }, py::arg("x"), py::arg("state"), "x (float32) quantized into state (a QuantizedState of x.size elements), in place.");
    m.def("_dequantize_blockwise", [](const py::object& state, py::array& out) {
        if (!is_quantized_state(state)) throw_type("dequantize(): state must be a fastadam.QuantizedState, got " + type_name(state));
        const std::int64_t n = static_cast<std::int64_t>(out.size());
        const int bits = py::cast<int>(item(state, 2));
        const QuantMap& q = book(bits, py::cast<bool>(item(state, 3)));
        float* to = reinterpret_cast<float*>(data_of(out, py::detail::npy_api::NPY_FLOAT_, n, true, "dequantize(): out", "float32"));
        const State s = state_of(state, n, bits, "dequantize()", false);
        py::gil_scoped_release release;
        dequantize_blockwise(s.codes, s.absmax, n, to, q);
    }, py::arg("state"), py::arg("out"), "state's values (float32) written into out, of the state's size.");
    m.def("_quantize_codes", [](const py::array& x, py::array& out, int bits, bool is_signed, const std::string& isa, bool bounded) {
        const std::int64_t n = static_cast<std::int64_t>(x.size());
        const float* in = reinterpret_cast<const float*>(data_of(x, py::detail::npy_api::NPY_FLOAT_, n, false, "x", "float32"));
        auto* codes = reinterpret_cast<std::uint8_t*>(data_of(out, py::detail::npy_api::NPY_UBYTE_, n, true, "out", "uint8"));
        const QuantMap& q = book(bits, is_signed);
        quantize_codes(in, codes, n, q, isa_from_name(isa), bounded);
    }, py::arg("x"), py::arg("out"), py::arg("bits"), py::arg("signed"), py::arg("isa"), py::arg("bounded") = false,
          "Test hook: the code of each float of x, one per byte, as the ISA's quantized-state loop computes it "
          "(bounded: the loop for blocks of finite absmax, valid for |x| < 2).");
    m.def("_quantizer_mismatches", [](int bits, bool is_signed, const std::string& isa, std::int64_t every) {
        if (every < 1) throw_value("every must be >= 1");
        const QuantMap& q = book(bits, is_signed);
        std::uint32_t first = 0;
        std::int64_t count;
        {
            py::gil_scoped_release release;
            count = quantizer_mismatches(q, isa_from_name(isa), every, &first);
        }
        return py::make_tuple(count, first);
    }, py::arg("bits"), py::arg("signed"), py::arg("isa"), py::arg("every") = 1,
          "Self-check: floats' codes on the ISA against the thresholds (every run of 2^16 bit patterns that holds a threshold, "
          "and every `every`-th other one); (mismatches, first mismatching bit pattern).");
}

}  // namespace fastadam::bindings
