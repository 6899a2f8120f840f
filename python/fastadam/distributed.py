r"""Sharded Adam and AdamW over MPI (ZeRO stage 1): each rank keeps the optimizer state of
one contiguous shard of the flattened parameters.

``pip install "fastadam[mpi]"`` (mpi4py and MPICH's wheel, which brings ``mpiexec``), then
launch one process per rank: ``mpiexec -n 4 python train.py``. Every rank builds the same
model (equal params), computes its own gradients and calls ``opt.step(grads)``:

1. The ranks agree that every gradient is valid (one small all-gather), so that bad input
   on any rank makes every rank raise the same error before anything is written.
2. Each shard's gradient pieces go to the shard's owner (point-to-point, straight from the
   caller's arrays), which averages them in a fixed order, in float32::

       g = (((float32(g_0) + float32(g_1)) + float32(g_2)) + ... + float32(g_{N-1})) / float32(N)

   (ranks in order; each add and the division one IEEE float32 operation, as NumPy does them).
3. With ``grad_scale`` or ``max_grad_norm``: the global L2 norm of the averaged gradients, the
   same bits on every rank and as one process's (``fastadam.reference.grad_sq_sum``): each
   rank computes the norm pass's per-block sums of its shard (blocks of 4096 elements of one
   tensor), the ranks all-gather them (8 bytes per block) and add them in order. A non-finite
   norm skips the step on every rank; otherwise ``g = (g / grad_scale) * clip_coef`` as the
   kernel's gradient transform.
4. The fused Adam step on this rank's shard (``fastadam._core._adam_step_groups``, the call
   behind ``fastadam.Adam``): the same bits as ``fastadam.Adam`` on one process stepping on
   the averaged gradients.
5. Each owner sends its updated parameter pieces to every other rank, into their arrays
   (bfloat16/float16 params with float32 master weights: the rounded params, half the bytes).

Shards: the concatenation of all params (``T`` elements, in order) is cut into ``N``
contiguous shards of about ``T / N`` elements, each cut on a multiple of 4096 elements from
the start of a tensor (or on a tensor boundary). A shard's pieces then cut the norm pass's
blocks where one process does, which makes the norm's bits those of one process; and the
8-bit and 4-bit states' blocks (256 and 128 elements of one tensor) too, so that
``ShardedAdamW8bit``'s codes and absmax on each rank are those of whole blocks of
``fastadam.AdamW8bit``.

Per rank and step, with ``S = T / N``, ``g`` and ``p`` the bytes per element of the gradients
and the params: sent and received ``(N - 1) * S * (g + p)`` bytes each (plus ``8 * T / 4096``
for the norm); state ``S * (8 + 4 * amsgrad + 4 * master_weights)`` bytes (float32 states;
8-bit states ``S * (2 + 8 / 256)``, 4-bit ``S * (1 + 8 / 128)``, plus master weights),
and, with more than one rank, an averaged-gradient buffer of ``4 * S`` bytes and receive
buffers of at most ``4 * _RECV_ELEMENTS`` bytes (32 MiB) in all. Every rank keeps whole
params and gradients, as ZeRO stage 1 does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    from mpi4py import MPI
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastadam.distributed needs mpi4py and an MPI library: pip install \"fastadam[mpi]\" "
        "(mpi4py and mpich, whose wheel brings mpiexec)"
    ) from error

from . import _core
from ._common import ADAM, StepGuard, check_group, check_loaded_entry, check_max_grad_norm, state_stagger, zeros_packed
from .optim import Adam, Adam4bit, Adam8bit, Grads, Params, _state_dtype_of, _to_numpy, refuse_quantized_extras
from .quantized import QUANT_BLOCK, QuantizedState

__all__ = [
    "ShardedAdam", "ShardedAdamW", "ShardedAdam8bit", "ShardedAdamW8bit", "ShardedAdam4bit", "ShardedAdamW4bit", "SHARD_ALIGN",
]

# Shard cuts fall on multiples of this many elements from a tensor's start: the norm pass's
# block (kNormBlock, 4096) and a multiple of 8-bit states' blocks (256, 128).
SHARD_ALIGN = 4096
# Receive buffers: at most this many elements in flight per step and rank (two chunks of
# the shard, from all other ranks), so that they stay small next to the state.
_RECV_ELEMENTS = 1 << 23
# Largest message, in elements: keeps every count far below MPI's int limit.
_MAX_MESSAGE = 1 << 26
# Elements per block of the averaging's and the gradient transform's NumPy operations:
# 512 KiB of float32, which stays in a core's L2 cache between the operations on it
# (two ranks' 62M-element pieces averaged: 42.6 ms whole, 28.2 ms in these blocks, 29.6 and
# 29.2 in blocks of 2^16 and 2^18; `python bench/distributed.py --parts --rounds 6`,
# docs/design.md, "Sharded optimizer").
_BLOCK = 1 << 17
_TAG_GRAD, _TAG_PARAM, _TAG_STATE = 181, 182, 183
_GRAD_DTYPES = ("float32", "bfloat16", "float16")
_MIXED_KEYS = ("master_weights", "state_dtype", "stochastic_rounding")


def shard_bounds(sizes: Sequence[int], world_size: int) -> list[int]:
    """Where the ``world_size`` shards of the concatenation of tensors of ``sizes`` elements
    start and end: ``bounds[r]:bounds[r + 1]`` is rank r's range of flattened elements.

    Each inner bound is the cut nearest to ``r * T / world_size`` (the lower on a tie) among
    the multiples of ``SHARD_ALIGN`` from a tensor's start and the tensor boundaries; bounds
    never decrease (a rank may own nothing when T is small)."""
    if world_size < 1:
        raise ValueError(f"shard_bounds(): world_size must be >= 1, got {world_size}")
    starts = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))]).astype(np.int64)
    total = int(starts[-1])
    bounds = [0]
    for r in range(1, world_size):
        target = (total * r) // world_size
        k = int(np.searchsorted(starts, target, side="right")) - 1  # the tensor holding `target`
        k = min(k, len(sizes) - 1) if len(sizes) else 0
        begin = int(starts[k]) if len(sizes) else 0
        end = int(starts[k + 1]) if len(sizes) else 0
        below = begin + ((target - begin) // SHARD_ALIGN) * SHARD_ALIGN
        above = min(below + SHARD_ALIGN, end)
        cut = below if target - below <= above - target else above
        bounds.append(max(cut, bounds[-1]))
    bounds.append(total)
    return bounds


def _pieces(sizes: Sequence[int], begin: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tensor, start, stop, offset) of each tensor's elements in [begin, end) of the
    concatenation: start/stop within the flattened tensor, offset within the range."""
    out = []
    position = 0
    for k, size in enumerate(sizes):
        lo, hi = max(begin, position), min(end, position + size)
        if lo < hi:
            out.append((k, lo - position, hi - position, lo - begin))
        position += size
    return out


