"""End-to-end tuning after the blocks (issue 17): group scales and the blocks' 1-D parameters learn factors
against the FP model's logits, the codes fixed; the checkpoint computes what the tuning judged."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from awqflow import pipeline
from awqflow.load import load_model
from awqflow.options import Options
from awqflow.stages.block import checkpoint_tensors, load_block_tensors, scale_block_tensors
from awqflow.stages.calibration import calibration_windows, held_out
from awqflow.stages.end_to_end import BATCH, kl_to, mean_kl, reference_logits, tune_end_to_end, windows_kl
from awqflow.stages.quantize import QuantConfig, dequantize_codes, fake_quantize, quantize_codes

from conftest import CALIB

SMALL = dict(calib=str(CALIB), n_samples=8, seqlen=64, group_size=64, round_steps=5)


def windows_for(model_dir, n=8, seqlen=64):
    return calibration_windows(str(CALIB), AutoTokenizer.from_pretrained(model_dir), n, seqlen)


def quantized_copy(reference, qcfg):
    """A copy of the tiny model with its blocks' matrices fake-quantized, and the groups to tune."""
    model, groups = copy.deepcopy(reference), {}
    for name, t in model.model.layers.named_parameters():
        if t.dim() == 2:
            t.data = fake_quantize(t.data, qcfg)
        groups[f"model.layers.{name}"] = qcfg.group_len(t.shape[-1]) if t.dim() == 2 else 1
    return model, groups


def test_tuning_lowers_the_kl_it_trains_on_and_gives_the_model_back_unchanged(tiny_model):
    reference = load_model(str(tiny_model))
    model, groups = quantized_copy(reference, QuantConfig(3, 64))
    windows = windows_for(tiny_model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    factors, losses, judged = tune_end_to_end(reference, model, groups, windows, epochs=4, lr=1e-2)
    assert len(losses) == math.ceil(4 * 8 / BATCH) and set(factors) == set(groups) and judged == []
    assert model.state_dict().keys() == state.keys() and all(v.equal(state[k]) for k, v in model.state_dict().items())
    before = windows_kl(reference, model, windows)
    with torch.no_grad():
        for name, f in factors.items():
            t = model.get_parameter(name)
            t.mul_(f.repeat_interleave(groups[name], dim=-1))
    assert windows_kl(reference, model, windows) < 0.9 * before


@pytest.mark.parametrize("lr", [1e-2, 1.0])
def test_judged_tuning_returns_its_best_pass_and_stops_at_the_first_that_does_not_improve(tiny_model, lr):
    reference = load_model(str(tiny_model))
    model, groups = quantized_copy(reference, QuantConfig(3, 64))
    windows = windows_for(tiny_model, n=12)
    fit, judge = windows[:8], windows[8:]
    start = windows_kl(reference, model, judge)
    factors, losses, judged = tune_end_to_end(reference, model, groups, fit, epochs=4, lr=lr, judge=judge)
    assert judged[0] == pytest.approx(start, rel=1e-6)
    passes = len(judged) - 1
    assert len(losses) == math.ceil(8 / BATCH) * passes  # 8 windows, BATCH a step
    assert all(b < a for a, b in zip(judged[:-2], judged[1:-1]))  # every pass but the last improved
    assert passes == 4 or judged[-1] >= min(judged[:-1])
    with torch.no_grad():
        for name, f in factors.items():
            model.get_parameter(name).mul_(f.repeat_interleave(groups[name], dim=-1))
    assert windows_kl(reference, model, judge) == pytest.approx(min(judged), rel=1e-4)
    if lr == 1.0:  # a step this size only makes things worse: one pass, and the start comes back
        assert passes == 1 and all(bool((f == 1).all()) for f in factors.values())


def test_logits_computed_once_give_the_kl_of_a_reference_pass_per_step(tiny_model):
    reference = load_model(str(tiny_model))
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for t in model.model.layers.parameters():
            t.add_(0.02 * torch.randn_like(t))
    windows = windows_for(tiny_model)
    targets = reference_logits(reference, windows, torch.float32)
    assert targets.shape == (8, 63, reference.config.vocab_size) and targets.device.type == "cpu"
    log_p = F.log_softmax(targets.flatten(0, 1), dim=-1)
    with torch.no_grad():
        assert torch.allclose(kl_to(log_p, model, windows), mean_kl(reference, model, windows), rtol=1e-4)
    assert reference_logits(reference, windows, torch.bfloat16).dtype == torch.bfloat16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(128)
        self.proj = nn.Linear(128, 16)


@pytest.mark.parametrize("w_bit", [4, 3])
def test_factors_move_the_group_scales_and_leave_the_codes(w_bit):
    """What the tuning ran (the dequantized weight times the factor of its group) is what the tensors hold
    after the factors: the codes and zero points unchanged, each group still on 2^b levels."""
    torch.manual_seed(0)
    block, qcfg = Block(), QuantConfig(w_bit, 64)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 2)
    codes = {"proj": quantize_codes(block.proj.weight.data, qcfg)}
    tensors = checkpoint_tensors(block, codes, qcfg)
    factors = {"proj.weight": 1 + 0.05 * torch.randn(16, 2), "norm.weight": 1 + 0.05 * torch.randn(128)}
    factors["proj.bias"] = 1 + 0.05 * torch.randn(16)
    scaled = scale_block_tensors(tensors, factors)
    tuned = Block()
    load_block_tensors(tuned, scaled)
    ran = dequantize_codes(*codes["proj"]) * factors["proj.weight"].repeat_interleave(64, dim=1)
    torch.testing.assert_close(tuned.proj.weight, ran, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(tuned.norm.weight, tensors["norm.weight"] * factors["norm.weight"])
    torch.testing.assert_close(tuned.proj.bias, tensors["proj.bias"] * factors["proj.bias"])
    if w_bit == 4:
        assert scaled["proj.qweight"].equal(tensors["proj.qweight"]) and scaled["proj.qzeros"].equal(
            tensors["proj.qzeros"]
        )
    else:
        levels = [g.unique().numel() for g in scaled["proj.weight"].reshape(16, 2, 64).reshape(32, 64)]
        assert max(levels) <= 8


def test_awq_round_tunes_end_to_end_and_saves_what_the_held_out_windows_judged(tiny_model, tmp_path):
    result = pipeline.run(str(tiny_model), str(tmp_path / "q"), Options(method="awq-round", **SMALL))
    stats, held = result["end_to_end"], held_out(8)
    passes = len(stats["kl_per_pass"]) - 1  # the tuning stops at a pass that does not help
    per_pass, epochs = math.ceil((8 - held) / BATCH), Options(method="awq-round").end_to_end_epochs
    assert stats["steps"] == min(math.ceil(epochs * (8 - held) / BATCH), per_pass * passes) and stats["windows"] == held
    assert "end_to_end" in result["timings"]
    windows = windows_for(tiny_model)[8 - held :]
    saved = windows_kl(load_model(str(tiny_model)), load_model(str(tmp_path / "q")), windows)
    assert saved == pytest.approx(stats["kl_after"] if stats["kept"] else stats["kl_before"], rel=1e-3)
    assert stats["kept"]  # a few steps on the tiny model always help it
    plain = pipeline.run(str(tiny_model), str(tmp_path / "plain"), Options(method="awq-round", e2e_epochs=0, **SMALL))
    assert plain["end_to_end"] is None and "end_to_end" not in plain["timings"]
    a, b = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a if k.endswith((".qweight", ".qzeros")))
    assert not all(a[k].equal(b[k]) for k in a if k.endswith(".scales"))


