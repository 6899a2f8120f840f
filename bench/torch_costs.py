"""What fastadam.torch's step pays per tensor in torch's Python-level calls, cold and warm.

For 1000 parameters of 1000 float32 elements with gradients, times (medians of 30
rounds) each call the adapter makes on every tensor, for all tensors: "cold" right
after a 32 MB sweep of other memory (as after the previous step's kernel pass, which
evicts torch's tensor metadata from the cache), "warm" as the mean of 20 calls in a row.
Also the whole step, its native part alone (the kept plan's torch_step), the torch
helper's read of all tensors (what replaces the calls above when it is built), and
fastadam.Adam's step on NumPy arrays of the same shapes. docs/performance.md, "The
torch adapter".

    python bench/torch_costs.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import fastadam

try:
    import torch

    import fastadam.torch as fatorch
except ImportError as error:
    sys.exit(f"bench/torch_costs.py needs torch: pip install torch==2.13.0 ({error})")


def _helper_read(tensors: tuple[torch.Tensor, ...]) -> Callable[[], object] | None:
    """The torch helper's read of every tensor (cpp/torch/torch_meta.h), called through ctypes."""
    import ctypes

    from fastadam import _torch_meta

    capsule = _torch_meta.api()
    if capsule is None:
        return None
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]

    class Api(ctypes.Structure):
        _fields_ = [("abi", ctypes.c_uint32), ("read", ctypes.c_void_p), ("bump_versions", ctypes.c_void_p)]

    api = Api.from_address(get_pointer(capsule, b"fastadam.torch_meta.api"))
    read = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p)(api.read)
    class Meta(ctypes.Structure):
        _fields_ = [("param_ptr", ctypes.c_size_t), ("param_nbytes", ctypes.c_int64), ("param_shape", ctypes.c_uint64),
                    ("grad_ptr", ctypes.c_size_t),
                    ("param_dtype", ctypes.c_int32), ("grad_state", ctypes.c_int32)]

    out = (Meta * len(tensors))()
    return lambda: read(tensors, ctypes.addressof(out))


def main() -> int:
    torch.set_num_threads(2)
    fastadam.set_num_threads(2)
    rng = np.random.default_rng(0)
    n, size = 1000, 1000
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(size, dtype=np.float32))) for _ in range(n)]
    for p in params:
        p.grad = torch.from_numpy(rng.standard_normal(size, dtype=np.float32))
    opt = fatorch.Adam(params, lr=1e-3)
    opt.step()
    arrays = [rng.standard_normal(size, dtype=np.float32) for _ in range(n)]
    grads = [a.copy() for a in arrays]
    np_opt = fastadam.Adam(arrays, lr=1e-3)
    np_opt.step(grads)
    other = np.zeros(8_000_000, np.float32)
    as_tuple = tuple(params)
    increment_version = torch._C._increment_version
    helper_read = _helper_read(as_tuple)
    calls: dict[str, Callable[[], object]] = {
        "fastadam.torch.Adam.step()": opt.step,
        "  its native part (plan.torch_step)": lambda: opt._plan.torch_step(opt.param_groups),
        "fastadam.Adam.step() (NumPy)": lambda: np_opt.step(grads),
        "p.grad": lambda: [p.grad for p in params],
        "p.data_ptr()": lambda: [p.data_ptr() for p in params],
        "p.grad.data_ptr()": lambda: [p.grad.data_ptr() for p in params],
        "torch._C._increment_version(all)": lambda: increment_version(as_tuple),
    }
    if helper_read is not None:
        calls["the torch helper's read (all: grads, pointers, checks)"] = helper_read
    print(f"fastadam {fastadam.__version__} ({fastadam.get_isa()}), torch {torch.__version__}, "
          f"{n} tensors x {size}, 2 threads; us for all tensors, medians of 30 rounds")
    print("| call | cold (after a 32 MB sweep) | warm (20 in a row) |")
    print("|---|---|---|")
    cold: dict[str, list[float]] = {k: [] for k in calls}
    warm: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(30):
        for name, fn in calls.items():
            np.add(other, 1, out=other)
            t0 = time.perf_counter()
            fn()
            cold[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            warm[name].append((time.perf_counter() - t0) / 20)
    for name in calls:
        print(f"| {name} | {statistics.median(cold[name]) * 1e6:.0f} | {statistics.median(warm[name]) * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
