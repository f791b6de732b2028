import pytest
import torch

from awqflow.stages.quantize import QuantConfig, dequantize_codes, fake_quantize, quantize_codes


def test_asymmetric_matches_spec_formula():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    cfg = QuantConfig(4, 64, True)
    codes, scales, zeros = quantize_codes(w, cfg)
    wg = w.view(16, 4, 64)
    mx, mn = wg.amax(-1), wg.amin(-1)
    s = ((mx - mn).clamp(min=1e-5) / 15).half().float()
    z = (-torch.round(mn / s)).clamp(0, 15)
    q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, 15)
    assert torch.equal(scales, s) and torch.equal(zeros, z.int()) and torch.equal(codes, q.view(16, 256).int())
    assert codes.min() >= 0 and codes.max() <= 15
    # error is at most half a step per element, except where clamping the zero point bites
    err = (fake_quantize(w, cfg) - w).abs().view(16, 4, 64)
    assert (err <= s[..., None] * 0.5 + 1e-6).float().mean() > 0.99


@pytest.mark.parametrize("bits", [3, 4])
def test_symmetric_uses_signed_range_with_fixed_zero(bits):
    torch.manual_seed(1)
    w = torch.randn(8, 128)
    codes, scales, zeros = quantize_codes(w, QuantConfig(bits, 128, False))
    half = 2 ** (bits - 1)
    assert torch.all(zeros == half)
    signed = codes - half
    assert signed.min() >= -half and signed.max() <= half - 1
    expected = (w.abs().amax(dim=1, keepdim=True) / (half - 1)).half().float()
    assert torch.equal(scales, expected)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_fewer_bits_and_bigger_groups_cost_accuracy(bits, group):
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    err = (fake_quantize(w, QuantConfig(bits, group)) - w).pow(2).mean()
    assert 0 < err < (0.02 if bits == 4 else 0.08)
    finer = (fake_quantize(w, QuantConfig(bits, 32)) - w).pow(2).mean()
    assert finer <= err + 1e-9


def test_whole_row_group_has_one_scale_per_row():
    codes, scales, zeros = quantize_codes(torch.randn(4, 96), QuantConfig(4, -1))
    assert scales.shape == (4, 1) and zeros.shape == (4, 1)
    assert dequantize_codes(codes, scales, zeros).shape == (4, 96)


def test_bad_configs_fail_early_with_the_fix():
    with pytest.raises(ValueError, match="w_bit=2"):
        QuantConfig(2, 128)
    with pytest.raises(ValueError, match="group_size=100"):
        QuantConfig(4, 100)
    with pytest.raises(ValueError, match="in_features=96 is not divisible by group_size=64"):
        quantize_codes(torch.randn(4, 96), QuantConfig(4, 64))
