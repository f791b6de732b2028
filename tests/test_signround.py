"""SignRound (stages/signround.py) on one toy block: a random-weight Llama decoder layer."""

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from awqflow.stages import signround
from awqflow.stages.architectures import architecture_for
from awqflow.stages.method import linears_of
from awqflow.stages.model import OpenModel, run_block, skeleton
from awqflow.stages.quantize import QuantConfig, dequantize_codes, quantize_codes
from awqflow.stages.signround import RoundToGrid, learn_rounding, quantize_learned

from conftest import tiny_llama_config

SEQLEN, N_SAMPLES = 32, 8
CONFIGS = [QuantConfig(3, 32), QuantConfig(4, 32)]
IDS = ["w3g32", "w4g32"]


@pytest.fixture(scope="module")
def toy():
    """(block, kwargs, hidden, target): float32 block, 8 samples x 32 tokens, target = FP block output."""
    config = tiny_llama_config(hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    block = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            # weights big enough that the block's branches matter next to the residual
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    # the kwargs need only the structure: no tensor reader
    m = OpenModel("", config, architecture_for("llama"), None, skeleton(config))
    kwargs = m.block_kwargs(SEQLEN, "cpu", torch.float32)[0]
    hidden = torch.randn(N_SAMPLES, SEQLEN, 64)
    hidden[..., [3, 40]] *= 8  # outlier channels, as real activations have
    return block, kwargs, hidden, run_block(block, hidden, kwargs)


def run(toy, qcfg, **kw):
    block, kwargs, hidden, target = toy
    return learn_rounding(block, linears_of(block), hidden, kwargs, target, qcfg, **{"batch_size": 4, **kw})


def output_mse(toy, weights: dict) -> float:
    """The block's full-data output MSE vs target with these weights put into (a copy of) it."""
    block, kwargs, hidden, target = toy
    trial = copy.deepcopy(block)
    for name, lin in linears_of(trial).items():
        lin.weight.data = weights[name].to(lin.weight.dtype)
    return float((run_block(trial, hidden, kwargs) - target).pow(2).mean())


@pytest.fixture(scope="module")
def learned(toy):
    """50 steps at each config, run once and shared by the tests that only read the result."""
    return {qcfg: run(toy, qcfg, steps=50) for qcfg in CONFIGS}


@pytest.mark.parametrize("qcfg", CONFIGS, ids=IDS)
def test_learned_rounding_beats_plain_rounding(toy, learned, qcfg):
    result, stats = learned[qcfg]
    plain = {n: dequantize_codes(*quantize_codes(lin.weight, qcfg)) for n, lin in linears_of(toy[0]).items()}
    assert stats["loss_before"] == output_mse(toy, plain)
    assert not stats["fell_back"]
    assert stats["steps_run"] == 50 and 0 < stats["best_step"] < 50
    print(f"{qcfg}: learned / plain = {stats['loss_after'] / stats['loss_before']:.3f}")
    assert stats["loss_after"] < 0.8 * stats["loss_before"]


@pytest.mark.parametrize("qcfg", CONFIGS, ids=IDS)
def test_returned_codes_are_what_was_evaluated(toy, learned, qcfg):
    result, stats = learned[qcfg]
    mse = output_mse(toy, {n: dequantize_codes(*q) for n, q in result.items()})
    assert mse == stats["loss_after"]  # same weights, same ops: equal, not just close


def test_guard_losses_are_on_the_first_guard_samples(toy, monkeypatch):
    """The before / after losses cost two block forwards on GUARD_SAMPLES samples, not on all of them."""
    monkeypatch.setattr(signround, "GUARD_SAMPLES", 4)
    block, kwargs, hidden, target = toy
    qcfg = CONFIGS[0]
    result, stats = run(toy, qcfg, steps=5)
    first = (block, kwargs, hidden[:4], target[:4])
    plain = {n: dequantize_codes(*quantize_codes(lin.weight, qcfg)) for n, lin in linears_of(block).items()}
    assert stats["loss_before"] == output_mse(first, plain) != output_mse(toy, plain)
    assert stats["loss_after"] == output_mse(first, {n: dequantize_codes(*q) for n, q in result.items()})


@pytest.mark.parametrize("qcfg", CONFIGS + [QuantConfig(4, 32, zero_point=False)], ids=IDS + ["w4g32sym"])
def test_zero_steps_is_plain_rounding(toy, qcfg):
    result, stats = run(toy, qcfg, steps=0)
    for name, lin in linears_of(toy[0]).items():
        for got, want in zip(result[name], quantize_codes(lin.weight, qcfg)):
            assert got.dtype == want.dtype and torch.equal(got, want), name
    assert stats["loss_after"] == stats["loss_before"] and stats["steps_run"] == 0


def other_neighbours(toy, qcfg, share: float) -> dict:
    """Codes on plain rounding's grid where a `share` of the weights take the grid point on their other
    side, as a GPTQ-like start would: {name: (codes, scales, zeros)}."""
    gen = torch.Generator().manual_seed(1)
    start = {}
    for name, lin in linears_of(toy[0]).items():
        codes, scales, zeros = quantize_codes(lin.weight, qcfg)
        g = qcfg.group_len(lin.weight.shape[1])
        pos = (lin.weight.reshape(codes.shape[0], -1, g) / scales[..., None]).reshape(codes.shape)
        pos = pos + zeros.repeat_interleave(g, dim=1)
        flip = (torch.rand(codes.shape, generator=gen) < share) & ((pos - codes).abs() > 0.01)
        moved = torch.where(flip, codes + torch.sign(pos - codes).int(), codes).clamp(0, 2**qcfg.w_bit - 1)
        start[name] = (moved, scales, zeros)
    return start


@pytest.mark.parametrize("qcfg", CONFIGS, ids=IDS)
def test_a_start_is_where_the_tuning_begins_and_what_it_must_beat(toy, qcfg):
    start = other_neighbours(toy, qcfg, share=0.3)
    result, stats = run(toy, qcfg, steps=0, start=start)
    for name in start:
        assert not torch.equal(start[name][0], quantize_codes(linears_of(toy[0])[name].weight, qcfg)[0])
        for got, want in zip(result[name], start[name]):
            assert torch.equal(got, want), name
    # the guard's reference is the start, not plain rounding: a learned result must beat these codes
    tuned, tuned_stats = run(toy, qcfg, steps=30, start=start)
    assert tuned_stats["loss_before"] == stats["loss_before"]
    assert tuned_stats["loss_after"] <= tuned_stats["loss_before"]
    assert stats["loss_before"] != run(toy, qcfg, steps=0)[1]["loss_before"]


@pytest.mark.parametrize("qcfg", CONFIGS, ids=IDS)
def test_codes_in_range_and_scales_fp16(toy, learned, qcfg):
    result, _ = learned[qcfg]
    plain_differs = 0
    for name, lin in linears_of(toy[0]).items():
        codes, scales, zeros = result[name]
        out_f, in_f = lin.weight.shape
        assert codes.dtype == zeros.dtype == torch.int32 and scales.dtype == torch.float32
        assert codes.shape == (out_f, in_f) and scales.shape == zeros.shape == (out_f, in_f // 32)
        assert codes.min() >= 0 and codes.max() < 2**qcfg.w_bit
        assert zeros.min() >= 0 and zeros.max() < 2**qcfg.w_bit
        assert torch.equal(scales.half().float(), scales) and (scales > 0).all()
        plain_differs += int((codes != quantize_codes(lin.weight, qcfg)[0]).sum())
    assert plain_differs > 0  # it learned something


@pytest.mark.parametrize("zero_point", [True, False])
def test_fake_quant_is_dequantize_codes_bit_for_bit(zero_point):
    """With any offsets and factors, the weight trained on is exactly dequantize_codes of its codes,
    and the straight-through gradient reaches all three parameters."""
    qcfg = QuantConfig(3, 32, zero_point)
    gen = torch.Generator().manual_seed(3)
    w = 0.05 * torch.randn(48, 96, generator=gen)
    v = (torch.rand(48, 3, 32, generator=gen) - 0.5).requires_grad_()
    f_min = (0.5 + 0.5 * torch.rand(48, 3, generator=gen)).requires_grad_()
    f_max = (0.5 + 0.5 * torch.rand(48, 3, generator=gen)).requires_grad_()
    w_hat, codes, scales, zeros = quantize_learned(w, v, f_min, f_max, qcfg)
    assert torch.equal(w_hat, dequantize_codes(codes.reshape(48, 96).int(), scales, zeros.int()))
    (w_hat - w).pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (v, f_min, f_max))


def round_to_grid_by_autograd(wg, v, scales, zeros, qmax):
    """RoundToGrid's reference: the same lines left to autograd, round() straight through."""
    x = wg / scales[..., None] + v
    codes = (x + (torch.round(x) - x).detach() + zeros[..., None]).clamp(0, qmax)
    return (codes - zeros[..., None]) * scales[..., None]


@pytest.mark.parametrize("w_bit", [3, 4])
def test_round_to_grid_gradients_match_autograd(w_bit):
    """The hand-written backward gives autograd's gradients, codes clamped at both ends included."""
    gen = torch.Generator().manual_seed(5)
    qmax = 2**w_bit - 1
    wg = torch.randn(16, 4, 32, generator=gen)
    v0 = torch.rand(16, 4, 32, generator=gen) - 0.5
    s0 = 0.2 + torch.rand(16, 4, generator=gen)  # small scales: some codes fall outside [0, qmax]
    z0 = torch.randint(0, qmax + 1, (16, 4), generator=gen).float()
    upstream = torch.randn(16, 4, 32, generator=gen)
    grads = []
    for fn in (lambda *a: RoundToGrid.apply(*a)[0], round_to_grid_by_autograd):
        v, s, z = (t.clone().requires_grad_() for t in (v0, s0, z0))
        w_hat = fn(wg, v, s, z, qmax)
        grads.append((w_hat.detach(), *torch.autograd.grad((w_hat * upstream).sum(), (v, s, z))))
    shifted = torch.round(wg / s0[..., None] + v0) + z0[..., None]
    assert (shifted < 0).any() and (shifted > qmax).any()
    assert torch.equal(grads[0][0], grads[1][0])
    for ours, ref in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_same_seed_is_bit_identical_and_block_is_untouched(toy):
    block = toy[0]
    before = {k: t.clone() for k, t in block.state_dict().items()}
    qcfg = CONFIGS[1]
    seen = []
    a, stats_a = run(toy, qcfg, steps=12, seed=7, progress=lambda step, loss: seen.append((step, loss)))
    b, stats_b = run(toy, qcfg, steps=12, seed=7)
    c, _ = run(toy, qcfg, steps=12, seed=8)
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name]))
    assert stats_a == stats_b
    assert any(not torch.equal(a[n][0], c[n][0]) for n in a)  # the seed picks the minibatches
    assert all(torch.equal(t, before[k]) for k, t in block.state_dict().items())
    assert all(p.grad is None for p in block.parameters())
    assert [s for s, _ in seen] == [0, 10, 11] and all(loss > 0 for _, loss in seen)


