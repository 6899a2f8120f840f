"""Small image classifiers in plain NumPy, forward and backward written out by hand.

Every layer keeps its weights in ``params`` (a dict of persistent arrays) and, after
``backward``, the matching gradients in ``grads``. The weights are never rebound: the
fastadam optimizers update them in place through the references they were given.
"""

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["Dense", "ReLU", "Flatten", "Conv2D", "MaxPool2", "Sequential",
           "softmax_cross_entropy", "build_model", "MODELS"]

Array = npt.NDArray[Any]


class Layer(Protocol):
    """What Sequential needs of a layer: its weights and gradients by name, forward and backward."""

    params: dict[str, Array]
    grads: dict[str, Array]

    def forward(self, x: Array) -> Array: ...

    def backward(self, dy: Array) -> Array | None: ...


class Dense:
    """y = x @ W + b, x of shape (N, fan_in)."""

    def __init__(self, fan_in: int, fan_out: int, rng: np.random.Generator, dtype: npt.DTypeLike,
                 need_input_grad: bool = True) -> None:
        # He initialisation suits the ReLU that follows; for a final layer it only scales the logits.
        W = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        self.params: dict[str, Array] = {"W": W.astype(dtype), "b": np.zeros(fan_out, dtype)}
        self.grads: dict[str, Array] = {}
        self.need_input_grad = need_input_grad

    def forward(self, x: Array) -> Array:
        self.x = x
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dy: Array) -> Array | None:
        self.grads = {"W": self.x.T @ dy, "b": dy.sum(axis=0)}
        return dy @ self.params["W"].T if self.need_input_grad else None


class ReLU:
    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}

    def forward(self, x: Array) -> Array:
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy: Array) -> Array:
        return dy * self.mask


class Flatten:
    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}

    def forward(self, x: Array) -> Array:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Array) -> Array:
        return dy.reshape(self.shape)


class Conv2D:
    """Same-padded, stride-1 convolution on (N, C, H, W) via im2col and one matrix product."""

    def __init__(self, in_ch: int, out_ch: int, k: int, rng: np.random.Generator, dtype: npt.DTypeLike,
                 need_input_grad: bool = True) -> None:
        K = rng.standard_normal((out_ch, in_ch, k, k)) * np.sqrt(2.0 / (in_ch * k * k))
        self.params: dict[str, Array] = {"K": K.astype(dtype), "b": np.zeros(out_ch, dtype)}
        self.grads: dict[str, Array] = {}
        self.k, self.pad = k, k // 2
        self.need_input_grad = need_input_grad

    def forward(self, x: Array) -> Array:
        N, C, H, W = x.shape
        k, p = self.k, self.pad
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        # windows[n, c, i, j, a, b] = xp[n, c, i + a, j + b]; one row per output pixel.
        windows = sliding_window_view(xp, (k, k), axis=(2, 3))
        self.cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(N * H * W, C * k * k)
        self.x_shape = x.shape
        F = self.params["K"].shape[0]
        out = self.cols @ self.params["K"].reshape(F, -1).T + self.params["b"]
        return out.reshape(N, H, W, F).transpose(0, 3, 1, 2)

    def backward(self, dy: Array) -> Array | None:
        N, C, H, W = self.x_shape
        k, p = self.k, self.pad
        K = self.params["K"]
        F = K.shape[0]
        dy2 = dy.transpose(0, 2, 3, 1).reshape(N * H * W, F)
        self.grads = {"K": (dy2.T @ self.cols).reshape(K.shape), "b": dy2.sum(axis=0)}
        if not self.need_input_grad:
            return None
        # col2im: each column entry came from xp[n, c, i + a, j + b], so scatter-add it back.
        dcols = (dy2 @ K.reshape(F, -1)).reshape(N, H, W, C, k, k)
        dxp = np.zeros((N, C, H + 2 * p, W + 2 * p), dy.dtype)
        for a in range(k):
            for b in range(k):
                dxp[:, :, a:a + H, b:b + W] += dcols[..., a, b].transpose(0, 3, 1, 2)
        return dxp[:, :, p:p + H, p:p + W]


