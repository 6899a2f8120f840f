"""Blockwise-quantized optimizer states (8-bit and 4-bit codes with one float32 absmax per block).

A :class:`QuantizedState` is what ``fastadam.adam_step_multi`` takes in place of an
``exp_avg`` or ``exp_avg_sq`` array: the kernel dequantizes each block, runs the float32
step and quantizes the new values, in one pass (docs/design.md, "Quantized states"). The
arithmetic is specified in :mod:`fastadam.reference` (``quantize_blockwise``,
``dequantize_blockwise``, ``quant_map``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _core

__all__ = ["QuantizedState", "QUANT_BLOCK", "quantize"]

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
