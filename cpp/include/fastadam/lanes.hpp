// fastadam: what one step of the loops in kernels.hpp operates on. A lane type V is
// either one element (float, double) or, where the target has one, a SIMD vector
// of float (F32x16 on AVX-512, F32x8 on AVX2). Lane<V> gives its loads, stores and
// square roots; V's own operators are IEEE add, subtract, multiply, divide, one
// rounding each, so a vector lane computes the bits of the scalar code.
//
// Like kernels.hpp, this is compiled once per SIMD target inside the per-target
// namespace fastadam::FASTADAM_ISA_NS.
#pragma once

#include <cstdint>

#include "fastadam/convert.hpp"

#if defined(__AVX512F__)
#if !defined(_MSC_VER) && !(defined(__AVX512BW__) && defined(__AVX512DQ__))
#error "the AVX-512 path needs AVX-512BW (bf16 packing) and DQ (64-bit multiplies): -mavx512f -mavx512bw -mavx512dq"
#endif
#include <immintrin.h>
#define FASTADAM_HAVE_F32X16 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define FASTADAM_HAVE_F32X8 1
#endif

#ifndef FASTADAM_ISA_NS
#define FASTADAM_ISA_NS generic
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

// NaN-propagating maximum, as numpy.maximum (the reference): a where a > b or a is NaN,
// else b, so on ties (-0.0 against 0.0) the second operand.
template <class T>
inline T nan_max(T a, T b) {
    return (a > b || a != a) ? a : b;
}

// One element. The loops over scalar lanes are what the compiler auto-vectorises.
template <class T>
struct Lane {
    static T load(const T* p) { return *p; }
    static void store(T* p, T x) { *p = x; }
    // 2-byte storages of a float32-arithmetic step (convert.hpp); used with T = float only.
    static T load(const Bf16* p) { return to_float(*p); }
    static T load(const F16* p) { return to_float(*p); }
    static void store(Bf16* p, T x) { from_float(*p, x); }
    static void store(F16* p, T x) { from_float(*p, x); }
    static T broadcast(T x) { return x; }
    static T sqrt(T x) { return ieee_sqrt(x); }
    template <class... U>
    static void loads_before_stores(U&...) {}
};

#if defined(FASTADAM_HAVE_F32X16) || defined(FASTADAM_HAVE_F32X8)
// Claims to change the vectors' registers, so the compiler must have loaded them by
// here and cannot load them again later; emits nothing. (MSVC has no GNU asm: there it
// does nothing, the hint being only a hint.)
#if defined(__GNUC__)
template <class V>
inline void keep_loaded(V& a, V& b, V& c, V& d) {
    __asm__ volatile("" : "+v"(a.r), "+v"(b.r), "+v"(c.r), "+v"(d.r));
}
template <class V>
inline void keep_loaded(V& a, V& b, V& c, V& d, V& e) {
    __asm__ volatile("" : "+v"(a.r), "+v"(b.r), "+v"(c.r), "+v"(d.r), "+v"(e.r));
}
#else
template <class... V>
inline void keep_loaded(V&...) {}
#endif

// What the vector lanes share. loads_before_stores makes the compiler finish one
// update's loads before its stores. Left alone, GCC (told by __restrict__ that the
// arrays do not overlap) re-reads param and grad after storing exp_avg and
// exp_avg_sq. NumPy puts its large arrays all at one offset within a page, and a load
// behind a store to the same offset in another array waits for it (4K aliasing): 8% on
// a 1e5-element step with NumPy's arrays (fastadam_bench --layout=numpy, README).
// Scalar lanes need no such hint, being auto-vectorised loops it would get in the way of.
struct VectorLane {
    template <class... U>
    static void loads_before_stores(U&... loaded) {
        keep_loaded(loaded...);
    }
};
#endif

