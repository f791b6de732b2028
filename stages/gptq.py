"""GPTQ rounding (SPEC "Beyond AWQ"): quantize a linear's weights column by column, spreading each
column's rounding error over the columns not yet quantized so that X W^T changes as little as
possible on the calibration inputs X (Frantar et al., 2022).

Output is exactly what quantize_codes returns (codes, fp16-rounded scales, integer zeros; groups of
consecutive columns), so the GEMM packing and fake-quant paths take it unchanged. With actorder the
columns are visited by descending diag(H) (the inputs with the most energy first, while the most
columns are left to absorb their error), but each column keeps its natural group, whose range is
fixed from the weights before GPTQ: "static" activation ordering, which needs no g_idx, so the
checkpoint stays in the AutoAWQ GEMM layout. With AWQ first, feed the Hessian of the inputs as the
scaled linear sees them.
"""

import logging

import torch

from awqflow.stages.quantize import QuantConfig, quantize_codes

log = logging.getLogger(__name__)

MAX_DAMP = 1.0  # the last damping tried, as a fraction of mean(diag H) (GPT-QModel's bound too)


def add_to_hessian(h: torch.Tensor | None, x: torch.Tensor, count: int, chunk_tokens: int = 4096):
    """Fold the inputs x (..., in) of one batch into the running H = 2/n * sum_t x_t x_t^T.

    Returns (h, count) with count the number of tokens seen so far. h is float32 on x's device.
    Tokens are converted to float32 chunk by chunk, so a large fp16/bf16 x is never copied whole.
    """
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if n == 0:
        return h, count
    # H is a mean over all tokens: rescale the old mean to the new count, then add the new tokens.
    h.mul_(count / (count + n))
    for chunk in x.split(chunk_tokens):
        xf = chunk.float()
        h.addmm_(xf.t(), xf, alpha=2.0 / (count + n))
    return h, count + n


def _inverse_hessian_factor(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1.

    Row i of U holds what GPTQ needs at column i: U[i, i] scales the column's error and U[i, j>i]
    says how much of it each later column absorbs. A failed factorisation (H not positive definite:
    too few tokens, or rank-deficient inputs) is retried with 10x the damping, up to MAX_DAMP.
    """
    idx = torch.arange(h.shape[0], device=h.device)
    mean_diag = torch.diag(h).mean()
    while True:
        hd = h.clone()
        hd[idx, idx] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            # NaN can slip through LAPACK without a non-zero info: check the result too.
            if info == 0 and torch.isfinite(upper).all():
                return upper
        if damp >= MAX_DAMP:
            raise ValueError(
                f"GPTQ: the Hessian of layer {name!r} is not positive definite even with damping "
                f"{damp:g} * mean(diag H): raise damp or use more calibration samples"
            )
        new = min(damp * 10, MAX_DAMP)
        log.warning("GPTQ: Cholesky of layer %r failed with damp=%g, retrying with damp=%g", name, damp, new)
        damp = new


def gptq_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    qcfg: QuantConfig,
    block_size: int = 128,
    damp: float = 0.01,
    name: str = "",
    actorder: bool = False,
):
    """w (out, in), H (in, in) -> codes, scales, zeros with quantize_codes' types and conventions.

    Without actorder each group's (scale, zero) comes from quantize_codes' formulas applied to the
    group's weights as they stand when GPTQ reaches its first column (i.e. after the error of earlier
    columns was folded in), as the reference GPTQ does. With actorder every group's range is taken from
    the weights before GPTQ (static groups, as the reference's static_groups and llm-compressor's
    actorder="static" do), and the columns are visited by descending diag(H).
    """
    out_f, in_f = w.shape
    g = qcfg.group_len(in_f)
    if h.shape != (in_f, in_f):
        raise ValueError(f"GPTQ: layer {name!r} has in_features={in_f} but its Hessian is {tuple(h.shape)}")
    if damp <= 0:
        raise ValueError(f"GPTQ: damp must be > 0 (got {damp})")
    qmax = 2**qcfg.w_bit - 1
    group_cfg = QuantConfig(qcfg.w_bit, -1, qcfg.zero_point)  # one group = the columns passed in

    W = w.detach().to(torch.float32, copy=True)
    H = h.detach().to(W.device, torch.float64 if h.dtype == torch.float64 else torch.float32, copy=True)
    if not torch.isfinite(H).all():
        raise ValueError(
            f"GPTQ: the Hessian of layer {name!r} has NaN/inf entries (inputs overflowed?): "
            f"check the calibration inputs, raise damp or use more calibration samples"
        )
    # An input that was always 0 says nothing about its column: make H invertible there and drop the
    # weight (it never contributed to the output on the calibration data).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        _, scales, zeros = quantize_codes(W, qcfg)
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    else:
        order = torch.arange(in_f, device=W.device)
        scales = torch.empty(out_f, in_f // g, dtype=torch.float32, device=W.device)
        zeros = torch.empty(out_f, in_f // g, dtype=torch.int32, device=W.device)
    columns = order.tolist()
    U = _inverse_hessian_factor(H, damp, name).to(torch.float32)
    del H

    # Columns as rows (W transposed): each step reads and updates contiguous memory, one op per update
    Wt = W.t().contiguous()
    codes_t = torch.empty(in_f, out_f, dtype=torch.int32, device=W.device)
    diag = U.diagonal().tolist()
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = Wt[i1:i2].clone()  # this block, kept exactly up to date column by column
        Err1 = torch.zeros_like(W1)  # scaled errors of this block, applied to later blocks at the end
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if actorder:
                s, zf = scales[:, columns[col] // g], zeros[:, columns[col] // g].float()
            elif col % g == 0:
                # New group: its range is taken from its weights as updated so far. Columns past this
                # block have not yet received this block's (lazy) update: apply it to a copy here.
                end = col + g
                group_w = W1[i : min(end, i2) - i1]
                if end > i2:
                    group_w = torch.cat([group_w, Wt[i2:end] - U[i1:i2, i2:end].t() @ Err1])
                _, s, z = quantize_codes(group_w.t(), group_cfg)
                scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
                s, zf = s[:, 0], z[:, 0].float()
            # same rounding as quantize_codes, against this group's stored (fp16-exact) scale
            q = torch.round(W1[i] / s).add_(zf).clamp_(0, qmax)
            codes_t[columns[col]] = q.to(torch.int32)
            err = torch.sub(W1[i], q.sub_(zf).mul_(s), out=Err1[i]).div_(diag[col])
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)  # compensate within the block
        Wt[i2:] -= U[i1:i2, i2:].t() @ Err1  # the whole block's compensation at once on later columns
    codes = codes_t.t().contiguous()
    return codes, scales, zeros
