"""GPTQ, alone or after AWQ (issue 16): every quantized linear rounded by GPTQ against the Hessian of
its input on the calibration windows, in the order the block calls them, each one's input taken with
the linears before it already quantized (the reference GPTQ's "true sequential"). After AWQ's scale
search (without its clipping), a group's scales are kept only where GPTQ rounds its linears closer to
their FP outputs with them than without."""

import torch
from torch import nn

from awqflow.stages.block import SCALE_OPTIONS, awq_search
from awqflow.stages.gptq import add_to_hessian, gptq_codes
from awqflow.stages.method import Method, quantized_linears
from awqflow.stages.methods.awq import scale_table
from awqflow.stages.quantize import dequantize_codes, quantize_codes
from awqflow.stages.scales import grid_sample


class _AllQuantized(Exception):
    """Raised once the last linear has its codes: the rest of the block's forward is not needed."""


def gptq_with(w: torch.Tensor, h: torch.Tensor, opts, name: str = ""):
    """gptq_codes with a run's GPTQ options."""
    return gptq_codes(w.float(), h, opts.quant, opts.gptq_block_size, opts.gptq_damp, name, opts.gptq_actorder)


@torch.no_grad()
def gptq_in_order(block: nn.Module, arch, inputs, opts) -> dict:
    """GPTQ codes for every quantized linear, from one pass of all the windows at once: each linear,
    when the block first calls it, is quantized against the Hessian of the input it gets there and runs
    quantized from then on, so the linears after it see the error of the ones before (bundled model,
    w3 g128, gptq: ppl / KL 50.721 / 0.00425 with every Hessian from the FP block, 50.675 / 0.00419 in
    order). The price is the block's activations for all windows at once. Linears that read the same
    input (q, k, v) share its Hessian; an expert no token reached is rounded to nearest."""
    codes: dict = {}
    last: list = [None, None]  # (the input, its Hessian): consecutive linears reading one tensor share it

    def quantize_on_first_call(name: str):
        def hook(lin, args):
            if name in codes:
                return
            x = args[0]
            if last[0] is not x:
                last[:] = [x, add_to_hessian(None, x, 0)[0]]
            w = lin.weight.data
            codes[name] = gptq_with(w, last[1], opts, name)
            lin.weight.data = dequantize_codes(*codes[name]).to(w.dtype)
            if len(codes) == len(linears):
                raise _AllQuantized

        return hook

    linears = quantized_linears(block, arch)
    handles = [lin.register_forward_pre_hook(quantize_on_first_call(n)) for n, lin in linears.items()]
    try:
        block(inputs.hidden, **inputs.kwargs)
    except _AllQuantized:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {n: codes[n] if n in codes else quantize_codes(lin.weight.data, opts.quant) for n, lin in linears.items()}


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """||X w^T - X w_hat^T||^2 / n for the inputs X whose H = 2/n X^T X is h, up to the factor 2."""
    d = (w - w_hat).float()
    return float(((d @ h) * d).sum())


def gptq_prefers_scales(block: nn.Module, opts):
    """For awq_search's accept: whether GPTQ, on the group's FP inputs x, rounds the group's linears
    closer to their FP outputs with the scales s (the weights times s, the inputs divided by s) than
    without, on at most --grid-tokens of x's tokens, as the scale search measures. On the bundled
    model's w3 g128 AWQ's scales make that error worse in 8 of 11 groups."""

    def gptq(w, h):
        return dequantize_codes(*gptq_with(w, h, opts))

    def accept(group, s, x) -> bool:
        if group.routes_tokens:  # each expert sees its share of x: no Hessian of its own here
            return True
        h = add_to_hessian(None, grid_sample(x, opts.grid_tokens, per_token=True), 0)[0]
        s = s.float()
        h_scaled = h / s[:, None] / s[None, :]
        plain = scaled = 0.0
        for name in group.linears:
            w = block.get_submodule(name).weight.data.float()
            plain += output_error(w, gptq(w, h), h)
            scaled += output_error(w, gptq(w * s, h_scaled) / s, h)
        return scaled < plain

    return accept


def gptq_block(block, arch, inputs, opts):
    return gptq_in_order(block, arch, inputs, opts), {}


def awq_gptq_block(block, arch, inputs, opts):
    # AWQ's clipping is left out: it clamps weights before GPTQ can weigh the clamp's error (bundled
    # model, w4 g128: ppl / KL 50.605 / 0.00119 with it, 50.571 / 0.00089 without)
    stats = awq_search(block, arch, inputs, opts, clip=False, accept=gptq_prefers_scales(block, opts)).stats
    return gptq_in_order(block, arch, inputs, opts), stats


GPTQ_OPTIONS = ("gptq_damp", "gptq_block_size", "gptq_actorder")
GPTQ = Method("gptq", gptq_block, needs_inputs=True, options=GPTQ_OPTIONS)
AWQ_GPTQ = Method(
    "awq-gptq",
    awq_gptq_block,
    needs_inputs=True,
    options=(*SCALE_OPTIONS, *GPTQ_OPTIONS),
    table=scale_table,
)
