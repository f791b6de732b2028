"""Group-wise weight quantizer (SPEC §5): the one place that turns weights into codes."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantConfig:
    w_bit: int = 4
    group_size: int = 128  # -1: one group per output row
    zero_point: bool = True  # asymmetric (AutoAWQ's default and its GEMM format)

    def __post_init__(self):
        if self.w_bit not in (3, 4):
            raise ValueError(f"w_bit={self.w_bit} is not supported: use 4 (or 3 for a fake-quant checkpoint)")
        if self.group_size not in (-1, 32, 64, 128):
            raise ValueError(f"group_size={self.group_size} is not supported: use 32, 64, 128 or -1 (whole row)")

    def group_len(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise ValueError(
                f"in_features={in_features} is not divisible by group_size={g}: "
                f"pick a group size that divides it (or -1), or leave this layer unquantized"
            )
        return g


def quantize_codes(w: torch.Tensor, cfg: QuantConfig):
    """w (out, in) -> codes (out, in) int in [0, 2^b), scales (out, in/G), zeros (out, in/G) int.

    Symmetric quantization is stored as unsigned codes with a fixed zero of 2^(b-1), so both modes
    share one storage layout: w_hat = (q - zero) * scale.
    """
    out_f, in_f = w.shape
    g = cfg.group_len(in_f)
    wg = w.reshape(out_f, in_f // g, g).float()
    qmax = 2**cfg.w_bit - 1
    if cfg.zero_point:
        wmax, wmin = wg.amax(dim=-1), wg.amin(dim=-1)
        scales = (wmax - wmin).clamp(min=1e-5) / qmax
        zeros = (-torch.round(wmin / scales)).clamp(0, qmax)
    else:
        half = 2 ** (cfg.w_bit - 1)
        scales = wg.abs().amax(dim=-1).clamp(min=1e-5) / (half - 1)
        zeros = torch.full_like(scales, half)
    # Scales are stored as fp16 (GEMM layout): quantize against the stored value so that fake-quant
    # and the packed checkpoint decode to the same weights.
    scales = scales.to(torch.float16).float()
    codes = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(0, qmax)
    return codes.reshape(out_f, in_f).to(torch.int32), scales, zeros.to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_codes, in float32: (q - zero) * scale, broadcast over each group."""
    out_f, in_f = codes.shape
    n_groups = scales.shape[1]
    q = codes.reshape(out_f, n_groups, in_f // n_groups).float()
    return ((q - zeros[..., None].float()) * scales[..., None].float()).reshape(out_f, in_f)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Q(w): quantize and dequantize, returned in w's dtype."""
    return dequantize_codes(*quantize_codes(w, cfg)).to(w.dtype)
