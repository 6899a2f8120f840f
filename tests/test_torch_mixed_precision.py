"""fastadam.torch's mixed precision (issue 16) against torch itself: bf16 models follow
torch.optim.AdamW(fused=True) on the same bf16 params; master weights follow an fp32
AdamW on the masters; torch.amp.GradScaler skips the same steps as with torch's fused
Adam; max_grad_norm is clip_grad_norm_ fused into the step."""

import copy
import math

import numpy as np
import pytest
from conftest import same_bits, torch_or_skip

import fastadam

torch = torch_or_skip()
import fastadam.torch as ft  # noqa: E402

STEPS = 30


def model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).to(dtype)


def batches(dtype, n=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 24, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)) for _ in range(n)]


def backward(m, x, y):
    for p in m.parameters():
        p.grad = None
    ((m(x).float() - y.float()) ** 2).mean().backward()


def bf16_ulp(t):
    """The spacing of bfloat16 numbers at |t| (t in bfloat16), as float32."""
    a = t.float().abs()
    up = torch.nextafter(t, torch.full_like(t, math.inf)).float().abs()
    return (up - a).abs().clamp_min(torch.finfo(torch.bfloat16).tiny)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_bf16_model_follows_torch_fused_within_one_ulp_per_step(cls):
    ours, theirs = model(torch.bfloat16), model(torch.bfloat16)
    kw = {"lr": 1e-2, "weight_decay": 0.05}
    opt = getattr(ft, cls)(ours.parameters(), **kw)
    ref = getattr(torch.optim, cls)(theirs.parameters(), fused=True, **kw)
    for x, y in batches(torch.bfloat16):
        backward(ours, x, y)
        backward(theirs, x, y)
        opt.step()
        ref.step()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert p.dtype == torch.bfloat16
            assert bool(((p.float() - q.float()).abs() <= bf16_ulp(q)).all()), (p - q).abs().max()
            q.data.copy_(p.data)  # per step: the next step starts from the same params
        for p, q in zip(ours.parameters(), theirs.parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                a, b = opt.state[p][key], ref.state[q][key]
                assert a.dtype == torch.bfloat16
                b.copy_(a)
    assert float(opt.state[next(ours.parameters())]["step"]) == STEPS


def test_master_weights_follow_fp32_adamw_on_the_masters():
    ours = model(torch.bfloat16)
    masters = copy.deepcopy(ours).float()  # torch's fp32 AdamW on fp32 copies of the bf16 params
    opt = ft.AdamW(ours.parameters(), lr=1e-2, master_weights=True)
    ref = torch.optim.AdamW(masters.parameters(), lr=1e-2, fused=True)
    for x, y in batches(torch.bfloat16):
        backward(ours, x, y)
        for p, q in zip(ours.parameters(), masters.parameters()):
            q.grad = p.grad.float()  # the same bf16 gradient, widened exactly
        opt.step()
        ref.step()
        for p, q in zip(ours.parameters(), masters.parameters()):
            master = opt.state[p]["master_param"]
            assert master.dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32
            rel = (master - q.detach()).abs() / q.detach().abs().clamp_min(1e-3)
            assert float(rel.max()) < 1e-4
            assert same_bits(p.detach().view(torch.int16).numpy(), master.to(torch.bfloat16).view(torch.int16).numpy())


def resync(opt, ref, ours, theirs, ref_params):
    """Torch's side starts the next step from ours (params, masters, states): each step is
    compared alone. torch's fused kernel rounds differently (FMA), and over many steps the
    two trajectories drift apart by more than one step's rounding, by amounts that depend
    on which of torch's CPU kernels runs."""
    with torch.no_grad():
        for p, q, r in zip(ours.parameters(), theirs.parameters(), ref_params):
            r.copy_(opt.state[p].get("master_param", p))
            q.copy_(r.to(q.dtype))
            for key in ("exp_avg", "exp_avg_sq"):
                ref.state[r][key].copy_(opt.state[p][key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scaler_skips_the_steps_torch_fused_skips(dtype):
    # inf gradients at steps 3 and 7: GradScaler finds them, both optimizers skip, the scale halves
    ours, theirs = model(dtype), model(dtype)
    kw = {"lr": 1e-2} | ({"master_weights": True} if dtype == torch.bfloat16 else {})
    opt = ft.AdamW(ours.parameters(), **kw)
    ref_params = list(theirs.parameters()) if dtype == torch.float32 else [p.detach().float().requires_grad_() for p in theirs.parameters()]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, fused=True)
    s1, s2 = torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skipped = []
    for step, (x, y) in enumerate(batches(dtype, 12)):
        for m, scaler in ((ours, s1), (theirs, s2)):
            for p in m.parameters():
                p.grad = None
            scaler.scale(((m(x).float() - y.float()) ** 2).mean()).backward()
            if step in (3, 7):
                next(m.parameters()).grad.view(-1)[0] = math.inf
        if dtype == torch.bfloat16:
            for p, q in zip(theirs.parameters(), ref_params):
                q.grad = p.grad.float()
        s1.step(opt)
        s2.step(ref)
        s1.update()
        s2.update()
        if dtype == torch.bfloat16:  # torch's side of master weights: the bf16 model from the fp32 params
            with torch.no_grad():
                for p, q in zip(theirs.parameters(), ref_params):
                    p.copy_(q.to(torch.bfloat16))
        skipped.append(opt.last_step_skipped)
        assert s1.get_scale() == s2.get_scale()
        for p, q in zip(ours.parameters(), ref_params):
            want = q.detach().to(dtype) if dtype == torch.bfloat16 else q.detach()
            tol = bf16_ulp(want) if dtype == torch.bfloat16 else 1e-5 * want.abs().clamp_min(1e-3)
            assert bool(((p.detach().float() - want.float()).abs() <= tol).all())
        resync(opt, ref, ours, theirs, ref_params)
    assert [i for i, s in enumerate(skipped) if s] == [3, 7]
    p0 = next(ours.parameters())
    assert float(opt.state[p0]["step"]) == 10 == float(ref.state[ref_params[0]]["step"])


def test_max_grad_norm_is_clip_grad_norm_then_the_step():
    ours, theirs = model(torch.float32), model(torch.float32)
    opt = ft.AdamW(ours.parameters(), lr=1e-2, max_grad_norm=0.05)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    clipped = 0
    for x, y in batches(torch.float32):
        backward(ours, x, y)
        backward(theirs, x, y)
        total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        clipped += float(total) > 0.05
        opt.step()
        ref.step()
        assert abs(opt.last_grad_norm - float(total)) <= 1e-5 * float(total)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert float(((p - q).abs() / q.abs().clamp_min(1e-3)).max().detach()) < 1e-5
        resync(opt, ref, ours, theirs, list(theirs.parameters()))
    assert clipped > STEPS // 2  # the clipping was exercised


def test_state_dict_round_trip_keeps_masters_and_state_dtypes():
    ours = model(torch.bfloat16)
    opt = ft.AdamW(ours.parameters(), lr=1e-2, master_weights=True, state_dtype=torch.bfloat16)
    data = batches(torch.bfloat16, 6)
    for x, y in data[:3]:
        backward(ours, x, y)
        opt.step()
    twin = copy.deepcopy(ours)
    saved = copy.deepcopy(opt.state_dict())
    other = ft.AdamW(twin.parameters(), lr=1e-2, master_weights=True, state_dtype=torch.bfloat16)
    other.load_state_dict(saved)
    p_twin = next(twin.parameters())
    assert other.state[p_twin]["master_param"].dtype == torch.float32
    assert other.state[p_twin]["exp_avg"].dtype == torch.bfloat16
    for x, y in data[3:]:
        for m, o in ((ours, opt), (twin, other)):
            backward(m, x, y)
            o.step()
    for p, q in zip(ours.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], other.state[q]["master_param"])


def test_stochastic_rounding_gives_the_numpy_optimizers_bits():
    ours = model(torch.bfloat16)
    arrays = [ft._numpy(p).copy() for p in ours.parameters()]
    # torch keeps a bf16 param's state in bf16; the NumPy optimizer's default is float32
    opt = ft.Adam(ours.parameters(), lr=1e-2, stochastic_rounding=True)
    twin = fastadam.Adam(arrays, lr=1e-2, stochastic_rounding=True, state_dtype=arrays[0].dtype)
    for x, y in batches(torch.bfloat16, 3):
        backward(ours, x, y)
        twin.step([ft._numpy(p.grad).copy() for p in ours.parameters()])
        opt.step()
    for p, a in zip(ours.parameters(), arrays):
        assert same_bits(ft._numpy(p), a)


def test_bad_mixed_settings_raise_before_anything_changes():
    w = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="master_weights=True keeps float32 copies"):
        ft.Adam([w], master_weights=True)
    with pytest.raises(ValueError, match="stochastic_rounding=True rounds bfloat16"):
        ft.Adam([w], stochastic_rounding=True)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        ft.Adam([w], max_grad_norm=0.0)
    with pytest.raises(TypeError, match="state_dtype must be None"):
        ft.Adam([w], state_dtype="bf16")
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = ft.AdamW([{"params": [b], "master_weights": True}, {"params": [w]}], lr=0.1)
    b.grad = torch.ones(4, dtype=torch.bfloat16)
    w.grad = torch.ones(4, 2)[:, 0]  # not contiguous: nothing may change, no state appears
    before = b.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] .* is not contiguous"):
        opt.step()
    assert torch.equal(b, before) and len(opt.state) == 0
    w.grad = torch.ones(4)
    opt.step()
    assert float(opt.state[b]["step"]) == 1 and not torch.equal(b, before)


