"""Load a model for evaluation: an FP checkpoint through transformers, an awqflow GEMM checkpoint
through the project's own QuantLinear (transformers' AWQ path needs a GPU-oriented backend)."""

import json
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from awqflow.kernels.quant_linear import QuantLinear
from awqflow.stages.model import CheckpointReader, rebuild_rotary, set_module


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {model_dir}: pass a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def load_model(model_dir: str, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Any checkpoint awqflow reads or writes, ready for inference. dtype defaults to float32 on CPU
    and to the checkpoint's dtype elsewhere."""
    raw = read_config(model_dir)
    quant = raw.get("quantization_config")
    if quant is None:
        kwargs = {"dtype": dtype or (torch.float32 if str(device) == "cpu" else "auto")}
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    if quant.get("quant_method") != "awq" or quant.get("version", "gemm").lower() != "gemm" or quant.get("bits") != 4:
        raise ValueError(f"{model_dir}: only 4-bit AWQ GEMM checkpoints can be loaded here, got {quant}")
    return load_awq_gemm(model_dir, device, dtype or (torch.float32 if str(device) == "cpu" else torch.float16))


def load_awq_gemm(model_dir: str, device, dtype: torch.dtype) -> nn.Module:
    config = AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    reader = CheckpointReader(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    group = read_config(model_dir)["quantization_config"]["group_size"]
    for name in reader.names():
        if name.endswith(".qweight"):
            path = name[: -len(".qweight")]
            lin = model.get_submodule(path)
            set_module(model, path, QuantLinear(lin.in_features, lin.out_features, group,
                                                lin.bias is not None, device="meta", dtype=torch.float16))
    model.to_empty(device=device)
    state = reader.load(reader.names(), device)
    missing, unexpected = model.load_state_dict(
        {k: v if v.dtype == torch.int32 or k.endswith(".scales") else v.to(dtype) for k, v in state.items()},
        strict=False,
    )
    if unexpected:
        raise KeyError(f"{model_dir} holds tensors the model does not have: {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise KeyError(f"{model_dir} lacks tensors the model needs: {missing[:3]}")
    rebuild_rotary(model, config, device)
    return model.eval()
