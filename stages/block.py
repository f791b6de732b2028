"""AWQ on one block (scale search -> clip search), and a block's tensors as the checkpoint stores them.
Touches nothing outside the block."""

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from awqflow.stages.architectures import Architecture, ScaleGroup
from awqflow.stages.clip import apply_clip, search_clip
from awqflow.stages.method import Codes, linears_of, quantized_linears
from awqflow.stages.model import run_block
from awqflow.stages.quantize import QuantConfig, dequantize_codes, fake_quantize
from awqflow.stages.scales import SearchConfig, apply_scales, block_groups, search_scales
from awqflow.storage.gemm import dequantize_gemm, pack_gemm

STATS_SAMPLES = 8  # windows the block's RTN / AWQ output errors are measured on
SCALE_OPTIONS = ("n_grid", "grid_stride", "grid_tokens", "duo_scaling")  # the Options fields awq_search reads
AWQ_OPTIONS = (*SCALE_OPTIONS, "clip")


class BlockSearch(NamedTuple):
    stats: dict  # per scale group, and the block's RTN / AWQ output errors
    fp_out: torch.Tensor  # the FP block's output on all the windows (scaling keeps it)
    inputs: dict[str, torch.Tensor]  # linear inputs as the scaled linears see them, keyed as input_sources says


def input_sources(block: nn.Module, groups: list[ScaleGroup]) -> dict[str, str]:
    """Linear name -> (name of the module whose input it reads, key under which that input is kept).
    A group's input is taken where its `inspect` module receives it, so that every expert of a MoE group
    sees all tokens; it is kept once, under the group's first linear. Other linears read their own input."""
    sources = {n: (n, n) for n in linears_of(block)}
    for g in groups:
        for name in g.linears:
            sources[name] = (g.inspect, g.linears[0])
    return sources


