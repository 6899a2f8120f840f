"""Tests of the NumPy digits example: hand-written backward passes, IDX reader, training runs, CLI."""

import gzip
import json
import struct
import subprocess
import sys

import matplotlib  # noqa: F401  (the example's extra: a missing one must fail here, not skip)
import numpy as np
import pytest
import sklearn  # noqa: F401
import tqdm  # noqa: F401

from fastadam.examples import digits
from fastadam.examples.idx import load_mnist, read_idx
from fastadam.examples.models import (MODELS, Conv2D, Dense, Flatten, MaxPool2, ReLU, build_model,
                                      softmax_cross_entropy)


# ---------------------------------------------------------------- gradient checks (float64)

def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f() with respect to every entry of x, in place."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


def rel_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


def check_layer(layer, x, tol=1e-7):
    """Backward of ``layer`` against finite differences of sum(forward(x) * R), for x and every param."""
    R = np.random.default_rng(1).standard_normal(layer.forward(x).shape)
    dx = layer.backward(R)
    analytic = {"x": dx, **{k: v.copy() for k, v in layer.grads.items()}}
    assert set(analytic) == {"x", *layer.params}

    def f():
        return float((layer.forward(x) * R).sum())

    for name, arr in {"x": x, **layer.params}.items():
        assert analytic[name].shape == arr.shape
        err = rel_error(analytic[name], numeric_grad(f, arr))
        assert err < tol, f"{type(layer).__name__} d/d{name}: relative error {err:.2e}"


def test_dense_backward():
    rng = np.random.default_rng(0)
    check_layer(Dense(7, 5, rng, np.float64), rng.standard_normal((4, 7)))


def test_relu_backward():
    rng = np.random.default_rng(0)
    # Keep inputs away from the kink at 0, where the derivative is undefined.
    x = rng.uniform(0.1, 1.0, (4, 9)) * rng.choice([-1.0, 1.0], (4, 9))
    check_layer(ReLU(), x)


def test_flatten_backward():
    check_layer(Flatten(), np.random.default_rng(0).standard_normal((3, 2, 4, 4)))


def test_conv2d_backward():
    rng = np.random.default_rng(0)
    layer = Conv2D(3, 4, 3, rng, np.float64)
    layer.params["b"][:] = rng.standard_normal(4)  # nonzero bias, so a wrong broadcast shows
    check_layer(layer, rng.standard_normal((2, 3, 6, 6)))


def test_conv2d_forward_is_same_padded_cross_correlation():
    rng = np.random.default_rng(0)
    layer = Conv2D(2, 3, 3, rng, np.float64)
    layer.params["b"][:] = [0.5, -1.0, 2.0]
    x = rng.standard_normal((2, 2, 5, 4))
    K, b = layer.params["K"], layer.params["b"]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.empty((2, 3, 5, 4))
    for n in range(2):
        for f in range(3):
            for i in range(5):
                for j in range(4):
                    expected[n, f, i, j] = (xp[n, :, i:i + 3, j:j + 3] * K[f]).sum() + b[f]
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)


def test_maxpool_backward():
    rng = np.random.default_rng(0)
    # Distinct values spaced far more than the finite-difference step, so no max changes hands.
    x = rng.permutation(2 * 3 * 6 * 8).reshape(2, 3, 6, 8) * 0.01
    check_layer(MaxPool2(), x)


def test_maxpool_forward_and_ties():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(MaxPool2().forward(x)[0, 0], [[5, 7], [13, 15]])
    pool = MaxPool2()
    pool.forward(np.ones((1, 1, 2, 2)))
    # A tie sends the whole gradient to one input, not a copy to each.
    np.testing.assert_array_equal(pool.backward(np.full((1, 1, 1, 1), 3.0)), [[[[3, 0], [0, 0]]]])


def test_softmax_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10))
    y = rng.integers(0, 10, 6)
    loss, d = softmax_cross_entropy(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(6), y]).mean(), rel=1e-12)
    err = rel_error(d, numeric_grad(lambda: softmax_cross_entropy(logits, y)[0], logits))
    assert err < 1e-7
    # Large logits must not overflow: the max is subtracted before exponentiating.
    loss, d = softmax_cross_entropy(np.array([[1000.0, 0.0], [0.0, 1000.0]]), np.array([0, 0]))
    assert loss == pytest.approx(500.0) and np.isfinite(d).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_model_backward(name):
    rng = np.random.default_rng(0)
    sizes = {"softmax": {}, "mlp": {"hidden": 16}, "convnet": {"channels": 3, "hidden": 8}}[name]
    model = build_model(name, (8, 8), seed=3, dtype=np.float64, **sizes)
    for p in model.params.values():  # nonzero biases, so bias gradients are exercised too
        p += 0.1 * rng.standard_normal(p.shape)
    x = rng.uniform(0, 1, (5, 1, 8, 8))
    y = rng.integers(0, 10, 5)
    _, grads = model.loss_and_grads(x, y)
    assert list(grads) == list(model.params)
    for key, param in model.params.items():
        assert grads[key].dtype == np.float64 and grads[key].flags.c_contiguous
        err = rel_error(grads[key], numeric_grad(lambda: softmax_cross_entropy(model.forward(x), y)[0], param))
        assert err < 1e-6, f"{name} d/d{key}: relative error {err:.2e}"


