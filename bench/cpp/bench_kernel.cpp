// Google Benchmark microbenchmarks of the fastadam Adam kernel, with a STREAM-like
// roofline in the same binary.
//
// Benchmarks (registered at run time, one per available SIMD path):
//   adam/<isa>/threads:<t>/n:<n>                 fastadam::adam_step on one fp32 tensor of n elements
//   stream/<isa>/threads:<t>/n:<n>               p[i] += a*g[i]; m[i] += b*g[i]; v[i] += c*g[i]
//   adam_multi/<isa>/threads:<t>/tensors:1000x1000   one adam_step call on 1000 tensors of 1000 elements
//   stream_multi/<isa>/threads:<t>/tensors:1000x1000 the STREAM-like loop over the same layout
//   arith/<isa>/one_division, arith/<isa>/two_divisions  the step's square root and division alone,
//                         in L1, in fastadam's order and in torch's fused kernel's (one thread)
//
// Both loops read 4 fp32 arrays and write 3 of them in place: 28 bytes per element,
// reported as bytes_per_second (and elements as items_per_second). The STREAM-like loop
// has no divide or square root, so it is the bandwidth (or, in cache, load/store) bound
// for the same memory traffic. It follows the kernel's threading rule: one thread below
// 2 * kMinElementsPerThread elements, shares aligned to 64-byte lines.
//
// Extra flags (after Google Benchmark's own):
//   --sizes=1e3,1e4,...   single-tensor sizes (default 1e3,1e4,1e5,1e6,1e7,5e7)
//   --max_n=N             skip single-tensor sizes above N
//   --threads=1,2         thread counts (default 1,2)
//   --layout=staggered    where the 4 arrays start (see Layout): staggered (default, 64-byte
//                         aligned, no 4K aliasing), numpy (16 bytes past a page, as NumPy's
//                         large arrays: misaligned and 4K-aliased) or heap (each array at
//                         another offset within a 64-byte line)
// Buffers are allocated and first-touched once per size and reused by every benchmark of
// that size (about 2 GB in all with the default sizes), so the big sizes stay cheap in a
// smoke run: --benchmark_min_time=0.01 runs all of them in a few seconds.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fastadam/fastadam.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(_MSC_VER)
#include <malloc.h>
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define BENCH_RESTRICT __restrict
#else
#define BENCH_RESTRICT __restrict__
#endif