def _spans(start: int, stop: int, longest: int) -> list[tuple[int, int]]:
    return [(a, min(a + longest, stop)) for a in range(start, stop, longest)]


def _widen_bf16(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 ``x`` widened exactly into float32 ``out`` (its bits shifted into a float's top
    half, as ml_dtypes' cast does; 1.5x faster than that cast inside a ufunc, bench/distributed.py --parts)."""
    np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def _codes_span(bits: int, n: int) -> tuple[int, Any, Any]:
    """Size and dtype of a whole n-element param's codes, and where its elements [lo, hi) lie in them."""
    if bits == 8:
        return n, np.uint8, lambda lo, hi: (lo, hi)
    return (n + 1) // 2, np.uint8, lambda lo, hi: (lo // 2, (hi + 1) // 2)  # two a byte; lo is even


def _absmax_span(bits: int, n: int) -> tuple[int, Any, Any]:
    block = QUANT_BLOCK[bits]
    return -(-n // block), np.float32, lambda lo, hi: (lo // block, -(-hi // block))


def _bytes(a: np.ndarray) -> list[Any]:
    """An MPI buffer of a contiguous array's bytes (any dtype: ml_dtypes' bfloat16 too)."""
    return [a.view(np.uint8), MPI.BYTE]


def _plain(value: Any) -> Any:
    """A hyper-parameter as a comparable, picklable value (dtypes by name)."""
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def _groups_signature(groups: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """The groups' hyper-parameters, comparable between ranks."""
    return tuple(tuple((k, _plain(v)) for k, v in sorted(g.items()) if k != "params") for g in groups)


def _raise_agreed(comm: MPI.Intracomm, mine: BaseException | None, gathered: Sequence[Any]) -> None:
    """Raises, on every rank, the error of the first rank that had one (TypeError or
    ValueError as it was, anything else as RuntimeError), naming that rank."""
    for r, error in enumerate(gathered):
        if error is None:
            continue
        kind, message = error
        cls: type[Exception] = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
        if comm.size > 1:
            message = f"{message} [rank {r} of {comm.size}; every rank raised this error and wrote nothing]"
        raise cls(message) from (mine if r == comm.rank else None)


def _error_of(error: BaseException | None) -> tuple[str, str] | None:
    return None if error is None else (type(error).__name__, str(error))


class ShardedAdam:
    r"""Adam (or AdamW) with its state sharded over the ranks of an MPI communicator
    (ZeRO stage 1): the same bits on every rank as ``fastadam.Adam`` stepping, in one
    process, on the gradients averaged over the ranks.

    Per element (see :class:`fastadam.Adam` and :mod:`fastadam.reference`), with the
    average of the N ranks' gradients in rank order, in float32::

        g = (g_0 + g_1 + ... + g_{N-1}) / N
        m = beta1*m + (1-beta1)*g          v = beta2*v + (1-beta2)*g*g
        p = p - lr/(1-beta1**t) * m / (sqrt(v)/sqrt(1-beta2**t) + eps)

    ``lr`` is in parameter units per step; ``eps`` in gradient units.

    Args:
        params: as for :class:`fastadam.Adam` (a list of arrays, a dict name -> array, or
            param-group dicts), the same shapes, dtypes and initial values on every rank:
            float32 arrays, or bfloat16/float16 arrays in groups with ``master_weights=True``.
            C-contiguous; each rank's arrays receive every rank's updates after each step.
        comm: the ``mpi4py.MPI.Intracomm`` whose ranks share the state (default
            ``MPI.COMM_WORLD``); the optimizer communicates on its own duplicate. Every rank
            must construct the optimizer, step, and call ``state_dict``/``load_state_dict``
            together (they are collective).
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
        max_grad_norm, master_weights, state_dtype: as for :class:`fastadam.Adam`.
            ``max_grad_norm`` clips by the global norm of the averaged gradients over all
            ranks. The mixed-precision keys stay as built (stochastic rounding is not
            offered: its random bits depend on an element's index in the whole tensor).

    ``state`` holds this rank's shard only: ``state[i]`` for each param i with elements on
    this rank, its arrays 1-D over the flattened param's elements ``shard`` names. Gradients
    are float32, bfloat16 or float16 arrays of each param's shape, the same dtypes on every
    rank (None: the same params on every rank; skipped, as in ``fastadam.Adam``).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        comm: MPI.Intracomm | None = None,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
    ) -> None:
        name = f"{type(self).__name__}()"
        self._step_name = f"{type(self).__name__}.step()"
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"{name}: comm must be an mpi4py.MPI.Intracomm (such as MPI.COMM_WORLD), got {type(comm).__name__}")
        error: BaseException | None = None
        signature: Any = None
        try:
            # A fastadam.Adam over the same params, never stepped: it checks the params and
            # groups, reads gradients in the params' structure and holds param_groups, as
            # fastadam.Adam does (it allocates no state).
            self._spec = self._make_spec(
                params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay, max_grad_norm=max_grad_norm,
                master_weights=master_weights, state_dtype=state_dtype,
            )
            self._check_supported(name)
            signature = (
                [(p.shape, p.dtype.name) for p in self._spec._params], list(self._spec._group_sizes),
                self._hyper_signature(), self._spec.max_grad_norm, getattr(self._spec, "min_size", None),
            )
        except (TypeError, ValueError) as e:
            error = e
        # Its own communicator: the optimizer's messages never meet the caller's.
        self._comm: MPI.Intracomm = comm.Dup()
        gathered = self._comm.allgather((_error_of(error), signature))
        try:
            _raise_agreed(self._comm, error, [g[0] for g in gathered])
            for r, (_, other) in enumerate(gathered):
                if other != gathered[0][1]:
                    raise ValueError(
                        f"{name}: rank {r}'s params or hyper-parameters differ from rank 0's: every rank must build the "
                        "optimizer on params of the same shapes and dtypes, with the same param groups and settings"
                    )
        except (TypeError, ValueError):
            self._comm.Free()  # every rank raises here: the collective free is safe
            raise

        spec = self._spec
        self.param_groups: list[dict[str, Any]] = spec.param_groups
        self.max_grad_norm: float | None = spec.max_grad_norm
        self.rank: int = self._comm.rank
        self.world_size: int = self._comm.size
        self._params: list[np.ndarray] = list(spec._params)
        self._flat = [p.reshape(-1) for p in self._params]  # views (C-contiguous params)
        self._group_of = [g for g, size in enumerate(spec._group_sizes) for _ in range(size)]
        self._masters_on = [bool(self.param_groups[g].get("master_weights")) for g in self._group_of]
        self._mixed_settings = [tuple(_plain(group.get(k)) for k in _MIXED_KEYS) for group in self.param_groups]
        sizes = [int(p.size) for p in self._params]
        self._sizes = sizes
        self._bounds = shard_bounds(sizes, self.world_size)
        self._pieces = [_pieces(sizes, self._bounds[r], self._bounds[r + 1]) for r in range(self.world_size)]
        self._shard_size = self._bounds[self.rank + 1] - self._bounds[self.rank]
        # The shard in chunks, as every rank cuts every shard (senders and owner agree).
        chunk = max(SHARD_ALIGN, _RECV_ELEMENTS // (2 * max(1, self.world_size - 1)))
        self._chunks = [
            [_pieces(sizes, self._bounds[r] + a, self._bounds[r] + b) for a, b in _spans(0, self._bounds[r + 1] - self._bounds[r], chunk)]
            for r in range(self.world_size)
        ]
        for r, chunks in enumerate(self._chunks):  # offsets within the shard, not the chunk
            for c, (a, _) in enumerate(_spans(0, self._bounds[r + 1] - self._bounds[r], chunk)):
                chunks[c] = [(k, lo, hi, off + a) for k, lo, hi, off in chunks[c]]
        self._local = {k: (lo, hi, off) for k, lo, hi, off in self._pieces[self.rank]}
        # This rank's averaged gradients (one rank steps on the caller's gradients themselves).
        self._avg = np.zeros(self._shard_size if self.world_size > 1 else 0, np.float32)
        self._recv: list[np.ndarray] = []
        self._scratch = np.empty(_BLOCK if self.world_size > 1 else 0, np.float32)  # a widened bfloat16 block
        # This rank's state: per param with elements here, its 1-D arrays (state_keys, master_param).
        self._state: dict[int, dict[str, np.ndarray]] = {}
        # Which state each param has, the same on every rank (a rank without its elements too).
        self._present: list[tuple[str, ...]] = [() for _ in sizes]
        self._steps = np.zeros(len(sizes), dtype=np.int64)
        self._guard = StepGuard(self._step_name)
        self.last_step_skipped = False
        self.last_step_times: dict[str, float] = {}

    def _make_spec(self, params: Params, **hyper: Any) -> Adam:
        return Adam(params, **hyper)

    def _quantized(self, k: int, key: str) -> bool:
        """Whether param k's ``key`` state is kept quantized (the 8-bit and 4-bit optimizers)."""
        return False

    # ----- checks ----------------------------------------------------------------------

    def _check_supported(self, where: str) -> None:
        spec = self._spec
        for g, (group, size) in enumerate(zip(spec.param_groups, spec._group_sizes)):
            if group.get("stochastic_rounding"):
                raise ValueError(
                    f"{where}: param_groups[{g}] has stochastic_rounding=True, which {type(self).__name__} does not offer "
                    "(its random bits follow an element's index in the whole tensor); use master_weights=True"
                )
        for i, (p, g) in enumerate(zip(spec._params, (g for g, s in enumerate(spec._group_sizes) for _ in range(s)))):
            master = bool(spec.param_groups[g].get("master_weights"))
            if p.dtype.name == "float32" or (master and p.dtype.name in ("bfloat16", "float16")):
                continue
            label = self._label("params", i, spec._names)
            if p.dtype.name in ("bfloat16", "float16"):
                raise TypeError(
                    f"{where}: {label} is {p.dtype.name}; {type(self).__name__} updates float32 params, or bfloat16/float16 "
                    "params through float32 master weights: give its group master_weights=True"
                )
            raise TypeError(
                f"{where}: {label} is {p.dtype.name}; {type(self).__name__} takes float32 params (or bfloat16/float16 with "
                "master_weights=True); put float64 params in a fastadam.Adam"
            )

    @staticmethod
    def _label(what: str, i: int, names: Sequence[str | None]) -> str:
        return f"{what}[{i}]" if names[i] is None else f"{what}[{names[i]!r}]"

    def _hyper_signature(self) -> tuple[Any, ...]:
        return _groups_signature(self._spec.param_groups)

    def _check_step(self, grads: Grads, grad_scale: float | None) -> tuple[list[np.ndarray | None], tuple[Any, ...]]:
        """This rank's gradients and settings, checked; and what every rank must agree on."""
        name = self._step_name
        spec = self._spec
        flat = [p for group in self.param_groups for p in group.get("params", ())]
        if len(self.param_groups) != len(spec._group_sizes) or len(flat) != len(self._params) or any(
            a is not b for a, b in zip(flat, self._params)
        ):
            raise ValueError(
                f"{name}: the params in param_groups changed; a sharded optimizer keeps the params it was built with "
                "(build a new one, and load its state_dict, for other params)"
            )
        # Still writeable, unresized float arrays (the kernel must not refuse them on one rank only).
        _core._check_params(self._params, name, True)
        for g, group in enumerate(self.param_groups):
            where = f"{name}: param_groups[{g}]"
            check_group(ADAM, group, where)
            if tuple(_plain(group.get(k)) for k in _MIXED_KEYS) != self._mixed_settings[g]:
                raise ValueError(
                    f"{where}: master_weights, state_dtype and stochastic_rounding stay as the optimizer was built "
                    f"({dict(zip(_MIXED_KEYS, self._mixed_settings[g]))}); build a new optimizer for others"
                )
        self.max_grad_norm = check_max_grad_norm(self.max_grad_norm, name)
        if grad_scale is not None:
            if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name}: grad_scale must be a real number (gradients are divided by it), got {type(grad_scale).__name__}")
            if not (0.0 < float(grad_scale) <= float(np.finfo(np.float32).max)) or not np.float32(grad_scale) > 0:
                raise ValueError(f"{name}: grad_scale must be a positive finite float32 number, got {grad_scale!r}")
            grad_scale = float(grad_scale)
        grad_list = list(spec._grad_list(grads))
        kinds: list[str | None] = []
        for i, (grad, param) in enumerate(zip(grad_list, self._params)):
            if grad is None:
                kinds.append(None)
                continue
            label = self._label("grads", i, spec._names)
            if not isinstance(grad, np.ndarray):
                raise TypeError(f"{name}: {label} must be a numpy array or None, got {type(grad).__name__}")
            kind = grad.dtype.name
            if kind not in _GRAD_DTYPES:
                raise TypeError(
                    f"{name}: {label} has dtype {grad.dtype}; gradients are float32, bfloat16 (ml_dtypes) or float16 arrays"
                )
            if grad.shape != param.shape:
                raise ValueError(f"{name}: {label} has shape {grad.shape} but its param has shape {param.shape}")
            if not (grad.flags.c_contiguous and grad.flags.aligned and grad.dtype.isnative):
                raise ValueError(
                    f"{name}: {label} is not a C-contiguous, aligned array in native byte order (it is sent from where it "
                    "is): pass numpy.ascontiguousarray(grad)"
                )
            kinds.append(kind)
        agreed = (tuple(kinds), grad_scale, self.max_grad_norm, self._hyper_signature())
        return grad_list, agreed

    def _disagreement(self, gathered: Sequence[tuple[Any, ...]]) -> str | None:
        """What differs between the ranks' gradients or settings (the same text on every rank)."""
        first = gathered[0]
        for r, other in enumerate(gathered[1:], start=1):
            if other == first:
                continue
            names = self._spec._names
            for i, (a, b) in enumerate(zip(first[0], other[0])):
                if a != b:
                    return (
                        f"{self._step_name}: the gradient of {self._label('params', i, names)} is {a or 'None'} on rank 0 "
                        f"but {b or 'None'} on rank {r}; every rank gives each param a gradient of one dtype (or None on all)"
                    )
            for what, a, b in (("grad_scale", first[1], other[1]), ("max_grad_norm", first[2], other[2])):
                if a != b:
                    return f"{self._step_name}: {what} is {a!r} on rank 0 but {b!r} on rank {r}; every rank must pass the same"
            return (
                f"{self._step_name}: the param groups' hyper-parameters differ between rank 0 ({first[3]!r}) and rank {r} "
                f"({other[3]!r}); set them alike on every rank"
            )
        return None

    # ----- the step --------------------------------------------------------------------

    def step(self, grads: Grads, *, grad_scale: float | None = None) -> float | None:
        """Average every rank's ``grads`` and update the params in place, on every rank
        (collective: every rank calls it).

        ``grads`` in the params' structure (a list, one list per group, or a dict by name);
        float32, bfloat16 or float16 arrays (None: skipped, on every rank alike).
        ``grad_scale`` divides the averaged gradients (loss scaling). Returns the global L2
        norm of the averaged (unscaled) gradients when ``grad_scale`` or ``max_grad_norm`` is
        set, the same bits on every rank, else None; a non-finite norm skips the step on
        every rank (nothing written, ``last_step_skipped`` True). Bad input on any rank
        (a wrong shape, dtype or layout; gradients or settings that differ between ranks)
        raises the same error on every rank before anything is written.
        """
        with self._guard:
            t0 = time.perf_counter()
            error: BaseException | None = None
            agreed: tuple[Any, ...] | None = None
            grad_list: list[np.ndarray | None] = []
            try:
                grad_list, agreed = self._check_step(grads, grad_scale)
            except (TypeError, ValueError) as e:
                error = e
            gathered = self._comm.allgather((_error_of(error), agreed))
            _raise_agreed(self._comm, error, [g[0] for g in gathered])
            differs = self._disagreement([g[1] for g in gathered])
            if differs is not None:
                raise ValueError(differs)
            assert agreed is not None
            kinds: tuple[str | None, ...] = agreed[0]
            scale: float | None = agreed[1]
            stepped = [kind is not None for kind in kinds]
            checks = scale is not None or self.max_grad_norm is not None
            t1 = time.perf_counter()
            if self.world_size == 1:
                # One rank: the average is the gradients as they are (x / 1 == x), and the
                # kernel's own norm is the global one: fastadam.Adam's step, without copies.
                result = self._update(stepped, [g.reshape(-1) if g is not None else None for g in grad_list], scale, self.max_grad_norm)
                t4 = time.perf_counter()
                self.last_step_skipped = result is not None and not math.isfinite(result)
                self.last_step_times = {"agree": t1 - t0, "grads": 0.0, "norm": 0.0, "update": t4 - t1, "params": 0.0}
                return result
            with np.errstate(all="ignore"):  # inf/NaN gradients average as one process's would, silently
                self._average(grad_list, kinds)
            t2 = time.perf_counter()
            norm = math.nan
            if checks:
                norm = self._norm(stepped, scale)
                if not math.isfinite(norm):
                    self.last_step_skipped = True
                    self.last_step_times = {"agree": t1 - t0, "grads": t2 - t1, "norm": time.perf_counter() - t2, "update": 0.0, "params": 0.0}
                    return norm
                clip = self.max_grad_norm / (norm + 1e-6) if self.max_grad_norm is not None else 1.0
                if scale is not None or clip < 1.0:
                    self._transform(stepped, scale, clip)
            t3 = time.perf_counter()
            self._update(stepped, None, None, None)
            t4 = time.perf_counter()
            self._gather_params(stepped)
            t5 = time.perf_counter()
            self.last_step_skipped = False
            self.last_step_times = {"agree": t1 - t0, "grads": t2 - t1, "norm": t3 - t2, "update": t4 - t3, "params": t5 - t4}
            return norm if checks else None

    def _transform(self, stepped: Sequence[bool], scale: float | None, clip: float) -> None:
        """The kernel's gradient transform on this shard's averaged gradients, as
        fastadam.reference: ``g = float32(g) / float32(grad_scale)``, then ``g * float32(clip)``
        when ``clip`` (torch's clip_grad_norm_ coefficient) is below 1."""
        coef = np.float32(clip)
        with np.errstate(all="ignore"):
            for k, lo, hi, off in self._pieces[self.rank]:
                if not stepped[k]:
                    continue
                for a, b in _spans(off, off + hi - lo, _BLOCK):
                    out = self._avg[a:b]
                    if scale is not None:
                        np.divide(out, np.float32(scale), out=out)
                    if clip < 1.0:
                        np.multiply(out, coef, out=out)

    def _average(self, grads: Sequence[np.ndarray | None], kinds: Sequence[str | None]) -> None:
        """Every shard's gradient pieces to its owner; this rank's averaged into ``_avg``."""
        comm, me, n = self._comm, self.rank, self.world_size
        flat = [None if g is None else g.reshape(-1) for g in grads]
        sends: list[MPI.Request] = []
        for step in range(1, n):  # others' shards, starting with the next rank's
            dst = (me + step) % n
            for chunk in self._chunks[dst]:
                for k, lo, hi, _ in chunk:
                    g = flat[k]
                    if g is not None:
                        sends.append(comm.Isend(_bytes(g[lo:hi]), dest=dst, tag=_TAG_GRAD))
        chunks = self._chunks[me]
        dtypes = {k: g.dtype for k, g in enumerate(grads) if g is not None}

        def post(c: int, half: int) -> tuple[list[MPI.Request], list[tuple[int, int, int, int, int]]]:
            # (tensor, start, stop, shard offset, byte offset in a receive buffer, 64-byte aligned)
            segments, need = [], 0
            for k, lo, hi, off in chunks[c]:
                if kinds[k] is not None:
                    segments.append((k, lo, hi, off, need))
                    need += -(-(hi - lo) * dtypes[k].itemsize // 64) * 64
            requests = []
            for j, src in enumerate(r for r in range(n) if r != me):
                buf = self._buffer(half * (n - 1) + j, need)
                for k, lo, hi, _, at in segments:
                    nbytes = (hi - lo) * dtypes[k].itemsize
                    requests.append(comm.Irecv([buf[at : at + nbytes], MPI.BYTE], source=src, tag=_TAG_GRAD))
            return requests, segments

        pending = post(0, 0) if chunks else ([], [])
        nf = np.float32(n)
        for c in range(len(chunks)):
            requests, segments = pending
            if c + 1 < len(chunks):
                pending = post(c + 1, (c + 1) % 2)  # the next chunk arrives while this one is summed
            MPI.Request.Waitall(requests)
            for k, lo, hi, off, at in segments:
                nbytes = (hi - lo) * dtypes[k].itemsize
                received = iter(self._recv[(c % 2) * (n - 1) : (c % 2 + 1) * (n - 1)])
                parts = [flat[k][lo:hi] if src == me else next(received)[at : at + nbytes].view(dtypes[k]) for src in range(n)]  # type: ignore[index]
                acc = self._avg[off : off + hi - lo]
                bf16 = dtypes[k].name == "bfloat16"
                # Block by block, so that a block's sum stays in the cache from its first add to its division.
                for a, b in _spans(0, hi - lo, _BLOCK):
                    out = acc[a:b]
                    if bf16:
                        _widen_bf16(parts[0][a:b], out)
                        for part in parts[1:]:
                            np.add(out, _widen_bf16(part[a:b], self._scratch[: b - a]), out=out)
                    else:
                        # dtype=float32: float16 widened exactly, every add in float32
                        np.add(parts[0][a:b], parts[1][a:b], out=out, dtype=np.float32)
                        for part in parts[2:]:
                            np.add(out, part[a:b], out=out, dtype=np.float32)
                    np.divide(out, nf, out=out)
        MPI.Request.Waitall(sends)

    def _buffer(self, slot: int, nbytes: int) -> np.ndarray:
        while len(self._recv) <= slot:
            self._recv.append(np.empty(0, np.uint8))
        if self._recv[slot].size < nbytes:
            self._recv[slot] = np.empty(nbytes, np.uint8)
        return self._recv[slot]

    def _norm(self, stepped: Sequence[bool], grad_scale: float | None) -> float:
        """The global L2 norm of the averaged gradients: every rank's block sums, in order."""
        mine = [self._avg[off : off + hi - lo] for k, lo, hi, off in self._pieces[self.rank] if stepped[k]]
        sums = _core._grad_sq_block_sums(mine, grad_scale)
        counts = [sum(-(-(hi - lo) // SHARD_ALIGN) for k, lo, hi, _ in pieces if stepped[k]) for pieces in self._pieces]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        every = np.empty(sum(counts), np.float64)
        self._comm.Allgatherv([sums, MPI.DOUBLE], [every, (counts, displs), MPI.DOUBLE])
        # In block order, one after the other from 0.0: grad_sq_sum's sum (accumulate is sequential).
        total = float(np.add.accumulate(every)[-1]) if every.size else 0.0
        return math.sqrt(total)

    def _update(
        self, stepped: Sequence[bool], flat_grads: Sequence[np.ndarray | None] | None, grad_scale: float | None,
        max_grad_norm: float | None,
    ) -> float | None:
        """State for params stepping the first time, then the fused step on this shard, on
        the averaged gradients (``flat_grads`` None) or, with one rank, on ``flat_grads`` with
        the kernel's own gradient transform (its result returned: a non-finite norm means it
        skipped the step, and the state it created is removed)."""
        fresh: dict[str, list[int]] = {}
        present_before = list(self._present)
        for k, (present, go) in enumerate(zip(self._present, stepped)):
            if not go:
                continue
            needed = ADAM.needed_keys(self.param_groups[self._group_of[k]]) + (("master_param",) if self._masters_on[k] else ())
            missing = [key for key in needed if key not in present]
            for key in missing:
                fresh.setdefault(key, []).append(k)
            if missing:
                self._present[k] = tuple(key for key in ADAM.state_keys + ("master_param",) if key in present or key in needed)
        for kind, key in enumerate(ADAM.state_keys + ("master_param",)):
            local = [k for k in fresh.get(key, ()) if k in self._local]
            for k, array in zip(local, self._zeros_local(kind, key, local)):
                lo, hi, _ = self._local[k]
                if key == "master_param":
                    np.copyto(array, self._flat[k][lo:hi])  # exact widening, as fastadam.Adam's first step
                self._state.setdefault(k, {})[key] = array
        pieces = [(k, lo, hi, off) for k, lo, hi, off in self._pieces[self.rank] if stepped[k]]
        result = None
        if pieces:
            params, grads, avgs, sqs, maxes, outs = [], [], [], [], [], []
            for k, lo, hi, off in pieces:
                state = self._state[k]
                master = state.get("master_param") if self._masters_on[k] else None
                params.append(self._flat[k][lo:hi] if master is None else master)
                outs.append(None if master is None else self._flat[k][lo:hi])
                grads.append(self._avg[off : off + hi - lo] if flat_grads is None else flat_grads[k][lo:hi])  # type: ignore[index]
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                maxes.append(state.get("max_exp_avg_sq") if self.param_groups[self._group_of[k]].get("amsgrad") else None)
            result = _core._adam_step_groups(
                self._step_name, params, grads, avgs, sqs, maxes, outs, self._steps, [k for k, *_ in pieces],
                [self._group_of[k] for k, *_ in pieces], self.param_groups, grad_scale, max_grad_norm, None, None,
            )
        elif grad_scale is not None or max_grad_norm is not None:
            result = 0.0  # one rank and no param with elements: the norm of nothing
        if result is not None and not math.isfinite(result):
            self._present = present_before  # skipped: as fastadam.Adam, a skipped step leaves no state behind
            for key, params_of in fresh.items():
                for k in params_of:
                    self._state.get(k, {}).pop(key, None)
                    if not self._state.get(k, True):
                        del self._state[k]
            return result
        # Counted here for the stepped params without elements on this rank (the call counted the others).
        for k, go in enumerate(stepped):
            if go and k not in self._local:
                self._steps[k] += 1
        return result

    def _zeros_local(self, kind: int, key: str, ks: Sequence[int]) -> list[Any]:
        """New zeroed ``key`` states (state kind number ``kind``) of this rank's pieces of the
        params ``ks``, in one block (the 4K-aliasing placement): arrays, or QuantizedState
        (codes and absmax of the piece's blocks, which are the tensor's own: a piece starts on
        a multiple of SHARD_ALIGN)."""
        likes: list[tuple[tuple[int, ...], np.dtype[Any]]] = []
        for k in ks:
            n = self._local[k][1] - self._local[k][0]
            if self._quantized(k, key):
                bits = self._spec.bits  # type: ignore[attr-defined]
                likes.append(((n if bits == 8 else (n + 1) // 2,), np.dtype(np.uint8)))
                likes.append(((-(-n // QUANT_BLOCK[bits]),), np.dtype(np.float32)))
            else:
                likes.append(((n,), self._buffer_dtype(k, key)))
        arrays = iter(zeros_packed(likes, stagger=state_stagger(kind)))
        out: list[Any] = []
        for k in ks:
            first = next(arrays)
            quantized = self._quantized(k, key)
            out.append(QuantizedState(first, next(arrays), self._spec.bits, kind == 0) if quantized else first)  # type: ignore[attr-defined]
        return out

    def _buffer_dtype(self, k: int, key: str) -> np.dtype[Any]:
        if key == "master_param":
            return np.dtype(np.float32)
        return self._spec._state_dtype(self.param_groups[self._group_of[k]], self._params[k])

    def _gather_params(self, stepped: Sequence[bool]) -> None:
        """Each owner's updated pieces into every other rank's params."""
        comm, me = self._comm, self.rank
        requests: list[MPI.Request] = []
        for owner, pieces in enumerate(self._pieces):
            for k, lo, hi, _ in pieces:
                if not stepped[k]:
                    continue
                for a, b in _spans(lo, hi, _MAX_MESSAGE):
                    part = _bytes(self._flat[k][a:b])
                    if owner == me:
                        requests.extend(comm.Isend(part, dest=dst, tag=_TAG_PARAM) for dst in range(self.world_size) if dst != me)
                    else:
                        requests.append(comm.Irecv(part, source=owner, tag=_TAG_PARAM))
        MPI.Request.Waitall(requests)

    # ----- state -----------------------------------------------------------------------

    @property
    def shard(self) -> list[tuple[int, int, int]]:
        """This rank's elements: (param index, start, stop) of each flattened param it owns."""
        return [(k, lo, hi) for k, lo, hi, _ in self._pieces[self.rank]]

    @property
    def state(self) -> dict[int, dict[str, Any]]:
        """This rank's state: per param with elements here (``shard``), its step count and its
        1-D arrays over those elements (live arrays, not copies); a quantized state as its
        ``exp_avg_codes`` and ``exp_avg_absmax`` (those of the shard's blocks), and so on."""
        out: dict[int, dict[str, Any]] = {}
        for k, entry in sorted(self._state.items()):
            expanded: dict[str, Any] = {"step": float(self._steps[k])}
            for key, value in entry.items():
                if isinstance(value, QuantizedState):
                    expanded[f"{key}_codes"], expanded[f"{key}_absmax"] = value.codes, value.absmax
                else:
                    expanded[key] = value
            out[k] = expanded
        return out

    def state_dict(self) -> dict[str, Any]:
        """The whole state, gathered on every rank (collective), in ``fastadam.AdamW.state_dict()``'s
        layout for the full params: ``{"state": {index: {"step", "exp_avg", ...}}, "param_groups": [...]}``,
        whatever the number of ranks. Arrays are new (a snapshot), of each param's shape."""
        state: dict[int, dict[str, Any]] = {}
        for k, present in enumerate(self._present):
            if not present and not self._steps[k]:
                continue
            entry: dict[str, Any] = {"step": float(self._steps[k])}
            for key in present:
                if self._quantized(k, key):
                    codes, absmax = self._gather_quantized(k, key)
                    entry[f"{key}_codes"], entry[f"{key}_absmax"] = codes, absmax
                else:
                    entry[key] = self._gather(k, key)
            if any(self._quantized(k, key) for key in present) and self._spec.bits == 4:  # type: ignore[attr-defined]
                entry["param_shape"] = tuple(self._params[k].shape)  # as fastadam.AdamW4bit's (flat codes)
            state[k] = entry
        groups = []
        start = 0
        for group, size in zip(self.param_groups, self._spec._group_sizes):
            packed = {key: value for key, value in group.items() if key != "params"}
            packed["params"] = list(range(start, start + size))
            groups.append(packed)
            start += size
        return {"state": state, "param_groups": groups}

    def _gather(self, k: int, key: str) -> np.ndarray:
        mine = self._state[k][key] if k in self._local else None
        full = self._allgather_pieces(k, mine, self._sizes[k], self._buffer_dtype(k, key), lambda lo, hi: (lo, hi))
        return full.reshape(self._params[k].shape)

    def _gather_quantized(self, k: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Param k's whole ``key`` codes and absmax, in fastadam.AdamW8bit's (AdamW4bit's) layout."""
        bits = self._spec.bits  # type: ignore[attr-defined]
        mine: Any = self._state[k][key] if k in self._local else None  # a QuantizedState
        n = self._sizes[k]
        codes = self._allgather_pieces(k, None if mine is None else mine.codes, *_codes_span(bits, n))
        absmax = self._allgather_pieces(k, None if mine is None else mine.absmax, *_absmax_span(bits, n))
        return (codes.reshape(self._params[k].shape) if bits == 8 else codes), absmax

    def _allgather_pieces(
        self, k: int, mine: np.ndarray | None, size: int, dtype: Any, span: Any
    ) -> np.ndarray:
        """An array of ``size`` elements of ``dtype`` gathered from every rank's piece of param
        k: ``span(lo, hi)`` is where the piece of elements [lo, hi) lies in it."""
        full = np.empty(size, dtype)
        counts, displs = [], []
        for pieces in self._pieces:
            lo, hi = next(((lo, hi) for j, lo, hi, _ in pieces if j == k), (0, 0))
            a, b = span(lo, hi) if hi > lo else (0, 0)
            counts.append((b - a) * full.itemsize)
            displs.append(a * full.itemsize)
        self._comm.Allgatherv(_bytes(full[:0] if mine is None else mine), [full.view(np.uint8), (counts, displs), MPI.BYTE])
        return full

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` (saved with any number of ranks) or from
        ``fastadam.Adam``/``AdamW`` or ``fastadam.torch`` with the same params; each rank keeps
        its shard (collective). Everything is checked, and agreed between the ranks, before
        anything changes."""
        name = f"{type(self).__name__}.load_state_dict()"
        error: BaseException | None = None
        loaded: Any = None
        signature: Any = None
        try:
            loaded = self._check_loaded(state_dict, name)
            signature = (loaded[2].tolist(), _groups_signature(loaded[0]))
        except (TypeError, ValueError, KeyError) as e:
            error = e if not isinstance(e, KeyError) else ValueError(f"{name}: the state dict lacks {e}")
        gathered = self._comm.allgather((_error_of(error), signature))
        _raise_agreed(self._comm, error, [g[0] for g in gathered])
        if any(g[1] != signature for g in gathered):
            raise ValueError(f"{name}: the ranks loaded different state dicts (step counts or param groups differ); load one on every rank")
        groups, entries, steps = loaded
        state: dict[int, dict[str, np.ndarray]] = {}
        present: list[tuple[str, ...]] = [() for _ in self._sizes]
        for k, buffers in entries.items():
            present[k] = tuple(key for key in ADAM.state_keys + ("master_param",) if key in buffers)
        for kind, key in enumerate(ADAM.state_keys + ("master_param",)):
            local = [k for k in sorted(entries) if key in entries[k] and k in self._local]
            for k, array in zip(local, self._zeros_local(kind, key, local)):
                lo, hi, _ = self._local[k]
                whole = entries[k][key]
                if isinstance(array, QuantizedState):
                    n = self._sizes[k]
                    a, b = _codes_span(array.bits, n)[2](lo, hi)
                    array.codes[...] = whole.codes.reshape(-1)[a:b]
                    a, b = _absmax_span(array.bits, n)[2](lo, hi)
                    array.absmax[...] = whole.absmax[a:b]
                else:
                    array[...] = whole[lo:hi]
                state.setdefault(k, {})[key] = array
        for group, new in zip(self.param_groups, groups):  # the same dicts: the caller's references stay valid
            params = group["params"]
            group.clear()
            group.update(new)
            group["params"] = params
        self._state = state
        self._present = present
        self._steps = steps

    def _check_loaded(self, state_dict: Mapping[str, Any], name: str) -> tuple[list[dict[str, Any]], dict[int, dict[str, np.ndarray]], np.ndarray]:
        """The new groups, each loaded param's flattened buffers (views where they can be) and the step counts."""
        spec = self._spec
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: the state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        for saved, size in zip(saved_groups, spec._group_sizes):
            if len(saved["params"]) != size:
                raise ValueError(f"{name}: a saved param group has {len(saved['params'])} params, this optimizer's {size}")
        order = [int(i) for saved in saved_groups for i in saved["params"]]
        index_of = {saved_index: i for i, saved_index in enumerate(order)}
        groups = []
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            updated = dict(group)
            updated.update({k: v for k, v in saved.items() if k != "params"})
            if "betas" in updated:
                updated["betas"] = tuple(updated["betas"])
            if updated.get("state_dtype") is not None:
                updated["state_dtype"] = _state_dtype_of(updated["state_dtype"], name)
            check_group(ADAM, updated, name)
            if tuple(_plain(updated.get(k)) for k in _MIXED_KEYS) != self._mixed_settings[g]:
                raise ValueError(
                    f"{name}: param_groups[{g}] was saved with {dict((k, _plain(updated.get(k))) for k in _MIXED_KEYS)}, this "
                    f"optimizer has {dict(zip(_MIXED_KEYS, self._mixed_settings[g]))}: build it with the saved settings"
                )
            groups.append(updated)
        entries: dict[int, dict[str, np.ndarray]] = {}
        steps = np.zeros(len(self._params), dtype=np.int64)
        for saved_index, entry in state_dict["state"].items():
            if int(saved_index) not in index_of:
                raise ValueError(f"{name}: state for unknown parameter index {saved_index}")
            k = index_of[int(saved_index)]
            param = self._params[k]
            group = groups[self._group_of[k]]
            # quantized optimizers: the entry's moments as whole-param QuantizedStates (large
            # params; fp32 moments quantized) or float32 arrays (small ones), as fastadam.AdamW8bit loads them
            entry = self._spec._loaded_entry(entry, param, f"{name}: parameter {saved_index}")
            check_loaded_entry(ADAM, entry, group, f"{name}: parameter {saved_index}")
            buffers: dict[str, np.ndarray] = {}
            for key, value in entry.items():
                if key == "step":
                    step = float(np.asarray(_to_numpy(value)).reshape(()))
                    steps[k] = int(step)
                    continue
                if key == "master_param" and not self._masters_on[k]:
                    raise ValueError(
                        f"{name}: parameter {saved_index} has a master_param but its group has master_weights=False: "
                        "build the optimizer with master_weights=True to load it (or drop the entry)"
                    )
                if key not in ADAM.state_keys and key != "master_param":
                    raise ValueError(f"{name}: unknown state entry {key!r} for parameter {saved_index}")
                if value is None:
                    continue
                if isinstance(value, QuantizedState):  # checked by _loaded_entry
                    buffers[key] = value  # type: ignore[assignment]
                    continue
                array = np.asarray(_to_numpy(value), dtype=self._buffer_dtype(k, key))
                if array.shape != param.shape:
                    raise ValueError(f"{name}: {key} of parameter {saved_index} has shape {array.shape}, the parameter {param.shape}")
                buffers[key] = array.reshape(-1)
            entries[k] = buffers
        return groups, entries, steps

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (rank {self.rank} of {self.world_size}, {self._shard_size} of {sum(self._sizes)} elements"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {group[k]}" for k in sorted(group) if k != "params")
        return "\n".join(lines) + "\n)"


class ShardedAdamW(ShardedAdam):
    """:class:`ShardedAdam` with decoupled weight decay, as ``fastadam.AdamW``
    (``p = p * (1 - lr*weight_decay)`` before the Adam update); default ``weight_decay=1e-2``."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        comm: MPI.Intracomm | None = None,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, comm=comm, maximize=maximize, decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm, master_weights=master_weights, state_dtype=state_dtype,
        )


class ShardedAdam8bit(ShardedAdam):
    r""":class:`ShardedAdam` with the 8-bit blockwise-quantized states of
    :class:`fastadam.Adam8bit`: the same bits on every rank as ``fastadam.Adam8bit`` stepping,
    in one process, on the averaged gradients. A shard's pieces start on multiples of 4096
    elements of their tensor, so each rank's codes and absmax are those of whole blocks of
    256 elements of one tensor, the tensor's own: a rank keeps about ``S * (2 + 8/256)``
    bytes of state for its ``S`` elements (``+ 4 * S`` with master weights) against 8 * S
    in float32. Params of fewer than ``min_8bit_size`` elements keep float32 states.

    ``state_dict()`` gathers fastadam.AdamW8bit's layout (``exp_avg_codes``,
    ``exp_avg_absmax``, ...), whatever the number of ranks; ``load_state_dict`` takes it, or
    a float32 state dict (whose moments it quantizes, as fastadam.Adam8bit does). Args: as
    :class:`ShardedAdam`, except ``amsgrad=True`` and ``state_dtype`` (ValueError), and
        min_8bit_size: params of fewer elements keep float32 states (default 4096).
    """

    _quantized_class: type[Adam8bit] = Adam8bit

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        comm: MPI.Intracomm | None = None,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        min_8bit_size: int = 4096,
    ) -> None:
        self._min_size_argument = min_8bit_size
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, comm=comm, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, max_grad_norm=max_grad_norm,
            master_weights=master_weights, state_dtype=state_dtype,
        )

    def _make_spec(self, params: Params, **hyper: Any) -> Adam:
        cls = self._quantized_class
        return cls(params, **hyper, **{cls._min_keyword: self._min_size_argument})  # type: ignore[arg-type]

    def _quantized(self, k: int, key: str) -> bool:
        return key in ("exp_avg", "exp_avg_sq") and self._spec._quantizes(self._params[k])  # type: ignore[attr-defined]

    @property
    def bits(self) -> int:
        """Bits per code of the quantized states (8 or 4)."""
        return int(self._spec.bits)  # type: ignore[attr-defined]

    @property
    def min_size(self) -> int:
        """Params of fewer elements keep float32 states."""
        return int(self._spec.min_size)  # type: ignore[attr-defined]

    def _check_step(self, grads: Grads, grad_scale: float | None) -> tuple[list[np.ndarray | None], tuple[Any, ...]]:
        for g, group in enumerate(self.param_groups):  # amsgrad set between steps: refused on every rank
            refuse_quantized_extras(group.get("amsgrad"), None, self.bits, f"{self._step_name}: param_groups[{g}]")
        return super()._check_step(grads, grad_scale)


class ShardedAdamW8bit(ShardedAdam8bit):
    """:class:`ShardedAdam8bit` with decoupled weight decay, as ``fastadam.AdamW8bit``; default ``weight_decay=1e-2``."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        comm: MPI.Intracomm | None = None,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, comm=comm, maximize=maximize, decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm, master_weights=master_weights, state_dtype=state_dtype,
            min_8bit_size=min_8bit_size,
        )


class ShardedAdam4bit(ShardedAdam8bit):
    """:class:`ShardedAdam8bit` with the 4-bit states of :class:`fastadam.Adam4bit` (two codes
    a byte, one absmax per 128 elements: about ``S * (0.5 + 4/128)`` bytes of state for ``S``
    elements); ``state_dict()`` in fastadam.AdamW4bit's layout. Params of fewer than
    ``min_4bit_size`` elements keep float32 states."""

    _quantized_class = Adam4bit

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        comm: MPI.Intracomm | None = None,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        min_4bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, comm=comm, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, max_grad_norm=max_grad_norm,
            master_weights=master_weights, state_dtype=state_dtype, min_8bit_size=min_4bit_size,
        )


class ShardedAdamW4bit(ShardedAdam4bit):
    """:class:`ShardedAdam4bit` with decoupled weight decay, as ``fastadam.AdamW4bit``; default ``weight_decay=1e-2``."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        comm: MPI.Intracomm | None = None,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: Any = None,
        min_4bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, comm=comm, maximize=maximize, decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm, master_weights=master_weights, state_dtype=state_dtype,
            min_4bit_size=min_4bit_size,
        )
