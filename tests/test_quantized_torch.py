"""fastadam.torch.Adam8bit / AdamW8bit / Adam4bit / AdamW4bit (issue 17): the torch adapter over
quantized states: the bits of the NumPy optimizers and the reference, torch's state layout
(uint8 codes, float32 absmax, float32 step) through torch's own loading, torch.save round
trips, GradScaler and max_grad_norm, the conversions to torch.optim.AdamW and back, bad input;
and (``peers``) bitsandbytes' and torchao's 8-bit state dicts into fastadam and back."""

import copy
import io
import math

import numpy as np
import pytest
from conftest import PEERS_PIN, import_or_skip, peers_required, same_bits, torch_or_skip

torch = torch_or_skip()

import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402
from fastadam import reference  # noqa: E402
from fastadam.quantized import QuantizedState  # noqa: E402

CLASSES = {8: ft.AdamW8bit, 4: ft.AdamW4bit}
NUMPY_CLASSES = {8: fastadam.AdamW8bit, 4: fastadam.AdamW4bit}
SHAPES = [(64, 80), (40,), (4096,), (70001,)]


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def set_grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_steps_give_the_references_bits(bits):
    params = make_params()
    opt = CLASSES[bits](params, lr=0.01)
    ref = [p.detach().numpy().copy() for p in params]
    n = [p.numel() for p in params]
    m = [QuantizedState.zeros(k, bits=bits, signed=True) if k >= 4096 else np.zeros(k, np.float32) for k in n]
    v = [QuantizedState.zeros(k, bits=bits, signed=False) if k >= 4096 else np.zeros(k, np.float32) for k in n]
    for t in range(1, 4):
        set_grads(params, t)
        opt.step()
        reference.adam_step_multi(ref, [p.grad.numpy().copy() for p in params], [x if isinstance(x, QuantizedState) else x.reshape(s)
                                  for x, s in zip(m, SHAPES)], [x if isinstance(x, QuantizedState) else x.reshape(s) for x, s in zip(v, SHAPES)],
                                  steps=t, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True)  # fmt: skip
    for i, (p, r) in enumerate(zip(params, ref)):
        assert same_bits(p.detach().numpy(), r), i
        entry = opt.state[p]
        assert entry["step"].dtype == torch.float32 and float(entry["step"]) == 3.0
        if isinstance(m[i], QuantizedState):
            assert same_bits(entry["exp_avg_codes"].numpy().reshape(-1), m[i].codes)
            assert same_bits(entry["exp_avg_sq_absmax"].numpy(), v[i].absmax)
        else:
            assert same_bits(entry["exp_avg_sq"].numpy().reshape(-1), v[i])


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_model_with_master_weights_grad_scaler_and_clipping_steps_as_the_numpy_optimizer(bits):
    params = make_params(torch.bfloat16)
    opt = CLASSES[bits](params, lr=0.01, master_weights=True, max_grad_norm=0.5)
    arrays = [ft._numpy(p).copy() for p in params]
    numpy_opt = NUMPY_CLASSES[bits](arrays, lr=0.01, master_weights=True, max_grad_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skipped = []
    for t in range(1, 7):
        scaler.scale(torch.tensor(0.0))  # (what scaler.scale(loss) does before backward: the scale tensor exists)
        set_grads(params, t, scale=scaler.get_scale())
        inf = t == 4
        if inf:
            params[2].grad.view(-1)[5] = math.inf
        grads = [ft._numpy(p.grad).copy() for p in params]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(opt.last_step_skipped)
        if not inf:  # GradScaler found the inf itself and skipped our step; the NumPy step would too
            numpy_opt.step(grads, grad_scale=scale)
        for p, a in zip(params, arrays):
            assert same_bits(ft._numpy(p), a), t
    assert skipped == [False, False, False, True, False, False]
    assert opt.last_grad_norm is not None and math.isfinite(opt.last_grad_norm)
    state, numpy_state = opt.state[params[0]], numpy_opt.state[0]
    assert state["master_param"].dtype == torch.float32 and same_bits(state["master_param"].numpy(), numpy_state["master_param"])
    assert same_bits(state["exp_avg_codes"].numpy().reshape(-1), numpy_state["exp_avg_codes"].reshape(-1))


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_save_round_trip_keeps_dtypes_and_bits(bits):
    params = make_params(torch.bfloat16)
    opt = CLASSES[bits](params, lr=0.01, master_weights=True)
    for t in (1, 2):
        set_grads(params, t)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = CLASSES[bits](resumed_params, lr=0.01, master_weights=True)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    entry = resumed.state[resumed_params[0]]
    # torch's loading cast them to the bf16 param's dtype; the optimizer gives them theirs back
    assert entry["exp_avg_codes"].dtype == torch.uint8 and entry["exp_avg_absmax"].dtype == torch.float32
    assert resumed.state[resumed_params[1]]["exp_avg"].dtype == torch.float32 and entry["master_param"].dtype == torch.float32
    for t in (3, 4):
        for ps, o in ((params, opt), (resumed_params, resumed)):
            set_grads(ps, t)
            o.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    clone = copy.deepcopy(resumed)
    assert clone.min_size == 4096 and clone.state_dict()["param_groups"] == resumed.state_dict()["param_groups"]


@pytest.mark.parametrize("bits", [8, 4])
def test_to_and_from_torch_optim_adamw(bits):
    params = make_params()
    opt = CLASSES[bits](params, lr=0.01)
    for t in (1, 2):
        set_grads(params, t)
        opt.step()
    plain = fastadam.dequantize_state_dict(opt.state_dict())
    assert isinstance(plain["state"][0]["exp_avg"], torch.Tensor) and plain["state"][0]["exp_avg"].shape == SHAPES[0]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adamw = torch.optim.AdamW(torch_params, lr=0.01)
    adamw.load_state_dict(copy.deepcopy(plain))
    set_grads(torch_params, 3)
    adamw.step()
    assert float(adamw.state[torch_params[0]]["step"]) == 3.0
    # and back: torch's plain state dict is quantized on loading, as quantize_state_dict does
    back = CLASSES[bits]([torch.nn.Parameter(p.detach().clone()) for p in torch_params], lr=0.01)
    back.load_state_dict(copy.deepcopy(adamw.state_dict()))
    want = fastadam.quantize_state_dict(adamw.state_dict(), bits=bits)
    got = back.state_dict()
    for i in range(len(SHAPES)):
        for key, value in want["state"][i].items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert torch.equal(got["state"][i][key], value), (i, key)


def test_numpy_and_torch_quantized_state_dicts_move_both_ways():
    params = make_params()
    opt = ft.AdamW8bit(params, lr=0.01)
    set_grads(params, 1)
    opt.step()
    numpy_opt = fastadam.AdamW8bit([p.detach().numpy().copy() for p in params], lr=0.01)
    numpy_opt.load_state_dict(opt.state_dict())
    again = ft.AdamW8bit(make_params(), lr=0.01)
    again.load_state_dict(numpy_opt.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["exp_avg_codes"], opt.state[params[0]]["exp_avg_codes"])


def test_bad_state_dicts_raise_and_change_nothing():
    params = make_params()
    opt = ft.AdamW8bit(params, lr=0.01)
    set_grads(params, 1)
    opt.step()
    target = ft.AdamW8bit(make_params(), lr=0.01)
    good = copy.deepcopy(opt.state_dict())
    cases = [
        ("exp_avg_codes", lambda t: t.to(torch.int16), TypeError, "exp_avg_codes has dtype int16; codes are uint8"),
        ("exp_avg_absmax", lambda t: t[:-1], ValueError, "another block size"),
        ("exp_avg_sq_absmax", lambda t: t.double(), TypeError, "absmax is float32"),
    ]
    for key, change, error, match in cases:
        sd = copy.deepcopy(good)
        sd["state"][0][key] = change(sd["state"][0][key])
        with pytest.raises(error, match=match):
            target.load_state_dict(sd)
        assert len(target.state) == 0
    four = ft.AdamW4bit(make_params(), lr=0.01)
    with pytest.raises(ValueError, match="dequantize_state_dict"):
        four.load_state_dict(good)
    with pytest.raises(ValueError, match="dequantize_state_dict"):
        ft.AdamW(make_params()).load_state_dict(good)


def test_bad_state_tensors_are_named_before_any_write():
    params = make_params()
    opt = ft.AdamW8bit(params, lr=0.01)
    set_grads(params, 1)
    opt.step()
    opt.state[params[0]]["exp_avg_absmax"] = opt.state[params[0]]["exp_avg_absmax"].double()
    before = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match=r"state\['exp_avg_absmax'\] of param_groups\[0\]\['params'\]\[0\] must be a contiguous CPU tensor of torch.float32"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_refused_keywords_and_groups():
    p = make_params()
    with pytest.raises(ValueError, match="amsgrad"):
        ft.AdamW8bit(p, amsgrad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        ft.AdamW4bit(p, state_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float64 with 5120 elements"):
        ft.Adam8bit([torch.nn.Parameter(torch.zeros(64, 80, dtype=torch.float64))])
    opt = ft.AdamW8bit(p[:1])
    with pytest.raises(ValueError, match="min_8bit_size is the optimizer's"):
        opt.add_param_group({"params": p[1:2], "min_8bit_size": 0})
    opt.add_param_group({"params": p[1:2]})
    # a wrapper's group built from the defaults (ZeroRedundancyOptimizer's) carries the optimizer's own value
    opt.add_param_group({"params": p[2:3], "min_8bit_size": 4096})
    assert all("min_8bit_size" not in g for g in opt.param_groups[1:]) and opt.min_size == 4096


def test_a_rejected_step_creates_no_state():
    params = make_params()
    opt = ft.AdamW8bit(params, lr=0.01)
    set_grads(params, 1)
    params[3].grad = torch.zeros(2 * 70001)[::2]  # strided: refused after the other params' state would exist
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step()
    assert len(opt.state) == 0


# ----- bitsandbytes and torchao (peers) --------------------------------------------------------

def grads_like(params, step):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.peers
def test_bitsandbytes_state_loads_into_fastadam_and_back():
    bnb = import_or_skip("bitsandbytes", PEERS_PIN, "bitsandbytes interop", required=peers_required())
    shapes = [(64, 80), (40,), (8192,)]
    theirs = make_params(shapes=shapes)
    bnb_opt = bnb.optim.AdamW8bit(theirs, lr=0.01)
    for t in range(3):
        grads_like(theirs, t)
        bnb_opt.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = ft.AdamW8bit(ours, lr=0.01)
    opt.load_state_dict(copy.deepcopy(bnb_opt.state_dict()))
    for p, q in zip(ours, theirs):  # codes and absmax as they are
        if q.numel() >= 4096:
            assert torch.equal(opt.state[p]["exp_avg_codes"], bnb_opt.state[q]["state1"])
            assert torch.equal(opt.state[p]["exp_avg_sq_absmax"], bnb_opt.state[q]["absmax2"])
        else:
            assert torch.equal(opt.state[p]["exp_avg"], bnb_opt.state[q]["state1"])
    # one more step on each side from the same state: the same update to float32 rounding
    grads_like(ours, 9)
    grads_like(theirs, 9)
    opt.step()
    bnb_opt.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), (p - q).abs().max()
    # and back: bitsandbytes loads fastadam's state and steps on from it
    again = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    bnb_again = bnb.optim.AdamW8bit(again, lr=0.01)
    bnb_again.load_state_dict(ft.to_bitsandbytes(opt.state_dict()))
    assert bnb_again.state[again[2]]["step"] == 4
    assert torch.equal(bnb_again.state[again[2]]["state1"], opt.state[ours[2]]["exp_avg_codes"])
    assert bnb_again.state[again[1]]["state1"].dtype == torch.float32
    grads_like(again, 10)
    bnb_again.step()
    # a code book that is not fastadam's is refused
    bad = copy.deepcopy(bnb_opt.state_dict())
    wrapped = bad["state"][2]["__bnb_optimizer_quant_state__"]
    wrapped["qmap1"] = torch.linspace(-1, 1, 256)
    with pytest.raises(ValueError, match="not fastadam's 8-bit signed map"):
        ft.AdamW8bit(make_params(shapes=shapes)).load_state_dict(bad)


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_state_loads_into_fastadam_and_back(bits):
    optim = import_or_skip("torchao.optim", PEERS_PIN, "torchao interop", required=peers_required())
    peer = {8: optim.AdamW8bit, 4: optim.AdamW4bit}[bits]
    shapes = [(40,), (8192,)]  # torch.compile compiles once per shape (tens of seconds each)
    theirs = make_params(shapes=shapes)
    ao_opt = peer(theirs, lr=0.01)
    for t in range(2):
        grads_like(theirs, t)
        ao_opt.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = CLASSES[bits](ours, lr=0.01)
    buffer = io.BytesIO()  # as a checkpoint goes (torchao's states have no deepcopy)
    torch.save(ao_opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=False))
    state, peer_state = opt.state[ours[1]], ao_opt.state[theirs[1]]
    assert torch.equal(state["exp_avg_codes"], peer_state["exp_avg"].codes)
    assert torch.equal(state["exp_avg_sq_absmax"], peer_state["exp_avg_sq"].scale)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    sd = ft.to_torchao(copy.deepcopy(opt.state_dict()))  # (tensors by reference otherwise, as torch's state dicts)
    again = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ao_again = peer(again, lr=0.01)
    ao_again.load_state_dict(sd)
    assert torch.equal(ao_again.state[again[1]]["exp_avg"].codes, state["exp_avg_codes"])
    grads_like(again, 5)
    grads_like(ours, 5)
    ao_again.step()
    opt.step()
    for p, q in zip(ours, again):
        assert torch.allclose(p, q, rtol=0, atol=1e-5), (p - q).abs().max()