def test_fp16_block_leaves_weights_and_dtypes_alone(toy):
    block, kwargs, hidden, target = toy
    half = copy.deepcopy(block).half()
    before = {k: t.clone() for k, t in half.state_dict().items()}
    qcfg = CONFIGS[1]
    result, stats = learn_rounding(
        half, linears_of(half), hidden.half(), kwargs, target.half(), qcfg, steps=10, batch_size=4
    )
    assert all(torch.equal(t, before[k]) and t.dtype == torch.float16 for k, t in half.state_dict().items())
    assert stats["loss_after"] <= stats["loss_before"]
    assert result["mlp.down_proj"][0].dtype == torch.int32


def test_only_the_given_linears_are_quantized_and_early_stop(toy):
    block = toy[0]
    subset = {n: m for n, m in linears_of(block).items() if n.startswith("mlp.")}
    result, stats = learn_rounding(
        block, subset, toy[2], toy[1], toy[3], CONFIGS[0], steps=50, batch_size=2, patience=3
    )
    assert set(result) == set(subset)
    # stopped once 3 steps went by without a new best minibatch loss
    assert stats["steps_run"] < 50 and stats["steps_run"] - 1 - stats["best_step"] == 3


def test_a_linear_not_of_the_block_is_refused(toy):
    block = toy[0]
    stray = {"mlp.up_proj": torch.nn.Linear(64, 128)}
    with pytest.raises(ValueError, match="not the block's module"):
        learn_rounding(block, stray, toy[2], toy[1], toy[3], CONFIGS[0], steps=1)
