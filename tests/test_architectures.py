"""Every supported architecture on a tiny random-weight model: fusing scales keeps the model's function,
capture equals the model's own hidden states, and quantize -> save -> our loader -> perplexity runs."""

import json
from dataclasses import replace

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from awqflow.load import load_model
from awqflow.options import Options
from awqflow.pipeline import cached_block, capture, plan, save
from awqflow.stages.architectures import ARCHITECTURES, architecture_for
from awqflow.stages.gptq import add_to_hessian, gptq_codes
from awqflow.stages.method import BlockInputs, quantized_linears
from awqflow.stages.methods.gptq import awq_gptq_block, gptq_in_order
from awqflow.stages.model import blocks_of, record_block_calls
from awqflow.stages.moe import unfuse_experts
from awqflow.stages.perplexity import perplexity
from awqflow.stages.quantize import dequantize_codes, quantize_codes
from awqflow.stages.scales import apply_scales, block_groups
from awqflow.storage.activations import ActivationStore
from awqflow.storage.checkpoint import CheckpointReader
from awqflow.storage.fingerprint import tensor_fingerprint

VOCAB = 256
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
ROPE = dict(head_dim=16)

# model_type -> (config class, overrides, scale groups applied per block)
CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2), 3),  # GQA: v -> o skipped
    "mistral": ("MistralConfig", {}, 4),
    "qwen2": ("Qwen2Config", {}, 4),
    "qwen3": ("Qwen3Config", dict(ROPE, num_key_value_heads=2), 3),
    "gemma2": ("Gemma2Config", dict(ROPE, query_pre_attn_scalar=16), 4),
    "gemma3_text": ("Gemma3TextConfig", dict(ROPE, query_pre_attn_scalar=16), 4),
    "phi3": ("Phi3Config", dict(pad_token_id=0), 4),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1), 4),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.5), 2),
    # 4 experts: the all-experts gate/up group + one up -> down group per expert, v -> o, q/k/v
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(ROPE, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        2 + 1 + 4,
    ),
    # the same plus the shared expert's up -> down group
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2),
        2 + 1 + 4 + 1,
    ),
    # qwen3_moe's groups; checkpoints name the experts block_sparse_moe.experts.N.w1/w2/w3
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), 2 + 1 + 4),
}


def tiny_config(model_type: str):
    cls, overrides, _ = CONFIGS[model_type]
    return getattr(transformers, cls)(**{**SMALL, **overrides})


def randomize(model, model_type):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1 and name.endswith("weight"):
                # non-trivial norms (Gemma's weights are offsets from 1)
                base = 0.0 if model_type.startswith("gemma") else 1.0
                p.copy_(base + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


def test_every_architecture_has_a_test():
    assert set(ARCHITECTURES) == set(CONFIGS)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_random_scales_on_every_group_keep_the_model_function(model_type):
    config = tiny_config(model_type)
    arch = architecture_for(model_type)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    if arch.fused_experts:
        unfuse_experts(blocks_of(model, arch), arch.fused_experts)
        model.double()
    randomize(model, model_type)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    torch.manual_seed(2)
    for block in blocks_of(model, arch):
        groups = block_groups(block, arch)
        assert len(groups) == CONFIGS[model_type][2], [g.prev for g in groups]
        for g in groups:
            k = block.get_submodule(g.linears[0]).in_features
            apply_scales(block, g, torch.exp(torch.randn(k, dtype=torch.float64)))
    with torch.no_grad():
        after = model(ids).logits
    # Gemma's norms compute in float32 even in a float64 model; a wrong offset would be off by O(1)
    tol = 1e-5 if model_type.startswith("gemma") else 1e-9
    torch.testing.assert_close(after, before, rtol=tol, atol=tol)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_gptq_rounds_each_linear_on_its_input_with_the_linears_before_it_quantized(model_type):
    """gptq_in_order's codes of a linear are GPTQ's against the Hessian of the input it gets in the block
    whose linears all hold their codes (the ones after it do not touch its input), MoE experts on the
    tokens routed to them; a linear the pass never reaches is rounded to nearest."""
    arch = architecture_for(model_type)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).double().eval()
    if arch.fused_experts:
        unfuse_experts(blocks_of(model, arch), arch.fused_experts)
        model.double()
    randomize(model, model_type)
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    block = blocks_of(model, arch)[0]
    ((hidden, kwargs),) = record_block_calls(model, arch, 1, input_ids=ids)
    opts = Options(group_size=32)
    weights = {n: lin.weight.data.clone() for n, lin in quantized_linears(block, arch).items()}
    codes = gptq_in_order(block, arch, BlockInputs(hidden, kwargs), opts)
    assert codes.keys() == weights.keys()
    linears = quantized_linears(block, arch)
    for name, lin in linears.items():
        lin.weight.data = dequantize_codes(*codes[name]).to(lin.weight.dtype)
    seen = {}
    handles = [lin.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0])) for n, lin in linears.items()]
    with torch.no_grad():
        block(hidden, **kwargs)
    for handle in handles:
        handle.remove()
    assert len(seen) >= 4, seen.keys()
    for name, w in weights.items():
        if name in seen:
            h, _ = add_to_hessian(None, seen[name], 0)
            want = gptq_codes(w.float(), h, opts.quant, opts.gptq_block_size, opts.gptq_damp, name, opts.gptq_actorder)
        else:
            want = quantize_codes(w, opts.quant)
        assert all(torch.equal(a, b) for a, b in zip(codes[name], want)), name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("arch")


