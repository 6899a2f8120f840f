// A pool of worker threads for one step's work, where the caller never waits for a
// worker that has not started, and a slow worker's share is taken over in pieces.
//
// Why not an OpenMP parallel region: its closing barrier waits for every thread of
// the team. When another runtime's threads are spinning on the other cores (OpenBLAS
// keeps its threads busy-waiting for ~0.1 s after each matrix product, which a NumPy
// training loop does between optimizer steps), a worker is not scheduled until the
// next time slice and a 20 us step takes milliseconds. Here every participant owns a
// contiguous share of the step, cut into units: it runs its own units from the front,
// then takes the units still left at the back of the others' shares. A late worker
// finds its share done by others; a worker on a core that another process also uses
// finishes less of its share, and the others finish the rest. On a quiet machine a
// share mostly stays with its owner, so each core sees the same part of the arrays at
// every step (its cache keeps it). The thread *count* still follows OpenMP's settings
// (OMP_NUM_THREADS, omp_set_num_threads, threadpoolctl); see dispatch.cpp.
#pragma once

#include <atomic>
#include <cassert>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTADAM_PAUSE() _mm_pause()
#elif defined(__aarch64__) && defined(__GNUC__)
// isb, not yield: yield is a no-op on Arm cores without SMT (nearly all), while isb
// stalls the front end for tens of cycles, as x86's pause does (Rust's spin_loop and
// several databases switched to it: rust-lang/rust#84725).
#define FASTADAM_PAUSE() __asm__ __volatile__("isb" ::: "memory")
#elif defined(_M_ARM64)
#include <intrin.h>
#define FASTADAM_PAUSE() __isb(_ARM64_BARRIER_SY)
#else
#define FASTADAM_PAUSE() std::this_thread::yield()
#endif

namespace fastadam {

class WorkPool {
public:
    // fn(context, unit) runs one unit of a job; units [p * units_per_share, (p + 1) *
    // units_per_share) are participant p's share (the caller is participant 0).
    using UnitFn = void (*)(void* context, int unit);
    // How long an idle worker spins for the next job before it sleeps.
    static constexpr std::chrono::microseconds kSpin{50};
    // How many pauses the caller spins for the workers' last units before it yields its core.
    static constexpr int kPausesBeforeYield = 4096;
    // Participants (caller included) and units per share a job may have.
    static constexpr int kMaxShares = 256, kMaxUnitsPerShare = 0xffff;

    static WorkPool& instance() {
        // Leaked on purpose: detached workers may outlive static destruction at exit.
        static const bool registered = [] {
            current() = new WorkPool();
#if defined(__unix__) || defined(__APPLE__)
            // fork(): the parent waits for a step in progress in another thread to end, so
            // that no lock is copied while held; the child starts a new pool (its workers
            // were not copied) and leaks the old one. Else a child forked during another
            // thread's step hung on the copied lock (docs/design.md, "Threads, signals,
            // fork and exit").
            pthread_atfork([] { current()->lock_for_fork(); }, [] { current()->unlock_after_fork(); },
                           [] { current() = new WorkPool(); });
#endif
            return true;
        }();
        (void)registered;
        return *current();
    }

