// What the kernel is handed, per algorithm: each algorithm's state slots and descriptor
// fields (Adam, Sgd), and the descriptors of one call by dtype (Descriptors).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "arrays.hpp"
#include "fastadam/fastadam.hpp"

namespace fastadam::bindings {

// The GIL released around a kernel call. Unlike pybind11's gil_scoped_release, the
// destructor may throw: a daemon thread that re-takes the GIL while the interpreter
// exits is ended by Python with pthread_exit, an unwind that a noexcept destructor
// turned into std::terminate (the whole process aborted, exit code 134).
class GilRelease {
public:
    GilRelease() : state_(PyEval_SaveThread()) {}
    ~GilRelease() noexcept(false) { PyEval_RestoreThread(state_); }
    GilRelease(const GilRelease&) = delete;
    GilRelease& operator=(const GilRelease&) = delete;

private:
    PyThreadState* state_;
};

struct Adam {
    using Hyper = AdamHyperparams;
    template <class T>
    using Tensor = AdamTensor<T>;
    static constexpr int kStates = 3;
    static constexpr Slot kStateSlots[kStates] = {kExpAvg, kExpAvgSq, kMaxExpAvgSq};
    // Only the last slot is optional, so the slots a step uses are always a prefix.
    static constexpr const char* kOptionalWhen = "amsgrad=True";
    static constexpr bool optional(int k) { return k == 2; }
    static bool needs(const Hyper& h, int k) { return k < 2 || h.amsgrad; }

    // The descriptor's fields that do not change between steps (not grad, not step).
    template <class T>
    static void fill(Tensor<T>& t, char* param, char* const* state, std::int64_t size, const Hyper* h) {
        t.param = reinterpret_cast<T*>(param);
        t.exp_avg = reinterpret_cast<T*>(state[0]);
        t.exp_avg_sq = reinterpret_cast<T*>(state[1]);
        t.max_exp_avg_sq = reinterpret_cast<T*>(state[2]);  // read only when amsgrad
        t.size = size;
        t.hyper = h;
    }
    template <class T>
    static void set_step(Tensor<T>& t, std::int64_t step) { t.step = step; }
    template <class T>
    static void kernel(const Tensor<T>* t, std::size_t n) { fastadam::adam_step(t, n); }
    template <class T>
    static void kernel(const Tensor<T>* t, const T* const* grads, const std::int64_t* steps, std::size_t n) {
        fastadam::adam_step(t, grads, steps, n);
    }
};

struct Sgd {
    using Hyper = SgdHyperparams;
    template <class T>
    using Tensor = SgdTensor<T>;
    static constexpr int kStates = 1;
    static constexpr Slot kStateSlots[kStates] = {kMomentumBuffer};
    static constexpr const char* kOptionalWhen = "momentum != 0";
    static constexpr bool optional(int) { return true; }
    static bool needs(const Hyper& h, int) { return h.momentum != 0.0; }

    template <class T>
    static void fill(Tensor<T>& t, char* param, char* const* state, std::int64_t size, const Hyper* h) {
        t.param = reinterpret_cast<T*>(param);
        t.momentum_buffer = reinterpret_cast<T*>(state[0]);  // used only when momentum != 0
        t.size = size;
        t.hyper = h;
    }
    // step == 1: the buffer is new and becomes the gradient (torch clones it).
    template <class T>
    static void set_step(Tensor<T>& t, std::int64_t step) { t.first_step = step == 1; }
    template <class T>
    static void kernel(const Tensor<T>* t, std::size_t n) { fastadam::sgd_step(t, n); }
    template <class T>
    static void kernel(const Tensor<T>* t, const T* const* grads, const std::int64_t* steps, std::size_t n) {
        fastadam::sgd_step(t, grads, steps, n);
    }
};

// The kernel descriptors of one call, by dtype. A one-shot call writes grad and step
// into each descriptor and runs run_listed(); a StepPlan keeps its descriptors and
// writes only this step's grads and counts beside them (keep(), set(), run_kept()):
// rewriting 64 bytes per tensor per step moved each descriptor's cache line between cores.
template <class A>
struct Descriptors {
    using Hyper = typename A::Hyper;
    std::vector<typename A::template Tensor<float>> f32;
    std::vector<typename A::template Tensor<double>> f64;
    std::vector<const float*> grads_f32;
    std::vector<const double*> grads_f64;
    std::vector<std::int64_t> steps_f32, steps_f64;

    // Adds a tensor; returns its slot among the tensors of its dtype.
    std::uint32_t add(DType dtype, char* param, char* const* state, std::int64_t size, const Hyper* h) {
        if (dtype == DType::f32) {
            A::fill(f32.emplace_back(), param, state, size, h);
            return static_cast<std::uint32_t>(f32.size() - 1);
        }
        A::fill(f64.emplace_back(), param, state, size, h);
        return static_cast<std::uint32_t>(f64.size() - 1);
    }

    // One-shot: this call's gradient and 1-based count, in the descriptor itself.
    void set_listed(DType dtype, std::uint32_t slot, const char* grad, std::int64_t step) {
        if (dtype == DType::f32) set_in(f32[slot], grad, step);
        else set_in(f64[slot], grad, step);
    }
    void run_listed() {  // with the GIL released by the caller
        if (!f32.empty()) A::kernel(f32.data(), f32.size());
        if (!f64.empty()) A::kernel(f64.data(), f64.size());
    }

    // Kept: sizes the per-step arrays once every tensor is added.
    void keep() {
        grads_f32.assign(f32.size(), nullptr);
        steps_f32.assign(f32.size(), 0);
        grads_f64.assign(f64.size(), nullptr);
        steps_f64.assign(f64.size(), 0);
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
    void run_kept() {
        GilRelease release;
        if (!f32.empty()) A::kernel(f32.data(), grads_f32.data(), steps_f32.data(), f32.size());
        if (!f64.empty()) A::kernel(f64.data(), grads_f64.data(), steps_f64.data(), f64.size());
    }

private:
    template <class Tensor>
    static void set_in(Tensor& t, const char* grad, std::int64_t step) {
        using T = std::remove_pointer_t<decltype(t.param)>;
        t.grad = reinterpret_cast<const T*>(grad);
        A::set_step(t, step);
    }
    static void prefetch_lines(const void* data, std::size_t bytes) {
        const char* p = static_cast<const char*>(data);
        for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1);
    }
};

}  // namespace fastadam::bindings
