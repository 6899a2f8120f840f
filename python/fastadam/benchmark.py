"""fastadam against its peers: one Adam step per call, fp32, interleaved timing.

Contenders (each on its own copies of the same data; nothing is shared):

* ``fastadam``       -- ``fastadam.adam_step`` on a single tensor; the whole optimizer step
                        ``fastadam.Adam(arrays).step(grads)`` on multi-tensor cases.
* ``fastadam_optim`` -- (opt-in) ``fastadam.Adam(...).step(grads)`` on every case.
* ``numpy``          -- ``fastadam.reference.adam_step`` (plain NumPy), once per tensor.
* ``torch``, ``torch_foreach``, ``torch_fused`` -- ``torch.optim.Adam(..., foreach=False)``,
  ``foreach=True``, ``fused=True``; ``.grad`` set once, only ``opt.step()`` is timed
  (only when torch is importable).
* ``deepspeed``      -- (opt-in) DeepSpeed's ``DeepSpeedCPUAdam(..., adamw_mode=False)``, the
                        CPU Adam of ZeRO-Offload, timed like torch's (one tensor per parameter;
                        ZeRO-Offload passes it one flat buffer, as in the single-tensor
                        cases). Needs ``pip install
                        deepspeed`` beside torch; its first use compiles DeepSpeed's C++ op
                        (about a minute), which is why it is not a default. It runs on
                        torch's OpenMP threads, so ``threads`` applies to it too.
* ``optax``          -- (opt-in) JAX's ``optax.adam`` under ``jax.jit`` on the CPU, params and
                        state donated (updated in place), each step waited for. Needs ``pip
                        install jax optax``. XLA runs it on its own pool of one thread per CPU,
                        so ``threads`` must be the number of usable CPUs.

Cases: single tensors of 1e3 .. 5e7 elements, the 148 parameter tensors of GPT-2 small
(124.4M parameters), and 1000 tensors of 1000 elements.

Method: for each case all contenders are built, warmed up (torch creates its state on the
first step), and each is calibrated to a batch of steps lasting about ``min_sample_time``.
Then ``repeats`` rounds run every contender's batch once, in a rotating order (A B C, B C A,
...), so drift of the machine (memory bandwidth, neighbours) hits all contenders alike.
Reported: the median time per step over the rounds, the ratio peer_time / fastadam_time for
each peer (>1: fastadam is faster), and the effective bandwidth at 28 bytes per fp32
element (read param, grad, exp_avg, exp_avg_sq; write three of them).

The bandwidth bound comes from bench/cpp's ``fastadam_bench`` (its STREAM-like in-place
read-4/write-3 loop): ``--stream-bin`` runs it once per round inside the big cases (so the bound
drifts with the machine exactly as the contenders do; "% of bound" is then the median over rounds
of fastadam's GB/s over the bound's), ``--stream-json`` reads a saved run, ``--bound-gbs`` takes a number.

Usage::

    python bench/bench.py                         # full run, 2 threads (the GPT-2 case holds ~11 GB)
    python bench/bench.py --quick                 # small sizes, few repeats (CI smoke)
    python -m fastadam --bench                    # the same quick comparison, from an installed fastadam
    python bench/bench.py --stream-bin build/bench/bench/cpp/fastadam_bench --json out.json --plot out.png
    python bench/bench.py --contenders fastadam,torch_fused,deepspeed,optax   # with the opt-in peers

The module imports without torch or matplotlib; the core is ``run(cases, threads, repeats,
contenders) -> list[dict]``, ``format_table(results)``, ``machine_info(threads)``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import fastadam
from fastadam import reference

__all__ = [
    "BYTES_PER_ELEMENT",
    "SINGLE_SIZES",
    "QUICK_SIZES",
    "CONTENDERS",
    "Case",
    "single_case",
    "gpt2_small_shapes",
    "gpt2_small_case",
    "many_case",
    "default_cases",
    "available_contenders",
    "check_contenders",
    "run",
    "format_table",
    "machine_info",
    "read_stream_bound",
    "write_json",
    "plot",
    "main",
]

BYTES_PER_ELEMENT = 28  # fp32 Adam: reads param, grad, exp_avg, exp_avg_sq (16 B), writes 3 (12 B)
SINGLE_SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000)
QUICK_SIZES = (1_000, 10_000, 100_000)
CONTENDERS = ("fastadam", "fastadam_optim", "numpy", "torch", "torch_foreach", "torch_fused", "deepspeed", "optax")
DEFAULT_CONTENDERS = ("fastadam", "numpy", "torch", "torch_foreach", "torch_fused")
TORCH_CONTENDERS = {"torch": {"foreach": False}, "torch_foreach": {"foreach": True}, "torch_fused": {"fused": True}}
LABELS = {
    "fastadam": "fastadam",
    "fastadam_optim": "fastadam.Adam",
    "numpy": "NumPy ref",
    "torch": "torch",
    "torch_foreach": "torch foreach",
    "torch_fused": "torch fused",
    "deepspeed": "DeepSpeed",
    "optax": "optax",
}
LR = 1e-3  # torch's default, for every contender


# ----- cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A benchmark case: the shapes of the parameter tensors of one optimizer step."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    kind: str  # "single": one tensor (fastadam.adam_step); "multi": an optimizer over many tensors

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def _short(n: int) -> str:
    for div, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            value = n / div
            return f"{value:g}{suffix}"
    return str(n)


def single_case(n: int) -> Case:
    if n < 1:
        raise ValueError(f"a single-tensor case needs n >= 1, got {n}")
    return Case(f"1 x {_short(n)}", ((int(n),),), "single")


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (HF GPT2LMHeadModel, lm_head tied to wte): 124,439,808 params."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),                  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),        # attn.c_attn weight, bias
            (d, d), (d,),                # attn.c_proj weight, bias
            (d,), (d,),                  # ln_2 weight, bias
            (d, 4 * d), (4 * d,),        # mlp.c_fc weight, bias
            (4 * d, d), (d,),            # mlp.c_proj weight, bias
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


def gpt2_small_case() -> Case:
    return Case("GPT-2 small", tuple(gpt2_small_shapes()), "multi")


def many_case(count: int = 1000, size: int = 1000) -> Case:
    return Case(f"{count} x {_short(size)}", tuple((size,) for _ in range(count)), "multi")


def default_cases(quick: bool = False, sizes: Iterable[int] | None = None, groups: Iterable[str] | None = None) -> list[Case]:
    """Single tensors (``sizes``; QUICK_SIZES when quick), then GPT-2 small (not in quick mode), then 1000 x 1000.

    ``groups`` picks among "single", "gpt2", "many" (default: all; quick mode drops gpt2).
    """
    chosen = set(groups) if groups is not None else ({"single", "many"} if quick else {"single", "gpt2", "many"})
    unknown = chosen - {"single", "gpt2", "many"}
    if unknown:
        raise ValueError(f"unknown case group(s) {sorted(unknown)}; choose from single, gpt2, many")
    cases: list[Case] = []
    if "single" in chosen:
        cases += [single_case(n) for n in (sizes if sizes is not None else QUICK_SIZES if quick else SINGLE_SIZES)]
    if "gpt2" in chosen:
        cases.append(gpt2_small_case())
    if "many" in chosen:
        cases.append(many_case())
    return cases


# ----- contenders --------------------------------------------------------------------


def _optional(module: str) -> Any:
    """An optional peer's module, or None. Imported by name: deepspeed, jax and optax ship no type information."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _torch() -> Any:
    return _optional("torch")


