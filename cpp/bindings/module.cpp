// fastadam._core: registration only. The math is in cpp/include/fastadam/kernels.hpp;
// argument checks in arrays.cpp, the hyper-parameter table in hyper.cpp, the
// functional API in functional.cpp, the optimizers' step plan in step_plan*.cpp.
//
// Every buffer is taken as it is, never converted: a strided, Fortran-order,
// read-only, misaligned, byte-swapped or wrongly typed array, or a list, raises
// before the first byte of any buffer of the step is written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cfenv>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "arrays.hpp"
#include "fastadam/fastadam.hpp"
#include "functional.hpp"
#include "hyper.hpp"
#include "quantized.hpp"
#include "step_guard.hpp"
#include "step_plan.hpp"
#define FASTADAM_CAPI_NO_IMPORT  // this module exports the table; it does not import it
#include "fastadam/capi.hpp"

namespace py = pybind11;
namespace fb = fastadam::bindings;
using fastadam::AdamTensor;
using fastadam::SgdTensor;

namespace {

template <class F>
auto translate_invalid_argument(F f) {
    try {
        return f();
    } catch (const std::invalid_argument& e) {
        fb::throw_value(e.what());
    }
}

}  // namespace

PYBIND11_MODULE(_core, m, py::mod_gil_not_used()) {
    m.doc() = "fastadam's native kernels: argument checking and dispatch (see fastadam for the documented API).";
    if (PyModule_AddFunctions(m.ptr(), fb::functional_methods()) != 0) throw py::error_already_set();

    py::class_<fb::StepPlan>(m, "_StepPlan")
        .def(py::init<const std::string&, std::string, py::list, py::list, py::list, py::object, py::object>(), py::arg("kind"),
             py::arg("fn"), py::arg("params"), py::arg("states"), py::arg("group_sizes"), py::arg("labels") = py::none(),
             py::arg("torch") = py::none())
        .def("step", &fb::StepPlan::step, py::arg("grads"), py::arg("steps"), py::arg("groups"))
        .def("torch_step", &fb::StepPlan::torch_step, py::arg("groups"))
        .def_property_readonly("completed", &fb::StepPlan::completed)
        .def_property_readonly("torch_helper", &fb::StepPlan::torch_helper);
    py::class_<fb::StepGuard>(m, "_StepGuard")
        .def(py::init<std::string>(), py::arg("name"))
        .def("__enter__", &fb::StepGuard::enter)
        .def("__exit__", &fb::StepGuard::exit);
    m.def("_check_params", &fb::check_params, py::arg("params"), py::arg("fn"), py::arg("narrow_ok") = false);
    m.def("_check_group", &fb::check_group, py::arg("kind"), py::arg("group"), py::arg("where"));
    m.def("_hyper_names", &fb::hyper_names, py::arg("kind"));
    m.def("_lane_sqrt", &fb::lane_sqrt, py::arg("x"), py::arg("out"), py::arg("estimate") = py::none());
    fb::register_quantized(m);
    m.def("_grad_sq_block_sums", &fb::grad_sq_block_sums, py::arg("grads"), py::arg("grad_scale") = py::none(),
          "The norm pass's sums of squares per block of 4096 elements of each gradient, in its order (float64); "
          "their sum in order is the squared global norm (fastadam.reference.grad_sq_sum).");

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
        if (n < 0) fb::throw_value("set_num_threads(): n must be >= 1, or 0 to restore the default");
        fastadam::set_num_threads(n);
    }, py::arg("n"),
          "Use at most n threads per step (n >= 1), or 0 to follow OpenMP's default (OMP_NUM_THREADS, else all cores). "
          "A step never uses more threads than the CPUs this process may run on. Results are bit-identical for every n.");
    m.def("get_num_threads", &fastadam::get_num_threads, "The number of threads a large step uses.");
    m.def("has_openmp", &fastadam::has_openmp, "Whether this build has OpenMP (else every step runs on one thread).");
    // This platform's <fenv.h> values, for the tests that set rounding modes and read flags.
    m.attr("_fenv") = py::dict(py::arg("FE_TONEAREST") = FE_TONEAREST, py::arg("FE_DOWNWARD") = FE_DOWNWARD,
                               py::arg("FE_UPWARD") = FE_UPWARD, py::arg("FE_TOWARDZERO") = FE_TOWARDZERO,
                               py::arg("FE_INVALID") = FE_INVALID, py::arg("FE_DIVBYZERO") = FE_DIVBYZERO,
                               py::arg("FE_OVERFLOW") = FE_OVERFLOW);
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