def collect_linear_inputs(
    block: nn.Module, arch: Architecture, hidden: torch.Tensor, kwargs: dict, batch_size: int = 8
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the input of every linear of the block on the calibration data, (n, seqlen, in) or (tokens, in)
    each, keyed as input_sources says; the block's output), from one pass. A linear that sees no token
    (an expert never routed to) is absent."""
    hooked = dict(input_sources(block, block_groups(block, arch)).values())
    seen: dict[str, list[torch.Tensor]] = {key: [] for key in hooked.values()}

    def record(key):
        # attention modules get their input as the hidden_states keyword
        return lambda m, args, kw: seen[key].append((args[0] if args else kw["hidden_states"]).detach())

    handles = [
        block.get_submodule(module).register_forward_pre_hook(record(key), with_kwargs=True)
        for module, key in hooked.items()
    ]
    try:
        out = run_block(block, hidden, kwargs, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items() if v}, out


@contextmanager
def fake_quantized(block: nn.Module, arch: Architecture, qcfg: QuantConfig):
    """The block with its quantized linears' weights replaced by Q(W) for the duration, then restored."""
    lins = quantized_linears(block, arch)
    saved = {name: lin.weight.data for name, lin in lins.items()}
    for lin in lins.values():
        lin.weight.data = fake_quantize(lin.weight.data, qcfg)
    try:
        yield block
    finally:
        for name, lin in lins.items():
            lin.weight.data = saved[name]


def output_mse(block: nn.Module, arch: Architecture, hidden, kwargs, qcfg: QuantConfig, ref: torch.Tensor) -> float:
    with fake_quantized(block, arch, qcfg):
        return float((run_block(block, hidden, kwargs) - ref).float().pow(2).mean())


def search_config(opts) -> SearchConfig:
    """The scale search a run's options ask for."""
    return SearchConfig(
        n_grid=opts.n_grid, duo_scaling=opts.duo_scaling, grid_stride=opts.grid_stride, grid_tokens=opts.grid_tokens
    )


def awq_search(block: nn.Module, arch: Architecture, inputs, opts, clip: bool | None = None) -> BlockSearch:
    """search_block with the scale search a run's options ask for, and the clip search unless clip
    (default: the options' clip) says otherwise (the AWQ-based methods)."""
    scfg = search_config(opts)
    clip = opts.clip if clip is None else clip
    return search_block(block, arch, inputs.hidden, inputs.kwargs, opts.quant, scfg, clip)


def clip_ranges(block: nn.Module, arch: Architecture, inputs: dict, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """AWQ's clip search for every clipped linear of the block, on its inputs as collect_linear_inputs
    keys them: {linear name: max |w| per (output channel, group)}. Changes nothing."""
    sources = input_sources(block, block_groups(block, arch))
    return {
        name: search_clip(lin.weight, inputs[sources[name][1]], qcfg)
        for name, lin in linears_of(block).items()
        if name not in arch.no_clip and name not in arch.unquantized and sources[name][1] in inputs
    }


@torch.no_grad()
def search_block(
    block: nn.Module,
    arch: Architecture,
    hidden: torch.Tensor,
    kwargs: dict,
    qcfg: QuantConfig,
    scfg: SearchConfig = SearchConfig(),
    clip: bool = True,
) -> BlockSearch:
    """AWQ on one FP block, in place: searches all scales on the FP block first, then fuses them, then
    clips (on the scaled inputs), as AutoAWQ does. Returns the search statistics per group and the
    block's output error (MSE against the FP block, on the first STATS_SAMPLES windows) quantized plainly
    (RTN) and after AWQ; the FP block's output on all of hidden; the linear inputs it captured, scaled."""
    inputs, fp_out = collect_linear_inputs(block, arch, hidden, kwargs)
    # the RTN-vs-AWQ statistics only describe the result: a subsample of the windows is enough
    few, few_out = hidden[:STATS_SAMPLES], fp_out[:STATS_SAMPLES]
    rtn_mse = output_mse(block, arch, few, kwargs, qcfg, few_out)
    groups = block_groups(block, arch)
    found = []
    for group in groups:
        if group.linears[0] in inputs:
            x = inputs[group.linears[0]]
            found.append((group, *search_scales(block, group, x, qcfg, scfg, kwargs)))
    stats = {}
    for group, s, info in found:
        apply_scales(block, group, s)
        inputs[group.linears[0]] = inputs[group.linears[0]] / s.to(inputs[group.linears[0]].dtype)
        stats[group.key] = info
    if clip:
        for name, max_val in clip_ranges(block, arch, inputs, qcfg).items():
            apply_clip(block.get_submodule(name).weight, max_val)
    awq_mse = output_mse(block, arch, few, kwargs, qcfg, few_out)
    return BlockSearch({"groups": stats, "output_mse_rtn": rtn_mse, "output_mse_awq": awq_mse}, fp_out, inputs)


@torch.no_grad()
def checkpoint_tensors(block: nn.Module, codes: dict[str, Codes], qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """The block's tensors as they go into the checkpoint: the linears that have codes packed in the
    GEMM layout (4-bit) or as dequantized fake-quant weights (3-bit); every other tensor as it is."""
    out = {}
    lins = linears_of(block)
    for name, (q, scales, zeros) in codes.items():
        lin = lins[name]
        if qcfg.w_bit == 4:
            qweight, qzeros, s = pack_gemm(q, scales, zeros)
            out.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": s})
        else:
            out[f"{name}.weight"] = dequantize_codes(q, scales, zeros).to(lin.weight.dtype)
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias.data.clone()
    for key, value in block.state_dict().items():
        if key.rpartition(".")[0] not in codes:
            out[key] = value.clone()
    return out


@torch.no_grad()
def load_block_tensors(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put checkpoint_tensors' output back into the block, its quantized weights dequantized: the block
    then computes what the checkpoint will."""
    own = block.state_dict()
    block.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    for name, lin in linears_of(block).items():
        if f"{name}.qweight" in tensors:
            w = dequantize_gemm(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]).t()
            lin.weight.copy_(w.to(lin.weight.dtype))


@torch.no_grad()
def scale_block_tensors(tensors: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """checkpoint_tensors' output with end-to-end factors applied ({parameter name in the block: factor}):
    a quantized linear's factor per (output channel, group) multiplies its group scales (the packed
    layout's (groups, out) scales, or the 3-bit fake-quant weight: the same codes on the new scales); a
    1-D parameter's, each element."""
    out = dict(tensors)
    for name, f in factors.items():
        scales = name.removesuffix(".weight") + ".scales"
        if scales in tensors:
            out[scales] = (tensors[scales].float() * f.t().to(tensors[scales].device)).to(tensors[scales].dtype)
        else:
            t = tensors[name]
            f = f.to(t.device).repeat_interleave(t.shape[-1] // f.shape[-1], dim=-1)
            out[name] = (t.float() * f).to(t.dtype)
    return out
