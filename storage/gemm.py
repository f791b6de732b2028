"""AutoAWQ "GEMM" packing (SPEC §6): int32 words holding eight 4-bit codes along the output dim.

qweight (in, out/8) int32, qzeros (in/G, out/8) int32, scales (in/G, out) fp16.
Nibble i (bits 4i..4i+3) of word j holds output column 8j + AWQ_ORDER[i].
"""

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_BITS = 4
PER_WORD = 32 // PACK_BITS


def pack_columns(x: torch.Tensor, order=AWQ_ORDER) -> torch.Tensor:
    """(rows, cols) codes in [0, 16) -> (rows, cols/8) int32, nibble i of word j holding column
    8j + order[i] (AWQ's interleaved order; compressed-tensors packs in sequence)."""
    rows, cols = x.shape
    if cols % PER_WORD:
        raise ValueError(f"out_features={cols} is not divisible by {PER_WORD}: the GEMM layout cannot hold it")
    x = x.to(torch.int64).reshape(rows, cols // PER_WORD, PER_WORD)[..., list(order)]
    shifts = torch.arange(0, 32, PACK_BITS, dtype=torch.int64, device=x.device)
    words = (x << shifts).sum(dim=-1)
    # two's complement reinterpretation of the unsigned 32-bit word
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_columns(words: torch.Tensor, order=AWQ_ORDER) -> torch.Tensor:
    """Inverse of pack_columns: (rows, cols/8) int32 -> (rows, cols) int32 codes."""
    shifts = torch.arange(0, 32, PACK_BITS, dtype=torch.int32, device=words.device)
    nibbles = (words[..., None] >> shifts) & 0xF  # nibble i, in storage order
    inverse = [order.index(c) for c in range(PER_WORD)]
    return nibbles[..., inverse].reshape(words.shape[0], -1)


def pack_gemm(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """Codes (out, in), scales/zeros (out, in/G) as from quantize_codes -> qweight, qzeros, scales."""
    if codes.max() >= 2**PACK_BITS or codes.min() < 0:
        raise ValueError("codes must lie in [0, 16): the GEMM layout holds 4-bit codes only")
    qweight = pack_columns(codes.t().contiguous())
    qzeros = pack_columns(zeros.t().contiguous())
    return qweight, qzeros, scales.t().contiguous().to(torch.float16)


def unpack_gemm(qweight: torch.Tensor, qzeros: torch.Tensor):
    """qweight (in, out/8), qzeros (in/G, out/8) -> codes (in, out), zeros (in/G, out), int32."""
    return unpack_columns(qweight), unpack_columns(qzeros)


def dequantize_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed tensors -> dense weight (in, out) in the scales' dtype: (q - z) * s."""
    codes, zeros = unpack_gemm(qweight, qzeros)
    group = codes.shape[0] // scales.shape[0]
    z = zeros.repeat_interleave(group, dim=0)
    s = scales.repeat_interleave(group, dim=0)
    return ((codes - z).to(s.dtype)) * s
