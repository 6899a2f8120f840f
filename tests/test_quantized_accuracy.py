"""Issue 17's accuracy check: training with 8-bit states ends within 5% of fp32 AdamW's loss
(not worse by more; a quantizer that broke the moments would also show as a loss far below),
on the three digits models of the NumPy example and on a small torch MLP trained 300 steps.
4-bit runs are held to a looser bound (its 16 codes per block are coarse; the numbers are in
docs/design.md, "Quantized states").

    python -m pytest -q -s tests/test_quantized_accuracy.py   # prints the losses
"""

import math

import pytest
from conftest import torch_or_skip

from fastadam.examples import digits

pytestmark = pytest.mark.slow


def check(name, fp32, q8, q4):
    print(f"\n{name}: fp32 AdamW {fp32:.4f}, 8-bit {q8:.4f} ({q8 / fp32 - 1:+.1%}), 4-bit {q4:.4f} ({q4 / fp32 - 1:+.1%})")
    assert math.isfinite(q8) and math.isfinite(q4)
    assert q8 <= 1.05 * fp32, f"{name}: 8-bit AdamW's final loss {q8:.4f} is more than 5% above fp32's {fp32:.4f}"
    assert q8 >= 0.7 * fp32, f"{name}: 8-bit AdamW's final loss {q8:.4f} is far below fp32's {fp32:.4f}: not the same training"
    assert q4 <= 1.35 * fp32, f"{name}: 4-bit AdamW's final loss {q4:.4f} against fp32's {fp32:.4f}"


def test_digits_models_8bit_within_5_percent_of_fp32():
    # the example's rows (python -m fastadam.examples.digits --optimizers adamw,adamw-8bit,adamw-4bit):
    # every tensor of at least 512 elements quantized, the same weights and batches for each optimizer
    config = digits.Config(optimizers=("adamw", "adamw-8bit", "adamw-4bit"), progress=False, reference_steps=0)
    results = digits.run(config)
    loss = {(r["model"], r["optimizer"]): r["train_loss"] for r in results}
    for model in config.models:
        check(f"digits {model}", loss[model, "adamw"], loss[model, "adamw-8bit"], loss[model, "adamw-4bit"])
        acc = {r["optimizer"]: r["test_acc"] for r in results if r["model"] == model}
        assert acc["adamw-8bit"] >= acc["adamw"] - 0.02


def test_small_torch_model_8bit_within_5_percent_of_fp32():
    torch = torch_or_skip()
    import fastadam.torch as ft

    def train(cls):
        torch.manual_seed(0)
        X = torch.randn(2048, 64)
        y = (X @ torch.randn(64, 10) + 0.5 * torch.randn(2048, 10)).argmax(1)
        # 64x256 and 256x256 weights quantized; the 256x10 head and the biases stay fp32 (< 4096)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
                                    torch.nn.Linear(256, 10))  # fmt: skip
        opt = cls(model.parameters(), lr=1e-3, weight_decay=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            idx = torch.randint(0, 2048, (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        quantized = [p for p in model.parameters() if "exp_avg_codes" in opt.state[p]]
        assert len(quantized) == (2 if cls is not torch.optim.AdamW else 0)
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(X), y).item()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: torch's threads only contend with fastadam's on a shared machine
    try:
        check("torch MLP, 300 steps", train(torch.optim.AdamW), train(ft.AdamW8bit), train(ft.AdamW4bit))
    finally:
        torch.set_num_threads(threads)
