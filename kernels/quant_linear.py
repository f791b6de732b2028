"""A linear layer that runs straight from the AutoAWQ GEMM tensors (qweight, qzeros, scales).

forward dispatches: CUDA fp16/bf16 activations with a working triton -> the W4A16 Triton kernels
(split-K for decode-sized M, tiled GEMM otherwise); anything else -> the torch reference, which
dequantizes the whole weight. Triton is imported on first CUDA use only, so CPU-only installs
without a working triton never touch it. AWQFLOW_DISABLE_TRITON=1 forces the reference.
AWQFLOW_FORCE_TRITON=1 under TRITON_INTERPRET=1 sends CPU tensors through the kernels (tests only).
"""

import os

import torch
from torch import nn

from awqflow.kernels.configs import SPLITK_MAX_M
from awqflow.kernels.reference import w4a16_matmul_reference
from awqflow.storage.gemm import PER_WORD

_KERNELS = None  # (gemm, splitk) once imported, False if triton is unusable


def triton_kernels():
    """The two kernel wrappers, or None when triton cannot be imported here."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from awqflow.kernels.w4a16_gemm import w4a16_gemm
            from awqflow.kernels.w4a16_splitk import w4a16_splitk

            _KERNELS = (w4a16_gemm, w4a16_splitk)
        except Exception:  # ImportError, or a triton build that fails at import
            _KERNELS = False
    return _KERNELS or None


def use_triton(x: torch.Tensor) -> bool:
    # AWQFLOW_FORCE_TRITON=1 with TRITON_INTERPRET=1 runs the kernels on CPU tensors (end-to-end tests)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("AWQFLOW_FORCE_TRITON") == "1"
    return (
        (x.is_cuda or interpreted)
        and x.dtype in (torch.float16, torch.bfloat16)
        and os.environ.get("AWQFLOW_DISABLE_TRITON", "0") in ("", "0")
        and triton_kernels() is not None
    )


class QuantLinear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, group_size: int, bias: bool, device=None, dtype=torch.float16
    ):
        super().__init__()
        group = in_features if group_size == -1 else group_size
        if in_features % group or out_features % PER_WORD:
            raise ValueError(
                f"QuantLinear({in_features}, {out_features}) does not fit group {group_size} / 8-column packing"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group
        self.register_buffer(
            "qweight", torch.zeros(in_features, out_features // PER_WORD, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(in_features // group, out_features // PER_WORD, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(in_features // group, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_packed(cls, qweight, qzeros, scales, bias=None):
        in_features, out_features = qweight.shape[0], scales.shape[1]
        layer = cls(
            in_features,
            out_features,
            in_features // scales.shape[0],
            bias is not None,
            device=qweight.device,
            dtype=scales.dtype,
        )
        layer.qweight.copy_(qweight)
        layer.qzeros.copy_(qzeros)
        layer.scales.copy_(scales)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            gemm, splitk = triton_kernels()
            m = x.numel() // self.in_features
            kernel = splitk if m <= SPLITK_MAX_M else gemm
            # The kernels add the bias in fp32 whatever its dtype: no per-call cast needed.
            return kernel(x, self.qweight, self.qzeros, self.scales, self.group_size, bias=self.bias)
        # Reference path: dequantize the whole weight, then a dense matmul in x's dtype.
        return w4a16_matmul_reference(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