def test_a_rerun_replays_the_tuning_and_a_tuning_cut_off_comes_back_bit_identical(tiny_model, tmp_path, monkeypatch):
    options = Options(method="awq-round", work_dir=str(tmp_path / "w"), **SMALL)
    first = pipeline.run(str(tiny_model), str(tmp_path / "a"), options)
    calls = []
    original = pipeline.tune_end_to_end
    monkeypatch.setattr(pipeline, "tune_end_to_end", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert pipeline.run(str(tiny_model), str(tmp_path / "b"), options)["end_to_end"] == first["end_to_end"]
    assert calls == []
    plan, cache = first["plan"], pipeline.BlockCache(str(tmp_path / "w" / "cache"))
    for i in range(plan.n_blocks):  # as if killed before the tuning stored its result
        for path in cache._paths(plan.end_to_end_key(i)):
            os.remove(path)
    pipeline.run(str(tiny_model), str(tmp_path / "c"), options)
    assert calls == [1]
    a, c = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == c.keys() and all(a[k].equal(c[k]) for k in a)


def test_end_to_end_tuning_needs_a_method_with_calibration():
    with pytest.raises(ValueError, match="(?s)e2e_epochs.*end-to-end tuning needs calibration windows"):
        Options(method="rtn", e2e_epochs=1)
    assert Options(method="awq-round").end_to_end_epochs == 3 and Options().end_to_end_epochs == 0
    assert Options(method="awq", e2e_epochs=2).end_to_end_epochs == 2
