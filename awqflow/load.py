"""Load a model for evaluation: an FP checkpoint through transformers, an awqflow 4-bit checkpoint
(GEMM or compressed-tensors) through the project's own QuantLinear (transformers' AWQ path needs a
GPU-oriented backend)."""

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from awqflow.kernels.quant_linear import QuantLinear
from awqflow.stages import export_ct
from awqflow.stages.architectures import architecture_for
from awqflow.stages.model import BUILD_LOCK, init_buffers, rebuild_rotary, set_module, skeleton
from awqflow.storage.checkpoint import CheckpointReader, read_config_json


def load_model(model_dir: str, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Any checkpoint awqflow reads or writes, ready for inference. dtype defaults to float32 on CPU
    and to the checkpoint's dtype elsewhere."""
    raw = read_config_json(model_dir)
    quant = raw.get("quantization_config")
    if quant is None:
        kwargs = {"dtype": dtype or (torch.float32 if str(device) == "cpu" else "auto")}
        with BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        return model.to(device).eval()
    method, dtype = quant.get("quant_method"), dtype or (torch.float32 if str(device) == "cpu" else torch.float16)
    if method == "awq" and quant.get("version", "gemm").lower() == "gemm" and quant.get("bits") == 4:
        return load_packed(model_dir, device, dtype, quant["group_size"])
    weights = quant.get("config_groups", {}).get("group_0", {}).get("weights", {})
    if method == "compressed-tensors" and quant.get("format") == "pack-quantized" and weights.get("num_bits") == 4:
        return load_packed(model_dir, device, dtype, weights.get("group_size") or -1, export_ct.to_gemm)
    raise ValueError(
        f"{model_dir}: only 4-bit AWQ GEMM and compressed-tensors pack-quantized checkpoints "
        f"can be loaded here, got {quant}"
    )


def load_packed(model_dir: str, device, dtype: torch.dtype, group: int, to_gemm=None) -> nn.Module:
    """A 4-bit checkpoint on the GEMM QuantLinear; to_gemm converts another packed layout's tensors."""
    config = AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    reader = CheckpointReader(model_dir)
    state = reader.load(reader.names(), device)
    if to_gemm is not None:
        state = to_gemm(state)
    arch = architecture_for(config.model_type)
    state = {arch.module_name(k): v for k, v in state.items()}
    with BUILD_LOCK:  # see its comment: another thread's from_pretrained must not be half-way through
        model = skeleton(config, dtype)
        for name in state:
            if name.endswith(".qweight"):
                path = name[: -len(".qweight")]
                lin = model.get_submodule(path)
                quantized = QuantLinear(lin.in_features, lin.out_features, group, lin.bias is not None,
                                        device="meta", dtype=torch.float16)  # fmt: skip
                set_module(model, path, quantized)
        model.to_empty(device=device)
        init_buffers(model, model._init_weights)
        missing, unexpected = model.load_state_dict(
            {k: v if v.dtype == torch.int32 or k.endswith(".scales") else v.to(dtype) for k, v in state.items()},
            strict=False,
        )
    if unexpected:
        raise KeyError(f"{model_dir} holds tensors the model does not have: {unexpected[:3]}")
    if config.tie_word_embeddings:
        # Tied by hand, not with model.tie_weights(): while from_pretrained runs, transformers replaces that
        # method with a no-op for the whole process, and a loader in another thread then kept lm_head as the
        # uninitialised memory to_empty gave it: garbage logits, the OverflowError of issue 13.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise KeyError(f"{model_dir} lacks tensors the model needs: {missing[:3]}")
    rebuild_rotary(model, config, device)
    return model.eval()
