// Run-time choice of the SIMD path, thread control, and the multi-tensor driver that
// splits a step's elements across OpenMP threads. Compiled for the baseline target.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "fastadam/fastadam.hpp"
#include "isa_table.hpp"
#include "work_pool.hpp"

// Elements per unit of a thread's share of a step (for_each_share); a build-time setting.
#ifndef FASTADAM_UNIT_ELEMENTS
#define FASTADAM_UNIT_ELEMENTS 65536
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define FASTADAM_X86 1
#if defined(_MSC_VER)
#include <immintrin.h>
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace fastadam {
namespace {

#if defined(FASTADAM_X86)
void cpuid(int leaf, int subleaf, unsigned regs[4]) {
#if defined(_MSC_VER)
    int r[4];
    __cpuidex(r, leaf, subleaf);
    for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned>(r[i]);
#else
    __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
#endif
}

// XCR0: which register states the OS saves on a context switch. A CPU can have
// AVX-512 that the OS has not enabled; using it then faults.
unsigned long long xcr0() {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<unsigned long long>(hi) << 32) | lo;
#endif
}

bool cpu_has(Isa isa) {
    unsigned r[4];
    cpuid(0, 0, r);
    const unsigned max_leaf = r[0];
    cpuid(1, 0, r);
    const bool osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1, f16c = (r[2] >> 29) & 1;
    if (!osxsave || !avx) return false;
    const unsigned long long xcr = xcr0();
    const bool ymm_state = (xcr & 0x6) == 0x6;          // SSE + AVX
    const bool zmm_state = (xcr & 0xe6) == 0xe6;        // + opmask, ZMM_Hi256, Hi16_ZMM
    if (max_leaf < 7) return false;
    cpuid(7, 0, r);
    if (isa == Isa::avx2) return ymm_state && f16c && ((r[1] >> 5) & 1);  // float16 conversions use F16C
    // AVX512F, DQ (64-bit multiplies: stochastic rounding's random bits), BW (bf16 packing);
    // CD and VL too, which MSVC's /arch:AVX512 may use (every CPU with BW and DQ has them)
    constexpr unsigned avx512 = 1u << 16 | 1u << 17 | 1u << 28 | 1u << 30 | 1u << 31;
    if (isa == Isa::avx512) return zmm_state && (r[1] & avx512) == avx512;
    return false;
}
#endif

const KernelTable* table_of(Isa isa) {
    switch (isa) {
#if defined(FASTADAM_HAVE_AVX2)
        case Isa::avx2: return &avx2::kernel_table;
#endif
#if defined(FASTADAM_HAVE_AVX512)
        case Isa::avx512: return &avx512::kernel_table;
#endif
        case Isa::baseline: return &baseline::kernel_table;
        default: return nullptr;
    }
}

bool probe(Isa isa) {
    if (table_of(isa) == nullptr) return false;
    if (isa == Isa::baseline) return true;
#if defined(FASTADAM_X86)
    return cpu_has(isa);
#else
    return false;
#endif
}

// cpuid traps to the hypervisor on virtual machines (microseconds): ask once.
bool is_available(Isa isa) {
    static const unsigned mask = [] {
        unsigned m = 0;
        for (Isa a : {Isa::baseline, Isa::avx2, Isa::avx512})
            if (probe(a)) m |= 1u << static_cast<int>(a);
        return m;
    }();
    return (mask >> static_cast<int>(isa)) & 1u;
}

Isa detect_best() {
    const std::vector<Isa> isas = available_isas();
    return isas.back();
}

std::atomic<int> g_isa{-1};          // -1: not chosen yet
std::atomic<int> g_num_threads{0};   // 0: OpenMP's default
int default_threads() { return g_num_threads.load(std::memory_order_relaxed); }

Isa active_isa() {
    int isa = g_isa.load(std::memory_order_relaxed);
    if (isa < 0) {
        isa = static_cast<int>(detect_best());
        g_isa.store(isa, std::memory_order_relaxed);
    }
    return static_cast<Isa>(isa);
}

// The CPUs this process may run on (its affinity mask at the first step). A step never
// runs more threads than that: extra ones only spin and take the CPUs from each other
// (64 on 2 cores made a 1e6 step 20 times slower, docs/design.md).
int usable_cpus() {
    static const int n = [] {
#if defined(__linux__)
        cpu_set_t set;
        CPU_ZERO(&set);
        if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
        const unsigned h = std::thread::hardware_concurrency();
        return h > 0 ? static_cast<int>(h) : 1;
    }();
    return n;
}

// What a step would otherwise initialise on first use (function-local statics, the pool
// and its fork handlers), initialised when the library loads: a fork() while another
// thread's first step was inside one of these left the child blocked for ever on the
// static's guard or on the pool's lock, copied held before the handlers were registered
// (seen under qemu-user, where first runs are slow; docs/design.md, "Threads, signals,
// fork and exit").
[[maybe_unused]] const bool g_initialised_at_load = [] {
    (void)is_available(Isa::baseline);
    (void)usable_cpus();
    (void)WorkPool::instance();
    return true;
}();

// The thread count follows OpenMP's settings unless set_num_threads() chose one.
int max_threads(int requested) {
    if (requested > 0) return requested;
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Where for_each_share finds tensor k: a caller's array of descriptors as they are...
template <class Tensor>
struct Listed {
    const Tensor* tensors;
    std::int64_t size(std::size_t k) const { return tensors[k].size; }
    const Tensor& at(std::size_t k, Tensor&) const { return tensors[k]; }
};

// Where a unit may start in a tensor: at local element i with (phase + i) % period == 0.
// On the param's 64-byte lines, so that two threads never write one line; with quantized
// states on a block's first element, whose absmax one thread computes.
struct UnitGrid {
    std::int64_t phase, period;
};
template <class T>
UnitGrid line_grid(const T* param) {
    return {static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(param) / sizeof(T)), static_cast<std::int64_t>(64 / sizeof(T))};
}
template <class T>
UnitGrid unit_grid(const AdamTensor<T>& t) { return line_grid(t.param); }
template <class T>
UnitGrid unit_grid(const SgdTensor<T>& t) { return line_grid(t.param); }
UnitGrid unit_grid(const AdamMixedTensor& t) {
    if (t.state_bits != 0) return {0, quant_block(t.state_bits)};
    const std::int64_t bytes = storage_bytes(t.param_dtype);
    return {static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(t.param)) / bytes, 64 / bytes};
}

