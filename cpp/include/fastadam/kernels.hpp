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

#include "fastadam/convert.hpp"
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
// P, G, S: how param, grad and the states are stored (float, double, or a 2-byte
// storage of a float step, widened on load and rounded on store). GRAD_MUL applies
// mixed precision's gradient transform (AdamScalars::grad_unscale, grad_clip).
template <class V, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD, bool GRAD_MUL = false, class P, class G,
          class S, class Sqrt>
inline Halfway<V> adam_moments(const P* FASTADAM_RESTRICT param, const G* FASTADAM_RESTRICT grad,
                               S* FASTADAM_RESTRICT exp_avg, S* FASTADAM_RESTRICT exp_avg_sq,
                               S* FASTADAM_RESTRICT max_exp_avg_sq, const AdamScalars<V>& c, std::int64_t i,
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
    if (GRAD_MUL) g = (g * c.grad_unscale) * c.grad_clip;  // x * 1 is x: neutral when unused
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

// No param_out (the O of the loops below).
struct NoOut {};

// Second half: the denominator, the division and the parameter's store (and its
// rounded copy into param_out, O being its storage, or NoOut).
template <class V, class P, class O = NoOut>
inline void adam_param(P* FASTADAM_RESTRICT param, const AdamScalars<V>& c, std::int64_t i, const Halfway<V>& h,
                       O* FASTADAM_RESTRICT param_out = nullptr) {
    const V denom = h.root * c.inv_bias_correction2_sqrt + c.eps;
    const V updated = h.param - h.scaled_exp_avg / denom;
    Lane<V>::store(param + i, updated);
    if constexpr (!std::is_same<O, NoOut>::value) Lane<V>::store(param_out + i, updated);
}

template <class V, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD, bool GRAD_MUL = false, class P, class G,
          class S, class O = NoOut, class Sqrt>
inline void adam_update(P* FASTADAM_RESTRICT param, const G* FASTADAM_RESTRICT grad, S* FASTADAM_RESTRICT exp_avg,
                        S* FASTADAM_RESTRICT exp_avg_sq, S* FASTADAM_RESTRICT max_exp_avg_sq,
                        const AdamScalars<V>& c, std::int64_t i, Sqrt sqrt, O* FASTADAM_RESTRICT param_out = nullptr) {
    adam_param<V>(param, c, i,
                  adam_moments<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, i,
                                                                                sqrt),
                  param_out);
}

template <class V, class T>
AdamScalars<V> broadcast(const AdamScalars<T>& s) {
    using L = Lane<V>;
    return {L::broadcast(s.lerp_weight), L::broadcast(s.beta2), L::broadcast(s.one_minus_beta2),
            L::broadcast(s.weight_decay), L::broadcast(s.decay_factor), L::broadcast(s.step_size),
            L::broadcast(s.inv_bias_correction2_sqrt), L::broadcast(s.eps), L::broadcast(s.grad_unscale),
            L::broadcast(s.grad_clip)};
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
// (AVX2: the last few elements; AVX-512 does them too and returns end). P, G, S, O
// as in adam_moments and adam_param; a 2-byte storage here is bfloat16 only.
template <WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD, bool GRAD_MUL = false, class P, class G, class S,
          class O = NoOut>
std::int64_t adam_vectors(P* FASTADAM_RESTRICT param, const G* FASTADAM_RESTRICT grad, S* FASTADAM_RESTRICT exp_avg,
                          S* FASTADAM_RESTRICT exp_avg_sq, S* FASTADAM_RESTRICT max_exp_avg_sq, const AdamScalars<float>& s,
                          std::int64_t begin, std::int64_t end, O* FASTADAM_RESTRICT param_out = nullptr) {
    using V = FloatVector;
    using L = Lane<V>;
    const AdamScalars<V> c = broadcast<V>(s);
    const auto by_divider = [](V x) { return L::sqrt(x); };
    const auto update = [&](std::int64_t at, auto sqrt) {
        adam_update<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, at, sqrt,
                                                                       param_out);
    };
    std::int64_t i = begin;
    // First the elements before exp_avg starts a 64-byte line: a vector that straddles
    // two lines costs two accesses. The optimizer's state is line-aligned already;
    // NumPy's large arrays all sit 16 bytes past a line, so aligning one aligns all
    // (fastadam_bench --layout=numpy, README).
    // (A 2-byte state aligns to half a line: the peel stays within one vector.)
    constexpr std::int64_t line = sizeof(S) >= 4 ? 64 : 32;
    const auto line_offset = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(exp_avg + i) % line);
    std::int64_t peel = (line - line_offset) % line / static_cast<std::int64_t>(sizeof(S));
    if (peel > end - i) peel = end - i;