#if defined(FASTADAM_HAVE_F32X16)
// Sixteen floats in one AVX-512 register.
struct F32x16 {
    __m512 r;
};
inline F32x16 operator+(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.r, b.r)}; }
inline F32x16 operator-(F32x16 a, F32x16 b) { return {_mm512_sub_ps(a.r, b.r)}; }
inline F32x16 operator*(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.r, b.r)}; }
inline F32x16 operator/(F32x16 a, F32x16 b) { return {_mm512_div_ps(a.r, b.r)}; }
// IEEE negation flips the sign bit only (AVX-512F has no floating-point xor).
inline F32x16 operator-(F32x16 a) {
    return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.r), _mm512_set1_epi32(INT32_MIN)))};
}
inline F32x16 nan_max(F32x16 a, F32x16 b) {
    const __mmask16 take_a = _mm512_cmp_ps_mask(a.r, b.r, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a.r, a.r, _CMP_UNORD_Q);
    return {_mm512_mask_blend_ps(take_a, b.r, a.r)};
}

// The correctly rounded square root without the divide unit, for x in [2^-64, 2^64).
// A float square root and a float division share one execution unit, which bounds
// an in-cache Adam step; this sequence runs on the FMA units instead. From
// rsqrt14's estimate y ~ 1/sqrt(x) (relative error < 2^-14): one Goldschmidt
// iteration refines g ~ sqrt(x) and h ~ 1/(2 sqrt(x)) to about 2^-28, then the
// exact remainder d = x - g*g (one FMA, exact as g is that close) gives the
// correctly rounded g + d*h. Checked bit for bit against the IEEE square root for
// every non-negative float, and for estimates anywhere within 3 * 2^-14 of 1/sqrt(x)
// (the ISA bounds rsqrt14's error, CPU makers' bits differ) on [1, 4), which stands
// for the whole range: scaling x by 4 scales every intermediate exactly
// (tests/test_exact_sqrt.py). The range keeps every intermediate, d included, zero
// or a normal float. It assumes round-to-nearest: the caller checks.
inline __m512 sqrt_from_estimate(__m512 x, __m512 y) {
    const __m512 half = _mm512_set1_ps(0.5f);
    __m512 g = _mm512_mul_ps(x, y);
    __m512 h = _mm512_mul_ps(half, y);
    const __m512 r = _mm512_fnmadd_ps(g, h, half);
    g = _mm512_fmadd_ps(g, r, g);
    h = _mm512_fmadd_ps(h, r, h);
    const __m512 d = _mm512_fnmadd_ps(g, g, x);
    return _mm512_fmadd_ps(d, h, g);
}

// The IEEE square root of every lane, by sqrt_from_estimate where x is in [2^-64, 2^64).
// Lanes outside it (zero, subnormal, huge, infinite, negative, NaN) take the
// divide unit's square root instead; the test is one unsigned compare of the bit patterns.
// The FMA sequence sees 1 in those lanes: on 0 or inf it would compute 0 * inf and
// raise the invalid-operation flag (a trap, if the program enabled it), which the
// IEEE square root of those values does not.
inline F32x16 sqrt_by_fma(F32x16 x) {
    const __m512i bits = _mm512_castps_si512(x.r);
    constexpr int lowest = (127 - 64) << 23, past_highest = (127 + 64) << 23;
    const __mmask16 in_range = _mm512_cmp_epu32_mask(_mm512_sub_epi32(bits, _mm512_set1_epi32(lowest)),
                                                     _mm512_set1_epi32(past_highest - lowest), _MM_CMPINT_LT);
    const __m512 safe = _mm512_mask_blend_ps(in_range, _mm512_set1_ps(1.0f), x.r);
    __m512 s = sqrt_from_estimate(safe, _mm512_rsqrt14_ps(safe));
    if (in_range != 0xFFFF) s = _mm512_mask_sqrt_ps(s, static_cast<__mmask16>(~in_range), x.r);
    return {s};
}

// sqrt_from_estimate's results are those of the IEEE square root only when rounding to
// nearest, the default that NumPy and every compiler assume; under any other
// MXCSR rounding mode the loops keep to the divide unit's square root.
inline bool rounding_to_nearest() { return (_mm_getcsr() & 0x6000u) == 0; }

