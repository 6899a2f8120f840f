// _core._StepPlan: an optimizer's params and state, validated once and kept between
// steps (the optimizer rebuilds it whenever its params or state change). A step then
// checks only what the caller can change: the gradients, the hyper-parameters, and
// that each param is still the buffer it was. Touching five arrays per tensor per step
// would cost more than the update itself on a model of many small tensors.
//
// Two modes: numpy (step(): the caller hands gradients and an int64 count array) and
// torch (torch_step(): the plan reads each parameter's .grad and state['step'] itself).
// The plan is the one owner of step counting. It is private to one optimizer, whose
// Python lock keeps it to one step at a time (it is read with the GIL released).
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "descriptors.hpp"
#include "torch_meta.h"

namespace fastadam::bindings {

class StepPlan {
public:
    // kind "adam" (states: exp_avgs, exp_avg_sqs, max_exp_avg_sqs) or "sgd" (states:
    // momentum_buffers), None where a tensor has no such buffer yet. labels[i] names
    // tensor i in errors (None: "params[i]", "grads[i]"...). torch: see step_plan_torch.cpp.
    StepPlan(const std::string& kind, std::string fn, py::list params, py::list states, py::list group_sizes,
             py::object labels, py::object torch);
    ~StepPlan();
    StepPlan(const StepPlan&) = delete;
    StepPlan& operator=(const StepPlan&) = delete;

    // numpy mode: grads aligned with params (None: skip), steps the int64 counts
    // (steps[i] += 1 after the kernel ran for each updated tensor), groups the param-group dicts.
    // A torch-mode plan takes it too (SGD's first step with new momentum buffers: count 0).
    // false, having written nothing, when the groups no longer hold this plan's params.
    bool step(py::handle grads, py::handle steps, py::handle groups);
    // torch mode: false, having written nothing, when the plan is stale; true after a step.
    bool torch_step(py::handle groups);
    // Steps this plan has applied, counted with the step itself: after a KeyboardInterrupt
    // the optimizer keeps state created for a step that happened, and removes it otherwise.
    std::uint64_t completed() const { return completed_; }
    // A torch-mode plan that reads tensors through the torch helper (torch_meta.h).
    bool torch_helper() const { return torch_ && torch_->meta != nullptr; }

private:
    struct Entry {
        Buffer param;
        char* state[3] = {nullptr, nullptr, nullptr};
        py::object descr;  // the param's dtype object (held: compared by identity)
        std::size_t shape_begin = 0;
        int ndim = 0;
        // The last gradient range found not to overlap params and state (which do not
        // change during the plan's life): fixed gradient buffers skip the search.
        const char* checked_grad = nullptr;
        std::int64_t checked_grad_bytes = -1;
        std::uint32_t slot = 0;  // index among the kept descriptors of its dtype
    };
    // Torch mode's view of the parameters, taken at build (step_plan_torch.cpp).
    struct Torch {
        py::tuple tensors;  // the torch parameters in plan order, compared by identity each step
        py::object tensor_type, strided, grad_error, bump_versions, data_ptr;
        py::object step_arrays;  // keeps the 0-d views of state['step'] alive
        struct Tensor {
            PyObject* tensor = nullptr;   // borrowed from `tensors`
            std::uintptr_t param_ptr = 0;
            py::object grad;              // weak reference to the last validated gradient, or null
            std::uintptr_t grad_ptr = 0;  // its data_ptr() then
            char* step = nullptr;         // state['step'] through a 0-d view; nullptr: none (SGD, or no state yet)
            char step_type = 0;           // 'f' float32, 'd' float64, 'q' int64
            py::object dtype, shape;      // the param's, for a new gradient's checks
        };
        std::vector<Tensor> t;
        // The torch helper (torch_meta.h), or null: then the reads go through torch's Python API.
        const fastadam_torch_meta_api* meta = nullptr;
        std::vector<fastadam_torch_meta> now;  // this step's reads
        std::vector<fastadam_torch_meta> built;  // the params as the plan was built
    };
    ArgName name(Slot slot, std::size_t i) const { return ArgName{fn_.c_str(), slot, i, true, labels_.empty() ? nullptr : &labels_}; }
    std::size_t check_groups(py::handle groups) const;  // a list or tuple; returns its length
    // The groups hold this plan's params, in order (each group's "params" compared by identity).
    bool groups_hold_params(py::handle groups) const;
    void read_hypers(py::handle groups);                  // by name through the table, into adam_/sgd_hypers_
    bool state_missing(std::size_t i) const;              // tensor i lacks state its group's hyper-parameters need
    void check_grad_overlap(Entry& e, std::size_t i, const char* data);
    void set_kept(const Entry& e, const char* grad, std::int64_t count) {
        if (adam_) adam_kept_.set(e.param.dtype, e.slot, grad, count);
        else sgd_kept_.set(e.param.dtype, e.slot, grad, count);
    }
    void prefetch() const {
        if (adam_) adam_kept_.prefetch_for_write();
        else sgd_kept_.prefetch_for_write();
    }
    void launch() {
        if (adam_) adam_kept_.run_kept();
        else sgd_kept_.run_kept();
    }
    bool plain_grad(PyObject* g, const Entry& e) const;
    const char* numpy_grad(std::size_t i, py::handle g);

    // torch mode (step_plan_torch.cpp)
    void build_torch(py::handle torch);
    int torch_tensor(std::size_t i);  // 1: stepped, 0: no gradient, -1: stale
    int torch_tensor_meta(std::size_t i);  // the same through the torch helper
    std::uintptr_t torch_grad(std::size_t i, PyObject* grad);
    [[noreturn]] void raise_grad_error(std::size_t i, PyObject* grad) const;
    std::int64_t torch_count(std::size_t i) const;
    int torch_tensor_meta_quick(std::size_t i);  // torch_tensor_meta on any thread, or 2: the caller's must
    bool torch_count_quick(std::size_t i, std::int64_t* count) const;
    bool torch_read_and_check();  // the helper's reads and the checks of every tensor; false: stale
    void torch_bump_versions();
    void torch_count_steps();    // keeps the old counts in saved_steps_
    void torch_restore_steps();  // puts them back

    bool adam_;
    std::string fn_;
    std::vector<std::string> labels_;
    py::list params_, states_;  // keep every buffer alive while the plan points into it
    std::size_t n_groups_;
    std::vector<std::size_t> group_sizes_, group_of_;
    Footprint footprint_;
    std::vector<Entry> entries_;
    std::vector<py::ssize_t> shapes_;
    std::vector<unsigned char> stepped_;  // this step updates tensor i
    std::vector<std::uint64_t> saved_steps_;  // torch mode: state['step']'s bytes before this step's count
    // One entry per group, sized once (a step refuses another group count): the kept
    // descriptors point into them.
    std::vector<AdamHyperparams> adam_hypers_;
    std::vector<SgdHyperparams> sgd_hypers_;
    Descriptors<Adam> adam_kept_;
    Descriptors<Sgd> sgd_kept_;
    std::unique_ptr<Torch> torch_;
    std::uint64_t completed_ = 0;
};

}  // namespace fastadam::bindings
