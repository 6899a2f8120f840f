// _StepPlan (step_plan.hpp): construction, the hyper-parameters, and numpy mode.
#include "step_plan.hpp"

#include <stdexcept>

#include "hyper.hpp"

namespace fastadam::bindings {

namespace {

bool is_adam(const std::string& kind, const std::string& fn) {
    if (kind == "adam") return true;
    if (kind == "sgd") return false;
    throw_value(fn + ": kind must be 'adam' or 'sgd', got '" + kind + "'");
}

std::vector<std::string> read_labels(py::handle labels, const std::string& fn) {
    std::vector<std::string> out;
    if (labels.is_none()) return out;
    const std::size_t n = check_list(labels, fn.c_str(), "labels", 0, false, "str");
    for (std::size_t i = 0; i < n; ++i) {
        py::handle s = item(labels, i);
        if (!PyUnicode_Check(s.ptr())) throw_type(fn + ": labels[" + std::to_string(i) + "] must be a str, got " + type_name(s));
        out.push_back(s.cast<std::string>());
    }
    return out;
}

std::int64_t* check_steps_array(py::handle steps, const char* fn, std::size_t n) {
    if (!py::isinstance<py::array>(steps)) throw_type(std::string(fn) + ": internal step counts must be an int64 array");
    auto a = py::reinterpret_borrow<py::array>(steps);
    if (a.dtype().num() != py::dtype::of<std::int64_t>().num() || !(a.flags() & py::array::c_style) || !a.writeable() ||
        static_cast<std::size_t>(a.size()) != n)
        throw_value(std::string(fn) + ": internal step counts must be a writeable C-contiguous int64 array, one per param");
    return static_cast<std::int64_t*>(a.mutable_data());
}

}  // namespace

StepPlan::StepPlan(const std::string& kind, std::string fn, py::list params, py::list states, py::list group_sizes,
                   py::object labels, py::object torch)
    : adam_(is_adam(kind, fn)), fn_(std::move(fn)), labels_(read_labels(labels, fn_)), params_(params), states_(states),
      n_groups_(group_sizes.size()), footprint_(fn_.c_str(), true, 5 * params.size(), labels_.empty() ? nullptr : &labels_) {
    const char* fn_c = fn_.c_str();
    const std::size_t n = check_list(params, fn_c, "params", 0, false);
    if (!labels.is_none() && labels_.size() != n) throw_value(fn_ + ": labels has " + std::to_string(labels_.size()) + " entries but params has " + std::to_string(n));
    const std::size_t n_states = adam_ ? Adam::kStates : Sgd::kStates;
    if (states.size() != n_states) throw_value(fn_ + ": internal error: " + kind + " takes " + std::to_string(n_states) + " state lists");
    for (std::size_t k = 0; k < n_states; ++k) check_list(states[k], fn_c, "states", n, true);
    const Slot* state_slots = adam_ ? Adam::kStateSlots : Sgd::kStateSlots;
    entries_.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
        Entry& e = entries_[i];
        const ArgName param_name = name(kParam, i);
        const Buffer p = check_array(item(params, i), param_name, true);
        footprint_.add(p, kParam, i);
        e.param = p;
        auto a = py::reinterpret_borrow<py::array>(p.obj);
        e.shape_begin = shapes_.size();
        for (py::ssize_t d = 0; d < a.ndim(); ++d) shapes_.push_back(a.shape(d));
        e.ndim = static_cast<int>(a.ndim());
        e.descr = py::reinterpret_borrow<py::object>(py::detail::array_proxy(p.obj)->descr);
        for (std::size_t k = 0; k < n_states; ++k) {
            py::handle h = item(states[k], i);
            if (h.is_none()) continue;
            const ArgName arg = name(state_slots[k], i);
            const Buffer b = check_array(h, arg, true);
            check_same_shape(b, p, arg, param_name);
            footprint_.add(b, arg.slot, i);
            e.state[k] = b.data;
        }
    }
    if (!torch.is_none()) build_torch(torch);
    footprint_.freeze();  // params, state and steps: no byte shared