template <class T>
void set_step(AdamTensor<T>& t, std::int64_t step) { t.step = step; }
template <class T>
void set_step(SgdTensor<T>& t, std::int64_t step) { t.first_step = step == 1; }

// ...or descriptors kept from step to step, with this step's gradient and count from
// two small arrays (fastadam.hpp): the thread that reaches tensor k assembles it.
template <class Tensor, class T>
struct Gathered {
    const Tensor* tensors;
    const T* const* grads;
    const std::int64_t* steps;
    std::int64_t size(std::size_t k) const { return grads[k] != nullptr ? tensors[k].size : 0; }
    const Tensor& at(std::size_t k, Tensor& scratch) const {
        scratch = tensors[k];
        scratch.grad = grads[k];
        set_step(scratch, steps[k]);
        return scratch;
    }
};

// Runs segment(tensor, scalars, begin, end) on consecutive element ranges of the
// concatenation of all tensors: one contiguous share per thread, each cut into units
// that the caller and the pool's workers claim (work_pool.hpp). Units start on a
// 64-byte boundary of the param buffer so two threads never write one cache line.
//
// The per-step scalars (two pow calls) are computed by whichever thread reaches a
// tensor, and reused while consecutive tensors share hyper-parameters and step count
// (same_scalars): a serial pass over a 1000-tensor model before the parallel part
// would leave the other cores idle.
template <class Tensor, class Source, class MakeScalars, class SameScalars, class Segment>
void for_each_share(const Source& source, std::size_t count, int num_threads, MakeScalars make_scalars,
                    SameScalars same_scalars, Segment segment) {
    // Runs `remaining` elements of the concatenation, from element lo of tensor k on.
    auto run_range = [&](std::size_t k, std::int64_t lo, std::int64_t remaining) {
        Tensor scratch[2];  // alternate, so that `last` stays valid when the source assembles tensors
        int next = 0;
        const Tensor* last = nullptr;
        decltype(make_scalars(scratch[0])) scalars{};
        for (; k < count && remaining > 0; ++k, lo = 0) {
            const std::int64_t hi = std::min(source.size(k), lo + remaining);
            remaining -= std::max<std::int64_t>(hi - lo, 0);
            if (lo >= hi) continue;
            const Tensor& t = source.at(k, scratch[next]);
            next ^= 1;
            if (last == nullptr || !same_scalars(*last, t)) scalars = make_scalars(t);
            last = &t;
            segment(t, scalars, lo, hi);
        }
    };
    std::int64_t total = 0;
    for (std::size_t k = 0; k < count; ++k) total += source.size(k);
    const std::int64_t by_size = std::max<std::int64_t>(1, total / kMinElementsPerThread);
    const int threads = static_cast<int>(
        std::min<std::int64_t>({max_threads(num_threads), by_size, std::int64_t{usable_cpus()}, std::int64_t{WorkPool::kMaxShares}}));
    if (threads <= 1) {
        run_range(0, 0, total);
        return;
    }
    WorkPool& pool = WorkPool::instance();
    if (total < kMinElementsToWake && !pool.helpers_ready(threads - 1)) {
        run_range(0, 0, total);
        pool.job_ended();
        return;
    }
    std::vector<std::int64_t> offsets(count + 1, 0);
    for (std::size_t k = 0; k < count; ++k) offsets[k + 1] = offsets[k] + source.size(k);
    // Global index where unit `part` of `parts` starts; monotone in `part` because
    // each unit is far longer than a cache line or a quantized block.
    auto unit_start = [&](int part, int parts) -> std::int64_t {
        if (part >= parts) return total;
        const std::int64_t raw = (total / parts) * part + std::min<std::int64_t>(part, total % parts);
        // The last tensor starting at or before raw (a skipped tensor has none of its own).
        const std::size_t k = static_cast<std::size_t>(std::upper_bound(offsets.begin(), offsets.end(), raw) - offsets.begin()) - 1;
        const std::int64_t local = raw - offsets[k];
        const UnitGrid grid = unit_grid(source.tensors[k]);
        const std::int64_t aligned = local - (grid.phase + local) % grid.period;
        return offsets[k] + std::max<std::int64_t>(aligned, 0);
    };
    // Units of about FASTADAM_UNIT_ELEMENTS (65536: ~15 us of work for one core in
    // cache), at least two per share: small enough that a slow worker's remainder is
    // shared out, large enough that a unit's fixed costs (a claim, the tensor lookup, the
    // step's scalars) vanish next to its work; 16384 measured no faster (fastadam_bench
    // adam/avx512/threads:2). Shares under two units get two smaller ones, so that a worker
    // that starts a little late still runs part of its own share.
    constexpr std::int64_t unit_elements = FASTADAM_UNIT_ELEMENTS;
    const int units_per_share = static_cast<int>(
        std::clamp<std::int64_t>(total / threads / unit_elements, 2, WorkPool::kMaxUnitsPerShare));
    const int units = threads * units_per_share;
    struct Job {
        decltype(unit_start)& start;
        decltype(run_range)& run;
        const std::vector<std::int64_t>& offsets;
        int units;
    } job{unit_start, run_range, offsets, units};
    pool.run(threads, units_per_share, [](void* context, int unit) {
        Job& j = *static_cast<Job*>(context);
        const std::int64_t begin = j.start(unit, j.units), end = j.start(unit + 1, j.units);
        const std::size_t k = static_cast<std::size_t>(std::upper_bound(j.offsets.begin(), j.offsets.end(), begin) - j.offsets.begin()) - 1;
        j.run(k, begin - j.offsets[k], end - begin);
    }, &job);
}

