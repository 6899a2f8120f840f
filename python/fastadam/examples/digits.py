"""Adam against the SGD family on handwritten digits, in plain NumPy.

Trains three models whose forward and backward passes are written out by hand
(softmax regression, an MLP with one hidden layer of 128, and a small conv net:
3x3 conv with 8 channels via im2col, ReLU, 2x2 max pool, dense 64, dense 10) with six
fastadam optimizers. Every optimizer of a model starts from the same weights and sees
the same mini-batches in the same order, so the curves differ only by the optimizer.

Data: scikit-learn's bundled 8x8 digits (1,797 images, no download), split once into
1,347 train / 450 test images (stratified, fixed seed, independent of --seed), pixels
scaled to [0, 1]. With --mnist DIR it reads the four MNIST IDX files instead
(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte, each optionally .gz); a full MNIST run is much slower, so
--limit N helps.

Optimizers and their default learning rates (override with --lr NAME=VALUE, repeatable):

  adam      Adam                                  lr 1e-3
  adamw     AdamW, weight_decay 1e-2              lr 1e-3
  amsgrad   Adam(amsgrad=True)                    lr 1e-3
  sgd       SGD                                   lr 0.1
  momentum  SGD, momentum 0.9                     lr 0.01
  nesterov  SGD, momentum 0.9, nesterov           lr 0.01

Mixed precision (bfloat16, ml_dtypes; AdamW, weight_decay 1e-2): the model's weights
are stored in bfloat16 and its gradients are rounded to bfloat16 (the forward and
backward passes compute in float32 from the bfloat16 weights):

  adamw-bf16         bf16 weights, updated and rounded to nearest      lr 1e-3
  adamw-bf16-master  bf16 weights, float32 master weights              lr 1e-3
  adamw-bf16-sr      bf16 weights, stochastic rounding                 lr 1e-3
  adamw-bf16-states  float32 weights, bfloat16 exp_avg/exp_avg_sq      lr 1e-3

Quantized states (float32 weights and gradients; weight_decay 1e-2):

  adamw-8bit  AdamW8bit: 8-bit exp_avg/exp_avg_sq, 256-element blocks   lr 1e-3
  adamw-4bit  AdamW4bit: 4-bit exp_avg/exp_avg_sq, 128-element blocks   lr 1e-3

Both quantize every tensor here (min_8bit_size / min_4bit_size 0): with the default
threshold of 4096 elements only the MLP's and the conv net's first dense layers would be.

The Adam family uses the usual 1e-3. The SGD momentum variants use lr 0.01 so that
their long-run step, lr / (1 - momentum) = 0.1, matches plain SGD's.

Printed table, one row per model and optimizer:
  train loss   mean cross-entropy over the whole training set after the last epoch
  test acc     accuracy on the test set after the last epoch
  ep<=target   first epoch whose end-of-epoch train loss is <= --target-loss ("-": never)
  train s      seconds in the training loop (forward, backward, optimizer step),
               not counting the end-of-epoch evaluation passes
  in step      share of those seconds spent in optimizer.step
  native/numpy us   Adam-family rows only: microseconds per step of this optimizer on this
               model's parameters, fastadam's native kernel against the same step by the
               NumPy reference (fastadam.reference.adam_step), timed in identical loops

It also writes a PNG of the train-loss curves (one panel per model, one line per
optimizer) and, with --json, all results including the curves. Results are
deterministic for a given seed and thread count; the timings are not.
"""

import argparse
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import fastadam
from fastadam import reference

from .models import MODELS, Array, Sequential, build_model, softmax_cross_entropy

Data = tuple[Array, Array, Array, Array]  # X_train, y_train, X_test, y_test

