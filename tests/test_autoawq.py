"""Third-party load: AutoAWQ 0.2.9's own loader (from_quantized, WQLinear_GEMM) reads our dense and MoE checkpoints
and computes the logits our loader does. AutoAWQ needs transformers 4.51.3, so it runs in a subprocess
(tests/autoawq_worker.py) with an overlay that `make test` builds (tests/autoawq_env.sh); the worker never
imports awqflow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from awqflow.load import load_model
from awqflow.options import Options
from awqflow.pipeline import cached_block, plan, save

from conftest import tiny_llama_config

HERE = Path(__file__).resolve().parent
OVERLAY = Path(sys.prefix) / "autoawq"


@pytest.fixture(scope="module")
def overlay() -> Path:
    if not (OVERLAY / ".installed").exists() and not Path(f"{OVERLAY}.failed").exists():
        subprocess.run(["sh", str(HERE / "autoawq_env.sh"), sys.executable, str(OVERLAY)], check=True)
    failed = Path(f"{OVERLAY}.failed")
    if failed.exists():
        pytest.skip(
            "AutoAWQ 0.2.9 / transformers 4.51.3 could not be installed from the package index: "
            + failed.read_text().strip().splitlines()[-1]
        )
    return OVERLAY


def quantized(folder: Path, config, group: int) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(folder / "fp")
    p = plan(str(folder / "fp"), Options(method="rtn", group_size=group))
    cache = str(folder / "cache")
    for i in range(p.n_blocks):
        cached_block(p, i, cache, None, "cpu")
    save(p, str(folder / "awq"), cache)
    return folder / "awq"


CONFIGS = {
    "llama": lambda: tiny_llama_config(vocab_size=256),
    # the router must stay a plain Linear in AutoAWQ (modules_to_not_convert "block_sparse_moe.gate"); 4 experts
    # made a quantized router fail there (4 % 8)
    "mixtral": lambda: transformers.MixtralConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_autoawq_loads_our_checkpoint_with_our_logits(model_type, overlay, tmp_path):
    out = quantized(tmp_path, CONFIGS[model_type](), group=64)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {**os.environ, "PYTHONPATH": str(overlay), "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run(
        [
            sys.executable,
            str(HERE / "autoawq_worker.py"),
            str(out),
            str(tmp_path / "tokens.pt"),
            str(tmp_path / "logits.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    ours = load_model(str(out), dtype=torch.float16)(tokens).logits.float()
    assert theirs.shape == ours.shape
    # dense: bit-identical. MoE: both run the same fp16 dequantized weights, but HF 4.51's Mixtral sums the experts'
    # outputs in another order than transformers 5's (our loader), so fp16 rounding differs (measured max 5.5e-4)
    tolerance = 0 if model_type == "llama" else 2e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tolerance)
