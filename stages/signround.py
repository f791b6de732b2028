"""SignRound rounding (SPEC "Beyond AWQ"; Cheng et al., 2023; auto-round's sign_round): per block, learn
how to round each weight (an offset V added before rounding) and how far to shrink each group's
min/max, so that the quantized block's output stays close to the FP block's on calibration inputs.

    w_hat = (clamp(round(W / s + V) + z, 0, 2^b - 1) - z) * s
    s = (max * f_max - min * f_min) / (2^b - 1),  z = clamp(round(-min * f_min / s), 0, 2^b - 1)

V (one per weight) starts at 0 and the factors (one pair per group) at 1, i.e. at plain rounding
(quantize_codes exactly), or V starts at given codes on that grid (GPTQ's, for awq-round). They are
trained with signed-gradient steps on the MSE between the block's output with w_hat and the FP output,
round() passing gradients straight through.

Output is exactly what quantize_codes returns (int32 codes, fp16-rounded float32 scales, int32 zeros),
so packing and fake-quant take it unchanged; dequantize_codes of it is bit for bit the weight the
method evaluated.
"""

import math

import torch
from torch import nn
from torch.func import functional_call

from awqflow.stages.quantize import QuantConfig, dequantize_codes, quantize_codes

# V in [-0.5, 0.5]: a weight only ever moves to the grid point just below or above it (a rounding
# choice, never a bigger change). Factors in [0.5, 1]: a group's range only shrinks, at most by half
# (the paper's range; auto-round's code clamps to [0, 1], but with its default lr, a total travel of
# sum(lr_i) ~ 0.5, it never leaves [0.5, 1] either; the clamp matters only for a larger lr).
V_RANGE = (-0.5, 0.5)
FACTOR_RANGE = (0.5, 1.0)
# Samples the before / after losses (and the fall-back guard) are measured on: all of them cost a
# tenth of the bundled model's 200 steps (124 windows, two block forwards each), 16 a sixtieth.
GUARD_SAMPLES = 16
# How far past the rounding boundary a start code other than the nearest puts its weight: 10 steps of
# the default lr (1 / 200) flip it back, where the boundary's far side (0.5 away) would take 100.
CROSSING = 0.05