template <class T, class Source>
void run_adam(const Source& source, std::size_t count, AdamSegmentFn<T> segment, int num_threads) {
    for_each_share<AdamTensor<T>>(
        source, count, num_threads, [](const AdamTensor<T>& t) { return adam_scalars<T>(*t.hyper, t.step); },
        [](const AdamTensor<T>& a, const AdamTensor<T>& b) { return a.hyper == b.hyper && a.step == b.step; }, segment);
}

template <class T, class Source>
void run_sgd(const Source& source, std::size_t count, SgdSegmentFn<T> segment, int num_threads) {
    for_each_share<SgdTensor<T>>(
        source, count, num_threads, [](const SgdTensor<T>& t) { return sgd_scalars<T>(*t.hyper); },
        [](const SgdTensor<T>& a, const SgdTensor<T>& b) { return a.hyper == b.hyper; }, segment);
}

void run_adam_mixed(const AdamMixedTensor* tensors, std::size_t count, const KernelTable& table, int num_threads) {
    for_each_share<AdamMixedTensor>(
        Listed<AdamMixedTensor>{tensors}, count, num_threads, [](const AdamMixedTensor& t) { return adam_scalars<float>(*t.hyper, t.step); },
        [](const AdamMixedTensor& a, const AdamMixedTensor& b) { return a.hyper == b.hyper && a.step == b.step; }, table.adam_mixed);
}

