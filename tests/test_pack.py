import importlib.util

import pytest
import torch

from awqflow.stages.quantize import QuantConfig, fake_quantize, quantize_codes
from awqflow.storage.gemm import AWQ_ORDER, dequantize_gemm, pack_gemm, unpack_gemm


def autoawq_packing_utils():
    """AutoAWQ's own GEMM decoder (installed by the test command with --no-deps), loaded without
    importing the awq package (its __init__ needs GPU-era transformers)."""
    spec = importlib.util.find_spec("awq")
    assert spec is not None, "autoawq is not installed: the test command installs autoawq==0.2.9 --no-deps"
    path = spec.submodule_search_locations[0] + "/utils/packing_utils.py"
    mod_spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_nibble_order_matches_spec():
    codes = torch.arange(8, dtype=torch.int32).view(8, 1) + 1  # out=8 rows, in=1
    qweight, _, _ = pack_gemm(codes, torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.int32))
    word = int(qweight[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [AWQ_ORDER[i] + 1 for i in range(8)]


@pytest.mark.parametrize("out_f,in_f,group", [(64, 128, 32), (200, 256, 128), (8, 64, -1)])
def test_pack_unpack_is_bit_exact(out_f, in_f, group):
    torch.manual_seed(0)
    n_groups = 1 if group == -1 else in_f // group
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
    zeros = torch.randint(0, 16, (out_f, n_groups), dtype=torch.int32)
    scales = torch.rand(out_f, n_groups) + 0.01
    qweight, qzeros, s = pack_gemm(codes, scales, zeros)
    assert qweight.shape == (in_f, out_f // 8) and qweight.dtype == torch.int32
    assert qzeros.shape == (n_groups, out_f // 8) and s.shape == (n_groups, out_f) and s.dtype == torch.float16
    c2, z2 = unpack_gemm(qweight, qzeros)
    assert torch.equal(c2, codes.t()) and torch.equal(z2, zeros.t())


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_autoawq_decoder_reads_our_checkpoint_tensors(zero_point, group):
    utils = autoawq_packing_utils()
    torch.manual_seed(3)
    w = (torch.randn(264, 256) * 0.05).half()
    cfg = QuantConfig(4, group, zero_point)
    qweight, qzeros, scales = pack_gemm(*quantize_codes(w, cfg))
    theirs = utils.dequantize_gemm(qweight, qzeros, scales, 4, group)  # (in, out), fp16
    assert torch.equal(theirs.t(), fake_quantize(w, cfg))
    assert torch.equal(dequantize_gemm(qweight, qzeros, scales), theirs)


def test_out_features_not_multiple_of_8_is_refused():
    with pytest.raises(ValueError, match="not divisible by 8"):
        pack_gemm(torch.zeros(12, 32, dtype=torch.int32), torch.ones(12, 1), torch.zeros(12, 1, dtype=torch.int32))
