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

__all__ = ["adam_step", "sgd_step"]


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
) -> None:
    """One Adam step in place, in plain NumPy: the reference for ``fastadam.adam_step``.

    ``step`` is the 1-based count of this update (torch's ``state["step"]`` after its
    increment). ``param``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with
    ``amsgrad``) are updated in place; see the module docstring for the formula.
    """
    T = param.dtype.type
    beta1, beta2 = betas
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("adam_step(): max_exp_avg_sq is required with amsgrad=True")

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = T(lr / bias_correction1)
    inv_bias_correction2_sqrt = T(1 / math.sqrt(bias_correction2))

    # torch: g = -grad; g = g + wd*p. With L2 decay written wd*p - grad: the same number,
    # and the NaN sign every compiled path gives (docs/design.md, "The formula").
    l2 = weight_decay != 0 and not decoupled_weight_decay
    if l2:
        g = T(weight_decay) * param - grad if maximize else grad + T(weight_decay) * param
    else:
        g = np.negative(grad) if maximize else grad
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
