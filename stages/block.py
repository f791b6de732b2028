"""AWQ on one block (scale search -> clip search), and a block's tensors as the checkpoint stores them.
Touches nothing outside the block."""

import copy

import torch
from torch import nn

from awqflow.stages.architectures import Architecture, ScaleGroup
from awqflow.stages.clip import apply_clip, search_clip
from awqflow.stages.method import Codes, linears_of
from awqflow.stages.model import run_block
from awqflow.stages.quantize import QuantConfig, dequantize_codes, fake_quantize
from awqflow.stages.scales import SearchConfig, apply_scales, block_groups, search_scales
from awqflow.storage.gemm import pack_gemm


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
) -> dict[str, torch.Tensor]:
    """The input of every linear of the block on the calibration data, (n, seqlen, in) or (tokens, in)
    each, keyed as input_sources says. A linear that sees no token (an expert never routed to) is absent."""
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
        with torch.no_grad():
            for chunk in hidden.split(batch_size):
                block(chunk, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items() if v}


def fake_quant_output(
    block: nn.Module, arch: Architecture, hidden: torch.Tensor, kwargs: dict, qcfg: QuantConfig
) -> torch.Tensor:
    """The block's output with its linears (those that get quantized) replaced by Q(W)."""
    trial = copy.deepcopy(block)
    for name, lin in linears_of(trial).items():
        if name not in arch.unquantized:
            lin.weight.data = fake_quantize(lin.weight.data, qcfg)
    return run_block(trial, hidden, kwargs)


@torch.no_grad()
def search_block(
    block: nn.Module,
    arch: Architecture,
    hidden: torch.Tensor,
    kwargs: dict,
    qcfg: QuantConfig,
    scfg: SearchConfig = SearchConfig(),
    clip: bool = True,
) -> dict:
    """AWQ on one FP block, in place: searches all scales on the FP block first, then fuses them, then
    clips (on the scaled inputs), as AutoAWQ does. Returns the search statistics per group and the
    block's output error (MSE against the FP block) quantized plainly (RTN) and after AWQ."""
    fp_out = run_block(block, hidden, kwargs)
    rtn_mse = float((fake_quant_output(block, arch, hidden, kwargs, qcfg) - fp_out).float().pow(2).mean())
    groups = block_groups(block, arch)
    inputs = collect_linear_inputs(block, arch, hidden, kwargs)
    found = []
    for group in groups:
        if group.linears[0] in inputs:
            x = inputs[group.linears[0]]
            found.append((group, *search_scales(block, group, x, qcfg, scfg, kwargs)))
    stats = {}
    for group, s, info in found:
        apply_scales(block, group, s)
        inputs[group.linears[0]] = inputs[group.linears[0]] / s.to(inputs[group.linears[0]].dtype)
        stats[group.prev + "->" + ",".join(group.linears)] = info
    if clip:
        sources = input_sources(block, groups)
        for name, lin in linears_of(block).items():
            key = sources[name][1]
            if name not in arch.no_clip and name not in arch.unquantized and key in inputs:
                apply_clip(lin.weight, search_clip(lin.weight, inputs[key], qcfg))
    awq_mse = float((fake_quant_output(block, arch, hidden, kwargs, qcfg) - fp_out).float().pow(2).mean())
    return {"groups": stats, "output_mse_rtn": rtn_mse, "output_mse_awq": awq_mse}


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
