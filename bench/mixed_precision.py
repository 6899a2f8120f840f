"""Mixed-precision Adam steps: fastadam's one pass against torch's (and DeepSpeed's) pipelines.

Cases (2 threads each side, interleaved rounds, medians; docs/performance.md, "Mixed precision"):

* ``offload``: GPT-2 small's 148 tensors (124M parameters) as a ZeRO-Offload / FSDP-offload
  step keeps them: fp32 master weights and states, bf16 gradients, the bf16 model written
  back, loss scale 1024, ``max_grad_norm`` 1. fastadam: one ``adam_step_multi`` call
  (a read-only norm pass, then the fused Adam pass). torch: its fastest pipeline for the
  job: ``_foreach_copy_`` widens the bf16 grads into the masters' fp32 ``.grad``,
  ``_amp_foreach_non_finite_check_and_unscale_`` unscales them (GradScaler.unscale_),
  ``clip_grad_norm_(foreach=True)``, ``AdamW(fused=True).step()``, ``_foreach_copy_`` into
  the bf16 params. DeepSpeed (``--deepspeed``): the same pipeline with
  ``DeepSpeedCPUAdam(adamw_mode=True)`` as the step.
* ``bf16-states``: one tensor, fp32 params and grads, bf16 ``exp_avg``/``exp_avg_sq``
  (``fastadam.AdamW(state_dtype=bfloat16)``; also ``adam_step`` on states from ``np.zeros``),
  against torch's fused AdamW on fp32 (torch has no bf16 states for fp32 params).
* ``all-bf16``: one tensor, bf16 params, grads and states, against torch's fused AdamW on
  bf16 params (its states are bf16 too).
* ``norm``: the global-norm pass alone (an inf gradient makes the step skip after it),
  fp32 and bf16 gradients, against the offload step's Adam pass on the same size.
* ``modes``: every mode of ``fastadam.AdamW`` on one tensor, its bytes per element and
  GB/s, and its time against the plain fp32 step's in the same rounds (MODES below).
* ``optimizers``: the cost of the optimizer classes around the kernel, on GPT-2 small's
  shapes and on 1000 tensors of 1000 elements: bf16 params with fp32 master weights and
  max_grad_norm through ``adam_step_multi``, ``fastadam.AdamW`` and
  ``fastadam.torch.AdamW``; and ``fastadam.torch.AdamW`` on a bf16 model (bf16 states, as
  torch) against ``torch.optim.AdamW(fused=True)``.

    python bench/mixed_precision.py                     # every case (offload holds ~5 GB)
    python bench/mixed_precision.py --cases all-bf16 --sizes 1e6,5e7 --rounds 21
    python bench/mixed_precision.py --deepspeed         # adds DeepSpeed to offload (compiles its op once)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np

import fastadam

try:
    import ml_dtypes
    import torch
except ImportError as error:
    sys.exit(f"bench/mixed_precision.py needs torch and ml_dtypes: pip install torch==2.13.0 ml_dtypes ({error})")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cases import gpt2_small_shapes, interleaved  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
LR, WEIGHT_DECAY, GRAD_SCALE, MAX_GRAD_NORM = 1e-4, 0.01, 1024.0, 1.0
# Bytes each pass moves per element (reads + writes, no write-allocate), fastadam's modes.
BYTES = {"offload": 2 + 28, "bf16-states": 20, "all-bf16": 14, "norm": 2, "modes": 0, "optimizers": 0}
# --cases modes: name -> (param, grad dtype, AdamW keywords, step keywords, bytes per element:
# reads + writes of the Adam pass, plus the norm pass's read of the gradients when it runs).
MODES: dict[str, tuple[str, str, dict[str, object], dict[str, object], int]] = {
    "fp32": ("f32", "f32", {}, {}, 16 + 12),
    "fp32, bf16 grads": ("f32", "bf16", {}, {}, 14 + 12),
    "fp32, bf16 states": ("f32", "f32", {"state_dtype": BF16}, {}, 12 + 8),
    "fp32, bf16 out (params_out)": ("f32", "f32", {}, {"out": True}, 16 + 14),
    "bf16 params, fp32 states": ("bf16", "bf16", {}, {}, 12 + 10),
    "bf16 params, stochastic rounding": ("bf16", "bf16", {"stochastic_rounding": True}, {}, 12 + 10),
    "all bf16": ("bf16", "bf16", {"state_dtype": BF16}, {}, 8 + 6),
    "bf16 master weights": ("bf16", "bf16", {"master_weights": True}, {}, 14 + 14),
    "master + grad_scale + max_grad_norm": ("bf16", "bf16", {"master_weights": True, "max_grad_norm": 1.0},
                                            {"grad_scale": GRAD_SCALE}, 2 + 14 + 14),
    "fp16 master weights": ("f16", "f16", {"master_weights": True}, {}, 14 + 14),
    "all fp16": ("f16", "f16", {"state_dtype": np.float16}, {}, 8 + 6),
}

Step = Callable[[], object]


def _data(shapes: list[tuple[int, ...]], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s, dtype=np.float32) * np.float32(0.02), rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2))
            for s in shapes]  # fmt: skip


def offload_contenders(shapes: list[tuple[int, ...]], deepspeed: bool) -> dict[str, Step]:
    data = _data(shapes)
    out: dict[str, Step] = {}

    # fastadam: fp32 masters and states, bf16 grads (scaled), the bf16 model written in the same pass.
    masters = [p.copy() for p, _ in data]
    grads = [(g * np.float32(GRAD_SCALE)).astype(BF16) for _, g in data]
    exp_avgs = [np.zeros_like(p) for p in masters]
    exp_avg_sqs = [np.zeros_like(p) for p in masters]
    model = [p.astype(BF16) for p in masters]
    count = [0]

    def fastadam_step() -> object:
        count[0] += 1
        return fastadam.adam_step_multi(masters, grads, exp_avgs, exp_avg_sqs, steps=count[0], lr=LR, weight_decay=WEIGHT_DECAY,
                                        decoupled_weight_decay=True, params_out=model, grad_scale=GRAD_SCALE,
                                        max_grad_norm=MAX_GRAD_NORM)  # fmt: skip

    out["fastadam"] = fastadam_step

    def pipeline(make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> Step:
        t_masters = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p, _ in data]
        for p in t_masters:
            p.grad = torch.zeros_like(p)
        t_model = [p.detach().to(torch.bfloat16) for p in t_masters]
        t_grads = [torch.from_numpy(g * np.float32(GRAD_SCALE)).to(torch.bfloat16) for _, g in data]
        master_grads = [p.grad for p in t_masters]
        found_inf, inv_scale = torch.zeros(1), torch.full((1,), 1.0 / GRAD_SCALE)
        opt = make_optimizer(t_masters)

        def step() -> object:
            torch._foreach_copy_(master_grads, t_grads)
            found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(master_grads, found_inf, inv_scale)
            if found_inf.item():
                return None
            norm = torch.nn.utils.clip_grad_norm_(t_masters, MAX_GRAD_NORM, foreach=True)
            opt.step()
            torch._foreach_copy_(t_model, [p.detach() for p in t_masters])
            return norm

        return step

    out["torch"] = pipeline(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True))
    if deepspeed:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        out["DeepSpeed"] = pipeline(lambda ps: DeepSpeedCPUAdam(ps, lr=LR, weight_decay=WEIGHT_DECAY, adamw_mode=True))
    return out


def single_contenders(case: str, n: int) -> dict[str, Step]:
    """fastadam.AdamW (its states placed by the optimizer), the functional adam_step on
    states from np.zeros (all four arrays at one page offset: 4K aliasing, docs/performance.md),
    and torch's fused AdamW."""
    ((p0, g0),) = _data([(n,)])
    state_dtype = BF16
    param_dtype = np.dtype(np.float32) if case == "bf16-states" else BF16
    param, grad = p0.astype(param_dtype), g0.astype(param_dtype)
    opt = fastadam.AdamW([param], lr=LR, weight_decay=WEIGHT_DECAY, state_dtype=state_dtype)
    param_f = param.copy()
    exp_avg, exp_avg_sq = np.zeros(n, state_dtype), np.zeros(n, state_dtype)
    count = [0]

    def functional_step() -> object:
        count[0] += 1
        return fastadam.adam_step(param_f, grad, exp_avg, exp_avg_sq, step=count[0], lr=LR, weight_decay=WEIGHT_DECAY,
                                  decoupled_weight_decay=True)  # fmt: skip

    torch_dtype = torch.float32 if case == "bf16-states" else torch.bfloat16
    t_param = torch.nn.Parameter(torch.from_numpy(p0.copy()).to(torch_dtype))
    t_param.grad = torch.from_numpy(g0.copy()).to(torch_dtype)
    t_opt = torch.optim.AdamW([t_param], lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    peer = "torch fused fp32" if case == "bf16-states" else "torch fused bf16"
    return {"fastadam": lambda: opt.step([grad]), "fastadam.adam_step, np.zeros states": functional_step, peer: t_opt.step}


def norm_contenders(n: int) -> dict[str, Step]:
    """fastadam's norm pass alone on fp32 and on bf16 gradients, and the Adam pass of the
    offload layout (fp32 masters and states, bf16 grads and model) for scale."""
    out: dict[str, Step] = {}
    master, exp_avg, exp_avg_sq = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for name, dtype in (("fastadam", BF16), ("norm pass, fp32 grads", np.dtype(np.float32))):
        grad = np.full(n, 1e-2, dtype)
        grad[-1] = np.inf  # the step is skipped after the norm pass
        out[name] = lambda g=grad: fastadam.adam_step(master, g, exp_avg, exp_avg_sq, step=1, grad_scale=GRAD_SCALE)
    grad, model = np.full(n, 1e-2, BF16), np.zeros(n, BF16)
    out["Adam pass, offload layout"] = lambda: fastadam.adam_step(master, grad, exp_avg, exp_avg_sq, step=1, param_out=model)
    return out


def mode_contenders(n: int) -> tuple[dict[str, Step], dict[str, int]]:
    """fastadam.AdamW in every mode of MODES on one tensor of n elements."""
    ((p0, g0),) = _data([(n,)])
    dtypes = {"f32": np.dtype(np.float32), "bf16": BF16, "f16": np.dtype(np.float16)}
    out: dict[str, Step] = {}
    for name, (param_kind, grad_kind, opt_kw, step_kw, _) in MODES.items():
        param, grad = p0.astype(dtypes[param_kind]), (g0 * np.float32(GRAD_SCALE if "grad_scale" in step_kw else 1)).astype(dtypes[grad_kind])
        opt = fastadam.AdamW([param], lr=LR, weight_decay=WEIGHT_DECAY, **opt_kw)  # type: ignore[arg-type]
        outs = [np.zeros(n, BF16)] if step_kw.get("out") else None
        kw = {k: v for k, v in step_kw.items() if k != "out"}
        out["fastadam" if name == "fp32" else name] = lambda o=opt, g=grad, outs=outs, kw=kw: o.step([g], params_out=outs, **kw)
    return out, {("fastadam" if k == "fp32" else k): v[4] for k, v in MODES.items()}


def report_modes(n: int, medians: dict[str, float], nbytes: dict[str, int]) -> None:
    fp32 = medians["fastadam"]
    print(f"\nmodes of fastadam.AdamW, one tensor of {n:,} elements, medians")
    print("| mode | bytes/element | ms | GB/s | time vs fp32 |")
    print("|---|---|---|---|---|")
    for name, t in medians.items():
        print(f"| {'fp32' if name == 'fastadam' else name} | {nbytes[name]} | {t * 1e3:.2f} | {n * nbytes[name] / t / 1e9:.1f} | {t / fp32:.2f} |")


def optimizer_contenders(shapes: list[tuple[int, ...]]) -> tuple[dict[str, Step], dict[str, Step]]:
    """(master weights through the functional call and both optimizer classes; a bf16 model
    through fastadam.torch.AdamW and torch's fused AdamW)."""
    data = _data(shapes)
    model = [p.astype(BF16) for p, _ in data]
    grads = [g.astype(BF16) for _, g in data]
    masters = [m.astype(np.float32) for m in model]
    exp_avgs, exp_avg_sqs = [np.zeros_like(m) for m in masters], [np.zeros_like(m) for m in masters]
    copies = [m.copy() for m in model]
    count = [0]

    def functional() -> object:
        count[0] += 1
        return fastadam.adam_step_multi(masters, grads, exp_avgs, exp_avg_sqs, steps=count[0], lr=LR, weight_decay=WEIGHT_DECAY,
                                        decoupled_weight_decay=True, params_out=copies, max_grad_norm=MAX_GRAD_NORM)  # fmt: skip

    numpy_opt = fastadam.AdamW([m.copy() for m in model], lr=LR, weight_decay=WEIGHT_DECAY, master_weights=True,
                               max_grad_norm=MAX_GRAD_NORM)  # fmt: skip
    import fastadam.torch as ft

    def tensors() -> list[torch.nn.Parameter]:
        out = []
        for m, g in zip(model, grads):
            p = torch.nn.Parameter(torch.from_numpy(m.view(np.int16).copy()).view(torch.bfloat16))
            p.grad = torch.from_numpy(g.view(np.int16).copy()).view(torch.bfloat16)
            out.append(p)
        return out

    torch_master = ft.AdamW(tensors(), lr=LR, weight_decay=WEIGHT_DECAY, master_weights=True, max_grad_norm=MAX_GRAD_NORM)
    masters_case = {"fastadam": functional, "fastadam.AdamW": lambda: numpy_opt.step(grads), "fastadam.torch.AdamW": torch_master.step}
    bf16_model = ft.AdamW(tensors(), lr=LR, weight_decay=WEIGHT_DECAY)
    torch_fused = torch.optim.AdamW(tensors(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return masters_case, {"fastadam": bf16_model.step, "torch fused bf16": torch_fused.step}


def measure(contenders: dict[str, Step], rounds: int) -> dict[str, float]:
    return interleaved(contenders, rounds)[0]


def report(title: str, elements: int, medians: dict[str, float], bytes_per_element: int) -> None:
    fast = medians["fastadam"]
    print(f"\n{title}: {elements:,} elements, medians")
    print("| contender | ms | fastadam's speed-up |")
    print("|---|---|---|")
    for name, t in medians.items():
        print(f"| {name} | {t * 1e3:.2f} | {t / fast:.2f}x |")
    print(f"fastadam: {bytes_per_element} bytes/element, {elements * bytes_per_element / fast / 1e9:.1f} GB/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="offload,bf16-states,all-bf16", help="also: norm, modes, optimizers")
    ap.add_argument("--sizes", default="1e6,5e7", help="single-tensor sizes (default 1e6,5e7)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deepspeed", action="store_true", help="add DeepSpeed's CPUAdam to the offload case")
    args = ap.parse_args()
    cases = args.cases.split(",")
    unknown = set(cases) - set(BYTES)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(BYTES)}")
    torch.set_num_threads(args.threads)
    fastadam.set_num_threads(args.threads)
    print(f"fastadam {fastadam.__version__}, ISA {fastadam.get_isa()}, torch {torch.__version__}, {args.threads} threads")
    for case in cases:
        if case == "optimizers":
            for title, shapes in (("GPT-2 small", gpt2_small_shapes()), ("1000 x 1000", [(1000,)] * 1000)):
                masters_case, model_case = optimizer_contenders(shapes)
                rounds = args.rounds if title.startswith("GPT") else args.rounds * 5
                n = sum(int(np.prod(s)) for s in shapes)
                report(f"bf16 params + fp32 master weights + max_grad_norm, {title} ({len(shapes)} tensors); "
                       "fastadam = adam_step_multi", n, measure(masters_case, rounds), 30)  # fmt: skip
                report(f"bf16 model, bf16 states, {title}; fastadam = fastadam.torch.AdamW", n, measure(model_case, rounds), 14)
                del masters_case, model_case
            continue
        if case == "offload":
            shapes = gpt2_small_shapes()
            contenders = offload_contenders(shapes, args.deepspeed)
            report("offload, GPT-2 small", sum(int(np.prod(s)) for s in shapes), measure(contenders, args.rounds), BYTES[case])
            del contenders
            continue
        for size in args.sizes.split(","):
            n = int(float(size))
            rounds = max(args.rounds, int(args.rounds * 1e7 / n))  # small steps: more rounds, about the same time
            if case == "modes":
                contenders, nbytes = mode_contenders(n)
                report_modes(n, measure(contenders, rounds), nbytes)
                continue
            contenders = norm_contenders(n) if case == "norm" else single_contenders(case, n)
            title = "norm pass alone (fastadam: bf16 gradients)" if case == "norm" else f"{case}, one tensor"
            report(title, n, measure(contenders, rounds), BYTES[case])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
