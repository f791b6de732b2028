"""GPTQ, alone or after AWQ (issue 16): every quantized linear rounded by GPTQ against the Hessian of
its input on the calibration windows, in the order the block calls them, each one's input taken with
the linears before it already quantized (the reference GPTQ's "true sequential"). awq-gptq searches
AWQ's scales (without its clipping) in the same pass, each group on its input as the block computes
it there, and keeps them only where GPTQ rounds the group's linears closer to their outputs with them
than without."""

import torch
from torch import nn

from awqflow.stages.block import SCALE_OPTIONS, STATS_SAMPLES, output_mse, search_config
from awqflow.stages.gptq import add_to_hessian, gptq_codes
from awqflow.stages.method import Codes, Method, quantized_linears
from awqflow.stages.methods.awq import scale_table
from awqflow.stages.model import run_block
from awqflow.stages.quantize import dequantize_codes, quantize_codes
from awqflow.stages.scales import apply_scales, block_groups, grid_sample, search_scales


class _AllQuantized(Exception):
    """Raised once the last linear has its codes: the rest of the block's forward is not needed."""


def use_codes(codes: dict, name: str, lin: nn.Linear, c) -> None:
    """Record a linear's codes and run it on their weights from now on: the codes saved always decode
    to the weights the block ran with."""
    codes[name] = c
    lin.weight.data = dequantize_codes(*c).to(lin.weight.dtype)


def gptq_with(w: torch.Tensor, h: torch.Tensor, opts, name: str = ""):
    """gptq_codes with a run's GPTQ options."""
    return gptq_codes(w.float(), h, opts.quant, opts.gptq_block_size, opts.gptq_damp, name, opts.gptq_actorder)


@torch.no_grad()
def gptq_in_order(block: nn.Module, arch, inputs, opts, scale_hooks=None) -> dict:
    """GPTQ codes for every quantized linear, from one pass of all the windows at once: each linear,
    when the block first calls it, is quantized against the Hessian of the input it gets there and runs
    quantized from then on, so the linears after it see the error of the ones before (bundled model,
    w3 g128, gptq: ppl / KL 50.721 / 0.00425 with every Hessian from the FP block, 50.675 / 0.00419 in
    order). The price is the block's activations for all windows at once. Linears that read the same
    input (q, k, v) share its Hessian; an expert no token reached is rounded to nearest.

    scale_hooks(codes, searching) -> hook handles: awq-gptq's pre-hooks, registered before the linears'
    own so that they run first; while one runs the block's modules for its search, `searching` is not
    empty and the linears' hooks stand aside."""
    codes: dict = {}
    last: list = [None, None]  # (the input, its Hessian): consecutive linears reading one tensor share it

    def quantize_on_first_call(name: str):
        def hook(lin, args):
            if searching:
                return
            if name not in codes:  # awq-gptq's accept test may have quantized it already
                x = args[0]
                if last[0] is not x:
                    last[:] = [x, add_to_hessian(None, x, 0)[0]]
                use_codes(codes, name, lin, gptq_with(lin.weight.data, last[1], opts, name))
            if len(codes) == len(linears):
                raise _AllQuantized

        return hook

    linears = quantized_linears(block, arch)
    searching: list = []
    handles = scale_hooks(codes, searching) if scale_hooks else []
    handles += [lin.register_forward_pre_hook(quantize_on_first_call(n)) for n, lin in linears.items()]
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


def gptq_rows(ws: list[torch.Tensor], h: torch.Tensor, opts, name: str = "") -> list:
    """GPTQ codes of several linears that read one input, in one call: GPTQ rounds each output row on
    its own (its groups' ranges and its error compensation are the row's alone), so the linears' rows
    stacked give each one's codes, with one factorisation of H and one column loop."""
    q, scales, zeros = gptq_with(torch.cat(ws), h, opts, name)
    rows = [len(w) for w in ws]
    return list(zip(q.split(rows), scales.split(rows), zeros.split(rows)))


