"""A typed user of fastadam's public API: `mypy --strict` checks it in CI (.ci/run).

Not a test module (pytest collects test_*.py only); it also runs: `python tests/typed_usage.py`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import fastadam
from fastadam import reference


def train(steps: int = 3) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(0)
    w: npt.NDArray[np.float32] = rng.standard_normal((4, 3)).astype(np.float32)
    b: npt.NDArray[np.float32] = np.zeros(3, np.float32)
    opt = fastadam.AdamW({"w": w, "b": b}, lr=1e-2)
    for _ in range(steps):
        opt.step({"w": np.ones_like(w), "b": np.ones_like(b)})
    state: dict[str, object] = opt.state_dict()
    assert "state" in state
    m, v = np.zeros_like(b), np.zeros_like(b)
    fastadam.adam_step(b, np.ones_like(b), m, v, step=1, lr=1e-3, betas=(0.9, 0.999))
    reference.adam_step(b.copy(), np.ones_like(b), m.copy(), v.copy(), step=2)
    fastadam.set_num_threads(0)
    isa: str = fastadam.get_isa()
    assert isa in fastadam.available_isas()
    return w


if __name__ == "__main__":
    print(train()[0])