#if defined(FASTADAM_HAVE_F32X16)
    // AVX-512 takes them, and the last few elements of the range, as one vector with
    // masked loads and stores (Lane::load_first), staged through a buffer so that the
    // update is the vector one: up to 15 elements cost one vector, not 15 scalar
    // square roots and divisions (a 1000-element tensor had up to 30 of those).
    // 2-byte storages are widened into the buffer and rounded back one element at a time.
    const auto partial = [&](std::int64_t at, int count) {
        alignas(64) float p[L::width], g[L::width], m[L::width], v[L::width], v_max[L::width];
        const auto stage = [&](float* to, const auto* from) {
            if constexpr (std::is_same<decltype(from), const float*>::value) {
                L::store(to, L::load_first(from + at, count));
            } else {
                for (int j = 0; j < L::width; ++j) to[j] = to_float(from[at + (j < count ? j : 0)]);
            }
        };
        const auto unstage = [&](auto* to, const float* from) {
            if constexpr (std::is_same<decltype(to), float*>::value) {
                L::store_first(to + at, L::load(from), count);
            } else {
                for (int j = 0; j < count; ++j) from_float(to[at + j], from[j]);
            }
        };
        stage(p, static_cast<const P*>(param));
        stage(g, grad);
        stage(m, static_cast<const S*>(exp_avg));
        stage(v, static_cast<const S*>(exp_avg_sq));
        if constexpr (AMSGRAD) stage(v_max, static_cast<const S*>(max_exp_avg_sq));
        adam_update<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(p, g, m, v, v_max, c, 0, by_divider);
        unstage(param, p);
        if constexpr (!std::is_same<O, NoOut>::value) unstage(param_out, p);
        unstage(exp_avg, m);
        unstage(exp_avg_sq, v);
        if constexpr (AMSGRAD) unstage(max_exp_avg_sq, v_max);
    };
    if (peel > 0) partial(i, static_cast<int>(peel));
    i += peel;
#else
    const auto scalar_sqrt = [](float x) { return Lane<float>::sqrt(x); };
    for (const std::int64_t stop = i + peel; i < stop; ++i)
        adam_update<float, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, i,
                                                                           scalar_sqrt, param_out);
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
                    ? adam_moments<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c,
                                                                             at + k * L::width, by_divider)
                    : adam_moments<V, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c,
                                                                             at + k * L::width, by_fma);
            p[k] = h.param;
            m[k] = h.scaled_exp_avg;
            root[k] = h.root;
        }
    };
    const auto second_halves = [&](std::int64_t at, const V* p, const V* m, const V* root) {
        for (int k = 0; k < vectors; ++k) adam_param<V>(param, c, at + k * L::width, Halfway<V>{p[k], m[k], root[k]}, param_out);
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

// Elements [begin, end) of arrays stored as P, G, S (and O, param_out's storage):
// the vector loop where the target has one, then one element at a time.
template <class T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD, bool GRAD_MUL = false, class P, class G,
          class S, class O = NoOut>
void adam_range(P* FASTADAM_RESTRICT param, const G* FASTADAM_RESTRICT grad, S* FASTADAM_RESTRICT exp_avg,
                S* FASTADAM_RESTRICT exp_avg_sq, S* FASTADAM_RESTRICT max_exp_avg_sq, const AdamScalars<T>& s, std::int64_t begin,
                std::int64_t end, O* FASTADAM_RESTRICT param_out = nullptr) {
    const AdamScalars<T> c = s;  // local copy: the compiler keeps the scalars in registers
    std::int64_t i = begin;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
    if constexpr (std::is_same<T, float>::value)
        i = adam_vectors<WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, begin,
                                                                         end, param_out);
#endif
    const auto sqrt = [](T x) { return Lane<T>::sqrt(x); };
    for (; i < end; ++i)
        adam_update<T, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD, GRAD_MUL>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, c, i, sqrt,
                                                                       param_out);
}