template <>
struct Lane<F32x16> : VectorLane {
    static constexpr int width = 16;
    static F32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
    static void store(float* p, F32x16 x) { _mm512_storeu_ps(p, x.r); }
    static F32x16 broadcast(float x) { return {_mm512_set1_ps(x)}; }
    static F32x16 sqrt(F32x16 x) { return {_mm512_sqrt_ps(x.r)}; }
    // The first `count` (1..15) floats at p; the other lanes repeat p[0]. Masked-off
    // memory is not read, so this never touches anything past the range. Since every
    // array's extra lanes repeat its first element, they take element 0's operations
    // on element 0's values and raise no floating-point flag that it does not (a fixed
    // fill, such as 1, overflows or meets inf * 0 under some valid hyper-parameters).
    static F32x16 load_first(const float* p, int count) {
        return {_mm512_mask_loadu_ps(_mm512_set1_ps(p[0]), first_lanes(count), p)};
    }
    static void store_first(float* p, F32x16 x, int count) { _mm512_mask_storeu_ps(p, first_lanes(count), x.r); }
    static __mmask16 first_lanes(int count) { return static_cast<__mmask16>((1u << count) - 1u); }
    // bfloat16 storage (convert.hpp): widening puts each half in a float's top 16 bits;
    // narrowing is narrow_bf16's integer rounding in every lane, then one word permute
    // (vpermw, AVX-512BW) of the top halves (docs/performance.md, "Mixed precision").
    static F32x16 load(const Bf16* p) {
        const __m512i h = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return {_mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, word_to_top_half(), h))};
    }
    static void store(Bf16* p, F32x16 x) {
        const __m512i u = _mm512_castps_si512(x.r);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
        const __mmask16 nan = _mm512_cmp_ps_mask(x.r, x.r, _CMP_UNORD_Q);
        // u & 0x80000000 | 0x7fc00000 in one ternary-logic operation: A & B | C is 0xEA.
        // (A branch around it puts cold blocks in the loops for no measurable gain.)
        const __m512i quiet = _mm512_ternarylogic_epi32(u, _mm512_set1_epi32(INT32_MIN), _mm512_set1_epi32(0x7fc00000), 0xEA);
        const __m512i packed = _mm512_permutexvar_epi16(top_halves(), _mm512_mask_blend_epi32(nan, rounded, quiet));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
    }
    // word 2i+1 <- word i (the rest zeroed by the load's mask); word i <- word 2i+1
    static __m512i word_to_top_half() {
        return _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    }
    static __m512i top_halves() {
        return _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    }
    // float16 storage (convert.hpp): AVX-512F's conversions round to nearest even whatever
    // the rounding mode, and keep subnormals, as NumPy's do; NaN lanes get NumPy's bits
    // (the payload kept as it is), where the hardware would quiet a signalling NaN.
    static F32x16 load(const F16* p) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m512 f = _mm512_cvt_roundph_ps(h, _MM_FROUND_NO_EXC);  // flags as the scalar code: none
        const __m512i w = _mm512_cvtepu16_epi32(h);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(w, _mm512_set1_epi32(0x7fff)), _mm512_set1_epi32(0x7c00));
        if (nan == 0) return {f};
        const __m512i bits = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x8000)), 16),
                                             _mm512_or_si512(_mm512_set1_epi32(0x7f800000),
                                                             _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x3ff)), 13)));
        return {_mm512_mask_blend_ps(nan, f, _mm512_castsi512_ps(bits))};
    }
    static void store(F16* p, F32x16 x) {
        const __m256i h = _mm512_cvtps_ph(x.r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __mmask16 nan = _mm512_cmp_ps_mask(x.r, x.r, _CMP_UNORD_Q);
        if (nan == 0) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
            return;
        }
        // sign | 0x7c00 | the payload's top ten bits, made 1 where they are 0 (never inf)
        const __m512i u = _mm512_castps_si512(x.r);
        __m512i payload = _mm512_and_si512(_mm512_srli_epi32(u, 13), _mm512_set1_epi32(0x3ff));
        payload = _mm512_mask_mov_epi32(payload, _mm512_cmpeq_epi32_mask(payload, _mm512_setzero_si512()), _mm512_set1_epi32(1));
        const __m512i nan_bits = _mm512_or_si512(
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7c00)), payload);
        const __m512i merged = _mm512_mask_blend_epi32(nan, _mm512_cvtepu16_epi32(h), nan_bits);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(merged));
    }
};
#endif