# name -> (fastadam class, its keyword arguments other than lr)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {"weight_decay": 1e-2}),
    "amsgrad": ("Adam", {"amsgrad": True}),
    "sgd": ("SGD", {}),
    "momentum": ("SGD", {"momentum": 0.9}),
    "nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "adamw-bf16": ("AdamW", {"weight_decay": 1e-2}),
    "adamw-bf16-master": ("AdamW", {"weight_decay": 1e-2, "master_weights": True}),
    "adamw-bf16-sr": ("AdamW", {"weight_decay": 1e-2, "stochastic_rounding": True}),
    "adamw-bf16-states": ("AdamW", {"weight_decay": 1e-2, "state_dtype": "bfloat16"}),
    "adamw-8bit": ("AdamW8bit", {"weight_decay": 1e-2, "min_8bit_size": 512}),
    "adamw-4bit": ("AdamW4bit", {"weight_decay": 1e-2, "min_4bit_size": 512}),
}
DEFAULT_LR: dict[str, float] = {"adam": 1e-3, "adamw": 1e-3, "amsgrad": 1e-3, "sgd": 0.1, "momentum": 0.01, "nesterov": 0.01,
                                "adamw-bf16": 1e-3, "adamw-bf16-master": 1e-3, "adamw-bf16-sr": 1e-3, "adamw-bf16-states": 1e-3,
                                "adamw-8bit": 1e-3, "adamw-4bit": 1e-3}
# The runs whose weights are stored in bfloat16; every "-bf16" run takes bfloat16 gradients.
BF16_WEIGHTS = ("adamw-bf16", "adamw-bf16-master", "adamw-bf16-sr")


@dataclasses.dataclass
class Config:
    models: tuple[str, ...] = tuple(MODELS)
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    epochs: int = 20
    batch_size: int = 32
    lr: dict[str, float] = dataclasses.field(default_factory=dict)  # overrides of DEFAULT_LR
    seed: int = 0
    target_loss: float = 0.1
    mnist: str | None = None  # directory of MNIST IDX files; None: sklearn digits
    limit: int | None = None  # train on the first `limit` training images only
    progress: bool = True
    reference_steps: int = 200  # steps per timing loop of native vs NumPy Adam; 0 skips it

    def validate(self) -> None:
        checks: tuple[tuple[str, Iterable[str], Mapping[str, object]], ...] = (
            ("model", self.models, MODELS), ("optimizer", self.optimizers, OPTIMIZERS), ("optimizer", self.lr, OPTIMIZERS))
        for kind, names, known in checks:
            for name in names:
                if name not in known:
                    raise ValueError(f"unknown {kind} {name!r}; choose from {', '.join(known)}")
        if not self.models or not self.optimizers:
            raise ValueError("need at least one model and one optimizer")
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive integer, got {self.limit!r}")
        for name, rate in self.lr.items():
            if not rate > 0 or not np.isfinite(rate):
                raise ValueError(f"learning rate for {name} must be a positive number, got {rate!r}")
        if self.reference_steps < 0:
            raise ValueError(f"reference_steps must be >= 0, got {self.reference_steps}")

    def learning_rate(self, optimizer: str) -> float:
        return self.lr.get(optimizer, DEFAULT_LR[optimizer])


EXTRA_HINT = 'pip install "fastadam[examples]"'


