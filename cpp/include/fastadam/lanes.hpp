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
#include "fastadam/types.hpp"

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

// ----- quantized states (types.hpp, QuantMap; docs/design.md, "Quantized states") -----
// x's code: the bucket of x's bit pattern (its magnitude's binade and top mantissa bits,
// mirrored for negative x), then one compare of x's low mantissa bits with the bucket's
// one threshold, if it has one. NaN takes the last code. The vector Quantizers below
// compute the same, lane by lane.
inline std::uint32_t quantize_code(float x, const QuantMap& q) {
    const std::uint32_t w = bits_of(x);
    if ((w & 0x7fffffffu) > 0x7f800000u) return (1u << q.bits) - 1u;
    const auto a = static_cast<std::int32_t>(w & 0x7fffffffu);
    std::int32_t mb = ((a - q.magnitude_base) >> q.shift) + 1;  // below the base: <= 0
    mb = mb < 0 ? 0 : mb > q.top ? q.top : mb;
    const std::uint32_t mask = (1u << q.shift) - 1u, low = static_cast<std::uint32_t>(a) & mask;
    const bool negative = (w >> 31) != 0;
    const std::int32_t last_negative = q.negative_buckets - 1;
    const std::int32_t idx = negative ? last_negative - (mb < last_negative ? mb : last_negative) : q.negative_buckets + mb;
    const std::uint32_t key = negative ? mask - low : low, entry = q.buckets[idx];
    return (entry & 0xffu) + (key >= (entry >> 8) ? 1u : 0u);
}
// Code i of a state's codes (4 bits: two a byte, the even element in the high nibble).
template <int BITS>
inline std::uint32_t code_at(const std::uint8_t* codes, std::int64_t i) {
    if (BITS == 8) return codes[i];
    const std::uint32_t byte = codes[i / 2];
    return i % 2 == 0 ? byte >> 4 : byte & 15u;
}

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

