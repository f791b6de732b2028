"""Model support as data: where each architecture keeps its blocks and which ops AWQ may scale.

A scale group (SPEC §3) is: the op that absorbs 1/s (`prev`), the linears that read its output and
get their input columns multiplied by s, and the module whose output the search compares
(`inspect`). Adding an architecture is one entry in ARCHITECTURES plus a test.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module inside the block, a norm or a linear
    linears: tuple[str, ...]
    inspect: str  # module fed with the linears' shared input; its output is what must not change
    inspect_takes_kwargs: bool = False  # attention modules need the block's mask / rotary kwargs


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: str  # attribute path of the decoder block list
    groups: tuple[ScaleGroup, ...]
    # attention logits are too sensitive to clipping (SPEC §4)
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    not_converted: tuple[str, ...] = field(default=("lm_head",))


LLAMA = Architecture(
    name="llama",
    blocks="model.layers",
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "self_attn", inspect_takes_kwargs=True),
        # skipped at run time when v_proj's output width differs from o_proj's input (GQA)
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
)

# model_type (config.json) -> architecture. Mistral and Qwen2 (q/k/v bias) share Llama's block.
ARCHITECTURES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
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