def require_extra(module: str, needed_for: str) -> Any:
    """``module`` imported, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        dist = {"sklearn": "scikit-learn"}.get(top, top)
        raise ImportError(f"{needed_for} needs {dist}, which is not installed: {EXTRA_HINT} "
                          f"(or pip install \".[examples]\" from a clone)") from e


def check_extras(config: Config, plot: bool) -> None:
    """Fails before training, not after it, when an optional package this run needs is missing."""
    if not config.mnist:
        require_extra("sklearn.datasets", "the bundled digits data set")
    if config.progress:
        require_extra("tqdm", "the progress bar (--no-progress runs without it)")
    if any("-bf16" in name for name in config.optimizers):
        require_extra("ml_dtypes", "the bfloat16 runs (--optimizers without the -bf16 ones run without it)")
    if plot:
        require_extra("matplotlib.figure", "the loss-curve figure (--no-plot runs without it)")


def load_data(config: Config) -> Data:
    """(X_train, y_train, X_test, y_test): float32 images (N, 1, H, W) in [0, 1], int labels."""
    if config.mnist:
        from .idx import load_mnist

        Xtr, ytr, Xte, yte = load_mnist(config.mnist)
        scale = 255.0
    else:
        datasets = require_extra("sklearn.datasets", "the bundled digits data set")
        model_selection = require_extra("sklearn.model_selection", "the bundled digits data set")

        digits = datasets.load_digits()
        Xtr, Xte, ytr, yte = model_selection.train_test_split(digits.images, digits.target, test_size=0.25,
                                              stratify=digits.target, random_state=0)
        scale = 16.0
    if config.limit is not None:
        Xtr, ytr = Xtr[:config.limit], ytr[:config.limit]

    def images(X: Any) -> Array:
        return np.ascontiguousarray((np.asarray(X, np.float32) / np.float32(scale))[:, None])

    return images(Xtr), np.asarray(ytr, np.intp), images(Xte), np.asarray(yte, np.intp)


def make_optimizer(name: str, params: Any, lr: float) -> fastadam.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    if kwargs.get("state_dtype") == "bfloat16":
        kwargs = dict(kwargs, state_dtype=require_extra("ml_dtypes", "the bfloat16 runs").bfloat16)
    optimizer: fastadam.Optimizer = getattr(fastadam, cls)(params, lr=lr, **kwargs)
    return optimizer


def evaluate(model: Sequential, X: Array, y: Array, chunk: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over X, in chunks to bound memory on MNIST."""
    loss_sum, correct = 0.0, 0
    for i in range(0, len(X), chunk):
        logits = model.forward(X[i:i + chunk])
        loss, _ = softmax_cross_entropy(logits, y[i:i + chunk])
        loss_sum += loss * len(logits)
        correct += int((logits.argmax(axis=1) == y[i:i + chunk]).sum())
    return loss_sum / len(X), correct / len(X)


def time_adam_step(name: str, params: dict[str, Array], grads: dict[str, Array], lr: float,
                   steps: int) -> tuple[float, float, float]:
    """Seconds per step of optimizer ``name`` on copies of ``params``, native vs NumPy reference.

    Both loops start from the same state and apply the same gradients, so the third value, the
    largest parameter difference after ``steps`` steps, shows whether they also agree.
    """
    cls, kwargs = OPTIMIZERS[name]
    ref_kwargs = dict(kwargs, decoupled_weight_decay=(cls == "AdamW"))
    grad_list = list(grads.values())
    native = [p.copy() for p in params.values()]
    opt = make_optimizer(name, native, lr)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(grad_list)
    t_native = (time.perf_counter() - t0) / steps

    ref = [p.copy() for p in params.values()]
    state = [(np.zeros_like(p), np.zeros_like(p), np.zeros_like(p) if kwargs.get("amsgrad") else None) for p in ref]
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        for p, g, (m, v, vmax) in zip(ref, grad_list, state):
            reference.adam_step(p, g, m, v, step=step, lr=lr, max_exp_avg_sq=vmax, **ref_kwargs)
    t_ref = (time.perf_counter() - t0) / steps
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(native, ref))
    return t_native, t_ref, diff


