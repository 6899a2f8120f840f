"""fastadam.torch's native helper (fastadam/_torch_meta.py, cpp/torch/torch_meta.cpp).

The helper reads each parameter's .grad and data pointers through torch's C++ API; without
it the plan reads them through torch's Python API. Both paths must give the same bits,
the same errors and the same version bumps. .ci/run builds the helper (this file fails
there if it cannot) and runs the torch adapter's tests again with FASTADAM_TORCH_HELPER=0.
"""

import os
import warnings

import numpy as np
import pytest
from conftest import in_ci, same_bits, torch_or_skip


@pytest.fixture
def torch():
    return torch_or_skip()


@pytest.fixture
def meta(torch):
    from fastadam import _torch_meta

    return _torch_meta


@pytest.fixture
def helper(meta):
    """The helper's capsule; fails in CI when it cannot be built, skips visibly elsewhere."""
    if os.environ.get("FASTADAM_TORCH_HELPER") == "0":
        pytest.skip("FASTADAM_TORCH_HELPER=0: this run tests the Python-API path")
    try:
        return meta.build().api
    except RuntimeError as error:
        if in_ci():
            raise
        pytest.skip(f"the torch helper cannot be built here: {error}")


def _helper_off(monkeypatch, meta):
    monkeypatch.setattr(meta, "_cached", [None])


def test_the_helper_is_what_a_plan_uses(torch, helper):
    import fastadam.torch as ft

    p = torch.nn.Parameter(torch.ones(10))
    p.grad = torch.full((10,), 0.5)
    opt = ft.Adam([p], lr=0.1)
    opt.step()
    assert opt._plan.torch_helper
    assert p.detach().numpy()[0] < 1


