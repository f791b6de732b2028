"""One block, start to finish: scale search -> clip search -> quantize. Touches nothing outside it."""

import torch
from torch import nn

from awqflow.stages.architectures import Architecture
from awqflow.stages.clip import apply_clip, search_clip
from awqflow.stages.pack import pack_gemm
from awqflow.stages.quantize import QuantConfig, dequantize_codes, quantize_codes
from awqflow.stages.scales import SearchConfig, apply_scales, group_applies, search_scales


def linears_of(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def input_owner(arch: Architecture, name: str) -> str:
    """Linears of one scale group read the same tensor: keep it once, under the group's first linear."""
    return next((g.linears[0] for g in arch.groups if name in g.linears), name)


def collect_linear_inputs(block: nn.Module, arch: Architecture, hidden: torch.Tensor, kwargs: dict,
                          batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The input of every linear of the block on the calibration data, (n, seqlen, in) each."""
    owners = {input_owner(arch, n) for n in linears_of(block)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in owners}
    handles = [linears_of(block)[n].register_forward_hook(
        lambda m, args, out, n=n: seen[n].append(args[0].detach())) for n in owners]
    try:
        with torch.no_grad():
            for chunk in hidden.split(batch_size):
                block(chunk, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def search_block(block: nn.Module, arch: Architecture, hidden: torch.Tensor, kwargs: dict, qcfg: QuantConfig,
                 scfg: SearchConfig = SearchConfig(), clip: bool = True) -> dict:
    """AWQ on one FP block, in place: searches all scales on the FP block first, then fuses them, then
    clips (on the scaled inputs), as AutoAWQ does. Returns the search statistics per group."""
    inputs = collect_linear_inputs(block, arch, hidden, kwargs)
    found = []
    for group in arch.groups:
        if group_applies(block, group):
            x = inputs[group.linears[0]]
            found.append((group, *search_scales(block, group, x, qcfg, scfg, kwargs)))
    stats = {}
    for group, s, info in found:
        apply_scales(block, group, s)
        inputs[group.linears[0]] = inputs[group.linears[0]] / s.to(inputs[group.linears[0]].dtype)
        stats[group.prev + "->" + ",".join(group.linears)] = info
    if clip:
        for name, lin in linears_of(block).items():
            if name not in arch.no_clip:
                apply_clip(lin.weight, search_clip(lin.weight, inputs[input_owner(arch, name)], qcfg))
    return stats


@torch.no_grad()
def quantized_tensors(block: nn.Module, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """The block's tensors as they go into the checkpoint: 4-bit linears packed in the GEMM layout,
    3-bit ones as dequantized (fake-quant) weights; every other tensor as it is."""
    out = {}
    lins = linears_of(block)
    for name, lin in lins.items():
        codes, scales, zeros = quantize_codes(lin.weight.data, qcfg)
        if qcfg.w_bit == 4:
            qweight, qzeros, s = pack_gemm(codes, scales, zeros)
            out.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": s})
        else:
            out[f"{name}.weight"] = dequantize_codes(codes, scales, zeros).to(lin.weight.dtype)
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias.data.clone()
    for key, value in block.state_dict().items():
        if key.rpartition(".")[0] not in lins:
            out[key] = value.clone()
    return out
