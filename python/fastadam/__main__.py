"""``python -m fastadam``: what this machine runs, a self-check, and a quick timing.

The self-check runs the native kernel and the NumPy reference on random data for
every available SIMD path, 1 and all threads, float32 and float64 and each Adam
variant, and requires identical bits. The timing compares ``fastadam.adam_step``
with ``fastadam.reference.adam_step`` (medians of interleaved runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

import fastadam
from fastadam import reference

VARIANTS: dict[str, dict[str, Any]] = {
    "adam": {},
    "adam+l2": {"weight_decay": 0.1},
    "adamw": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "amsgrad+maximize": {"amsgrad": True, "maximize": True},
}


def self_check(n: int = 100_003, steps: int = 3) -> list[str]:
    """Returns a list of failures (empty when every path matches the reference)."""
    failures = []
    rng = np.random.default_rng(0)
    isa0 = fastadam.get_isa()
    threads = sorted({1, fastadam.get_num_threads()})
    try:
        for dtype in (np.float32, np.float64):
            for name, kw in VARIANTS.items():
                init = [rng.standard_normal(n).astype(dtype) for _ in range(2)] + [rng.random(n).astype(dtype)] * 2
                grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]

                def run(step_fn: Callable[..., object], arrays: list[npt.NDArray[Any]]) -> None:
                    p, m, v, vmax = arrays
                    for t, g in enumerate(grads, start=1):
                        step_fn(p, g, m, v, step=t, lr=1e-2, max_exp_avg_sq=vmax if kw.get("amsgrad") else None, **kw)

                want = [a.copy() for a in init]
                run(reference.adam_step, want)
                for isa in fastadam.available_isas():
                    fastadam.set_isa(isa)
                    for t in threads:
                        fastadam.set_num_threads(t)
                        got = [a.copy() for a in init]
                        run(fastadam.adam_step, got)
                        if not all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(got, want)):
                            failures.append(f"{np.dtype(dtype).name} {name} isa={isa} threads={t}")
    finally:
        fastadam.set_isa(isa0)
        fastadam.set_num_threads(0)
    return failures


def median_times(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so drift hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def quick_timing(sizes: tuple[int, ...] = (1_000, 100_000, 1_000_000), repeats: int = 15) -> list[tuple[int, float, float]]:
    rows = []
    rng = np.random.default_rng(1)
    for n in sizes:
        arrays = {k: [rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32),
                      np.zeros(n, np.float32), np.zeros(n, np.float32)] for k in ("fastadam", "numpy")}
        inner = max(1, 100_000 // n)  # several calls per sample for tiny sizes: timer resolution

        def call(step_fn: Callable[..., object], a: list[npt.NDArray[np.float32]]) -> Callable[[], None]:
            def f() -> None:
                for _ in range(inner):
                    step_fn(a[0], a[1], a[2], a[3], step=10, lr=1e-3)
            return f

        t = median_times({"fastadam": call(fastadam.adam_step, arrays["fastadam"]),
                          "numpy": call(reference.adam_step, arrays["numpy"])}, repeats)
        rows.append((n, t["fastadam"] / inner, t["numpy"] / inner))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastadam", description=(__doc__ or "").splitlines()[0],
                                     epilog="The benchmark against torch, DeepSpeed and optax: bench/bench.py in the source repository.")
    parser.add_argument("--no-timing", action="store_true", help="skip the quick timing")
    args = parser.parse_args(argv)
    print(f"fastadam {fastadam.__version__}")
    print(f"  SIMD path in use : {fastadam.get_isa()} (available: {', '.join(fastadam.available_isas())}; "
          "choose with FASTADAM_ISA or fastadam.set_isa)")
    print(f"  threads          : {fastadam.get_num_threads()} (OpenMP: {'yes' if fastadam._core.has_openmp() else 'no'}; "
          "choose with OMP_NUM_THREADS or fastadam.set_num_threads)")
    failures = self_check()
    if failures:
        print("  self-check       : FAILED, kernel != reference for: " + "; ".join(failures))
        return 1
    print(f"  self-check       : OK, identical bits to fastadam.reference on every path x threads "
          f"{sorted({1, fastadam.get_num_threads()})} x float32/float64 x {len(VARIANTS)} variants")
    if not args.no_timing:
        print("\n  adam_step, float32, median of interleaved runs:")
        print(f"  {'elements':>10} {'fastadam':>12} {'NumPy reference':>16} {'speed-up':>9}")
        for n, fast, ref in quick_timing():
            print(f"  {n:>10,} {fast * 1e6:>10.1f}us {ref * 1e6:>14.1f}us {ref / fast:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