def _deepspeed_cpu_adam() -> Any:
    """DeepSpeed's DeepSpeedCPUAdam class, or None when deepspeed is not importable."""
    adam = _optional("deepspeed.ops.adam")
    return None if adam is None else adam.DeepSpeedCPUAdam


def _optax_ready() -> bool:
    return _optional("jax") is not None and _optional("optax") is not None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _OptaxAdam:
    """One jitted ``optax.adam`` step over the case's tensors, params and state donated."""

    def __init__(self, data: list[tuple[np.ndarray, np.ndarray]]) -> None:
        jax, jnp, optax = _optional("jax"), _optional("jax.numpy"), _optional("optax")
        self._params = [jnp.array(p) for p, _ in data]  # jnp.array copies: JAX owns its buffers
        self._grads = [jnp.array(g) for _, g in data]
        tx = optax.adam(LR)
        self._state = tx.init(self._params)

        def step(params: Any, state: Any, grads: Any) -> Any:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        # Compiled here, not on the first (possibly timed) call.
        self._step = jax.jit(step, donate_argnums=(0, 1)).lower(self._params, self._state, self._grads).compile()
        self._block = jax.block_until_ready

    def __call__(self) -> None:
        self._params, self._state = self._step(self._params, self._state, self._grads)
        self._block(self._params)  # JAX dispatches asynchronously; a training loop waits for its params

    def params(self) -> list[np.ndarray]:
        return [np.asarray(p) for p in self._params]


