"""The specification: Adam and SGD steps in plain NumPy, in the kernel's order of operations.

``fastadam.adam_step`` and ``fastadam.sgd_step`` return the same bits as these
functions for every input (the tests compare bit patterns). They follow Kingma & Ba
(2015), Algorithm 1, with PyTorch's conventions (``torch.optim.Adam`` single-tensor
path): eps is added after the bias-corrected square root, ``weight_decay`` is an L2
term added to the gradient unless ``decoupled_weight_decay`` (AdamW), and
``amsgrad`` / ``maximize`` behave as in torch. One rounding differs from torch's: the
square root of the second moment is multiplied by ``1 / sqrt(1 - beta2**t)`` (rounded
once) where torch divides by ``sqrt(1 - beta2**t)``, which saves a division per
element (the kernel's bottleneck when the data are in cache).

Rounding rules, shared with the C++ kernel:

* Scalars (bias corrections, step size, ...) are computed in Python floats (IEEE
  double), then rounded once to the array dtype ``T``, as PyTorch does when a
  Python float meets a tensor.
* Every array operation is one IEEE operation rounded to ``T``; no fused
  multiply-add, no reassociation. Expressions group left to right, exactly as
  written below.

Adam, per element (``T`` = the arrays' dtype, ``t`` = ``step``)::

    g = -grad if maximize else grad                   # (not with L2 decay: next line)
    g = T(weight_decay) * p - grad if maximize else grad + T(weight_decay) * p   # Adam (L2), weight_decay != 0
    p = p * T(1 - lr*weight_decay)                    # AdamW (decoupled), weight_decay != 0
    m = m + T(1 - beta1) * (g - m)                    # exp_avg, |T(1 - beta1)| < 0.5  (torch's lerp)
    m = g + (-(T(1) - T(1 - beta1))) * (g - m)        # exp_avg, otherwise (lerp's other form)
    v = v * T(beta2) + T(1 - beta2) * g * g           # exp_avg_sq   ((T(1-beta2)*g)*g)
    v_max = maximum(v_max, v)                         # amsgrad only (NaN propagates; ties: v)
    denom = sqrt(v_max if amsgrad else v) * T(1 / sqrt(1 - beta2**t)) + T(eps)
    p = p - T(lr / (1 - beta1**t)) * m / denom        # (step_size*m)/denom

Mixed precision (``adam_step`` / ``adam_step_multi``; float32 arithmetic for every
non-float64 array): bfloat16 (``ml_dtypes.bfloat16``) and float16 arrays are widened
exactly to float32, the float32 step above runs, and every narrower array written
(param, states, ``param_out``) is rounded to nearest even (NaN stays NaN, overflow gives
inf, subnormals are kept). Before the step, with ``grad_scale`` and/or ``max_grad_norm``::

    g = float32(grad) / float32(grad_scale)           # grad_scale given
    norm = sqrt(grad_sq_sum(all gradients))            # in double, fixed order (grad_sq_sum)
    step skipped, nothing written, if norm is not finite
    g = g * float32(max_grad_norm / (norm + 1e-6))    # when that is < 1 (clip_grad_norm_'s coefficient)

With a stochastic-rounding seed (bfloat16 params), the updated param is rounded by
``stochastic_round_bf16`` instead of to nearest: the float32 bits plus 16 random bits,
truncated; the random bits of element ``i`` at step ``t`` are the top 16 bits of
splitmix64's output for the counter ``mix64(seed * gamma + t) + (i + 1) * gamma``.

Blockwise-quantized states (8-bit and 4-bit, ``QuantizedState``; Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", 2022): each block of ``QUANT_BLOCK[bits]``
elements of a state (256 for 8 bits, 128 for 4; the last block of a tensor may be
shorter) is stored as one code per element and one float32 ``absmax``. A step
dequantizes, runs the float32 step above, and quantizes the new values::

    x = quant_map(bits, signed)[code] * absmax        # dequantize (float32 multiply)
    absmax = max(|x| over the block)                  # NaN if the block holds a NaN
    inv = 0 if absmax == 0 else float32(1) / absmax
    code = number of thresholds t <= x * inv          # the nearest code; a value exactly
                                                      # halfway goes to the larger code; NaN: the last code

``exp_avg`` uses the signed map, ``exp_avg_sq`` the unsigned one (``quant_map``).
The param update uses the float32 moments of this step, before they are quantized.

SGD, per element (torch.optim.SGD)::

    g = -grad if maximize else grad                   # (not with weight decay: next line)
    g = T(weight_decay) * p - grad if maximize else grad + T(weight_decay) * p   # weight_decay != 0
    buf = g                                           # momentum != 0, first step
    buf = buf * T(momentum) + T(1 - dampening) * g    # momentum != 0, later steps
    g = g + T(momentum) * buf if nesterov else buf    # momentum != 0
    p = p - T(lr) * g
"""

