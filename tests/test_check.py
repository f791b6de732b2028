"""awqflow check: vLLM's rules (0.20.0 and 0.33.0 source) on configs it accepts and rejects. Most checkpoints here are
headers only (zero tensors of the right shapes), since check reads nothing else; one is written by save."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from awqflow.cli import main
from awqflow.options import Options
from awqflow.pipeline import cached_block, plan, save
from awqflow.stages.check import check_checkpoint


def linear(tensors, name, in_f, out_f, fmt, group):
    groups = 1 if group == -1 else in_f // group
    if fmt == "awq":
        tensors[f"{name}.qweight"] = torch.zeros(in_f, out_f // 8, dtype=torch.int32)
        tensors[f"{name}.qzeros"] = torch.zeros(groups, out_f // 8, dtype=torch.int32)
        tensors[f"{name}.scales"] = torch.zeros(groups, out_f, dtype=torch.float16)
    else:
        tensors[f"{name}.weight_packed"] = torch.zeros(out_f, in_f // 8, dtype=torch.int32)
        tensors[f"{name}.weight_scale"] = torch.zeros(out_f, groups, dtype=torch.float16)


def fake_checkpoint(folder, *, heads, kv, head_dim, intermediate, fmt="awq", group=32, experts=0, model_type="llama"):
    """One Llama block (or a Qwen3-MoE block with `experts` experts of size `intermediate`)."""
    hidden = heads * head_dim
    config = dict(
        model_type=model_type,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=1,
    )
    if fmt == "awq":
        config["quantization_config"] = dict(
            quant_method="awq", bits=4, group_size=group, zero_point=True, version="gemm"
        )
    else:
        weights = dict(num_bits=4, group_size=None if group == -1 else group)
        config["quantization_config"] = dict(
            quant_method="compressed-tensors", config_groups={"group_0": {"weights": weights}}
        )
    tensors = {}
    attn = "model.layers.0.self_attn"
    for proj, out_f in (("q_proj", heads * head_dim), ("k_proj", kv * head_dim), ("v_proj", kv * head_dim)):
        linear(tensors, f"{attn}.{proj}", hidden, out_f, fmt, group)
    linear(tensors, f"{attn}.o_proj", heads * head_dim, hidden, fmt, group)
    mlps = [f"model.layers.0.mlp.experts.{e}" for e in range(experts)] or ["model.layers.0.mlp"]
    for mlp in mlps:
        linear(tensors, f"{mlp}.gate_proj", hidden, intermediate, fmt, group)
        linear(tensors, f"{mlp}.up_proj", hidden, intermediate, fmt, group)
        linear(tensors, f"{mlp}.down_proj", intermediate, hidden, fmt, group)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def test_mqa_at_high_tp_replicates_the_kv_head(tmp_path):
    """1 KV head at tp=8: each rank holds the whole head (32 columns), not 32 / 8."""
    mqa = fake_checkpoint(tmp_path / "mqa", heads=8, kv=1, head_dim=32, intermediate=512)
    assert check_checkpoint(mqa, tp=8) == ([], [])
    errors, _ = check_checkpoint(mqa, tp=16)  # 8 query heads cannot be split 16 ways
    assert "num_attention_heads=8" in errors[0] and "vllm/config/model.py" in errors[0]
    assert not any("k_proj" in e or "v_proj" in e for e in errors)


def test_six_kv_heads_at_tp4_are_rejected(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "kv6", heads=12, kv=6, head_dim=32, intermediate=768)
    errors, _ = check_checkpoint(ckpt, tp=4)
    assert any("num_key_value_heads=6" in e and "QKVParallelLinear" in e for e in errors), errors
    assert check_checkpoint(ckpt, tp=3)[0] == [] and check_checkpoint(ckpt, tp=2)[0] == []


def test_group_minus_one_at_tp2_compressed_tensors_accepted_awq_rejected(tmp_path):
    ct = fake_checkpoint(
        tmp_path / "ct", heads=8, kv=2, head_dim=32, intermediate=512, fmt="compressed-tensors", group=-1
    )
    assert check_checkpoint(ct, tp=2)[0] == []  # channel-wise scales are replicated on every rank
    awq = fake_checkpoint(tmp_path / "awq", heads=8, kv=2, head_dim=32, intermediate=512, group=-1)
    errors, _ = check_checkpoint(awq, tp=2)
    assert sorted(e.split()[0] for e in errors) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    assert all("group_size=-1" in e and "awq" in e for e in errors)


def test_marlin_alignment_is_on_the_fused_shard_and_only_before_padding(tmp_path):
    # k/v shards are 32 wide (not % 64) but the fused qkv shard is 128 + 32 + 32 = 192: Marlin takes it
    aligned = fake_checkpoint(tmp_path / "gqa", heads=8, kv=2, head_dim=32, intermediate=512)
    assert check_checkpoint(aligned, tp=2, vllm_version="0.20.0") == ([], [])
    # intermediate 96: down_proj's in 96 is not % 128; vLLM 0.20 falls back to the AWQ kernel, 0.33 pads
    odd = fake_checkpoint(tmp_path / "odd", heads=8, kv=2, head_dim=32, intermediate=96)
    errors, warnings = check_checkpoint(odd, tp=1, vllm_version="0.20.0")
    assert errors == [] and len(warnings) == 1  # the fused gate_up shard (out 192, in 256) is aligned
    assert warnings[0].startswith("model.layers.0.mlp.down_proj") and "awq_marlin.py" in warnings[0]
    assert check_checkpoint(odd, tp=1) == ([], [])


def test_fused_moe_rules_not_dense_ones(tmp_path):
    """Qwen3-MoE block, hidden 128, 4 experts of intermediate 64, group 64."""
    moe = fake_checkpoint(
        tmp_path / "moe", heads=4, kv=2, head_dim=32, intermediate=64, group=64, experts=4, model_type="qwen3_moe"
    )
    assert check_checkpoint(moe, tp=1, vllm_version="0.20.0") == ([], [])  # Marlin MoE: 128 % 128, 64 % 64
    errors, warnings = check_checkpoint(moe, tp=2, vllm_version="0.20.0")  # 32 per shard: WNA16 with group 32
    warnings = [w for w in warnings if ".experts" in w]  # o_proj's in 64 per shard misses Marlin's 128 too
    assert errors == [] and len(warnings) == 1
    assert "model.layers.0.mlp.experts" in warnings[0] and "group 32 (halved from 64)" in warnings[0]
    assert "moe_wna16.py" in warnings[0]
    errors, _ = check_checkpoint(moe, tp=4)  # 16 per shard: no group >= 32 divides it
    assert [e.split()[0] for e in errors if "experts" in e] == ["model.layers.0.mlp.experts:"]
    assert "MoE WNA16" in errors[-1]  # the experts are one fused-MoE layer, not 12 dense linears


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Written by save. intermediate 96: down_proj (row-parallel) has in 96, so tp=2 leaves 48 per shard, not a
    whole group of 32."""
    folder = tmp_path_factory.mktemp("check")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(folder / "fp")
    p = plan(str(folder / "fp"), Options(method="rtn", group_size=32))
    cache = str(folder / "cache")
    cached_block(p, 0, cache, None, "cpu")
    save(p, str(folder / "awq"), cache)
    return str(folder / "awq")


def test_row_parallel_shard_must_hold_whole_groups(checkpoint):
    errors, _ = check_checkpoint(checkpoint, tp=2)
    assert len(errors) == 1 and "model.layers.0.mlp.down_proj" in errors[0] and "group_size=32" in errors[0]
    assert "auto_awq.py" in errors[0]


def test_cli_exit_codes(checkpoint, capsys):
    for tp, code in ((1, 0), (2, 1)):
        with pytest.raises(SystemExit) as e:
            main(["check", "--model", checkpoint, "--tp", str(tp), "--vllm-version", "0.20.0"])
        assert e.value.code == code
    out = capsys.readouterr().out
    assert "mlp.down_proj" in out and "vLLM 0.20.0" in out and "awq.py" in out
