"""Step time when steps are apart, as in training: a busy pause before each step.

Between two optimizer steps a training loop runs its forward and backward passes, so
fastadam's idle workers have gone to sleep by the next step. This times one
``fastadam.Adam.step`` after a busy pause (default 1 ms), for fastadam's default thread
count and for one thread, interleaved step by step, and prints the medians:

    python bench/pause.py --sizes 3e4,1e5,2e5,1e6 --pause-ms 1

Below ``fastadam._core.min_elements_to_wake`` elements fastadam does not wake sleeping
workers (the wake-up costs more than the second thread saves); the two columns are then
equal.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastadam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="3e4,1e5,2e5,1e6", help="elements of the one float32 parameter")
    ap.add_argument("--pause-ms", type=float, default=1.0, help="busy pause before each step (default 1 ms)")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per thread setting")
    args = ap.parse_args()

    default_threads = fastadam.get_num_threads()
    print(f"fastadam {fastadam.__version__} ({fastadam.get_isa()}), {default_threads} thread(s) by default, "
          f"pause {args.pause_ms} ms, {args.steps} steps each, medians; min_elements_to_wake={fastadam._core.min_elements_to_wake}")
    print(f"{'elements':>10}  {'default threads':>16}  {'1 thread':>10}")
    rng = np.random.default_rng(0)
    for size in (int(float(s)) for s in args.sizes.split(",")):
        param = rng.standard_normal(size).astype(np.float32)
        grad = rng.standard_normal(size).astype(np.float32)
        opt = fastadam.Adam([param], lr=1e-4)
        times: dict[int, list[float]] = {0: [], 1: []}
        for k in range(2 * args.steps + 20):
            threads = k % 2
            fastadam.set_num_threads(threads)
            end = time.perf_counter() + args.pause_ms * 1e-3
            while time.perf_counter() < end:  # busy, as a forward/backward pass is
                pass
            t0 = time.perf_counter()
            opt.step([grad])
            if k >= 20:
                times[threads].append(time.perf_counter() - t0)
        fastadam.set_num_threads(0)
        print(f"{size:>10,}  {np.median(times[0]) * 1e6:>13.1f} us  {np.median(times[1]) * 1e6:>7.1f} us")


if __name__ == "__main__":
    main()
