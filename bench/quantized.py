"""8-bit and 4-bit AdamW steps (issue 17): fastadam's one pass against torch's fused fp32 AdamW,
bitsandbytes' CPU AdamW8bit and torchao's AdamW8bit.

fp32 params and gradients, 2 threads each side, every contender on its own copy of the params
(the gradients, read only, are shared), rounds interleaved, medians (docs/design.md,
"Quantized states"). Contenders:

* ``fastadam 8-bit`` / ``fastadam 4-bit``: ``fastadam.AdamW8bit`` / ``AdamW4bit`` (params of
  4096+ elements quantized, smaller ones fp32, as bitsandbytes and torchao);
* ``8-bit functional`` / ``4-bit functional``: one ``fastadam.adam_step_multi`` call on the same
  layout (QuantizedState states), without the optimizer class around it;
* ``fastadam fp32``: ``fastadam.AdamW``; ``torch fused fp32``: ``torch.optim.AdamW(fused=True)``;
* ``bnb 8-bit`` (``--peers`` or ``--contenders``): ``bitsandbytes.optim.AdamW8bit`` on the CPU;
* ``torchao 8-bit`` (likewise): ``torchao.optim.AdamW8bit`` (it quantizes tensors of 4096+
  elements whose size is a multiple of 256: single-tensor sizes are rounded down to one),
  which runs on the CPU through
  ``torch.compile`` (one compile per param shape): its compile time, the first step's time
  less a median step, is reported apart from the step.

Bytes per element: ``state B``, the optimizer state's memory per param; ``traffic B``, what
the step's layout must read and write per element (fp32: 16 read + 12 written; 8-bit: param,
grad and two codes read, param and two codes written, plus the absmax: 16.06; 4-bit: 14.1);
GB/s = elements * traffic / time (bitsandbytes' and torchao's own passes move more than their
layout's minimum: their GB/s is at that minimum).

    python bench/quantized.py                            # 5e7 elements and GPT-2 small, fastadam and torch
    python bench/quantized.py --peers                    # and bitsandbytes, torchao (pip install bitsandbytes torchao)
    python bench/quantized.py --cases 5e7 --rounds 21 --json out.json
    python bench/quantized.py --quick                    # CI smoke run: small sizes, a few rounds
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import fastadam
from fastadam.quantized import QUANT_BLOCK, QuantizedState

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cases import gpt2_small_shapes, interleaved  # noqa: E402

LR, WEIGHT_DECAY, MIN_SIZE = 1e-4, 0.01, 4096
CONTENDERS = ("fastadam 8-bit", "8-bit functional", "fastadam 4-bit", "4-bit functional", "fastadam fp32",
              "torch fused fp32", "bnb 8-bit", "torchao 8-bit")  # fmt: skip
DEFAULT = CONTENDERS[:6]
PEERS = {"bnb 8-bit": "bitsandbytes", "torchao 8-bit": "torchao.optim"}

Step = Callable[[], object]


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def state_bytes(name: str, shapes: list[tuple[int, ...]]) -> float:
    """Optimizer-state bytes per param of ``name``'s layout on these shapes."""
    bits = 8 if "8-bit" in name else 4 if "4-bit" in name else 0
    total = n_all = 0
    for s in shapes:
        n = math.prod(s)
        n_all += n
        quantized = bits and n >= MIN_SIZE and (name != "torchao 8-bit" or n % 256 == 0)  # torchao: whole blocks only
        total += 2 * (n * bits / 8 + 4 * -(-n // QUANT_BLOCK[bits])) if quantized else 8 * n
    return total / n_all


def traffic_bytes(name: str, shapes: list[tuple[int, ...]]) -> float:
    """Bytes the step's layout reads and writes per element: param and grad (fp32), then the
    states twice (read and written): 8 bytes each in fp32, or codes plus absmax."""
    return 4 + 4 + 4 + 2 * state_bytes(name, shapes)


def contenders(names: list[str], shapes: list[tuple[int, ...]], compile_times: dict[str, float]) -> dict[str, Step]:
    rng = np.random.default_rng(0)
    params0 = [rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2) for s in shapes]
    out: dict[str, Step] = {}
    torch = _optional("torch") if any(n in names for n in ("torch fused fp32", *PEERS)) else None
    for name in names:
        params = [p.copy() for p in params0]
        if name in ("fastadam 8-bit", "fastadam 4-bit", "fastadam fp32"):
            cls = {"fastadam 8-bit": fastadam.AdamW8bit, "fastadam 4-bit": fastadam.AdamW4bit, "fastadam fp32": fastadam.AdamW}[name]
            opt = cls(params, lr=LR, weight_decay=WEIGHT_DECAY)
            out[name] = lambda opt=opt: opt.step(grads)
        elif name in ("8-bit functional", "4-bit functional"):
            bits = 8 if name.startswith("8") else 4
            n = [p.size for p in params]
            m = [QuantizedState.zeros(k, bits=bits, signed=True) if k >= MIN_SIZE else np.zeros(k, np.float32).reshape(p.shape)
                 for k, p in zip(n, params)]  # fmt: skip
            v = [QuantizedState.zeros(k, bits=bits, signed=False) if k >= MIN_SIZE else np.zeros(k, np.float32).reshape(p.shape)
                 for k, p in zip(n, params)]  # fmt: skip
            count = [0]

            def functional(params: list[np.ndarray] = params, m: list[Any] = m, v: list[Any] = v, count: list[int] = count) -> object:
                count[0] += 1
                return fastadam.adam_step_multi(params, grads, m, v, steps=count[0], lr=LR, weight_decay=WEIGHT_DECAY,
                                                decoupled_weight_decay=True)  # fmt: skip

            out[name] = functional
        else:
            if torch is None:
                raise SystemExit(f"contender {name!r} needs torch: pip install torch==2.13.0")
            tensors = []
            for p, g in zip(params, grads):
                t = torch.nn.Parameter(torch.from_numpy(p))
                t.grad = torch.from_numpy(g)  # shared, read only
                tensors.append(t)
            if name == "torch fused fp32":
                opt = torch.optim.AdamW(tensors, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
            else:
                module = _optional(PEERS[name])
                if module is None:
                    raise SystemExit(f"contender {name!r} needs {PEERS[name].split('.')[0]}: pip install torch==2.13.0 "
                                     "bitsandbytes==0.50.2 torchao==0.18.0")  # fmt: skip
                opt = (module.optim.AdamW8bit if name == "bnb 8-bit" else module.AdamW8bit)(tensors, lr=LR, weight_decay=WEIGHT_DECAY)
            if name == "torchao 8-bit":
                start = time.perf_counter()
                opt.step()  # compiles, once per param shape
                compile_times[name] = time.perf_counter() - start
            out[name] = opt.step
    return out


def report(title: str, shapes: list[tuple[int, ...]], medians: dict[str, float], compile_times: dict[str, float]) -> list[dict[str, Any]]:
    n = sum(math.prod(s) for s in shapes)
    ref = medians.get("fastadam 8-bit", next(iter(medians.values())))
    print(f"\n{title}: {len(shapes)} tensors, {n:,} elements, medians")
    print("| contender | ms | x fastadam 8-bit | state B/param | traffic B/elem | GB/s | compile s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name, t in medians.items():
        traffic = traffic_bytes(name, shapes)
        compiled = compile_times.get(name)
        if compiled is not None:
            compiled = max(compiled - t, 0.0)
        rows.append({"case": title, "contender": name, "seconds": t, "state_bytes": state_bytes(name, shapes), "traffic_bytes": traffic,
                     "gbs": n * traffic / t / 1e9, "compile_seconds": compiled})  # fmt: skip
        print(f"| {name} | {t * 1e3:.2f} | {t / ref:.2f}x | {state_bytes(name, shapes):.2f} | {traffic:.2f} | "
              f"{n * traffic / t / 1e9:.1f} | {'-' if compiled is None else f'{compiled:.1f}'} |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="5e7,gpt2", help="comma-separated: single-tensor sizes (e.g. 5e7) and/or gpt2 (default 5e7,gpt2)")
    ap.add_argument("--contenders", default=None, help=f"comma-separated, of: {', '.join(CONTENDERS)} (default: the first six)")
    ap.add_argument("--peers", action="store_true", help="add bitsandbytes' and torchao's AdamW8bit")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: one 2e5-element tensor and 20 GPT-2-like tensors, 3 rounds")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    names = list(DEFAULT) if args.contenders is None else [c.strip() for c in args.contenders.split(",") if c.strip()]
    if args.peers:
        names += [p for p in PEERS if p not in names]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contender(s) {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be >= 1")
    torch = _optional("torch")
    if torch is None:
        names = [n for n in names if n not in ("torch fused fp32", *PEERS)]
    else:
        torch.set_num_threads(args.threads)
    fastadam.set_num_threads(args.threads)
    cases: list[tuple[str, list[tuple[int, ...]]]] = []
    if args.quick:
        cases = [("1 x 200k", [(200_000,)]), ("20 GPT-2-like tensors", [(768, 64), (768,), (64, 256), (256,)] * 5)]
        args.rounds = min(args.rounds, 3)
    else:
        for case in args.cases.split(","):
            case = case.strip()
            if case == "gpt2":
                cases.append(("GPT-2 small", gpt2_small_shapes()))
            else:
                try:
                    n = int(float(case))
                except ValueError:
                    ap.error(f"--cases: {case!r} is neither a size nor gpt2")
                n -= n % 256  # whole 256-element blocks: torchao quantizes only such tensors (5e7 -> 49,999,872)
                cases.append((f"1 x {n:,}", [(n,)]))
    print(f"fastadam {fastadam.__version__}, ISA {fastadam.get_isa()}, {args.threads} threads"
          + (f", torch {torch.__version__}" if torch is not None else ", no torch"))  # fmt: skip
    rows = []
    for title, shapes in cases:
        compile_times: dict[str, float] = {}
        steps = contenders(names, shapes, compile_times)
        medians, _ = interleaved(steps, args.rounds)
        rows += report(title, shapes, medians, compile_times)
        del steps
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "isa": fastadam.get_isa(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
