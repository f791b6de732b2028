import pytest
import torch

from awqflow.stages.clip import apply_clip, sample_tokens, search_clip
from awqflow.stages.quantize import QuantConfig, fake_quantize


def group_errors(w, x, qcfg, fp_w):
    """Error of each (row, group) partial product of Q(w) against the original weights fp_w."""
    g = qcfg.group_len(w.shape[1])
    xs = x.view(-1, w.shape[1] // g, g)
    ref = torch.einsum("tjg,ojg->otj", xs, fp_w.view(w.shape[0], -1, g))
    q = fake_quantize(w, qcfg).view(w.shape[0], -1, g)
    return (torch.einsum("tjg,ojg->otj", xs, q) - ref).pow(2).mean(dim=1)


@pytest.mark.parametrize("n_tokens", [100, 2000])  # fewer than 512 tokens must work too
def test_clip_never_increases_group_error(n_tokens):
    torch.manual_seed(0)
    w = torch.randn(72, 256)
    w[:, 7] *= 8  # a weight outlier per row: clipping pays off there
    x = torch.randn(n_tokens, 256)
    qcfg = QuantConfig(4, 64)
    best = search_clip(w, x, qcfg, memory_budget=1 << 20)  # small budget: several row batches
    assert best.shape == (72, 4)
    before = group_errors(w, sample_tokens(x, 512), qcfg, w)
    clipped = w.clone()
    apply_clip(clipped, best)
    after = group_errors(clipped, sample_tokens(x, 512), qcfg, w)
    assert torch.all(after <= before + 1e-6)
    assert (after < before * 0.99).any()
    assert torch.all(clipped.abs().view(72, 4, 64).amax(-1) <= best + 1e-6)


def test_sample_tokens():
    x = torch.arange(3000.0)[:, None].expand(3000, 4)
    assert sample_tokens(x, 512).shape == (512, 4)
    assert sample_tokens(x[:100], 512).shape == (100, 4)


def brute_force_clip(w, x, qcfg, n_grid=20, max_shrink=0.5):
    """AutoAWQ's formulation: every candidate's partial products over every sampled token."""
    g = qcfg.group_len(w.shape[1])
    xs = sample_tokens(x, 512).view(-1, w.shape[1] // g, g)
    wg = w.view(w.shape[0], -1, g)
    ref = torch.einsum("tjg,ojg->otj", xs, wg)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best = torch.zeros(wg.shape[:2])
    for i in range(int(n_grid * max_shrink)):
        max_val = (1 - i / n_grid) * wg.abs().amax(dim=-1)
        clipped = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None])
        q = fake_quantize(clipped.reshape(w.shape), qcfg).view_as(wg)
        err = (torch.einsum("tjg,ojg->otj", xs, q) - ref).pow(2).mean(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, max_val, best)
    return best


def test_gram_form_picks_the_ranges_of_the_forward_over_tokens():
    torch.manual_seed(1)
    w = torch.randn(96, 256)
    w[:, 3] *= 6
    x = torch.randn(1500, 256) * torch.linspace(0.2, 4.0, 256)
    qcfg = QuantConfig(3, 64)
    ours, theirs = search_clip(w, x, qcfg), brute_force_clip(w, x, qcfg)
    assert (ours == theirs).float().mean() > 0.99  # float sums in another order: a rare near-tie may flip
    assert (ours != w.view(96, 4, 64).abs().amax(-1)).any()  # some groups were clipped