def gptq_prefers_scales(block: nn.Module, opts):
    """awq-gptq's accept: (whether to keep s, the group's codes or None). GPTQ rounds the group's
    linears on the Hessian of their input x, once as they are and once times s (x divided by s); s is
    kept where that brings the linears closer to their FP outputs on x. The codes of the winner are
    the ones the block's pass would compute on that input next, so they are returned for it to use.
    On the bundled model's w3 g128 AWQ's scales make that error worse in 8 of 11 groups."""

    def accept(group, s, x):
        if group.routes_tokens:  # each expert sees its share of x: no Hessian of its own here
            return True, None
        h = add_to_hessian(None, x, 0)[0]
        s = s.float()
        ws = [block.get_submodule(name).weight.data.float() for name in group.linears]
        plain = gptq_rows(ws, h, opts, group.key)
        scaled = gptq_rows([w * s for w in ws], h / s[:, None] / s[None, :], opts, group.key)
        plain_error = sum(output_error(w, dequantize_codes(*c), h) for w, c in zip(ws, plain))
        scaled_error = sum(output_error(w, dequantize_codes(*c) / s, h) for w, c in zip(ws, scaled))
        keep = scaled_error < plain_error
        return keep, dict(zip(group.linears, scaled if keep else plain))

    return accept


def divide_rows(codes: Codes, s: torch.Tensor) -> Codes:
    """The codes of a linear whose last len(s) output rows are divided by s: the same integers, those
    rows' (row, group) scales divided by s and rounded to fp16 as quantize_codes stores them."""
    q, scales, zeros = codes
    scales = scales.clone()
    scales[-len(s) :] = (scales[-len(s) :] / s.view(-1, 1).float()).half().float()
    return q, scales, zeros


class _Recorded(Exception):
    """Raised once every group's input is recorded: the rest of the module's forward is not needed."""


def record_inputs(block: nn.Module, group, followers, args, kwargs, max_tokens: int) -> dict:
    """{follower key: the input its inspect module gets} when the group's inspect module runs on its
    input (args, kwargs) with the block's weights as they are, in batches of 8 windows. A module that
    acts on each token alone runs on at most max_tokens of them spread over every window (the search's
    own sample: all of them cost 0.8 s a bundled block); a follower the call does not reach is absent."""
    x = args[0] if args else kwargs["hidden_states"]
    if not group.inspect_takes_kwargs and not group.routes_tokens:
        x = grid_sample(x, max_tokens, per_token=True)
    seen: dict = {g.key: [] for g in followers}
    in_batch: set = set()

    def record(follower):
        def hook(m, a, kw):
            if follower.key not in in_batch:
                in_batch.add(follower.key)
                seen[follower.key].append(a[0] if a else kw["hidden_states"])
            if len(in_batch) == len(followers):
                raise _Recorded

        return hook

    module = block.get_submodule(group.inspect)
    handles = [block.get_submodule(g.inspect).register_forward_pre_hook(record(g), with_kwargs=True) for g in followers]
    try:
        for batch in x.split(8 if x.dim() == 3 else 4096):
            in_batch.clear()
            try:
                if args:
                    module(batch, *args[1:], **kwargs)
                else:
                    module(**{**kwargs, "hidden_states": batch})
            except _Recorded:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in seen.items() if parts}


def gptq_block(block, arch, inputs, opts):
    return gptq_in_order(block, arch, inputs, opts), {}