def train_one(model_name: str, opt_name: str, data: Data, orders: list[Array], config: Config,
              bar: Any = None) -> dict[str, Any]:
    Xtr, ytr, Xte, yte = data
    model = build_model(model_name, Xtr.shape[2:], config.seed)
    lr = config.learning_rate(opt_name)
    bf16 = require_extra("ml_dtypes", "the bfloat16 runs").bfloat16 if "-bf16" in opt_name else None
    # bfloat16 weights: the optimizer updates them; the model computes from their float32 values
    weights = {k: v.astype(bf16) for k, v in model.params.items()} if opt_name in BF16_WEIGHTS else model.params
    opt = make_optimizer(opt_name, weights, lr)
    curve = [evaluate(model, Xtr, ytr)[0]]
    batch_losses: list[float] = []
    train_s = step_s = 0.0
    for order in orders:
        t_epoch = time.perf_counter()
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            loss, grads = model.loss_and_grads(Xtr[idx], ytr[idx])
            if bf16 is not None:
                grads = {k: g.astype(bf16) for k, g in grads.items()}
            t_step = time.perf_counter()
            opt.step(grads)
            step_s += time.perf_counter() - t_step
            if weights is not model.params:
                for k, w in weights.items():
                    model.params[k][...] = w  # exact: every bfloat16 is a float32
            batch_losses.append(loss)
            if bar is not None:
                bar.update(1)
        train_s += time.perf_counter() - t_epoch
        curve.append(evaluate(model, Xtr, ytr)[0])
        if not np.isfinite(curve[-1]):
            break  # diverged (learning rate too large); the rest would be NaN as well
    curve += [float("nan")] * (len(orders) + 1 - len(curve))
    reached = [epoch for epoch, loss in enumerate(curve) if loss <= config.target_loss]
    result: dict[str, Any] = {
        "model": model_name, "optimizer": opt_name, "lr": lr, "n_params": sum(p.size for p in model.params.values()),
        "train_loss": curve[-1], "test_acc": evaluate(model, Xte, yte)[1],
        "epochs_to_target": reached[0] if reached else None,
        "train_seconds": train_s, "step_seconds": step_s, "step_share": step_s / train_s if train_s else 0.0,
        "curve": curve, "batch_losses": batch_losses,
        "native_step_us": None, "reference_step_us": None, "reference_max_abs_diff": None,
    }
    # (the NumPy reference timed here keeps float32 states: no contrast for the bf16 and quantized runs)
    if OPTIMIZERS[opt_name][0] in ("Adam", "AdamW") and bf16 is None and "state_dtype" not in OPTIMIZERS[opt_name][1] and config.reference_steps:
        t_native, t_ref, diff = time_adam_step(opt_name, model.params, grads, lr, config.reference_steps)
        result.update(native_step_us=t_native * 1e6, reference_step_us=t_ref * 1e6, reference_max_abs_diff=diff)
    return result