    if (static_cast<std::size_t>(py::len(group_sizes)) != n_groups_) throw_value(fn_ + ": internal error: one size per group expected");
    for (std::size_t g = 0; g < n_groups_; ++g) {
        group_sizes_.push_back(py::cast<std::size_t>(group_sizes[g]));
        group_of_.insert(group_of_.end(), group_sizes_.back(), g);
    }
    if (group_of_.size() != n) throw_value(fn_ + ": internal error: group sizes do not add up to the number of params");

    adam_hypers_.resize(adam_ ? n_groups_ : 0);
    sgd_hypers_.resize(adam_ ? 0 : n_groups_);
    for (std::size_t i = 0; i < n; ++i) {
        Entry& e = entries_[i];
        const std::size_t g = group_of_[i];
        e.slot = adam_ ? adam_kept_.add(e.param.dtype, e.param.data, e.state, e.param.size, &adam_hypers_[g])
                       : sgd_kept_.add(e.param.dtype, e.param.data, e.state, e.param.size, &sgd_hypers_[g]);
    }
    adam_kept_.keep();
    sgd_kept_.keep();
    stepped_.assign(n, 0);
}

StepPlan::~StepPlan() = default;

std::size_t StepPlan::check_groups(py::handle groups) const {
    if (!PyList_Check(groups.ptr()) && !PyTuple_Check(groups.ptr()))
        throw_type(fn_ + ": groups must be the list of param-group dicts, got " + type_name(groups));
    return static_cast<std::size_t>(Py_SIZE(groups.ptr()));
}

bool StepPlan::groups_hold_params(py::handle groups) const {
    static PyObject* const params_key = PyUnicode_InternFromString("params");
    if (check_groups(groups) != n_groups_) return false;
    for (std::size_t g = 0, i = 0; g < n_groups_; ++g) {
        PyObject* group = PySequence_Fast_GET_ITEM(groups.ptr(), g);
        if (!PyDict_Check(group)) throw_type(fn_ + ": param_groups[" + std::to_string(g) + "] must be a dict, got " + type_name(group));
        PyObject* ps = PyDict_GetItemWithError(group, params_key);  // borrowed
        if (ps == nullptr) {
            if (PyErr_Occurred()) throw py::error_already_set();
            return false;
        }
        if (!(PyList_Check(ps) || PyTuple_Check(ps)) || static_cast<std::size_t>(Py_SIZE(ps)) != group_sizes_[g]) return false;
        PyObject* const* items = PySequence_Fast_ITEMS(ps);
        for (std::size_t j = 0; j < group_sizes_[g]; ++j, ++i)
            if (items[j] != (torch_ ? torch_->t[i].tensor : PyList_GET_ITEM(params_.ptr(), i))) return false;
    }
    return true;
}

void StepPlan::read_hypers(py::handle groups) {
    for (std::size_t g = 0; g < n_groups_; ++g) {
        const Where where{fn_.c_str(), static_cast<std::ptrdiff_t>(g)};
        if (adam_) hyper_from_group(adam_hypers_[g], item(groups, g).ptr(), where);
        else hyper_from_group(sgd_hypers_[g], item(groups, g).ptr(), where);
    }
}

bool StepPlan::state_missing(std::size_t i) const {
    const Entry& e = entries_[i];
    if (!adam_) return Sgd::needs(sgd_hypers_[group_of_[i]], 0) && !e.state[0];
    const AdamHyperparams& h = adam_hypers_[group_of_[i]];
    for (int k = 0; k < Adam::kStates; ++k)
        if (Adam::needs(h, k) && !e.state[k]) return true;
    return false;
}

void StepPlan::check_grad_overlap(Entry& e, std::size_t i, const char* data) {
    if (data != e.checked_grad || e.param.nbytes != e.checked_grad_bytes) {
        footprint_.check_read_against_frozen(data, e.param.nbytes, i);
        e.checked_grad = data;
        e.checked_grad_bytes = e.param.nbytes;
    }
}

