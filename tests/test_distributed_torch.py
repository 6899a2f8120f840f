"""fastadam.torch.AdamW inside torch.distributed.optim.ZeroRedundancyOptimizer, with and
without DistributedDataParallel, on 2 gloo processes: the same bits as one process
stepping on the averaged gradients (tests/distributed_torch_worker.py runs both). And as
DeepSpeed's client optimizer under ZeRO stage 1 and 2 with CPU offload (marked ``peers``:
DeepSpeed is the benchmark's opt-in peer, which .ci/run's peers step installs)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PEERS_PIN, import_or_skip, peers_required, torch_or_skip

torch = torch_or_skip()
import distributed_deepspeed_worker as ds_worker  # noqa: E402  (tests/ is on sys.path, as for conftest)
import distributed_torch_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow  # three processes training for seconds
HERE = Path(__file__).resolve().parent
TIMEOUT = 300


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("zero")
    script = str(HERE / "distributed_torch_worker.py")
    # gloo on the loopback interface (a host name that resolves elsewhere would stall it)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, script, str(out), str(r), "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    procs.append(subprocess.Popen([sys.executable, script, str(out), "reference", "1"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"{p.args} exited with {p.returncode}:\n{stdout[-2000:]}\n{stderr[-6000:]}"
    with open(out / "rank0.pkl", "rb") as f:
        distributed = pickle.load(f)
    with open(out / "reference.pkl", "rb") as f:
        reference = pickle.load(f)
    return distributed, reference


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(worker.bits(a), worker.bits(b))


@pytest.mark.parametrize("case", list(worker.CASES))
def test_zero_redundancy_optimizer_on_2_gloo_ranks_is_one_process(runs, case):
    distributed, reference = runs
    got, want = distributed[case], reference[case]
    assert got["same_params_on_every_rank"]
    # each rank's fastadam optimizer steps its share of the params only
    assert sum(got["params_per_rank"]) == len(got["params"]) and all(0 < k < len(got["params"]) for k in got["params_per_rank"])
    # the gradients the optimizer saw are the average of the two ranks' (DDP: g/2 + g/2)
    for t, (a_list, b_list) in enumerate(zip(got["grads"], want["grads"])):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert same_bits(a, b), f"{case}: step {t}, the gradient of param {i}"
    assert got["losses"] == want["losses"], case
    assert got["clip_norms"] == want["clip_norms"]
    if case in worker.CLIP:
        assert sum(norm > worker.CLIP[case] for norm in got["clip_norms"]) > len(got["clip_norms"]) // 2  # it clipped
    for i, (a, b) in enumerate(zip(got["params"], want["params"])):
        assert same_bits(a, b), f"{case}: param {i}: max difference {(a.double() - b.double()).abs().max()}"
    # ZeRO's consolidated state dict: fastadam.torch.AdamW's own, bit for bit
    sd, ref_sd = got["state_dict"], want["state_dict"]
    assert sd["state"].keys() == ref_sd["state"].keys()
    for i, entry in ref_sd["state"].items():
        assert sd["state"][i].keys() == entry.keys(), (case, i)
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert same_bits(sd["state"][i][key], value), (case, i, key)
            else:  # the 4-bit states' param_shape
                assert sd["state"][i][key] == value, (case, i, key)
        if case in worker.OPTIMIZER:  # the large weights' states are quantized on the ranks too
            assert sum("exp_avg_codes" in e for e in sd["state"].values()) == 2, case
    for group, ref_group in zip(sd["param_groups"], ref_sd["param_groups"]):
        assert group["lr"] == ref_group["lr"] == 5e-3  # the schedule's change reached both ranks' optimizers
        assert group.get("master_weights") == ref_group.get("master_weights")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.peers
def test_deepspeed_zero_1_and_2_with_cpu_offload_and_fastadam_as_client_optimizer_is_one_process(runs, tmp_path):
    import_or_skip("deepspeed", PEERS_PIN, "the DeepSpeed ZeRO check", required=peers_required())
    _, reference = runs
    script = str(HERE / "distributed_deepspeed_worker.py")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, script, str(tmp_path), str(r), "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)  # DeepSpeed builds its shm op at first use (about a minute)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"{p.args} exited with {p.returncode}:\n{stdout[-2000:]}\n{stderr[-6000:]}"
    with open(tmp_path / "deepspeed.pkl", "rb") as f:
        results = pickle.load(f)
    assert results.keys() == ds_worker.CASES.keys()
    for name, got in results.items():
        # fp32; bf16: DeepSpeed's fp32 master partitions, stepped by fastadam, against
        # fastadam.torch.AdamW(master_weights=True) on the bf16 model in one process
        want = reference[ds_worker.CASES[name][1]]
        assert got["client_optimizer"] == "fastadam.torch.AdamW" and got["engine_optimizer"] == "DeepSpeedZeroOptimizer", got
        assert got["losses"] == want["losses"], name  # the same params at every step
        for i, (a, b) in enumerate(zip(got["params"], want["params"])):
            assert same_bits(a, b), f"{name}: param {i}: max difference {(a.double() - b.double()).abs().max()}"
