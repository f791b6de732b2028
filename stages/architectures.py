"""Model support as data: where each architecture keeps its blocks and which ops AWQ may scale.

A scale group (SPEC §3) is: the op that absorbs 1/s (`prev`), the linears that read its output and
get their input columns multiplied by s, and the module whose output the search compares
(`inspect`). Names are relative to a block; `*` stands for one name component (an expert index):
a `*` in `prev` gives one group per match (each expert's up -> down), a `*` only in `linears` puts
every match into one group (all experts read the same normed input, so they share one s).
A group whose modules a block lacks is skipped there (dense layers of a MoE model).
Adding an architecture is one entry in ARCHITECTURES plus a test (tests/test_architectures.py).
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module inside the block, a norm or a linear
    linears: tuple[str, ...]
    inspect: str  # module fed with the linears' shared input; its output is what must not change
    inspect_takes_kwargs: bool = False  # attention modules need the block's mask / rotary kwargs
    # norms that compute x * (offset + weight) (Gemma: 1): 1/s is fused as (offset + w) / s - offset
    prev_offset: float = 0.0
    # a fused prev linear whose output is this many equal parts (gate_up: 2, qkv: 3); only the last
    # part (up, v) feeds the linears, so only its rows absorb 1/s
    prev_chunks: int = 1
    # modules that read the same input but stay unquantized (a MoE router): their input columns are
    # multiplied by s so that they compute the same function; the search leaves them in full precision
    also_scaled: tuple[str, ...] = ()
    # the search evaluates all candidates in one batched pass; a module that routes tokens (MoE) mixes
    # the candidates' tokens, so its candidates are evaluated one at a time
    routes_tokens: bool = False

    @property
    def key(self) -> str:
        """How the scale statistics name the group: prev->linear,linear."""
        return self.prev + "->" + ",".join(self.linears)


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: str  # attribute path of the decoder block list
    groups: tuple[ScaleGroup, ...]
    # attention logits are too sensitive to clipping (SPEC §4); fused qkv is skipped whole, as AutoAWQ does
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    # modules outside the blocks that stay in full precision (config.json modules_to_not_convert)
    not_converted: tuple[str, ...] = ("lm_head",)
    # block modules that stay in full precision; each block's ones are named in modules_to_not_convert
    unquantized: tuple[str, ...] = ()
    # transformers keeps these experts as 3D tensors; checkpoints (and AWQ) have one linear per expert
    fused_experts: str | None = None
    # which way tensor parallelism splits each linear (vLLM): "column" splits out_features, "row" in_features
    parallel: tuple[tuple[str, str], ...] = ()
    # (transformers' module name, checkpoint name) of parts that checkpoints name differently
    # (Mixtral's experts.N.w1 is transformers' experts.N.gate_proj, GPT-NeoX's embed_out its lm_head);
    # whole dotted components
    checkpoint_names: tuple[tuple[str, str], ...] = ()

    def checkpoint_name(self, name: str) -> str:
        """A module or tensor name, as checkpoints (and AWQ loaders) spell it."""
        return _rename(name, self.checkpoint_names)

    def module_name(self, name: str) -> str:
        """The inverse of checkpoint_name."""
        return _rename(name, tuple((ckpt, module) for module, ckpt in self.checkpoint_names))


def _rename(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    dotted = f".{name}."
    for old, new in pairs:
        dotted = dotted.replace(f".{old}.", f".{new}.")
    return dotted[1:-1]


def _attention(norm: str, qkv: tuple[str, ...], offset: float = 0.0) -> ScaleGroup:
    return ScaleGroup(norm, qkv, qkv[0].rpartition(".")[0], inspect_takes_kwargs=True, prev_offset=offset)


_LLAMA_TP = (
    ("q_proj", "column"),
    ("k_proj", "column"),
    ("v_proj", "column"),
    ("o_proj", "row"),
    ("gate_proj", "column"),
    ("up_proj", "column"),
    ("down_proj", "row"),
)

LLAMA = Architecture(
    name="llama",
    blocks="model.layers",
    groups=(
        _attention("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        # skipped at run time when v_proj's output width differs from o_proj's input (GQA)
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    parallel=_LLAMA_TP,
)

# Gemma-2/3: norms scale by (1 + w); the MLP reads pre_feedforward_layernorm, while
# post_attention_layernorm normalises the attention output (no linear reads it).
GEMMA2 = Architecture(
    name="gemma2",
    blocks="model.layers",
    groups=(
        _attention("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), offset=1.0),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", prev_offset=1.0),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    parallel=_LLAMA_TP,
)

PHI3 = Architecture(
    name="phi3",
    blocks="model.layers",
    groups=(
        _attention("input_layernorm", ("self_attn.qkv_proj",)),
        # qkv_proj is [q; k; v]: v is its last third unless GQA makes the parts unequal (then skipped)
        ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_chunks=3),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_chunks=2),
    ),
    no_clip=("self_attn.qkv_proj",),
    parallel=(("qkv_proj", "column"), ("o_proj", "row"), ("gate_up_proj", "column"), ("down_proj", "row")),
)

# OPT (pre-LayerNorm variants; LayerNorm biases absorb 1/s too). fc1 -> ReLU -> fc2: ReLU is positively
# homogeneous, so fc1's rows can absorb 1/s.
OPT = Architecture(
    name="opt",
    blocks="model.decoder.layers",
    groups=(
        _attention("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
        ScaleGroup("fc1", ("fc2",), "fc2"),
    ),
    parallel=(
        ("q_proj", "column"),
        ("k_proj", "column"),
        ("v_proj", "column"),
        ("out_proj", "row"),
        ("fc1", "column"),
        ("fc2", "row"),
    ),
)

# GPT-NeoX: query_key_value interleaves q, k, v per head, so v has no contiguous rows to absorb o's
# scales; GELU is not homogeneous, so dense_4h_to_h would need a scaled activation module that
# transformers' and vLLM's AWQ loaders do not create for every model. Both groups are left out.
GPT_NEOX = Architecture(
    name="gpt_neox",
    blocks="gpt_neox.layers",
    groups=(
        _attention("input_layernorm", ("attention.query_key_value",)),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    ),
    no_clip=("attention.query_key_value",),
    not_converted=("embed_out",),  # the checkpoint's (and vLLM's) name for transformers' lm_head
    checkpoint_names=(("lm_head", "embed_out"),),
    parallel=(("query_key_value", "column"), ("dense", "row"), ("dense_h_to_4h", "column"), ("dense_4h_to_h", "row")),
)

# Qwen3-MoE: every expert's gate/up and the router read post_attention_layernorm's output: one group,
# router scaled along (routing unchanged) and left unquantized. Dense layers (mlp_only_layers) use
# Llama's MLP groups.
QWEN3_MOE = Architecture(
    name="qwen3_moe",
    blocks="model.layers",
    groups=LLAMA.groups
    + (
        ScaleGroup(
            "post_attention_layernorm",
            ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
            "mlp",
            also_scaled=("mlp.gate",),
            routes_tokens=True,
        ),
        ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj"),
    ),
    unquantized=("mlp.gate",),
    fused_experts="mlp.experts",
    parallel=_LLAMA_TP,
)

# Qwen2-MoE: as Qwen3-MoE plus a shared expert beside the routed ones. Its gate/up read the same input
# and join the one group; its sigmoid gate (a 1-output linear) is scaled along and kept unquantized.
QWEN2_MOE = Architecture(
    name="qwen2_moe",
    blocks="model.layers",
    groups=LLAMA.groups
    + (
        ScaleGroup(
            "post_attention_layernorm",
            (
                "mlp.experts.*.gate_proj",
                "mlp.experts.*.up_proj",
                "mlp.shared_expert.gate_proj",
                "mlp.shared_expert.up_proj",
            ),
            "mlp",
            also_scaled=("mlp.gate", "mlp.shared_expert_gate"),
            routes_tokens=True,
        ),
        ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj"),
        ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj"),
    ),
    unquantized=("mlp.gate", "mlp.shared_expert_gate"),
    fused_experts="mlp.experts",
    parallel=_LLAMA_TP,
)

# Mixtral: Qwen3-MoE's groups, but its checkpoints keep the original names (block_sparse_moe,
# w1 = gate, w3 = up, w2 = down) that vLLM and AutoAWQ expect in the quantized checkpoint too.
MIXTRAL = replace(
    QWEN3_MOE,
    name="mixtral",
    checkpoint_names=(
        ("mlp.experts", "block_sparse_moe.experts"),
        ("mlp.gate", "block_sparse_moe.gate"),
        ("gate_proj", "w1"),
        ("up_proj", "w3"),
        ("down_proj", "w2"),
    ),
    parallel=_LLAMA_TP + (("w1", "column"), ("w3", "column"), ("w2", "row")),
)

# model_type (config.json) -> architecture. Mistral, Qwen2 (q/k/v bias) and Qwen3 (q_norm / k_norm act
# after q_proj / k_proj, so scaling their input columns leaves them alone) share Llama's block.
ARCHITECTURES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "phi3": PHI3,
    "opt": OPT,
    "gpt_neox": GPT_NEOX,
    "qwen3_moe": QWEN3_MOE,
    "qwen2_moe": QWEN2_MOE,
    "mixtral": MIXTRAL,
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}. "
            f"To add one, describe its scale groups in awqflow/stages/architectures.py (one ARCHITECTURES entry) "
            f"and add a test"
        ) from None
