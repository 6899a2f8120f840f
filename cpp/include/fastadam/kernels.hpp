// fastadam: the element-wise Adam and SGD update loops, written once.
//
// This header is compiled once per SIMD target (see cpp/src/kernels_isa.cpp): each
// copy lives in its own namespace, fastadam::FASTADAM_ISA_NS, so that no inline or
// template symbol compiled with AVX-512 can be merged by the linker into the
// baseline path. For the same reason nothing in here calls a std:: inline function
// (std::sqrt, std::max): at -O0 those become weak symbols shared across targets.
//
// The loops are plain C++ that GCC, Clang and MSVC vectorise, plus, on targets with
// a float vector type in lanes.hpp, the same update written once over lane types.
// Every operation is an IEEE add, multiply, divide, sqrt or max on one element, so a
// SIMD lane computes the same bits as the scalar loop, as any other target, and as
// the NumPy reference, provided the translation unit is compiled with
// -ffp-contract=off (no FMA contraction). The one deliberate use of FMA, lanes.hpp's
// square root on the FMA units, returns the IEEE square root's bits for every float.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fastadam/lanes.hpp"
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

enum class WeightDecay { none, l2, decoupled };

// What the first half of an update (adam_moments) hands to the second (adam_param).
template <class V>
struct Halfway {
    V param;           // after decoupled weight decay
    V scaled_exp_avg;  // step_size * exp_avg (this step's)
    V root;            // sqrt(v_hat)
};

// The documented order of operations (README, fastadam.reference): each line is
// one IEEE operation on the array dtype, left to right. V is one element or a SIMD
// vector of them (lanes.hpp); sqrt gives the IEEE square root of each lane, from the
// divide unit or, with the same bits, from the FMA units (lanes.hpp).
// An update is written in two halves so that the AVX-512 loop can overlap one
// group's square roots with the previous group's divisions (adam_vectors).
// First half: the loads, the weight decay, the moments (stored) and the square root.
template <class V, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD, class T, class Sqrt>
inline Halfway<V> adam_moments(const T* FASTADAM_RESTRICT param, const T* FASTADAM_RESTRICT grad,
                               T* FASTADAM_RESTRICT exp_avg, T* FASTADAM_RESTRICT exp_avg_sq,
                               T* FASTADAM_RESTRICT max_exp_avg_sq, const AdamScalars<V>& c, std::int64_t i,
                               Sqrt sqrt) {
    using L = Lane<V>;
    V g = L::load(grad + i);
    V p = L::load(param + i);
    V m_prev = L::load(exp_avg + i);
    V v_prev = L::load(exp_avg_sq + i);
    V max_prev = v_prev;
    if constexpr (AMSGRAD) {
        max_prev = L::load(max_exp_avg_sq + i);
        L::loads_before_stores(g, p, m_prev, v_prev, max_prev);
    } else {
        L::loads_before_stores(g, p, m_prev, v_prev);
    }
    // maximize with L2 decay: wd*p - g, which equals torch's (-g) + wd*p for every number;
    // written so because compilers fold that into this subtraction on some paths and
    // not others, which gave NaNs of different signs (docs/design.md, "The formula").
    if (WD == WeightDecay::l2) g = MAXIMIZE ? c.weight_decay * p - g : g + c.weight_decay * p;
    else if (MAXIMIZE) g = -g;
    if (WD == WeightDecay::decoupled) p = p * c.decay_factor;
    // torch's lerp(exp_avg, g, w), w = 1 - beta1, in its form for |w| (types.hpp, lerp_weight)
    const V d = g - m_prev;
    const V m = LERP_FROM_GRAD ? g + c.lerp_weight * d : m_prev + c.lerp_weight * d;
    const V v = v_prev * c.beta2 + c.one_minus_beta2 * g * g;
    L::store(exp_avg + i, m);
    L::store(exp_avg_sq + i, v);
    V v_hat = v;
    if (AMSGRAD) {
        v_hat = nan_max(max_prev, v);
        L::store(max_exp_avg_sq + i, v_hat);
    }
    return {p, c.step_size * m, sqrt(v_hat)};
}

// Second half: the denominator, the division and the parameter's store.
template <class V, class T>
inline void adam_param(T* FASTADAM_RESTRICT param, const AdamScalars<V>& c, std::int64_t i, const Halfway<V>& h) {
    const V denom = h.root * c.inv_bias_correction2_sqrt + c.eps;
    Lane<V>::store(param + i, h.param - h.scaled_exp_avg / denom);
}

template <class V, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD, class T, class Sqrt>
inline void adam_update(T* FASTADAM_RESTRICT param, const T* FASTADAM_RESTRICT grad, T* FASTADAM_RESTRICT exp_avg,
                        T* FASTADAM_RESTRICT exp_avg_sq, T* FASTADAM_RESTRICT max_exp_avg_sq,
                        const AdamScalars<V>& c, std::int64_t i, Sqrt sqrt) {
    adam_param<V>(param, c, i,
                  adam_moments<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, i, sqrt));
}

