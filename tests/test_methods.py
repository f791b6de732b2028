"""The methods beyond AWQ (issues 16, 17): gptq, awq-gptq, awq-round, round. Registered like any other,
cached and resumed like AWQ, and their checkpoints decode through AutoAWQ's own decoder to exactly the
weights the method computed."""

import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from test_pack import autoawq_packing_utils

from awqflow import pipeline
from awqflow.options import Options
from awqflow.stages.block import awq_search, checkpoint_tensors, collect_linear_inputs
from awqflow.stages.calibration import held_out
from awqflow.stages.gptq import add_to_hessian, gptq_codes
from awqflow.stages.method import BlockInputs
from awqflow.stages.methods import method_named
from awqflow.stages.methods.gptq import awq_gptq_block, gptq_in_order, gptq_prefers_scales, output_error, record_inputs
from awqflow.stages.methods.learned_rounding import starting_codes
from awqflow.stages.model import open_model, run_block
from awqflow.stages.quantize import dequantize_codes
from awqflow.stages.scales import block_groups, grid_sample
from awqflow.storage.activations import ActivationStore

from conftest import CALIB

SMALL = dict(calib=str(CALIB), n_samples=8, seqlen=64, group_size=64, round_steps=20)
NEW = ["gptq", "awq-gptq", "awq-round", "round"]


def block_with_inputs(model_dir, work, index=1):
    """Block `index` of the model with its captured FP input and kwargs (via an AWQ run's store)."""
    result = pipeline.run(str(model_dir), str(work / "awq"), Options(work_dir=str(work / "w"), **SMALL))
    p = result["plan"]
    store = next((work / "w").glob("activations-*.zarr"))
    hidden = ActivationStore(str(store), mode="r").read(index)
    m = open_model(str(model_dir), p.model_fp)
    return m, BlockInputs(hidden, m.block_kwargs(hidden.shape[1], "cpu", torch.float32)[index])


def quantized_output_mse(m, inputs, method: str, opts) -> float:
    """The block's output error after `method`, against the FP block. A method's scales live in the
    block it returns (AWQ fuses 1/s into the norms), so its codes are put back into that block."""
    block = m.block(1, "cpu", torch.float32)
    codes, _ = method_named(method).quantize_block(block, m.arch, inputs, opts)
    for name, c in codes.items():
        block.get_submodule(name).weight.data = dequantize_codes(*c)
    target = run_block(m.block(1, "cpu", torch.float32), inputs.hidden, inputs.kwargs)
    return float((run_block(block, inputs.hidden, inputs.kwargs) - target).pow(2).mean())


def test_gptq_and_learned_rounding_lower_the_block_error_of_their_starting_point(tiny_model, tmp_path):
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    opts = Options(**{**SMALL, "w_bit": 3, "round_steps": 60})
    errors = {name: quantized_output_mse(m, inputs, name, opts) for name in ("rtn", "awq", *NEW)}
    assert errors["gptq"] < errors["rtn"] and errors["awq-gptq"] < errors["awq"], errors
    # learned rounding may overfit a few windows: held-out windows decide, so never worse than its start
    assert errors["round"] < errors["rtn"] and errors["awq-round"] <= errors["awq"], errors
    block = m.block(1, "cpu", torch.float32)
    _, stats = method_named("awq-round").quantize_block(block, m.arch, inputs, opts)
    assert stats["round"]["loss_after"] < 0.5 * stats["round"]["loss_before"]  # on the tuning windows


def test_learned_rounding_can_start_at_gptqs_codes(tiny_model, tmp_path):
    """--round-start gptq: the offsets start where they round every weight to GPTQ's code (no step taken:
    the learned codes are GPTQ's, their held-out loss GPTQ's), and the tuning goes on below it."""
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    opts = Options(**{**SMALL, "w_bit": 3, "round_start": "gptq", "round_steps": 0})
    _, stats = method_named("awq-round").quantize_block(m.block(1, "cpu", torch.float32), m.arch, inputs, opts)
    r = stats["round"]
    assert r["heldout_loss_learned"] == r["heldout_losses_start"]["gptq"] and r["kept"] is False
    # 4 windows a step: with the default 2, these 60 steps on 6 windows happen to end above the start (the guard's case)
    opts = Options(**{**SMALL, "w_bit": 3, "round_start": "gptq", "round_steps": 60, "round_batch_size": 4})
    _, stats = method_named("awq-round").quantize_block(m.block(1, "cpu", torch.float32), m.arch, inputs, opts)
    assert stats["round"]["loss_before"] == r["loss_before"] > stats["round"]["loss_after"]