@torch.no_grad()
def awq_gptq_block(block, arch, inputs, opts, accept=None):
    """AWQ's scale search and GPTQ in one pass over all the windows, in the block's order. Where a scale
    group's `inspect` module is first called, its scales are searched on the input it gets (the linears
    before it already quantized), kept if accept (default gptq_prefers_scales) says GPTQ does better
    with them on that input, and fused; the group's linears take the GPTQ codes the test computed, and
    the pass goes on with the input divided by the scales kept. A group whose prev is a linear (v -> o,
    up -> down) finds that linear quantized: it is searched on the input recorded when the group before
    it was reached, with the linear still in full precision, and the linear's rows' scales take 1/s
    (divide_rows). Taking the test's codes saves a GPTQ per linear (SmolLM2 w3 g64, blocks 5 and 15:
    1.28-1.42x -> 1.13-1.19x awq's block time; ppl / KL 17.818 / 0.54809 -> 17.785 / 0.54729). Against searching
    every group on the FP block first and then running GPTQ in order: one block forward less (bundled
    w3 g128: 1.79x -> 1.30x awq's block time; ppl / KL 50.698 / 0.00410 -> 50.692 / 0.00409; SmolLM2 w3
    g64 18.156 / 0.56349 -> 17.990 / 0.55428). AWQ's clipping is left out: it clamps weights before
    GPTQ can weigh the clamp's error (w4 g128: 50.605 / 0.00119 with it, 50.571 / 0.00089 without).

    Statistics: the groups' searches; output_mse_rtn and output_mse_awq, the block's output error on
    the first STATS_SAMPLES windows rounded to nearest and as this method quantized it."""
    qcfg, scfg = opts.quant, search_config(opts)
    accept = accept or gptq_prefers_scales(block, opts)
    few = inputs.hidden[:STATS_SAMPLES]
    few_out = run_block(block, few, inputs.kwargs)
    rtn_mse = output_mse(block, arch, few, inputs.kwargs, qcfg, few_out)
    stats: dict = {}
    groups = block_groups(block, arch)
    # inputs of the groups whose prev is a linear, with that linear in full precision (SmolLM2 w3 g64:
    # 17.990 so, 18.495 on the input behind the GPTQ-quantized gate/up, 18.75 with no up -> down scales)
    fp_inputs: dict = {}

    def scale_hooks(codes, searching):
        def search_on_first_call(group):
            def hook(module, args, kwargs):
                if searching or group.key in stats:
                    return None
                x = args[0] if args else kwargs["hidden_states"]  # attention gets it as a keyword
                searched = fp_inputs.pop(group.key, x)
                searching.append(group)
                try:
                    s, info = search_scales(block, group, searched, qcfg, scfg, inputs.kwargs)
                    keep, group_codes = accept(group, s, x)
                finally:
                    searching.clear()
                if keep:
                    stats[group.key] = info
                    apply_scales(block, group, s)
                    if group.prev in codes:
                        prev = block.get_submodule(group.prev)
                        use_codes(codes, group.prev, prev, divide_rows(codes[group.prev], s))
                    x = x / s.to(x.dtype)
                    args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
                else:
                    stats[group.key] = {**info, "alpha": None, "turned_down": info["alpha"]}
                followers = [g for g in groups if g.prev in group.linears]
                if followers:  # recorded while the group's linears are still in full precision
                    searching.append(group)
                    try:
                        fp_inputs.update(record_inputs(block, group, followers, args, kwargs, scfg.grid_tokens))
                    finally:
                        searching.clear()
                for name, c in (group_codes or {}).items():
                    use_codes(codes, name, block.get_submodule(name), c)
                return args, kwargs

            return hook

        return [
            block.get_submodule(g.inspect).register_forward_pre_hook(search_on_first_call(g), with_kwargs=True)
            for g in groups
        ]

    codes = gptq_in_order(block, arch, inputs, opts, scale_hooks)
    quantized_mse = float((run_block(block, few, inputs.kwargs) - few_out).float().pow(2).mean())
    return codes, {"groups": stats, "output_mse_rtn": rtn_mse, "output_mse_awq": quantized_mse}


GPTQ_OPTIONS = ("gptq_damp", "gptq_block_size", "gptq_actorder")
GPTQ = Method("gptq", gptq_block, needs_inputs=True, options=GPTQ_OPTIONS)
AWQ_GPTQ = Method(
    "awq-gptq",
    awq_gptq_block,
    needs_inputs=True,
    options=(*SCALE_OPTIONS, *GPTQ_OPTIONS),
    table=scale_table,
)
