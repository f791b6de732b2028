import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from awqflow.stages.architectures import LLAMA
from awqflow.stages.block import checkpoint_tensors, collect_linear_inputs, search_block
from awqflow.stages.method import linears_of, round_linears
from awqflow.stages.quantize import QuantConfig, fake_quantize
from awqflow.stages.scales import (
    SearchConfig,
    apply_scales,
    candidate_scales,
    grid_losses,
    grid_sample,
    group_applies,
    search_scales,
)


def make_block(kv_heads: int, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    block = LlamaDecoderLayer(config, layer_idx=0).to(dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            # non-trivial norms so that fusing 1/s into them is really exercised
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    seqlen = 32
    pos = torch.arange(seqlen)[None]
    kwargs = {
        "position_embeddings": LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), pos),
        "attention_mask": None,
        "position_ids": pos,
    }
    return block.eval(), kwargs


def calib_inputs(n=6, seqlen=32, hidden=128, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(n, seqlen, hidden, dtype=dtype)
    x[..., [3, 50, 97]] *= 12  # activation outlier channels, as real LLMs have
    return x


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_scales_keep_the_block_function(kv_heads):
    block, kwargs = make_block(kv_heads)
    x = calib_inputs()
    before = block(x, **kwargs)
    torch.manual_seed(5)
    applied = 0
    for group in LLAMA.groups:
        if group_applies(block, group):
            k = block.get_submodule(group.linears[0]).in_features
            apply_scales(block, group, torch.exp(torch.randn(k, dtype=torch.float64)))
            applied += 1
    after = block(x, **kwargs)
    assert applied == (4 if kv_heads == 4 else 3)  # GQA: v_proj cannot absorb o_proj's scales
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_grid_losses_equal_one_candidate_at_a_time():
    block, kwargs = make_block(2, torch.float32)
    x = calib_inputs(dtype=torch.float32)
    qcfg, scfg = QuantConfig(4, 64), SearchConfig(n_grid=5, memory_budget=1 << 20)  # small budget: chunked
    group = LLAMA.groups[0]
    inputs = collect_linear_inputs(block, LLAMA, x, kwargs)[0][group.linears[0]]
    linears = [block.get_submodule(n) for n in group.linears]
    _, cands = candidate_scales(inputs, [lin.weight for lin in linears], qcfg, scfg)
    grid = grid_losses(block, "self_attn", list(group.linears), cands, inputs, qcfg, scfg, kwargs)
    ref = block.self_attn(inputs, **kwargs)[0]
    for c in (0, 3, 5):
        trial = copy.deepcopy(block)
        with torch.no_grad():
            for n in group.linears:
                lin = trial.get_submodule(n)
                lin.weight.copy_(fake_quantize(lin.weight * cands[c], qcfg) / cands[c])
        direct = (trial.self_attn(inputs, **kwargs)[0] - ref).pow(2).mean()
        torch.testing.assert_close(grid[c].float(), direct.detach(), rtol=2e-4, atol=1e-9)


def test_single_linear_groups_use_the_gram_matrix_and_agree_with_the_forward():
    """up->down: the Gram-matrix losses equal the losses of running down_proj under every candidate."""
    block, kwargs = make_block(2, torch.float32)
    x = calib_inputs(dtype=torch.float32)
    qcfg, scfg = QuantConfig(4, 64), SearchConfig(n_grid=8)
    inputs, _ = collect_linear_inputs(block, LLAMA, x, kwargs)
    group = LLAMA.groups[-1]
    assert group.linears == (group.inspect,)
    x_down = inputs[group.linears[0]]
    _, cands = candidate_scales(x_down, [block.get_submodule(group.inspect).weight], qcfg, scfg)
    args = (block, group.inspect, list(group.linears), cands, x_down, qcfg, scfg)
    gram, forward = grid_losses(*args), grid_losses(*args, batched=False)
    torch.testing.assert_close(gram, forward, rtol=1e-4, atol=0)
    assert int(gram.argmin()) == int(forward.argmin())


@pytest.mark.parametrize("duo", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64)])
def test_chosen_scales_never_lose_to_identity(duo, bits, group):
    block, kwargs = make_block(2, torch.float32)
    x = calib_inputs(dtype=torch.float32)
    qcfg = QuantConfig(bits, group)
    inputs, _ = collect_linear_inputs(block, LLAMA, x, kwargs)
    for g in LLAMA.groups:
        if group_applies(block, g):
            s, info = search_scales(block, g, inputs[g.linears[0]], qcfg, SearchConfig(duo_scaling=duo), kwargs)
            assert info["loss"] <= info["loss_identity"]
            assert torch.isfinite(s).all() and (s > 0).all()


def test_identity_is_a_candidate_and_plain_alpha_zero_is_too():
    x = calib_inputs(dtype=torch.float32)
    alphas, cands = candidate_scales(x, [torch.randn(64, 128)], QuantConfig(4, 128), SearchConfig(duo_scaling=False))
    assert alphas[0] is None and torch.equal(cands[0], torch.ones(128))
    torch.testing.assert_close(cands[1], torch.ones(128))  # x_mean^0
    assert cands.shape == (21, 128)