def test_learned_rounding_that_loses_on_held_out_windows_keeps_the_better_start(tiny_model, tmp_path):
    """awq-round's learned codes must beat both AWQ's own codes and GPTQ's on the scaled block on the
    held-out windows; where they do not, the better of those two stands."""
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    opts = Options(**{**SMALL, "round_lr": 5.0})  # steps far too big: the tuning cannot win
    block = m.block(1, "cpu", torch.float32)
    starts = starting_codes(block, m.arch, inputs, awq_search(block, m.arch, inputs, opts, clip=False).inputs, opts)
    awq_codes, _ = method_named("awq").quantize_block(m.block(1, "cpu", torch.float32), m.arch, inputs, opts)
    assert all(torch.equal(a, b) for n in awq_codes for a, b in zip(starts["awq"][n], awq_codes[n]))
    codes, stats = method_named("awq-round").quantize_block(m.block(1, "cpu", torch.float32), m.arch, inputs, opts)
    r = stats["round"]
    assert r["kept"] is False and r["heldout_samples"] == 2
    assert r["start"] == min(r["heldout_losses_start"], key=r["heldout_losses_start"].get)
    assert all(torch.equal(a, b) for n in codes for a, b in zip(codes[n], starts[r["start"]][n]))


def test_gptqs_start_never_sees_the_held_out_windows(tiny_model, tmp_path):
    """The held-out windows judge GPTQ's codes against the learned ones, so, as for the learned codes,
    GPTQ's Hessians come from the other windows only: its codes are those of GPTQ on the tuning windows."""
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    opts = Options(**SMALL)
    block = m.block(1, "cpu", torch.float32)
    linear_inputs = awq_search(block, m.arch, inputs, opts, clip=False).inputs
    starts = starting_codes(block, m.arch, inputs, linear_inputs, opts)
    fit = replace(inputs, hidden=inputs.hidden[: inputs.hidden.shape[0] - held_out(inputs.hidden.shape[0])])
    on_fit, on_all = (gptq_in_order(copy.deepcopy(block), m.arch, i, opts) for i in (fit, inputs))
    assert held_out(inputs.hidden.shape[0]) == 2
    assert all(torch.equal(a, b) for n in on_fit for a, b in zip(starts["gptq"][n], on_fit[n]))
    assert not all(torch.equal(a, b) for n in on_all for a, b in zip(starts["gptq"][n], on_all[n]))


@pytest.mark.parametrize("method", NEW)
def test_checkpoint_decodes_through_autoawq_to_the_methods_weights(method, tiny_model, tmp_path):
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    block = m.block(1, "cpu", torch.float32)
    opts = Options(**SMALL, method=method)
    codes, _ = method_named(method).quantize_block(block, m.arch, inputs, opts)
    tensors = checkpoint_tensors(block, codes, opts.quant)
    decode = autoawq_packing_utils().dequantize_gemm
    for name, c in codes.items():
        ours = dequantize_codes(*c).half()
        theirs = decode(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], 4, 64)
        assert torch.equal(theirs.t(), ours), name


@pytest.mark.parametrize("method", ["awq-gptq", "awq-round"])
def test_rerun_recomputes_nothing_and_output_is_identical(method, tiny_model, tmp_path, monkeypatch):
    options = Options(method=method, work_dir=str(tmp_path / "w"), **SMALL)
    pipeline.run(str(tiny_model), str(tmp_path / "a"), options)
    calls = []
    original = pipeline.quantize_block
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    result = pipeline.run(str(tiny_model), str(tmp_path / "b"), options)
    assert calls == [] and set(result["stats"]) == {0, 1}
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_awq_gptq_leaves_awqs_clipping_out_and_its_cache_key_ignores_clip(tiny_model, tmp_path):
    """GPTQ weighs a clamp's error only if the weights reach it unclamped: awq-gptq runs AWQ's scale
    search alone, so --clip changes neither its codes nor its cache entries (it does change awq's)."""
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    runs = {}
    for method in ("awq", "awq-gptq"):
        for clip in (True, False):
            opts = Options(**SMALL, method=method, clip=clip)
            runs[method, clip] = method_named(method).quantize_block(
                m.block(1, "cpu", torch.float32), m.arch, inputs, opts
            )[0]
    same = lambda a, b: all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))
    assert same(runs["awq-gptq", True], runs["awq-gptq", False])
    assert not same(runs["awq", True], runs["awq", False])
    plan = pipeline.plan(str(tiny_model), Options(**SMALL, method="awq-gptq"))
    keys = {
        clip: replace(plan, options=Options(**SMALL, method="awq-gptq", clip=clip)).block_key(0)
        for clip in (True, False)
    }
    assert keys[True] == keys[False]


