"""Pre-flight check of a 4-bit checkpoint against vLLM's loaders, with tensor parallelism (tp): vLLM's own rules,
read from its source (0.20.0 and 0.33.0); each message names the file it comes from. The same table is in README.md.

Column-parallel linears split out_features by tp, row-parallel ones in_features. q/k/v are one fused qkv_proj
(gate/up one gate_up_proj) per shard; when tp >= num_key_value_heads every rank holds one whole KV head. A MoE
layer's experts are one fused-MoE module with its own kernels (Marlin MoE, else MoE WNA16).
"""

import os
from dataclasses import dataclass

from safetensors import safe_open

from awqflow.stages.architectures import architecture_for
from awqflow.storage.checkpoint import CheckpointReader, read_config_json

VLLM_CURRENT = "0.33.0"
# 0.33.0 pads Marlin thread tiles (marlin_padded_nk); 0.20.0 does not. Versions in between were not read, so they
# get the older, stricter rule.
MARLIN_PADS_SINCE = (0, 33)
GROUP_SIZES = (-1, 32, 64, 128)  # utils/marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES (both versions)
PACK = 8
MARLIN_N, MARLIN_K = 64, 128  # GPTQ_MARLIN_MIN_THREAD_N / _K
QUANT = "vllm/model_executor/layers/quantization"
SOURCES = {
    "heads": "vllm/config/model.py ModelConfig.verify_with_parallel_config",
    "kv_heads": "vllm/model_executor/layers/linear.py QKVParallelLinear.__init__ (divide)",
    "awq_shape": {
        (0, 20): f"{QUANT}/awq.py AWQLinearMethod.create_weights",
        (0, 33): f"{QUANT}/auto_awq.py BaseAWQLinearMethod.create_weights",
    },
    "awq_marlin": {
        (0, 20): f"{QUANT}/awq_marlin.py AWQMarlinConfig.get_quant_method",
        (0, 33): f"{QUANT}/auto_awq.py AutoAWQConfig.get_quant_method",
    },
    "marlin_shape": {
        (0, 20): f"{QUANT}/utils/marlin_utils.py verify_marlin_supports_shape",
        (0, 33): f"{QUANT}/utils/marlin_utils.py check_marlin_supports_layer(allow_tile_padding)",
    },
    "ct_group": f"{QUANT}/compressed_tensors/schemes/compressed_tensors_wNa16.py create_weights",
    "moe_marlin": f"{QUANT}/utils/marlin_utils.py check_moe_marlin_supports_layer",
    "moe_wna16": f"{QUANT}/moe_wna16.py MoeWNA16Method.create_weights",
}
ATTENTION = ("q_proj", "k_proj", "v_proj")
FUSED_CHECKPOINT_QKV = ("qkv_proj",)  # Phi-3 stores [q; k; v] in one linear


def parse_version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def source(rule: str, version: tuple[int, int]) -> str:
    """The file a rule is read from, for the vLLM version asked about (the newest read version not after it)."""
    where = SOURCES[rule]
    if isinstance(where, dict):
        read = [v for v in sorted(where) if v <= version] or [min(where)]
        where, version = where[read[-1]], read[-1]
    return f"[vLLM {version[0]}.{version[1]}: {where}]"


def quant_settings(config: dict) -> tuple[str, int, int]:
    """(format, bits, group size) from an AWQ or compressed-tensors quantization_config."""
    q = config.get("quantization_config")
    if q is None:
        raise ValueError("config.json has no quantization_config: not a quantized checkpoint")
    if q.get("quant_method") == "compressed-tensors":
        w = q["config_groups"]["group_0"]["weights"]
        return "compressed-tensors", w["num_bits"], w.get("group_size") or -1
    return "awq", q.get("bits"), q.get("group_size")


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


@dataclass
class Findings:
    errors: list[str]
    warnings: list[str]


