// The hyper-parameter table (hyper.hpp) and its value checks.
#include "hyper.hpp"

#include <cmath>
#include <cstring>
#include <iterator>

#include "arrays.hpp"

namespace fastadam::bindings {

namespace {

using fastadam::AdamHyperparams;
using fastadam::SgdHyperparams;
using A = AdamHyperparams;
using S = SgdHyperparams;

const HyperRow<A> kAdamRows[] = {
    {"lr", Rule::nonnegative, &A::lr, nullptr, nullptr, false, "learning rate: the step length in parameter units"},
    {"betas", Rule::unit_pair, &A::beta1, &A::beta2, nullptr, false, "decay rates of exp_avg and exp_avg_sq"},
    {"eps", Rule::nonnegative, &A::eps, nullptr, nullptr, false, "added to the bias-corrected sqrt(exp_avg_sq), gradient units"},
    {"weight_decay", Rule::nonnegative, &A::weight_decay, nullptr, nullptr, false, "L2 coefficient, or decoupled decay rate (AdamW)"},
    {"decoupled_weight_decay", Rule::flag, nullptr, nullptr, &A::decoupled_weight_decay, false, "AdamW: p *= 1 - lr*weight_decay"},
    {"amsgrad", Rule::flag, nullptr, nullptr, &A::amsgrad, false, "keep max_exp_avg_sq, the running maximum of exp_avg_sq"},
    {"maximize", Rule::flag, nullptr, nullptr, &A::maximize, false, "ascend instead of descend"},
};

const HyperRow<S> kSgdRows[] = {
    {"lr", Rule::nonnegative, &S::lr, nullptr, nullptr, true, "learning rate, parameter units per gradient unit"},
    {"momentum", Rule::nonnegative, &S::momentum, nullptr, nullptr, false, "momentum factor (0: no momentum_buffer)"},
    {"dampening", Rule::real, &S::dampening, nullptr, nullptr, false, "the gradient's weight in the buffer is 1 - dampening"},
    {"weight_decay", Rule::nonnegative, &S::weight_decay, nullptr, nullptr, false, "L2 coefficient"},
    {"nesterov", Rule::flag, nullptr, nullptr, &S::nesterov, false, "Nesterov momentum"},
    {"maximize", Rule::flag, nullptr, nullptr, &S::maximize, false, "ascend instead of descend"},
};

// Cross-field rules, next to the rows they join.
void sgd_cross_check(const S& h, const Where& where) {
    if (h.nesterov && (h.momentum <= 0 || h.dampening != 0))
        throw_value(where.str() + ": nesterov=True requires momentum > 0 and dampening = 0");
}

template <class H, std::size_t N>
PyObject* const* intern(const HyperRow<H> (&rows)[N]) {
    auto** keys = new PyObject*[N];  // immortal, as the module is
    for (std::size_t k = 0; k < N; ++k) keys[k] = PyUnicode_InternFromString(rows[k].name);
    return keys;
}

// ----- value checks --------------------------------------------------------------------

double check_real(PyObject* o, const Where& where, const char* name) {
    if (PyBool_Check(o) || PyComplex_Check(o) || !(PyFloat_Check(o) || PyLong_Check(o) || PyNumber_Check(o)))
        throw_type(where.str() + ": " + name + " must be a real number, got " + Py_TYPE(o)->tp_name);
    const double v = PyFloat_Check(o) ? PyFloat_AS_DOUBLE(o) : PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw_type(where.str() + ": " + name + " must be a real number, got " + Py_TYPE(o)->tp_name);
    }
    if (!std::isfinite(v)) throw_value(where.str() + ": " + name + " must be finite, got " + std::string(py::repr(o)));
    return v;
}

double check_nonnegative(PyObject* o, const Where& where, const char* name) {
    const double v = check_real(o, where, name);
    if (v < 0) throw_value(where.str() + ": " + name + " must be >= 0, got " + std::string(py::repr(o)));
    return v;
}

bool check_bool(PyObject* o, const Where& where, const char* name) {
    if (o == Py_True) return true;
    if (o == Py_False) return false;
    const char* type = Py_TYPE(o)->tp_name;
    if (std::strcmp(type, "numpy.bool") == 0 || std::strcmp(type, "numpy.bool_") == 0) return PyObject_IsTrue(o) == 1;
    throw_type(where.str() + ": " + name + " must be True or False, got " + std::string(py::repr(o)));
}

template <class H>
void set_field(H& h, const HyperRow<H>& row, PyObject* o, const Where& where) {
    switch (row.rule) {
    case Rule::real: h.*row.value = check_real(o, where, row.name); break;
    case Rule::nonnegative: h.*row.value = check_nonnegative(o, where, row.name); break;
    case Rule::flag: h.*row.flag = check_bool(o, where, row.name); break;
    case Rule::unit_pair: {
        if (!(PyTuple_Check(o) || PyList_Check(o)) || Py_SIZE(o) != 2)
            throw_type(where.str() + ": " + row.name + " must be a pair (beta1, beta2), got " + std::string(py::repr(o)));
        const std::string first = std::string(row.name) + "[0]", second = std::string(row.name) + "[1]";
        const double a = check_real(PySequence_Fast_GET_ITEM(o, 0), where, first.c_str());
        const double b = check_real(PySequence_Fast_GET_ITEM(o, 1), where, second.c_str());
        for (double v : {a, b})
            if (!(v >= 0.0 && v < 1.0)) throw_value(where.str() + ": " + row.name + " must lie in [0, 1), got " + std::string(py::repr(o)));
        h.*row.value = a;
        h.*row.second = b;
        break;
    }
    }
}

// A new reference to group[key], or null when the key is absent.
PyObject* lookup(PyObject* group, PyObject* key, const Where& where) {
    if (PyDict_Check(group)) {
        PyObject* v = PyDict_GetItemWithError(group, key);
        if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
        Py_XINCREF(v);
        return v;
    }
    if (!PyMapping_Check(group)) throw_type(where.str() + ": a param group must be a dict, got " + Py_TYPE(group)->tp_name);
    PyObject* v = PyObject_GetItem(group, key);
    if (v == nullptr) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) throw py::error_already_set();
        PyErr_Clear();
    }
    return v;
}

}  // namespace

