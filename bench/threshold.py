"""Where does a second thread start to pay? Times adam_step (float32) on 1 and 2 threads.

The kernel uses one thread per FASTADAM_MIN_ELEMENTS_PER_THREAD elements, so to see
small sizes split, time a build with a low threshold:

    cmake -S . -B /tmp/bthr -G Ninja -DFASTADAM_BUILD_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \\
          -Dpybind11_DIR=$(python -m pybind11 --cmakedir) -DCMAKE_CXX_FLAGS=-DFASTADAM_MIN_ELEMENTS_PER_THREAD=1024
    cmake --build /tmp/bthr
    mkdir -p /tmp/thrpkg/fastadam && cp python/fastadam/*.py /tmp/bthr/_core*.so /tmp/thrpkg/fastadam/
    PYTHONPATH=/tmp/thrpkg python bench/threshold.py

Runs are interleaved (every size and thread count once per round) and medians reported.
"""

import statistics
import time

import numpy as np

import fastadam

SIZES = [4096, 8192, 16384, 32768, 65536, 131072]
ROUNDS = 300


def main() -> None:
    print(f"fastadam {fastadam.__version__}, {fastadam.get_isa()}, min_elements_per_thread={fastadam._core.min_elements_per_thread}")
    arrays = {n: [np.ones(n, np.float32) for _ in range(4)] for n in SIZES}
    # OpenBLAS's threads busy-wait for a while after NumPy's import; on a 2-core machine
    # one of them can take the core a worker needs for the whole short run.
    time.sleep(0.5)
    samples: dict[tuple[int, int], list[float]] = {(n, t): [] for n in SIZES for t in (1, 2)}
    for _ in range(ROUNDS):
        for n in SIZES:
            for t in (1, 2):
                fastadam.set_num_threads(t)
                a = arrays[n]
                t0 = time.perf_counter()
                fastadam.adam_step(*a, step=10)
                samples[(n, t)].append(time.perf_counter() - t0)
    for n in SIZES:
        one, two = (statistics.median(samples[(n, t)]) * 1e6 for t in (1, 2))
        print(f"{n:>7} elements: 1 thread {one:7.2f} us, 2 threads {two:7.2f} us, speed-up {one / two:.2f}")


if __name__ == "__main__":
    main()