def run(config: Config | None = None) -> list[dict[str, Any]]:
    """Train every selected model with every selected optimizer; a list of result dicts.

    Each dict has the table's numbers plus ``curve`` (train loss at the end of each epoch,
    epoch 0 being the initial weights) and ``batch_losses`` (the loss of every mini-batch).
    """
    config = config or Config()
    config.validate()
    data = load_data(config)
    n_train = len(data[0])
    rng = np.random.default_rng(config.seed)
    # Drawn once and shared, so every optimizer sees the same mini-batches in the same order.
    orders = [rng.permutation(n_train) for _ in range(config.epochs)]
    runs = [(m, o) for m in config.models for o in config.optimizers]
    steps = len(runs) * config.epochs * -(-n_train // config.batch_size)
    bar = None
    if config.progress:
        tqdm = require_extra("tqdm", "the progress bar (--no-progress runs without it)").tqdm

        bar = tqdm(total=steps, unit="step", file=sys.stderr)
    results: list[dict[str, Any]] = []
    try:
        # A learning rate too large overflows to inf and NaN; the table shows that as nan, so
        # NumPy's warnings would only repeat the news on every step.
        with np.errstate(over="ignore", invalid="ignore"):
            for model_name, opt_name in runs:
                if bar is not None:
                    bar.set_description(f"{model_name}/{opt_name}")
                results.append(train_one(model_name, opt_name, data, orders, config, bar))
    finally:
        if bar is not None:
            bar.close()
    return results


def format_table(results: list[dict[str, Any]], target_loss: float) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = ("model", "optimizer", "lr", "train loss", "test acc", f"ep<={target_loss:g}", "train s", "in step",
              "native us", "numpy us")
    rows = [(r["model"], r["optimizer"], f"{r['lr']:g}", f"{r['train_loss']:.4f}", f"{100 * r['test_acc']:.1f}%",
             num(r["epochs_to_target"], "d"), f"{r['train_seconds']:.2f}", f"{100 * r['step_share']:.0f}%",
             num(r["native_step_us"], ".1f"), num(r["reference_step_us"], ".1f")) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], path: str, target_loss: float | None = None) -> None:
    """PNG at ``path``: train loss per epoch, one panel per model, one line per optimizer."""
    # The object-oriented API renders with Agg without switching pyplot's global backend.
    Figure = require_extra("matplotlib.figure", "the loss-curve figure (--no-plot runs without it)").Figure

    models = list(dict.fromkeys(r["model"] for r in results))
    fig = Figure(figsize=(6.0 * len(models), 6.0), layout="constrained")
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    for ax, model in zip(axes, models):
        for i, r in enumerate(r for r in results if r["model"] == model):
            # Varying the dash keeps curves that coincide (the Adam family often does) visible.
            label = f"{r['optimizer']} (lr {r['lr']:g}, {100 * r['test_acc']:.1f}%)"
            ax.plot(range(len(r["curve"])), r["curve"], marker="o", markersize=3,
                    linestyle=("-", "--", ":")[i % 3], label=label)
        if target_loss is not None:
            ax.axhline(target_loss, color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=model, xlabel="epoch", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        # Below the panel, so it never hides the curves.
        ax.legend(fontsize="x-small", title="optimizer (lr, test acc)", title_fontsize="small",
                  loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    axes[0].set_ylabel("train loss (cross-entropy)")
    fig.savefig(path, dpi=120)


def parse_lr(items: Iterable[str]) -> dict[str, float]:
    """{"adam": 0.001, ...} from ["adam=1e-3", ...]; ValueError on anything else."""
    lrs = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in OPTIMIZERS:
            raise ValueError(f"--lr wants NAME=VALUE with NAME one of {', '.join(OPTIMIZERS)}, got {item!r}")
        try:
            lrs[name] = float(value)
        except ValueError:
            raise ValueError(f"--lr {item!r}: {value!r} is not a number") from None
    return lrs


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastadam.examples.digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--models", type=_names, default=d.models, metavar="LIST",
                   help=f"comma-separated models (default: {','.join(d.models)})")
    p.add_argument("--optimizers", type=_names, default=d.optimizers, metavar="LIST",
                   help=f"comma-separated optimizers (default: {','.join(d.optimizers)})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per run (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"mini-batch size (default: {d.batch_size})")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                   help="learning rate for one optimizer, e.g. --lr adam=3e-3 --lr sgd=0.05")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights and batch order (default: {d.seed})")
    p.add_argument("--target-loss", type=float, default=d.target_loss,
                   help=f"train loss for the epochs-to-target column (default: {d.target_loss:g})")
    p.add_argument("--mnist", metavar="DIR", help="train on the MNIST IDX files in DIR instead of sklearn digits")
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N training images")
    p.add_argument("--plot", "--out", dest="plot", default="digits_loss.png", metavar="PATH",
                   help="PNG of the loss curves (default: digits_loss.png)")
    p.add_argument("--no-plot", action="store_true", help="write no figure")
    p.add_argument("--json", metavar="PATH", help="also write config and results, with curves, as JSON")
    p.add_argument("--reference-steps", type=int, default=d.reference_steps, metavar="N",
                   help=f"steps per native-vs-NumPy Adam timing loop, 0 to skip (default: {d.reference_steps})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _strict_json(value: Any) -> Any:
    # A diverged run has NaN losses, which plain JSON cannot hold; write them as null.
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = Config(models=args.models, optimizers=args.optimizers, epochs=args.epochs,
                        batch_size=args.batch_size, lr=parse_lr(args.lr), seed=args.seed,
                        target_loss=args.target_loss, mnist=args.mnist, limit=args.limit,
                        progress=not args.no_progress, reference_steps=args.reference_steps)
        config.validate()
        check_extras(config, plot=not args.no_plot)
        t0 = time.perf_counter()
        results = run(config)
        elapsed = time.perf_counter() - t0
    except ValueError as e:
        parser.error(str(e))
    print(format_table(results, config.target_loss))
    diffs = [r["reference_max_abs_diff"] for r in results if r["reference_max_abs_diff"] is not None]
    if diffs:
        print(f"native vs NumPy reference Adam after {config.reference_steps} identical steps: "
              f"largest parameter difference {max(diffs):.3g}")
    print(f"total {elapsed:.1f} s")
    if not args.no_plot:
        plot_curves(results, args.plot, config.target_loss)
        print(f"loss curves written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_strict_json({"config": dataclasses.asdict(config), "results": results}), f, indent=1)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
