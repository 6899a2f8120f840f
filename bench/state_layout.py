"""Step time against where the optimizer's state buffers lie in memory.

``fastadam.Adam`` allocates its state itself: all buffers of one kind (exp_avg,
exp_avg_sq, ...) in one zeroed block, each on a 64-byte boundary, the blocks of
different kinds starting at different offsets within a 4 KiB page. This times
``Adam.step`` on one model with that placement and with the same state copied into
other placements, interleaved (A B C, B C A, C A B, ...), and prints medians and ratios:

    python bench/state_layout.py --tensors 1000 --size 1000
    python bench/state_layout.py --gpt2 --rounds 7 --steps 3

Placements:
  packed      the optimizer's own (fastadam.optim._zeros_packed)
  zeros_like  one numpy.zeros_like per buffer, tensor by tensor, as NumPy code would;
              a tensor's exp_avg and exp_avg_sq then land at nearly the same offset
              within a page (printed), which the CPU takes for a possible dependence
              between their loads and stores ("4K aliasing")
  aligned     one 64-byte-aligned allocation per buffer, tensor by tensor: aligned, but
              at nearly the same page offsets, like zeros_like
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from cases import gpt2_small_shapes  # bench/cases.py, beside this file

import fastadam


def aligned_zeros(like: np.ndarray) -> np.ndarray:
    raw = np.zeros(like.nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + like.nbytes].view(like.dtype).reshape(like.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1000, help="float32 elements per tensor")
    ap.add_argument("--gpt2", action="store_true", help="the 148 parameter shapes of GPT-2 small instead")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per sample")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    shapes = gpt2_small_shapes() if args.gpt2 else [(args.size,)] * args.tensors
    params0 = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    grads = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    placements = {"packed": None, "zeros_like": lambda a: np.zeros_like(a), "aligned": aligned_zeros}
    optimizers = {}
    for name, alloc in placements.items():
        opt = fastadam.Adam([p.copy() for p in params0], lr=1e-4)
        opt.step(grads)
        if alloc is not None:  # re-place the state, tensor by tensor, keeping its values
            for i in range(len(shapes)):
                for key in opt._state_keys:
                    old = opt._buffers[key][i]
                    if old is not None:
                        new = alloc(old)
                        new[...] = old
                        opt._buffers[key][i] = new
            opt._plan = None
        optimizers[name] = opt

    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for round_index in range(args.rounds):
        shift = round_index % len(names)  # each placement goes first in turn
        for name in names[shift:] + names[:shift]:
            opt = optimizers[name]
            for _ in range(max(1, args.steps // 5)):
                opt.step(grads)  # settle
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step(grads)
            samples[name].append((time.perf_counter() - t0) / args.steps)

    model = "GPT-2 small's 148 tensors" if args.gpt2 else f"{args.tensors} x {args.size}"
    print(f"fastadam {fastadam.__version__} ({fastadam.get_isa()}, {fastadam.get_num_threads()} threads): Adam.step on "
          f"{model} float32, {args.rounds} interleaved rounds of {args.steps} steps, medians")
    base = float(np.median(samples["packed"]))
    print(f"{'placement':<12} {'step':>10} {'vs packed':>10}  exp_avg / exp_avg_sq page offsets of tensor 0")
    for name, opt in optimizers.items():
        median = float(np.median(samples[name]))
        offsets = [opt._buffers[k][0].ctypes.data % 4096 for k in ("exp_avg", "exp_avg_sq")]
        print(f"{name:<12} {median * 1e6:8.1f} us {median / base:9.2f}x  {offsets[0]} / {offsets[1]}")


if __name__ == "__main__":
    main()
