"""Torch reference for the W4A16 kernels: dequantize the whole weight, then one dense matmul.

It materialises the full (K, N) weight, which is exactly what the Triton kernels avoid; it is the
correctness oracle for them and the fallback where they cannot run (CPU, no triton).
"""

import torch

from awqflow.storage.gemm import dequantize_gemm


def resolve_group(group_size: int, k: int, n_groups: int) -> int:
    """group_size -1 means one group spanning all of K; check it against the scales' rows."""
    group = k if group_size in (-1, None) else int(group_size)
    if group <= 0 or k % group or k // group != n_groups:
        raise ValueError(f"group_size={group_size} does not fit K={k} with {n_groups} scale rows")
    return group


def w4a16_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
):
    """x (..., K) @ dequant(W) (K, N) [+ bias] in x's dtype. W = (q - z) * s, rounded to s's dtype first."""
    resolve_group(group_size, qweight.shape[0], scales.shape[0])
    # Same rounding chain as the kernels: (q - z) * s in fp16, then cast to the activation dtype.
    w = dequantize_gemm(qweight, qzeros, scales).to(x.dtype)
    out = x @ w
    return out if bias is None else out + bias.to(x.dtype)