def test_kept_views_follow_changes_between_steps():
    # The adapter keeps its views from step to step; every change between steps must reach
    # the kernel as it does when they are rebuilt for every step (the twin below).
    def run(rebuild_every_step):
        m = model(torch.bfloat16)
        params = list(m.parameters())
        opt = ft.AdamW(m.parameters(), lr=1e-2, master_weights=True)
        for t, (x, y) in enumerate(batches(torch.bfloat16, 8)):
            backward(m, x, y)
            if t == 2:
                params[1].grad = None  # one param sits out a step
            if t == 3:
                opt.state[params[0]]["exp_avg"] = torch.zeros_like(opt.state[params[0]]["exp_avg"])  # state replaced
            if t == 4:
                params[2].data = params[2].data.clone()  # new memory for a param
            if t == 5:
                opt.param_groups[0]["lr"] = 3e-3
            if rebuild_every_step:
                opt._mixed_plan = None
            opt.step()
        return [p.detach().clone() for p in params], opt

    kept, opt = run(False)
    rebuilt, _ = run(True)
    for a, b in zip(kept, rebuilt):
        assert torch.equal(a, b)
    p0 = next(iter(opt.state))
    assert float(opt.state[p0]["step"]) == 8


def test_a_bad_gradient_after_kept_steps_is_named_and_changes_nothing():
    m = model(torch.bfloat16)
    opt = ft.AdamW(m.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    (x, y), = batches(torch.bfloat16, 1)
    backward(m, x, y)
    opt.step()
    opt.step()
    params = list(m.parameters())
    before = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    params[2].grad = torch.ones(params[2].shape[::-1], dtype=torch.bfloat16).t()  # not contiguous
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].* is not contiguous"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for p in params:
        for key, value in state[id(p)].items():
            assert torch.equal(opt.state[p][key], value)


