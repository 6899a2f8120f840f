// fastadam: the element-wise Adam and SGD update loops, written once.
//
// This header is compiled once per SIMD target (see cpp/src/kernels_isa.cpp): each
// copy lives in its own namespace, fastadam::FASTADAM_ISA_NS, so that no inline or
// template symbol compiled with AVX-512 can be merged by the linker into the
// baseline path. For the same reason nothing in here calls a std:: inline function
// (std::sqrt, std::max): at -O0 those become weak symbols shared across targets.
//
// The loops are plain C++ that GCC, Clang and MSVC vectorise. Every operation is an
// IEEE add, multiply, divide, sqrt or max on one element, so a SIMD lane computes the
// same bits as the scalar tail, as any other target, and as the NumPy reference,
// provided the translation unit is compiled with -ffp-contract=off (no FMA).
#pragma once

#include <cstdint>

#include "fastadam/types.hpp"

#ifndef FASTADAM_ISA_NS
#define FASTADAM_ISA_NS generic
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define FASTADAM_RESTRICT __restrict
#else
#define FASTADAM_RESTRICT __restrict__
#endif

namespace fastadam {
namespace FASTADAM_ISA_NS {

inline float ieee_sqrt(float x) {
#if defined(__GNUC__)
    return __builtin_sqrtf(x);
#else
    return sqrtf(x);
#endif
}
inline double ieee_sqrt(double x) {
#if defined(__GNUC__)
    return __builtin_sqrt(x);
#else
    return sqrt(x);
#endif
}

// NaN-propagating maximum, as numpy.maximum and torch.maximum.
template <class T>
inline T nan_max(T a, T b) {
    return (b > a || b != b) ? b : a;
}

enum class WeightDecay { none, l2, decoupled };

// The documented order of operations (README, fastadam.reference): each line is
// one IEEE operation on the array dtype T, left to right.
template <class T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE>
void adam_loop(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t begin, std::int64_t end) {
    T* FASTADAM_RESTRICT param = t.param;
    const T* FASTADAM_RESTRICT grad = t.grad;
    T* FASTADAM_RESTRICT exp_avg = t.exp_avg;
    T* FASTADAM_RESTRICT exp_avg_sq = t.exp_avg_sq;
    T* FASTADAM_RESTRICT max_exp_avg_sq = t.max_exp_avg_sq;
    const AdamScalars<T> c = s;  // local copy: the compiler keeps the scalars in registers
    for (std::int64_t i = begin; i < end; ++i) {
        T g = MAXIMIZE ? -grad[i] : grad[i];
        T p = param[i];
        if (WD == WeightDecay::decoupled) p = p * c.decay_factor;
        if (WD == WeightDecay::l2) g = g + c.weight_decay * p;
        const T m = exp_avg[i] + c.one_minus_beta1 * (g - exp_avg[i]);
        const T v = exp_avg_sq[i] * c.beta2 + c.one_minus_beta2 * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        T v_hat = v;
        if (AMSGRAD) {
            v_hat = nan_max(max_exp_avg_sq[i], v);
            max_exp_avg_sq[i] = v_hat;
        }
        const T denom = ieee_sqrt(v_hat) * c.inv_bias_correction2_sqrt + c.eps;
        param[i] = p - c.step_size * m / denom;
    }
}

template <class T, WeightDecay WD, bool AMSGRAD>
void adam_loop_maximize(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t b, std::int64_t e) {
    if (t.hyper->maximize) adam_loop<T, WD, AMSGRAD, true>(t, s, b, e);
    else adam_loop<T, WD, AMSGRAD, false>(t, s, b, e);
}

template <class T, WeightDecay WD>
void adam_loop_amsgrad(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t b, std::int64_t e) {
    if (t.hyper->amsgrad) adam_loop_maximize<T, WD, true>(t, s, b, e);
    else adam_loop_maximize<T, WD, false>(t, s, b, e);
}

// Elements [begin, end) of one tensor. The variant is chosen once per call, so the
// inner loop carries no branches and vectorises.
template <class T>
void adam_segment(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t begin, std::int64_t end) {
    const AdamHyperparams& h = *t.hyper;
    if (h.weight_decay == 0.0) adam_loop_amsgrad<T, WeightDecay::none>(t, s, begin, end);
    else if (h.decoupled_weight_decay) adam_loop_amsgrad<T, WeightDecay::decoupled>(t, s, begin, end);
    else adam_loop_amsgrad<T, WeightDecay::l2>(t, s, begin, end);
}

// SGD, torch.optim.SGD's order: g = -grad (maximize); g = g + wd*p; on the first
// momentum step buf = g, later buf = buf*momentum + (1-dampening)*g; g = g + momentum*buf
// (nesterov) or g = buf; p = p - lr*g.
template <class T, bool L2, int MOMENTUM /*0 none, 1 first step, 2 later*/, bool NESTEROV, bool MAXIMIZE>
void sgd_loop(const SgdTensor<T>& t, const SgdScalars<T>& s, std::int64_t begin, std::int64_t end) {
    T* FASTADAM_RESTRICT param = t.param;
    const T* FASTADAM_RESTRICT grad = t.grad;
    T* FASTADAM_RESTRICT buf = t.momentum_buffer;
    const SgdScalars<T> c = s;
    for (std::int64_t i = begin; i < end; ++i) {
        T g = MAXIMIZE ? -grad[i] : grad[i];
        const T p = param[i];
        if (L2) g = g + c.weight_decay * p;
        if (MOMENTUM != 0) {
            const T b = MOMENTUM == 1 ? g : buf[i] * c.momentum + c.one_minus_dampening * g;
            buf[i] = b;
            g = NESTEROV ? g + c.momentum * b : b;
        }
        param[i] = p - c.lr * g;
    }
}

template <class T, bool L2, int MOMENTUM, bool NESTEROV>
void sgd_loop_maximize(const SgdTensor<T>& t, const SgdScalars<T>& s, std::int64_t b, std::int64_t e) {
    if (t.hyper->maximize) sgd_loop<T, L2, MOMENTUM, NESTEROV, true>(t, s, b, e);
    else sgd_loop<T, L2, MOMENTUM, NESTEROV, false>(t, s, b, e);
}

template <class T, bool L2, int MOMENTUM>
void sgd_loop_nesterov(const SgdTensor<T>& t, const SgdScalars<T>& s, std::int64_t b, std::int64_t e) {
    if (t.hyper->nesterov) sgd_loop_maximize<T, L2, MOMENTUM, true>(t, s, b, e);
    else sgd_loop_maximize<T, L2, MOMENTUM, false>(t, s, b, e);
}

template <class T, bool L2>
void sgd_loop_momentum(const SgdTensor<T>& t, const SgdScalars<T>& s, std::int64_t b, std::int64_t e) {
    if (t.hyper->momentum == 0.0) sgd_loop_maximize<T, L2, 0, false>(t, s, b, e);
    else if (t.first_step) sgd_loop_nesterov<T, L2, 1>(t, s, b, e);
    else sgd_loop_nesterov<T, L2, 2>(t, s, b, e);
}

template <class T>
void sgd_segment(const SgdTensor<T>& t, const SgdScalars<T>& s, std::int64_t begin, std::int64_t end) {
    if (t.hyper->weight_decay == 0.0) sgd_loop_momentum<T, false>(t, s, begin, end);
    else sgd_loop_momentum<T, true>(t, s, begin, end);
}

}  // namespace FASTADAM_ISA_NS
}  // namespace fastadam
