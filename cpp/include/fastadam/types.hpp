// fastadam: plain data types shared by the kernel, the dispatcher and the bindings.
// Pure C++17, no Python, no SIMD: safe to include from any translation unit.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastadam {

// Hyper-parameters of one Adam parameter group, in the units torch.optim.Adam uses.
struct AdamHyperparams {
    double lr = 1e-3;            // learning rate (step length in parameter units per unit of m/sqrt(v))
    double beta1 = 0.9;          // decay rate of the first moment (exp_avg)
    double beta2 = 0.999;        // decay rate of the second moment (exp_avg_sq)
    double eps = 1e-8;           // added to the bias-corrected sqrt(v), same units as the gradient
    double weight_decay = 0.0;   // L2 coefficient (Adam) or decoupled decay rate (AdamW)
    bool decoupled_weight_decay = false;  // true: AdamW, p *= 1 - lr*weight_decay
    bool amsgrad = false;        // keep max_exp_avg_sq = max over steps of exp_avg_sq
    bool maximize = false;       // ascend instead of descend
};

// One tensor of an Adam step: five buffers of `size` elements, updated in place.
// The caller guarantees the written buffers do not overlap each other or grad
// (the bindings check it); the kernel relies on it (restrict).
template <class T>
struct AdamTensor {
    T* param = nullptr;
    const T* grad = nullptr;
    T* exp_avg = nullptr;
    T* exp_avg_sq = nullptr;
    T* max_exp_avg_sq = nullptr;  // only read and written when hyper->amsgrad
    std::int64_t size = 0;
    std::int64_t step = 1;        // 1-based count of this update (torch's state["step"] after increment)
    const AdamHyperparams* hyper = nullptr;
};

// The per-step scalars, computed in double (as PyTorch computes them in Python
// floats) and rounded once to the tensor dtype.
//
// The bias correction of the second moment is applied as a multiplication by
// 1/sqrt(1 - beta2^t) rather than a division by sqrt(1 - beta2^t) (as DeepSpeed's
// CPUAdam does): the update then needs one division and one square root per element
// instead of two divisions and a square root, and those share one execution unit
// that bounds the step whenever the data fit in cache (1.36x measured at 1e6
// elements, README).
//
// exp_avg follows torch's lerp(exp_avg, grad, w), w = T(1 - beta1): exp_avg + w*(grad -
// exp_avg) for |w| < 0.5, else grad - (1 - w)*(grad - exp_avg), which keeps small
// gradients that the first form cancels when beta1 is near 0. The second is computed as
// grad + lerp_weight*(grad - exp_avg) with lerp_weight = -(1 - w); which form is a
// template parameter of the loop (lerp_from_grad), so the loop carries no select.
template <class T>
inline bool lerp_from_grad(const AdamHyperparams& h) {
    return !(std::fabs(static_cast<double>(static_cast<T>(1.0 - h.beta1))) < 0.5);
}

template <class T>
struct AdamScalars {
    T lerp_weight, beta2, one_minus_beta2, weight_decay, decay_factor;
    T step_size, inv_bias_correction2_sqrt, eps;
    // Mixed precision's gradient transform in the fused loop (kernels.hpp,
    // adam_mixed_segment): g = (g * grad_unscale) * grad_clip, each 1 when unused.
    T grad_unscale = T(1), grad_clip = T(1);
};

template <class T>
inline AdamScalars<T> adam_scalars(const AdamHyperparams& h, std::int64_t step) {
    const double s = static_cast<double>(step);
    const double bias_correction1 = 1.0 - std::pow(h.beta1, s);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, s);
    AdamScalars<T> out;
    const T weight = static_cast<T>(1.0 - h.beta1);
    out.lerp_weight = lerp_from_grad<T>(h) ? static_cast<T>(-(T(1) - weight)) : weight;
    out.beta2 = static_cast<T>(h.beta2);
    out.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
    out.weight_decay = static_cast<T>(h.weight_decay);
    out.decay_factor = static_cast<T>(1.0 - h.lr * h.weight_decay);
    out.step_size = static_cast<T>(h.lr / bias_correction1);
    out.inv_bias_correction2_sqrt = static_cast<T>(1.0 / std::sqrt(bias_correction2));
    out.eps = static_cast<T>(h.eps);
    return out;
}