@pytest.mark.parametrize("method", ["awq", "awq-round"])
def test_sequential_learned_rounding_aims_at_the_fp_models_own_block_outputs(method, tiny_model, tmp_path, monkeypatch):
    """Sequential mode feeds block i the quantized blocks' output; learned rounding (fp_targets) is also
    given the FP model's output of block i, so it can make up for the error upstream (AutoRound's
    quantized inputs with FP targets). Other methods get none and keep llm-compressor's target."""
    m, fp_inputs = block_with_inputs(tiny_model, tmp_path, index=1)  # block 1's FP input = block 0's FP output
    seen = []
    real = method_named(method)
    record = lambda block, arch, inputs, opts: seen.append(inputs) or real.quantize_block(block, arch, inputs, opts)
    monkeypatch.setattr(pipeline.Plan, "method", property(lambda p: replace(real, quantize_block=record)))
    pipeline.run(str(tiny_model), str(tmp_path / "seq"), Options(**SMALL, method=method, mode="sequential"))
    assert len(seen) == 2 and not torch.allclose(seen[1].hidden, fp_inputs.hidden)  # block 1: quantized input
    if method == "awq":
        assert seen[0].fp_target is None and seen[1].fp_target is None
        return
    assert torch.equal(seen[0].fp_target, fp_inputs.hidden)
    fp_block_1 = run_block(m.block(1, "cpu", torch.float32), fp_inputs.hidden, fp_inputs.kwargs)
    assert torch.allclose(seen[1].fp_target, fp_block_1, atol=1e-6)


def test_learned_rounding_runs_sequential_unless_asked_otherwise(tiny_model):
    plan = pipeline.plan(str(tiny_model), Options(**SMALL, method="awq-round"))
    asked = {mode: Options(**SMALL, method="awq-round", mode=mode) for mode in ("sequential", "parallel")}
    assert plan.options.block_mode == "sequential" and Options(**SMALL).block_mode == "parallel"
    assert plan.block_key(0) == replace(plan, options=asked["sequential"]).block_key(0)
    assert plan.block_key(0) != replace(plan, options=asked["parallel"]).block_key(0)


def test_gptqs_error_with_scales_is_the_scaled_linears_own_output_error():
    """gptq_prefers_scales compares GPTQ with and without s in the FP linear's coordinates: w_hat / s
    against H(x) must be the scaled linear's error (x / s)(w s)^T - (x / s) w_hat^T, computed directly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.exp(torch.randn(64, generator=g))
    w, s = torch.randn(32, 64, generator=g), torch.exp(torch.randn(64, generator=g) / 2)
    qcfg = Options(group_size=32).quant
    h, _ = add_to_hessian(None, x, 0)
    w_hat = dequantize_codes(*gptq_codes(w * s, h / s[:, None] / s[None, :], qcfg))
    direct = ((x / s) @ (w * s).T - (x / s) @ w_hat.T).pow(2).sum() * 2 / x.shape[0]
    assert output_error(w, w_hat / s, h) == pytest.approx(float(direct), rel=1e-4)


def test_awq_gptq_turns_down_the_scales_gptq_does_better_without(tiny_model, tmp_path):
    """A group whose scales the accept test turns down keeps s = 1: with every group turned down,
    awq-gptq is gptq (the same codes, the norms untouched) and its statistics rows say alpha None, with
    the alpha it turned down. awq-gptq's test is GPTQ's output error on the group's linears with the
    scales against without."""
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    opts = Options(**{**SMALL, "w_bit": 3})
    block = m.block(1, "cpu", torch.float32)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    codes, stats = awq_gptq_block(block, m.arch, inputs, opts, accept=lambda group, s, x: (False, None))
    assert codes.keys() and all(s["alpha"] is None and "turned_down" in s for s in stats["groups"].values())
    assert len(stats["groups"]) == len(block_groups(block, m.arch))
    plain = gptq_in_order(m.block(1, "cpu", torch.float32), m.arch, inputs, opts)
    assert all(torch.equal(a, b) for n in plain for a, b in zip(codes[n], plain[n]))
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items() if "norm" in k)
    block = m.block(1, "cpu", torch.float32)
    group = block_groups(block, m.arch)[0]
    x = collect_linear_inputs(block, m.arch, inputs.hidden, inputs.kwargs)[0][group.linears[0]]
    h, _ = add_to_hessian(None, x, 0)
    accept = gptq_prefers_scales(block, opts)
    keep, codes = accept(group, torch.ones(x.shape[-1]), x)
    assert keep is False and codes.keys() == set(group.linears)  # a tie stays unscaled

    def gptq(s):
        ws = {name: block.get_submodule(name).weight.data.float() for name in group.linears}
        h_s = h / s[:, None] / s[None, :]
        codes = {n: gptq_codes(w * s, h_s, opts.quant, actorder=opts.gptq_actorder) for n, w in ws.items()}
        return sum(output_error(w, dequantize_codes(*codes[n]) / s, h) for n, w in ws.items()), codes

    for seed in range(4):
        s = torch.exp(torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(seed)))
        (with_s, codes_s), (without, codes_1) = gptq(s), gptq(torch.ones_like(s))
        keep, codes = accept(group, s, x)
        assert keep == (with_s < without), seed
        # the winner's codes, as GPTQ on each linear alone gives them
        for name, want in (codes_s if keep else codes_1).items():
            torch.testing.assert_close(dequantize_codes(*codes[name]), dequantize_codes(*want), atol=1e-6, rtol=0)


def test_awq_gptq_keeps_codes_and_block_in_step_where_a_quantized_linear_takes_the_scales(tiny_model, tmp_path):
    """With every group's scales kept, up -> down's 1/s lands on up_proj after GPTQ quantized it: its
    rows' scales take it (divide_rows). The codes returned decode to exactly the block's weights, so the
    checkpoint holds the block the method evaluated, and that block is closer to the FP one than RTN's."""
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    opts = Options(**{**SMALL, "w_bit": 3})
    block = m.block(1, "cpu", torch.float32)
    codes, stats = awq_gptq_block(block, m.arch, inputs, opts, accept=lambda group, s, x: (True, None))
    assert stats["groups"]["mlp.up_proj->mlp.down_proj"]["alpha"] is not None
    for name, c in codes.items():
        assert torch.equal(block.get_submodule(name).weight.data, dequantize_codes(*c)), name
    assert stats["output_mse_awq"] < stats["output_mse_rtn"], stats
    fp = run_block(m.block(1, "cpu", torch.float32), inputs.hidden, inputs.kwargs)
    rtn = quantized_output_mse(m, inputs, "rtn", opts)
    assert float((run_block(block, inputs.hidden, inputs.kwargs) - fp).pow(2).mean()) < rtn