def test_models_in_float32():
    model = build_model("convnet", (8, 8), seed=0)
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    _, grads = model.loss_and_grads(x, np.arange(4))
    assert all(p.dtype == np.float32 for p in model.params.values())
    assert all(g.dtype == np.float32 and g.flags.c_contiguous for g in grads.values())
    with pytest.raises(ValueError, match="even"):
        build_model("convnet", (7, 8), seed=0)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (8, 8), seed=0)


# ---------------------------------------------------------------- IDX reader

def idx_bytes(array, code):
    """IDX encoding of ``array``, written independently of the reader under test."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.asarray(array, dtype).tobytes()


@pytest.mark.parametrize("code, values", [
    (0x08, np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
    (0x09, np.array([-128, -1, 0, 127], np.int8)),
    (0x0B, np.array([[-30000, 2], [3, 30000]], np.int16)),
    (0x0C, np.array([[1, -2, 70000]], np.int32)),
    (0x0D, np.array([1.5, -2.25, 3e30], np.float32)),
    (0x0E, np.array([[1e-300, -np.pi]], np.float64)),
])
def test_read_idx_types(tmp_path, code, values):
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(values, code))
    got = read_idx(path)
    assert got.shape == values.shape and got.dtype.kind == values.dtype.kind
    np.testing.assert_array_equal(got, values)


def test_read_idx_gzip(tmp_path):
    values = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(values, 0x08)))
    np.testing.assert_array_equal(read_idx(path), values)


@pytest.mark.parametrize("data, message", [
    (b"", "shorter than the 4-byte magic"),
    (b"\x00\x00", "shorter than the 4-byte magic"),
    (b"\x00\x01\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "bad magic"),
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05", "bad magic"),
    (b"PK\x03\x04rest of a zip file", "bad magic"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
    (idx_bytes(np.zeros((3, 4, 4), np.uint8), 0x08)[:-1], "truncated IDX file"),
    (idx_bytes(np.zeros(3, np.int32), 0x0C) + b"\x00", "trailing bytes"),
])
def test_read_idx_rejects_malformed(tmp_path, data, message):
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8), 0x08))[:-10])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


def write_mnist(directory, n_train=64, n_test=16, side=28, seed=0, gz=(), names=None):
    """Four MNIST-style IDX files of random images whose labels follow the brightest row band."""
    rng = np.random.default_rng(seed)
    names = names or {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                      "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, side, side)).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for key, array in arrays.items():
        data = idx_bytes(array, 0x08)
        name = names[key]
        if key in gz:
            data, name = gzip.compress(data), name + ".gz"
        (directory / name).write_bytes(data)
    return arrays


def test_load_mnist(tmp_path):
    written = write_mnist(tmp_path, gz=("train_images", "test_labels"))
    got = load_mnist(tmp_path)
    for key, array in zip(("train_images", "train_labels", "test_images", "test_labels"), got):
        np.testing.assert_array_equal(array, written[key])


def test_load_mnist_accepts_dotted_names(tmp_path):
    dotted = {"train_images": "train-images.idx3-ubyte", "train_labels": "train-labels.idx1-ubyte",
              "test_images": "t10k-images.idx3-ubyte", "test_labels": "t10k-labels.idx1-ubyte"}
    written = write_mnist(tmp_path, names=dotted, gz=("test_images",))
    np.testing.assert_array_equal(load_mnist(tmp_path)[2], written["test_images"])


def test_load_mnist_errors(tmp_path):
    with pytest.raises(ValueError, match="no train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(15, np.uint8), 0x08))
    with pytest.raises(ValueError, match="16 test images but 15 labels"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(16, 10, np.uint8), 0x08))
    with pytest.raises(ValueError, match="digits 0-9"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((16, 1), np.uint8), 0x08))
    with pytest.raises(ValueError, match="labels 1-D"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------- training runs

def small(**kwargs):
    return digits.Config(**{"epochs": 1, "limit": 300, "progress": False, "reference_steps": 0, **kwargs})


def test_runs_are_deterministic_with_shared_init_and_batches():
    config = small(optimizers=("adam", "amsgrad", "sgd", "nesterov"))
    first, second = digits.run(config), digits.run(config)
    assert [(r["model"], r["optimizer"]) for r in first] == [(m, o) for m in MODELS for o in config.optimizers]
    for a, b in zip(first, second):
        assert a["curve"] == b["curve"] and a["batch_losses"] == b["batch_losses"]
        assert a["test_acc"] == b["test_acc"]
        assert len(a["curve"]) == 2 and len(a["batch_losses"]) == 10  # ceil(300 / 32) steps
    for model in MODELS:
        rows = [r for r in first if r["model"] == model]
        # Same initial weights and same first mini-batch for every optimizer of a model...
        assert len({r["curve"][0] for r in rows}) == 1 and len({r["batch_losses"][0] for r in rows}) == 1
        # ...after which the optimizers really do differ.
        assert len({r["curve"][1] for r in rows}) == len(rows)
    other = digits.run(small(optimizers=("adam",), seed=1))
    assert other[0]["curve"] != first[0]["curve"]


def test_every_optimizer_lowers_the_loss():
    for r in digits.run(small(models=("softmax", "mlp"), epochs=2)):
        assert r["curve"][2] < r["curve"][1] < r["curve"][0], (r["model"], r["optimizer"], r["curve"])


def test_mlp_with_adam_reaches_95_percent_on_default_settings():
    config = digits.Config(models=("mlp",), optimizers=("adam",), progress=False, reference_steps=0)
    (result,) = digits.run(config)
    assert config.epochs == digits.Config().epochs and result["lr"] == digits.DEFAULT_LR["adam"]
    assert result["test_acc"] >= 0.95
    assert result["epochs_to_target"] is not None and result["curve"][result["epochs_to_target"]] <= 0.1


def test_lr_overrides_and_reference_contrast():
    results = digits.run(small(models=("softmax",), optimizers=("adam", "adamw", "amsgrad", "momentum"),
                               lr={"adam": 0.01}, reference_steps=3))
    lrs = {r["optimizer"]: r["lr"] for r in results}
    assert lrs == {"adam": 0.01, "adamw": 1e-3, "amsgrad": 1e-3, "momentum": 0.01}
    for r in results:
        if r["optimizer"] == "momentum":
            assert r["native_step_us"] is None and r["reference_max_abs_diff"] is None
        else:
            assert r["native_step_us"] > 0 and r["reference_step_us"] > 0
            # Same start, same gradients, same hyperparameters: the native kernel and the NumPy
            # reference must agree bit for bit.
            assert r["reference_max_abs_diff"] == 0.0
        assert 0 <= r["step_share"] <= 1 and r["step_seconds"] <= r["train_seconds"]


def test_mnist_directory(tmp_path):
    write_mnist(tmp_path, gz=("train_images",))
    results = digits.run(small(models=("softmax", "convnet"), optimizers=("adam",), mnist=str(tmp_path), limit=None))
    assert [r["n_params"] for r in results] == [28 * 28 * 10 + 10, 8 * 9 + 8 + 8 * 14 * 14 * 64 + 64 + 64 * 10 + 10]
    assert all(len(r["batch_losses"]) == 2 and np.isfinite(r["curve"]).all() for r in results)


@pytest.mark.parametrize("change, message", [
    ({"models": ("mlp", "resnet")}, "unknown model 'resnet'"),
    ({"optimizers": ("rmsprop",)}, "unknown optimizer 'rmsprop'"),
    ({"lr": {"lion": 1e-4}}, "unknown optimizer 'lion'"),
    ({"lr": {"sgd": -0.1}}, "positive"),
    ({"lr": {"sgd": float("nan")}}, "positive"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"limit": 0}, "limit"),
    ({"optimizers": ()}, "at least one"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        digits.run(small(**change))


# ---------------------------------------------------------------- command line

def test_parse_lr():
    assert digits.parse_lr(["adam=3e-3", "sgd=0.05", "adam=1e-2"]) == {"adam": 1e-2, "sgd": 0.05}
    for bad in ["adam", "adam:1e-3", "lion=1e-4", "adam=fast", "=1"]:
        with pytest.raises(ValueError, match="--lr"):
            digits.parse_lr([bad])


def test_cli_writes_table_plot_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = digits.main(["--epochs", "2", "--models", "softmax,mlp", "--optimizers", "adam,sgd", "--limit", "200",
                        "--lr", "sgd=0.05", "--target-loss", "5", "--reference-steps", "2", "--json", "out.json"])
    assert code == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["model", "optimizer", "lr", "train", "loss"]
    assert lines[2].split()[:3] == ["softmax", "adam", "0.001"] and lines[5].split()[:3] == ["mlp", "sgd", "0.05"]
    assert "mlp/sgd" in err  # the progress bar, on stderr
    # The default figure lands in the working directory.
    assert (tmp_path / "digits_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["config"]["lr"] == {"sgd": 0.05} and len(saved["results"]) == 4
    assert all(r["epochs_to_target"] == 0 and len(r["curve"]) == 3 for r in saved["results"])


def test_cli_plot_path_and_diverging_run(tmp_path, capsys):
    png, js = tmp_path / "curves.png", tmp_path / "r.json"
    # lr 1e38 overflows float32 to NaN: the run must still finish, and write NaN as JSON null.
    assert digits.main(["--epochs", "2", "--models", "softmax", "--optimizers", "sgd", "--lr", "sgd=1e38",
                        "--limit", "100", "--no-progress", "--out", str(png), "--json", str(js)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    (result,) = json.loads(js.read_text())["results"]
    assert result["train_loss"] is None and result["curve"][-1] is None
    assert "nan" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--lr", "adam"], "--lr wants NAME=VALUE"),
    (["--models", "mlp,vgg"], "unknown model 'vgg'"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--mnist", "/nonexistent/dir"], "no train-images-idx3-ubyte"),
])
def test_cli_bad_input_is_a_usage_error(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        digits.main(args + ["--no-progress", "--no-plot"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_default_learning_rates(capsys):
    with pytest.raises(SystemExit) as exc:
        digits.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name, lr in digits.DEFAULT_LR.items():
        line = next(line for line in text.splitlines() if line.split()[:1] == [name])
        assert float(line.split()[-1]) == lr


def test_core_import_needs_no_example_extras():
    # Importing the example must not pull in sklearn, matplotlib or tqdm either: they load on use.
    code = ("import sys\n"
            "for name in ('sklearn', 'matplotlib', 'tqdm'): sys.modules[name] = None\n"
            "import fastadam, fastadam.examples.digits\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("hidden, flags, dist", [
    ("sklearn", [], "scikit-learn"),
    ("tqdm", [], "tqdm"),
    ("matplotlib", [], "matplotlib"),
    ("sklearn", ["--no-progress", "--no-plot"], "scikit-learn"),
])  # fmt: skip
def test_missing_extra_names_the_install(monkeypatch, tmp_path, hidden, flags, dist):
    """Without scikit-learn, tqdm or matplotlib the example ends, before training, in an
    ImportError that names the package and the extra (pip install "fastadam[examples]")."""
    monkeypatch.chdir(tmp_path)
    for name in list(sys.modules):
        if name == hidden or name.startswith(hidden + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)  # import hidden -> ImportError
    with pytest.raises(ImportError, match=rf"needs {dist}, which is not installed: pip install \"fastadam\[examples\]\""):
        digits.main(["--epochs", "1", "--models", "softmax", "--optimizers", "sgd", "--limit", "50", *flags])
    assert not (tmp_path / "digits_loss.png").exists()


def test_missing_extras_not_needed_by_the_run_are_not_required(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for hidden in ("tqdm", "matplotlib"):
        for name in list(sys.modules):
            if name == hidden or name.startswith(hidden + "."):
                monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, hidden, None)
    assert digits.main(["--epochs", "1", "--models", "softmax", "--optimizers", "sgd", "--limit", "50",
                        "--no-progress", "--no-plot"]) == 0


def test_missing_extra_from_the_command_line():
    """`python -m fastadam.examples.digits` without scikit-learn: the traceback ends in the hint."""
    code = ("import sys, runpy\n"
            "sys.modules['sklearn'] = None\n"
            "sys.argv = ['digits', '--epochs', '1', '--no-plot', '--no-progress']\n"
            "runpy.run_module('fastadam.examples.digits', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("ImportError: the bundled digits data set needs scikit-learn")
    assert 'pip install "fastadam[examples]"' in out.stderr


def test_bf16_runs_master_weights_and_stochastic_rounding_match_fp32():
    # bf16 weights rounded to nearest lose Adam's small updates (lr 1e-3 is below half a bf16
    # ulp for most weights); master weights and stochastic rounding keep fp32 AdamW's loss.
    names = ("adamw", "adamw-bf16", "adamw-bf16-master", "adamw-bf16-sr", "adamw-bf16-states")
    results = {r["optimizer"]: r for r in digits.run(digits.Config(models=("softmax",), optimizers=names, progress=False,
                                                                    reference_steps=0))}
    fp32 = results["adamw"]["train_loss"]
    for name in ("adamw-bf16-master", "adamw-bf16-sr", "adamw-bf16-states"):
        assert abs(results[name]["train_loss"] - fp32) <= 0.05 * fp32, (name, results[name]["train_loss"], fp32)
    assert results["adamw-bf16"]["train_loss"] > 1.3 * fp32