    // Runs fn(context, u) for every u in [0, shares * units_per_share) on the caller and
    // up to `shares - 1` workers; returns when every unit is done.
    void run(int shares, int units_per_share, UnitFn fn, void* context) {
        assert(shares >= 1 && shares <= kMaxShares && units_per_share >= 1 && units_per_share <= kMaxUnitsPerShare);
        std::lock_guard<std::mutex> one_job(job_mutex_);  // callers from several Python threads take turns
        ensure_workers(shares - 1);
        fn_.store(fn, std::memory_order_relaxed);
        context_.store(context, std::memory_order_relaxed);
        shares_.store(shares, std::memory_order_relaxed);
        units_per_share_.store(units_per_share, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        const std::uint64_t epoch = ++epoch_counter_ & 0xffffffffu;
        for (int p = 0; p < shares; ++p)
            share_[p].left.store(epoch << 32 | static_cast<std::uint64_t>(units_per_share), std::memory_order_relaxed);
        helpers_.store(shares - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(wake_mutex_);
            epoch_.store(epoch, std::memory_order_release);  // publishes the job
        }
        wake_.notify_all();
        work(epoch, 0);
        // Only units that a running worker has claimed can still be in progress. If that
        // takes long, the worker may be waiting for this core (more threads than cores).
        for (int pauses = 0; done_.load(std::memory_order_acquire) != shares * units_per_share;) {
            if (pauses < kPausesBeforeYield) {
                FASTADAM_PAUSE();
                ++pauses;
            } else {
                std::this_thread::yield();
            }
        }
        job_ended();
    }

    // Whether a job may go to `helpers` workers now: they are spinning, or steps are
    // arriving back to back (the last one ended within the workers' spin time), in
    // which case sleeping workers are woken once and then keep spinning between steps.
    // Otherwise a short job runs on the caller (dispatch.cpp): waking a sleeping thread
    // costs the caller a system call, and on a virtual machine the worker starts tens
    // of microseconds later.
    bool helpers_ready(int helpers) const {
        return awake_.load(std::memory_order_relaxed) >= helpers ||
               now_ns() - last_end_ns_.load(std::memory_order_relaxed) < std::chrono::nanoseconds(kSpin).count();
    }

    // Records the end of a step that ran on the caller alone, for helpers_ready().
    void job_ended() { last_end_ns_.store(now_ns(), std::memory_order_relaxed); }

private:
    WorkPool() = default;

    static WorkPool*& current() {
        static WorkPool* pool = nullptr;
        return pool;
    }
    void lock_for_fork() {
        job_mutex_.lock();  // a job in progress ends first: it needs neither lock below nor the GIL
        wake_mutex_.lock();
    }
    void unlock_after_fork() {
        wake_mutex_.unlock();
        job_mutex_.unlock();
    }

    static std::int64_t now_ns() {
        return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
    }

    void ensure_workers(int count) {
        while (started_ < count) {
            std::thread(&WorkPool::worker_loop, this, started_).detach();
            ++started_;
        }
    }

    // Claims one unit of share p of job `epoch`, from the front (its owner) or from the
    // back (anyone else). Returns the unit's index within the share, or -1 if the share
    // has none left or the job is no longer `epoch`.
    int claim(int p, std::uint64_t epoch, bool front) {
        // share_[p].left: epoch << 32 | first unit left << 16 | one past the last unit left
        std::uint64_t word = share_[p].left.load(std::memory_order_acquire);
        for (;;) {
            const int first = static_cast<int>(word >> 16 & 0xffffu), end = static_cast<int>(word & 0xffffu);
            if ((word >> 32) != epoch || first >= end) return -1;
            const std::uint64_t taken = front ? word + (1u << 16) : word - 1;
            if (share_[p].left.compare_exchange_weak(word, taken, std::memory_order_acq_rel)) return front ? first : end - 1;
        }
    }

    // Participant `me` runs units of job `epoch`: its own share first, then what is left
    // of the others'. A claim succeeds only while job `epoch` is unfinished, and then the
    // fields read here are its own: a new job starts only after every unit is done.
    void work(std::uint64_t epoch, int me) {
        const UnitFn fn = fn_.load(std::memory_order_relaxed);
        void* const context = context_.load(std::memory_order_relaxed);
        const int shares = shares_.load(std::memory_order_relaxed);
        const int units = units_per_share_.load(std::memory_order_relaxed);
        if (me >= shares) return;
        for (int k = 0; k < shares; ++k) {
            const int p = (me + k) % shares;
            for (int u; (u = claim(p, epoch, p == me)) >= 0;) {
                fn(context, p * units + u);
                done_.fetch_add(1, std::memory_order_acq_rel);
            }
        }
    }

    void worker_loop(int id) {
        awake_.fetch_add(1, std::memory_order_relaxed);
        std::uint64_t seen = 0;
        for (;;) {
            // Spin briefly (steps often come back to back), then sleep.
            std::uint64_t epoch = epoch_.load(std::memory_order_acquire);
            const auto spin_until = std::chrono::steady_clock::now() + kSpin;
            while (epoch == seen && std::chrono::steady_clock::now() < spin_until) {
                // A pause takes ~25 ns on this project's machine: checking every 4 starts a
                // spinning worker within ~0.1 us of a job (every 64: up to 1.6 us, a tenth
                // of a 1e5-element step; fastadam_bench adam/*/threads:2, README).
                // (No sched_yield here: with it, bench/threshold.py's alternating 1- and
                // 2-thread steps measured no gain from the second thread.)
                for (int i = 0; i < 4; ++i) FASTADAM_PAUSE();
                epoch = epoch_.load(std::memory_order_acquire);
            }
            if (epoch == seen) {
                std::unique_lock<std::mutex> lock(wake_mutex_);
                awake_.fetch_sub(1, std::memory_order_relaxed);
                wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
                awake_.fetch_add(1, std::memory_order_relaxed);
                epoch = epoch_.load(std::memory_order_acquire);
            }
            seen = epoch;
            if (id < helpers_.load(std::memory_order_relaxed)) work(epoch, id + 1);  // this job wants `helpers_` of us
        }
    }

    std::mutex job_mutex_;
    std::mutex wake_mutex_;
    std::condition_variable wake_;
    std::atomic<std::uint64_t> epoch_{0};  // the current job's number (low 32 bits)
    struct alignas(64) Share {  // one line each: an owner's claims do not disturb the other cores
        std::atomic<std::uint64_t> left{0};
    };
    Share share_[kMaxShares];  // each share's units not yet claimed
    std::atomic<UnitFn> fn_{nullptr};
    std::atomic<void*> context_{nullptr};
    std::atomic<int> shares_{0};
    std::atomic<int> units_per_share_{0};
    std::atomic<int> done_{0};
    std::atomic<int> helpers_{0};
    std::atomic<int> awake_{0};  // workers spinning or working
    std::atomic<std::int64_t> last_end_ns_{0};
    std::uint64_t epoch_counter_ = 0;
    int started_ = 0;
};

}  // namespace fastadam
