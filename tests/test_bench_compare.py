"""The bench's paired comparison: per-window figures that add up to the reported ones, and the change
against another method with the standard error of the per-window differences."""

import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from anchor_eval import evaluate  # noqa: E402
from compare_llmcompressor import paired_change  # noqa: E402


def test_window_figures_average_to_the_reported_ones(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).float()
    other = AutoModelForCausalLM.from_pretrained(tiny_model).float()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    windows = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    r = evaluate(other, windows, reference=model)
    assert len(r["window_nll"]) == len(r["window_kl"]) == 3
    assert sum(r["window_nll"]) / 3 == pytest.approx(r["nll"], rel=1e-5)
    assert sum(r["window_kl"]) / 3 == pytest.approx(r["kl_mean"], rel=1e-5)
    assert r["kl_mean"] > 0 and len(set(r["window_kl"])) == 3


def test_paired_change_cancels_what_the_windows_share():
    base = {"window_nll": [3.0, 4.0, 5.0, 6.0], "window_kl": [0.01, 0.02, 0.03, 0.04]}
    # the same shift on every window: an exact change, no noise, however much the windows differ
    shifted = {"window_nll": [x + 0.01 for x in base["window_nll"]], "window_kl": [x * 0.9 for x in base["window_kl"]]}
    change, se = paired_change(shifted, base, "window_nll")
    assert change == pytest.approx(math.expm1(0.01)) and se == pytest.approx(0, abs=1e-12)
    change, se = paired_change(shifted, base, "window_kl")
    assert change == pytest.approx(-0.1) and se > 0  # KL differences scale with the window's KL
    noisy = {"window_nll": [3.02, 3.99, 5.01, 5.98]}
    change, se = paired_change(noisy, base, "window_nll")
    spread = math.sqrt((0.02**2 + 0.01**2 + 0.01**2 + 0.02**2) / 3)  # sample std of the differences, mean 0
    assert change == pytest.approx(0, abs=1e-12) and se == pytest.approx(spread / 2)
    assert paired_change(noisy, base, "window_kl") is None and paired_change(noisy, {}, "window_nll") is None
