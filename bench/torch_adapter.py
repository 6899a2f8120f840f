"""fastadam.torch.Adam against torch.optim.Adam(fused=True) and fastadam.Adam, whole step().

Also fastadam.torch.Adam without its torch helper (fastadam/_torch_meta.py), reading each
tensor through torch's Python API, as it does where the helper cannot be built.
Each case builds the same fp32 parameters and gradients for each contender (own memory per
contender, except "fastadam.Adam, same memory": fastadam.Adam on NumPy views of
fastadam.torch's params and gradients, its states placed as the adapter's are
(fastadam._common.zeros_packed), so that the ratio of the two is the adapter's cost; where
arrays sit changes the kernel's speed by 10-30% through 4K aliasing, which "fastadam.Adam,
own arrays" shows; the contender without the helper has memory of its own) and times whole
``step()`` calls, interleaved: every round times each contender in turn for about ``--sample-ms``, after ``--settle-ms`` of its untimed steps; the
table gives the median over rounds.

Cases (issue 14's table): 1000 tensors x 1000, GPT-2 small (148 tensors, 124M params),
one tensor of 1e4 and of 1e6; and "1000 x 1000, new grads": the training loop as torch
users write it, where every step brings new ``.grad`` tensors (here: two sets of gradient
tensors, alternated, so each step's ``.grad`` objects differ from the last step's, as
after ``zero_grad()`` and ``backward()``; the assignment loop is timed for every contender).

    python bench/torch_adapter.py                  # all cases, 2 threads
    python bench/torch_adapter.py --quick          # no GPT-2, fewer rounds (CI smoke run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import fastadam

try:
    import torch

    import fastadam.torch as fatorch
    from fastadam import _torch_meta
except ImportError as error:
    sys.exit(f"bench/torch_adapter.py needs torch: pip install torch==2.13.0 ({error})")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import gpt2_small_shapes  # noqa: E402  (bench/cases.py: the main benchmark's shapes)

LR = 1e-3


def _data(shapes: list[tuple[int, ...]], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        p = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        g = rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-2)
        out.append((p, g))
    return out


NO_HELPER = "fastadam.torch, no helper"
SAME = "fastadam.Adam, same memory"
OWN = "fastadam.Adam, own arrays"


def _first_step(opt: "fatorch.Adam", helper: bool) -> None:
    """Builds opt's kept plan with or without the torch helper (fastadam/_torch_meta.py)."""
    saved = list(_torch_meta._cached)
    _torch_meta._cached[:] = [] if helper else [None]
    try:
        opt.step()
    finally:
        _torch_meta._cached[:] = saved
    if opt._plan.torch_helper != helper:
        sys.exit(f"bench/torch_adapter.py: the torch helper is {'not ' if helper else ''}in use where it should "
                 f"{'' if helper else 'not '}be (FASTADAM_TORCH_HELPER={os.environ.get('FASTADAM_TORCH_HELPER')!r})")