@dataclass(frozen=True)
class Heads:
    attention: int
    kv: int
    dim: int

    def shard_width(self, proj: str, tp: int) -> int:
        """Output columns of q_proj / k_proj / v_proj on one rank (QKVParallelLinear)."""
        if proj == "q_proj":
            return self.attention // tp * self.dim
        return max(self.kv // tp, 1) * self.dim  # tp >= kv: one replicated KV head per rank


def heads_of(config: dict) -> Heads | None:
    text = config.get("text_config", config)
    n = text.get("num_attention_heads")
    if n is None:
        return None
    dim = text.get("head_dim") or text["hidden_size"] // n
    return Heads(n, text.get("num_key_value_heads") or n, dim)


def check_heads(heads: Heads, tp: int, version, found: Findings) -> None:
    if heads.attention % tp:
        found.errors.append(
            f"num_attention_heads={heads.attention} is not divisible by tp={tp} {source('heads', version)}"
        )
    if heads.kv % tp and tp % heads.kv:
        found.errors.append(
            f"num_key_value_heads={heads.kv}: tp={tp} neither divides it nor is a multiple of it "
            f"(KV heads are split, or replicated when tp >= {heads.kv}) {source('kv_heads', version)}"
        )


def shard_shapes(name: str, in_f: int, out_f: int, kind: str, tp: int, heads: Heads | None) -> tuple[int, int]:
    proj = name.rpartition(".")[2]
    if proj in ATTENTION and heads:
        return in_f, heads.shard_width(proj, tp)
    if proj in FUSED_CHECKPOINT_QKV and heads:
        return in_f, sum(heads.shard_width(p, tp) for p in ATTENTION)
    return (in_f, out_f // tp) if kind == "column" else (in_f // tp, out_f)


def check_linear(
    where: str, kind: str, shard_in: int, shard_out: int, fmt: str, group: int, tp: int, version, found: Findings
) -> None:
    if group == -1 and kind == "row" and tp > 1:
        if fmt == "awq":
            found.errors.append(
                f"{where}: group_size=-1 is one group per whole row, and vLLM's AWQ loaders size "
                f"the groups per shard (in_per_shard // in = 0 groups) {source('awq_shape', version)}"
            )
        # compressed-tensors replicates channel-wise scales on every rank: accepted
    elif group > 0 and shard_in % group:
        rule = "ct_group" if fmt == "compressed-tensors" else "awq_shape"
        found.errors.append(
            f"{where}: in_features per shard ({shard_in}) not divisible by group_size={group} {source(rule, version)}"
        )
    if shard_out % PACK:
        found.errors.append(
            f"{where}: out_features per shard ({shard_out}) not divisible by {PACK} (eight 4-bit "
            f"columns per int32) {source('awq_shape', version)}"
        )


def check_marlin(where: str, shard_in: int, shard_out: int, fmt: str, version, found: Findings) -> None:
    """Marlin's thread tiles, before vLLM padded them (they apply to the fused qkv / gate_up shard)."""
    if version >= MARLIN_PADS_SINCE or (shard_out % MARLIN_N == 0 and shard_in % MARLIN_K == 0):
        return
    then = (
        "vLLM falls back to its slower AWQ kernel"
        if fmt == "awq"
        else "vLLM picks another mixed-precision kernel or raises if none fits"
    )
    rule = "awq_marlin" if fmt == "awq" else "marlin_shape"
    found.warnings.append(
        f"{where}: Marlin needs out % {MARLIN_N} and in % {MARLIN_K} per shard "
        f"({shard_in} -> {shard_out}); {then} (vLLM {MARLIN_PADS_SINCE[0]}.{MARLIN_PADS_SINCE[1]} "
        f"pads the tiles instead) {source(rule, version)}"
    )


def fused_groups(shapes: dict[str, tuple[int, int]], shards: dict[str, tuple[int, int]]):
    """vLLM's per-rank linears: q/k/v summed into qkv_proj, gate/up into gate_up_proj, the rest alone."""
    fused: dict[str, list[str]] = {}
    for name in shapes:
        head, _, proj = name.rpartition(".")
        key = {
            "q_proj": "qkv_proj",
            "k_proj": "qkv_proj",
            "v_proj": "qkv_proj",
            "gate_proj": "gate_up_proj",
            "up_proj": "gate_up_proj",
        }.get(proj, proj)
        fused.setdefault(f"{head}.{key}", []).append(name)
    for name, parts in sorted(fused.items()):
        yield name, shards[parts[0]][0], sum(shards[p][1] for p in parts)


def check_moe(layer: str, hidden: int, intermediate: int, group: int, tp: int, version, found: Findings) -> None:
    """One fused-MoE layer: its experts' intermediate size is split by tp."""
    if intermediate % tp:
        found.errors.append(
            f"{layer}: moe intermediate size {intermediate} not divisible by tp={tp} {source('moe_wna16', version)}"
        )
        return
    shard = intermediate // tp
    if version >= MARLIN_PADS_SINCE:
        marlin = hidden % 128 == 0 and (group <= 0 or shard % group == 0)
    else:
        marlin = hidden % 128 == 0 and shard % max(64, group) == 0
    if marlin:
        return
    g = group if group > 0 else hidden  # WNA16's group -1 is a whole row
    while g >= 32 and (shard % g or hidden % g):
        g //= 2
    if g < 32:
        found.errors.append(
            f"{layer}: neither Marlin MoE (hidden % 128, intermediate per shard {shard} % "
            f"max(64, G)) {source('moe_marlin', version)} nor MoE WNA16 (halves G={group} down to "
            f"32 until it divides {shard} and {hidden}) {source('moe_wna16', version)} takes it"
        )
    else:
        found.warnings.append(
            f"{layer}: not Marlin MoE {source('moe_marlin', version)}; the MoE WNA16 kernel "
            f"runs it with group {g}"
            + (f" (halved from {group})" if g != group else "")
            + f" {source('moe_wna16', version)}"
        )


def check_checkpoint(model_dir: str, tp: int = 1, vllm_version: str | None = None) -> tuple[list[str], list[str]]:
    """(errors that make vLLM refuse the checkpoint, warnings), each naming the layer and the rule's source."""
    version = parse_version(vllm_version or VLLM_CURRENT)
    config = read_config_json(model_dir)
    fmt, bits, group = quant_settings(config)
    found = Findings([], [])
    if bits != 4:
        found.errors.append(f"bits={bits}: vLLM's AWQ loaders take 4-bit weights only {source('awq_shape', version)}")
    if group not in GROUP_SIZES:
        found.errors.append(f"group_size={group}: vLLM's kernels take {GROUP_SIZES} {source('marlin_shape', version)}")
    heads = heads_of(config)
    if heads:
        check_heads(heads, tp, version, found)
    split = dict(architecture_for(config["model_type"]).parallel)
    shapes = linear_shapes(model_dir)
    experts = {n: s for n, s in shapes.items() if ".experts." in n}
    dense = {n: s for n, s in shapes.items() if n not in experts}
    shards = {}
    for name, (in_f, out_f) in sorted(dense.items()):
        kind = split.get(name.rpartition(".")[2], "column")
        split_size = out_f if kind == "column" else in_f
        if split_size % tp and not (name.rpartition(".")[2] in ATTENTION and heads):
            found.errors.append(
                f"{name} ({in_f} -> {out_f}, {kind}-parallel): "
                f"{'out' if kind == 'column' else 'in'}_features not divisible by tp={tp}"
            )
            continue
        shards[name] = shard_shapes(name, in_f, out_f, kind, tp, heads)
        where = f"{name} ({in_f} -> {out_f}, {kind}-parallel, tp={tp})"
        check_linear(where, kind, *shards[name], fmt, group, tp, version, found)
    for name, shard_in, shard_out in fused_groups({n: dense[n] for n in shards}, shards):
        check_marlin(f"{name} (shard {shard_in} -> {shard_out}, tp={tp})", shard_in, shard_out, fmt, version, found)
    layers = {
        n.partition(".experts.")[0]: (in_f, out_f)
        for n, (in_f, out_f) in experts.items()
        if n.rpartition(".")[2] in ("down_proj", "w2")
    }
    for layer, (intermediate, hidden) in sorted(layers.items()):
        check_moe(f"{layer}.experts", hidden, intermediate, group, tp, version, found)
    return found.errors, found.warnings
