// fastadam: the public C++ API. Link the `fastadam::kernel` CMake target.
//
// Every entry point updates the given buffers in place, choosing the SIMD path once
// at run time (cpuid + xgetbv) and splitting the elements of all tensors across
// OpenMP threads. The result is bit-identical for every path and thread count.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "fastadam/types.hpp"

namespace fastadam {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

// "baseline", "avx2", "avx512".
const char* isa_name(Isa isa);
// Parses a name; throws std::invalid_argument naming the valid choices.
Isa isa_from_name(const std::string& name);
// The paths this build carries and this CPU (and OS) can run, best last.
std::vector<Isa> available_isas();
// The path in use: the best available one unless set_isa() chose another.
Isa get_isa();
// Throws std::invalid_argument if `isa` is not in available_isas().
void set_isa(Isa isa);
// Applies $FASTADAM_ISA if set (throws std::invalid_argument if it is unknown or
// unavailable); called once by the Python module at import.
void set_isa_from_environment();

// Threads used by a step; 0 restores the default (OpenMP's, i.e. OMP_NUM_THREADS or
// all cores, read at each call so omp_set_num_threads / threadpoolctl apply).
void set_num_threads(int num_threads);
int get_num_threads();
// True when the build has OpenMP.
bool has_openmp();

// Below this many elements in a whole step, one thread does the work: a parallel
// region costs more than it saves. A step uses at most total / kMinElementsPerThread
// threads. (Measured with bench/threshold.py; override when building for another machine.)
#ifndef FASTADAM_MIN_ELEMENTS_PER_THREAD
#define FASTADAM_MIN_ELEMENTS_PER_THREAD 4096
#endif
constexpr std::int64_t kMinElementsPerThread = FASTADAM_MIN_ELEMENTS_PER_THREAD;

// Below this many elements a step runs on the calling thread when the workers sleep
// (they sleep after 50 us without work, as between the steps of a training loop):
// waking a thread costs the caller a system call, and on a virtual machine the
// worker starts tens of microseconds later. Steps arriving back to back (within
// 50 us of the last) wake them once; they then keep spinning. (bench/pause.py)
#ifndef FASTADAM_MIN_ELEMENTS_TO_WAKE
#define FASTADAM_MIN_ELEMENTS_TO_WAKE 262144
#endif
constexpr std::int64_t kMinElementsToWake = FASTADAM_MIN_ELEMENTS_TO_WAKE;

// Runs fn(context, u) for every u in [0, units) on the calling thread and, where the
// step's worker threads are spinning (steps arriving back to back), on them too; it never
// wakes a sleeping worker. For per-tensor work beside a step that is cache misses more
// than arithmetic (the torch adapter's reads of each tensor's metadata).
void run_units(int units, void (*fn)(void* context, int unit), void* context);

// Multi-tensor steps: all tensors in one call, one parallel region, the work split
// by element ranges over the concatenation of all tensors.
void adam_step(const AdamTensor<float>* tensors, std::size_t count);
void adam_step(const AdamTensor<double>* tensors, std::size_t count);
void sgd_step(const SgdTensor<float>* tensors, std::size_t count);
void sgd_step(const SgdTensor<double>* tensors, std::size_t count);

// The same with an explicit path and thread count (benchmarks, tests).
void adam_step(const AdamTensor<float>* tensors, std::size_t count, Isa isa, int num_threads);
void adam_step(const AdamTensor<double>* tensors, std::size_t count, Isa isa, int num_threads);
void sgd_step(const SgdTensor<float>* tensors, std::size_t count, Isa isa, int num_threads);
void sgd_step(const SgdTensor<double>* tensors, std::size_t count, Isa isa, int num_threads);

// For callers that keep their descriptors from step to step (the Python optimizers):
// tensors[k] with its grad replaced by grads[k] (nullptr: tensor k is skipped) and its
// step by steps[k] (the 1-based count of this update, >= 1, not checked here; for
// SGD, steps[k] == 1 means first_step). Rewriting every descriptor before each step
// cost more than the rest of the step's set-up on a model of 1000 tensors: the
// workers had read them, so each descriptor's cache line moved between cores.
void adam_step(const AdamTensor<float>* tensors, const float* const* grads, const std::int64_t* steps, std::size_t count);
void adam_step(const AdamTensor<double>* tensors, const double* const* grads, const std::int64_t* steps, std::size_t count);
void sgd_step(const SgdTensor<float>* tensors, const float* const* grads, const std::int64_t* steps, std::size_t count);
void sgd_step(const SgdTensor<double>* tensors, const double* const* grads, const std::int64_t* steps, std::size_t count);

// Mixed precision (types.hpp, AdamMixedTensor): float32 arithmetic on arrays stored as
// float32, bfloat16 or float16, with an optional rounded copy of the param and the
// step's gradient transform. Same bits on every path and thread count as the float
// step on the widened values, rounded to nearest even on store.
void adam_step(const AdamMixedTensor* tensors, std::size_t count);
void adam_step(const AdamMixedTensor* tensors, std::size_t count, Isa isa, int num_threads);

// The sum of squares of all gradients' elements (each divided by grad_scale when
// transform.unscale), in one fixed order (types.hpp, kNormBlock): its square root is
// the global L2 norm that clipping uses; a non-finite sum means a non-finite gradient.
double grad_sq_sum(const GradView* grads, std::size_t count, const GradTransform& transform);
double grad_sq_sum(const GradView* grads, std::size_t count, const GradTransform& transform, Isa isa, int num_threads);
// Its parts, for callers that hold the gradients in pieces (fastadam.distributed: each
// rank one contiguous shard, cut on multiples of kNormBlock from each tensor's start): the
// number of blocks (per tensor, ceil(size / kNormBlock)), and each block's sum of squares
// into out[0, grad_sq_block_count), in grad_sq_sum's order. grad_sq_sum is
// those sums added one after the other, from 0.0, in that order.
std::int64_t grad_sq_block_count(const GradView* grads, std::size_t count);
void grad_sq_block_sums(const GradView* grads, std::size_t count, const GradTransform& transform, double* out);

// The float square root that `isa`'s Adam loops compute without the divide unit
// (lanes.hpp), over n elements; paths without such lanes take the IEEE square root.
// With `estimate` (nullable), that replaces the hardware's estimate of 1/sqrt(x),
// for x in [2^-64, 2^64) only. A test hook: tests/test_exact_sqrt.py checks it
// against the IEEE square root.
void lane_sqrt(const float* x, const float* estimate, float* out, std::int64_t n, Isa isa);

// Blockwise quantization (types.hpp, quant_map; fastadam.reference.quantize_blockwise): n
// floats to codes (n bytes for 8 bits, (n + 1) / 2 for 4) and one absmax per block, and back.
void quantize_blockwise(const float* x, std::int64_t n, std::uint8_t* codes, float* absmax, const QuantMap& book);
void dequantize_blockwise(const std::uint8_t* codes, const float* absmax, std::int64_t n, float* out, const QuantMap& book);

// The codes of n floats in `book` (types.hpp, quant_map), one per byte, as `isa`'s
// quantized-state loops compute them (`bounded`: the loop for blocks of finite absmax,
// valid for |x| < 2 only). A test hook (tests/test_quantized.py).
void quantize_codes(const float* x, std::uint8_t* codes, std::int64_t n, const QuantMap& book, Isa isa, bool bounded);
// Floats through quantize_codes on `isa`, against the code the thresholds give (the number
// at or below it; NaN: the last code): every bit pattern in each run of 2^16 that holds a
// threshold, and every `every`-th other run (every = 1: every float with |x| < 2, which is
// all a quantized block's values can be, and every 64th run beyond), through both loops (the
// bounded one where |x| < 2). Returns how many differ;
// *first (nullable) gets the bit pattern of the first. A self-check (seconds for all).
std::int64_t quantizer_mismatches(const QuantMap& book, Isa isa, std::int64_t every, std::uint32_t* first);

}  // namespace fastadam
