"""modules_to_not_convert spelled so that every AWQ loader skips exactly the linears we kept in full
precision (MoE routers, lm_head) and nothing else. The loaders match it differently (source read, not guessed):

- AutoAWQ 0.2.9, awq/utils/module.py exclude_layers_to_not_quantize: `any(key in name)` where name is
  relative to the block ("mlp.gate"), so a full name never matches there.
- transformers 4.51.3, integrations/awq.py replace_with_awq_linear: the module's own name equals a key, or
  `key in full_name`.
- transformers 5.24, quantizers/quantizers_utils.py should_convert_module: the key as a regex from the start of
  the full name up to a module boundary, or `full_name.endswith(key)`.
- vLLM 0.20 (quantization/awq.py, awq_marlin.py) and 0.33 (auto_awq.py), utils/quant_utils.py is_layer_skipped
  in substring mode: `key in prefix` on the full name; a fused qkv_proj / gate_up_proj is checked per shard
  (0.33 first tries the fused name itself).

Full names serve transformers and vLLM. AutoAWQ needs the block-relative name, which is only safe where no other
linear of any block contains it: Qwen-MoE's router "mlp.gate" is inside "mlp.gate_proj" of a dense layer (and so is
every substring of it), so a checkpoint with dense layers gets full names only and AutoAWQ cannot skip its routers.
"""


def modules_to_not_convert(outside, kept_full, kept_relative, linears_relative) -> list[str]:
    """outside: kept modules outside the blocks (lm_head); kept_full / kept_relative: the kept block linears by full
    and by block-relative name; linears_relative: every linear of every block, block-relative."""
    relative = [
        key for key in dict.fromkeys(kept_relative) if not any(key in name for name in linears_relative if name != key)
    ]
    return list(dict.fromkeys([*outside, *kept_full, *relative]))
