"""The benchmark's cases: the parameter shapes of one optimizer step (see bench.py); and the
interleaved timing the focused benchmarks share."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

BYTES_PER_ELEMENT = 28  # fp32 Adam: reads param, grad, exp_avg, exp_avg_sq (16 B), writes 3 (12 B)
SINGLE_SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000)
QUICK_SIZES = (1_000, 10_000, 100_000)


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


def interleaved(steps: dict[str, Callable[[], object]], rounds: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per step of each contender, and every sample: contenders interleaved in
    every round after two warm-up steps each. In a round each contender's timed step follows
    an untimed one of its own, which absorbs what the previous contender left running
    (torch's OpenMP threads spin on after its step and take a core from the next one)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times
