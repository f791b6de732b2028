"""A linear layer that runs straight from the AutoAWQ GEMM tensors (qweight, qzeros, scales)."""

import torch
from torch import nn

from awqflow.stages.pack import PER_WORD, dequantize_gemm


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool,
                 device=None, dtype=torch.float16):
        super().__init__()
        group = in_features if group_size == -1 else group_size
        if in_features % group or out_features % PER_WORD:
            raise ValueError(f"QuantLinear({in_features}, {out_features}) does not fit group {group_size} / 8-column packing")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group
        self.register_buffer("qweight", torch.zeros(in_features, out_features // PER_WORD, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(in_features // group, out_features // PER_WORD, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(in_features // group, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_packed(cls, qweight, qzeros, scales, bias=None):
        in_features, out_features = qweight.shape[0], scales.shape[1]
        layer = cls(in_features, out_features, in_features // scales.shape[0], bias is not None,
                    device=qweight.device, dtype=scales.dtype)
        layer.qweight.copy_(qweight)
        layer.qzeros.copy_(qzeros)
        layer.scales.copy_(scales)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference path: dequantize the whole weight, then a dense matmul in x's dtype.
        w = dequantize_gemm(self.qweight, self.qzeros, self.scales).to(x.dtype)
        out = x @ w
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
