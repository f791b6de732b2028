"""Learned rounding (issue 17): SignRound per block, from AWQ's scaled weights (`awq-round`; the offsets
start at plain rounding or at GPTQ's codes, --round-start) or from the plain weights (`round`), against
the FP block's output on the calibration windows (sequential mode: the FP model's output of the block,
on the quantized blocks' output). Some windows are held out of the tuning: the learned codes are kept
only where they beat the starting codes there (awq-round: AWQ's own and GPTQ's on the scaled block, the
better of the two standing otherwise; round: round to nearest), so
a block can never end worse than AWQ or GPTQ would leave it."""

import copy
import logging
from dataclasses import replace

import torch

from awqflow.stages.block import AWQ_OPTIONS, awq_search, clip_ranges
from awqflow.stages.calibration import held_out
from awqflow.stages.clip import apply_clip
from awqflow.stages.method import Method, quantized_linears, round_linears
from awqflow.stages.methods.awq import scale_table
from awqflow.stages.methods.gptq import GPTQ_OPTIONS, gptq_in_order
from awqflow.stages.model import run_block
from awqflow.stages.quantize import dequantize_codes, quantize_codes
from awqflow.stages.signround import learn_rounding

log = logging.getLogger("awqflow.round")
PROGRESS_EVERY = 50  # steps between progress lines (terminal and Prefect UI)


def output_mse(block, codes: dict, hidden: torch.Tensor, kwargs: dict, target: torch.Tensor) -> float:
    trial = copy.deepcopy(block)
    for name, c in codes.items():
        lin = trial.get_submodule(name)
        lin.weight.data = dequantize_codes(*c).to(lin.weight.dtype)
    return float((run_block(trial, hidden, kwargs).float() - target.float()).pow(2).mean())


def tune(
    block, arch, inputs, opts, target: torch.Tensor, starts: dict[str, dict] | None = None, warm: dict | None = None
) -> tuple[dict, dict]:
    """SignRound from the block's current weights, its offsets starting at the `warm` codes (default:
    plain rounding); the learned codes are kept only if they beat every code set in `starts` (default:
    the current weights rounded to nearest) on held-out windows, else the best of those stands (with no
    window to hold out, the first)."""
    hidden, kwargs = inputs.hidden, inputs.kwargs
    n = hidden.shape[0]
    held = held_out(n)
    fit = slice(0, n - held)
    starts = starts or {"nearest": round_linears(block, arch, opts.quant)}
    dtype = getattr(torch, opts.round_dtype)
    learned, stats = learn_rounding(
        block, quantized_linears(block, arch), hidden[fit], kwargs, target[fit], opts.quant,
        steps=opts.round_steps, lr=opts.round_lr, batch_size=opts.round_batch_size, seed=opts.seed,
        tuning_dtype=dtype, patience=opts.round_patience, progress_every=PROGRESS_EVERY, start=warm,
        progress=lambda step, loss: log.info(
            "block %s, learned rounding step %d/%d: minibatch loss %.4g", inputs.index, step, opts.round_steps, loss
        ),
    )  # fmt: skip
    best = next(iter(starts))
    if held:
        tail = slice(n - held, n)
        losses = {name: output_mse(block, c, hidden[tail], kwargs, target[tail]) for name, c in starts.items()}
        best = min(losses, key=losses.get)
        stats["heldout_losses_start"] = losses
        stats["heldout_loss_learned"] = output_mse(block, learned, hidden[tail], kwargs, target[tail])
        stats["kept"] = stats["heldout_loss_learned"] < losses[best]
    else:  # one window: learn_rounding's own guard on the tuning data is all there is
        stats["kept"] = not stats["fell_back"]
    stats["heldout_samples"] = held
    stats["start"] = best
    verdict = "kept" if stats["kept"] else f"not kept ({best}'s codes win on the held-out windows)"
    log.info(
        "block %s, learned rounding: output MSE %.4g -> %.4g on tuning windows, %s",
        inputs.index, stats["loss_before"], stats["loss_after"], verdict,
    )  # fmt: skip
    return (learned if stats["kept"] else starts[best]), stats