def block_output_error(block, fp_block, x, kwargs, qcfg):
    q = copy.deepcopy(block)
    with torch.no_grad():
        for lin in linears_of(q).values():
            lin.weight.copy_(fake_quantize(lin.weight, qcfg))
        return (q(x, **kwargs) - fp_block(x, **kwargs)).pow(2).mean().item()


def test_awq_block_beats_rtn_block_on_outlier_inputs():
    fp, kwargs = make_block(2, torch.float32)
    x = calib_inputs(n=8, dtype=torch.float32)
    qcfg = QuantConfig(4, 64)
    rtn_err = block_output_error(fp, fp, x, kwargs, qcfg)
    awq = copy.deepcopy(fp)
    stats = search_block(awq, LLAMA, x, kwargs, qcfg).stats
    assert len(stats["groups"]) == 3
    awq_err = block_output_error(awq, fp, x, kwargs, qcfg)
    assert awq_err < rtn_err
    assert (
        abs(stats["output_mse_rtn"] - rtn_err) < 1e-6 * rtn_err
        and abs(stats["output_mse_awq"] - awq_err) < 1e-5 * awq_err
    )


def test_checkpoint_tensors_are_packed_for_4_bit_and_dense_for_3_bit():
    block, _ = make_block(2, torch.float32)
    t4 = checkpoint_tensors(block, round_linears(block, LLAMA, QuantConfig(4, 64)), QuantConfig(4, 64))
    assert t4["self_attn.q_proj.qweight"].shape == (128, 16) and "self_attn.q_proj.weight" not in t4
    assert t4["mlp.down_proj.scales"].shape == (4, 128) and "input_layernorm.weight" in t4
    t3 = checkpoint_tensors(block, round_linears(block, LLAMA, QuantConfig(3, 64)), QuantConfig(3, 64))
    w = t3["mlp.down_proj.weight"]
    assert w.shape == (128, 256)
    # at most 8 distinct values per (row, group) in a 3-bit checkpoint
    assert w.view(128, 4, 64)[0, 0].unique().numel() <= 8


def test_coarse_to_fine_search_bisects_the_bracket_around_the_best_alpha():
    """grid_stride=4: the identity and every 4th alpha, then the alphas 2 away from the best so far,
    then 1 away from the best after that; the chosen alpha is the best of those, with the loss the full
    grid gives it."""
    block, kwargs = make_block(2, torch.float32)
    x = calib_inputs(dtype=torch.float32)
    qcfg = QuantConfig(3, 64)
    inputs, _ = collect_linear_inputs(block, LLAMA, x, kwargs)
    for g in LLAMA.groups:
        if not group_applies(block, g):
            continue
        args = (block, g, inputs[g.linears[0]], qcfg)
        _, info_full = search_scales(*args, SearchConfig(n_grid=20, grid_stride=1), kwargs)
        weights = [block.get_submodule(n).weight for n in g.linears]
        alphas, cands = candidate_scales(args[2], weights, qcfg, SearchConfig())
        kw = kwargs if g.inspect_takes_kwargs else None
        full = grid_losses(block, g.inspect, list(g.linears), cands, args[2], qcfg, SearchConfig(), kw).double()
        assert info_full["loss"] == pytest.approx(float(full.min()), rel=1e-5)
        seen = {0, *range(1, 21, 4)}
        for step in (2, 1):
            best = min(seen - {0}, key=lambda i: full[i])
            seen |= {i for i in (best - step, best + step) if 1 <= i <= 20}
        expected = min(seen, key=lambda i: full[i])
        assert len(seen) <= 10
        _, info = search_scales(*args, SearchConfig(n_grid=20, grid_stride=4), kwargs)
        assert info["alpha"] == alphas[expected]
        assert info["loss"] == pytest.approx(float(full[expected]), rel=1e-5)
        assert info["loss"] <= info["loss_identity"]


def test_grid_sample_keeps_evenly_spaced_whole_windows_within_the_token_cap():
    x = torch.arange(10 * 4 * 2, dtype=torch.float32).view(10, 4, 2)  # 10 windows of 4 tokens
    assert grid_sample(x, 0) is x and grid_sample(x, 40) is x
    few = grid_sample(x, 20)  # step 2: windows 0, 2, 4, 6, 8
    assert torch.equal(few, x[[0, 2, 4, 6, 8]])
    assert grid_sample(x, 13).shape[0] * 4 <= 13 + 4 and torch.equal(grid_sample(x, 13)[1], x[4])
    rows = torch.arange(9.0).view(9, 1)  # routed tokens: rows
    assert torch.equal(grid_sample(rows, 3), rows[[0, 3, 6]])
    spread = grid_sample(x, 20, per_token=True)  # a per-token module: every 2nd token of every window
    assert spread.shape == (20, 2) and torch.equal(spread, x.reshape(40, 2)[::2])
    assert grid_sample(x, 0, per_token=True).shape == (40, 2)