class MaxPool2:
    """2x2 max pooling with stride 2 on (N, C, H, W), H and W even."""

    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}

    def forward(self, x: Array) -> Array:
        N, C, H, W = x.shape
        self.x_shape = x.shape
        win = x.reshape(N, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(N, C, H // 2, W // 2, 4)
        # argmax breaks ties by taking the first maximum, so exactly one input gets the gradient.
        self.idx = win.argmax(axis=-1)[..., None]
        return np.take_along_axis(win, self.idx, axis=-1)[..., 0]

    def backward(self, dy: Array) -> Array:
        N, C, H, W = self.x_shape
        dwin = np.zeros((N, C, H // 2, W // 2, 4), dy.dtype)
        np.put_along_axis(dwin, self.idx, dy[..., None], axis=-1)
        return dwin.reshape(N, C, H // 2, W // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(N, C, H, W)


def softmax_cross_entropy(logits: Array, y: Array) -> tuple[float, Array]:
    """Mean cross-entropy of integer labels y under softmax(logits), and its gradient."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -logp[np.arange(n), y].mean()
    dlogits = np.exp(logp)
    dlogits[np.arange(n), y] -= 1
    dlogits /= n
    return float(loss), dlogits


class Sequential:
    """A stack of layers ending in logits, trained with softmax cross-entropy.

    ``params`` and ``grads`` flatten the layers' dicts under names like ``"2.W"``, in a fixed
    order, so an optimizer built from ``params`` and stepped with ``grads`` lines up.
    """

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.params = {f"{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.params.items()}

    def forward(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss_and_grads(self, x: Array, y: Array) -> tuple[float, dict[str, Array]]:
        loss, d = softmax_cross_entropy(self.forward(x), y)
        for layer in reversed(self.layers):
            dx = layer.backward(d)
            if dx is None:  # the first layer with weights skips the input gradient nobody needs
                break
            d = dx
        # The optimizer wants C-contiguous gradients; this is a no-op for the arrays above.
        grads = {f"{i}.{k}": np.ascontiguousarray(v)
                 for i, layer in enumerate(self.layers) for k, v in layer.grads.items()}
        return loss, grads

    def predict(self, x: Array) -> Array:
        labels: Array = self.forward(x).argmax(axis=1)
        return labels


def softmax_regression(shape: tuple[int, int], rng: np.random.Generator, dtype: npt.DTypeLike,
                       n_classes: int = 10) -> Sequential:
    h, w = shape
    return Sequential([Flatten(), Dense(h * w, n_classes, rng, dtype, need_input_grad=False)])


def mlp(shape: tuple[int, int], rng: np.random.Generator, dtype: npt.DTypeLike, n_classes: int = 10,
        hidden: int = 128) -> Sequential:
    h, w = shape
    return Sequential([Flatten(), Dense(h * w, hidden, rng, dtype, need_input_grad=False), ReLU(),
                       Dense(hidden, n_classes, rng, dtype)])


def convnet(shape: tuple[int, int], rng: np.random.Generator, dtype: npt.DTypeLike, n_classes: int = 10,
            channels: int = 8, hidden: int = 64) -> Sequential:
    h, w = shape
    if h % 2 or w % 2:
        raise ValueError(f"convnet needs even image sides for 2x2 pooling, got {h}x{w}")
    return Sequential([Conv2D(1, channels, 3, rng, dtype, need_input_grad=False), ReLU(), MaxPool2(), Flatten(),
                       Dense(channels * (h // 2) * (w // 2), hidden, rng, dtype), ReLU(),
                       Dense(hidden, n_classes, rng, dtype)])


MODELS: dict[str, Callable[..., Sequential]] = {"softmax": softmax_regression, "mlp": mlp, "convnet": convnet}


def build_model(name: str, shape: tuple[int, ...], seed: int, dtype: npt.DTypeLike = np.float32,
                **sizes: int) -> Sequential:
    """Model ``name`` for images of ``shape`` (H, W); the same seed gives the same weights.

    Every model takes (N, 1, H, W) images and returns (N, n_classes) logits.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](tuple(shape), np.random.default_rng(seed), np.dtype(dtype), **sizes)