def _missing_peer(name: str) -> str | None:
    """Why contender ``name`` cannot run here (with the fix), or None."""
    if name in TORCH_CONTENDERS or name == "deepspeed":
        if _torch() is None:
            return f"contender {name!r} needs torch, which is not importable (pip install torch)"
    if name == "deepspeed" and _deepspeed_cpu_adam() is None:
        return "contender 'deepspeed' needs deepspeed, which is not importable (pip install deepspeed)"
    if name == "optax" and not _optax_ready():
        return "contender 'optax' needs jax and optax, which are not importable (pip install jax optax)"
    return None


def check_contenders(names: Sequence[str], threads: int) -> None:
    """Raises ValueError (naming the fix) unless every contender in ``names`` can run here with ``threads``."""
    if not names:
        raise ValueError("no contenders")
    for name in names:
        if name not in CONTENDERS:
            raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
        problem = _missing_peer(name)
        if problem:
            raise ValueError(problem)
        if name == "optax" and threads != _usable_cpus():
            raise ValueError(f"contender 'optax' runs on XLA's pool of one thread per CPU: use threads={_usable_cpus()}, "
                             f"not {threads}, or leave optax out")  # fmt: skip
    if len(set(names)) != len(names):
        raise ValueError("a contender is listed twice")


def available_contenders() -> list[str]:
    """The default contenders that can run here: fastadam and NumPy, plus torch's three when importable."""
    names = ["fastadam", "numpy"]
    if _torch() is not None:
        names += list(TORCH_CONTENDERS)
    return names


