"""The MPI program behind tests/test_distributed.py: ``mpiexec -n N python distributed_worker.py OUTDIR``.

Every rank runs the same experiments with fastadam.distributed (each rank its own
gradients, drawn from (case, step, rank)); rank 0 writes what they produced to
OUTDIR/result-nN.pkl, and the test compares it with one process (fastadam.Adam/AdamW) on
the averaged gradients. The cases and the average live here too, imported by the test.
With 2 ranks, a checkpoint (params and state_dict after 50 steps) goes to OUTDIR; with 3
and 1 ranks, it is loaded and stepped 20 more times.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

import ml_dtypes
import numpy as np

import fastadam

BF16 = np.dtype(ml_dtypes.bfloat16)
# Tensor sizes that put shard cuts inside tensors for 2 and 3 ranks (at multiples of 4096
# from a tensor's start), a one-element and an empty tensor among them.
SHAPES = [(70, 300), (4096,), (1,), (0,), (300,), (64, 130), (20000,)]
STEPS, MORE_STEPS = 50, 20
# name: (optimizer, hyper-parameters, param dtype, gradient dtype, grad_scale)
CASES: dict[str, tuple[str, dict[str, Any], Any, Any, float | None]] = {
    "adamw": ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}, np.float32, np.float32, None),
    # L2 decay, amsgrad, two groups (the second with its own lr), some gradients None
    "adam-l2-amsgrad-groups": ("Adam", {"lr": 3e-3, "weight_decay": 0.01, "amsgrad": True}, np.float32, np.float32, None),
    # bf16 model: fp32 master weights, bf16 (scaled) gradients, loss scaling and clipping
    "bf16-master": ("AdamW", {"lr": 1e-2, "master_weights": True, "max_grad_norm": 2.0}, BF16, BF16, 1024.0),
    # fp32 params, bf16 gradients and bf16 states
    "bf16-grads-states": ("AdamW", {"lr": 1e-2, "state_dtype": BF16}, np.float32, BF16, None),
    # 8-bit states for the params of 300 elements or more (shard cuts inside their blocks' tensors),
    # float32 for the 1- and 0-element ones
    "adamw-8bit": ("AdamW8bit", {"lr": 1e-2, "weight_decay": 0.1, "min_8bit_size": 300}, np.float32, np.float32, None),
    # 4-bit states on a bf16 model with fp32 master weights, loss scaling and clipping
    "adamw-4bit-bf16-master": (
        "AdamW4bit", {"lr": 1e-2, "master_weights": True, "max_grad_norm": 2.0, "min_4bit_size": 300}, BF16, BF16, 1024.0,
    ),
}
SAVED = ("adamw", "bf16-master", "adamw-8bit")  # checkpointed with 2 ranks, continued with 3 and 1


def initial_params(case: str) -> list[np.ndarray]:
    dtype = CASES[case][2]
    rng = np.random.default_rng(12345)
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in SHAPES]


def groups_of(case: str, params: list[np.ndarray]) -> Any:
    if case == "adam-l2-amsgrad-groups":
        return [{"params": params[:3]}, {"params": params[3:], "lr": 1e-2}]
    return params


def grads(case: str, step: int, rank: int) -> list[np.ndarray | None]:
    """Rank `rank`'s gradients at step `step` (0-based): the same on every call."""
    dtype, scale = CASES[case][3], CASES[case][4] or 1.0
    rng = np.random.default_rng([7, list(CASES).index(case), step, rank])
    out: list[np.ndarray | None] = []
    for i, s in enumerate(SHAPES):
        g = rng.standard_normal(s) * (1.0 + 3.0 * i) * scale
        out.append(g.astype(np.float32).astype(dtype))
    if case == "adam-l2-amsgrad-groups" and step % 3 == 1:
        out[1] = out[5] = None  # on every rank alike: those params skip the step
    return out


def average(case: str, step: int, world_size: int) -> list[np.ndarray | None]:
    """The documented average: the ranks' gradients widened to float32, added in rank order, / N."""
    per_rank = [grads(case, step, r) for r in range(world_size)]
    out: list[np.ndarray | None] = []
    for i in range(len(SHAPES)):
        if per_rank[0][i] is None:
            out.append(None)
            continue
        acc = per_rank[0][i].astype(np.float32)  # type: ignore[union-attr]
        for r in range(1, world_size):
            acc = acc + per_rank[r][i].astype(np.float32)  # type: ignore[union-attr]
        out.append(acc / np.float32(world_size))
    return out