def _train(torch, ft, steps=12, many=0):
    """A run touching what a kept plan must notice: gradients that come and go, new
    gradient objects, a param's data replaced, a group added, a zero-size param. `many`
    more params take the helper's reads in units on several threads (256 tensors and up)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (5,), (0,), (300,), (3, 3)] + [(1 + k % 9,) for k in range(many)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    extra = torch.nn.Parameter(torch.randn(40, generator=gen))
    opt = ft.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True)
    versions, helpers = [], []
    for step in range(steps):
        for k, p in enumerate(opt.param_groups[0]["params"]):
            if (k + step) % 4 == 3:
                p.grad = None
            elif step % 2 or p.grad is None:
                p.grad = torch.randn(p.shape, generator=gen)  # a new gradient object
            else:
                p.grad.copy_(torch.randn(p.shape, generator=gen))  # the same one, new values
        if step == 5:
            with torch.no_grad():
                params[3].data = params[3].data.clone() * 0.5  # new memory: the plan is rebuilt
        if step == 7:
            opt.add_param_group({"params": [extra], "lr": 0.02})
        if step >= 7:
            extra.grad = torch.randn(40, generator=gen)
        before = [p._version for g in opt.param_groups for p in g["params"]]
        opt.step()
        versions.append([p._version - v for p, v in zip((p for g in opt.param_groups for p in g["params"]), before)])
        helpers.append(opt._plan.torch_helper)
    return opt, versions, helpers


@pytest.mark.parametrize("many", [0, 400])
def test_the_helper_and_the_python_api_path_give_the_same_bits(torch, helper, meta, monkeypatch, many):
    import fastadam.torch as ft

    with_helper, versions_with, helpers_with = _train(torch, ft, many=many)
    _helper_off(monkeypatch, meta)
    without, versions_without, helpers_without = _train(torch, ft, many=many)
    assert all(helpers_with) and not any(helpers_without)
    assert versions_with == versions_without  # each stepped param bumped once, others not
    assert any(0 in v for v in versions_with) and any(1 in v for v in versions_with)
    for a, b in zip(with_helper.param_groups, without.param_groups):
        for p, q in zip(a["params"], b["params"]):
            assert same_bits(p.detach().numpy(), q.detach().numpy())
            sa, sb = with_helper.state[p], without.state[q]
            assert sa.keys() == sb.keys()
            for key in sa:
                assert same_bits(sa[key].numpy(), sb[key].numpy()), key


def test_back_to_back_steps_on_many_tensors_read_them_on_several_threads_with_the_same_bits(torch, helper, meta, monkeypatch):
    # 400 tensors of 4096: each step runs on both cores, so between back-to-back steps the
    # workers spin and take units of the helper's reads and checks (fastadam::run_units)
    import fastadam.torch as ft

    def run():
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(4096, generator=gen)) for _ in range(400)]
        for p in params:
            p.grad = torch.randn(4096, generator=gen)
        opt = ft.AdamW(params, lr=0.01)
        versions = [p._version for p in params]
        for _ in range(10):
            opt.step()
        assert [p._version - v for p, v in zip(params, versions)] == [10] * 400
        return params, opt

    ours, opt = run()
    assert opt._plan.torch_helper
    _helper_off(monkeypatch, meta)
    theirs, _ = run()
    for p, q in zip(ours, theirs):
        assert same_bits(p.detach().numpy(), q.detach().numpy())
    assert float(opt.state[ours[0]]["step"]) == 10


BAD_GRADS = {
    "strided": lambda torch, p: torch.randn(p.numel(), 2)[:, 0].reshape(p.shape),
    "negated view": lambda torch, p: torch._neg_view(torch.randn(p.shape)),
    "sparse": lambda torch, p: torch.randn(p.shape).to_sparse(),
}


@pytest.mark.parametrize("many", [0, 300])
@pytest.mark.parametrize("kind", sorted(BAD_GRADS))
def test_a_rejected_gradient_gets_the_same_error_on_both_paths_and_nothing_is_written(torch, helper, meta, monkeypatch, kind, many):
    import fastadam.torch as ft

    def attempt():
        a, b = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
        others = [torch.nn.Parameter(torch.ones(3)) for _ in range(many)]  # b then sits past the first units
        for p in others:
            p.grad = torch.ones(3)
        opt = ft.Adam([a] + others[: many // 2] + [b] + others[many // 2 :], lr=0.1)
        a.grad, b.grad = torch.ones(6), torch.ones(6)
        opt.step()  # the plan is kept from here
        for _ in range(3):  # the workers spin between back-to-back steps: the reads go in units
            opt.step()
        kept = [a.detach().clone(), b.detach().clone(), opt.state[a]["exp_avg"].clone(), opt.state[a]["step"].clone()]
        versions = (a._version, b._version)
        b.grad = BAD_GRADS[kind](torch, b)
        with pytest.raises((TypeError, ValueError)) as error:
            opt.step()
        after = [a.detach(), b.detach(), opt.state[a]["exp_avg"], opt.state[a]["step"]]
        assert all(torch.equal(x, y) for x, y in zip(kept, after))
        assert (a._version, b._version) == versions
        return type(error.value), str(error.value)

    got = attempt()
    _helper_off(monkeypatch, meta)
    assert got == attempt()
    assert f"param_groups[0]['params'][{1 + many // 2}]" in got[1]


# A param changed behind the plan's back at the same address: another shape, dtype or
# layout over the same memory. The plan must notice, not step the old layout.
SAME_ADDRESS = {
    "reshaped": lambda torch, p: p.data.view(5, 7),
    "shrunk": lambda torch, p: p.data.view(-1)[:3],
    "transposed": lambda torch, p: p.data.t(),
    "reinterpreted": lambda torch, p: p.data.view(torch.int32),
}


@pytest.mark.parametrize("kind", sorted(SAME_ADDRESS))
def test_a_param_changed_at_the_same_address_is_refused_on_both_paths_and_nothing_is_written(torch, helper, meta, monkeypatch, kind):
    import fastadam.torch as ft

    def attempt():
        p = torch.ones(7, 5)  # a plain tensor: a Parameter's .data cannot become int32
        opt = ft.Adam([p], lr=0.1)
        p.grad = torch.ones(7, 5)
        opt.step()
        storage = p.untyped_storage()
        before = bytes(storage)
        state = {k: v.clone() for k, v in opt.state[p].items()}
        grad = p.grad
        p.data = SAME_ADDRESS[kind](torch, p)
        assert p.data_ptr() == storage.data_ptr()
        if p.dtype.is_floating_point:
            p.grad = torch.ones(p.shape)
        else:
            assert p.grad is grad  # torch takes no int32 gradient: the float one stays
        with pytest.raises((TypeError, ValueError)) as error:
            opt.step()
        assert bytes(storage) == before
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
        return type(error.value), str(error.value)

    got = attempt()
    _helper_off(monkeypatch, meta)
    assert got == attempt()


def test_an_inference_tensor_param_is_refused_with_a_clear_error(torch):
    import fastadam.torch as ft

    with torch.inference_mode():
        p = torch.ones(4)
    with pytest.raises(TypeError, match="inference tensor.*outside inference mode"):
        ft.Adam([p])


def test_a_gradient_without_memory_of_its_own_is_refused_on_both_paths(torch, helper, meta, monkeypatch):
    import fastadam.torch as ft

    class Wrapper(torch.Tensor):  # a wrapper subclass: data_ptr() is 0
        @staticmethod
        def __new__(cls, elem):
            return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

        def __init__(self, elem):
            self.elem = elem

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            def unwrap(x):
                return x.elem if isinstance(x, Wrapper) else x

            return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def attempt():
        p = torch.nn.Parameter(torch.ones(4))
        opt = ft.Adam([p], lr=0.1)
        p.grad = torch.ones(4)
        opt.step()
        step = opt.state[p]["step"].clone()
        p.grad = Wrapper(torch.ones(4))
        with pytest.raises(TypeError, match="no memory of its own") as error:
            opt.step()
        assert torch.equal(opt.state[p]["step"], step)
        assert torch.equal(p.detach(), torch.full((4,), 0.9))
        return str(error.value)

    got = attempt()
    _helper_off(monkeypatch, meta)
    assert got == attempt()


def test_a_failed_build_warns_once_and_steps_on_the_python_api_path(torch, meta, monkeypatch):
    import fastadam.torch as ft

    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("fastadam.torch: could not build its torch helper (no compiler in this test)")

    monkeypatch.setattr(meta, "build", failing_build)
    monkeypatch.setattr(meta, "_cached", [])
    monkeypatch.delenv("FASTADAM_TORCH_HELPER", raising=False)
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = ft.Adam([p], lr=0.1)
    with pytest.warns(RuntimeWarning, match="no compiler in this test.*FASTADAM_TORCH_HELPER=0") as record:
        opt.step()
    assert record[0].filename == __file__  # it points at the caller's step()
    assert not opt._plan.torch_helper
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.Adam([torch.nn.Parameter(torch.ones(2))]).step()  # decided once per process: no second warning
    assert calls == [1]
    np.testing.assert_array_less(p.detach().numpy(), 1)


def test_a_missing_helper_source_is_a_warning_not_a_failed_step(torch, meta, monkeypatch, tmp_path):
    import fastadam.torch as ft

    monkeypatch.setattr(meta, "_SOURCE", tmp_path / "missing")
    monkeypatch.setattr(meta, "_cached", [])
    monkeypatch.delenv("FASTADAM_TORCH_HELPER", raising=False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="could not find its source"):
        ft.Adam([p], lr=0.5).step()
    assert torch.equal(p.detach(), torch.full((3,), 0.5))


def test_the_setting_turns_the_helper_off_or_makes_a_failed_build_an_error(torch, meta, monkeypatch):
    def failing_build():
        raise RuntimeError("fastadam.torch: could not build its torch helper (test)")

    monkeypatch.setattr(meta, "build", failing_build)
    monkeypatch.setattr(meta, "_cached", [])
    monkeypatch.setenv("FASTADAM_TORCH_HELPER", "1")
    with pytest.raises(RuntimeError, match="could not build"):
        meta.api()
    monkeypatch.setattr(meta, "_cached", [])
    monkeypatch.setenv("FASTADAM_TORCH_HELPER", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert meta.api() is None
    monkeypatch.setattr(meta, "_cached", [])
    monkeypatch.setenv("FASTADAM_TORCH_HELPER", "off")
    with pytest.raises(ValueError, match="FASTADAM_TORCH_HELPER='off': use 0"):
        meta.api()


@pytest.mark.slow
def test_processes_building_the_helper_at_once_all_get_it(torch, helper, tmp_path):
    # Each build has its own directory and lands whole: none waits on another's lock (a
    # killed build would leave one behind for good) or loads a half-written module.
    import subprocess
    import sys

    code = "import fastadam._torch_meta as m; assert m.api() is not None; print(m.cache_dir())"
    env = {**os.environ, "FASTADAM_CACHE_DIR": str(tmp_path), "FASTADAM_TORCH_HELPER": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    built = {out.strip() for out, _ in outs}
    assert len(built) == 1
    directory = tmp_path / os.path.basename(built.pop())
    assert [p.name for p in directory.iterdir()] == ["fastadam_torch_meta.so"]
    # A damaged cached module is built again, not a reason to go without the helper for good.
    (directory / "fastadam_torch_meta.so").write_bytes(b"not a shared object")
    rerun = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert (directory / "fastadam_torch_meta.so").read_bytes()[:4] == b"\x7fELF"
