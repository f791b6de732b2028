"""modules_to_not_convert of MoE checkpoints: each loader's own matching rule, reimplemented here from its source,
applied to every linear name the loader sees, must pick exactly the routers (and lm_head where the loader sees it).

Why a reimplementation: AutoAWQ needs transformers 4.51.3 and vLLM needs a GPU; the rules are a few lines each and
are quoted with their file and version (stages/skip_names.py says the same in prose)."""

import json
import re

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from awqflow.options import Options
from awqflow.pipeline import cached_block, plan, save
from awqflow.stages.architectures import architecture_for
from awqflow.storage.checkpoint import CheckpointReader

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
MOE = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(head_dim=16, intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=96,
        ),
    ),
    "mixtral": ("MixtralConfig", dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
    # layer 1 dense: its mlp.gate_proj contains the router's block-relative name "mlp.gate"
    "qwen3_moe-dense-layer": (
        "Qwen3MoeConfig",
        dict(
            head_dim=16,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
        ),
    ),
}
BLOCK = re.compile(r"^model\.layers\.\d+\.")


# AutoAWQ 0.2.9, awq/utils/module.py exclude_layers_to_not_quantize (names relative to the block,
# from get_named_linears(layer) in awq/models/base.py _load_quantized_modules)
def autoawq_0_2_9(keys, block_relative_name):
    return any(key in block_relative_name for key in keys)


# transformers 4.51.3, integrations/awq.py replace_with_awq_linear
def transformers_4_51(keys, full_name):
    return full_name.rpartition(".")[2] in keys or any(key in full_name for key in keys)


# transformers 5.24, quantizers/quantizers_utils.py should_convert_module (negated: True = skipped)
def transformers_5(keys, full_name):
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", full_name) or full_name.endswith(key) for key in keys)


# vLLM 0.20.0 / 0.33.0, model_executor/layers/quantization/utils/quant_utils.py is_layer_skipped with
# skip_with_substr=True (0.20) / match_mode="substring" (0.33), as awq.py, awq_marlin.py and auto_awq.py call it
VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def vllm(keys, prefix, version):
    def substr(name):
        return any(key in name for key in keys)

    proj = prefix.split(".")[-1]
    if proj in VLLM_FUSED and version >= (0, 33) and substr(prefix):
        return True
    if proj in VLLM_FUSED:
        shards = {substr(prefix.replace(proj, shard)) for shard in VLLM_FUSED[proj]}
        if len(shards) > 1:
            raise ValueError(f"vLLM: some but not all shards of {prefix} are skipped")
        return shards.pop()
    return substr(prefix)


def vllm_prefixes(checkpoint_linears):
    """vLLM's module names: q/k/v and dense gate/up fused, a MoE layer's experts one module."""
    prefixes = set()
    for name in checkpoint_linears:
        head, _, proj = name.rpartition(".")
        if ".experts." in name:
            prefixes.add(name.partition(".experts.")[0] + ".experts")
        elif proj in ("q_proj", "k_proj", "v_proj"):
            prefixes.add(f"{head}.qkv_proj")
        elif proj in ("gate_proj", "up_proj"):
            prefixes.add(f"{head}.gate_up_proj")
        else:
            prefixes.add(name)
    return prefixes


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_checkpoint(request, tmp_path_factory):
    cls, overrides = MOE[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**SMALL, **overrides})
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(folder / "fp")
    p = plan(str(folder / "fp"), Options(method="rtn", group_size=32))
    cache = str(folder / "cache")
    for i in range(p.n_blocks):
        cached_block(p, i, cache, None, "cpu")
    save(p, str(folder / "awq"), cache)
    return request.param, folder / "awq"


def checkpoint_linears(folder):
    names = CheckpointReader(str(folder)).names()
    packed = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    kept = {n.removesuffix(".weight") for n in names if BLOCK.match(n) and n.endswith(".weight") and "norm" not in n}
    return packed | kept


def routers_of(folder, model_type):
    arch = architecture_for(model_type)
    kept = {arch.checkpoint_name(m) for m in arch.unquantized}
    return {n for n in checkpoint_linears(folder) if BLOCK.sub("", n) in kept}


def test_every_loader_skips_exactly_the_routers(moe_checkpoint):
    label, folder = moe_checkpoint
    config = json.loads((folder / "config.json").read_text())
    keys = config["quantization_config"]["modules_to_not_convert"]
    linears = checkpoint_linears(folder)
    routers = routers_of(folder, config["model_type"])
    assert routers and routers < linears

    # transformers 4.x keeps one nn.Linear per checkpoint linear, so the checkpoint's names are its module names
    assert {n for n in linears | {"lm_head"} if transformers_4_51(keys, n)} == routers | {"lm_head"}
    for version in ((0, 20), (0, 33)):
        prefixes = vllm_prefixes(linears) | {"lm_head"}
        assert {n for n in prefixes if vllm(keys, n, version)} == routers | {"lm_head"}, version

    # transformers 5: routers are TopKRouter modules (never converted); Qwen2-MoE's shared_expert_gate is a Linear
    with torch.device("meta"):
        model5 = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    linears5 = {n for n, m in model5.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n in linears5 if transformers_5(keys, n)} == (routers & linears5) | {"lm_head"}

    awq_matched = {n for n in linears if autoawq_0_2_9(keys, BLOCK.sub("", n))}
    if label.endswith("dense-layer"):
        # every substring of "mlp.gate" is inside the dense layer's "mlp.gate_proj": no key can work for AutoAWQ,
        # so none is written and AutoAWQ matches nothing (it would quantize the router; vLLM and transformers load)
        assert awq_matched == set() and "mlp.gate" not in keys
    else:
        assert awq_matched == routers


def test_compressed_tensors_ignore_names_the_routers(tmp_path):
    """compressed-tensors' ignore is matched by whole name (vLLM 0.33 compressed_tensors/utils.py
    should_ignore_layer -> is_equal_or_regex_match): full names, nothing block-relative."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**{**SMALL, **MOE["mixtral"][1]})
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(tmp_path / "fp")
    p = plan(str(tmp_path / "fp"), Options(method="rtn", group_size=32, format="compressed-tensors"))
    cache = str(tmp_path / "cache")
    for i in range(p.n_blocks):
        cached_block(p, i, cache, None, "cpu")
    save(p, str(tmp_path / "ct"), cache)
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]
