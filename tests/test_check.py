"""awqflow check: vLLM's AWQ shape rules per tensor-parallel shard, on checkpoints written by save."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from awqflow.cli import main
from awqflow.options import Options
from awqflow.pipeline import cached_block, plan, save
from awqflow.stages.check import check_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """intermediate 96: down_proj (row-parallel) has in 96, so tp=2 leaves 48 per shard, not a whole group of 32."""
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


def test_tp1_is_accepted_with_marlin_warnings(checkpoint):
    errors, warnings = check_checkpoint(checkpoint, tp=1)
    assert errors == []
    assert any("mlp.down_proj" in w for w in warnings)  # in 96 is not a multiple of Marlin's 128


def test_row_parallel_shard_must_hold_whole_groups(checkpoint):
    errors, _ = check_checkpoint(checkpoint, tp=2)
    assert len(errors) == 1 and "model.layers.0.mlp.down_proj" in errors[0] and "group_size=32" in errors[0]
    errors, _ = check_checkpoint(checkpoint, tp=16)  # column shards of q (64 / 16 = 4) cannot pack 8 columns
    assert any("self_attn.q_proj" in e and "divisible by 8" in e for e in errors)


def test_cli_exit_codes(checkpoint, capsys):
    for tp, code in ((1, 0), (2, 1)):
        with pytest.raises(SystemExit) as e:
            main(["check", "--model", checkpoint, "--tp", str(tp)])
        assert e.value.code == code
    assert "mlp.down_proj" in capsys.readouterr().out