// How a float32-arithmetic tensor's array is stored (mixed precision, docs/design.md
// "Mixed precision"): loads widen exactly to float, stores round to nearest even.
enum class Storage : std::uint8_t { float32 = 0, bfloat16 = 1, float16 = 2 };

inline int storage_bytes(Storage s) { return s == Storage::float32 ? 4 : 2; }

// What a mixed-precision step does to every gradient before Adam sees it, the same for
// all tensors of the step: g = grad / grad_scale (loss scaling, as torch's fused Adam),
// then g = g * clip_coef (global-norm clipping, torch's clip_grad_norm_ coefficient).
struct GradTransform {
    bool unscale = false;
    float grad_scale = 1.0f;
    bool clip = false;
    float clip_coef = 1.0f;
};

// One tensor of a mixed-precision Adam step: the arithmetic is float32's (AdamTensor<float>),
// each array stored as `*_dtype` says. param_out (nullable) receives the updated param
// rounded to param_out_dtype (a bf16/fp16 model copy of fp32 master weights).
struct AdamMixedTensor {
    void* param = nullptr;
    const void* grad = nullptr;
    void* exp_avg = nullptr;
    void* exp_avg_sq = nullptr;
    void* max_exp_avg_sq = nullptr;  // only read and written when hyper->amsgrad
    void* param_out = nullptr;
    Storage param_dtype = Storage::float32, grad_dtype = Storage::float32, state_dtype = Storage::float32,
            param_out_dtype = Storage::bfloat16;
    std::int64_t size = 0;
    std::int64_t step = 1;
    const AdamHyperparams* hyper = nullptr;
    const GradTransform* transform = nullptr;  // nullptr: the gradient as it is
    // bfloat16 params only: round the updated param stochastically with this seed
    // (convert.hpp, rounding_key), not to nearest.
    bool stochastic_rounding = false;
    std::uint64_t rounding_seed = 0;
    // Quantized states: 8 or 4 bits a code, exp_avg and exp_avg_sq then point at their
    // codes (uint8), *_absmax at one float per block (quant_block); 0: states stored as
    // state_dtype says. Not with amsgrad.
    int state_bits = 0;
    float* exp_avg_absmax = nullptr;
    float* exp_avg_sq_absmax = nullptr;
};

// ----- blockwise-quantized states (docs/design.md, "Quantized states") -----------------

// Elements per block of one absmax: 8-bit codes (bitsandbytes' and torchao's size), 4-bit.
constexpr std::int64_t kQuantBlock8 = 256, kQuantBlock4 = 128;
inline std::int64_t quant_block(int bits) { return bits == 4 ? kQuantBlock4 : kQuantBlock8; }