// The usual gradient, recognised from its array header alone: the param's own array
// type and dtype object, C-contiguous, aligned, the param's shape. Anything else takes
// check_array, which accepts it (another equal dtype object, a subclass) or raises the
// error that names the problem.
bool StepPlan::plain_grad(PyObject* g, const Entry& e) const {
    const auto* a = py::detail::array_proxy(g);
    constexpr int needed = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ | py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    if (Py_TYPE(g) != Py_TYPE(e.param.obj) || a->descr != e.descr.ptr() || (a->flags & needed) != needed || a->nd != e.ndim) return false;
    const py::ssize_t* shape = shapes_.data() + e.shape_begin;  // one past the end for a trailing 0-d param
    bool same = true;
    for (int d = 0; d < e.ndim; ++d) same &= a->dimensions[d] == shape[d];  // no memcmp call for 1-4 dims
    return same;
}

// Validates gradient i and that param i is still the writeable buffer it was; returns its data.
const char* StepPlan::numpy_grad(std::size_t i, py::handle g) {
    Entry& e = entries_[i];
    PyObject* p = e.param.obj;  // kept alive by params_
    const auto* pa = py::detail::array_proxy(p);
    bool same_shape = pa->nd == e.ndim;  // resize(refcheck=False) may shrink it in place, at the same address
    for (int d = 0; same_shape && d < e.ndim; ++d) same_shape = pa->dimensions[d] == shapes_[e.shape_begin + d];
    if (pa->data != e.param.data || !same_shape)  // resized with refcheck=False
        throw_value(name(kParam, i).str() + " was resized or reallocated since the optimizer was built; its state no longer "
                    "matches it (build a new optimizer for the new array)");
    if (!(py::detail::array_proxy(p)->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_))
        throw_value(name(kParam, i).str() + " is read-only; fastadam writes it in place: pass a writeable array");
    const char* data;
    if (plain_grad(g.ptr(), e)) {
        data = py::detail::array_proxy(g.ptr())->data;
    } else {
        const ArgName arg = name(kGrad, i), param_name = name(kParam, i);
        const Buffer b = check_array(g, arg, false);
        if (b.dtype != e.param.dtype)
            throw_type(arg.str() + " has dtype " + dtype_name(b.dtype) + " but " + param_name.bare() + " has dtype " +
                       dtype_name(e.param.dtype) + "; a parameter, its gradient and its state must share one dtype");
        auto ga = py::reinterpret_borrow<py::array>(g);
        bool same = ga.ndim() == e.ndim;
        for (int d = 0; same && d < e.ndim; ++d) same = ga.shape(d) == shapes_[e.shape_begin + d];
        if (!same) check_same_shape(b, e.param, arg, param_name);  // raises with both shapes
        data = b.data;
    }
    check_grad_overlap(e, i, data);
    return data;
}

bool StepPlan::step(py::handle grads, py::handle steps, py::handle groups) {
    const char* fn = fn_.c_str();
    const std::size_t n = entries_.size();
    check_list(grads, fn, "grads", n, true);
    std::int64_t* counts = check_steps_array(steps, fn, n);
    if (!groups_hold_params(groups)) return false;
    read_hypers(groups);
    prefetch();
    for (std::size_t i = 0; i < n; ++i) {
        const Entry& e = entries_[i];
        py::handle g = item(grads, i);
        stepped_[i] = !g.is_none();
        if (!stepped_[i]) {
            set_kept(e, nullptr, 0);
            continue;
        }
        const char* data = numpy_grad(i, g);
        if (state_missing(i)) throw std::runtime_error(fn_ + ": stale plan: " + name(kParam, i).bare() + " has a gradient but no state");
        set_kept(e, data, counts[i] + 1);
    }
    launch();
    for (std::size_t i = 0; i < n; ++i) counts[i] += stepped_[i];
    ++completed_;
    return true;
}

}  // namespace fastadam::bindings
