// The functional API: adam_step, adam_step_multi, sgd_step.
//
// METH_FASTCALL functions with their own keyword parser: pybind11's generic dispatcher
// builds a Python string per keyword per call, which alone costs more than an Adam
// step on a thousand elements. Every array is validated before the first write.
#include "functional.hpp"

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "descriptors.hpp"
#include "hyper.hpp"

namespace fastadam::bindings {

namespace {

// ----- keyword parsing ---------------------------------------------------------------

// One function's arguments: its own names first (the first `positional` may be given
// by position), then the hyper-parameter table's, all interned once: keyword names
// from call sites are interned strings, so pointer comparison finds them.
class Keywords {
public:
    static constexpr int kMax = 20;

    template <class H>
    static Keywords with_hypers(const char* fn, std::initializer_list<const char*> own, int positional, int required) {
        std::vector<const char*> names(own);
        const HyperTable<H>& t = hyper_table<H>();
        for (std::size_t k = 0; k < t.size; ++k) names.push_back(t.rows[k].name);
        return Keywords(fn, std::move(names), positional, required);
    }

    // Fills out[i] with argument i, or a null handle when absent.
    void parse(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, py::handle* out) const {
        const int count = static_cast<int>(names_.size());
        for (int i = 0; i < count; ++i) out[i] = py::handle();
        if (nargs > positional_)
            throw_type(std::string(fn_) + " takes " + std::to_string(positional_) + " positional arguments but " + std::to_string(nargs) +
                       " were given; the hyper-parameters are keyword-only");
        for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
        const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
        for (Py_ssize_t k = 0; k < nkw; ++k) {
            PyObject* key = PyTuple_GET_ITEM(kwnames, k);
            int found = -1;
            for (int i = 0; i < count && found < 0; ++i)
                if (interned_[i] == key) found = i;
            for (int i = 0; i < count && found < 0; ++i)
                if (PyUnicode_Compare(interned_[i], key) == 0) found = i;
            if (found < 0) throw_type(std::string(fn_) + " got an unexpected keyword argument '" + py::str(key).cast<std::string>() + "'");
            if (out[found]) throw_type(std::string(fn_) + " got multiple values for argument '" + names_[found] + "'");
            out[found] = args[nargs + k];
        }
        for (int i = 0; i < required_; ++i)
            if (!out[i]) throw_type(std::string(fn_) + " missing required argument '" + names_[i] + "'");
    }

private:
    Keywords(const char* fn, std::vector<const char*> names, int positional, int required)
        : fn_(fn), names_(std::move(names)), positional_(positional), required_(required) {
        if (names_.size() > kMax) throw std::logic_error("fastadam: too many arguments for Keywords");
        for (const char* name : names_) interned_.push_back(PyUnicode_InternFromString(name));
    }
    const char* fn_;
    std::vector<const char*> names_;
    std::vector<PyObject*> interned_;  // immortal, as the module is
    int positional_, required_;
};

// Runs `body` and turns C++ exceptions into Python ones, for METH_FASTCALL entry points.
// A body returning py::object returns that; a void one returns None.
template <class Body>
PyObject* guarded(Body&& body) {
    try {
        if constexpr (std::is_void_v<decltype(body())>) {
            body();
            Py_RETURN_NONE;
        } else {
            return body().release().ptr();
        }
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

// A positive finite real (grad_scale, max_grad_norm); TypeError/ValueError otherwise.
double check_positive(py::handle h, const char* fn, const char* name, const char* what) {
    PyObject* o = h.ptr();
    const double v = PyBool_Check(o) ? -1.0 : PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw_type(std::string(fn) + ": " + name + " must be a real number (" + what + "), got " + type_name(h));
    }
    if (PyBool_Check(o) || !(v > 0.0) || !std::isfinite(v))
        throw_value(std::string(fn) + ": " + name + " must be a finite number > 0 (" + what + "), got " + py::repr(h).cast<std::string>());
    return v;
}

Storage storage_of(DType d) { return d == DType::bf16 ? Storage::bfloat16 : d == DType::f16 ? Storage::float16 : Storage::float32; }

// Mixed precision's dtype pairings (docs/design.md, "Mixed precision"): b = param, grad,
// the `states` state arrays, then param_out when has_out.
void check_adam_dtypes(const Buffer* b, int states, bool has_out, const char* fn, std::size_t i, bool multi,
                       const std::vector<std::string>* labels) {
    const DType p = b[0].dtype, g = b[1].dtype;
    const auto name = [&](Slot slot) { return ArgName{fn, slot, i, multi, labels}; };
    if (g != p && !(p == DType::f32 && is_narrow(g)))
        throw_type(name(kGrad).str() + " has dtype " + dtype_name(g) + " but " + name(kParam).bare() + " has dtype " + dtype_name(p) +
                   "; a gradient has its param's dtype, or is bfloat16/float16 for a float32 param (fp32 master weights)");
    static constexpr Slot kStateSlots[3] = {kExpAvg, kExpAvgSq, kMaxExpAvgSq};
    if (p == DType::f64 && states == 0)  // quantized states
        throw_type(name(kParam).str() + " is float64; quantized states are for float32, bfloat16 and float16 params");
    const DType s = states > 0 ? b[2].dtype : DType::f32;
    for (int k = 0; k < states; ++k) {
        const DType d = b[2 + k].dtype;
        if (d != s)
            throw_type(name(kStateSlots[k]).str() + " has dtype " + dtype_name(d) + " but " + name(kExpAvg).bare() + " has dtype " +
                       dtype_name(s) + "; a param's state arrays share one dtype");
    }
    const bool ok = p == DType::f64 ? s == DType::f64 : s == DType::f32 || s == DType::bf16 || (s == DType::f16 && p == DType::f16);
    if (!ok)
        throw_type(name(kExpAvg).str() + " has dtype " + dtype_name(s) + " but " + name(kParam).bare() + " has dtype " + dtype_name(p) +
                   (p == DType::f64 ? "; a float64 param keeps float64 state"
                                    : "; the state of a float32/bfloat16/float16 param is float32, or bfloat16 (half the bytes), "
                                      "or float16 for a float16 param"));
    if (has_out) {
        const DType o = b[2 + states].dtype;
        if (p != DType::f32 || !is_narrow(o))
            throw_type(name(kParamOut).str() + " has dtype " + dtype_name(o) + " and " + name(kParam).bare() + " " + dtype_name(p) +
                       "; param_out receives a float32 param rounded to bfloat16 or float16 (fp32 master weights and their "
                       "low-precision model copy)");
    }
}

// The validated tensors of one call, written only by run().
template <class A>
struct Batch {
    static constexpr int kArrays = 3 + A::kStates;  // param, grad, state, param_out
    const char* fn;
    bool multi;
    Footprint footprint;
    Descriptors<A> tensors;
    // Adam's mixed precision: tensors with a narrow array, a param_out or a gradient
    // transform; the gradients of the norm pass; the transform of this step.
    std::vector<AdamMixedTensor> mixed;
    std::vector<GradView> grads;
    GradTransform transform;
    bool checks_grads = false;    // grad_scale or max_grad_norm: the norm pass runs, a non-finite gradient skips
    double max_grad_norm = 0.0;  // 0: no clipping

    const std::vector<std::string>* labels;  // the optimizers' names of the tensors, or nullptr

    Batch(const char* fn, bool multi, std::size_t n, const std::vector<std::string>* labels = nullptr)
        : fn(fn), multi(multi), footprint(fn, multi, (kArrays - 1) * n, labels), labels(labels) {
        tensors.f32.reserve(n);
    }

    // arrays: param, grad, then the state in slot order (None where not given), then
    // param_out (Adam; None or absent when not given).
    void add(std::size_t i, const py::handle* arrays, std::int64_t step, const typename A::Hyper* h) {
        if constexpr (std::is_same_v<A, Adam>) {
            if (is_quantized_state(arrays[2]) || is_quantized_state(arrays[3])) return add_quantized(i, arrays, step, h);
        }
        Slot slots[kArrays] = {kParam, kGrad};
        int used = 2;
        for (int k = 0; k < A::kStates; ++k) {
            slots[2 + k] = A::kStateSlots[k];
            const bool need = A::needs(*h, k);
            if (A::optional(k)) check_optional(arrays[2 + k], need, ArgName{fn, A::kStateSlots[k], i, multi, labels}, A::kOptionalWhen);
            used += need;  // the needed slots are a prefix (descriptors.hpp)
        }
        constexpr bool kAdam = std::is_same_v<A, Adam>;
        const int states = used - 2;
        // validate_tensor reads the handles in slot order: param_out follows the used states.
        py::handle ordered[kArrays];
        for (int k = 0; k < used; ++k) ordered[k] = arrays[k];
        const bool has_out = kAdam && !arrays[2 + A::kStates].is_none();
        if (has_out) {
            slots[used] = kParamOut;
            ordered[used++] = arrays[2 + A::kStates];
        }
        Buffer b[kArrays];
        validate_tensor(fn, i, multi, ordered, slots, used, footprint, b, kAdam, labels);
        char* state[A::kStates] = {};
        for (int k = 0; k < states; ++k) state[k] = b[2 + k].data;
        if constexpr (kAdam) {
            check_adam_dtypes(b, states, has_out, fn, i, multi, labels);
            const bool narrow = is_narrow(b[0].dtype) || b[1].dtype != b[0].dtype || is_narrow(b[2].dtype);
            if (checks_grads && b[0].dtype == DType::f64)
                throw_type(ArgName{fn, kParam, i, multi, labels}.str() +
                           " is float64; grad_scale and max_grad_norm work on float32, bfloat16 and float16 params");
            if (narrow || has_out || checks_grads) {
                AdamMixedTensor& t = mixed.emplace_back();
                t.param = b[0].data;
                t.grad = b[1].data;
                t.exp_avg = state[0];
                t.exp_avg_sq = state[1];
                t.max_exp_avg_sq = state[2];
                t.param_out = has_out ? b[states + 2].data : nullptr;
                t.param_dtype = storage_of(b[0].dtype);
                t.grad_dtype = storage_of(b[1].dtype);
                t.state_dtype = storage_of(b[2].dtype);
                if (has_out) t.param_out_dtype = storage_of(b[states + 2].dtype);
                t.size = b[0].size;
                t.step = step;
                t.hyper = h;
                t.transform = checks_grads ? &transform : nullptr;
                if (checks_grads) grads.push_back(GradView{b[1].data, storage_of(b[1].dtype), b[1].size});
                return;
            }
        }
        const std::uint32_t slot = tensors.add(b[0].dtype, b[0].data, state, b[0].size, h);
        tensors.set_listed(b[0].dtype, slot, b[1].data, step);
    }

    // Adam with QuantizedState exp_avg and exp_avg_sq (docs/design.md, "Quantized states").
    void add_quantized(std::size_t i, const py::handle* arrays, std::int64_t step, const AdamHyperparams* h) {
        const auto name = [&](Slot slot) { return ArgName{fn, slot, i, multi, labels}; };
        for (int k = 2; k < 4; ++k)
            if (!is_quantized_state(arrays[k]))
                throw_type(name(k == 2 ? kExpAvg : kExpAvgSq).str() + " is " + type_name(arrays[k]) + " but " +
                           name(k == 2 ? kExpAvgSq : kExpAvg).bare() +
                           " is a QuantizedState; a param's exp_avg and exp_avg_sq are both quantized (with the same bits) or both arrays");
        if (h->amsgrad)
            throw_value(name(kExpAvg).str() + " is a QuantizedState, which amsgrad=True does not take (its max_exp_avg_sq has no "
                        "quantized form); use float32 or bfloat16 states for amsgrad");
        if (!arrays[4].is_none()) check_optional(arrays[4], false, name(kMaxExpAvgSq), "amsgrad=True");
        const bool has_out = !arrays[5].is_none();
        Slot slots[3] = {kParam, kGrad, kParamOut};
        const py::handle ordered[3] = {arrays[0], arrays[1], arrays[5]};
        Buffer b[3];
        validate_tensor(fn, i, multi, ordered, slots, has_out ? 3 : 2, footprint, b, true, labels);
        check_adam_dtypes(b, 0, has_out, fn, i, multi, labels);
        const QuantizedBuffers m = check_quantized(arrays[2], name(kExpAvg), b[0].size, true);
        const QuantizedBuffers v = check_quantized(arrays[3], name(kExpAvgSq), b[0].size, false);
        if (m.bits != v.bits)
            throw_value(name(kExpAvg).str() + " has " + std::to_string(m.bits) + "-bit codes but " + name(kExpAvgSq).bare() + " " +
                        std::to_string(v.bits) + "-bit ones; a param's two states have the same bits");
        for (const Buffer* q : {&m.codes, &m.absmax}) footprint.add(*q, kExpAvg, i);
        for (const Buffer* q : {&v.codes, &v.absmax}) footprint.add(*q, kExpAvgSq, i);
        AdamMixedTensor& t = mixed.emplace_back();
        t.param = b[0].data;
        t.grad = b[1].data;
        t.exp_avg = m.codes.data;
        t.exp_avg_sq = v.codes.data;
        t.exp_avg_absmax = reinterpret_cast<float*>(m.absmax.data);
        t.exp_avg_sq_absmax = reinterpret_cast<float*>(v.absmax.data);
        t.state_bits = m.bits;
        t.param_out = has_out ? b[2].data : nullptr;
        t.param_dtype = storage_of(b[0].dtype);
        t.grad_dtype = storage_of(b[1].dtype);
        if (has_out) t.param_out_dtype = storage_of(b[2].dtype);
        t.size = b[0].size;
        t.step = step;
        t.hyper = h;
        t.transform = checks_grads ? &transform : nullptr;
        if (checks_grads) grads.push_back(GradView{b[1].data, storage_of(b[1].dtype), b[1].size});
    }

    // Every array is validated: check overlaps, then (grad_scale / max_grad_norm) the norm
    // pass, then write. Returns the gradients' global L2 norm when checks_grads (NaN
    // otherwise); a non-finite norm means a non-finite gradient, and nothing is written.
    double run() {
        footprint.check();
        double norm = std::nan("");
        GilRelease release;
        if (checks_grads) {
            norm = std::sqrt(grad_sq_sum(grads.data(), grads.size(), transform));
            if (!std::isfinite(norm)) return norm;
            // torch.nn.utils.clip_grad_norm_'s coefficient; multiplying by 1 changes no bit.
            const double coef = max_grad_norm > 0.0 ? max_grad_norm / (norm + 1e-6) : 1.0;
            transform.clip = coef < 1.0;
            transform.clip_coef = static_cast<float>(coef);
        }
        tensors.run_listed();
        if (!mixed.empty()) fastadam::adam_step(mixed.data(), mixed.size());
        return norm;
    }

    // The grad_scale / max_grad_norm arguments (Adam); before any add().
    void set_grad_checks(py::handle grad_scale, py::handle max_norm) {
        if (grad_scale && !grad_scale.is_none()) {
            transform.unscale = true;
            const double scale = check_positive(grad_scale, fn, "grad_scale", "gradients are divided by it");
            // (checked before the cast: a double past float's range does not convert)
            if (!(scale <= static_cast<double>(std::numeric_limits<float>::max())) || !(static_cast<float>(scale) > 0.0f))
                throw_value(std::string(fn) + ": grad_scale must be a positive finite float32 number, got " + py::repr(grad_scale).cast<std::string>());
            transform.grad_scale = static_cast<float>(scale);
            checks_grads = true;
        }
        if (max_norm && !max_norm.is_none()) {
            max_grad_norm = check_positive(max_norm, fn, "max_grad_norm", "the largest global L2 norm of the gradients");
            checks_grads = true;
        }
        if (checks_grads) grads.reserve(tensors.f32.capacity());
    }
};

py::object norm_result(bool checks_grads, double norm) { return checks_grads ? py::object(py::float_(norm)) : py::object(py::none()); }

// ----- the functions -------------------------------------------------------------------

// adam_step(param, grad, exp_avg, exp_avg_sq, *, step, max_exp_avg_sq, <table>)
PyObject* adam_step(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return guarded([&] {
        constexpr const char* fn = "adam_step()";
        static const Keywords kw = Keywords::with_hypers<AdamHyperparams>(
            fn, {"param", "grad", "exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq", "param_out", "grad_scale"}, 4, 4);
        py::handle a[Keywords::kMax];
        kw.parse(args, nargs, kwnames, a);
        if (!a[4]) throw_type("adam_step() missing required keyword argument 'step' (the 1-based count of this update)");
        const AdamHyperparams h = hyper_from_args<AdamHyperparams>(a + 8, Where{fn});
        const std::int64_t step = check_step(a[4], ArgName{fn, kStep, 0, false});
        const py::handle arrays[6] = {a[0], a[1], a[2], a[3], none_if_null(a[5]), none_if_null(a[6])};
        Batch<Adam> batch(fn, false, 1);
        batch.set_grad_checks(a[7], py::handle());
        batch.add(0, arrays, step, &h);
        return norm_result(batch.checks_grads, batch.run());
    });
}

// adam_step_multi(params, grads, exp_avgs, exp_avg_sqs, *, steps, max_exp_avg_sqs, <table>)
PyObject* adam_step_multi(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return guarded([&] {
        constexpr const char* fn = "adam_step_multi()";
        static const Keywords kw = Keywords::with_hypers<AdamHyperparams>(
            fn, {"params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs", "params_out", "grad_scale", "max_grad_norm"}, 4,
            4);
        py::handle a[Keywords::kMax];
        kw.parse(args, nargs, kwnames, a);
        if (!a[4]) throw_type("adam_step_multi() missing required keyword argument 'steps' (an int, or one int per tensor)");
        const AdamHyperparams h = hyper_from_args<AdamHyperparams>(a + 9, Where{fn});
        const std::size_t n = check_list(a[0], fn, "params", 0, false);
        check_list(a[1], fn, "grads", n, true);
        check_list(a[2], fn, "exp_avgs", n, true);
        check_list(a[3], fn, "exp_avg_sqs", n, true);
        const py::handle maxes = none_if_null(a[5]);
        if (!maxes.is_none()) check_list(maxes, fn, "max_exp_avg_sqs", n, true);
        if (h.amsgrad == maxes.is_none())
            throw_value(std::string(fn) + (h.amsgrad ? ": max_exp_avg_sqs is required with amsgrad=True (one zero-initialised array per param)"
                                                     : ": max_exp_avg_sqs is only used with amsgrad=True; pass None"));
        const py::handle steps = a[4];
        const bool per_tensor = PyList_Check(steps.ptr()) || PyTuple_Check(steps.ptr());
        if (per_tensor) check_list(steps, fn, "steps", n, true, "ints");
        const std::int64_t common_step = per_tensor ? 0 : check_step(steps, ArgName{fn, kSteps, 0, false});
        const py::handle outs = none_if_null(a[6]);
        if (!outs.is_none()) check_list(outs, fn, "params_out", n, true, "numpy arrays or None");
        Batch<Adam> batch(fn, true, n);
        batch.set_grad_checks(a[7], a[8]);
        for (std::size_t i = 0; i < n; ++i) {
            const py::handle arrays[6] = {item(a[0], i), item(a[1], i), item(a[2], i), item(a[3], i),
                                          maxes.is_none() ? maxes : item(maxes, i), outs.is_none() ? outs : item(outs, i)};
            const std::int64_t step = per_tensor ? check_step(item(steps, i), ArgName{fn, kStep, i, true}) : common_step;
            batch.add(i, arrays, step, &h);
        }
        return norm_result(batch.checks_grads, batch.run());
    });
}

// The optimizers' step counts: one int64 array (NumPy optimizers), or a list of 0-d
// float32/float64/int64 arrays, views of torch's state["step"] tensors (torch adapter),
// counted in their own dtype as torch's _foreach_add_(steps, 1).
class StepCounts {
public:
    StepCounts(py::handle counts, const char* fn, std::size_t n) {
        const int int64_num = py::dtype::of<std::int64_t>().num();
        const auto type_of = [&](const py::array& a) {
            const int num = a.dtype().num();
            return num == py::detail::npy_api::NPY_FLOAT_ ? 'f' : num == py::detail::npy_api::NPY_DOUBLE_ ? 'd' : num == int64_num ? 'q' : 0;
        };
        const auto take = [&](py::handle h, bool one) {
            if (!py::isinstance<py::array>(h)) throw_type(std::string(fn) + ": internal error: step counts must be numpy arrays");
            auto a = py::reinterpret_borrow<py::array>(h);
            const char type = type_of(a);
            if (type == 0 || (one && a.size() != 1) || (!one && type != 'q') || !(a.flags() & py::array::c_style) || !a.writeable())
                throw_value(std::string(fn) + ": internal error: step counts must be writeable int64 (or 0-d float) arrays");
            for (py::ssize_t k = 0; k < a.size(); ++k) refs_.push_back({static_cast<char*>(a.mutable_data()) + k * a.itemsize(), type});
        };
        if (PyList_Check(counts.ptr())) {
            check_list(counts, fn, "counts", n, true);
            for (std::size_t i = 0; i < n; ++i) take(item(counts, i), true);
        } else {
            take(counts, false);
        }
    }
    std::size_t size() const { return refs_.size(); }
    std::int64_t get(std::size_t i, const ArgName& name) const {
        const Ref& r = refs_[i];
        const double v = r.type == 'q' ? static_cast<double>(*reinterpret_cast<const std::int64_t*>(r.data))
                         : r.type == 'f' ? *reinterpret_cast<const float*>(r.data)
                                         : *reinterpret_cast<const double*>(r.data);
        if (!(v >= 0.0 && v < 9.0e15) || v != std::floor(v))
            throw_value(name.str() + " is " + py::repr(py::float_(v)).cast<std::string>() + "; a step count is a whole number >= 0");
        return r.type == 'q' ? *reinterpret_cast<const std::int64_t*>(r.data) : static_cast<std::int64_t>(v);
    }
    void increment(std::size_t i) {
        const Ref& r = refs_[i];
        if (r.type == 'f') *reinterpret_cast<float*>(r.data) += 1.0f;
        else if (r.type == 'd') *reinterpret_cast<double*>(r.data) += 1.0;
        else *reinterpret_cast<std::int64_t*>(r.data) += 1;
    }

private:
    struct Ref {
        char* data;
        char type;
    };
    std::vector<Ref> refs_;
};

// _adam_step_groups(fn, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, params_out, counts,
// indices, group_index, groups, grad_scale, max_grad_norm, rounding_seeds, labels): the NumPy and
// torch optimizers' mixed-precision step (optim.py), adam_step_multi with each tensor's
// hyper-parameters read from its param group, its step count counts[indices[i]] + 1
// (counted here when the step happens, so that no Python code runs between the writes
// and the count) and an optional stochastic-rounding seed. Lists hold one entry per
// tensor (None where absent). Returns as adam_step_multi.
PyObject* adam_step_groups(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return guarded([&] {
        if (nargs != 15 || kwnames || !PyUnicode_Check(args[0])) throw_type("_adam_step_groups() takes 15 positional arguments, the first a str");
        const std::string fn_name = py::cast<std::string>(args[0]);  // the optimizer's step, in errors
        const char* fn = fn_name.c_str();
        ++args;
        const std::size_t n = check_list(args[0], fn, "params", 0, false);
        const char* names[] = {"grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "params_out"};
        for (int k = 1; k <= 5; ++k) check_list(args[k], fn, names[k - 1], n, true);
        check_list(args[7], fn, "indices", n, true);
        check_list(args[8], fn, "group_index", n, true);
        StepCounts counts(args[6], fn, n);
        std::vector<std::string> labels;  // args[13]: how the optimizer names tensor i in errors
        if (args[13] != Py_None) {
            check_list(args[13], fn, "labels", n, true, "str");
            for (std::size_t i = 0; i < n; ++i) labels.push_back(py::cast<std::string>(item(args[13], i)));
        }
        const std::size_t n_groups = check_list(args[9], fn, "groups", 0, false);
        const py::handle seeds = args[12];  // args[13]: labels, read above
        if (!seeds.is_none()) check_list(seeds, fn, "rounding_seeds", n, true);
        std::vector<AdamHyperparams> hypers(n_groups);
        for (std::size_t g = 0; g < n_groups; ++g) hyper_from_group(hypers[g], item(args[9], g).ptr(), Where{fn, static_cast<std::ptrdiff_t>(g)});
        std::vector<std::size_t> index(n);
        Batch<Adam> batch(fn, true, n, labels.empty() && n > 0 ? nullptr : &labels);
        batch.set_grad_checks(args[10], args[11]);
        for (std::size_t i = 0; i < n; ++i) {
            const py::handle arrays[6] = {item(args[0], i), item(args[1], i), item(args[2], i),
                                          item(args[3], i), item(args[4], i), item(args[5], i)};
            index[i] = py::cast<std::size_t>(item(args[7], i));
            const auto g = py::cast<std::size_t>(item(args[8], i));
            if (index[i] >= counts.size() || g >= n_groups) throw_value(std::string(fn) + ": internal error: an index out of range");
            const std::size_t mixed_before = batch.mixed.size();
            batch.add(i, arrays, counts.get(index[i], ArgName{fn, kStep, i, true, batch.labels}) + 1, &hypers[g]);
            const py::handle seed = seeds.is_none() ? seeds : item(seeds, i);
            if (!seed.is_none()) {
                if (batch.mixed.size() == mixed_before || batch.mixed.back().param_dtype != Storage::bfloat16)
                    throw_value(ArgName{fn, kParam, i, true, batch.labels}.str() + ": stochastic rounding is for bfloat16 params only");
                batch.mixed.back().stochastic_rounding = true;
                batch.mixed.back().rounding_seed = py::cast<std::uint64_t>(seed);
            }
        }
        const double norm = batch.run();
        if (!batch.checks_grads || std::isfinite(norm))
            for (std::size_t i = 0; i < n; ++i) counts.increment(index[i]);
        return norm_result(batch.checks_grads, norm);
    });
}

// sgd_step(param, grad, momentum_buffer=None, *, step, <table>)
PyObject* sgd_step(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return guarded([&] {
        constexpr const char* fn = "sgd_step()";
        static const Keywords kw = Keywords::with_hypers<SgdHyperparams>(fn, {"param", "grad", "momentum_buffer", "step"}, 3, 2);
        py::handle a[Keywords::kMax];
        kw.parse(args, nargs, kwnames, a);
        if (!a[3]) throw_type("sgd_step() missing required keyword argument 'step' (the 1-based count of this update)");
        const SgdHyperparams h = hyper_from_args<SgdHyperparams>(a + 4, Where{fn});
        const std::int64_t step = check_step(a[3], ArgName{fn, kStep, 0, false});
        const py::handle arrays[4] = {a[0], a[1], none_if_null(a[2]), py::none()};
        Batch<Sgd> batch(fn, false, 1);
        batch.add(0, arrays, step, &h);
        batch.run();
    });
}

const char* const kAdamStepDoc = R"doc(adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None, maximize=False, param_out=None, grad_scale=None)

One Adam step, in place: updates param, exp_avg, exp_avg_sq (and max_exp_avg_sq with
amsgrad). Returns the gradient's L2 norm (after unscaling) when grad_scale is given,
else None. Bit-identical to fastadam.reference.adam_step.

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

All arrays: numpy.ndarray, C-contiguous, aligned, same shape; the written ones
writeable and not overlapping each other or grad. Nothing is converted or copied:
anything else raises TypeError/ValueError before any write. Hyper-parameters: lr, eps,
weight_decay >= 0 and finite; betas in [0, 1); step >= 1.

Dtypes: all float64, or float32 arithmetic (T = float32 above) with each array stored as
  param     float32, bfloat16 (ml_dtypes) or float16
  grad      the param's dtype, or bfloat16/float16 for a float32 param
  states    float32 or bfloat16 (float16 for float16 params only), one dtype
  param_out bfloat16 or float16, float32 params only: receives the updated param
Loads widen exactly; stores round to nearest even (NaN stays NaN, overflow gives inf).
grad_scale (loss scaling, > 0): g = grad / grad_scale before the formula; a gradient
holding inf or NaN then skips the step (nothing written, the norm returned is not finite).
)doc";

const char* const kAdamStepMultiDoc = R"doc(adam_step_multi(params, grads, exp_avgs, exp_avg_sqs, *, steps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sqs=None, maximize=False, params_out=None, grad_scale=None, max_grad_norm=None)

Adam steps on many tensors in one native call: lists of arrays, one entry per tensor
(dtypes may differ between tensors), ``steps`` an int for all or one int per tensor.
Every array is validated before any is written; then the GIL is released once and the
elements of all tensors are split across threads. Same formula and rules as adam_step;
tensors may share one (read-only) gradient array. ``params_out``: one bfloat16/float16
array or None per tensor.

With grad_scale or max_grad_norm (float32 arithmetic only), one read-only pass first
computes the global L2 norm of all gradients (after unscaling), in a fixed order
(fastadam.reference.grad_sq_sum), and returns it. A non-finite norm skips the whole
step. With max_grad_norm, every gradient is then multiplied by torch's clip_grad_norm_
coefficient max_grad_norm / (norm + 1e-6) where that is below 1.
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

PyCFunction fastcall(PyObject* (*f)(PyObject*, PyObject* const*, Py_ssize_t, PyObject*)) {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

PyMethodDef kMethods[] = {
    {"adam_step", fastcall(&adam_step), METH_FASTCALL | METH_KEYWORDS, kAdamStepDoc},
    {"adam_step_multi", fastcall(&adam_step_multi), METH_FASTCALL | METH_KEYWORDS, kAdamStepMultiDoc},
    {"sgd_step", fastcall(&sgd_step), METH_FASTCALL | METH_KEYWORDS, kSgdStepDoc},
    {"_adam_step_groups", fastcall(&adam_step_groups), METH_FASTCALL | METH_KEYWORDS, "The optimizers' mixed-precision step (functional.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* functional_methods() { return kMethods; }

// _grad_sq_block_sums(grads, grad_scale=None): the norm pass's block sums (fastadam.hpp,
// grad_sq_block_sums) as a float64 array, for fastadam.distributed, whose ranks each hold
// a shard of the gradients and add every rank's sums in order (the one-process norm).
py::array_t<double> grad_sq_block_sums(const py::handle& grads, const py::handle& grad_scale) {
    constexpr const char* fn = "_grad_sq_block_sums()";
    const std::size_t n = check_list(grads, fn, "grads", 0, false);
    std::vector<GradView> views(n);
    for (std::size_t i = 0; i < n; ++i) {
        const ArgName name{fn, kGrad, i, true};
        const Buffer b = check_array(item(grads, i), name, false, true);
        if (b.dtype == DType::f64) throw_type(name.str() + " is float64; the norm pass takes float32, bfloat16 and float16 gradients");
        views[i] = GradView{b.data, storage_of(b.dtype), b.size};
    }
    GradTransform transform;
    if (!grad_scale.is_none()) {
        const double scale = check_positive(grad_scale, fn, "grad_scale", "gradients are divided by it");
        if (!(scale <= static_cast<double>(std::numeric_limits<float>::max())) || !(static_cast<float>(scale) > 0.0f))
            throw_value(std::string(fn) + ": grad_scale must be a positive finite float32 number, got " + py::repr(grad_scale).cast<std::string>());
        transform.unscale = true;
        transform.grad_scale = static_cast<float>(scale);
    }
    py::array_t<double> out(static_cast<py::ssize_t>(fastadam::grad_sq_block_count(views.data(), n)));
    double* data = out.mutable_data();
    {
        GilRelease release;
        fastadam::grad_sq_block_sums(views.data(), n, transform, data);
    }
    return out;
}

// Test hook (tests/test_exact_sqrt.py): the square root of the current path's FMA lanes.
void lane_sqrt(const py::array& x, py::array& out, const py::object& estimate) {
    const auto is_f32 = [&](const py::handle& h, bool writeable) {
        if (!py::isinstance<py::array>(h)) return false;
        const auto a = py::reinterpret_borrow<py::array>(h);
        return a.dtype().is(py::dtype::of<float>()) && (a.flags() & py::array::c_style) && a.size() == x.size() &&
               (!writeable || a.writeable());
    };
    if (!is_f32(x, false) || !is_f32(out, true) || (!estimate.is_none() && !is_f32(estimate, false)))
        throw_value("_lane_sqrt(): x, out and estimate must be C-contiguous float32 arrays of one size, out writeable");
    const float* est = estimate.is_none() ? nullptr : static_cast<const float*>(py::array(estimate).data());
    fastadam::lane_sqrt(static_cast<const float*>(x.data()), est, static_cast<float*>(out.mutable_data()), x.size(), fastadam::get_isa());
}


}  // namespace fastadam::bindings