def save_model(folder, model_type):
    config = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, model_type)
    model.to(torch.float16).save_pretrained(folder / model_type)
    return folder / model_type


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_quantize_save_load_and_perplexity(model_type, checkpoints):
    src = save_model(checkpoints, model_type)
    windows = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    p = plan(str(src), Options(group_size=32, n_grid=4, n_samples=4, seqlen=32))
    p = replace(p, calib_fp=tensor_fingerprint(windows))
    store = ActivationStore(capture(p, windows, str(checkpoints / f"{model_type}.zarr"), "cpu"))

    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = fp(windows, output_hidden_states=True).hidden_states
        fp_logits = fp(windows).logits
    for i in range(p.n_blocks):  # capture equals the model's own hidden states (embedding scale, positions)
        torch.testing.assert_close(store.read(i), hidden[i], rtol=1e-5, atol=1e-5)

    cache = str(checkpoints / f"{model_type}.cache")
    stats = [cached_block(p, i, cache, store.path, "cpu") for i in range(p.n_blocks)]
    assert all(len(s["groups"]) == CONFIGS[model_type][2] for s in stats)
    out = checkpoints / f"{model_type}-awq"
    save(p, str(out), cache)

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    arch = architecture_for(model_type)
    kept = [f"{arch.blocks}.{i}.{arch.checkpoint_name(m)}" for i in range(p.n_blocks) for m in arch.unquantized]
    # MoE routers by full name (which other spellings are added: tests/test_skip_names.py)
    assert quant["modules_to_not_convert"][: 1 + len(kept)] == list(arch.not_converted) + kept
    # every quantized linear and every kept one has its name from the source checkpoint (what loaders expect)
    source_names = set(CheckpointReader(str(src)).names())
    packed = {n.removesuffix(".qweight") for n in CheckpointReader(str(out)).names() if n.endswith(".qweight")}
    assert packed and all(f"{m}.weight" in source_names for m in packed | set(kept))

    model = load_model(str(out))
    with torch.no_grad():
        q_logits = model(windows).logits
    cos = torch.nn.functional.cosine_similarity(q_logits.flatten(), fp_logits.flatten(), dim=0)
    assert cos > 0.95, cos
    ppl = perplexity(model, windows)["ppl"]
    assert ppl == ppl and ppl < 4 * perplexity(fp, windows)["ppl"]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_awq_gptq_keeps_every_scale_and_its_codes_match_the_block(model_type):
    """awq-gptq with every group's scales kept, on each architecture: a group whose prev linear GPTQ
    already quantized (up -> down, and v -> o where the widths match) takes 1/s in that linear's scales,
    and the codes returned decode to exactly the weights of the block the method leaves behind."""
    arch = architecture_for(model_type)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).double().eval()
    if arch.fused_experts:
        unfuse_experts(blocks_of(model, arch), arch.fused_experts)
        model.double()
    randomize(model, model_type)
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    block = blocks_of(model, arch)[0]
    ((hidden, kwargs),) = record_block_calls(model, arch, 1, input_ids=ids)
    codes, stats = awq_gptq_block(
        block, arch, BlockInputs(hidden, kwargs), Options(group_size=32), lambda g, s, x: (True, None)
    )
    assert codes.keys() == quantized_linears(block, arch).keys()
    assert len(stats["groups"]) == len(block_groups(block, arch)) and not any(
        "turned_down" in s for s in stats["groups"].values()
    )
    for name, c in codes.items():
        assert torch.equal(block.get_submodule(name).weight.data, dequantize_codes(*c).double()), name