def test_a_gradient_of_another_dtype_is_refused_with_a_kept_plan_too():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = ft.AdamW([p], lr=0.1, master_weights=True)
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch >= 2.9 lets a gradient of another dtype be assigned
    try:
        p.grad = torch.ones(8, dtype=torch.float32)
    except RuntimeError:
        pytest.skip("this torch refuses a gradient of another dtype on assignment")
    before = p.detach().clone()
    with pytest.raises(TypeError, match="has dtype torch.float32, the parameter torch.bfloat16"):
        opt.step()
    assert torch.equal(p, before) and float(opt.state[p]["step"]) == 1


def test_max_grad_norm_is_the_optimizers_and_float64_is_refused_at_construction():
    p = torch.nn.Parameter(torch.ones(4))
    opt = ft.AdamW([p], max_grad_norm=1.0)
    assert opt.max_grad_norm == 1.0 and "max_grad_norm" not in opt.param_groups[0]
    assert "max_grad_norm" not in opt.state_dict()["param_groups"][0]
    with pytest.raises(ValueError, match="max_grad_norm is the optimizer's"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "max_grad_norm": 0.1})
    with pytest.raises(TypeError, match="float64; max_grad_norm works on float32"):
        ft.AdamW([torch.nn.Parameter(torch.ones(4, dtype=torch.float64))], max_grad_norm=1.0)


def test_master_weights_follow_new_param_values_and_being_switched_off():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = ft.AdamW([p], lr=0.1, master_weights=True, weight_decay=0.0)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    p.data = torch.full((4,), 5.0, dtype=torch.bfloat16)  # new values from outside the optimizer
    opt.step()
    assert float(p.detach()[0]) > 4.5  # went on from 5, not back to the old master's 0.9
    assert float(opt.state[p]["master_param"][0]) > 4.5
    opt.param_groups[0]["master_weights"] = False
    opt.step()
    assert "master_param" not in opt.state[p]
    value = float(p.detach()[0])
    opt.param_groups[0]["master_weights"] = True
    opt.step()
    assert abs(float(p.detach()[0]) - value) < 0.2  # a new master from the param, not a stale copy


def test_state_dicts_move_between_the_numpy_and_torch_optimizers_with_bf16_states():
    import ml_dtypes

    w = np.linspace(-1, 1, 12, dtype=np.float32).astype(ml_dtypes.bfloat16)
    opt = fastadam.AdamW([w], lr=1e-2, state_dtype=ml_dtypes.bfloat16)
    opt.step([np.full(12, 0.5, ml_dtypes.bfloat16)])
    p = torch.nn.Parameter(torch.from_numpy(w.view(np.int16).copy()).view(torch.bfloat16))
    topt = ft.AdamW([p], lr=1e-2, state_dtype=torch.bfloat16)
    topt.load_state_dict(opt.state_dict())
    assert topt.param_groups[0]["state_dtype"] == torch.bfloat16
    assert same_bits(ft._numpy(topt.state[p]["exp_avg"]), opt.state[0]["exp_avg"])
    back = fastadam.AdamW([w.copy()], lr=1e-2, state_dtype=ml_dtypes.bfloat16)
    back.load_state_dict(topt.state_dict())
    assert back.param_groups[0]["state_dtype"] == np.dtype(ml_dtypes.bfloat16)
    assert same_bits(back.state[0]["exp_avg_sq"], opt.state[0]["exp_avg_sq"])