def _init_data(case: Case, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(param, grad) per tensor, fp32. Gradients ~ N(0, 1e-2): no denormals in g*g."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in case.shapes:
        p = rng.standard_normal(shape, dtype=np.float32)
        p *= np.float32(0.02)
        g = rng.standard_normal(shape, dtype=np.float32)
        g *= np.float32(1e-2)
        out.append((p, g))
    return out


def _make_contender(name: str, case: Case, data: list[tuple[np.ndarray, np.ndarray]]) -> Callable[[], None]:
    """A zero-argument callable doing one optimizer step on the contender's own copies."""
    if name in ("fastadam", "fastadam_optim", "numpy"):
        params = [p.copy() for p, _ in data]
        grads = [g.copy() for _, g in data]
        if name == "fastadam" and case.kind == "single":
            p, g = params[0], grads[0]
            m, v = np.zeros_like(p), np.zeros_like(p)
            counter = itertools.count(1)
            adam_step = fastadam.adam_step

            def fastadam_single() -> None:
                adam_step(p, g, m, v, step=next(counter), lr=LR)

            return fastadam_single
        if name in ("fastadam", "fastadam_optim"):
            opt = fastadam.Adam(params, lr=LR)

            def fastadam_optim() -> None:
                opt.step(grads)

            return fastadam_optim
        exp_avgs = [np.zeros_like(p) for p in params]
        exp_avg_sqs = [np.zeros_like(p) for p in params]
        counter = itertools.count(1)
        ref_step = reference.adam_step
        quads = list(zip(params, grads, exp_avgs, exp_avg_sqs))

        def numpy_reference() -> None:
            step = next(counter)
            for p, g, m, v in quads:
                ref_step(p, g, m, v, step=step, lr=LR)

        return numpy_reference
    problem = _missing_peer(name)
    if problem:
        raise ValueError(problem)
    if name == "optax":
        return _OptaxAdam(data)
    if name in TORCH_CONTENDERS or name == "deepspeed":
        torch = _torch()
        cpu_adam = _deepspeed_cpu_adam() if name == "deepspeed" else None
        tensors = []
        for p, g in data:
            t = torch.from_numpy(p.copy()).requires_grad_(True)  # own memory: copies, not views of fastadam's arrays
            t.grad = torch.from_numpy(g.copy())
            tensors.append(t)
        if cpu_adam is not None:
            # adamw_mode=False: Adam's L2 weight decay, as torch.optim.Adam (no decay is used here anyway).
            # One tensor per parameter, as a model's parameters are handed to an optimizer. ZeRO-Offload
            # instead hands DeepSpeedCPUAdam one flat buffer per group: that use is the single-tensor cases.
            opt = cpu_adam(tensors, lr=LR, adamw_mode=False)
        else:
            opt = torch.optim.Adam(tensors, lr=LR, **TORCH_CONTENDERS[name])
        return opt.step  # type: ignore[no-any-return]
    raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")


# ----- timing ------------------------------------------------------------------------


def _batch_seconds(fn: Callable[[], None], steps: int) -> float:
    perf = time.perf_counter
    t0 = perf()
    for _ in range(steps):
        fn()
    return perf() - t0


def _settle(fn: Callable[[], None], seconds: float) -> None:
    """Untimed steps for ``seconds`` (at least one)."""
    end = time.perf_counter() + seconds
    fn()
    while time.perf_counter() < end:
        fn()


def _calibrate(fn: Callable[[], None], target: float, max_steps: int = 1 << 20) -> int:
    """Steps per sample so that one sample lasts about ``target`` seconds (at least 1)."""
    steps = 1
    while True:
        elapsed = _batch_seconds(fn, steps)
        if elapsed >= target / 4 or steps >= max_steps:
            return max(1, min(max_steps, round(steps * target / max(elapsed, 1e-9))))
        steps = min(max_steps, steps * max(2, min(64, int(target / 4 / max(elapsed, 1e-9)) + 1)))


def _loop_overhead(target: float = 0.005) -> float:
    """Seconds per iteration of the timing loop around a no-op call (included in every small-case time)."""

    def noop() -> None:
        pass

    steps = _calibrate(noop, target)
    return min(_batch_seconds(noop, steps) for _ in range(3)) / steps


def _set_threads(threads: int) -> Callable[[], None]:
    """Sets fastadam's and torch's thread counts; returns a function that restores them."""
    fastadam.set_num_threads(threads)
    torch = _torch()
    torch_before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)

    def restore() -> None:
        fastadam.set_num_threads(0)
        if torch is not None and torch_before is not None:
            torch.set_num_threads(torch_before)

    return restore