// Every block's sum of squares (types.hpp, kNormBlock) into sums[0, grad_sq_block_count),
// tensor after tensor, on the pool's threads; each block's value does not depend on threads.
void run_grad_sq_blocks(const GradView* grads, std::size_t count, const GradTransform& transform, const KernelTable& table,
                        int num_threads, double* sums) {
    std::vector<std::int64_t> first_block(count + 1, 0);
    std::int64_t total = 0;
    for (std::size_t k = 0; k < count; ++k) {
        first_block[k + 1] = first_block[k] + (grads[k].size + kNormBlock - 1) / kNormBlock;
        total += grads[k].size;
    }
    const std::int64_t blocks = first_block[count];
    struct Job {
        const GradView* grads;
        const std::vector<std::int64_t>& first_block;
        double* sums;
        const GradTransform& transform;
        const KernelTable& table;
        std::int64_t blocks;
        int units;
        void run(std::int64_t lo, std::int64_t hi) const {
            std::size_t k = static_cast<std::size_t>(std::upper_bound(first_block.begin(), first_block.end(), lo) - first_block.begin()) - 1;
            for (std::int64_t b = lo; b < hi; ++b) {
                while (b >= first_block[k + 1]) ++k;
                const std::int64_t at = (b - first_block[k]) * kNormBlock;
                const std::int64_t n = std::min(kNormBlock, grads[k].size - at);
                sums[b] =
                    table.grad_sq_block(grads[k].dtype, grads[k].data, at, n, transform.unscale, transform.grad_scale);
            }
        }
    } job{grads, first_block, sums, transform, table, blocks, 1};
    const std::int64_t by_size = std::max<std::int64_t>(1, total / (8 * kMinElementsPerThread));
    const int threads = static_cast<int>(
        std::min<std::int64_t>({max_threads(num_threads), by_size, std::int64_t{usable_cpus()}, std::int64_t{WorkPool::kMaxShares}, blocks}));
    if (threads <= 1) {
        job.run(0, blocks);
    } else {
        const int units_per_share = static_cast<int>(std::clamp<std::int64_t>(blocks / threads / 16, 1, 16));
        job.units = threads * units_per_share;
        WorkPool::instance().run(threads, units_per_share, [](void* context, int unit) {
            const Job& j = *static_cast<const Job*>(context);
            j.run(j.blocks * unit / j.units, j.blocks * (unit + 1) / j.units);
        }, &job);
    }
}

// The blocks' sums, then their sum in block order on the caller: the order, and so the
// bits, do not depend on threads.
double run_grad_sq_sum(const GradView* grads, std::size_t count, const GradTransform& transform, const KernelTable& table,
                       int num_threads) {
    std::vector<double> sums(static_cast<std::size_t>(grad_sq_block_count(grads, count)));
    run_grad_sq_blocks(grads, count, transform, table, num_threads, sums.data());
    double sum = 0.0;
    for (double s : sums) sum += s;
    return sum;
}

const KernelTable& checked_table(Isa isa) {
    if (!is_available(isa)) throw std::invalid_argument(std::string("fastadam: ISA '") + isa_name(isa) + "' is not available on this CPU");
    return *table_of(isa);
}

}  // namespace

void run_units(int units, void (*fn)(void* context, int unit), void* context) {
    const int threads = static_cast<int>(std::min<std::int64_t>(
        {max_threads(default_threads()), std::int64_t{usable_cpus()}, std::int64_t{WorkPool::kMaxShares}, std::int64_t{units}}));
    WorkPool& pool = WorkPool::instance();
    if (threads <= 1 || !pool.helpers_ready(threads - 1)) {
        for (int u = 0; u < units; ++u) fn(context, u);
        return;
    }
    struct Job {
        void (*fn)(void*, int);
        void* context;
        int units;
    } job{fn, context, units};
    pool.run(threads, (units + threads - 1) / threads, [](void* c, int u) {
        const Job& j = *static_cast<const Job*>(c);
        if (u < j.units) j.fn(j.context, u);
    }, &job);
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::baseline: return "baseline";
        case Isa::avx2: return "avx2";
        case Isa::avx512: return "avx512";
    }
    return "unknown";
}

