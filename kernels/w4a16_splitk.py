"""W4A16 split-K GEMM for decode (M = 1..16): same math as w4a16_gemm.py, different parallelism.

With M <= 16 the whole batch fits one 16-row tile, so the tiled GEMM would launch only N/BLOCK_N
programs (32 for a 4096-wide layer: a quarter of an H100) and stream K serially. Decode is bound by
reading the int4 weight, so every SM must be loading: the grid is (M-tiles x N-tiles, SPLIT_K),
each program reduces an interleaved slice of K tiles, and partial sums meet with fp32 atomic adds
in a zeroed fp32 buffer that the wrapper then casts to the activation dtype.
"""

import torch
import triton
import triton.language as tl

from awqflow.kernels.configs import AUTOTUNE_KEY, SPLITK_CONFIGS, m_bucket, prune_splitk_configs, triton_configs
from awqflow.kernels.reference import w4a16_matmul_reference  # noqa: F401 (the oracle)
from awqflow.kernels.w4a16_gemm import check_operands, dot_acc, load_dequant_tile


@triton.jit
def _w4a16_splitk_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    bias_ptr,
    acc_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    M_BUCKET,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (pid_k * BLOCK_K + offs_k[None, :]) * stride_xk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Slice pid_k takes K tiles pid_k, pid_k + SPLIT_K, ...: interleaving (rather than contiguous
    # chunks) keeps the slices balanced whatever K / BLOCK_K is.
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
        w = load_dequant_tile(
            qweight_ptr, qzeros_ptr, scales_ptr, k0, pid_n, N, K, GROUP_SIZE, EVEN_K, BLOCK_K, BLOCK_N
        )
        acc = dot_acc(a, w, acc)
        x_ptrs += BLOCK_K * SPLIT_K * stride_xk

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_BIAS:
        if pid_k == 0:  # exactly one slice adds the bias
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(
        acc_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :]
    )


_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
_splitk_fixed = _even_k(_w4a16_splitk_kernel)  # launched with an explicit config (tests, benchmarks)
# reset_to_zero: the autotuner launches every candidate on the same buffer; without it the
# atomics would pile the candidates' results on top of each other.
_splitk_tuned = triton.autotune(
    configs=triton_configs(SPLITK_CONFIGS),
    key=AUTOTUNE_KEY,
    reset_to_zero=["acc_ptr"],
    prune_configs_by={"early_config_prune": prune_splitk_configs},
)(_splitk_fixed)


def w4a16_splitk(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x (..., K) fp16/bf16 -> (..., N) in x's dtype; tuned for few rows (decode) but correct for any.
    `config` pins BLOCK_*/SPLIT_K (+num_warps, num_stages) instead of autotuning."""
    k, n, group = check_operands(x, qweight, qzeros, scales, group_size, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    acc = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    if m == 0:
        return acc.to(x.dtype).reshape(*lead, n)
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (
        x2,
        qweight,
        qzeros,
        scales,
        bias if bias is not None else scales,
        acc,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        m_bucket(m),
    )
    consts = dict(GROUP_SIZE=group, HAS_BIAS=bias is not None)
    if config is None:
        _splitk_tuned[grid](*args, **consts)
    else:
        _splitk_fixed[grid](*args, **consts, **config)
    return acc.to(x.dtype).reshape(*lead, n)
