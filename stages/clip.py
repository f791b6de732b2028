"""AWQ clip search (SPEC §4): per (output channel, group), the weight range that minimises the
error of that group's partial product X_g @ W_g^T after quantization. Run after scales are applied."""

import torch

from awqflow.stages.quantize import QuantConfig, fake_quantize


def sample_tokens(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Up to n_tokens evenly spaced rows of x (tokens, in). With fewer tokens than asked, all of them
    (AutoAWQ's step of n // n_tokens becomes 0 there)."""
    x = x.reshape(-1, x.shape[-1])
    step = max(1, x.shape[0] // n_tokens)
    return x[::step][:n_tokens]


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    qcfg: QuantConfig,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
    memory_budget: int = 1 << 28,
) -> torch.Tensor:
    """Best max |w| per (output channel, group): (out, n_groups), in float32.

    The error of group j's partial product over the sampled tokens is d^T G_j d with d = Q(w_j) - w_j
    and G_j = X_j^T X_j (g x g), computed once: the same mean squared error as the forward of every
    candidate over every token (AutoAWQ's), at g / tokens of its arithmetic and with no (candidate,
    channel, token, group) intermediate."""
    out_f, in_f = w.shape
    g = qcfg.group_len(in_f)
    xs = sample_tokens(x, n_tokens).float().view(-1, in_f // g, g)  # (t, groups, g)
    gram = torch.einsum("tjg,tjh->jgh", xs, xs) / xs.shape[0]  # (groups, g, g)
    shrink = 1 - torch.arange(int(n_grid * max_shrink), device=w.device, dtype=torch.float32) / n_grid
    n_cand = len(shrink)
    per_row = n_cand * in_f * 4 * 4
    rows = max(1, memory_budget // per_row)
    best = []
    for wb in w.float().split(rows):
        wg = wb.view(-1, in_f // g, g)  # (o, groups, g)
        max0 = wg.abs().amax(dim=-1)  # (o, groups)
        max_val = shrink[:, None, None] * max0  # (c, o, groups)
        clipped = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None])
        d = fake_quantize(clipped.reshape(-1, in_f), qcfg).view_as(clipped) - wg  # (c, o, groups, g)
        err = (torch.einsum("cojg,jgh->cojh", d, gram) * d).sum(dim=-1)  # (c, o, groups)
        best.append(max_val.gather(0, err.argmin(dim=0, keepdim=True))[0])
    return torch.cat(best)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> None:
    """Clamp w (out, in) in place to [-max_val, max_val] per (output channel, group)."""
    g = w.shape[1] // max_val.shape[1]
    wg = w.data.view(w.shape[0], -1, g)
    m = max_val.to(w.dtype)[..., None]
    wg.copy_(torch.maximum(torch.minimum(wg, m), -m))
