"""compressed-tensors "pack-quantized" export (SPEC §6), llm-compressor's W4A16 format, which vLLM and
transformers (with the compressed-tensors package) load.

Per linear: weight_packed int32 (out, in/8), eight 4-bit codes per word in sequence along in
(nibble i = column 8j + i), each code the signed value + 8, which is exactly AWQ's unsigned code;
weight_scale (out, in/G); weight_zero_point (out/8, in/G), the signed zeros + 8 packed the same way
along out; weight_shape [out, in]. So q_ct - z_ct = q_awq - z_awq and w = (q - z) * s is unchanged.
"""

import torch

from awqflow.stages.quantize import QuantConfig
from awqflow.storage.gemm import pack_columns, pack_gemm, unpack_columns, unpack_gemm

SEQUENTIAL = tuple(range(8))
CT_VERSION = "0.20.0"  # the compressed-tensors release this layout was checked against (tests/test_export.py)


def quantization_config(qcfg: QuantConfig, ignore) -> dict:
    weights = {
        "num_bits": qcfg.w_bit,
        "type": "int",
        "symmetric": not qcfg.zero_point,
        "strategy": "group" if qcfg.group_size != -1 else "channel",
        "group_size": qcfg.group_size if qcfg.group_size != -1 else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": CT_VERSION,
    }


def from_gemm(tensors: dict[str, torch.Tensor], zero_point: bool = True) -> dict[str, torch.Tensor]:
    """A block's tensors in the GEMM layout -> the same linears in the pack-quantized layout; other
    tensors pass through. Symmetric weights (a fixed zero of 8, i.e. 0 signed) store no zero point."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".qzeros", ".scales")):
            continue
        if not name.endswith(".qweight"):
            out[name] = t
            continue
        module = name[: -len(".qweight")]
        codes, zeros = unpack_gemm(t, tensors[f"{module}.qzeros"])  # (in, out), (in/G, out)
        out[f"{module}.weight_packed"] = pack_columns(codes.t().contiguous(), SEQUENTIAL)
        out[f"{module}.weight_scale"] = tensors[f"{module}.scales"].t().contiguous()
        if zero_point:
            out[f"{module}.weight_zero_point"] = pack_columns(zeros.contiguous(), SEQUENTIAL).t().contiguous()
        out[f"{module}.weight_shape"] = torch.tensor([codes.shape[1], codes.shape[0]])
    return out


def to_gemm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of from_gemm, for loading a pack-quantized checkpoint with the GEMM QuantLinear."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")):
            continue
        if not name.endswith(".weight_packed"):
            out[name] = t
            continue
        module = name[: -len(".weight_packed")]
        codes = unpack_columns(t, SEQUENTIAL)  # (out, in)
        scales = tensors[f"{module}.weight_scale"]  # (out, in/G)
        zp = tensors.get(f"{module}.weight_zero_point")
        zeros = (
            unpack_columns(zp.t().contiguous(), SEQUENTIAL).t()
            if zp is not None
            else torch.full_like(codes[:, : scales.shape[1]], 8)
        )
        qweight, qzeros, _ = pack_gemm(codes, scales, zeros)
        out.update(
            {f"{module}.qweight": qweight, f"{module}.qzeros": qzeros, f"{module}.scales": scales.t().contiguous()}
        )
    return out