Isa isa_from_name(const std::string& name) {
    for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512})
        if (name == isa_name(isa)) return isa;
    throw std::invalid_argument("fastadam: unknown ISA '" + name + "'; choose one of 'baseline', 'avx2', 'avx512'");
}

std::vector<Isa> available_isas() {
    std::vector<Isa> out;
    for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512})
        if (is_available(isa)) out.push_back(isa);
    return out;
}

Isa get_isa() { return active_isa(); }

void set_isa(Isa isa) {
    if (!is_available(isa)) {
        std::string names;
        for (Isa a : available_isas()) names += std::string(names.empty() ? "" : ", ") + "'" + isa_name(a) + "'";
        throw std::invalid_argument(std::string("fastadam: ISA '") + isa_name(isa) +
                                    "' is not available on this CPU or in this build; available: " + names);
    }
    g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

void set_isa_from_environment() {
    const char* env = std::getenv("FASTADAM_ISA");
    if (env == nullptr || *env == '\0') return;
    try {
        set_isa(isa_from_name(env));
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string(e.what()) + " (from the environment variable FASTADAM_ISA; unset it to use the best path)");
    }
}

void set_num_threads(int num_threads) {
    if (num_threads < 0) throw std::invalid_argument("fastadam: num_threads must be >= 1, or 0 for the default");
    g_num_threads.store(num_threads, std::memory_order_relaxed);
}

int get_num_threads() { return max_threads(default_threads()); }

bool has_openmp() {
#if defined(_OPENMP)
    return true;
#else
    return false;
#endif
}

void adam_step(const AdamTensor<float>* t, std::size_t n, Isa isa, int threads) { run_adam<float>(Listed<AdamTensor<float>>{t}, n, checked_table(isa).adam_f32, threads); }
void adam_step(const AdamTensor<double>* t, std::size_t n, Isa isa, int threads) { run_adam<double>(Listed<AdamTensor<double>>{t}, n, checked_table(isa).adam_f64, threads); }
void sgd_step(const SgdTensor<float>* t, std::size_t n, Isa isa, int threads) { run_sgd<float>(Listed<SgdTensor<float>>{t}, n, checked_table(isa).sgd_f32, threads); }
void sgd_step(const SgdTensor<double>* t, std::size_t n, Isa isa, int threads) { run_sgd<double>(Listed<SgdTensor<double>>{t}, n, checked_table(isa).sgd_f64, threads); }

void adam_step(const AdamTensor<float>* t, const float* const* grads, const std::int64_t* steps, std::size_t n) {
    run_adam<float>(Gathered<AdamTensor<float>, float>{t, grads, steps}, n, checked_table(active_isa()).adam_f32, default_threads());
}
void adam_step(const AdamTensor<double>* t, const double* const* grads, const std::int64_t* steps, std::size_t n) {
    run_adam<double>(Gathered<AdamTensor<double>, double>{t, grads, steps}, n, checked_table(active_isa()).adam_f64, default_threads());
}
void sgd_step(const SgdTensor<float>* t, const float* const* grads, const std::int64_t* steps, std::size_t n) {
    run_sgd<float>(Gathered<SgdTensor<float>, float>{t, grads, steps}, n, checked_table(active_isa()).sgd_f32, default_threads());
}
void sgd_step(const SgdTensor<double>* t, const double* const* grads, const std::int64_t* steps, std::size_t n) {
    run_sgd<double>(Gathered<SgdTensor<double>, double>{t, grads, steps}, n, checked_table(active_isa()).sgd_f64, default_threads());
}

void lane_sqrt(const float* x, const float* estimate, float* out, std::int64_t n, Isa isa) {
    checked_table(isa).sqrt_f32(x, estimate, out, n);
}

void quantize_blockwise(const float* x, std::int64_t n, std::uint8_t* codes, float* absmax, const QuantMap& book) {
    checked_table(active_isa()).quantize_blockwise(x, n, codes, absmax, book);
}
void dequantize_blockwise(const std::uint8_t* codes, const float* absmax, std::int64_t n, float* out, const QuantMap& book) {
    checked_table(active_isa()).dequantize_blockwise(codes, absmax, n, out, book);
}

void quantize_codes(const float* x, std::uint8_t* codes, std::int64_t n, const QuantMap& book, Isa isa, bool bounded) {
    checked_table(isa).quantize_codes(x, codes, n, book, bounded);
}