from __future__ import annotations

import math

import numpy as np

from .quantized import QUANT_BLOCK, QuantizedState

__all__ = [
    "QUANT_BLOCK", "adam_step", "adam_step_multi", "dequantize_blockwise", "grad_sq_sum", "quant_map", "quant_thresholds",
    "quantize_blockwise", "sgd_step", "stochastic_round_bf16",
]

# The norm pass sums squares in blocks of this many elements (the kernel's kNormBlock).
NORM_BLOCK = 4096
NORM_LANES = 16


def _adam_update(
    param: np.ndarray,
    g: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    max_exp_avg_sq: np.ndarray | None,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """The step on arrays of one dtype T, in place; ``g`` is the gradient (not written)."""
    T = param.dtype.type
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = T(lr / bias_correction1)
    inv_bias_correction2_sqrt = T(1 / math.sqrt(bias_correction2))

    # torch: g = -grad; g = g + wd*p. With L2 decay written wd*p - grad: the same number,
    # and the NaN sign every compiled path gives (docs/design.md, "The formula").
    l2 = weight_decay != 0 and not decoupled_weight_decay
    if l2:
        g = T(weight_decay) * param - g if maximize else g + T(weight_decay) * param
    elif maximize:
        g = np.negative(g)
    if weight_decay != 0 and decoupled_weight_decay:
        np.multiply(param, T(1 - lr * weight_decay), out=param)

    weight = T(1 - beta1)
    if abs(weight) < 0.5:
        exp_avg += weight * (g - exp_avg)
    else:  # torch's lerp: g - (1 - w)*(g - m), here g + (-(1 - w))*(g - m), the kernel's
        exp_avg[...] = g + (-(T(1) - weight)) * (g - exp_avg)
    exp_avg_sq[...] = exp_avg_sq * T(beta2) + T(1 - beta2) * g * g

    if amsgrad:
        assert max_exp_avg_sq is not None
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = np.sqrt(second_moment) * inv_bias_correction2_sqrt + T(eps)
    param -= step_size * exp_avg / denom


def grad_sq_sum(grads: list[np.ndarray], grad_scale: float | None = None) -> float:
    """The sum of squares of every gradient element, in the kernel's fixed order.

    Each element is widened to float32 (divided by ``float32(grad_scale)`` if given) and
    squared in double (exactly). Per tensor, blocks of ``NORM_BLOCK`` elements: element i
    of a block adds to accumulator ``i % NORM_LANES`` (16) in order; the accumulators are
    then added pairwise (``a[j] + a[j + 8]``, then ``+ 4``, ``+ 2``, ``+ 1``). The blocks' sums
    are added in order, tensor after tensor. Its square root is the global L2 norm.
    """
    block_sums = []
    for grad in grads:
        u = np.asarray(grad).reshape(-1).astype(np.float32)
        if grad_scale is not None:
            u = u / np.float32(grad_scale)
        blocks = -(-u.size // NORM_BLOCK)
        squares = np.zeros(blocks * NORM_BLOCK, np.float64)  # padding adds +0.0: no change
        squares[: u.size] = u.astype(np.float64) ** 2
        acc = np.cumsum(squares.reshape(blocks, NORM_BLOCK // NORM_LANES, NORM_LANES), axis=1)[:, -1, :]
        width = NORM_LANES // 2
        while width >= 1:
            acc = acc[:, :width] + acc[:, width : 2 * width]
            width //= 2
        block_sums.append(acc[:, 0])
    sums = np.concatenate(block_sums) if block_sums else np.zeros(0)
    return float(np.cumsum(sums)[-1]) if sums.size else 0.0


_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def stochastic_round_bf16(x: np.ndarray, seed: int, step: int) -> np.ndarray:
    """float32 ``x`` rounded to bfloat16 stochastically: up with probability equal to the
    fraction dropped, so ``E[round(x)] = x``; deterministic in (seed, step, element index)."""
    import ml_dtypes

    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    key = _mix64(np.array([(seed * _GAMMA + step) & _MASK64], dtype=np.uint64))[0]
    counters = key + (np.arange(1, u.size + 1, dtype=np.uint64) * np.uint64(_GAMMA))
    random16 = (_mix64(counters) >> np.uint64(48)).astype(np.uint32)
    out = ((u + random16) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out[nan] = ((u[nan] >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0)
    rounded: np.ndarray = out.view(ml_dtypes.bfloat16).reshape(np.shape(x))
    return rounded


# ----- blockwise-quantized states ------------------------------------------------------

def quant_map(bits: int, signed: bool) -> np.ndarray:
    """The code book of ``bits``-bit states: the float32 value of each code, ascending.

    8 bits, and 4 bits signed: the dynamic (tree) map of Dettmers et al. (bitsandbytes'
    ``create_dynamic_map(signed, max_exponent_bits, bits)``, 7 exponent bits for 8-bit codes,
    3 for 4-bit): for each decade ``i`` of ``E`` exponents, ``n`` values evenly inside
    ``[0.1, 1] * 10**(i - E + 1)`` (``n = 2**(i + bits - 1 - E)``, doubled when unsigned),
    their negatives when signed, then 0 and 1. Each value is the float32 nearest to the
    double ``N / D`` of its exact fraction ``(2n + 9(2k + 1)) / (20 n 10**(E - 1 - i))``
    (bitsandbytes computes them in float32 steps: within 2 units in the last place).
    4 bits unsigned: torchao's linear map without zero, ``k / 16`` for k = 1..16.
    """
    if bits not in QUANT_BLOCK:
        raise ValueError(f"quant_map(): bits must be 8 or 4, got {bits!r}")
    if bits == 4 and not signed:
        return (np.arange(1, 17, dtype=np.float64) / 16).astype(np.float32)
    exponents = 7 if bits == 8 else 3
    fractions: list[tuple[int, int]] = [(0, 1), (1, 1)]
    for i in range(exponents):
        n = 2 ** (i + bits - 1 - exponents) * (1 if signed else 2)
        for k in range(n):
            num, den = 2 * n + 9 * (2 * k + 1), 20 * n * 10 ** (exponents - 1 - i)
            fractions.append((num, den))
            if signed:
                fractions.append((-num, den))
    fractions.sort(key=lambda f: f[0] / f[1])
    return np.array([num / den for num, den in fractions], dtype=np.float32)


def quant_thresholds(bits: int, signed: bool) -> np.ndarray:
    """The float32 decision thresholds of ``quant_map(bits, signed)``: threshold ``j`` is the
    smallest float32 that is not nearer to code ``j`` than to code ``j + 1`` (the exact
    midpoint and above: ties go to the larger code). A value's code is the number of
    thresholds at or below it."""
    values = quant_map(bits, signed).astype(np.float64)
    mids = (values[:-1] + values[1:]) / 2  # exact in double
    out = mids.astype(np.float32)
    below = out.astype(np.float64) < mids
    out[below] = np.nextafter(out[below], np.float32(np.inf))
    return out


def _codes_of(u: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    codes = np.searchsorted(quant_thresholds(bits, signed), u, side="right")
    codes[np.isnan(u)] = 2**bits - 1
    out: np.ndarray = codes.astype(np.uint8)
    return out


def quantize_blockwise(x: np.ndarray, bits: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (float32, any shape) as blockwise codes: returns ``(codes, absmax)``, codes one
    uint8 per element (8 bits) or two per byte, the even element in the high nibble (4 bits:
    torchao's packing), absmax one float32 per block of ``QUANT_BLOCK[bits]``."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    block = QUANT_BLOCK[bits]
    codes = np.zeros(flat.size, np.uint8)
    absmax = np.zeros(-(-flat.size // block), np.float32)
    for b in range(absmax.size):
        chunk = flat[b * block : (b + 1) * block]
        a = np.float32(np.nan) if np.isnan(chunk).any() else np.abs(chunk).max()
        inv = np.float32(0) if a == 0 else np.float32(1) / a
        absmax[b] = a
        codes[b * block : b * block + chunk.size] = _codes_of(chunk * inv, bits, signed)
    if bits == 4:
        padded = np.zeros(2 * -(-flat.size // 2), np.uint8)
        padded[: flat.size] = codes
        codes = ((padded[0::2] << 4) | padded[1::2]).astype(np.uint8)
    return codes, absmax


def dequantize_blockwise(codes: np.ndarray, absmax: np.ndarray, bits: int, signed: bool, size: int) -> np.ndarray:
    """The float32 values of ``size`` quantized elements (``quantize_blockwise``'s layout)."""
    flat = np.ascontiguousarray(codes).reshape(-1)
    if bits == 4:
        flat = np.stack([flat >> 4, flat & 15], axis=-1).reshape(-1)
    scale = np.repeat(np.asarray(absmax, np.float32).reshape(-1), QUANT_BLOCK[bits])[:size]
    out: np.ndarray = quant_map(bits, signed)[flat[:size]] * scale
    return out


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sq: np.ndarray | None = None,
    maximize: bool = False,
    param_out: np.ndarray | None = None,
    grad_scale: float | None = None,
) -> float | None:
    """One Adam step in place, in plain NumPy: the reference for ``fastadam.adam_step``.

    ``step`` is the 1-based count of this update (torch's ``state["step"]`` after its
    increment). ``param``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with
    ``amsgrad``) are updated in place; see the module docstring for the formula and
    for mixed precision. Returns the gradient's L2 norm (after unscaling) when
    ``grad_scale`` is given, else None; a non-finite norm means nothing was written.
    """
    return adam_step_multi(
        [param], [grad], [exp_avg], [exp_avg_sq], steps=step, lr=lr, betas=betas, eps=eps,
        weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
        max_exp_avg_sqs=None if max_exp_avg_sq is None else [max_exp_avg_sq], maximize=maximize,
        params_out=None if param_out is None else [param_out], grad_scale=grad_scale,
    )


def adam_step_multi(
    params: list[np.ndarray],
    grads: list[np.ndarray],
    exp_avgs: list[np.ndarray] | list[np.ndarray | QuantizedState],
    exp_avg_sqs: list[np.ndarray] | list[np.ndarray | QuantizedState],
    *,
    steps: int | list[int],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sqs: list[np.ndarray] | None = None,
    maximize: bool = False,
    params_out: list[np.ndarray | None] | None = None,
    grad_scale: float | None = None,
    max_grad_norm: float | None = None,
    rounding_seeds: list[int | None] | None = None,
) -> float | None:
    """Adam on many tensors: the reference for ``fastadam.adam_step_multi``.

    It assumes input the kernel accepts (dtype pairings, shapes, no overlaps): it
    specifies the arithmetic, not the validation.

    Returns the global L2 norm of the (unscaled) gradients when ``grad_scale`` or
    ``max_grad_norm`` is given, else None. A non-finite norm means a gradient held inf
    or NaN: nothing was written. ``rounding_seeds``: per tensor, a seed for stochastic
    rounding of a bfloat16 param (``stochastic_round_bf16``), or None (to nearest).
    """
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("adam_step_multi(): max_exp_avg_sqs is required with amsgrad=True")
    checks_grads = grad_scale is not None or max_grad_norm is not None
    norm = math.nan
    clip_coef = None
    if checks_grads:
        norm = math.sqrt(grad_sq_sum(grads, grad_scale))
        if not math.isfinite(norm):
            return norm
        if max_grad_norm is not None and max_grad_norm / (norm + 1e-6) < 1.0:
            clip_coef = np.float32(max_grad_norm / (norm + 1e-6))
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize)
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        step = steps if isinstance(steps, int) else steps[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad and max_exp_avg_sqs is not None else None
        param_out = params_out[i] if params_out is not None else None
        quantized: tuple[QuantizedState, QuantizedState] | None = None
        plain: tuple[np.ndarray, np.ndarray] | None = None
        if isinstance(exp_avg, QuantizedState) and isinstance(exp_avg_sq, QuantizedState):
            quantized = (exp_avg, exp_avg_sq)
        else:
            assert isinstance(exp_avg, np.ndarray) and isinstance(exp_avg_sq, np.ndarray)
            plain = (exp_avg, exp_avg_sq)
        if plain is not None and (param.dtype == np.float64 or (
            all(a.dtype == np.float32 for a in [param, *plain, grad])
            and (max_exp_avg_sq is None or max_exp_avg_sq.dtype == np.float32)
            and param_out is None and not checks_grads
        )):
            _adam_update(param, grad, *plain, max_exp_avg_sq, step, **hyper)  # type: ignore[arg-type]
            continue
        # Mixed precision: widen to float32, the float32 step, round every narrower array back.
        p = param.astype(np.float32)
        if quantized is not None:  # the states dequantized (module docstring)
            m, v = (dequantize_blockwise(q.codes, q.absmax, q.bits, q.signed, param.size).reshape(param.shape) for q in quantized)
        else:
            assert plain is not None
            m, v = plain[0].astype(np.float32), plain[1].astype(np.float32)
        v_max = None if max_exp_avg_sq is None else max_exp_avg_sq.astype(np.float32)
        g = grad.astype(np.float32)
        if grad_scale is not None:
            g = g / np.float32(grad_scale)
        if clip_coef is not None:
            g = g * clip_coef
        _adam_update(p, g, m, v, v_max, step, **hyper)  # type: ignore[arg-type]
        seed = rounding_seeds[i] if rounding_seeds is not None else None
        if seed is not None:
            param[...] = stochastic_round_bf16(p, seed, step)
        if quantized is not None:
            for q, value in zip(quantized, (m, v)):
                codes, absmax = quantize_blockwise(value, q.bits, q.signed)
                q.codes.reshape(-1)[...] = codes
                q.absmax.reshape(-1)[...] = absmax
        states = () if plain is None else ((plain[0], m), (plain[1], v))
        for to, value in ((None if seed is not None else param, p), *states, (max_exp_avg_sq, v_max), (param_out, p)):
            if to is not None and value is not None:
                to[...] = value.astype(to.dtype)
    return norm if checks_grads else None


def sgd_step(
    param: np.ndarray,
    grad: np.ndarray,
    momentum_buffer: np.ndarray | None = None,
    *,
    step: int,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """One SGD step in place, in plain NumPy: the reference for ``fastadam.sgd_step``.

    With ``momentum != 0`` the caller keeps ``momentum_buffer``; on ``step == 1`` it is
    set to the gradient (torch creates it as a copy of the gradient), later blended.
    """
    T = param.dtype.type
    if weight_decay != 0:  # as in adam_step
        g = T(weight_decay) * param - grad if maximize else grad + T(weight_decay) * param
    else:
        g = np.negative(grad) if maximize else grad
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("sgd_step(): momentum_buffer is required with momentum != 0")
        if step == 1:
            momentum_buffer[...] = g
        else:
            momentum_buffer[...] = momentum_buffer * T(momentum) + T(1 - dampening) * g
        g = g + T(momentum) * momentum_buffer if nesterov else momentum_buffer
    param -= T(lr) * g