template <class T, WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool LERP_FROM_GRAD>
void adam_loop(const AdamTensor<T>& t, const AdamScalars<T>& s, std::int64_t begin, std::int64_t end) {
    adam_range<T, WD, AMSGRAD, MAXIMIZE, LERP_FROM_GRAD>(t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.max_exp_avg_sq, s, begin, end);
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

// ----- mixed precision (docs/design.md, "Mixed precision") ------------------------------
// Every element takes the float update of the documented order, whether fused or
// staged, so every path and thread count gives the bits of the reference.


// Calls f(static_cast<S*>(data)) with S the C++ type of `storage`.
template <class F>
inline void with_storage(Storage storage, const void* data, F&& f) {
    if (storage == Storage::bfloat16) f(static_cast<const Bf16*>(data));
    else if (storage == Storage::float16) f(static_cast<const F16*>(data));
    else f(static_cast<const float*>(data));
}
template <class F>
inline void with_storage(Storage storage, void* data, F&& f) {
    if (storage == Storage::bfloat16) f(static_cast<Bf16*>(data));
    else if (storage == Storage::float16) f(static_cast<F16*>(data));
    else f(static_cast<float*>(data));
}

template <class S>
inline void widen_as(float* FASTADAM_RESTRICT out, const S* FASTADAM_RESTRICT in, std::int64_t n) {
    std::int64_t i = 0;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
    constexpr int width = Lane<FloatVector>::width;
    if constexpr (std::is_same<S, Bf16>::value || std::is_same<S, F16>::value)
        for (; i + width <= n; i += width) Lane<FloatVector>::store(out + i, Lane<FloatVector>::load(in + i));
#endif
    for (; i < n; ++i) out[i] = to_float(in[i]);
}
template <class S>
inline void narrow_as(S* FASTADAM_RESTRICT out, const float* FASTADAM_RESTRICT in, std::int64_t n) {
    std::int64_t i = 0;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
    constexpr int width = Lane<FloatVector>::width;
    if constexpr (std::is_same<S, Bf16>::value || std::is_same<S, F16>::value)
        for (; i + width <= n; i += width) Lane<FloatVector>::store(out + i, Lane<FloatVector>::load(in + i));
#endif
    for (; i < n; ++i) from_float(out[i], in[i]);
}
inline void widen(float* FASTADAM_RESTRICT out, Storage storage, const void* data, std::int64_t at, std::int64_t n) {
    with_storage(storage, data, [&](auto* in) { widen_as(out, in + at, n); });
}
inline void narrow(void* data, Storage storage, const float* FASTADAM_RESTRICT in, std::int64_t at, std::int64_t n) {
    with_storage(storage, data, [&](auto* out) { narrow_as(out + at, in, n); });
}

// x / scale has the bits of x * (1 / scale) when scale is a power of two whose
// reciprocal is a float (GradScaler's scales are): the multiplication spares the
// divide unit, which the Adam loop keeps busy.
inline bool reciprocal_is_exact(float scale) {
    const std::uint32_t u = bits_of(scale), exponent = (u >> 23) & 0xffu;
    return (u & 0x807fffffu) == 0 && exponent >= 1 && exponent <= 253;
}
enum class Unscale { none, divide, multiply };

// The gradient as Adam sees it: widened, divided by grad_scale, multiplied by clip_coef.
template <Unscale UNSCALE, bool CLIP, class G>
inline void stage_grad_as(float* FASTADAM_RESTRICT out, const G* FASTADAM_RESTRICT in, std::int64_t n, float scale, float coef) {
    const float reciprocal = 1.0f / scale;
    const auto transform = [&](auto g, auto broadcast) {
        if (UNSCALE == Unscale::divide) g = g / broadcast(scale);
        if (UNSCALE == Unscale::multiply) g = g * broadcast(reciprocal);
        if (CLIP) g = g * broadcast(coef);
        return g;
    };
    std::int64_t i = 0;
#if defined(FASTADAM_HAVE_F32X16)
    using L = Lane<F32x16>;
    if constexpr (!std::is_same<G, F16>::value)
        for (; i + 16 <= n; i += 16) L::store(out + i, transform(L::load(in + i), L::broadcast));
#endif
    for (; i < n; ++i) out[i] = transform(to_float(in[i]), [](float x) { return x; });
}
inline void stage_grad(float* FASTADAM_RESTRICT out, Storage storage, const void* data, std::int64_t at, std::int64_t n,
                       const GradTransform& t) {
    const Unscale unscale = !t.unscale ? Unscale::none : reciprocal_is_exact(t.grad_scale) ? Unscale::multiply : Unscale::divide;
    const auto stage = [&](auto* in, auto unscale_tag, auto clip_tag) {
        stage_grad_as<decltype(unscale_tag)::value, decltype(clip_tag)::value>(out, in + at, n, t.grad_scale, t.clip_coef);
    };
    with_storage(storage, data, [&](auto* in) {
        using std::integral_constant;
        const auto by_clip = [&](auto unscale_tag) {
            if (t.clip) stage(in, unscale_tag, integral_constant<bool, true>{});
            else stage(in, unscale_tag, integral_constant<bool, false>{});
        };
        if (unscale == Unscale::none) by_clip(integral_constant<Unscale, Unscale::none>{});
        else if (unscale == Unscale::divide) by_clip(integral_constant<Unscale, Unscale::divide>{});
        else by_clip(integral_constant<Unscale, Unscale::multiply>{});
    });
}

// Elements per stage: five float buffers of 2 KiB stay in L1 beside the loop's streams.
#ifndef FASTADAM_STAGE_ELEMENTS
#define FASTADAM_STAGE_ELEMENTS 512
#endif
constexpr std::int64_t kStageElements = FASTADAM_STAGE_ELEMENTS;
static_assert(kStageElements % kQuantBlock8 == 0 && kStageElements % kQuantBlock4 == 0, "a stage holds whole quantized blocks");
constexpr std::int64_t kPrefetchStages = 4;  // how far ahead a quantized stage asks for its arrays (adam_mixed_segment)

// ----- quantized states (docs/design.md, "Quantized states") -----------------------------
// A stage's elements [at, at + n) of a quantized state (`at` a block's first element): the
// codes' values times their block's absmax, into out.
template <int BITS>
inline void dequantize_state(float* FASTADAM_RESTRICT out, const std::uint8_t* FASTADAM_RESTRICT codes,
                             const float* FASTADAM_RESTRICT absmax, const QuantMap& q, std::int64_t at, std::int64_t n) {
    constexpr std::int64_t block = BITS == 4 ? kQuantBlock4 : kQuantBlock8;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
    using L = Lane<FloatVector>;
    const typename L::template Dequantizer<BITS> lookup(q);
#endif
    for (std::int64_t b = 0; b < n; b += block) {
        const std::int64_t len = n - b < block ? n - b : block;
        const float scale = absmax[(at + b) / block];
        std::int64_t j = 0;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
        const FloatVector s = L::broadcast(scale);
        for (; j + L::width <= len; j += L::width) L::store(out + b + j, lookup(codes, at + b + j) * s);
#endif
        for (; j < len; ++j) out[b + j] = q.values[code_at<BITS>(codes, at + b + j)] * scale;
    }
}

// The stage's new values `in` quantized into [at, at + n): per block its absmax (NaN if the
// block holds one), then each value times 1/absmax (0 for an all-zero block) to its code.
// SIGNED: q is the signed book.
template <int BITS, bool SIGNED>
inline void quantize_state(std::uint8_t* FASTADAM_RESTRICT codes, float* FASTADAM_RESTRICT absmax, const float* FASTADAM_RESTRICT in,
                           const QuantMap& q, std::int64_t at, std::int64_t n) {
    constexpr std::int64_t block = BITS == 4 ? kQuantBlock4 : kQuantBlock8;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
    using L = Lane<FloatVector>;
    const typename L::Quantizer quantizer(q);
#endif
    for (std::int64_t b = 0; b < n; b += block) {
        const std::int64_t len = n - b < block ? n - b : block;
        const float* x = in + b;
        float top = 0.0f;
        unsigned nan = 0;
        std::int64_t j = 0;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
        FloatVector largest = L::broadcast(0.0f);
        for (; j + L::width <= len; j += L::width) {
            const FloatVector v = L::load(x + j);
            largest = L::max(largest, L::abs(v));
            nan |= L::nan_lanes(v);
        }
        top = L::reduce_max(largest);
#endif
        for (; j < len; ++j) {
            const float a = float_of(bits_of(x[j]) & 0x7fffffffu);
            top = a > top ? a : top;
            nan |= x[j] != x[j] ? 1u : 0u;
        }
        const float amax = nan != 0 ? float_of(0x7fc00000u) : top;
        const float inv = amax == 0.0f ? 0.0f : 1.0f / amax;
        absmax[(at + b) / block] = amax;
        j = 0;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
        const FloatVector scale = L::broadcast(inv);
        // a finite absmax bounds every |x * inv| by 1 (and one rounding)
        if (amax - amax == 0.0f) {
            for (; j + L::width <= len; j += L::width)
                L::template store_codes<BITS>(codes, at + b + j, quantizer.template codes<SIGNED, true>((L::load(x + j) * scale).r));
        } else {
            for (; j + L::width <= len; j += L::width)
                L::template store_codes<BITS>(codes, at + b + j, quantizer.template codes<SIGNED, false>((L::load(x + j) * scale).r));
        }
#endif
        for (; j < len; j += BITS == 4 ? 2 : 1) {
            const std::uint32_t c = quantize_code(x[j] * inv, q);
            if (BITS == 8) {
                codes[at + b + j] = static_cast<std::uint8_t>(c);
            } else {
                const std::uint32_t odd = j + 1 < len ? quantize_code(x[j + 1] * inv, q) : 0u;
                codes[(at + b + j) / 2] = static_cast<std::uint8_t>(c << 4 | odd);
            }
        }
    }
}

// A whole state: n floats quantized to `q`'s codes and absmaxes, and back.
inline void quantize_blockwise(const float* x, std::int64_t n, std::uint8_t* codes, float* absmax, const QuantMap& q) {
    if (q.bits == 8) q.is_signed ? quantize_state<8, true>(codes, absmax, x, q, 0, n) : quantize_state<8, false>(codes, absmax, x, q, 0, n);
    else q.is_signed ? quantize_state<4, true>(codes, absmax, x, q, 0, n) : quantize_state<4, false>(codes, absmax, x, q, 0, n);
}
inline void dequantize_blockwise(const std::uint8_t* codes, const float* absmax, std::int64_t n, float* out, const QuantMap& q) {
    if (q.bits == 8) dequantize_state<8>(out, codes, absmax, q, 0, n);
    else dequantize_state<4>(out, codes, absmax, q, 0, n);
}

// One code per byte for n floats, as quantize_state's inner loop computes them: a test
// hook (tests/test_quantized.py checks every float against the thresholds). `bounded`:
// the loop for blocks of finite absmax, valid where every |x| < 2.
inline void quantize_codes(const float* x, std::uint8_t* out, std::int64_t n, const QuantMap& q, bool bounded) {
    std::int64_t i = 0;
#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
    using L = Lane<FloatVector>;
    const typename L::Quantizer quantizer(q);
    const auto run = [&](auto is_signed, auto is_bounded) {
        for (; i + L::width <= n; i += L::width)
            L::template store_codes<8>(out, i, quantizer.template codes<decltype(is_signed)::value, decltype(is_bounded)::value>(L::load(x + i).r));
    };
    using std::integral_constant;
    if (q.is_signed && bounded) run(integral_constant<bool, true>{}, integral_constant<bool, true>{});
    else if (q.is_signed) run(integral_constant<bool, true>{}, integral_constant<bool, false>{});
    else if (bounded) run(integral_constant<bool, false>{}, integral_constant<bool, true>{});
    else run(integral_constant<bool, false>{}, integral_constant<bool, false>{});
#else
    (void)bounded;
#endif
    for (; i < n; ++i) out[i] = static_cast<std::uint8_t>(quantize_code(x[i], q));
}

// The fused loop: the arrays' storages are template parameters, loads widen and stores
// round in registers, and the gradient transform is two multiplications
// (AdamScalars::grad_unscale, grad_clip). Instantiated for the common layouts and
// AdamW/Adam without weight decay only (adam_fused_segment): each instantiation is a
// whole vector loop, and the build time grows with their count. docs/design.md,
// "Mixed precision".
template <class P, class G, class S, class O>
void adam_fused(const AdamMixedTensor& t, const AdamScalars<float>& s, std::int64_t begin, std::int64_t end) {
    adam_range<float, WeightDecay::decoupled, false, false, false, true>(static_cast<P*>(t.param), static_cast<const G*>(t.grad),
                                                                        static_cast<S*>(t.exp_avg), static_cast<S*>(t.exp_avg_sq),
                                                                        static_cast<S*>(nullptr), s, begin, end,
                                                                        static_cast<O*>(t.param_out));
}

// The fused loop where it is instantiated: bfloat16 storages in the layouts of master
// weights, bf16 states and bf16 models; decoupled or no weight decay (no decay is the
// decoupled loop with decay_factor 1 - lr*0 = 1, and p * 1 == p); without amsgrad,
// maximize or exp_avg's lerp from grad (beta1 <= 0.5); a grad_scale whose reciprocal is
// exact. Returns false where the staged loop must do the step.
inline bool adam_fused_segment(const AdamMixedTensor& t, const AdamScalars<float>& scalars, std::int64_t begin, std::int64_t end) {
    const AdamHyperparams& h = *t.hyper;
    const GradTransform none;
    const GradTransform& transform = t.transform ? *t.transform : none;
    if (h.amsgrad || h.maximize || lerp_from_grad<float>(h) || (h.weight_decay != 0.0 && !h.decoupled_weight_decay) ||
        (transform.unscale && !reciprocal_is_exact(transform.grad_scale)))
        return false;
    if ((t.param_out != nullptr && t.param_out_dtype != Storage::bfloat16) || t.stochastic_rounding) return false;
    AdamScalars<float> s = scalars;
    s.grad_unscale = transform.unscale ? 1.0f / transform.grad_scale : 1.0f;
    s.grad_clip = transform.clip ? transform.clip_coef : 1.0f;
    constexpr Storage f32 = Storage::float32, bf16 = Storage::bfloat16;
    const bool out = t.param_out != nullptr;
    const auto is = [&](Storage param, Storage grad, Storage state, bool param_out) {
        return t.param_dtype == param && t.grad_dtype == grad && t.state_dtype == state && out == param_out;
    };
    if (is(f32, bf16, f32, true)) adam_fused<float, Bf16, float, Bf16>(t, s, begin, end);
    else if (is(f32, bf16, f32, false)) adam_fused<float, Bf16, float, NoOut>(t, s, begin, end);
    else if (is(f32, bf16, bf16, true)) adam_fused<float, Bf16, Bf16, Bf16>(t, s, begin, end);
    else if (is(f32, f32, f32, true)) adam_fused<float, float, float, Bf16>(t, s, begin, end);
    else if (is(f32, f32, f32, false)) adam_fused<float, float, float, NoOut>(t, s, begin, end);
    else if (is(f32, f32, bf16, false)) adam_fused<float, float, Bf16, NoOut>(t, s, begin, end);
    else if (is(bf16, bf16, bf16, false)) adam_fused<Bf16, Bf16, Bf16, NoOut>(t, s, begin, end);
    else if (is(bf16, bf16, f32, false)) adam_fused<Bf16, Bf16, float, NoOut>(t, s, begin, end);
    else return false;
    return true;
}

// Everything else: a narrow array is widened a stage at a time into a float buffer that
// the float loop updates; what it wrote is then rounded back.
// With quantized states (state_bits 8 or 4), each stage's blocks are dequantized into the
// state buffers and quantized back after the update ([begin, end) starts on a block).
inline void adam_mixed_segment(const AdamMixedTensor& t, const AdamScalars<float>& s, std::int64_t begin, std::int64_t end) {
    const int bits = t.state_bits;
    if (bits == 0 && adam_fused_segment(t, s, begin, end)) return;
    alignas(64) float param[kStageElements], grad[kStageElements], exp_avg[kStageElements], exp_avg_sq[kStageElements],
        max_exp_avg_sq[kStageElements];
    const bool amsgrad = t.hyper->amsgrad;  // (never with quantized states)
    const bool narrow_param = t.param_dtype != Storage::float32;
    const bool narrow_state = bits == 0 && t.state_dtype != Storage::float32;
    const QuantMap* signed_book = bits != 0 ? &quant_map(bits, true) : nullptr;
    const QuantMap* unsigned_book = bits != 0 ? &quant_map(bits, false) : nullptr;
    auto* m_codes = static_cast<std::uint8_t*>(t.exp_avg);
    auto* v_codes = static_cast<std::uint8_t*>(t.exp_avg_sq);
    const bool direct_grad = t.grad_dtype == Storage::float32 && t.transform == nullptr;
    const bool stochastic = t.stochastic_rounding && t.param_dtype == Storage::bfloat16;
    const std::uint64_t key = stochastic ? rounding_key(t.rounding_seed, t.step) : 0;
    for (std::int64_t at = begin; at < end; at += kStageElements) {
        const std::int64_t n = end - at < kStageElements ? end - at : kStageElements;
        // Quantized states: the param, gradient and codes of the stage 4 ahead asked for now.
        // A stage's passes (two dequantizations, the float loop, two quantizations) touch five
        // streams in turns, which the hardware prefetchers follow late: 5e7 elements on two
        // threads 43.7 against 36.3 ms (docs/performance.md, "Quantized states").
#if defined(__GNUC__)
        if (bits != 0 && at + (kPrefetchStages + 1) * kStageElements <= end) {
            const std::int64_t ahead = at + kPrefetchStages * kStageElements;
            const char* param_ahead = static_cast<const char*>(t.param) + ahead * storage_bytes(t.param_dtype);
            const char* grad_ahead = static_cast<const char*>(t.grad) + ahead * storage_bytes(t.grad_dtype);
            for (std::int64_t b = 0; b < kStageElements * storage_bytes(t.param_dtype); b += 64) __builtin_prefetch(param_ahead + b, 1);
            for (std::int64_t b = 0; b < kStageElements * storage_bytes(t.grad_dtype); b += 64) __builtin_prefetch(grad_ahead + b, 0);
            const std::int64_t code_at = bits == 8 ? ahead : ahead / 2, code_bytes = bits == 8 ? kStageElements : kStageElements / 2;
            for (std::int64_t b = 0; b < code_bytes; b += 64) {
                __builtin_prefetch(m_codes + code_at + b, 1);
                __builtin_prefetch(v_codes + code_at + b, 1);
            }
        }
#endif
        AdamTensor<float> f;
        f.size = n;
        f.step = t.step;
        f.hyper = t.hyper;
        f.param = narrow_param ? param : static_cast<float*>(t.param) + at;
        if (narrow_param) widen(param, t.param_dtype, t.param, at, n);
        f.grad = direct_grad ? static_cast<const float*>(t.grad) + at : grad;
        if (!direct_grad) stage_grad(grad, t.grad_dtype, t.grad, at, n, t.transform ? *t.transform : GradTransform{});
        if (bits != 0) {
            f.exp_avg = exp_avg;
            f.exp_avg_sq = exp_avg_sq;
            if (bits == 8) {
                dequantize_state<8>(exp_avg, m_codes, t.exp_avg_absmax, *signed_book, at, n);
                dequantize_state<8>(exp_avg_sq, v_codes, t.exp_avg_sq_absmax, *unsigned_book, at, n);
            } else {
                dequantize_state<4>(exp_avg, m_codes, t.exp_avg_absmax, *signed_book, at, n);
                dequantize_state<4>(exp_avg_sq, v_codes, t.exp_avg_sq_absmax, *unsigned_book, at, n);
            }
        } else if (narrow_state) {
            f.exp_avg = exp_avg;
            f.exp_avg_sq = exp_avg_sq;
            widen(exp_avg, t.state_dtype, t.exp_avg, at, n);
            widen(exp_avg_sq, t.state_dtype, t.exp_avg_sq, at, n);
            if (amsgrad) {
                f.max_exp_avg_sq = max_exp_avg_sq;
                widen(max_exp_avg_sq, t.state_dtype, t.max_exp_avg_sq, at, n);
            }
        } else {
            f.exp_avg = static_cast<float*>(t.exp_avg) + at;
            f.exp_avg_sq = static_cast<float*>(t.exp_avg_sq) + at;
            if (amsgrad) f.max_exp_avg_sq = static_cast<float*>(t.max_exp_avg_sq) + at;
        }
        adam_segment<float>(f, s, 0, n);
        if (stochastic) {
            // Two loops, each one the compiler vectorises: the random bits, then the rounding.
            alignas(64) std::uint32_t random[kStageElements];
            for (std::int64_t j = 0; j < n; ++j) random[j] = rounding_bits(key, at + j);
            Bf16* out = static_cast<Bf16*>(t.param) + at;
            for (std::int64_t j = 0; j < n; ++j) out[j].bits = narrow_bf16_stochastic(param[j], random[j]);
        } else if (narrow_param) {
            narrow(t.param, t.param_dtype, param, at, n);
        }
        if (t.param_out != nullptr) narrow(t.param_out, t.param_out_dtype, f.param, at, n);
        if (bits == 8) {
            quantize_state<8, true>(m_codes, t.exp_avg_absmax, exp_avg, *signed_book, at, n);
            quantize_state<8, false>(v_codes, t.exp_avg_sq_absmax, exp_avg_sq, *unsigned_book, at, n);
        } else if (bits == 4) {
            quantize_state<4, true>(m_codes, t.exp_avg_absmax, exp_avg, *signed_book, at, n);
            quantize_state<4, false>(v_codes, t.exp_avg_sq_absmax, exp_avg_sq, *unsigned_book, at, n);
        }
        if (narrow_state) {
            narrow(t.exp_avg, t.state_dtype, exp_avg, at, n);
            narrow(t.exp_avg_sq, t.state_dtype, exp_avg_sq, at, n);
            if (amsgrad) narrow(t.max_exp_avg_sq, t.state_dtype, max_exp_avg_sq, at, n);
        }
    }
}

// The sum of squares of up to kNormBlock gradient elements (widened, divided by
// grad_scale when unscale), in the fixed order of fastadam.reference.grad_sq_sum:
// element i adds to accumulator i % kNormLanes, sequentially; then the accumulators are
// added pairwise (0+8, 1+9, ..., then 0+4, ...). A float's square is exact in double.
template <Unscale UNSCALE, class G>
inline double grad_sq_block_as(const G* FASTADAM_RESTRICT g, std::int64_t n, float scale) {
    constexpr int lanes = static_cast<int>(kNormLanes);
    const float reciprocal = 1.0f / scale;
    double acc[lanes] = {};
    const auto term = [&](std::int64_t i) {
        float u = to_float(g[i]);
        if (UNSCALE == Unscale::divide) u = u / scale;
        if (UNSCALE == Unscale::multiply) u = u * reciprocal;
        return static_cast<double>(u) * static_cast<double>(u);
    };
    std::int64_t i = 0;
#if defined(FASTADAM_HAVE_F32X16)
    if constexpr (!std::is_same<G, F16>::value) {
        // Accumulators 4k..4k+3 in q[k], four doubles each: 256-bit conversions to double
        // are single operations where 512-bit ones are not (Zen 4 and 5), and the
        // kNormLanes / 4 independent sums keep the adder busy.
        using L = Lane<F32x16>;
        constexpr int quads = lanes / 4;
        __m256d q[quads];
        for (int k = 0; k < quads; ++k) q[k] = _mm256_loadu_pd(acc + 4 * k);
        const __m512 r = _mm512_set1_ps(reciprocal), sc = _mm512_set1_ps(scale);
        for (; i + lanes <= n; i += lanes) {
            for (int h = 0; h < lanes / 16; ++h) {
                __m512 u = L::load(g + i + 16 * h).r;
                if (UNSCALE == Unscale::divide) u = _mm512_div_ps(u, sc);
                if (UNSCALE == Unscale::multiply) u = _mm512_mul_ps(u, r);
                const __m256 lo = _mm512_castps512_ps256(u), hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1));
                const __m256d d[4] = {_mm256_cvtps_pd(_mm256_castps256_ps128(lo)), _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)),
                                      _mm256_cvtps_pd(_mm256_castps256_ps128(hi)), _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1))};
                for (int k = 0; k < 4; ++k) q[4 * h + k] = _mm256_add_pd(q[4 * h + k], _mm256_mul_pd(d[k], d[k]));
            }
        }
        for (int k = 0; k < quads; ++k) _mm256_storeu_pd(acc + 4 * k, q[k]);
    }
#endif
    for (; i + lanes <= n; i += lanes)
        for (int j = 0; j < lanes; ++j) acc[j] += term(i + j);
    for (int j = 0; i + j < n; ++j) acc[j] += term(i + j);
    for (int width = lanes / 2; width >= 1; width /= 2)
        for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
    return acc[0];
}
inline double grad_sq_block(Storage storage, const void* data, std::int64_t at, std::int64_t n, bool unscale, float scale) {
    double out = 0.0;
    with_storage(storage, data, [&](auto* g) {
        if (!unscale) out = grad_sq_block_as<Unscale::none>(g + at, n, scale);
        else if (reciprocal_is_exact(scale)) out = grad_sq_block_as<Unscale::multiply>(g + at, n, scale);
        else out = grad_sq_block_as<Unscale::divide>(g + at, n, scale);
    });
    return out;
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
