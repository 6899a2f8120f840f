"""DeepSpeed ZeRO stage 1 and 2 with CPU offload, fastadam.torch.AdamW as the client optimizer
(``zero_force_ds_cpu_optimizer: false``), on 2 CPU processes (DeepSpeed's CPU accelerator,
gloo): ``python distributed_deepspeed_worker.py OUTDIR RANK 2`` with MASTER_ADDR/MASTER_PORT
set. The model, batches and one-process reference are tests/distributed_torch_worker.py's;
fp32, and bf16 (``"bf16": {"enabled": true}``: DeepSpeed keeps fp32 master partitions, which
fastadam steps). Rank 0 writes each case's final params and per-step losses to
OUTDIR/deepspeed.pkl.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

import torch

import distributed_torch_worker as common
import fastadam.torch as fatorch

# (ZeRO stage, the reference case of distributed_torch_worker): fp32, and bf16 (DeepSpeed's
# own fp32 master partitions, which fastadam steps, for a bf16 model)
CASES = {"stage 1": (1, "fp32"), "stage 2": (2, "fp32"), "stage 1, bf16": (1, "bf16-master-ddp"), "stage 2, bf16": (2, "bf16-master-ddp")}


def train(stage: int, case: str, rank: int) -> dict[str, Any]:
    import deepspeed

    dtype = common.CASES[case][0]
    model = common.model_for(case)
    opt = fatorch.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,  # step with the client's optimizer, not DeepSpeedCPUAdam
        "zero_allow_untested_optimizer": True,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    losses = []
    for step in range(common.STEPS):
        x, y = common.batch(step, rank, dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if step == common.STEPS // 2:
            for group in engine.optimizer.param_groups:
                group["lr"] = 5e-3
    return {"params": [p.detach().clone() for p in model.parameters()], "losses": losses,
            "client_optimizer": f"{type(engine.optimizer.optimizer).__module__}.{type(engine.optimizer.optimizer).__name__}",
            "engine_optimizer": type(engine.optimizer).__name__}


def main(outdir: str, rank: str, world: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: train(stage, case, int(rank)) for name, (stage, case) in CASES.items()}
    if rank == "0":
        with open(os.path.join(outdir, "deepspeed.pkl"), "wb") as f:
            pickle.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
