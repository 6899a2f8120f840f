"""fastadam.distributed (ShardedAdam/ShardedAdamW over MPI) against one process.

tests/distributed_worker.py runs under ``mpiexec -n 2``, ``-n 3`` and ``-n 1`` (oversubscribed
on 2 cores: fine, 1 fastadam thread per rank); each rank steps on its own gradients, and
the results here must be the bits of fastadam.Adam/AdamW stepping, in this process, on
the gradients averaged in the documented order (distributed_worker.average). The 2-rank
run saves a checkpoint that the 3- and 1-rank runs continue. This process never
initialises MPI itself (no ``import mpi4py.MPI``: the fork tests share it).
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import first_difference, import_or_skip, in_ci, same_bits

import fastadam

import_or_skip("mpi4py", 'mpi4py mpich (pip install "fastadam[mpi]")', "the sharded optimizer's tests")
import distributed_worker as worker  # noqa: E402  (tests/ is on sys.path, as for conftest)

pytestmark = pytest.mark.slow  # mpiexec runs: seconds
HERE = Path(__file__).resolve().parent
RUNS = (2, 3, 1)  # the 2-rank run writes the checkpoint the others load
TIMEOUT = 240


def mpiexec() -> str:
    """MPICH's mpiexec from the environment's own bin (the mpich wheel's), else from PATH."""
    found = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        message = 'mpiexec not found: pip install mpich (or "fastadam[mpi]")'
        if in_ci():
            pytest.fail(message + "; .ci/run must install it")
        pytest.skip(message)
    return found


def run_mpi(n: int, *args: str) -> subprocess.CompletedProcess[str]:
    # -launcher fork: local processes only (hydra would pick ssh or slurm where it finds them);
    # MPIEXEC_TIMEOUT: hydra kills a hung job itself; one fastadam thread per rank.
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT=str(TIMEOUT - 20))
    cmd = [mpiexec(), "-launcher", "fork", "-n", str(n), sys.executable, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("distributed")
    found = {}
    for n in RUNS:
        run_mpi(n, str(HERE / "distributed_worker.py"), str(out))
        with open(out / f"result-n{n}.pkl", "rb") as f:
            found[n] = pickle.load(f)
    return found


def one_process(case: str, phases: list[tuple[int, range]], state_dict: dict | None = None, params: list | None = None):
    """fastadam.Adam/AdamW in this process on the averaged gradients: (params, norms, state_dict)."""
    params = worker.initial_params(case) if params is None else [p.copy() for p in params]
    opt = worker.build(fastadam, case, params)
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    norms = [opt.step(worker.average(case, t, n), grad_scale=worker.CASES[case][4]) for n, steps in phases for t in steps]
    return params, norms, opt.state_dict()


def assert_same(got: dict, params: list, norms: list, state_dict: dict, where: str) -> None:
    for i, (a, b) in enumerate(zip(got["params"], params)):
        assert same_bits(a, b), f"{where}: params[{i}]: {first_difference(a, b)}"
    assert got["norms"] == norms, where  # floats, or None without grad_scale/max_grad_norm
    assert got["state_dict"]["param_groups"] == state_dict["param_groups"], where
    assert got["state_dict"]["state"].keys() == state_dict["state"].keys(), where
    for i, entry in state_dict["state"].items():
        mine = got["state_dict"]["state"][i]
        assert list(mine) == list(entry), (where, i)  # the same entries, in the same order
        assert mine["step"] == entry["step"], (where, i)
        for key in entry:
            if key == "param_shape":  # 4-bit states' (flat codes)
                assert mine[key] == entry[key], (where, i)
            elif key != "step":
                assert same_bits(mine[key], entry[key]), f"{where}: state[{i}][{key!r}]: {first_difference(mine[key], entry[key])}"


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("case", list(worker.CASES))
def test_50_steps_on_n_ranks_are_one_process_on_the_averaged_gradients(results, case, n):
    got = results[n]["cases"][case]
    params, norms, state_dict = one_process(case, [(n, range(worker.STEPS))])
    assert_same(got, params, norms, state_dict, f"{case}, {n} ranks")
    assert got["norms_agree"] and results[n]["params_same_on_every_rank"]
    if worker.CASES[case][4] is not None:
        assert all(isinstance(x, float) and math.isfinite(x) for x in norms)
        assert any(x > worker.CASES[case][1]["max_grad_norm"] for x in norms), "clipping never acted"
    # The state memory of the ranks adds up to one process's; each rank holds its shard's.
    one = sum(v.nbytes for e in state_dict["state"].values() for v in e.values() if isinstance(v, np.ndarray))
    assert sum(got["state_nbytes"]) == one
    assert [sum(hi - lo for _, lo, hi in shard) for shard in got["shards"]] == np.diff(results[n]["bounds"][n]).tolist()


@pytest.mark.parametrize("n", [3, 1])
@pytest.mark.parametrize("case", worker.SAVED)
def test_saved_with_2_ranks_and_loaded_with_n_continues_with_the_same_bits(results, tmp_path, case, n):
    got = results[n]["cases"][f"{case}-resumed"]
    more = range(worker.STEPS, worker.STEPS + worker.MORE_STEPS)
    # as if it had never stopped: 50 steps on 2 ranks' averages, then 20 on n ranks'
    params, norms, state_dict = one_process(case, [(2, range(worker.STEPS)), (n, more)])
    assert_same(got, params, norms[worker.STEPS:], state_dict, f"{case}, saved on 2 ranks, resumed on {n}")
    # the sharded state dict is fastadam.AdamW's: it loads there and continues alike
    saved = results[2]["cases"][case]
    params1, norms1, state_dict1 = one_process(case, [(n, more)], saved["state_dict"], saved["params"])
    assert_same(got, params1, norms1, state_dict1, f"{case}: the 2-rank state_dict loaded into fastadam")


def test_state_memory_per_rank_shrinks_as_one_over_n(results):
    per_rank = {n: results[n]["memory"]["state_nbytes"] for n in (1, 2, 3)}
    total = results[1]["memory"]["total_elements"]
    assert per_rank[1] == [12 * total]  # exp_avg, exp_avg_sq and the master weights: 3 float32 per element
    for n in (2, 3):
        assert sum(per_rank[n]) == per_rank[1][0]
        for nbytes, elements in zip(per_rank[n], results[n]["memory"]["shard_elements"]):
            assert nbytes == 12 * elements
            assert abs(elements - total / n) <= 4096, (n, elements)  # each of its two cuts within 2048 of r*T/N
        assert max(per_rank[n]) / per_rank[1][0] == pytest.approx(1 / n, abs=0.002)
    # 8-bit states: a code per element in each moment, and one float32 absmax per 256 elements
    per_rank_8bit = {n: results[n]["memory"]["state_nbytes_8bit"] for n in (1, 2, 3)}
    assert per_rank_8bit[1] == [2 * total + 2 * 4 * (12 * -(-100_000 // 256))]
    for n in (2, 3):
        assert sum(per_rank_8bit[n]) == per_rank_8bit[1][0]
        for nbytes, elements in zip(per_rank_8bit[n], results[n]["memory"]["shard_elements_8bit"]):
            assert 2 * elements < nbytes <= 2 * elements + 8 * (elements // 256 + 24)  # a short block per piece at most
        assert max(per_rank_8bit[n]) / per_rank_8bit[1][0] == pytest.approx(1 / n, abs=0.004)


def test_shard_bounds_cut_on_multiples_of_4096_from_tensor_starts(results):
    sizes = [int(np.prod(s)) for s in worker.SHAPES]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    for n, bounds in results[1]["bounds"].items():
        assert len(bounds) == n + 1 and bounds[0] == 0 and bounds[-1] == total and bounds == sorted(bounds)
        for r, cut in enumerate(bounds[1:-1], start=1):
            k = int(np.searchsorted(starts, cut, side="right")) - 1
            assert cut in starts or (cut - starts[k]) % 4096 == 0, (n, r, cut)
            assert abs(cut - total * r // n) <= 2048, (n, r, cut)  # the nearest cut


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bad_input_on_one_rank_raises_everywhere_and_writes_nothing(results, n):
    bad = results[n]["bad_input"]
    rank = bad["bad_rank"]
    expected = {
        "wrong shape": ("ValueError", "grads[0] has shape (300, 70) but its param has shape (70, 300)"),
        "wrong dtype": ("TypeError", "grads[4] has dtype float64; gradients are float32, bfloat16"),
        "strided": ("ValueError", "grads[6] is not a C-contiguous"),
        "None on one rank": ("ValueError", f"the gradient of params[2] is bfloat16 on rank 0 but None on rank {rank}"),
        "grad_scale on one rank": ("ValueError", f"grad_scale is 1024.0 on rank 0 but 512.0 on rank {rank}"),
        "bad lr on one rank": ("ValueError", "lr"),
    }
    for label, (kind, text) in expected.items():
        if n == 1 and label in ("None on one rank", "grad_scale on one rank"):
            assert label not in bad["attempts"]  # valid steps with one rank
            continue
        attempt = bad["attempts"][label]
        outcomes = attempt["outcomes"]
        assert all(o == outcomes[0] for o in outcomes), (label, outcomes)  # the same error on every rank
        assert outcomes[0] is not None and outcomes[0][0] == kind and text in outcomes[0][1], (label, outcomes[0])
        if label in ("wrong shape", "wrong dtype", "strided", "bad lr on one rank") and n > 1:
            assert f"[rank {rank} of {n}; every rank raised this error" in outcomes[0][1], outcomes[0]
        assert all(attempt["unchanged"]), (label, attempt["unchanged"])
    skipped = bad["attempts"]["inf on one rank (skipped)"]
    # as fastadam.AdamW with grad_scale on the averaged gradients: the step is skipped, on every rank
    assert skipped["outcomes"] == [None] * n and all(skipped["skipped"]) and all(skipped["unchanged"])
    valid = bad["attempts"]["valid"]
    assert valid["outcomes"] == [None] * n and not any(valid["skipped"]) and not any(valid["unchanged"])
    params, _, _ = one_process("bf16-master", [(n, range(2))])
    for i, (a, b) in enumerate(zip(bad["params"], params)):
        assert same_bits(a, b), f"params[{i}]: {first_difference(a, b)}"
    # a skipped first step leaves no state on any rank, as fastadam.Adam's
    for skipped, norm, local_entries, empty in results[n]["first_step_skipped"]:
        assert skipped and math.isinf(norm) and local_entries == 0 and empty


@pytest.mark.parametrize("n", [1, 2, 3])
def test_quantized_states_refuse_amsgrad_and_a_plain_optimizer_refuses_their_state_dict(results, n):
    outcomes = results[n]["refused_8bit"]
    assert all(o == outcomes[0] for o in outcomes)  # the same on every rank
    got = outcomes[0]
    assert got["amsgrad"][0] == "ValueError" and "amsgrad=True is not available with 8-bit states" in got["amsgrad"][1]
    assert got["amsgrad set later"][0] == "ValueError" and "param_groups[0]" in got["amsgrad set later"][1]
    assert got["amsgrad set later, unchanged"]
    kind, text = got["quantized into fp32"]
    assert kind == "ValueError" and "fastadam.dequantize_state_dict(sd)" in text


def test_core_imports_no_mpi4py_and_a_missing_mpi4py_names_the_extra():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"  # as if not installed
        "import fastadam, fastadam.optim, fastadam.reference\n"
        "assert 'fastadam.distributed' not in sys.modules\n"
        "try:\n    import fastadam.distributed\nexcept ImportError as e:\n    print(e)\nelse:\n    raise SystemExit('imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "fastadam[mpi]"' in proc.stdout and "mpi4py" in proc.stdout


def test_bench_distributed_quick_runs():
    """bench/distributed.py --quick (a small model on 1 and 2 ranks): its table, no timing assertions."""
    bench = HERE.parent / "bench" / "distributed.py"
    if not bench.is_file():
        if in_ci():
            pytest.fail(f"{bench} not found: copy bench/ beside tests/")
        pytest.skip(f"{bench} not found: copy bench/ beside tests/ to run it")
    mpiexec()
    proc = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("fp32", "bf16"))]
    assert [(r[0], r[1]) for r in rows] == [("fp32", "1"), ("fp32", "2"), ("bf16", "1"), ("bf16", "2")], proc.stdout
    assert all(float(r[3]) > 0 for r in rows), proc.stdout
