import logging

import pytest
import torch

from awqflow.stages.gptq import add_to_hessian, gptq_codes
from awqflow.stages.quantize import QuantConfig, dequantize_codes, fake_quantize, quantize_codes
from awqflow.storage.gemm import dequantize_gemm, pack_gemm, unpack_gemm

N_TOK, IN, OUT = 384, 256, 64


def correlated_layer(seed=0, n=N_TOK, d=IN, o=OUT):
    """Inputs mixed by a random matrix (H far from diagonal) and a weight to quantize."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)
    w = 0.05 * torch.randn(o, d, generator=g)
    return x, w


def output_err(x, w, w_hat):
    return (x @ w.t() - x @ w_hat.t()).norm().item()


def naive_gptq(w, h, qcfg, damp=0.01, actorder=False):
    """Textbook OBS form in float64, no Cholesky and no blocks: after rounding column i, move every
    later column by -err * Hinv[i, j] / Hinv[i, i], then eliminate i from Hinv. With actorder the
    columns go by descending diag(H), each group's range fixed beforehand from the original weights."""
    g = qcfg.group_len(w.shape[1])
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if actorder else torch.arange(w.shape[1])
    _, static_s, static_z = quantize_codes(w.float(), qcfg)
    w = w.double().clone()[:, order]
    h = h.double().clone()[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    qmax = 2**qcfg.w_bit - 1
    one_group = QuantConfig(qcfg.w_bit, -1, qcfg.zero_point)
    codes = torch.empty(w.shape, dtype=torch.int32)
    for i, col in enumerate(order.tolist()):
        if actorder:
            s, z = static_s[:, col // g].double(), static_z[:, col // g].double()
        elif i % g == 0:
            _, s, z = quantize_codes(w[:, i : i + g].float(), one_group)
            s, z = s[:, 0].double(), z[:, 0].double()
        q = (torch.round(w[:, i] / s) + z).clamp(0, qmax)
        codes[:, col] = q.int()
        err = w[:, i] - (q - z) * s
        w[:, i + 1 :] -= (err / hinv[i, i])[:, None] * hinv[i, i + 1 :][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return codes


CFGS = [QuantConfig(4, 128, True), QuantConfig(3, 64, True), QuantConfig(4, 128, False)]


@pytest.mark.parametrize("actorder", [False, True], ids=["natural", "actorder"])
@pytest.mark.parametrize("qcfg", CFGS, ids=["w4g128", "w3g64", "w4g128sym"])
def test_gptq_beats_rtn_on_correlated_inputs(qcfg, actorder):
    x, w = correlated_layer()
    h, n = add_to_hessian(None, x, 0)
    w_gptq = dequantize_codes(*gptq_codes(w, h, qcfg, name="mlp.down_proj", actorder=actorder))
    ratio = output_err(x, w, w_gptq) / output_err(x, w, fake_quantize(w, qcfg))
    logging.getLogger(__name__).info("GPTQ / RTN output error %s: %.3f", qcfg, ratio)
    assert ratio < 0.8  # measured ~0.67-0.69


def test_add_to_hessian_streams_to_the_full_mean():
    x, _ = correlated_layer()
    h, n = None, 0
    for part in x.to(torch.float16).split([100, 0, 200, 84]):  # uneven, with an empty batch
        h, n = add_to_hessian(h, part, n, chunk_tokens=64)
    xf = x.to(torch.float16).float()
    assert n == N_TOK and h.dtype == torch.float32
    torch.testing.assert_close(h, 2 / N_TOK * xf.t() @ xf, rtol=1e-4, atol=1e-5)
    # (batch, seq, in) inputs are flattened to tokens
    h3, n3 = add_to_hessian(None, xf.view(4, -1, IN), 0)
    assert n3 == N_TOK
    torch.testing.assert_close(h3, h, rtol=1e-4, atol=1e-5)


def test_matches_textbook_obs_gptq():
    """The Cholesky + lazy-block form computes the same rounding as the explicit OBS updates."""
    x, w = correlated_layer(seed=3, d=128, o=32)
    h, _ = add_to_hessian(None, x, 0)
    qcfg = QuantConfig(4, 32, True)
    codes, _, _ = gptq_codes(w, h, qcfg, block_size=48)  # blocks not aligned with groups
    ref = naive_gptq(w, h, qcfg)
    assert (codes == ref).float().mean() > 0.99  # float32 vs float64: rare ties may flip


def test_actorder_matches_textbook_obs_in_activation_order():
    """Static activation order: columns by descending diag(H), each group's (scale, zero) exactly
    plain rounding's, so the layout (consecutive groups, no g_idx) is what every other method writes."""
    x, w = correlated_layer(seed=3, d=128, o=32)
    x = x * torch.linspace(0.2, 3.0, 128)[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    h, _ = add_to_hessian(None, x, 0)
    qcfg = QuantConfig(4, 32, True)
    codes, scales, zeros = gptq_codes(w, h, qcfg, block_size=48, actorder=True)
    _, rtn_scales, rtn_zeros = quantize_codes(w, qcfg)
    assert torch.equal(scales, rtn_scales) and torch.equal(zeros, rtn_zeros)
    ref = naive_gptq(w, h, qcfg, actorder=True)
    assert (codes == ref).float().mean() > 0.99
    assert (codes != naive_gptq(w, h, qcfg)).float().mean() > 0.05  # the order did change the rounding


def test_actorder_lowers_the_output_error_on_uneven_inputs():
    """Inputs of very different energy (as in LLMs, where a few channels carry outliers): quantizing
    the strong ones first, while many columns remain to absorb their error, beats the natural order."""
    errs = {True: 0.0, False: 0.0}
    for seed in range(3):
        x, w = correlated_layer(seed=seed)
        x = x * torch.logspace(-1, 1, IN)[torch.randperm(IN, generator=torch.Generator().manual_seed(seed))]
        h, _ = add_to_hessian(None, x, 0)
        for actorder in errs:
            errs[actorder] += output_err(
                x, w, dequantize_codes(*gptq_codes(w, h, QuantConfig(3, 64), actorder=actorder))
            )
    assert errs[True] < 0.95 * errs[False], errs


@pytest.mark.parametrize("qcfg", CFGS + [QuantConfig(4, -1, True)], ids=["w4g128", "w3g64", "w4g128sym", "w4row"])
def test_block_size_does_not_change_the_result(qcfg):
    """Blocks only batch the updates (groups may start mid-block or span blocks)."""
    x, w = correlated_layer(seed=1)
    h, _ = add_to_hessian(None, x, 0)
    a = gptq_codes(w, h, qcfg, block_size=128)
    b = gptq_codes(w, h, qcfg, block_size=48)
    assert (a[0] == b[0]).float().mean() > 0.999
    torch.testing.assert_close(a[1], b[1], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "qcfg",
    [QuantConfig(4, 128, True), QuantConfig(4, 64, False), QuantConfig(3, 64, True)],
    ids=["w4g128", "w4g64sym", "w3g64"],
)
@pytest.mark.parametrize("actorder", [False, True], ids=["natural", "actorder"])
def test_output_format_matches_quantize_codes_and_gemm_roundtrips(qcfg, actorder):
    x, w = correlated_layer(seed=2)
    h, _ = add_to_hessian(None, x, 0)
    codes, scales, zeros = gptq_codes(w.half(), h, qcfg, actorder=actorder)
    rc, rs, rz = quantize_codes(w.half(), qcfg)
    for ours, theirs in ((codes, rc), (scales, rs), (zeros, rz)):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    qmax = 2**qcfg.w_bit - 1
    assert codes.min() >= 0 and codes.max() <= qmax
    assert zeros.min() >= 0 and zeros.max() <= qmax
    if not qcfg.zero_point:
        assert torch.all(zeros == 2 ** (qcfg.w_bit - 1))
    assert torch.equal(scales, scales.half().float()) and torch.all(scales > 0)
    if qcfg.w_bit == 4:
        qweight, qzeros, s16 = pack_gemm(codes, scales, zeros)
        c2, z2 = unpack_gemm(qweight, qzeros)
        assert torch.equal(c2.t(), codes) and torch.equal(z2.t(), zeros)
        assert torch.equal(dequantize_gemm(qweight, qzeros, s16).t(), dequantize_codes(codes, scales, zeros).half())


@pytest.mark.parametrize("actorder", [False, True], ids=["natural", "actorder"])
@pytest.mark.parametrize("qcfg", CFGS + [QuantConfig(4, -1, False)], ids=["w4g128", "w3g64", "w4g128sym", "w4rowsym"])
def test_diagonal_hessian_gives_exactly_rtn(qcfg, actorder):
    """With H diagonal the factor of H^-1 is diagonal: no error reaches other columns, so GPTQ is
    plain rounding, bit for bit, whatever the per-input weights (and whatever the column order)."""
    _, w = correlated_layer(seed=4)
    for h in (torch.eye(IN), torch.diag(torch.rand(IN) + 0.1)):
        got = gptq_codes(w, h, qcfg, block_size=48, actorder=actorder)
        want = quantize_codes(w, qcfg)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("actorder", [False, True], ids=["natural", "actorder"])
def test_dead_input_column_is_zeroed_without_nan(actorder):
    x, w = correlated_layer(seed=5)
    dead = [3, 130, 200]
    x[:, dead] = 0
    h, _ = add_to_hessian(None, x, 0)
    w[:, dead] = 10.0  # big, would dominate its group's range if it were kept
    qcfg = QuantConfig(4, 128, True)
    codes, scales, zeros = gptq_codes(w, h, qcfg, actorder=actorder)
    w_hat = dequantize_codes(codes, scales, zeros)
    assert torch.isfinite(w_hat).all() and torch.isfinite(scales).all()
    assert torch.all(w_hat[:, dead] == 0)
    assert scales.max() < 1.0  # the dead weights did not set the range
    ratio = output_err(x, w, w_hat) / output_err(x, w, fake_quantize(w, qcfg))
    assert ratio < 0.5  # RTN wastes the range on the dead inputs


def test_nan_hessian_raises_naming_the_layer():
    _, w = correlated_layer()
    h = torch.eye(IN)
    h[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.up_proj.*raise damp or use more calibration samples"):
        gptq_codes(w, h, QuantConfig(), name="model.layers.3.mlp.up_proj")


def test_indefinite_hessian_raises_after_damping_retries(caplog):
    _, w = correlated_layer()
    h = torch.eye(IN)
    h[0, 1] = h[1, 0] = 10.0  # eigenvalue -9: no damping up to mean(diag) can fix it
    with caplog.at_level(logging.WARNING, logger="awqflow.stages.gptq"):
        with pytest.raises(ValueError, match=r"'attn.o_proj'.*raise damp"):
            gptq_codes(w, h, QuantConfig(), name="attn.o_proj")
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2  # 0.01 -> 0.1 -> 1.0


def test_slightly_indefinite_hessian_recovers_with_more_damping(caplog):
    x, w = correlated_layer(seed=6)
    h, _ = add_to_hessian(None, x, 0)
    lam_min = torch.linalg.eigvalsh(h.double())[0].item()
    # push the smallest eigenvalue to -5% of mean(diag H): 1% damping fails, 10% succeeds
    h = h - (lam_min + 0.05 * torch.diag(h).mean()) * torch.eye(IN)
    with caplog.at_level(logging.WARNING, logger="awqflow.stages.gptq"):
        codes, scales, zeros = gptq_codes(w, h, QuantConfig(), name="q_proj")
    assert any("q_proj" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(dequantize_codes(codes, scales, zeros)).all()


def test_group_whole_row():
    x, w = correlated_layer(seed=7)
    h, _ = add_to_hessian(None, x, 0)
    qcfg = QuantConfig(4, -1, True)
    codes, scales, zeros = gptq_codes(w, h, qcfg)
    assert scales.shape == (OUT, 1) and zeros.shape == (OUT, 1) and codes.shape == (OUT, IN)
    w_hat = dequantize_codes(codes, scales, zeros)
    assert output_err(x, w, w_hat) < 0.8 * output_err(x, w, fake_quantize(w, qcfg))


def test_bad_shapes_raise():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="not divisible by group_size=64"):
        gptq_codes(w, torch.eye(96), QuantConfig(4, 64, True))
    with pytest.raises(ValueError, match="Hessian"):
        gptq_codes(torch.randn(8, 128), torch.eye(64), QuantConfig(4, 64, True), name="x")
