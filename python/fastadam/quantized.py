"""Blockwise-quantized optimizer states (8-bit and 4-bit codes with one float32 absmax per block).

A :class:`QuantizedState` is what ``fastadam.adam_step_multi`` takes in place of an
``exp_avg`` or ``exp_avg_sq`` array: the kernel dequantizes each block, runs the float32
step and quantizes the new values, in one pass (docs/design.md, "Quantized states"). The
arithmetic is specified in :mod:`fastadam.reference` (``quantize_blockwise``,
``dequantize_blockwise``, ``quant_map``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _core

__all__ = ["QuantizedState", "QUANT_BLOCK", "quantize", "dequantize_state_dict", "quantize_state_dict", "QUANTIZED_KEYS"]

# Elements per block of one absmax, by bits per code (bitsandbytes' and torchao's sizes).
QUANT_BLOCK = {8: 256, 4: 128}


class QuantizedState(NamedTuple):
    """One quantized state tensor of ``size`` elements, updated in place by the kernel.

    ``codes``: uint8, one code per element (``bits=8``) or two per byte, the even element
    in the high nibble (``bits=4``); ``absmax``: float32, one per block of
    ``QUANT_BLOCK[bits]`` elements (256 or 128; the last block may be shorter). ``signed``:
    the signed code book (``exp_avg``) or the unsigned one (``exp_avg_sq``). Element ``i``
    is ``quant_map(bits, signed)[code_i] * absmax[i // block]``.
    """

    codes: np.ndarray
    absmax: np.ndarray
    bits: int
    signed: bool

    @staticmethod
    def zeros(size: int, *, bits: int = 8, signed: bool = True) -> QuantizedState:
        """A state of ``size`` zeros (every absmax 0)."""
        block = _block(bits)
        return QuantizedState(
            np.zeros(size if bits == 8 else (size + 1) // 2, np.uint8), np.zeros(math.ceil(size / block), np.float32), bits, signed
        )

    @property
    def nbytes(self) -> int:
        """Bytes of memory the state takes (codes and absmax)."""
        return int(self.codes.nbytes + self.absmax.nbytes)

    def dequantize(self, size: int | None = None) -> np.ndarray:
        """The state's ``size`` values as a new float32 array (1-D). ``size`` defaults to the
        number of codes (8 bits) or twice the number of bytes (4 bits)."""
        n = _size(self, size)
        out = np.empty(n, np.float32)
        _core._dequantize_blockwise(self, out)
        return out


def quantize(x: np.ndarray, *, bits: int = 8, signed: bool = True) -> QuantizedState:
    """``x`` (float32, any shape, read as flat) as a new blockwise-quantized state: the code
    nearest to each value over its block's absmax (fastadam.reference.quantize_blockwise,
    same bits). ``signed=True`` for an ``exp_avg``, False for an ``exp_avg_sq``."""
    a = np.asarray(x)
    if a.dtype != np.float32:
        raise TypeError(f"quantize(): x must be float32, got {a.dtype} (convert it with x.astype(numpy.float32))")
    flat = np.ascontiguousarray(a).reshape(-1)
    state = QuantizedState.zeros(flat.size, bits=bits, signed=signed)
    _core._quantize_blockwise(flat, state)
    return state


def _size(state: QuantizedState, size: int | None) -> int:
    if size is not None:
        return int(size)
    return int(state.codes.size if state.bits == 8 else 2 * state.codes.size)


def _block(bits: int) -> int:
    if bits not in QUANT_BLOCK:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return QUANT_BLOCK[bits]


# ----- state dicts ----------------------------------------------------------------------
# The quantized optimizers (fastadam.Adam8bit, ..., fastadam.torch.AdamW8bit) keep, per
# quantized param, state[i] = {"step", "exp_avg_codes" (uint8), "exp_avg_absmax" (float32),
# "exp_avg_sq_codes", "exp_avg_sq_absmax"}; 8-bit codes have the param's shape (one per
# element, as bitsandbytes' and torchao's), 4-bit codes are flat (two a byte) and the entry
# also holds "param_shape", the param's shape, which their count does not give (and which
# tells a 4-bit entry from an 8-bit one). docs/design.md, "Quantized states".

QUANTIZED_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
_MOMENTS = ("exp_avg", "exp_avg_sq")


def is_quantized_entry(entry: Mapping[str, Any]) -> bool:
    """Whether a state-dict entry holds quantized moments (any of QUANTIZED_KEYS)."""
    return any(entry.get(k) is not None for k in QUANTIZED_KEYS)


def _is_tensor(value: object) -> bool:
    return hasattr(value, "detach") and hasattr(value, "numpy")


def _numpy_of(value: object, where: str) -> np.ndarray:
    """A NumPy array of a state value: an array as it is, a CPU torch tensor as a view of its
    memory (bfloat16 widened to float32, exact). TypeError for anything else."""
    if isinstance(value, np.ndarray):
        return value
    if _is_tensor(value):
        t: Any = value.detach().cpu()  # type: ignore[attr-defined]
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        out: np.ndarray = t.numpy()
        return out
    raise TypeError(f"{where} must be a NumPy array or a torch tensor, got {type(value).__name__}")


def entry_bits(entry: Mapping[str, Any]) -> int:
    """The bits of a quantized entry: 4 when it holds ``param_shape``, else 8."""
    return 4 if entry.get("param_shape") is not None else 8


def read_quantized_entry(
    entry: Mapping[str, Any], where: str, shape: tuple[int, ...] | None = None
) -> tuple[QuantizedState, QuantizedState, tuple[int, ...]]:
    """The two quantized moments of a state-dict entry, checked, as QuantizedState views
    (flat, C-contiguous; a copy only where the input was not contiguous), and the param's
    shape. ``shape``: the param's, when known (the entry must fit it). TypeError/ValueError
    (starting with ``where``) naming the entry and the fix otherwise."""
    missing = [k for k in QUANTIZED_KEYS if entry.get(k) is None]
    if missing:
        raise ValueError(
            f"{where}: a quantized state holds {', '.join(QUANTIZED_KEYS)}; this one lacks {', '.join(missing)}"
        )
    plain = [k for k in _MOMENTS if entry.get(k) is not None]
    if plain:
        raise ValueError(f"{where}: the state holds both quantized moments and plain {', '.join(plain)}; keep one form")
    bits = entry_bits(entry)
    block = QUANT_BLOCK[bits]
    arrays = {k: _numpy_of(entry[k], f"{where}: {k}") for k in QUANTIZED_KEYS}
    if bits == 4:
        saved = entry["param_shape"]
        try:
            own = tuple(int(d) for d in saved)
        except (TypeError, ValueError):
            raise TypeError(f"{where}: param_shape must be a tuple of ints, got {saved!r}") from None
    else:
        own = tuple(arrays["exp_avg_codes"].shape)
    if shape is not None:
        if (int(np.prod(own, dtype=np.int64)) != int(np.prod(shape, dtype=np.int64))) or (bits == 4 and own != tuple(shape)):
            raise ValueError(
                f"{where}: the state is of a param of shape {own}, this param has shape {tuple(shape)}: "
                "load the state dict of this model's optimizer"
            )
        own = tuple(shape)
    n = int(np.prod(own, dtype=np.int64))
    want_codes, want_blocks = (n if bits == 8 else (n + 1) // 2), -(-n // block)
    states = []
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = arrays[f"{key}_codes"], arrays[f"{key}_absmax"]
        if codes.dtype != np.uint8:
            raise TypeError(f"{where}: {key}_codes has dtype {codes.dtype}; codes are uint8 (one a byte, or two 4-bit codes a byte)")
        if absmax.dtype != np.float32:
            raise TypeError(f"{where}: {key}_absmax has dtype {absmax.dtype}; absmax is float32 (one per block)")
        if codes.size != want_codes:
            raise ValueError(
                f"{where}: {key}_codes has {codes.size} codes; a {bits}-bit state of {n} elements has {want_codes}"
                + (" (a 4-bit state holds param_shape: an entry without it is 8-bit)" if bits == 8 else "")
            )
        if absmax.size != want_blocks:
            raise ValueError(
                f"{where}: {key}_absmax has {absmax.size} entries; a {bits}-bit state of {n} elements has {want_blocks}, "
                f"one per block of {block}: a state dict of another block size? fastadam's blocks are 256 elements "
                "(8-bit) and 128 (4-bit); load such a state as plain float32 exp_avg/exp_avg_sq (its own tool "
                "dequantizes it), which the optimizer quantizes"
            )
        states.append(QuantizedState(np.ascontiguousarray(codes).reshape(-1), np.ascontiguousarray(absmax).reshape(-1), bits, signed))
    return states[0], states[1], own


def convert_entry(
    entry: Mapping[str, Any], bits: int | None, where: str, shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """A state-dict entry with its moments in the layout ``bits`` (8 or 4: quantized; None:
    plain float32 ``exp_avg``/``exp_avg_sq`` of the param's shape). New NumPy arrays for the
    converted moments; every other value as it is. An entry of another bit width is refused
    (ValueError naming the fix); so are amsgrad's ``max_exp_avg_sq`` and float64 moments
    when quantizing. ``shape``: the param's, when known."""
    out = dict(entry)
    if is_quantized_entry(entry) or entry.get("param_shape") is not None:
        m, v, own = read_quantized_entry(entry, where, shape)
        if bits == m.bits:
            return out
        if bits is not None:
            raise ValueError(
                f"{where}: the state is {m.bits}-bit and this optimizer keeps {bits}-bit states: convert the state dict "
                f"with fastadam.dequantize_state_dict(sd) first (float32 states, which a {bits}-bit optimizer quantizes)"
            )
        for key in QUANTIZED_KEYS:
            out.pop(key, None)
        out.pop("param_shape", None)
        out["exp_avg"], out["exp_avg_sq"] = (q.dequantize(int(np.prod(own, dtype=np.int64))).reshape(own) for q in (m, v))
        return out
    present = [k for k in _MOMENTS if entry.get(k) is not None]
    if bits is None or not present:
        return out
    if len(present) == 1:
        raise ValueError(f"{where}: the state has {present[0]} but not {({'exp_avg', 'exp_avg_sq'} - set(present)).pop()}")
    if entry.get("max_exp_avg_sq") is not None:
        raise ValueError(
            f"{where}: the state holds max_exp_avg_sq (amsgrad), which has no quantized form: load it into fastadam.Adam(amsgrad=True)"
        )
    new: dict[str, QuantizedState] = {}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        x = _numpy_of(entry[key], f"{where}: {key}")
        if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
            raise TypeError(f"{where}: {key} has dtype {x.dtype}; a moment is an array of floats")
        if x.dtype == np.float64:
            raise TypeError(
                f"{where}: {key} is float64; quantized states are for float32, bfloat16 and float16 params "
                "(keep float64 params in fastadam.Adam/AdamW)"
            )
        if shape is not None and x.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{where}: {key} has shape {x.shape}, the param {tuple(shape)}")
        new[key] = quantize(np.asarray(x, np.float32), bits=bits, signed=signed)  # bf16/fp16 widen exactly
    own = tuple(shape) if shape is not None else tuple(_numpy_of(entry["exp_avg"], where).shape)
    for key in _MOMENTS:
        del out[key]
    for key, q in new.items():
        out[f"{key}_codes"] = q.codes.reshape(own) if bits == 8 else q.codes
        out[f"{key}_absmax"] = q.absmax
    if bits == 4:
        out["param_shape"] = own
    return out


def _as_input(converted: dict[str, Any], original: Mapping[str, Any]) -> dict[str, Any]:
    """The converted entry's new arrays as torch tensors when the original held tensors."""
    if not any(_is_tensor(v) for v in original.values()):
        return converted
    import torch

    return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) and v is not original.get(k) else v) for k, v in converted.items()}


