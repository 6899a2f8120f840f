// fastadam: exact conversions between float and the 2-byte float storages (bfloat16,
// float16), in integer and IEEE operations only, so that every SIMD path (and NumPy /
// ml_dtypes, the reference) gives the same bits. Widening is exact; narrowing rounds to
// nearest even, keeps subnormals, gives inf on overflow and keeps NaN a NaN
// (docs/design.md, "Mixed precision"). Compiled per SIMD target like kernels.hpp.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef FASTADAM_ISA_NS
#define FASTADAM_ISA_NS generic
#endif

namespace fastadam {
namespace FASTADAM_ISA_NS {

inline std::uint32_t bits_of(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float float_of(std::uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// bfloat16: the top half of a float.
inline float widen_bf16(std::uint16_t h) { return float_of(static_cast<std::uint32_t>(h) << 16); }
// ml_dtypes' rounding: to nearest even; a NaN becomes the quiet NaN 0x7fc0 of its sign.
inline std::uint16_t narrow_bf16(float x) {
    const std::uint32_t u = bits_of(x);
    const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return static_cast<std::uint16_t>(nan ? ((u >> 16) & 0x8000u) | 0x7fc0u : rounded);
}

// Stochastic rounding to bfloat16 (docs/design.md, "Stochastic rounding"): 16 random bits
// added to the float's bits before truncation round up with probability equal to the
// dropped fraction, so the rounding is unbiased. NaN stays the quiet NaN of its sign.
inline std::uint16_t narrow_bf16_stochastic(float x, std::uint32_t random16) {
    const std::uint32_t u = bits_of(x);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return static_cast<std::uint16_t>(nan ? ((u >> 16) & 0x8000u) | 0x7fc0u : (u + random16) >> 16);
}
// splitmix64's output function: a counter-based generator, so the random bits of an
// element depend on (seed, step, element index) only, not on threads or SIMD path.
inline std::uint64_t mix64(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
constexpr std::uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;
// The key of one tensor's step; element i takes the top 16 bits of mix64(key + (i+1)*gamma).
inline std::uint64_t rounding_key(std::uint64_t seed, std::int64_t step) {
    return mix64(seed * kGoldenGamma + static_cast<std::uint64_t>(step));
}
inline std::uint32_t rounding_bits(std::uint64_t key, std::int64_t index) {
    return static_cast<std::uint32_t>(mix64(key + (static_cast<std::uint64_t>(index) + 1u) * kGoldenGamma) >> 48);
}

// float16 (IEEE binary16), NumPy's conversions (npy_half): rounding to nearest even in
// integer arithmetic, whatever the floating-point rounding mode. A subnormal half
// widens with one exact float subtraction of two normal floats.
inline float widen_f16(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = h & 0x7c00u, mant = h & 0x03ffu;
    std::uint32_t u;
    if (exp == 0x7c00u) u = 0x7f800000u | (mant << 13);                     // inf, NaN (payload kept)
    else if (exp != 0) u = ((exp + ((127u - 15u) << 10)) << 13) | (mant << 13);  // normal
    else return float_of(sign | bits_of(float_of((113u << 23) | (mant << 13)) - float_of(113u << 23)));  // 0, subnormal
    return float_of(sign | u);
}
inline std::uint16_t narrow_f16(float x) {
    const std::uint32_t u = bits_of(x);
    const std::uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    std::uint32_t h;
    if (a > 0x7f800000u) {  // NaN: NumPy keeps the top of the payload, never making it inf
        h = 0x7c00u | ((a >> 13) & 0x3ffu);
        if (h == 0x7c00u) h = 0x7c01u;
    } else if (a >= 0x47800000u) {  // >= 65536 or inf (65520..65536 round up below)
        h = 0x7c00u;
    } else if (a < 0x38800000u) {  // below 2^-14: the subnormal grid, 2^-24 apart
        if (a < 0x33000000u) {      // at most 2^-25: half the grid's step rounds to even, 0
            h = 0;
        } else {
            const std::uint32_t shift = 126u - (a >> 23);   // 14..24: the bits below the grid
            const std::uint32_t sig = (a & 0x007fffffu) | 0x00800000u;
            const std::uint32_t half = 1u << (shift - 1), rest = sig & ((1u << shift) - 1u);
            h = sig >> shift;
            h += rest > half || (rest == half && (h & 1u));  // to nearest, ties to even
        }
    } else {  // normal: rebias, round the 13 dropped bits to nearest even
        h = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    }
    return static_cast<std::uint16_t>(sign | h);
}

// The storage types of a mixed-precision step's arrays, and their scalar conversions.
struct Bf16 {
    std::uint16_t bits;
};
struct F16 {
    std::uint16_t bits;
};
inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) { return widen_bf16(x.bits); }
inline float to_float(F16 x) { return widen_f16(x.bits); }
inline void from_float(float& out, float x) { out = x; }
inline void from_float(Bf16& out, float x) { out.bits = narrow_bf16(x); }
inline void from_float(F16& out, float x) { out.bits = narrow_f16(x); }

}  // namespace FASTADAM_ISA_NS
}  // namespace fastadam
