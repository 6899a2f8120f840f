// A pool of worker threads for one step's chunks of work, where the caller never
// waits for a worker that has not started.
//
// Why not an OpenMP parallel region: its closing barrier waits for every thread of
// the team. When another runtime's threads are spinning on the other cores (OpenBLAS
// keeps its threads busy-waiting for ~0.1 s after each matrix product, which a NumPy
// training loop does between optimizer steps), a worker is not scheduled until the
// next time slice and a 20 us step takes milliseconds. Here the caller claims chunks
// too; a late worker finds none left and goes back to sleep, so the worst case is the
// single-threaded time. The thread *count* still follows OpenMP's settings
// (OMP_NUM_THREADS, omp_set_num_threads, threadpoolctl); see dispatch.cpp.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTADAM_PAUSE() _mm_pause()
#else
#define FASTADAM_PAUSE() std::this_thread::yield()
#endif

namespace fastadam {

class WorkPool {
public:
    using ChunkFn = void (*)(void* context, int chunk);
    // How long an idle worker spins for the next job before it sleeps.
    static constexpr std::chrono::microseconds kSpin{50};

    static WorkPool& instance() {
        // Leaked on purpose: detached workers may outlive static destruction at exit.
        static WorkPool* pool = new WorkPool();
        return *pool;
    }

    // Runs fn(context, c) for every c in [0, chunks) on the caller and up to
    // `threads - 1` workers; returns when every chunk is done.
    void run(int threads, int chunks, ChunkFn fn, void* context) {
        std::lock_guard<std::mutex> one_job(job_mutex_);  // callers from several Python threads take turns
        ensure_workers(threads - 1);
        fn_.store(fn, std::memory_order_relaxed);
        context_.store(context, std::memory_order_relaxed);
        chunks_.store(chunks, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        const std::uint64_t epoch = ++epoch_counter_;
        helpers_.store(threads - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(wake_mutex_);
            ticket_.store(epoch << 32, std::memory_order_release);  // publishes the job
        }
        wake_.notify_all();
        work(epoch);
        // Only chunks that a running worker has claimed can still be in progress.
        while (done_.load(std::memory_order_acquire) != chunks) FASTADAM_PAUSE();
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

    static std::int64_t now_ns() {
        return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
    }

    void ensure_workers(int count) {
        while (started_ < count) {
            std::thread(&WorkPool::worker_loop, this, started_).detach();
            ++started_;
        }
    }

    // Claims and runs chunks of job `epoch` until none is left.
    void work(std::uint64_t epoch) {
        for (;;) {
            std::uint64_t ticket = ticket_.load(std::memory_order_acquire);
            const ChunkFn fn = fn_.load(std::memory_order_relaxed);
            void* const context = context_.load(std::memory_order_relaxed);
            const int chunks = chunks_.load(std::memory_order_relaxed);
            // A claim succeeds only while job `epoch` is current, and then the fields
            // read above are its own: a new job starts only after every chunk is done.
            if ((ticket >> 32) != epoch || static_cast<int>(ticket & 0xffffffffu) >= chunks) return;
            if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) continue;
            fn(context, static_cast<int>(ticket & 0xffffffffu));
            done_.fetch_add(1, std::memory_order_acq_rel);
        }
    }

    void worker_loop(int id) {
        awake_.fetch_add(1, std::memory_order_relaxed);
        std::uint64_t seen = 0;
        for (;;) {
            // Spin briefly (steps often come back to back), then sleep.
            std::uint64_t epoch = ticket_.load(std::memory_order_acquire) >> 32;
            const auto spin_until = std::chrono::steady_clock::now() + kSpin;
            while (epoch == seen && std::chrono::steady_clock::now() < spin_until) {
                for (int i = 0; i < 64; ++i) FASTADAM_PAUSE();
                epoch = ticket_.load(std::memory_order_acquire) >> 32;
            }
            if (epoch == seen) {
                std::unique_lock<std::mutex> lock(wake_mutex_);
                awake_.fetch_sub(1, std::memory_order_relaxed);
                wake_.wait(lock, [&] { return (ticket_.load(std::memory_order_acquire) >> 32) != seen; });
                awake_.fetch_add(1, std::memory_order_relaxed);
                epoch = ticket_.load(std::memory_order_acquire) >> 32;
            }
            seen = epoch;
            if (id < helpers_.load(std::memory_order_relaxed)) work(epoch);  // this job wants `helpers_` of us
        }
    }

    std::mutex job_mutex_;
    std::mutex wake_mutex_;
    std::condition_variable wake_;
    std::atomic<std::uint64_t> ticket_{0};  // epoch << 32 | next chunk to claim
    std::atomic<ChunkFn> fn_{nullptr};
    std::atomic<void*> context_{nullptr};
    std::atomic<int> chunks_{0};
    std::atomic<int> done_{0};
    std::atomic<int> helpers_{0};
    std::atomic<int> awake_{0};  // workers spinning or working
    std::atomic<std::int64_t> last_end_ns_{0};
    std::uint64_t epoch_counter_ = 0;
    int started_ = 0;
};

}  // namespace fastadam