// Quantized states' vector quantizer: types.hpp's estimate (QuantMap, the pieces), with
// every lane it cannot vouch for (the estimate near an integer or |x| near the junction,
// huge, inf or NaN) redone by quantize_code; so the codes are quantize_code's. No table
// lookup per element: a gather of 16 lanes costs about 25 cycles on Zen 5, where these
// permutes and compares cost about one each (docs/performance.md, "Quantized states").
struct QuantizerX16 {
    __m512i binade_base, last_binade, zero_code, one, piece_lo_a, piece_lo_b, piece_top;
    __m512 junction_a, junction_b, piece_scale, piece_offset, margin, big;
    const QuantMap* book;
    explicit QuantizerX16(const QuantMap& q)
        : binade_base(_mm512_set1_epi32(q.binade_base)), last_binade(_mm512_set1_epi32(31)), zero_code(_mm512_set1_epi32(q.zero_code)),
          one(_mm512_set1_epi32(1)),
          piece_lo_a(_mm512_loadu_si512(q.binade_piece)), piece_lo_b(_mm512_loadu_si512(q.binade_piece + 16)),
          piece_top(_mm512_loadu_si512(q.piece_top)), junction_a(_mm512_loadu_ps(q.binade_junction)),
          junction_b(_mm512_loadu_ps(q.binade_junction + 16)), piece_scale(_mm512_loadu_ps(q.piece_scale)),
          piece_offset(_mm512_loadu_ps(q.piece_offset)), margin(_mm512_set1_ps(kEstimateMargin)), big(_mm512_set1_ps(float_of(static_cast<std::uint32_t>(q.binade_base + 31) << 23))),
          book(&q) {}
    // The codes of 16 floats, one per 32-bit lane. SIGNED: the book has negative values
    // (zero_code > 0). BOUNDED: every |x| < 2 (so no NaN, and the binade index is at most
    // 31 without a clamp), as in a block of finite absmax.
    template <bool SIGNED, bool BOUNDED>
    __m512i codes(__m512 x) const {
        const __m512i w = _mm512_castps_si512(x);
        const __m512i bits = _mm512_and_si512(w, _mm512_set1_epi32(0x7fffffff));
        const __m512 a = _mm512_castsi512_ps(bits);
        __m512i binade = _mm512_max_epi32(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), binade_base), _mm512_setzero_si512());
        if (!BOUNDED) binade = _mm512_min_epi32(binade, last_binade);
        const __m512 junction = _mm512_permutex2var_ps(junction_a, binade, junction_b);
        __m512i piece = _mm512_permutex2var_epi32(piece_lo_a, binade, piece_lo_b);
        piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(a, junction, _CMP_GE_OQ), piece, one);
        // y >= 0 (the pieces' estimates are), so truncation is its floor; y - round(y) in one
        // vreduceps: the lane is near an integer where that is under the margin. At a junction
        // itself the sign decides (a tie goes to the larger code, so |x| at the junction counts
        // for x > 0, not for x < 0); off it, negative thresholds sit where the positive ones do
        // or one unit in the last place below, and the junction compare holds for both signs.
        const __m512 y = _mm512_fmadd_ps(a, _mm512_permutexvar_ps(piece, piece_scale), _mm512_permutexvar_ps(piece, piece_offset));
        const __m512 off = _mm512_reduce_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __mmask16 slow = _mm512_cmp_ps_mask(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(off), _mm512_set1_epi32(0x7fffffff))),
                                            margin, _CMP_LT_OQ) |
                         _mm512_cmp_ps_mask(a, junction, _CMP_EQ_OQ);
        if (!BOUNDED) slow |= _mm512_cmp_ps_mask(a, big, _CMP_NLT_UQ);
        const __m512i e = _mm512_min_epi32(_mm512_cvttps_epi32(y), _mm512_permutexvar_epi32(piece, piece_top));
        const __mmask16 negative = _mm512_movepi32_mask(w);
        __m512i code;
        if (SIGNED) {
            const __m512i below = _mm512_max_epi32(_mm512_sub_epi32(zero_code, e), _mm512_setzero_si512());
            code = _mm512_mask_blend_epi32(negative, _mm512_add_epi32(zero_code, e), below);
        } else {
            code = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~negative), e);  // every negative x: code 0
        }
        if (slow != 0) code = redo(x, code, slow);
        return code;
    }
    __m512i redo(__m512 x, __m512i code, __mmask16 lanes) const {
        alignas(64) float xs[16];
        alignas(64) std::int32_t codes[16];
        _mm512_store_ps(xs, x);
        _mm512_store_si512(codes, code);
        for (int k = 0; k < 16; ++k)
            if ((lanes >> k) & 1u) codes[k] = static_cast<std::int32_t>(quantize_code(xs[k], *book));
        return _mm512_load_si512(codes);
    }
};

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
    // Quantized states: the values of 16 codes from element i on (codes + i for 8 bits,
    // codes + i/2 for 4, i even), as a gather from the 256-entry book or one permute of
    // the 16-entry one; 16 codes (32-bit lanes) stored as bytes or nibble pairs.
    using Quantizer = QuantizerX16;
    template <int BITS>
    struct Dequantizer {
        __m512 book[16];  // the book's values, 16 a register (4 bits: book[0])
        explicit Dequantizer(const QuantMap& q) {
            for (int k = 0; k < (BITS == 8 ? 16 : 1); ++k) book[k] = _mm512_loadu_ps(q.values + 16 * k);
        }
        F32x16 operator()(const std::uint8_t* codes, std::int64_t i) const {
            if (BITS == 8) {
                // eight two-register permutes (32 values each, by the code's low 5 bits), then
                // three rounds of blends by bits 5, 6, 7: no gather (QuantizerX16)
                const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
                const auto pair = [&](int k) { return _mm512_permutex2var_ps(book[2 * k], idx, book[2 * k + 1]); };
                const auto bit = [&](int b) { return _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << b)); };
                const __mmask16 b5 = bit(5), b6 = bit(6), b7 = bit(7);
                const __m512 low = _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, pair(0), pair(1)), _mm512_mask_blend_ps(b5, pair(2), pair(3)));
                const __m512 high = _mm512_mask_blend_ps(b6, _mm512_mask_blend_ps(b5, pair(4), pair(5)), _mm512_mask_blend_ps(b5, pair(6), pair(7)));
                return {_mm512_mask_blend_ps(b7, low, high)};
            }
            const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2));
            const __m128i nibble = _mm_set1_epi8(0x0f);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), nibble), lo = _mm_and_si128(x, nibble);
            return {_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), book[0])};
        }
    };
    template <int BITS>
    static void store_codes(std::uint8_t* codes, std::int64_t i, __m512i c) {
        if (BITS == 8) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
            return;
        }
        // each 64-bit lane holds an (even, odd) pair: its low byte becomes even << 4 | odd
        const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i / 2), _mm512_cvtepi64_epi8(pairs));
    }
    static F32x16 abs(F32x16 x) { return {_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x.r), _mm512_set1_epi32(0x7fffffff)))}; }
    // a > b ? a : b (so b when either is NaN: NaNs are looked for apart, nan_lanes)
    static F32x16 max(F32x16 a, F32x16 b) { return {_mm512_max_ps(a.r, b.r)}; }
    static unsigned nan_lanes(F32x16 x) { return _mm512_cmp_ps_mask(x.r, x.r, _CMP_UNORD_Q); }
    static float reduce_max(F32x16 x) { return _mm512_reduce_max_ps(x.r); }
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
    // Quantized states, as Lane<F32x16>'s: gathers of 8 codes' values (4 bits: the book's
    // two halves, one permute each, blended on the code's bit 3).
    struct Quantizer {
        __m256i base, one, top, mask, negative_buckets, last_negative, low_byte, last_code;
        __m128i shift;
        const std::uint32_t* buckets;
        explicit Quantizer(const QuantMap& q)
            : base(_mm256_set1_epi32(q.magnitude_base)), one(_mm256_set1_epi32(1)), top(_mm256_set1_epi32(q.top)),
              mask(_mm256_set1_epi32((1 << q.shift) - 1)), negative_buckets(_mm256_set1_epi32(q.negative_buckets)),
              last_negative(_mm256_set1_epi32(q.negative_buckets - 1)), low_byte(_mm256_set1_epi32(0xff)),
              last_code(_mm256_set1_epi32((1 << q.bits) - 1)), shift(_mm_cvtsi32_si128(q.shift)), buckets(q.buckets) {}
        template <bool SIGNED, bool BOUNDED>  // (the vector estimate's options; the table lookup needs none)
        __m256i codes(__m256 x) const {
            const __m256i w = _mm256_castps_si256(x);
            const __m256i a = _mm256_and_si256(w, _mm256_set1_epi32(0x7fffffff));
            __m256i mb = _mm256_add_epi32(_mm256_sra_epi32(_mm256_sub_epi32(a, base), shift), one);
            mb = _mm256_min_epi32(_mm256_max_epi32(mb, _mm256_setzero_si256()), top);
            const __m256i low = _mm256_and_si256(a, mask);
            const __m256i negative = _mm256_srai_epi32(w, 31);
            const __m256i idx = _mm256_blendv_epi8(_mm256_add_epi32(mb, negative_buckets),
                                                   _mm256_sub_epi32(last_negative, _mm256_min_epi32(mb, last_negative)), negative);
            const __m256i key = _mm256_blendv_epi8(low, _mm256_sub_epi32(mask, low), negative);
            const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(buckets), idx, 4);
            // key >= threshold, unsigned (both below 2^24: the signed compare is the unsigned one)
            const __m256i below = _mm256_cmpgt_epi32(_mm256_srli_epi32(entry, 8), key);
            const __m256i code = _mm256_add_epi32(_mm256_and_si256(entry, low_byte), _mm256_andnot_si256(below, one));
            return _mm256_blendv_epi8(code, last_code, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
        }
    };
    template <int BITS>
    struct Dequantizer {
        const float* values;
        __m256 low_half, high_half;
        explicit Dequantizer(const QuantMap& q) : values(q.values), low_half(_mm256_loadu_ps(q.values)), high_half(_mm256_loadu_ps(q.values + 8)) {}
        F32x8 operator()(const std::uint8_t* codes, std::int64_t i) const {
            if (BITS == 8) {
                const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
                return {_mm256_i32gather_ps(values, idx, 4)};
            }
            std::int32_t four;
            std::memcpy(&four, codes + i / 2, 4);
            const __m128i x = _mm_cvtsi32_si128(four), nibble = _mm_set1_epi8(0x0f);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), nibble), lo = _mm_and_si128(x, nibble);
            const __m256i idx = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
            return {_mm256_blendv_ps(_mm256_permutevar8x32_ps(low_half, idx), _mm256_permutevar8x32_ps(high_half, idx),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))};
        }
    };
    template <int BITS>
    static void store_codes(std::uint8_t* codes, std::int64_t i, __m256i c) {
        if (BITS == 4) {  // (even, odd) pairs in 64-bit lanes: low byte even << 4 | odd, then bytes 0, 8 of each half
            c = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
            c = _mm256_shuffle_epi8(c, _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                        0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
            const std::uint16_t out[2] = {static_cast<std::uint16_t>(_mm256_extract_epi16(c, 0)),
                                          static_cast<std::uint16_t>(_mm256_extract_epi16(c, 8))};
            std::memcpy(codes + i / 2, out, 4);
            return;
        }
        const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c, c), _mm256_setzero_si256());
        const std::int32_t out[2] = {_mm256_extract_epi32(bytes, 0), _mm256_extract_epi32(bytes, 4)};
        std::memcpy(codes + i, out, 8);
    }
    static F32x8 abs(F32x8 x) { return {_mm256_and_ps(x.r, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)))}; }
    static F32x8 max(F32x8 a, F32x8 b) { return {_mm256_max_ps(a.r, b.r)}; }
    static unsigned nan_lanes(F32x8 x) { return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(x.r, x.r, _CMP_UNORD_Q))); }
    static float reduce_max(F32x8 x) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(x.r), _mm256_extractf128_ps(x.r, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        return _mm_cvtss_f32(m);
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