template <>
const HyperTable<A>& hyper_table<A>() {
    static const HyperTable<A> table{"adam", kAdamRows, std::size(kAdamRows), nullptr, intern(kAdamRows)};
    return table;
}

template <>
const HyperTable<S>& hyper_table<S>() {
    static const HyperTable<S> table{"sgd", kSgdRows, std::size(kSgdRows), sgd_cross_check, intern(kSgdRows)};
    return table;
}

template <class H>
H hyper_from_args(const py::handle* values, const Where& where) {
    const HyperTable<H>& t = hyper_table<H>();
    H h;
    for (std::size_t k = 0; k < t.size; ++k) {
        if (values[k]) set_field(h, t.rows[k], values[k].ptr(), where);
        else if (t.rows[k].required) throw_type(where.str() + ": missing required argument " + t.rows[k].name);
    }
    if (t.cross_check) t.cross_check(h, where);
    return h;
}

template <class H>
void hyper_from_group(H& h, PyObject* group, const Where& where) {
    const HyperTable<H>& t = hyper_table<H>();
    for (std::size_t k = 0; k < t.size; ++k) {
        const py::object v = py::reinterpret_steal<py::object>(lookup(group, t.keys[k], where));
        if (!v) throw_value(where.str() + ": param group has no '" + t.rows[k].name + "'");
        set_field(h, t.rows[k], v.ptr(), where);
    }
    if (t.cross_check) t.cross_check(h, where);
}

template A hyper_from_args<A>(const py::handle*, const Where&);
template S hyper_from_args<S>(const py::handle*, const Where&);
template void hyper_from_group<A>(A&, PyObject*, const Where&);
template void hyper_from_group<S>(S&, PyObject*, const Where&);

namespace {
template <class F>
auto by_kind(const std::string& kind, const char* fn, F f) {
    if (kind == "adam") return f(A{});
    if (kind == "sgd") return f(S{});
    throw_value(std::string(fn) + ": kind must be 'adam' or 'sgd', got '" + kind + "'");
}
}  // namespace

void check_group(const std::string& kind, py::handle group, const std::string& where) {
    by_kind(kind, "_check_group()", [&](auto h) { hyper_from_group(h, group.ptr(), Where{where.c_str()}); });
}

py::tuple hyper_names(const std::string& kind) {
    return by_kind(kind, "_hyper_names()", [](auto h) {
        const auto& t = hyper_table<decltype(h)>();
        py::tuple out(t.size);
        for (std::size_t k = 0; k < t.size; ++k) out[k] = py::reinterpret_borrow<py::object>(t.keys[k]);
        return out;
    });
}

}  // namespace fastadam::bindings