template <class V, class T>
AdamScalars<V> broadcast(const AdamScalars<T>& s) {
    using L = Lane<V>;
    return {L::broadcast(s.lerp_weight), L::broadcast(s.beta2), L::broadcast(s.one_minus_beta2),
            L::broadcast(s.weight_decay), L::broadcast(s.decay_factor), L::broadcast(s.step_size),
            L::broadcast(s.inv_bias_correction2_sqrt), L::broadcast(s.eps)};
}

#if defined(FASTADAM_HAVE_F32X16)
// AVX-512: float vectors in groups. FASTADAM_DIVIDER_VECTORS take the divide unit's
// square root, then FASTADAM_FMA_VECTORS the FMA units' (lanes.hpp). The divide unit
// bounds the step in cache (it also does the division), the FMA units carry most of
// the rest, so moving a share of the square roots balances the two. On this
// project's Zen 4 machine 2:1 was fastest of the splits measured with the pipelined
// loop below, and on Zen 5 fastest or level (docs/performance.md, the split A/B).
// Groups of more than three vectors carry more halves from one group to the next than
// the 32 vector registers hold beside the constants, and spill,
// on any AVX-512 CPU. Both are build-time settings (-DFASTADAM_FMA_VECTORS=2 ...).
#ifndef FASTADAM_DIVIDER_VECTORS
#define FASTADAM_DIVIDER_VECTORS 2
#endif
#ifndef FASTADAM_FMA_VECTORS
#define FASTADAM_FMA_VECTORS 1
#endif
constexpr int kDividerVectors = FASTADAM_DIVIDER_VECTORS, kFmaVectors = FASTADAM_FMA_VECTORS;
static_assert(kDividerVectors >= 0 && kFmaVectors >= 0 && kDividerVectors + kFmaVectors > 0, "empty vector group");
using FloatVector = F32x16;
#elif defined(FASTADAM_HAVE_F32X8)
using FloatVector = F32x8;  // AVX2: every square root on the divide unit
#endif

#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
// The float loop over FloatVector lanes. Returns where the scalar loop takes over
// (AVX2: the last few elements; AVX-512 does them too and returns end).
template <WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD>
std::int64_t adam_vectors(float* FASTADAM_RESTRICT param, const float* FASTADAM_RESTRICT grad,
                          float* FASTADAM_RESTRICT exp_avg, float* FASTADAM_RESTRICT exp_avg_sq,
                          float* FASTADAM_RESTRICT max_exp_avg_sq, const AdamScalars<float>& s, std::int64_t begin,
                          std::int64_t end) {
    using V = FloatVector;
    using L = Lane<V>;
    const AdamScalars<V> c = broadcast<V>(s);
    const auto by_divider = [](V x) { return L::sqrt(x); };
    const auto update = [&](std::int64_t at, auto sqrt) {
        adam_update<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, at, sqrt);
    };
    std::int64_t i = begin;
    // First the elements before exp_avg starts a 64-byte line: a vector that straddles
    // two lines costs two accesses. The optimizer's state is line-aligned already;
    // NumPy's large arrays all sit 16 bytes past a line, so aligning one aligns all
    // (fastadam_bench --layout=numpy, README).
    const auto line_offset = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(exp_avg + i) % 64);
    std::int64_t peel = (64 - line_offset) % 64 / static_cast<std::int64_t>(sizeof(float));
    if (peel > end - i) peel = end - i;
#if defined(FASTADAM_HAVE_F32X16)
    // AVX-512 takes them, and the last few elements of the range, as one vector with
    // masked loads and stores (Lane::load_first), staged through a buffer so that the
    // update is the vector one: up to 15 elements cost one vector, not 15 scalar
    // square roots and divisions (a 1000-element tensor had up to 30 of those).
    const auto partial = [&](std::int64_t at, int count) {
        alignas(64) float p[L::width], g[L::width], m[L::width], v[L::width], v_max[L::width];
        const auto stage = [&](float* to, const float* from) { L::store(to, L::load_first(from + at, count)); };
        const auto unstage = [&](float* to, const float* from) { L::store_first(to + at, L::load(from), count); };
        stage(p, param);
        stage(g, grad);
        stage(m, exp_avg);
        stage(v, exp_avg_sq);
        if constexpr (AMSGRAD) stage(v_max, max_exp_avg_sq);
        adam_update<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(p, g, m, v, v_max, c, 0, by_divider);
        unstage(param, p);
        unstage(exp_avg, m);
        unstage(exp_avg_sq, v);
        if constexpr (AMSGRAD) unstage(max_exp_avg_sq, v_max);
    };
    if (peel > 0) partial(i, static_cast<int>(peel));
    i += peel;
#else
    const auto scalar_sqrt = [](float x) { return Lane<float>::sqrt(x); };
    for (const std::int64_t stop = i + peel; i < stop; ++i)
        adam_update<float, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, i, scalar_sqrt);
