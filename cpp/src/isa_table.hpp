// The functions each SIMD target provides, as one table per target.
#pragma once

#include <cstdint>

#include "fastadam/types.hpp"

namespace fastadam {

template <class T>
using AdamSegmentFn = void (*)(const AdamTensor<T>&, const AdamScalars<T>&, std::int64_t, std::int64_t);
template <class T>
using SgdSegmentFn = void (*)(const SgdTensor<T>&, const SgdScalars<T>&, std::int64_t, std::int64_t);

struct KernelTable {
    AdamSegmentFn<float> adam_f32;
    AdamSegmentFn<double> adam_f64;
    SgdSegmentFn<float> sgd_f32;
    SgdSegmentFn<double> sgd_f64;
    void (*sqrt_f32)(const float* x, const float* estimate, float* out, std::int64_t n);
    void (*adam_mixed)(const AdamMixedTensor&, const AdamScalars<float>&, std::int64_t, std::int64_t);
    double (*grad_sq_block)(Storage, const void*, std::int64_t at, std::int64_t n, bool unscale, float scale);
    void (*quantize_codes)(const float* x, std::uint8_t* codes, std::int64_t n, const QuantMap& book, bool bounded);
    void (*quantize_blockwise)(const float* x, std::int64_t n, std::uint8_t* codes, float* absmax, const QuantMap& book);
    void (*dequantize_blockwise)(const std::uint8_t* codes, const float* absmax, std::int64_t n, float* out, const QuantMap& book);
};

namespace baseline { extern const KernelTable kernel_table; }
#if defined(FASTADAM_HAVE_AVX2)
namespace avx2 { extern const KernelTable kernel_table; }
#endif
#if defined(FASTADAM_HAVE_AVX512)
namespace avx512 { extern const KernelTable kernel_table; }
#endif

}  // namespace fastadam
