"""GPTQ, alone or after AWQ (issue 16): every quantized linear rounded by GPTQ against the Hessian of
its own inputs on the calibration windows. After AWQ's scale search (without its clipping), the Hessian
is taken on the scaled block, i.e. of the inputs as each scaled linear sees them (X / s)."""

import torch
from torch import nn

from awqflow.stages.block import SCALE_OPTIONS, awq_search, own_input_keys
from awqflow.stages.gptq import add_to_hessian, gptq_codes
from awqflow.stages.method import Method, quantized_linears
from awqflow.stages.methods.awq import scale_table
from awqflow.stages.quantize import quantize_codes
from awqflow.stages.scales import block_groups


@torch.no_grad()
def linear_hessians(
    block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of each linear's own input, accumulated during one pass over the windows: the
    inputs themselves are never kept. A MoE expert sees only the tokens routed to it; one that sees
    none is absent."""
    running: dict[str, tuple[torch.Tensor | None, int]] = {}

    def accumulate(name: str):
        def hook(module, args):
            h, count = running.get(name, (None, 0))
            running[name] = add_to_hessian(h, args[0], count)

        return hook

    handles = [lin.register_forward_pre_hook(accumulate(name)) for name, lin in linears.items()]
    try:
        for chunk in hidden.split(batch_size):
            block(chunk, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: h for name, (h, _) in running.items()}


def gptq_linears(block, arch, inputs, opts, captured: dict[str, torch.Tensor] | None = None) -> dict:
    """GPTQ codes for every quantized linear of the block as its weights stand now (an expert no token
    reached is rounded to nearest: there is no error to compensate on). captured: linear inputs the
    caller already holds, keyed as block.input_sources says (the AWQ search's, scaled): a linear whose
    own input is among them gets its Hessian from it, one per input (q/k/v share one), with no pass."""
    linears = quantized_linears(block, arch)
    captured = captured or {}
    keys = own_input_keys(block, block_groups(block, arch))
    shared: dict[str, torch.Tensor] = {}
    for key in {keys[n] for n in linears if keys.get(n) in captured}:
        shared[key], _ = add_to_hessian(None, captured[key], 0)
    hessians = {n: shared[keys[n]] for n in linears if keys.get(n) in shared}
    rest = {n: lin for n, lin in linears.items() if n not in hessians}
    if rest:
        hessians.update(linear_hessians(block, rest, inputs.hidden, inputs.kwargs))
    codes = {}
    for name, lin in linears.items():
        if name in hessians:
            w = lin.weight.data.float()
            codes[name] = gptq_codes(
                w, hessians[name], opts.quant, opts.gptq_block_size, opts.gptq_damp, name, opts.gptq_actorder
            )
        else:
            codes[name] = quantize_codes(lin.weight.data, opts.quant)
    return codes


def gptq_block(block, arch, inputs, opts):
    return gptq_linears(block, arch, inputs, opts), {}


def awq_gptq_block(block, arch, inputs, opts):
    # AWQ's clipping is left out: it clamps weights before GPTQ can weigh the clamp's error (bundled
    # model, w4 g128: ppl / KL 50.605 / 0.00119 with it, 50.571 / 0.00089 without)
    found = awq_search(block, arch, inputs, opts, clip=False)
    return gptq_linears(block, arch, inputs, opts, found.inputs), found.stats


GPTQ_OPTIONS = ("gptq_damp", "gptq_block_size", "gptq_actorder")
GPTQ = Method("gptq", gptq_block, needs_inputs=True, options=GPTQ_OPTIONS)
AWQ_GPTQ = Method(
    "awq-gptq",
    awq_gptq_block,
    needs_inputs=True,
    options=(*SCALE_OPTIONS, *GPTQ_OPTIONS),
    table=scale_table,
)