#endif
#if defined(FASTADAM_HAVE_F32X16)
    const auto by_fma = [](V x) { return sqrt_by_fma(x); };
    constexpr int vectors = kDividerVectors + kFmaVectors;
    constexpr std::int64_t group = vectors * L::width;
    // Software-pipelined: the first halves of group n+1 (square roots included) are
    // issued before the second halves of group n (divisions), so that the FMA units'
    // long square-root chains overlap the divide unit's work instead of waiting in
    // the scheduler behind it. Every element still takes the same operations.
    // Each field in its own array of vectors (the next group's declared in the loop):
    // GCC keeps those in registers, where it spills an array of Halfway structs or a
    // struct of arrays on every group.
    const auto first_halves = [&](std::int64_t at, V* p, V* m, V* root) {
        for (int k = 0; k < vectors; ++k) {
            const Halfway<V> h =
                k < kDividerVectors
                    ? adam_moments<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c,
                                                             at + k * L::width, by_divider)
                    : adam_moments<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c,
                                                             at + k * L::width, by_fma);
            p[k] = h.param;
            m[k] = h.scaled_exp_avg;
            root[k] = h.root;
        }
    };
    const auto second_halves = [&](std::int64_t at, const V* p, const V* m, const V* root) {
        for (int k = 0; k < vectors; ++k) adam_param<V>(param, c, at + k * L::width, Halfway<V>{p[k], m[k], root[k]});
    };
    if (rounding_to_nearest() && i + group <= end) {
        V p[vectors], m[vectors], root[vectors];
        first_halves(i, p, m, root);
        for (; i + 2 * group <= end; i += group) {
            V p_next[vectors], m_next[vectors], root_next[vectors];
            first_halves(i + group, p_next, m_next, root_next);
            second_halves(i, p, m, root);
            for (int k = 0; k < vectors; ++k) {
                p[k] = p_next[k];
                m[k] = m_next[k];
                root[k] = root_next[k];
            }
        }
        second_halves(i, p, m, root);
        i += group;
    }
#endif
    for (; i + L::width <= end; i += L::width) update(i, by_divider);
#if defined(FASTADAM_HAVE_F32X16)
    if (i < end) partial(i, static_cast<int>(end - i));
    i = end;
#endif
    return i;
}
#endif

template <class T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD>
void adam_loop(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t begin, std::int64_t end) {
    T* FASTADAM_RESTRICT param = t.param;
    const T* FASTADAM_RESTRICT grad = t.grad;
    T* FASTADAM_RESTRICT exp_avg = t.exp_avg;
    T* FASTADAM_RESTRICT exp_avg_sq = t.exp_avg_sq;
    T* FASTADAM_RESTRICT max_exp_avg_sq = t.max_exp_avg_sq;
    const AdamScalars<T> c = s;  // local copy: the compiler keeps the scalars in registers
    std::int64_t i = begin;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
    if constexpr (std::is_same<T, float>::value)
        i = adam_vectors<WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, begin, end);
#endif
    const auto sqrt = [](T x) { return Lane<T>::sqrt(x); };
    for (; i < end; ++i)
        adam_update<T, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, i, sqrt);
}

// The square root of the float loops' FMA lanes, over n elements: a test hook
// (tests/test_exact_sqrt.py). With `estimate`, that replaces rsqrt14's estimate, for
// x in [2^-64, 2^64) only. Targets without those lanes take the IEEE square root.
inline void lane_sqrt_f32(const float* x, const float* estimate, float* out, std::int64_t n) {
    std::int64_t i = 0;
#if defined(FASTADAM_HAVE_F32X16)
    for (; i + 16 <= n; i += 16) {
        const __m512 xi = _mm512_loadu_ps(x + i);
        _mm512_storeu_ps(out + i, estimate ? sqrt_from_estimate(xi, _mm512_loadu_ps(estimate + i))
                                           : sqrt_by_fma({xi}).r);
    }
#endif
    (void)estimate;
    for (; i < n; ++i) out[i] = ieee_sqrt(x[i]);
}

template <class T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE>
void adam_loop_lerp(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t b, std::int64_t e) {
    if (lerp_from_grad<T>(*t.hyper)) adam_loop<T, WD, AMSGRAD, MAXIMIZE, true>(t, s, b, e);
    else adam_loop<T, WD, AMSGRAD, MAXIMIZE, false>(t, s, b, e);
}

template <class T, WeightDecay WD, bool AMSGRAD>
void adam_loop_maximize(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t b, std::int64_t e) {
    if (t.hyper->maximize) adam_loop_lerp<T, WD, AMSGRAD, true>(t, s, b, e);
    else adam_loop_lerp<T, WD, AMSGRAD, false>(t, s, b, e);
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
        const T p = param[i];
        T g = grad[i];
        if (L2) g = MAXIMIZE ? c.weight_decay * p - g : g + c.weight_decay * p;  // as in adam_moments
        else if (MAXIMIZE) g = -g;
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
