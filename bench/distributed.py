"""fastadam.distributed.ShardedAdamW on GPT-2 small: step time with 1 and 2 ranks (or more),
split into communication and update, and the bytes each rank sends.

The launcher runs ``mpiexec -n N python bench/distributed.py --worker ...`` for each rank
count in turn, ``--rounds`` times (interleaved: 1, 2, 1, 2, ...); each worker builds GPT-2
small's 148 tensors (124M elements), takes ``--warmup`` untimed steps, then times
``--steps`` steps. A step's phases (``ShardedAdam.last_step_times``):

  agree    the validity all-gather (a few hundred bytes)
  grads    the gradient pieces to their owners and the average of this shard (send, receive, sum)
  norm     the norm's block sums and their all-gather (with max_grad_norm / grad_scale)
  update   the fused Adam step on this rank's shard
  params   the updated pieces to every other rank (all-gather)

A phase's time per step is the slowest rank's; the table gives the median over all timed
steps of all rounds. ``fastadam.AdamW`` (one process, the whole model, the same threads as
1 rank) runs in the 1-rank workers as the reference. Threads per rank: cores / N unless
``--threads``.

    python bench/distributed.py                          # 1 and 2 ranks, fp32 and bf16
    python bench/distributed.py --ranks 1,2,3 --modes fp32 --rounds 3
    python bench/distributed.py --modes fp32,8bit        # 8-bit states
    python bench/distributed.py --quick                  # small model, CI smoke run
    python bench/distributed.py --parts                  # the averaging's NumPy variants (one process)

Modes: fp32 (float32 params and gradients), bf16 (bfloat16 params with float32
master weights, bfloat16 gradients, max_grad_norm=1.0) and 8bit (float32 params and
gradients, ShardedAdamW8bit's 8-bit states; its reference fastadam.AdamW8bit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import gpt2_small_shapes  # noqa: E402

PHASES = ("agree", "grads", "norm", "update", "params")
QUICK_SHAPES = [(4096, 256), (256,), (1024, 1024), (1024,)]


def shapes_for(quick: bool) -> list[tuple[int, ...]]:
    return QUICK_SHAPES if quick else gpt2_small_shapes()


def worker(args: argparse.Namespace) -> None:
    import ml_dtypes
    from mpi4py import MPI

    import fastadam
    from fastadam.distributed import ShardedAdamW, ShardedAdamW8bit

    comm = MPI.COMM_WORLD
    fastadam.set_num_threads(args.threads)
    shapes = shapes_for(args.quick)
    bf16 = args.mode == "bf16"
    pdtype = np.dtype(ml_dtypes.bfloat16) if bf16 else np.dtype(np.float32)
    rng = np.random.default_rng(0)  # the same params on every rank, each rank its own gradients
    params = [(rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)).astype(pdtype) for s in shapes]
    rng = np.random.default_rng(1 + comm.rank)
    grads = [(rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2)).astype(pdtype) for s in shapes]
    hyper: dict[str, Any] = {"lr": 1e-4, "master_weights": True, "max_grad_norm": 1.0} if bf16 else {"lr": 1e-4}
    quantized = args.mode == "8bit"
    opt = (ShardedAdamW8bit if quantized else ShardedAdamW)(params, comm=comm, **hyper)
    for _ in range(args.warmup):
        opt.step(grads)
    rows = []
    for _ in range(args.steps):
        comm.Barrier()
        t0 = time.perf_counter()
        opt.step(grads)
        total = time.perf_counter() - t0
        rows.append({"total": total, **opt.last_step_times})
    slowest = [{k: max(r[k] for r in ranks) for k in rows[0]} for ranks in zip(*comm.allgather(rows))]
    sizes = [int(np.prod(s)) for s in shapes]
    g = p = pdtype.itemsize
    me = comm.rank
    mine = sum(hi - lo for _, lo, hi in opt.shard)
    total_elements = sum(sizes)
    sent = (total_elements - mine) * g + (comm.size - 1) * mine * p  # others' grad pieces, my pieces to every other rank
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, np.ndarray))
    out: dict[str, Any] = {
        "ranks": comm.size, "threads": args.threads, "mode": args.mode, "elements": total_elements,
        "steps": slowest, "sent_bytes": comm.allgather(sent), "state_bytes": comm.allgather(state),
    }
    if comm.size == 1:  # the reference: fastadam.AdamW on the whole model in one process
        del opt
        ref_params = [q.copy() for q in params]
        ref = (fastadam.AdamW8bit if quantized else fastadam.AdamW)(ref_params, **hyper)
        for _ in range(args.warmup):
            ref.step(grads)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            ref.step(grads)
            times.append(time.perf_counter() - t0)
        out["fastadam.AdamW"] = times
    if me == 0:
        print("RESULT " + json.dumps(out), flush=True)


def parts(args: argparse.Namespace) -> None:
    """The averaging's NumPy variants on half of GPT-2 small (two ranks' pieces of one shard):
    the choices behind fastadam.distributed._BLOCK and _widen_bf16, interleaved, medians."""
    import ml_dtypes

    from fastadam.distributed import _BLOCK, _widen_bf16

    n = sum(int(np.prod(s)) for s in gpt2_small_shapes()) // 2
    rng = np.random.default_rng(0)
    f32 = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)]
    bf16 = [a.astype(ml_dtypes.bfloat16) for a in f32]
    out, scratch, two = np.empty(n, np.float32), np.empty(_BLOCK, np.float32), np.float32(2)

    def whole() -> None:
        np.copyto(out, f32[0])
        np.add(out, f32[1], out=out)
        np.divide(out, two, out=out)

    def blocked_copy() -> None:
        for a in range(0, n, _BLOCK):
            o = out[a : a + _BLOCK]
            np.copyto(o, f32[0][a : a + _BLOCK])
            np.add(o, f32[1][a : a + _BLOCK], out=o)
            np.divide(o, two, out=o)

    def blocked(size: int = _BLOCK) -> None:  # fastadam.distributed's
        for a in range(0, n, size):
            o = out[a : a + size]
            np.add(f32[0][a : a + size], f32[1][a : a + size], out=o, dtype=np.float32)
            np.divide(o, two, out=o)

    def bf16_cast() -> None:
        for a in range(0, n, _BLOCK):
            o = out[a : a + _BLOCK]
            np.add(bf16[0][a : a + _BLOCK], bf16[1][a : a + _BLOCK], out=o, dtype=np.float32)
            np.divide(o, two, out=o)

    def bf16_shift() -> None:  # fastadam.distributed's
        for a in range(0, n, _BLOCK):
            o = out[a : a + _BLOCK]
            _widen_bf16(bf16[0][a : a + _BLOCK], o)
            np.add(o, _widen_bf16(bf16[1][a : a + _BLOCK], scratch[: o.size]), out=o)
            np.divide(o, two, out=o)

    variants = {"fp32, whole arrays (copy, add, divide)": whole, f"fp32, blocks of {_BLOCK} (copy, add, divide)": blocked_copy,
                f"fp32, blocks of {_BLOCK} (add into, divide; used)": blocked,
                f"fp32, blocks of {_BLOCK // 2} (add into, divide)": lambda: blocked(_BLOCK // 2),
                f"fp32, blocks of {_BLOCK * 2} (add into, divide)": lambda: blocked(_BLOCK * 2),
                "bf16, ufunc cast to float32": bf16_cast,
                "bf16, widened by a bit shift (used)": bf16_shift}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds * 3):
        for name, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    print(f"averaging two ranks' {n:,}-element pieces ({args.rounds * 3} interleaved rounds, medians):")
    for name, ts in times.items():
        print(f"  {name:50s} {statistics.median(ts) * 1e3:7.1f} ms")


def launch(args: argparse.Namespace) -> None:
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if mpiexec is None:
        sys.exit('bench/distributed.py needs mpiexec: pip install "fastadam[mpi]" (mpi4py and mpich)')
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = [int(r) for r in args.ranks.split(",")]
    modes = args.modes.split(",")
    collected: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for mode in modes:
            for n in ranks:
                threads = args.threads or max(1, cores // n)
                cmd = [mpiexec, "-launcher", "fork", "-n", str(n), sys.executable, __file__, "--worker", "--mode", mode,
                       "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                if args.quick:
                    cmd.append("--quick")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                if proc.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
                line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
                collected.setdefault((mode, n), []).append(json.loads(line[len("RESULT "):]))
                print(f"round {rnd + 1}/{args.rounds}: {mode}, {n} rank(s) done", file=sys.stderr, flush=True)
    report(collected, args)


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def report(collected: dict[tuple[str, int], list[dict[str, Any]]], args: argparse.Namespace) -> None:
    header = ["mode", "ranks", "threads/rank", "step ms", "comm ms", "update ms", "agree", "grads", "norm", "params",
              "AdamW 1 proc ms", "sent MB/rank", "state MB/rank"]
    rows = []
    for (mode, n), runs in collected.items():
        steps = [s for run in runs for s in run["steps"]]
        med = {k: statistics.median(s[k] for s in steps) for k in ("total", *PHASES)}
        comm = statistics.median(s["agree"] + s["grads"] + s["norm"] + s["params"] for s in steps)
        ref = [t for run in runs for t in run.get("fastadam.AdamW", [])]
        rows.append([
            mode, str(n), str(runs[0]["threads"]), _ms(med["total"]), _ms(comm), _ms(med["update"]),
            *(_ms(med[k]) for k in ("agree", "grads", "norm", "params")),
            _ms(statistics.median(ref)) if ref else "",
            f"{max(runs[0]['sent_bytes']) / 1e6:.0f}", f"{max(runs[0]['state_bytes']) / 1e6:.0f}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(f"\n{args.rounds} interleaved rounds x {args.steps} timed steps (after {args.warmup}); medians; "
          f"{collected[next(iter(collected))][0]['elements']:,} elements; phases are the slowest rank's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma-separated")
    parser.add_argument("--modes", default="fp32,bf16", help="fp32, bf16, 8bit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="fastadam threads per rank (0: cores / ranks)")
    parser.add_argument("--quick", action="store_true", help="a small model, 1 round (CI smoke run)")
    parser.add_argument("--parts", action="store_true", help="time the averaging's NumPy variants instead (one process)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.parts:
        parts(args)
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    launch(args)


if __name__ == "__main__":
    main()