def _contenders(shapes: list[tuple[int, ...]], new_grads: bool) -> dict[str, Callable[[], None]]:
    data = _data(shapes)
    out: dict[str, Callable[[], None]] = {}
    for name in ("torch fused", "fastadam.torch", NO_HELPER):
        params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p, _ in data]
        grads = [[torch.from_numpy(g.copy()) for _, g in data] for _ in range(2 if new_grads else 1)]
        for p, g in zip(params, grads[0]):
            p.grad = g
        opt = torch.optim.Adam(params, lr=LR, fused=True) if name == "torch fused" else fatorch.Adam(params, lr=LR)
        if name != "torch fused":
            _first_step(opt, helper=name != NO_HELPER)
        if new_grads:
            def step(opt=opt, params=params, grads=grads, k=[0]) -> None:  # noqa: B006  (k: the step's counter)
                k[0] ^= 1
                for p, g in zip(params, grads[k[0]]):
                    p.grad = g
                opt.step()
        else:
            step = opt.step
        out[name] = step
        if name == "fastadam.torch":
            shared = (params, grads)
    # fastadam.Adam on NumPy views of fastadam.torch's own params and gradients: the same
    # memory, so the two differ only in the adapter's work (the kernel's speed depends on
    # where the arrays sit, docs/performance.md "4K aliasing"); and on arrays of its own.
    torch_params, torch_grads = shared
    views = ([p.detach().numpy() for p in torch_params], [[g.numpy() for g in gs] for gs in torch_grads])
    own = ([p.copy() for p, _ in data], [[g.copy() for _, g in data] for _ in range(2 if new_grads else 1)])
    for name, (arrays, np_grads) in ((SAME, views), (OWN, own)):
        np_opt = fastadam.Adam(arrays, lr=LR)

        def np_step(np_opt=np_opt, np_grads=np_grads, k=[0]) -> None:  # noqa: B006  (k: the step's counter)
            if new_grads:
                k[0] ^= 1
            np_opt.step(np_grads[k[0]])

        out[name] = np_step
    return out


def _steps_for(fn: Callable[[], None], seconds: float) -> int:
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds / 4:
            return max(1, round(n * seconds / elapsed))
        n *= 4


def measure(shapes: list[tuple[int, ...]], new_grads: bool, rounds: int, sample_s: float, settle_s: float) -> dict[str, float]:
    """Median seconds per step of each contender, interleaved over ``rounds``."""
    fns = _contenders(shapes, new_grads)
    steps = {}
    for name, fn in fns.items():
        fn()  # state, plans, threads
        steps[name] = _steps_for(fn, sample_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            # untimed steps first: torch's OpenMP threads spin on after its steps and would
            # bill the next contender (bench.py's --settle-time)
            settle_end = time.perf_counter() + settle_s
            fn()
            while time.perf_counter() < settle_end:
                fn()
            t0 = time.perf_counter()
            for _ in range(steps[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / steps[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sample-ms", type=float, default=50.0)
    ap.add_argument("--settle-ms", type=float, default=10.0,
                    help="untimed steps (at least one) before each timed sample (default 10 ms)")
    ap.add_argument("--quick", action="store_true", help="no GPT-2 case, 3 rounds of 5 ms")
    args = ap.parse_args(argv)
    rounds, sample_s = (3, 0.005) if args.quick else (args.rounds, args.sample_ms / 1e3)
    torch.set_num_threads(args.threads)
    fastadam.set_num_threads(args.threads)
    cases: list[tuple[str, list[tuple[int, ...]], bool]] = [
        ("1000 x 1000", [(1000,)] * 1000, False),
        ("1000 x 1000, new grads", [(1000,)] * 1000, True),
    ]
    if not args.quick:
        cases.append(("GPT-2 small", [tuple(s) for s in gpt2_small_shapes()], False))
    cases += [("1e4", [(10_000,)], False), ("1e6", [(1_000_000,)], False)]
    print(f"fastadam {fastadam.__version__} ({fastadam.get_isa()}), torch {torch.__version__}, {args.threads} threads, "
          f"median of {rounds} interleaved rounds")
    print("| case | torch fused | fastadam.torch | vs torch fused | fastadam.Adam, same memory | fastadam.torch / fastadam.Adam "
          "| fastadam.Adam, own arrays | without the torch helper | its / fastadam.Adam |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, shapes, new_grads in cases:
        t = measure(shapes, new_grads, rounds, sample_s, args.settle_ms / 1e3)
        ft, tf, fa, nh = t["fastadam.torch"], t["torch fused"], t[SAME], t[NO_HELPER]
        print(f"| {label} | {_fmt(tf)} | {_fmt(ft)} | {tf / ft:.2f}x | {_fmt(fa)} | {ft / fa:.2f} | {_fmt(t[OWN])} | {_fmt(nh)} "
              f"| {nh / fa:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
