"""Every output file is readable like config.json (0644 under umask 022): safetensors' own writer leaves 0600, and
copied tokenizer files keep their source mode, so a server running as another user could not read them."""

import os
import stat

import torch
from transformers import AutoModelForCausalLM

from awqflow.options import Options
from awqflow.pipeline import cached_block, plan, save

from conftest import tiny_llama_config


def test_every_output_file_is_0644_under_umask_022(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=128))
    model.to(torch.float16).save_pretrained(tmp_path / "fp")
    (tmp_path / "fp" / "tokenizer.json").write_text("{}")
    os.chmod(tmp_path / "fp" / "tokenizer.json", 0o600)  # a private source file must not stay private
    old = os.umask(0o022)
    try:
        for fmt in ("awq-gemm", "compressed-tensors"):
            p = plan(str(tmp_path / "fp"), Options(method="rtn", group_size=32, format=fmt))
            cache = str(tmp_path / "cache")
            for i in range(p.n_blocks):
                cached_block(p, i, cache, None, "cpu")
            out = tmp_path / fmt
            save(p, str(out), cache)
            modes = {name: oct(stat.S_IMODE(os.stat(out / name).st_mode)) for name in os.listdir(out)}
            assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(modes)
            assert set(modes.values()) == {"0o644"}, modes
    finally:
        os.umask(old)