def _straight_through(exact: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`exact` in the forward pass, bit for bit (x - x.detach() is exactly 0), with the gradient of x.
    Written this way so that w_hat == dequantize_codes(codes) holds by construction, not by float luck."""
    return exact.detach() + (x - x.detach())


class RoundToGrid(torch.autograd.Function):
    """w_hat = (clamp(round(wg / s + v) + z, 0, qmax) - z) * s with round() passing gradients straight
    through: the autograd graph of these few lines, one full-size pass per op each way, written out by hand
    in fewer passes (a SmolLM2 block's 3.5M weights, every step). Gradients for v, s and z; wg is fixed."""

    @staticmethod
    def forward(ctx, wg, v, scales, zeros, qmax):
        s, z = scales[..., None], zeros[..., None]
        shifted = torch.round(wg / s + v) + z
        codes = shifted.clamp(0, qmax)
        signed = codes - z
        ctx.save_for_backward(wg, scales, signed, (shifted >= 0) & (shifted <= qmax))
        ctx.mark_non_differentiable(codes)
        return signed * s, codes  # same expression as dequantize_codes

    @staticmethod
    def backward(ctx, grad, _):
        wg, scales, signed, inside = ctx.saved_tensors
        s = scales[..., None]
        g_codes = grad * s  # w_hat = (codes - z) * s
        g_x = torch.where(inside, g_codes, 0.0)  # clamp passes the gradient inside [0, qmax] only
        g_zeros = g_x.sum(-1) - g_codes.sum(-1)
        # s reaches w_hat directly and through x = wg / s (dx/ds = -wg / s^2)
        g_scales = (grad * signed).sum(-1) - (g_x * wg).sum(-1) / scales.square()
        return None, g_x, g_scales, g_zeros, None


def quantize_learned(w: torch.Tensor, v: torch.Tensor, f_min: torch.Tensor, f_max: torch.Tensor, qcfg: QuantConfig):
    """quantize_codes (same steps, same order) with rounding offsets v (out, in/G, G) and range factors
    f_min, f_max (out, in/G). Returns w_hat (out, in) float32, differentiable in v and the factors, and
    the float tensors codes (out, in/G, G), scales, zeros (out, in/G) that w_hat is made of.
    With v = 0 and factors 1 everything equals quantize_codes exactly."""
    out_f, in_f = w.shape
    g = qcfg.group_len(in_f)
    wg = w.reshape(out_f, in_f // g, g).float()
    qmax = 2**qcfg.w_bit - 1
    wmin, wmax = wg.amin(dim=-1) * f_min, wg.amax(dim=-1) * f_max
    if qcfg.zero_point:
        scales = (wmax - wmin).clamp(min=1e-5) / qmax
        # zero from the fp32 scale, as quantize_codes does; gradient flows through it (as in auto-round)
        zeros = (-_straight_through(torch.round(wmin / scales), wmin / scales)).clamp(0, qmax)
    else:
        half = 2 ** (qcfg.w_bit - 1)
        # max(-min, max) is abs().amax() exactly when the factors are 1
        scales = torch.maximum(-wmin, wmax).clamp(min=1e-5) / (half - 1)
        zeros = torch.full_like(scales, half)
    # scales are stored as fp16: train against the stored value, so the evaluated weights are the saved ones
    scales = _straight_through(scales.to(torch.float16).float(), scales)
    w_hat, codes = RoundToGrid.apply(wg, v, scales, zeros, qmax)
    return w_hat.reshape(out_f, in_f), codes, scales, zeros


def offsets_to(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
    """The smallest V with round(wg / s + V) + z == codes, by a margin of CROSSING: 0 where the code is
    the nearest grid point, just across the rounding boundary where it is the other neighbour (so that
    the tuning can flip it back in a few steps); a code out of reach gets the reachable one nearest it."""
    pos = wg / scales[..., None]
    target, nearest = codes.float() - zeros[..., None].float(), torch.round(pos)
    up, down = torch.floor(pos) + 0.5 - pos + CROSSING, torch.ceil(pos) - 0.5 - pos - CROSSING
    v = torch.where(target > nearest, up, torch.where(target < nearest, down, 0.0))
    return v.clamp(*V_RANGE)


def _cast(obj, dtype):
    """Floating tensors in (nested tuples/lists/dicts of) kwargs to the tuning dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(o, dtype) for k, o in obj.items()}
    return obj


def learn_rounding(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    hidden: torch.Tensor,
    kwargs: dict,
    target: torch.Tensor,
    qcfg: QuantConfig,
    steps: int = 200,
    lr: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    tuning_dtype=torch.float32,
    progress=None,
    patience: int = 0,
    progress_every: int = 10,
    start: dict | None = None,
):
    """SignRound on one block. Quantizes `linears` (name relative to the block -> module; the block's
    other linears stay as they are) starting from their current weights (which may carry AWQ scales and
    clipping). `target` is the FP block's output on `hidden` (n, seqlen, h).

    Each step: a minibatch of `batch_size` samples (a seeded shuffle per pass over the data, as
    auto-round's sampler), the block run with the fake-quant weights, MSE to target, then
    p -= lr_i * sign(grad) with lr_i = lr * (1 - i / steps), lr = 1 / steps by default (auto-round's
    SignSGD with a linear decay to 0). The parameters kept are those of the step with the lowest
    minibatch loss (auto-round's rule; step 0 is plain rounding). Then one guard auto-round lacks:
    minibatch losses of different samples are noisy, so if the kept parameters do worse than plain
    rounding on the first GUARD_SAMPLES samples, plain rounding is returned (stats["fell_back"]).

    `start` ({name: (codes, scales, zeros)} on quantize_codes' grid, e.g. GPTQ's codes) sets the offsets
    V to the ones that round each weight to its start code, as far as [-0.5, 0.5] reaches; the guard
    then compares with those codes instead of plain rounding.

    patience > 0 stops early once the best minibatch loss has not improved for `patience` steps
    (auto-round's dynamic_max_gap); 0 runs all steps. progress(step, minibatch_loss) is called every
    `progress_every` steps and at the last one.

    Returns ({name: (codes int32 (out, in), scales float32 (out, in/G), zeros int32 (out, in/G))}, stats)
    with stats = loss_before (plain rounding, or `start`) and loss_after (returned codes), both output MSE on the
    first GUARD_SAMPLES samples, best_step, steps_run, best_batch_loss, fell_back. The block's own
    weights are never written.
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} samples but target has {target.shape[0]}")
    names = list(linears)
    own = dict(block.named_parameters())
    for name in names:
        if own.get(f"{name}.weight") is not linears[name].weight:
            raise ValueError(f"linears[{name!r}] is not the block's module {name!r}")

    # The block is run through functional_call with these tensors in place of its own: nothing of the
    # block is written, and its other weights take no gradient.
    fixed = {k: t.detach().to(tuning_dtype) for k, t in block.named_parameters()}
    fixed |= {k: _cast(t.detach(), tuning_dtype) for k, t in block.named_buffers()}
    kw = _cast(kwargs, tuning_dtype)
    x_all, y_all = hidden.detach().to(tuning_dtype), target.detach().float()
    weights = {n: linears[n].weight.detach() for n in names}

    def block_out(x, w_hats):
        params = fixed | {f"{n}.weight": w.to(tuning_dtype) for n, w in w_hats.items()}
        out = functional_call(block, params, (x,), kw)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def guard_loss(quantized):  # {name: (codes, scales, zeros)} -> output MSE on GUARD_SAMPLES samples
        w_hats = {n: dequantize_codes(*quantized[n]) for n in names}
        out = torch.cat([block_out(chunk, w_hats) for chunk in x_all[:GUARD_SAMPLES].split(batch_size)])
        return float((out.float() - y_all[:GUARD_SAMPLES]).pow(2).mean())

    # Trainable tensors, float32 whatever the block's dtype: V per weight, two factors per group.
    v, f_min, f_max = {}, {}, {}
    for n in names:
        out_f, in_f = weights[n].shape
        g = qcfg.group_len(in_f)
        if start is None:
            v[n] = torch.zeros(out_f, in_f // g, g, device=x_all.device)
        else:
            codes, scales, zeros = start[n]
            wg = weights[n].reshape(out_f, in_f // g, g).float()
            v[n] = offsets_to(codes.reshape(wg.shape), scales, zeros, wg)
        v[n].requires_grad_(True)
        f_min[n] = torch.ones(out_f, in_f // g, device=x_all.device, requires_grad=True)
        f_max[n] = torch.ones(out_f, in_f // g, device=x_all.device, requires_grad=True)
    trained = [t for n in names for t in (v[n], f_min[n], f_max[n])]

    lr = 1.0 / max(steps, 1) if lr is None else lr
    bs = min(batch_size, x_all.shape[0])
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    best_loss, best_step, best = math.inf, 0, [t.detach().clone() for t in trained]
    steps_run = 0
    for step in range(steps):
        if len(order) < bs:  # a new pass over the samples, freshly shuffled
            order = torch.randperm(x_all.shape[0], generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        with torch.enable_grad():
            w_hats = {n: quantize_learned(weights[n], v[n], f_min[n], f_max[n], qcfg)[0] for n in names}
            out = block_out(x_all[idx], w_hats)
            loss = (out.float() - y_all[idx]).pow(2).mean()
            grads = torch.autograd.grad(loss, trained)
        loss = float(loss.detach())
        steps_run = step + 1
        if loss < best_loss:  # these are the parameters the loss was measured with (before the update)
            best_loss, best_step, best = loss, step, [t.detach().clone() for t in trained]
        if progress is not None and (step % progress_every == 0 or step == steps - 1):
            progress(step, loss)
        if patience and step - best_step >= patience:
            break
        with torch.no_grad():
            step_lr = lr * (1 - step / steps)
            for t, grad in zip(trained, grads):
                t.sub_(step_lr * torch.sign(grad))
            for n in names:
                v[n].clamp_(*V_RANGE)
                f_min[n].clamp_(*FACTOR_RANGE)
                f_max[n].clamp_(*FACTOR_RANGE)

    initial = {n: quantize_codes(weights[n], qcfg) for n in names} if start is None else start
    result = {}
    with torch.no_grad():
        it = iter(best)
        for n in names:
            _, codes, scales, zeros = quantize_learned(weights[n], next(it), next(it), next(it), qcfg)
            result[n] = (codes.reshape(weights[n].shape).to(torch.int32), scales, zeros.to(torch.int32))
    loss_before = guard_loss(initial)
    loss_after = guard_loss(result)
    fell_back = loss_after > loss_before
    if fell_back:
        result, loss_after, best_step = initial, loss_before, 0
    stats = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "best_step": best_step,
        "steps_run": steps_run,
        "best_batch_loss": best_loss,
        "fell_back": fell_back,
    }
    return result, stats
