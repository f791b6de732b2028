"""Pre-flight check of a 4-bit checkpoint against vLLM's AWQ and AWQ-Marlin loaders (SPEC §6), with
tensor parallelism: column-parallel linears split out_features by tp, row-parallel ones in_features.

AWQ (vLLM awq): bits 4, group size in {-1, 32, 64, 128}; per shard in_features % G == 0 and
out_features % 8 == 0 (eight 4-bit columns per int32). AWQ-Marlin also wants per shard out % 64 and
in % 128; a layer that misses them falls back to the slower AWQ kernel, so that is a warning only.
"""

import json
import os

from safetensors import safe_open

from awqflow.stages.architectures import architecture_for
from awqflow.stages.model import CheckpointReader

GROUP_SIZES = (-1, 32, 64, 128)
PACK = 8
MARLIN_N, MARLIN_K = 64, 128


def quant_settings(config: dict) -> tuple[int, int]:
    """(bits, group size) from an AWQ or compressed-tensors quantization_config."""
    q = config.get("quantization_config")
    if q is None:
        raise ValueError("config.json has no quantization_config: not a quantized checkpoint")
    if q.get("quant_method") == "compressed-tensors":
        w = q["config_groups"]["group_0"]["weights"]
        return w["num_bits"], w.get("group_size") or -1
    return q.get("bits"), q.get("group_size")


def linear_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """Quantized linear -> (in_features, out_features), read from tensor headers only."""
    reader = CheckpointReader(model_dir)
    shapes = {}
    for file in sorted(set(reader.file_of.values())):
        with safe_open(os.path.join(model_dir, file), "pt") as f:
            for name in f.keys():
                if name.endswith(".qweight"):  # AWQ GEMM: (in, out / 8)
                    rows, words = f.get_slice(name).get_shape()
                    shapes[name[: -len(".qweight")]] = (rows, words * PACK)
                elif name.endswith(".weight_packed"):  # compressed-tensors: (out, in / 8)
                    out, words = f.get_slice(name).get_shape()
                    shapes[name[: -len(".weight_packed")]] = (words * PACK, out)
    return shapes


def check_checkpoint(model_dir: str, tp: int = 1) -> tuple[list[str], list[str]]:
    """(errors that make vLLM refuse the checkpoint, warnings), each naming the layer."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    bits, group = quant_settings(config)
    errors, warnings = [], []
    if bits != 4:
        errors.append(f"bits={bits}: vLLM's AWQ loaders take 4-bit weights only")
    if group not in GROUP_SIZES:
        errors.append(f"group_size={group}: vLLM takes {GROUP_SIZES}")
    split = dict(architecture_for(config["model_type"]).parallel)
    for name, (in_f, out_f) in sorted(linear_shapes(model_dir).items()):
        kind = split.get(name.rpartition(".")[2], "column")
        split_dim = "out" if kind == "column" else "in"
        where = f"{name} ({in_f} -> {out_f}, {kind}-parallel, tp={tp})"
        if (out_f if kind == "column" else in_f) % tp:
            errors.append(f"{where}: {split_dim}_features not divisible by tp")
            continue
        shard_in, shard_out = (in_f, out_f // tp) if kind == "column" else (in_f // tp, out_f)
        if group == -1 and kind == "row" and tp > 1:
            errors.append(f"{where}: group_size=-1 (one group per row) cannot be split across row-parallel shards")
        elif group in GROUP_SIZES and group != -1 and shard_in % group:
            errors.append(f"{where}: in_features per shard ({shard_in}) not divisible by group_size={group}")
        if shard_out % PACK:
            errors.append(f"{where}: out_features per shard ({shard_out}) not divisible by {PACK}")
        if shard_out % MARLIN_N or shard_in % MARLIN_K:
            warnings.append(
                f"{where}: AWQ-Marlin needs out % {MARLIN_N} and in % {MARLIN_K} per shard; "
                f"vLLM falls back to its slower AWQ kernel here"
            )
    return errors, warnings