std::int64_t quantizer_mismatches(const QuantMap& book, Isa isa, std::int64_t every, std::uint32_t* first) {
    const KernelTable& table = checked_table(isa);
    constexpr std::uint32_t chunk = 1u << 16;
    const float* thresholds = book.thresholds;
    const int count = (1 << book.bits) - 1;
    const auto expected = [&](std::uint32_t b) {
        float x;
        std::memcpy(&x, &b, 4);
        return x != x ? count : static_cast<int>(std::upper_bound(thresholds, thresholds + count, x) - thresholds);
    };
    // Chunks of 2^16 consecutive bit patterns are monotone in value (each sign apart): where
    // the first and last element have one code and no NaN is inside, every element has it.
    // Checked: every chunk that holds a threshold; with every = 1 every chunk of |x| < 2 (all
    // a quantized block's x * inv can be) and every 64th beyond; else every `every`-th chunk.
    // The chunks are shared by two threads (a self-check of seconds, not a step).
    std::atomic<std::int64_t> mismatches{0};
    std::atomic<std::uint32_t> first_bad{0};
    const auto check = [&](std::uint64_t from_chunk, std::uint64_t step) {
        std::vector<std::uint32_t> bits(chunk);
        std::vector<std::uint8_t> codes(chunk);
        for (std::uint64_t index = from_chunk; index < (std::uint64_t{1} << 16); index += step) {
            const auto start = static_cast<std::uint32_t>(index << 16);
            const std::uint32_t magnitude = start & 0x7fffffffu;
            const bool has_nan = magnitude + chunk - 1 > 0x7f800000u;
            const int lo = expected(start), hi = expected(start + chunk - 1);
            const std::uint64_t stride = every == 1 && magnitude < 0x40000000u ? 1 : every == 1 ? 64 : static_cast<std::uint64_t>(every);
            if (!has_nan && lo == hi && index % stride != 0) continue;
            for (std::uint32_t k = 0; k < chunk; ++k) bits[k] = start + k;
            for (const bool bounded : {false, true}) {
                if (bounded && magnitude >= 0x40000000u) continue;  // |x| >= 2
                table.quantize_codes(reinterpret_cast<const float*>(bits.data()), codes.data(), chunk, book, bounded);
                for (std::uint32_t k = 0; k < chunk; ++k) {
                    const int want = !has_nan && lo == hi ? lo : expected(bits[k]);
                    if (codes[k] != want && mismatches.fetch_add(1) == 0) first_bad.store(bits[k]);
                }
            }
        }
    };
    std::thread other(check, 1, 2);
    check(0, 2);
    other.join();
    if (first != nullptr && mismatches.load() > 0) *first = first_bad.load();
    return mismatches.load();
}

void adam_step(const AdamMixedTensor* t, std::size_t n, Isa isa, int threads) { run_adam_mixed(t, n, checked_table(isa), threads); }
void adam_step(const AdamMixedTensor* t, std::size_t n) { adam_step(t, n, active_isa(), default_threads()); }
double grad_sq_sum(const GradView* g, std::size_t n, const GradTransform& tr, Isa isa, int threads) {
    return run_grad_sq_sum(g, n, tr, checked_table(isa), threads);
}
double grad_sq_sum(const GradView* g, std::size_t n, const GradTransform& tr) { return grad_sq_sum(g, n, tr, active_isa(), default_threads()); }
std::int64_t grad_sq_block_count(const GradView* g, std::size_t n) {
    std::int64_t blocks = 0;
    for (std::size_t k = 0; k < n; ++k) blocks += (g[k].size + kNormBlock - 1) / kNormBlock;
    return blocks;
}
void grad_sq_block_sums(const GradView* g, std::size_t n, const GradTransform& tr, double* out) {
    run_grad_sq_blocks(g, n, tr, checked_table(active_isa()), default_threads(), out);
}

void adam_step(const AdamTensor<float>* t, std::size_t n) { adam_step(t, n, active_isa(), default_threads()); }
void adam_step(const AdamTensor<double>* t, std::size_t n) { adam_step(t, n, active_isa(), default_threads()); }
void sgd_step(const SgdTensor<float>* t, std::size_t n) { sgd_step(t, n, active_isa(), default_threads()); }
void sgd_step(const SgdTensor<double>* t, std::size_t n) { sgd_step(t, n, active_isa(), default_threads()); }

}  // namespace fastadam