def same_bits_np(a: np.ndarray, b: np.ndarray) -> bool:
    return a.tobytes() == b.tobytes()


def build(module: Any, case: str, params: list[np.ndarray], **kwargs: Any) -> Any:
    kind, hyper = CASES[case][0], CASES[case][1]
    name = kind if module is fastadam else "Sharded" + kind
    return getattr(module, name)(groups_of(case, params), **hyper, **kwargs)


def main(outdir: str) -> None:
    from mpi4py import MPI

    import fastadam.distributed as dist

    # Small receive chunks and messages: several chunks per shard, params sent in pieces.
    dist._RECV_ELEMENTS = 4 * 4096
    dist._MAX_MESSAGE = 5000
    comm = MPI.COMM_WORLD
    n, me = comm.size, comm.rank
    result: dict[str, Any] = {"world_size": n, "cases": {}}
    same: list[bool] = []  # every rank's params are rank 0's

    def all_equal(arrays: list[np.ndarray]) -> bool:
        blob = b"".join(a.tobytes() for a in arrays)
        return all(b == blob for b in comm.allgather(blob))

    for case in CASES:
        params = initial_params(case)
        opt = build(dist, case, params, comm=comm)
        norms = [opt.step(grads(case, t, me), grad_scale=CASES[case][4]) for t in range(STEPS)]
        same.append(all_equal(params))
        sd = opt.state_dict()
        result["cases"][case] = {
            "params": [p.copy() for p in params], "norms": norms, "state_dict": sd,
            "state_nbytes": comm.allgather(sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, np.ndarray))),
            "shards": comm.allgather(opt.shard), "norms_agree": all(x == norms for x in comm.allgather(norms)),
        }
        if n == 2 and case in SAVED and me == 0:
            with open(os.path.join(outdir, f"checkpoint-{case}.pkl"), "wb") as f:
                pickle.dump({"params": params, "state_dict": sd}, f)

    # Continue a 2-rank checkpoint here: a fresh optimizer on the saved params, its state loaded.
    comm.Barrier()
    for case in SAVED if n != 2 else ():
        with open(os.path.join(outdir, f"checkpoint-{case}.pkl"), "rb") as f:
            saved = pickle.load(f)
        params = [p.copy() for p in saved["params"]]
        opt = build(dist, case, params, comm=comm)
        opt.load_state_dict(saved["state_dict"])
        norms = [opt.step(grads(case, STEPS + t, me), grad_scale=CASES[case][4]) for t in range(MORE_STEPS)]
        same.append(all_equal(params))
        result["cases"][f"{case}-resumed"] = {"params": [p.copy() for p in params], "norms": norms, "state_dict": opt.state_dict()}

    # Bad input on one rank: every rank raises the same error and nothing changes anywhere.
    params = initial_params("bf16-master")
    opt = build(dist, "bf16-master", params, comm=comm)
    opt.step(grads("bf16-master", 0, me), grad_scale=1024.0)
    bad_rank = n - 1
    attempts: dict[str, Any] = {}

    def snapshot() -> list[bytes]:
        return [p.tobytes() for p in params] + [v.tobytes() for s in opt.state.values() for v in s.values() if isinstance(v, np.ndarray)]

    def attempt(label: str, g: list[Any], **kwargs: Any) -> None:
        before = snapshot()
        steps = opt._steps.copy()
        try:
            opt.step(g, **kwargs)
            outcome: tuple[str, str] | None = None
        except (TypeError, ValueError) as e:
            outcome = (type(e).__name__, str(e))
        unchanged = snapshot() == before and np.array_equal(steps, opt._steps)
        attempts[label] = {"outcomes": comm.allgather(outcome), "unchanged": comm.allgather(unchanged),
                           "skipped": comm.allgather(opt.last_step_skipped)}

    g = grads("bf16-master", 1, me)
    wrong_shape = list(g)
    if me == bad_rank:
        wrong_shape[0] = np.zeros((300, 70), BF16)
    attempt("wrong shape", wrong_shape, grad_scale=1024.0)
    wrong_dtype = list(g)
    if me == bad_rank:
        wrong_dtype[4] = wrong_dtype[4].astype(np.float64)  # type: ignore[union-attr]
    attempt("wrong dtype", wrong_dtype, grad_scale=1024.0)
    strided = list(g)
    if me == bad_rank:
        strided[6] = np.zeros(40000, BF16)[::2]
    attempt("strided", strided, grad_scale=1024.0)
    if n > 1:  # (with one rank, these are valid steps)
        mismatch = list(g)
        if me == bad_rank:
            mismatch[2] = None
        attempt("None on one rank", mismatch, grad_scale=1024.0)
        attempt("grad_scale on one rank", g, grad_scale=1024.0 if me != bad_rank else 512.0)
    if me == bad_rank:
        opt.param_groups[0]["lr"] = -1.0
    attempt("bad lr on one rank", g, grad_scale=1024.0)
    opt.param_groups[0]["lr"] = CASES["bf16-master"][1]["lr"]
    nonfinite = [x.copy() if x is not None else None for x in g]
    if me == bad_rank:
        nonfinite[5].reshape(-1)[77] = np.inf  # type: ignore[union-attr]
    attempt("inf on one rank (skipped)", nonfinite, grad_scale=1024.0)
    attempt("valid", g, grad_scale=1024.0)
    result["bad_input"] = {"attempts": attempts, "params": [p.copy() for p in params], "bad_rank": bad_rank}
    # A first step skipped (inf on one rank) creates no state, on any rank.
    fresh = build(dist, "bf16-master", initial_params("bf16-master"), comm=comm)
    norm = fresh.step(nonfinite, grad_scale=1024.0)
    result["first_step_skipped"] = comm.allgather((fresh.last_step_skipped, norm, len(fresh.state), fresh.state_dict()["state"] == {}))

    # State memory per rank on a larger model: 12 buffers of 100k elements, bf16 params with
    # fp32 master weights (12 bytes of state per element).
    big = [np.zeros(100_000, BF16) for _ in range(12)]
    opt = dist.ShardedAdamW(big, master_weights=True, comm=comm)
    opt.step([np.ones(100_000, BF16) for _ in big])
    result["memory"] = {
        "total_elements": 12 * 100_000,
        "state_nbytes": comm.allgather(sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, np.ndarray))),
        "shard_elements": comm.allgather(sum(hi - lo for _, lo, hi in opt.shard)),
    }
    opt8 = dist.ShardedAdamW8bit([np.zeros(100_000, np.float32) for _ in range(12)], comm=comm)
    opt8.step([np.ones(100_000, np.float32) for _ in range(12)])
    result["memory"]["state_nbytes_8bit"] = comm.allgather(
        sum(v.nbytes for s in opt8.state.values() for v in s.values() if isinstance(v, np.ndarray))
    )
    result["memory"]["shard_elements_8bit"] = comm.allgather(sum(hi - lo for _, lo, hi in opt8.shard))
    # Quantized states: what they do not take is refused on every rank, before anything is written.
    refused: dict[str, Any] = {}

    def outcome(call: Any) -> Any:
        try:
            call()
        except (TypeError, ValueError) as e:
            return (type(e).__name__, str(e))
        return None

    refused["amsgrad"] = outcome(lambda: dist.ShardedAdamW8bit(initial_params("adamw-8bit"), amsgrad=True, comm=comm))
    params = initial_params("adamw-8bit")
    opt8 = build(dist, "adamw-8bit", params, comm=comm)
    opt8.step(grads("adamw-8bit", 0, me))
    before = [p.copy() for p in params]
    opt8.param_groups[0]["amsgrad"] = True
    refused["amsgrad set later"] = outcome(lambda: opt8.step(grads("adamw-8bit", 1, me)))
    refused["amsgrad set later, unchanged"] = all(same_bits_np(a, b) for a, b in zip(params, before))
    plain = build(dist, "adamw", initial_params("adamw"), comm=comm)
    refused["quantized into fp32"] = outcome(lambda: plain.load_state_dict(opt8.state_dict()))
    result["refused_8bit"] = comm.allgather(refused)
    result["params_same_on_every_rank"] = all(same)
    result["bounds"] = {r: dist.shard_bounds([int(np.prod(s)) for s in SHAPES], r) for r in (1, 2, 3, 5)}
    if me == 0:
        with open(os.path.join(outdir, f"result-n{n}.pkl"), "wb") as f:
            pickle.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