def run(
    cases: Sequence[Case],
    threads: int = 2,
    repeats: int = 11,
    contenders: Sequence[str] | None = None,
    *,
    warmup: int = 2,
    min_sample_time: float = 0.05,
    settle_time: float = 0.01,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    stream_bin: str | None = None,
    stream_min_elements: int = 10_000_000,
) -> list[dict[str, Any]]:
    """Times every contender on every case, interleaved; returns one dict per case.

    Each dict: ``case``, ``kind``, ``tensors``, ``elements``, ``bytes_per_step``, ``threads``,
    ``contenders`` (name -> ``median_s``, ``min_s``, ``samples_s`` (per-step seconds of each
    round), ``steps_per_sample``, ``gbs``), ``ratios`` (peer -> peer median / fastadam median),
    ``paired_ratios`` (peer -> median over rounds of peer / fastadam in the same round) and
    ``fastadam_gbs``. Ratios need "fastadam" among the contenders.

    Before each timed sample, the contender runs untimed for ``settle_time`` seconds (at
    least one step): the previous contender's threads may still be spinning (torch's
    OpenMP threads keep a core busy for milliseconds after a step) and its arrays fill
    the cache. Every contender gets the same settling, so each sample is its steady state.

    With ``stream_bin`` (bench/cpp's ``fastadam_bench``), cases of at least
    ``stream_min_elements`` elements also run its STREAM-like loop once per round, in the
    rotation like a contender (on min(elements, 5e7) elements, fastadam's ISA, the same
    threads), and get ``bound``: ``median_gbs``, ``samples_gbs``, ``elements`` and
    ``fastadam_fraction`` (median over rounds of fastadam's GB/s / the bound's in that round).
    """
    names = list(contenders) if contenders is not None else available_contenders()
    check_contenders(names, threads)
    if threads < 1 or repeats < 1 or warmup < 0 or not min_sample_time > 0 or not settle_time >= 0:
        raise ValueError("need threads >= 1, repeats >= 1, warmup >= 0, min_sample_time > 0 and settle_time >= 0")

    say = progress or (lambda _msg: None)
    restore = _set_threads(threads)
    gc_was_enabled = gc.isenabled()
    results = []
    try:
        for case in cases:
            say(f"{case.name}: {case.tensors} tensor(s), {case.elements:,} elements")
            data = _init_data(case, seed)
            fns = {name: _make_contender(name, case, data) for name in names}
            del data
            gc.collect()
            steps = {}
            for name, fn in fns.items():
                for _ in range(warmup):
                    fn()
                steps[name] = _calibrate(fn, min_sample_time)
            samples: dict[str, list[float]] = {name: [] for name in names}
            order: list[str] = list(names)
            probe_n = min(case.elements, STREAM_PROBE_MAX_ELEMENTS)
            bound_samples: list[float] = []
            if stream_bin and case.elements >= stream_min_elements:
                order.append(_BOUND)
            gc.disable()
            try:
                for r in range(repeats):
                    k = r % len(order)
                    for name in order[k:] + order[:k]:  # rotating order: every contender follows every other
                        if name == _BOUND:
                            assert stream_bin is not None
                            bound_samples.append(stream_probe(stream_bin, threads, probe_n))
                        else:
                            _settle(fns[name], settle_time)
                            samples[name].append(_batch_seconds(fns[name], steps[name]) / steps[name])
            finally:
                if gc_was_enabled:
                    gc.enable()
            del fns
            gc.collect()
            results.append(_summarise(case, threads, names, samples, steps))
            if bound_samples:
                results[-1]["bound"] = _bound_summary(results[-1], bound_samples, probe_n, samples.get("fastadam"))
            say("  " + ", ".join(f"{n} {_fmt_time(results[-1]['contenders'][n]['median_s'])}" for n in names))
    finally:
        restore()
    return results


_BOUND = "\0bound"
STREAM_PROBE_MAX_ELEMENTS = 50_000_000