#if defined(FASTADAM_HAVE_F32X8)
// Eight floats in one AVX2 register: the same update as F32x16, with the divide
// unit's square root only: AVX2's vrsqrtps estimate (error up to 1.5 * 2^-12) is
// outside the 3 * 2^-14 that sqrt_from_estimate was checked to tolerate.
struct F32x8 {
    __m256 r;
};
inline F32x8 operator+(F32x8 a, F32x8 b) { return {_mm256_add_ps(a.r, b.r)}; }
inline F32x8 operator-(F32x8 a, F32x8 b) { return {_mm256_sub_ps(a.r, b.r)}; }
inline F32x8 operator*(F32x8 a, F32x8 b) { return {_mm256_mul_ps(a.r, b.r)}; }
inline F32x8 operator/(F32x8 a, F32x8 b) { return {_mm256_div_ps(a.r, b.r)}; }
inline F32x8 operator-(F32x8 a) { return {_mm256_xor_ps(a.r, _mm256_set1_ps(-0.0f))}; }
inline F32x8 nan_max(F32x8 a, F32x8 b) {
    const __m256 take_a = _mm256_or_ps(_mm256_cmp_ps(a.r, b.r, _CMP_GT_OQ), _mm256_cmp_ps(a.r, a.r, _CMP_UNORD_Q));
    return {_mm256_blendv_ps(b.r, a.r, take_a)};
}

template <>
struct Lane<F32x8> : VectorLane {
    static constexpr int width = 8;
    static F32x8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
    static void store(float* p, F32x8 x) { _mm256_storeu_ps(p, x.r); }
    static F32x8 broadcast(float x) { return {_mm256_set1_ps(x)}; }
    static F32x8 sqrt(F32x8 x) { return {_mm256_sqrt_ps(x.r)}; }
    // bfloat16 storage, as Lane<F32x16>'s; AVX2 packs with unsigned saturation (every
    // rounded lane fits 16 bits) and puts the two halves' results together.
    static F32x8 load(const Bf16* p) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return {_mm256_castsi256_ps(_mm256_slli_epi32(h, 16))};
    }
    static void store(Bf16* p, F32x8 x) {
        const __m256i u = _mm256_castps_si256(x.r);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
        const __m256i quiet = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
                                              _mm256_set1_epi32(0x7fc0));
        const __m256i h = _mm256_blendv_epi8(rounded, quiet, nan);
        store_halves(p, h);
    }
    // float16 storage, as Lane<F32x16>'s, with F16C (which the AVX2 path requires).
    static F32x8 load(const F16* p) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m256 f = _mm256_cvtph_ps(h);
        const __m256i w = _mm256_cvtepu16_epi32(h);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7fff)), _mm256_set1_epi32(0x7c00));
        if (_mm256_testz_si256(nan, nan)) return {f};
        const __m256i bits = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x8000)), 16),
                                             _mm256_or_si256(_mm256_set1_epi32(0x7f800000),
                                                             _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x3ff)), 13)));
        return {_mm256_blendv_ps(f, _mm256_castsi256_ps(bits), _mm256_castsi256_ps(nan))};
    }
    static void store(F16* p, F32x8 x) {
        const __m128i h = _mm256_cvtps_ph(x.r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 nan = _mm256_cmp_ps(x.r, x.r, _CMP_UNORD_Q);
        if (_mm256_movemask_ps(nan) == 0) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
            return;
        }
        const __m256i u = _mm256_castps_si256(x.r);
        __m256i payload = _mm256_and_si256(_mm256_srli_epi32(u, 13), _mm256_set1_epi32(0x3ff));
        payload = _mm256_or_si256(payload, _mm256_and_si256(_mm256_cmpeq_epi32(payload, _mm256_setzero_si256()), _mm256_set1_epi32(1)));
        const __m256i nan_bits = _mm256_or_si256(
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7c00)), payload);
        store_halves(p, _mm256_blendv_epi8(_mm256_cvtepu16_epi32(h), nan_bits, _mm256_castps_si256(nan)));
    }
    // Eight 32-bit lanes that each hold 16 bits, packed (unsigned saturation keeps them) and stored.
    template <class S>
    static void store_halves(S* p, __m256i h) {
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
};
#endif

}  // namespace FASTADAM_ISA_NS
}  // namespace fastadam