def awq_codes(block, arch, linear_inputs: dict, opts) -> dict:
    """What awq would save for the scaled block: its weights clipped by AWQ's clip search (--clip), rounded."""
    ranges = clip_ranges(block, arch, linear_inputs, opts.quant) if opts.clip else {}
    codes = {}
    for name, lin in quantized_linears(block, arch).items():
        w = lin.weight.data.clone()
        if name in ranges:
            apply_clip(w, ranges[name])
        codes[name] = quantize_codes(w, opts.quant)
    return codes


def starting_codes(block, arch, inputs, linear_inputs: dict, opts) -> dict[str, dict]:
    """What the learned codes must beat: AWQ's own clipped codes, and GPTQ's on the scaled block, its
    Hessians from the windows the learned codes are tuned on (with the held-out ones in them as well,
    GPTQ's output MSE there was 4-6 % lower on the bundled model's blocks 0 and 1 at w3 g128, a head
    start in a comparison that is often closer than that). AWQ's clip search, one factor per group from
    a short grid, still reads every window."""
    fit = inputs.hidden.shape[0] - held_out(inputs.hidden.shape[0])
    return {
        "awq": awq_codes(block, arch, linear_inputs, opts),
        "gptq": gptq_in_order(copy.deepcopy(block), arch, replace(inputs, hidden=inputs.hidden[:fit]), opts),
    }


def awq_round_block(block, arch, inputs, opts):
    # Tuned from AWQ's scaled weights unclipped: the learned range factors clip (bundled model, w4 g128,
    # sequential: ppl / KL 50.634 / 0.00103 from the clipped weights, 50.614 / 0.00098 unclipped). The
    # offsets start at plain rounding unless --round-start gptq: with the end-to-end tuning, bundled w3
    # g128 50.750 / 0.00361 -> 50.719 / 0.00366, but SmolLM2 w3 g64 12.679 / 0.26139 -> 12.970 / 0.28255.
    stats, fp_out, linear_inputs = awq_search(block, arch, inputs, opts, clip=False)
    target = fp_out if inputs.fp_target is None else inputs.fp_target  # fp_out: the FP block on inputs.hidden
    starts = starting_codes(block, arch, inputs, linear_inputs, opts)
    warm = starts["gptq"] if opts.round_start == "gptq" else None
    codes, stats["round"] = tune(block, arch, inputs, opts, target, starts, warm)
    return codes, stats


def round_block(block, arch, inputs, opts):
    target = run_block(block, inputs.hidden, inputs.kwargs) if inputs.fp_target is None else inputs.fp_target
    codes, stats = tune(block, arch, inputs, opts, target)
    return codes, {"round": stats}


def round_table(stats: dict) -> list[dict]:
    """AWQ's scale rows (awq-round), then one row per block: the output MSE of its start and of the
    learned rounding, on the first signround.GUARD_SAMPLES tuning windows, and whether the held-out windows kept it."""
    rows = (
        scale_table({b: s for b, s in stats.items() if "groups" in s})
        if any("groups" in s for s in stats.values())
        else []
    )
    for block, s in sorted(stats.items(), key=lambda kv: int(kv[0])):
        r = s["round"]
        verdict = "kept" if r["kept"] else f"not kept: {r['start']}'s codes"
        rows.append({"block": int(block), "group": "learned rounding " + verdict,
                     "alpha": None, "loss_identity": float(f"{r['loss_before']:.4g}"),
                     "loss": float(f"{r['loss_after']:.4g}"), "scale_mean": None, "max_over_mean": None,
                     "share_over_5x_mean": None})  # fmt: skip
    return rows


ROUND_OPTIONS = ("round_steps", "round_lr", "round_batch_size", "round_dtype", "round_patience", "seed")
AWQ_ROUND = Method(
    "awq-round", awq_round_block, needs_inputs=True,
    options=(*AWQ_OPTIONS, *ROUND_OPTIONS, "round_start", *GPTQ_OPTIONS),
    table=round_table, fp_targets=True, mode="sequential", e2e_epochs=3,
)  # fmt: skip
ROUND = Method(
    "round", round_block, needs_inputs=True, options=ROUND_OPTIONS, table=round_table, fp_targets=True,
    mode="sequential",
)  # fmt: skip
