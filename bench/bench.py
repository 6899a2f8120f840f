#!/usr/bin/env python3
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
    python bench/bench.py --stream-bin build/bench/bench/cpp/fastadam_bench --json out.json --plot out.png
    python bench/bench.py --contenders fastadam,torch_fused,deepspeed,optax   # with the opt-in peers

Modules (run from a clone, against the installed fastadam): ``cases.py`` (what is
stepped), ``contenders.py`` (who steps it), this file (the interleaved timing and the
command line), ``report.py`` (table, JSON, plot). They import without torch or matplotlib;
the core is ``run(cases, threads, repeats, contenders) -> list[dict]``,
``format_table(results)``, ``machine_info(threads)``. From elsewhere, put ``bench/`` on
``sys.path`` and ``import bench``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import contenders
from cases import BYTES_PER_ELEMENT, QUICK_SIZES, SINGLE_SIZES, Case, default_cases, gpt2_small_case, gpt2_small_shapes, many_case, single_case
from contenders import (
    CONTENDERS,
    DEFAULT_CONTENDERS,
    LABELS,
    LR,
    TORCH_CONTENDERS,
    _init_data,
    _make_contender,
    _torch,
    _usable_cpus,
    available_contenders,
    check_contenders,
)
from report import _PEER_LIBRARIES, _fmt_time, format_table, machine_info, plot, read_stream_bound, write_json

import fastadam

__all__ = [
    "BYTES_PER_ELEMENT",
    "SINGLE_SIZES",
    "QUICK_SIZES",
    "CONTENDERS",
    "DEFAULT_CONTENDERS",
    "TORCH_CONTENDERS",
    "LABELS",
    "LR",
    "Case",
    "single_case",
    "gpt2_small_shapes",
    "gpt2_small_case",
    "many_case",
    "default_cases",
    "available_contenders",
    "check_contenders",
    "contenders",
    "run",
    "stream_probe",
    "format_table",
    "machine_info",
    "read_stream_bound",
    "write_json",
    "plot",
    "main",
]


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
