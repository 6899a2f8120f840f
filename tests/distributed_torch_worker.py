"""The torch.distributed program behind tests/test_distributed_torch.py.

``python distributed_torch_worker.py OUTDIR RANK WORLD_SIZE`` (two such processes, gloo on
localhost through a file store) trains a small MLP with
``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=fastadam.torch.AdamW)``
(or AdamW8bit, AdamW4bit),
each rank on its own batches, in several setups (CASES); ``... OUTDIR reference 1`` trains
the same model in one process, stepping on the average of both ranks' gradients. Rank 0
and the reference write their final params, state and losses to OUTDIR.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

import torch

import fastadam.torch as fatorch

STEPS = 30
WORLD = 2
# name: (model dtype, DDP, ZeRO's parameters_as_bucket_view, fastadam.torch.AdamW keywords)
CASES: dict[str, tuple[torch.dtype, bool, bool, dict[str, Any]]] = {
    "fp32": (torch.float32, False, False, {}),
    "fp32-ddp": (torch.float32, True, False, {}),
    "fp32-ddp-bucket-views": (torch.float32, True, True, {}),  # ZeRO re-points every param.data into a bucket
    "bf16-master-ddp": (torch.bfloat16, True, False, {"master_weights": True}),
    "bf16-ddp": (torch.bfloat16, True, False, {}),  # bf16 params and states, rounded to nearest
    "bf16-master-ddp-clip": (torch.bfloat16, True, False, {"master_weights": True}),
    # 8-bit states for the two larger weights (1472 and 3072 elements), float32 for the rest
    "fp32-ddp-8bit": (torch.float32, True, False, {"min_8bit_size": 1024}),
    "bf16-master-ddp-4bit": (torch.bfloat16, True, False, {"master_weights": True, "min_4bit_size": 1024}),
}
# The fastadam.torch optimizer of each case (AdamW unless named here).
OPTIMIZER = {"fp32-ddp-8bit": fatorch.AdamW8bit, "bf16-master-ddp-4bit": fatorch.AdamW4bit}
# Clipped by the global norm with torch.nn.utils.clip_grad_norm_ before step(), on the full
# (averaged) gradients every rank holds: fastadam.torch's own max_grad_norm would see one
# rank's share of the params only.
CLIP = {"bf16-master-ddp-clip": 0.05}


def model_for(case: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial params on every rank and in the reference
    model = torch.nn.Sequential(
        torch.nn.Linear(23, 64), torch.nn.GELU(), torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 5)
    )
    return model.to(CASES[case][0])


def batch(step: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 23, generator=g).to(dtype), torch.randn(16, 5, generator=g).to(dtype)


def local_grads(model: torch.nn.Module, step: int, rank: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], float]:
    x, y = batch(step, rank, dtype)
    for p in model.parameters():
        p.grad = None
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], float(loss)  # type: ignore[union-attr]


def average(per_rank: list[list[torch.Tensor]], ddp: bool) -> list[torch.Tensor]:
    """As the ranks average: DDP multiplies each gradient by 1/N before its all-reduce sum;
    without DDP the training loop all-reduces (sums) and divides by N. (For two ranks,
    a + b in either order.)"""
    if ddp:
        return [a * (1.0 / WORLD) + b * (1.0 / WORLD) for a, b in zip(*per_rank)]
    return [(a + b) / WORLD for a, b in zip(*per_rank)]


def train(case: str, rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dtype, ddp, bucket_views, kwargs = CASES[case]
    model = model_for(case)
    net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=OPTIMIZER.get(case, fatorch.AdamW), parameters_as_bucket_view=bucket_views, lr=1e-2,
        weight_decay=0.1, **kwargs,
    )
    losses, grads_seen, norms = [], [], []
    for step in range(STEPS):
        x, y = batch(step, rank, dtype)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x).float(), y.float())
        loss.backward()
        if not ddp:
            for p in model.parameters():
                dist.all_reduce(p.grad)  # type: ignore[arg-type]
                p.grad /= world  # type: ignore[operator]
        if case in CLIP:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP[case])))
        grads_seen.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
        opt.step()
        losses.append(float(loss))
        if step == STEPS // 2:
            for group in opt.param_groups:
                group["lr"] = 5e-3  # a schedule's change reaches every rank's fastadam optimizer
    opt.consolidate_state_dict(to=0)
    state = opt.state_dict() if rank == 0 else None
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, [p.detach().clone() for p in model.parameters()])
    same = all(all(torch.equal(bits(a), bits(b)) for a, b in zip(gathered[0], other)) for other in gathered)
    local: list[Any] = [None] * world
    dist.all_gather_object(local, sum(len(g["params"]) for g in opt.optim.param_groups))
    return {"params": [p.detach().clone() for p in model.parameters()], "losses": losses, "grads": grads_seen,
            "state_dict": state, "same_params_on_every_rank": same, "params_per_rank": local, "clip_norms": norms}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def reference(case: str) -> dict[str, Any]:
    """One process: both ranks' batches on one model, their gradients averaged, one fastadam.torch.AdamW."""
    dtype, ddp, _, kwargs = CASES[case]
    model = model_for(case)
    opt = OPTIMIZER.get(case, fatorch.AdamW)(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    losses, grads_seen, norms = [], [], []
    for step in range(STEPS):
        per_rank = [local_grads(model, step, r, dtype) for r in range(WORLD)]
        avg = average([g for g, _ in per_rank], ddp)
        for p, g in zip(model.parameters(), avg):
            p.grad = g
        if case in CLIP:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP[case])))
        grads_seen.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
        opt.step()
        losses.append(per_rank[0][1])
        if step == STEPS // 2:
            for group in opt.param_groups:
                group["lr"] = 5e-3
    return {"params": [p.detach().clone() for p in model.parameters()], "losses": losses, "grads": grads_seen,
            "state_dict": opt.state_dict(), "clip_norms": norms}


def main(outdir: str, rank: str, world: str) -> None:
    torch.set_num_threads(1)  # the same matrix-product order in every process
    results: dict[str, Any] = {}
    if rank == "reference":
        for case in CASES:
            results[case] = reference(case)
        name = "reference.pkl"
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{os.path.join(outdir, 'store')}", rank=int(rank), world_size=int(world))
        for case in CASES:
            results[case] = train(case, int(rank), int(world))
        dist.destroy_process_group()
        name = f"rank{rank}.pkl"
    if rank in ("0", "reference"):
        with open(os.path.join(outdir, name), "wb") as f:
            pickle.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