def test_awq_gptq_searches_up_down_on_the_fp_input_of_down_proj_on_the_search_sample(tiny_model, tmp_path):
    """up -> down's scales are searched on down_proj's input as the block computes it with gate / up in
    full precision (recorded when the MLP's group is reached, before GPTQ quantizes them): on the tokens
    the search samples, that is the FP block's own input of down_proj."""
    m, inputs = block_with_inputs(tiny_model, tmp_path)
    block = m.block(1, "cpu", torch.float32)
    linear_inputs, _ = collect_linear_inputs(block, m.arch, inputs.hidden, inputs.kwargs)
    mlp, down = (
        next(g for g in block_groups(block, m.arch) if g.prev == p) for p in ("post_attention_layernorm", "mlp.up_proj")
    )
    max_tokens = 96
    recorded = record_inputs(block, mlp, [down], (linear_inputs["mlp.gate_proj"],), {}, max_tokens)[down.key]
    want = grid_sample(linear_inputs["mlp.down_proj"], max_tokens, per_token=True)
    assert recorded.shape == want.shape and want.shape[0] <= max_tokens
    torch.testing.assert_close(recorded, want)


def test_awq_gptq_records_a_followers_input_before_the_group_is_quantized(tiny_model, tmp_path, monkeypatch):
    """The input v -> o and up -> down are searched on is recorded with q / k / v and gate / up still in
    full precision: the accept test's codes go into the block only after (SmolLM2 w3 g64: ppl 18.172
    when they went in first, 17.785 after)."""
    import awqflow.stages.methods.gptq as gptq_module

    m, inputs = block_with_inputs(tiny_model, tmp_path)
    block = m.block(1, "cpu", torch.float32)
    weights_seen = {}

    def record(block, group, followers, args, kwargs, max_tokens):
        weights_seen.update({n: block.get_submodule(n).weight.detach().clone() for n in group.linears})
        return record_inputs(block, group, followers, args, kwargs, max_tokens)

    monkeypatch.setattr(gptq_module, "record_inputs", record)
    codes, _ = awq_gptq_block(block, m.arch, inputs, Options(**{**SMALL, "w_bit": 3}))
    assert {"mlp.gate_proj", "mlp.up_proj"} <= weights_seen.keys()
    for name, w in weights_seen.items():
        assert not torch.equal(w, dequantize_codes(*codes[name])), name