def _each_entry(state_dict: Mapping[str, Any], name: str) -> tuple[Mapping[Any, Any], list[Any]]:
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping) or "param_groups" not in state_dict:
        raise TypeError(f"{name}: state_dict must be an optimizer's state dict: {{'state': {{...}}, 'param_groups': [...]}}")
    return state_dict["state"], list(state_dict["param_groups"])


def dequantize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A quantized optimizer's state dict in the plain layout: each quantized entry's codes
    and absmax become float32 ``exp_avg``/``exp_avg_sq`` of the param's shape (code value
    times its block's absmax, exact in float32), loadable by ``fastadam.Adam/AdamW``,
    ``fastadam.torch.Adam/AdamW`` and ``torch.optim.Adam/AdamW`` (tensors when the dict
    held tensors). Other entries and values are kept as they are (not copied); the input
    is not changed."""
    name = "dequantize_state_dict()"
    state, groups = _each_entry(state_dict, name)
    out_state = {}
    for index, entry in state.items():
        if isinstance(entry, Mapping) and (is_quantized_entry(entry) or entry.get("param_shape") is not None):
            entry = _as_input(convert_entry(entry, None, f"{name}: state[{index!r}]"), entry)
        out_state[index] = dict(entry) if isinstance(entry, Mapping) else entry
    return {**state_dict, "state": out_state, "param_groups": [dict(g) for g in groups]}


def quantize_state_dict(state_dict: Mapping[str, Any], bits: int = 8, min_size: int = 4096) -> dict[str, Any]:
    """A plain Adam/AdamW state dict (fastadam's, fastadam.torch's or torch.optim's) in the
    quantized layout of ``bits``-bit optimizers: the moments of each param of at least
    ``min_size`` elements become codes and absmax (fastadam.quantize: the nearest code,
    ties to the larger), loadable by ``fastadam.AdamW8bit`` (``bits=8``) or ``AdamW4bit``
    (``bits=4``) and their torch versions. Smaller params keep their moments. An amsgrad
    state dict, float64 moments of quantized size, or quantized entries of other bits raise
    ValueError/TypeError naming the fix; the input is not changed."""
    name = "quantize_state_dict()"
    _block(bits)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise TypeError(f"{name}: min_size must be an int >= 0, got {min_size!r}")
    state, groups = _each_entry(state_dict, name)
    for g, group in enumerate(groups):
        if isinstance(group, Mapping) and group.get("amsgrad"):
            raise ValueError(f"{name}: param_groups[{g}] has amsgrad=True, whose max_exp_avg_sq has no quantized form")
    out_state = {}
    for index, entry in state.items():
        if isinstance(entry, Mapping):
            where = f"{name}: state[{index!r}]"
            quantized = is_quantized_entry(entry) or entry.get("param_shape") is not None
            moment = entry.get("exp_avg")
            if quantized or (moment is not None and _numpy_of(moment, f"{where}: exp_avg").size >= min_size):
                entry = _as_input(convert_entry(entry, bits, where), entry)
            entry = dict(entry)
        out_state[index] = entry
    out_groups = [{**g, "state_dtype": None} if isinstance(g, Mapping) and "state_dtype" in g else dict(g) for g in groups]
    return {**state_dict, "state": out_state, "param_groups": out_groups}