def stream_probe(binary: str, threads: int, n: int, min_time: float = 0.1, isa: str | None = None) -> float:
    """GB/s of bench/cpp's STREAM-like in-place read-4/write-3 loop on n fp32 elements (one run of ``binary``)."""
    isa = isa or fastadam.get_isa()
    cmd = [binary, f"--sizes={n}", f"--threads={threads}", f"--benchmark_filter=^stream/{isa}/threads:{threads}/n:{n}/",
           f"--benchmark_min_time={min_time}", "--benchmark_format=json"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    runs = [b for b in json.loads(out).get("benchmarks", []) if "bytes_per_second" in b]
    if not runs:
        raise RuntimeError(f"{' '.join(cmd)}: no stream benchmark ran")
    return max(float(b["bytes_per_second"]) for b in runs) / 1e9


def _bound_summary(result: dict[str, Any], gbs: list[float], n: int, fastadam_samples: list[float] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"median_gbs": statistics.median(gbs), "samples_gbs": gbs, "elements": n, "source": "interleaved"}
    if fastadam_samples:
        nbytes = result["bytes_per_step"]
        out["fastadam_fraction"] = statistics.median(nbytes / t / 1e9 / b for t, b in zip(fastadam_samples, gbs))
    return out


def _summarise(case: Case, threads: int, names: list[str], samples: dict[str, list[float]], steps: dict[str, int]) -> dict[str, Any]:
    nbytes = BYTES_PER_ELEMENT * case.elements
    out: dict[str, Any] = {
        "case": case.name,
        "kind": case.kind,
        "tensors": case.tensors,
        "elements": case.elements,
        "bytes_per_step": nbytes,
        "threads": threads,
        "contenders": {},
        "ratios": {},
        "paired_ratios": {},
    }
    for name in names:
        med = statistics.median(samples[name])
        out["contenders"][name] = {
            "median_s": med,
            "min_s": min(samples[name]),
            "samples_s": samples[name],
            "steps_per_sample": steps[name],
            "gbs": nbytes / med / 1e9,
        }
    if "fastadam" in names:
        fa = out["contenders"]["fastadam"]["median_s"]
        out["fastadam_gbs"] = out["contenders"]["fastadam"]["gbs"]
        for name in names:
            if name != "fastadam":
                out["ratios"][name] = out["contenders"][name]["median_s"] / fa
                out["paired_ratios"][name] = statistics.median(p / f for p, f in zip(samples[name], samples["fastadam"]))
    return out


# ----- reporting ---------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs" if s < 1e-4 else f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 1e-1 else f"{s * 1e3:.0f} ms"
    return f"{s:.3g} s"


def format_table(results: Sequence[dict[str, Any]], bound_gbs: float | None = None) -> str:
    """A fixed-width table: median time per step per contender, peer/fastadam ratios, fastadam GB/s."""
    if not results:
        return "(no results)"
    names = list(results[0]["contenders"])
    peers = [n for n in names if n != "fastadam"] if "fastadam" in names else []
    header = ["case", "tensors"] + [LABELS[n] for n in names] + [f"x {LABELS[p]}" for p in peers]
    interleaved = any("bound" in r for r in results)
    if "fastadam" in names:
        header.append("fastadam GB/s")
        if bound_gbs or interleaved:
            header.append("% of bound")
        if interleaved:
            header.append("bound GB/s")
    rows = [header]
    for r in results:
        row = [r["case"], str(r["tensors"])]
        row += [_fmt_time(r["contenders"][n]["median_s"]) for n in names]
        row += [f"{r['ratios'][p]:.2f}" for p in peers]
        if "fastadam" in names:
            row.append(f"{r['fastadam_gbs']:.1f}")
            if "bound" in r and "fastadam_fraction" in r["bound"]:
                row.append(f"{100 * r['bound']['fastadam_fraction']:.0f}%")
            elif bound_gbs:
                row.append(f"{100 * r['fastadam_gbs'] / bound_gbs:.0f}%")
            elif interleaved:
                row.append("")
            if interleaved:
                row.append(f"{r['bound']['median_gbs']:.1f}" if "bound" in r else "")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = ["time = median per step; x peer = peer time / fastadam time (> 1: fastadam faster); GB/s at 28 B/element"]
    if interleaved:
        notes.append("bound GB/s: STREAM-like in-place read-4/write-3 loop run in the same rounds; "
                     "% of bound = median over rounds of fastadam GB/s / bound GB/s")
    if bound_gbs:
        notes.append(f"{'other cases: ' if interleaved else ''}bound = {bound_gbs:.1f} GB/s (STREAM-like in-place read-4/write-3 loop)")
    if peers and len(results[0].get("paired_ratios", {})) == len(peers):
        paired = ", ".join(f"{r['case']}: " + "/".join(f"{r['paired_ratios'][p]:.2f}" for p in peers) for r in results)
        notes.append(f"paired ratios (median over rounds of peer/fastadam, {'/'.join(LABELS[p] for p in peers)}): {paired}")
    return "\n".join(lines + notes)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl")
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


_PEER_LIBRARIES = (("deepspeed", "deepspeed"), ("optax", "jax"), ("optax", "optax"))  # (contender, library)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """What ran: CPU, cores, memory, library versions, fastadam's ISA, threads, date."""
    torch = _torch()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        **{lib: _installed_version(lib) for _, lib in _PEER_LIBRARIES},
        "fastadam": fastadam.__version__,
        "fastadam_isa": fastadam.get_isa(),
        "fastadam_available_isas": list(fastadam.available_isas()),
        "fastadam_min_elements_per_thread": getattr(getattr(fastadam, "_core", None), "min_elements_per_thread", None),
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


_STREAM_NAME = re.compile(r"^stream/(?P<isa>\w+)/threads:(?P<threads>\d+)/n:(?P<n>\d+)")


def read_stream_bound(path: str, threads: int) -> dict[str, Any]:
    """The STREAM-like bound from a Google Benchmark JSON of bench/cpp's fastadam_bench.

    Takes the ``stream/<isa>/threads:<threads>/n:<n>`` benchmarks of the largest n, the
    median over repetitions (an aggregate when present), and the best path. Returns
    ``{"gbs", "benchmark", "elements", "source"}``.
    """
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    per_name: dict[str, list[float]] = {}
    medians: dict[str, float] = {}
    info: dict[str, tuple[int, str]] = {}
    for b in doc.get("benchmarks", []):
        name = b.get("run_name") or b.get("name", "")
        m = _STREAM_NAME.match(name)
        if not m or int(m["threads"]) != threads or "bytes_per_second" not in b:
            continue
        info[name] = (int(m["n"]), m["isa"])
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = float(b["bytes_per_second"])
        else:
            per_name.setdefault(name, []).append(float(b["bytes_per_second"]))
    for name, values in per_name.items():
        medians.setdefault(name, statistics.median(values))
    if not medians:
        raise ValueError(f"{path}: no stream/<isa>/threads:{threads}/n:<n> benchmark with bytes_per_second")
    largest = max(info[n][0] for n in medians)
    best = max((n for n in medians if info[n][0] == largest), key=lambda n: medians[n])
    return {"gbs": medians[best] / 1e9, "benchmark": best, "elements": largest, "source": os.path.abspath(path)}


def write_json(path: str, results: Sequence[dict[str, Any]], machine: dict[str, Any], bound: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None) -> None:
    doc = {"machine": machine, "config": config or {}, "bound": bound, "results": list(results)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def plot(results: Sequence[dict[str, Any]], path: str, bound_gbs: float | None = None, title: str | None = None) -> None:
    """GB/s (at 28 B/element) vs elements per step for each contender, log-log, with the bound as a line.

    Single tensors are joined by lines; multi-tensor cases are separate markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(results[0]["contenders"]) if results else []
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    markers = ["o", "s", "^", "v", "D", "P"]
    multi_markers = ["*", "X", "h", "p"]
    multi_cases = [r for r in results if r["kind"] == "multi"]
    for i, name in enumerate(names):
        single = sorted((r for r in results if r["kind"] == "single"), key=lambda r: r["elements"])
        color = f"C{i}"
        if single:
            ax.plot([r["elements"] for r in single], [r["contenders"][name]["gbs"] for r in single], marker=markers[i % 6],
                    color=color, label=LABELS[name])
        for j, r in enumerate(multi_cases):
            ax.scatter([r["elements"]], [r["contenders"][name]["gbs"]], marker=multi_markers[j % 4], s=90, color=color,
                       edgecolors="black", linewidths=0.5, zorder=3, label=None if single else LABELS[name])
    for j, r in enumerate(multi_cases):
        ax.scatter([], [], marker=multi_markers[j % 4], s=90, color="white", edgecolors="black",
                   label=f"{r['case']} ({r['tensors']} tensors)")
    probed = [r for r in results if "bound" in r]
    if probed:
        ax.scatter([r["elements"] for r in probed], [r["bound"]["median_gbs"] for r in probed], marker="_", s=400, color="black",
                   linewidths=2, zorder=4, label="STREAM-like loop, same rounds")
        if not bound_gbs:
            bound_gbs = statistics.median(r["bound"]["median_gbs"] for r in probed)
    if bound_gbs:
        ax.axhline(bound_gbs, color="black", linestyle="--", linewidth=1, label=f"STREAM-like bound {bound_gbs:.1f} GB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda y, _pos: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("elements per step (fp32)")
    ax.set_ylabel("effective GB/s (28 B/element)")
    threads = results[0]["threads"] if results else None
    ax.set_title(title or f"Adam step, fp32, {threads} thread(s): effective bandwidth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----- command line ------------------------------------------------------------------


def _parse_sizes(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        value = float(item.strip())
        if not value >= 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"bad size {item!r}: a whole number >= 1 (1e6 is fine)")
        out.append(int(value))
    return out


def _parse_names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for fastadam, torch and DeepSpeed (default 2; optax always uses every CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds; the median is reported (default 11, quick 3)")
    ap.add_argument("--quick", action="store_true", help="small sizes and the 1000 x 1000 case only, few repeats (CI smoke)")
    ap.add_argument("--sizes", type=_parse_sizes, default=None, help="single-tensor sizes, e.g. 1e3,1e6,5e7")
    ap.add_argument("--cases", type=_parse_names, default=None, help="case groups: single,gpt2,many (default all; quick: single,many)")
    ap.add_argument("--contenders", type=_parse_names, default=None,
                    help=f"comma list from {', '.join(CONTENDERS)} (default: {', '.join(DEFAULT_CONTENDERS)}, torch ones if importable)")
    ap.add_argument("--min-sample-time", type=float, default=None, help="seconds per timed batch (default 0.05, quick 0.01)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before calibration (default 2)")
    ap.add_argument("--settle-time", type=float, default=0.01,
                    help="untimed seconds (at least one step) before each timed sample, so the previous contender's "
                         "spinning threads and cache contents do not bill the next (default 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write results and the machine description as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s vs size (needs matplotlib)")
    ap.add_argument("--bound-gbs", type=float, default=None, help="measured bandwidth bound in GB/s (for %% of bound and the plot)")
    ap.add_argument("--stream-bin", metavar="PATH",
                    help="bench/cpp's fastadam_bench: run its STREAM-like loop in every round of the cases of >= 1e7 elements")
    ap.add_argument("--stream-json", metavar="PATH",
                    help="Google Benchmark JSON from fastadam_bench; the bound is its stream/<isa>/threads:<threads> at the largest n")
    args = ap.parse_args(argv)

    if args.threads < 1:
        ap.error("--threads must be >= 1")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 11)
    min_sample_time = args.min_sample_time if args.min_sample_time is not None else (0.01 if args.quick else 0.05)
    try:
        cases = default_cases(args.quick, args.sizes, args.cases)
    except ValueError as e:
        ap.error(str(e))
    contenders = args.contenders if args.contenders is not None else available_contenders()
    try:
        check_contenders(contenders, args.threads)
    except ValueError as e:
        ap.error(str(e))

    bound: dict[str, Any] | None = None
    if args.stream_json:
        bound = read_stream_bound(args.stream_json, args.threads)
    if args.bound_gbs is not None:
        bound = {"gbs": args.bound_gbs, "source": "--bound-gbs"}
    bound_gbs = bound["gbs"] if bound else None

    machine = machine_info(args.threads)
    print(f"# {machine['cpu_model']}, {machine['usable_cpus']} CPU(s); fastadam {machine['fastadam']} ({machine['fastadam_isa']}), "
          f"numpy {machine['numpy']}, torch {machine['torch'] or 'not installed'}"
          + "".join(f", {lib} {machine[lib]}" for name, lib in _PEER_LIBRARIES if name in contenders)
          + f"; {args.threads} thread(s), "
          f"{repeats} interleaved rounds, {machine['date']}")
    if bound:
        print(f"# bound: {bound['gbs']:.1f} GB/s ({bound.get('benchmark', bound['source'])})")
    overhead = _loop_overhead()
    results = run(cases, args.threads, repeats, contenders, warmup=args.warmup, min_sample_time=min_sample_time,
                  settle_time=args.settle_time, seed=args.seed,
                  progress=lambda msg: print(msg, file=sys.stderr, flush=True), stream_bin=args.stream_bin)
    print(format_table(results, bound_gbs))
    print(f"(timing loop overhead per call, included above: {_fmt_time(overhead)})")
    if args.json:
        config = {"argv": list(sys.argv[1:] if argv is None else argv), "repeats": repeats, "min_sample_time": min_sample_time,
                  "warmup": args.warmup, "settle_time_s": args.settle_time, "seed": args.seed, "contenders": contenders, "lr": LR, "dtype": "float32",
                  "bytes_per_element": BYTES_PER_ELEMENT, "loop_overhead_s": overhead}
        write_json(args.json, results, machine, bound, config)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, bound_gbs)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