// A code book and what the kernel needs to quantize to it (fastadam.reference.quant_map,
// quant_thresholds). A value's code is the number of thresholds at or below it, found
// without a search: the value's bit pattern picks a bucket, a range of floats that holds
// at most one threshold, whose table entry is the code at the bucket's start plus that
// threshold's low mantissa bits (quant_maps.cpp builds it; lanes.hpp, quantize_code).
struct QuantMap {
    int bits = 8;
    bool is_signed = true;
    float values[256] = {};      // the value of each of the 2^bits codes, ascending
    float thresholds[256] = {};  // threshold j: the smallest float whose code is > j (2^bits - 1 of them)
    // Buckets of |x|: 0 below 2^(exponent_base-127); 1..top-1 cut 2^bucket_bits per binade
    // (the top bits of the mantissa); top from 1.0 up (inf, NaN). Negative x take
    // negative_buckets entries (1 for the unsigned book: all quantize to code 0), mirrored.
    std::int32_t magnitude_base = 0;  // the bit pattern of 2^(exponent_base-127)
    int shift = 0;                    // 23 - bucket_bits: x's low bits compared in a bucket
    std::int32_t top = 0;
    std::int32_t negative_buckets = 0;
    // entry = code at the bucket's start | (the threshold's low bits, ordered as x, or
    // 2^shift for none) << 8
    const std::uint32_t* buckets = nullptr;
    std::int32_t bucket_count = 0;
    // The AVX-512 path's estimate (lanes.hpp, QuantizerX16), without a table lookup per
    // element: E(|x|), the number of positive thresholds at or below |x|, is affine between
    // junctions (the values of a decade of the dynamic map are evenly spaced). |x|'s
    // binade picks its piece (binade_piece, plus 1 at or above binade_junction), and
    // E = min(floor(|x| * piece_scale + piece_offset), piece_top). The code is then
    // zero_code + E, or zero_code - E for negative x (at least 0). Lanes whose estimate
    // is within kEstimateMargin of an integer, or |x| at the junction, or |x| >=
    // 2^(binade_base - 96), take quantize_code.
    std::int32_t zero_code = 0;    // the code of 0: thresholds below zero
    std::int32_t binade_base = 0;  // binade index = clamp(biased exponent of |x| - binade_base, 0, 31)
    std::int32_t binade_piece[32] = {};
    float binade_junction[32] = {};
    float piece_scale[16] = {}, piece_offset[16] = {};
    std::int32_t piece_top[16] = {};
};
// How close to an integer the estimate may come before a lane is quantized one at a time:
// 2^-12, against the estimate's error of under 5e-5 (the float arithmetic, and thresholds
// off their even grid by their rounding to float).
constexpr float kEstimateMargin = 1.0f / 4096;

// The four code books: 8 bits signed (exp_avg) and unsigned (exp_avg_sq), 4 bits signed
// and unsigned. Built once, when the library loads.
const QuantMap& quant_map(int bits, bool is_signed);

// A gradient for the global-norm pass (grad_sq_sum).
struct GradView {
    const void* data = nullptr;
    Storage dtype = Storage::float32;
    std::int64_t size = 0;
};

// The norm pass sums squares in blocks of this many elements of one tensor, in a fixed
// order (fastadam.reference.grad_sq_sum): the same bits for every thread count and path.
constexpr std::int64_t kNormBlock = 4096;
// Accumulators per block (fastadam.reference.NORM_LANES); 32 and 64 measured no faster.
constexpr std::int64_t kNormLanes = 16;

// SGD with momentum, torch.optim.SGD semantics.
struct SgdHyperparams {
    double lr = 1e-3;
    double momentum = 0.0;
    double dampening = 0.0;
    double weight_decay = 0.0;
    bool nesterov = false;
    bool maximize = false;
};

template <class T>
struct SgdTensor {
    T* param = nullptr;
    const T* grad = nullptr;
    T* momentum_buffer = nullptr;  // only used when hyper->momentum != 0
    std::int64_t size = 0;
    bool first_step = false;       // torch creates the buffer as a copy of the gradient on its first use
    const SgdHyperparams* hyper = nullptr;
};

template <class T>
struct SgdScalars {
    T lr, momentum, one_minus_dampening, weight_decay;
};

template <class T>
inline SgdScalars<T> sgd_scalars(const SgdHyperparams& h) {
    SgdScalars<T> out;
    out.lr = static_cast<T>(h.lr);
    out.momentum = static_cast<T>(h.momentum);
    out.one_minus_dampening = static_cast<T>(1.0 - h.dampening);
    out.weight_decay = static_cast<T>(h.weight_decay);
    return out;
}

}  // namespace fastadam