namespace {

using fastadam::Isa;

constexpr std::int64_t kBytesPerElement = 28;  // fp32: reads param, grad, exp_avg, exp_avg_sq; writes 3 of them
constexpr std::int64_t kMultiTensors = 1000;
constexpr std::int64_t kMultiSize = 1000;
constexpr std::int64_t kMultiStride = 1008;  // 1000 floats padded to a multiple of 64 bytes

// ----- memory --------------------------------------------------------------------

// Where the four arrays of a benchmark start, relative to each other:
//  staggered (default): 64-byte aligned, starts 1088 bytes apart modulo 4 KiB, so no two
//    arrays collide in the L1 sets or in the CPU's 4K store-to-load alias check;
//  numpy: every array 16 bytes past a 4 KiB page, as glibc's malloc (and so NumPy)
//    places arrays of 128 KiB and more: misaligned for SIMD and 4K-aliased to each other;
//  heap: 48, 0, 32 and 16 bytes past a 64-byte line (and staggered within the page), as
//    glibc's heap places arrays below its mmap threshold, which grows to 32 MiB once a
//    large block has been freed (importing torch does): no peel can align them all.
enum class Layout { staggered, numpy, heap };
Layout g_layout = Layout::staggered;

struct FreeDeleter {
    void operator()(char* p) const {
#if defined(_MSC_VER)
        _aligned_free(p);
#else
        std::free(p);
#endif
    }
};
using Block = std::unique_ptr<char[], FreeDeleter>;

// 4 KiB aligned; blocks of 4 MiB and more 2 MiB-aligned and advised to use huge pages,
// as NumPy's allocator does for large arrays on Linux.
Block alloc_block(std::size_t bytes0) {
    const std::size_t huge = std::size_t{2} << 20;
    const bool big = bytes0 >= (std::size_t{4} << 20);
    const std::size_t align = big ? huge : 4096;
    const std::size_t bytes = (bytes0 + align - 1) / align * align;
#if defined(_MSC_VER)
    void* p = _aligned_malloc(bytes, align);
#else
    void* p = std::aligned_alloc(align, bytes);
#endif
    if (p == nullptr) {
        std::fprintf(stderr, "fastadam_bench: cannot allocate %zu bytes\n", bytes);
        std::exit(1);
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (big) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return Block(static_cast<char*>(p));
}

// A deterministic value in [0, 1) per index.
inline float unit(std::int64_t i, std::uint32_t salt) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ salt;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// The four arrays of one fp32 tensor (or of 1000 tensors laid out back to back), in one block.
struct Arrays {
    Block block;
    float *param = nullptr, *grad = nullptr, *exp_avg = nullptr, *exp_avg_sq = nullptr;
    std::int64_t n = 0;
};

enum class Kind { adam, stream };

// First touch in parallel (the pages land where the threads that use them run).
// Adam: gradients of magnitude 0.1..1 with random signs (no denormals anywhere);
// STREAM-like: positive gradients, so nothing drifts towards zero.
std::unique_ptr<Arrays> make_arrays(Kind kind, std::int64_t n) {
    auto a = std::make_unique<Arrays>();
    a->n = n;
    const std::size_t page = 4096;
    const std::size_t span = (static_cast<std::size_t>(n) * sizeof(float) + page - 1) / page * page + page;
    a->block = alloc_block(4 * span);
    float** arrays[4] = {&a->param, &a->grad, &a->exp_avg, &a->exp_avg_sq};
    for (std::size_t k = 0; k < 4; ++k) {
        const std::size_t in_line[4] = {48, 0, 32, 16};
        const std::size_t offset = g_layout == Layout::numpy ? 16
                                   : g_layout == Layout::heap ? k * 1088 + in_line[k]
                                                              : k * 1088;
        *arrays[k] = reinterpret_cast<float*>(a->block.get() + k * span + offset);
    }
    float *p = a->param, *g = a->grad, *m = a->exp_avg, *v = a->exp_avg_sq;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (std::int64_t i = 0; i < n; ++i) {
        const float u = unit(i, 0x9e3779b9u);
        const float mag = 0.1f + 0.9f * unit(i, 0x85ebca6bu);
        p[i] = u - 0.5f;
        g[i] = kind == Kind::adam && u < 0.5f ? -mag : mag;
        m[i] = 0.0f;
        v[i] = kind == Kind::adam ? 0.0f : 1.0f;
    }
    return a;
}

// One set of buffers per (kind, size), created on first use and kept: every
// benchmark of that size (each ISA, each thread count, in any order) reuses it.
Arrays& workspace(Kind kind, std::int64_t n) {
    static std::map<std::pair<int, std::int64_t>, std::unique_ptr<Arrays>> cache;
    auto& slot = cache[{static_cast<int>(kind), n}];
    if (!slot) slot = make_arrays(kind, n);
    return *slot;
}

// ----- the STREAM-like loop, compiled for each SIMD path --------------------------

struct StreamScalars {
    float a, b, c;
};
using StreamFn = void (*)(float*, float*, float*, const float*, std::int64_t, std::int64_t, const StreamScalars&);

#define FASTADAM_STREAM_BODY                                                                                         \
    {                                                                                                                \
        const float a = s.a, b = s.b, c = s.c;                                                                       \
        for (std::int64_t i = begin; i < end; ++i) {                                                                 \
            const float gi = g[i];                                                                                   \
            p[i] += a * gi;                                                                                          \
            m[i] += b * gi;                                                                                          \
            v[i] += c * gi;                                                                                          \
        }                                                                                                            \
    }
#define FASTADAM_STREAM_ARGS                                                                                         \
    (float* BENCH_RESTRICT p, float* BENCH_RESTRICT m, float* BENCH_RESTRICT v, const float* BENCH_RESTRICT g,      \
     std::int64_t begin, std::int64_t end, const StreamScalars& s)

void stream_baseline FASTADAM_STREAM_ARGS FASTADAM_STREAM_BODY

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define FASTADAM_STREAM_PER_ISA 1
__attribute__((target("avx2"))) void stream_avx2 FASTADAM_STREAM_ARGS FASTADAM_STREAM_BODY
#if defined(__clang__)
__attribute__((target("avx512f"))) void stream_avx512 FASTADAM_STREAM_ARGS FASTADAM_STREAM_BODY
#else
// As the kernel's AVX-512 path (-mprefer-vector-width=512): zmm, not ymm.
__attribute__((target("avx512f,prefer-vector-width=512"))) void stream_avx512 FASTADAM_STREAM_ARGS FASTADAM_STREAM_BODY
#endif
#endif

StreamFn stream_fn(Isa isa) {
#if defined(FASTADAM_STREAM_PER_ISA)
    if (isa == Isa::avx2) return &stream_avx2;
    if (isa == Isa::avx512) return &stream_avx512;
#endif
    (void)isa;
    return &stream_baseline;
}

// ----- the arithmetic alone ------------------------------------------------------
// The square root and division of an Adam step on data that stay in L1, nothing else:
// in fastadam's order (one division: sqrt(v) * c + eps, c = 1/sqrt(1 - beta2^t)) and in
// the order of torch's fused CPU kernel (two: sqrt(v) / c + eps), so the compute floor
// of each is measured on the same machine. Both are exact IEEE operations.
#if defined(__GNUC__) || defined(__clang__)
#define FASTADAM_BENCH_SQRT __builtin_sqrtf
#else
#define FASTADAM_BENCH_SQRT std::sqrt
#endif
#define FASTADAM_ARITH_ARGS                                                                                         \
    (float* BENCH_RESTRICT out, const float* BENCH_RESTRICT m, const float* BENCH_RESTRICT v, std::int64_t n,     \
     float step_size, float c, float eps)
#define FASTADAM_ARITH_ONE                                                                                          \
    {                                                                                                               \
        for (std::int64_t i = 0; i < n; ++i) out[i] = step_size * m[i] / (FASTADAM_BENCH_SQRT(v[i]) * c + eps);     \
    }
#define FASTADAM_ARITH_TWO                                                                                          \
    {                                                                                                               \
        for (std::int64_t i = 0; i < n; ++i) out[i] = step_size * m[i] / (FASTADAM_BENCH_SQRT(v[i]) / c + eps);     \
    }
using ArithFn = void (*)(float*, const float*, const float*, std::int64_t, float, float, float);

void arith_one_baseline FASTADAM_ARITH_ARGS FASTADAM_ARITH_ONE
void arith_two_baseline FASTADAM_ARITH_ARGS FASTADAM_ARITH_TWO
#if defined(FASTADAM_STREAM_PER_ISA)
__attribute__((target("avx2"))) void arith_one_avx2 FASTADAM_ARITH_ARGS FASTADAM_ARITH_ONE
__attribute__((target("avx2"))) void arith_two_avx2 FASTADAM_ARITH_ARGS FASTADAM_ARITH_TWO
#if defined(__clang__)
__attribute__((target("avx512f"))) void arith_one_avx512 FASTADAM_ARITH_ARGS FASTADAM_ARITH_ONE
__attribute__((target("avx512f"))) void arith_two_avx512 FASTADAM_ARITH_ARGS FASTADAM_ARITH_TWO
#else
__attribute__((target("avx512f,prefer-vector-width=512"))) void arith_one_avx512 FASTADAM_ARITH_ARGS FASTADAM_ARITH_ONE
__attribute__((target("avx512f,prefer-vector-width=512"))) void arith_two_avx512 FASTADAM_ARITH_ARGS FASTADAM_ARITH_TWO
#endif
#endif

ArithFn arith_fn(Isa isa, bool two_divisions) {
#if defined(FASTADAM_STREAM_PER_ISA)
    if (isa == Isa::avx2) return two_divisions ? &arith_two_avx2 : &arith_one_avx2;
    if (isa == Isa::avx512) return two_divisions ? &arith_two_avx512 : &arith_one_avx512;
#endif
    (void)isa;
    return two_divisions ? &arith_two_baseline : &arith_one_baseline;
}

void bm_arith(benchmark::State& state, Isa isa, bool two_divisions) {
    constexpr std::int64_t n = 2048;  // three arrays of 8 KiB: L1-resident
    std::vector<float> out(n), m(n), v(n);
    for (std::int64_t i = 0; i < n; ++i) {
        m[static_cast<std::size_t>(i)] = unit(i, 1u) - 0.5f;
        v[static_cast<std::size_t>(i)] = 0.01f + unit(i, 2u);
    }
    const ArithFn fn = arith_fn(isa, two_divisions);
    for (auto _ : state) {
        fn(out.data(), m.data(), v.data(), n, 1e-3f, 1.25f, 1e-8f);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * n);
}

// The kernel's rule (fastadam::kMinElementsPerThread): one thread for small steps.
int effective_threads(int requested, std::int64_t total) {
    const std::int64_t by_size = std::max<std::int64_t>(1, total / fastadam::kMinElementsPerThread);
    return static_cast<int>(std::min<std::int64_t>(requested, by_size));
}

void stream_step(StreamFn fn, Arrays& a, int threads, const StreamScalars& s) {
    const std::int64_t n = a.n;
    const int t = effective_threads(threads, n);
    float *p = a.param, *m = a.exp_avg, *v = a.exp_avg_sq;
    const float* g = a.grad;
    if (t <= 1) {
        fn(p, m, v, g, 0, n, s);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel num_threads(t)
    {
        const std::int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
        // Contiguous shares starting on 64-byte lines of p, as the kernel splits its work.
        const auto first = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(p) / sizeof(float));
        auto start = [&](std::int64_t k) -> std::int64_t {
            if (k >= parts) return n;
            const std::int64_t raw = n / parts * k + std::min(k, n % parts);
            return std::max<std::int64_t>(0, raw - (first + raw) % 16);
        };
        fn(p, m, v, g, start(part), start(part + 1), s);
    }
#else
    fn(p, m, v, g, 0, n, s);
#endif
}

// 1000 tensors: the same loop, tensors split across threads in contiguous blocks.
void stream_multi_step(StreamFn fn, Arrays& a, int threads, const StreamScalars& s) {
    const int t = effective_threads(threads, kMultiTensors * kMultiSize);
    float *p = a.param, *m = a.exp_avg, *v = a.exp_avg_sq;
    const float* g = a.grad;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(t) if (t > 1)
#endif
    for (std::int64_t k = 0; k < kMultiTensors; ++k) {
        const std::int64_t o = k * kMultiStride;
        fn(p + o, m + o, v + o, g + o, 0, kMultiSize, s);
    }
    (void)t;
}

// ----- benchmarks ----------------------------------------------------------------

void set_rates(benchmark::State& state, std::int64_t elements) {
    const auto iters = static_cast<std::int64_t>(state.iterations());
    state.SetItemsProcessed(iters * elements);
    state.SetBytesProcessed(iters * elements * kBytesPerElement);
    // bytes_per_second prints in binary units (G/s = GiB/s); "GB" prints decimal GB/s, as bench.py reports.
    state.counters["GB"] = benchmark::Counter(static_cast<double>(iters * elements * kBytesPerElement) / 1e9, benchmark::Counter::kIsRate);
}

void bm_adam(benchmark::State& state, Isa isa, int threads, std::int64_t n) {
    Arrays& a = workspace(Kind::adam, n);
    const fastadam::AdamHyperparams hyper;  // torch defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8
    fastadam::AdamTensor<float> t;
    t.param = a.param;
    t.grad = a.grad;
    t.exp_avg = a.exp_avg;
    t.exp_avg_sq = a.exp_avg_sq;
    t.size = n;
    t.hyper = &hyper;
    for (auto _ : state) {
        fastadam::adam_step(&t, 1, isa, threads);
        ++t.step;
        benchmark::ClobberMemory();
    }
    set_rates(state, n);
}

void bm_stream(benchmark::State& state, Isa isa, int threads, std::int64_t n) {
    Arrays& a = workspace(Kind::stream, n);
    const StreamFn fn = stream_fn(isa);
    const StreamScalars s{1e-7f, 2e-7f, 3e-7f};
    for (auto _ : state) {
        stream_step(fn, a, threads, s);
        benchmark::ClobberMemory();
    }
    set_rates(state, n);
}

Arrays& multi_workspace(Kind kind) { return workspace(kind, kMultiTensors * kMultiStride); }

void bm_adam_multi(benchmark::State& state, Isa isa, int threads) {
    Arrays& a = multi_workspace(Kind::adam);
    const fastadam::AdamHyperparams hyper;
    std::vector<fastadam::AdamTensor<float>> tensors(kMultiTensors);
    for (std::int64_t k = 0; k < kMultiTensors; ++k) {
        const std::int64_t o = k * kMultiStride;
        auto& t = tensors[static_cast<std::size_t>(k)];
        t.param = a.param + o;
        t.grad = a.grad + o;
        t.exp_avg = a.exp_avg + o;
        t.exp_avg_sq = a.exp_avg_sq + o;
        t.size = kMultiSize;
        t.hyper = &hyper;
    }
    for (auto _ : state) {
        fastadam::adam_step(tensors.data(), tensors.size(), isa, threads);
        for (auto& t : tensors) ++t.step;
        benchmark::ClobberMemory();
    }
    set_rates(state, kMultiTensors * kMultiSize);
}

void bm_stream_multi(benchmark::State& state, Isa isa, int threads) {
    Arrays& a = multi_workspace(Kind::stream);
    const StreamFn fn = stream_fn(isa);
    const StreamScalars s{1e-7f, 2e-7f, 3e-7f};
    for (auto _ : state) {
        stream_multi_step(fn, a, threads, s);
        benchmark::ClobberMemory();
    }
    set_rates(state, kMultiTensors * kMultiSize);
}

// ----- command line --------------------------------------------------------------

bool parse_list(const char* text, std::vector<std::int64_t>& out) {
    out.clear();
    std::string s(text);
    std::size_t pos = 0;
    while (pos <= s.size()) {
        const std::size_t comma = std::min(s.find(',', pos), s.size());
        const std::string item = s.substr(pos, comma - pos);
        char* end = nullptr;
        const double v = std::strtod(item.c_str(), &end);  // accepts 1e6
        if (item.empty() || end == nullptr || *end != '\0' || !(v >= 1) || v > 4e18) return false;
        if (v != static_cast<double>(static_cast<std::int64_t>(v))) return false;
        out.push_back(static_cast<std::int64_t>(v));
        pos = comma + 1;
    }
    return !out.empty();
}

// Removes our flags from argv; returns false on a malformed value.
bool parse_own_flags(int* argc, char** argv, std::vector<std::int64_t>& sizes, std::int64_t& max_n, std::vector<std::int64_t>& threads) {
    int out = 1;
    for (int i = 1; i < *argc; ++i) {
        const char* arg = argv[i];
        std::vector<std::int64_t> one;
        if (std::strncmp(arg, "--sizes=", 8) == 0) {
            if (!parse_list(arg + 8, sizes)) return std::fprintf(stderr, "fastadam_bench: bad %s\n", arg), false;
        } else if (std::strncmp(arg, "--max_n=", 8) == 0) {
            if (!parse_list(arg + 8, one) || one.size() != 1) return std::fprintf(stderr, "fastadam_bench: bad %s\n", arg), false;
            max_n = one[0];
        } else if (std::strncmp(arg, "--layout=", 9) == 0) {
            if (std::strcmp(arg + 9, "staggered") == 0) g_layout = Layout::staggered;
            else if (std::strcmp(arg + 9, "numpy") == 0) g_layout = Layout::numpy;
            else if (std::strcmp(arg + 9, "heap") == 0) g_layout = Layout::heap;
            else return std::fprintf(stderr, "fastadam_bench: bad %s (staggered, numpy or heap)\n", arg), false;
        } else if (std::strncmp(arg, "--threads=", 10) == 0) {
            if (!parse_list(arg + 10, threads) || *std::max_element(threads.begin(), threads.end()) > 1024)
                return std::fprintf(stderr, "fastadam_bench: bad %s\n", arg), false;
        } else {
            argv[out++] = argv[i];
        }
    }
    *argc = out;
    return true;
}

std::string join_isas(const std::vector<Isa>& isas) {
    std::string s;
    for (Isa isa : isas) s += std::string(s.empty() ? "" : ",") + fastadam::isa_name(isa);
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    std::vector<std::int64_t> sizes = {1000, 10000, 100000, 1000000, 10000000, 50000000};
    std::vector<std::int64_t> thread_counts = {1, 2};
    std::int64_t max_n = INT64_MAX;
    if (!parse_own_flags(&argc, argv, sizes, max_n, thread_counts)) return 1;
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

    const std::vector<Isa> isas = fastadam::available_isas();
    benchmark::AddCustomContext("fastadam_available_isas", join_isas(isas));
    benchmark::AddCustomContext("fastadam_best_isa", fastadam::isa_name(isas.back()));
    benchmark::AddCustomContext("fastadam_has_openmp", fastadam::has_openmp() ? "true" : "false");
    benchmark::AddCustomContext("fastadam_min_elements_per_thread", std::to_string(fastadam::kMinElementsPerThread));
    benchmark::AddCustomContext("fastadam_bytes_per_element", std::to_string(kBytesPerElement));
    benchmark::AddCustomContext("fastadam_bench_layout",
                                g_layout == Layout::numpy ? "numpy" : g_layout == Layout::heap ? "heap" : "staggered");

    // Size outermost, then adam next to stream, so the console table reads as kernel vs bound.
    for (std::int64_t n : sizes) {
        if (n > max_n) continue;
        for (const char* kind : {"adam", "stream"})
            for (Isa isa : isas)
                for (std::int64_t t64 : thread_counts) {
                    const int t = static_cast<int>(t64);
                    const std::string name = std::string(kind) + "/" + fastadam::isa_name(isa) + "/threads:" + std::to_string(t) +
                                             "/n:" + std::to_string(n);
                    if (kind[0] == 'a')
                        benchmark::RegisterBenchmark(name.c_str(), bm_adam, isa, t, n)->UseRealTime();
                    else
                        benchmark::RegisterBenchmark(name.c_str(), bm_stream, isa, t, n)->UseRealTime();
                }
    }
    for (const char* kind : {"adam_multi", "stream_multi"})
        for (Isa isa : isas)
            for (std::int64_t t64 : thread_counts) {
                const int t = static_cast<int>(t64);
                const std::string name = std::string(kind) + "/" + fastadam::isa_name(isa) + "/threads:" + std::to_string(t) +
                                         "/tensors:" + std::to_string(kMultiTensors) + "x" + std::to_string(kMultiSize);
                if (kind[0] == 'a')
                    benchmark::RegisterBenchmark(name.c_str(), bm_adam_multi, isa, t)->UseRealTime();
                else
                    benchmark::RegisterBenchmark(name.c_str(), bm_stream_multi, isa, t)->UseRealTime();
            }

    for (Isa isa : isas)
        for (bool two : {false, true}) {
            const std::string name = std::string("arith/") + fastadam::isa_name(isa) + (two ? "/two_divisions" : "/one_division");
            benchmark::RegisterBenchmark(name.c_str(), bm_arith, isa, two);
        }

    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
