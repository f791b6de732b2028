"""W4A16 GEMM for prefill: y = x (M, K) @ dequant(W) (K, N), straight from the AutoAWQ GEMM layout.

The weight never exists in dense form: each program loads a (BLOCK_K, BLOCK_N/8) tile of packed
int32 words, expands it to 4-bit codes in registers, applies its group's zero and scale, and feeds
the fp16/bf16 tile to tl.dot with an fp32 accumulator. Layout (SPEC §6): qweight (K, N/8) int32,
nibble i of word j = column 8j + AWQ_ORDER[i]; qzeros (K/G, N/8) packed the same way; scales (K/G, N).

`load_dequant_tile` is shared with the split-K decode kernel (w4a16_splitk.py).
"""

import torch
import triton
import triton.language as tl

from awqflow.kernels.configs import AUTOTUNE_KEY, GEMM_CONFIGS, INTERPRET, m_bucket, prune_gemm_configs, triton_configs
from awqflow.kernels.reference import resolve_group, w4a16_matmul_reference  # noqa: F401 (the oracle)


@triton.jit
def awq_shifts(BLOCK_N: tl.constexpr):
    # Column c of a word sits in nibble AWQ_ORDER.index(c) = c // 2 + 4 * (c % 2).
    # Tiles start at multiples of 8 columns, so the local column index gives c directly.
    c = tl.arange(0, BLOCK_N) % 8
    return ((c // 2) + (c % 2) * 4) * 4


@triton.jit
def unpack_words(words, shifts):
    # (R, BLOCK_N/8) words -> (R, BLOCK_N) codes: repeat each word 8 times along the row (one load
    # per word, not eight), then pull out the nibble each column owns. The & 0xF also discards the
    # sign bits that >> drags in from words >= 2^31.
    w = tl.interleave(words, words)
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)
    return (w >> shifts[None, :]) & 0xF


@triton.jit
def load_dequant_tile(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    k0,
    pid_n,
    N,
    K,
    GROUP_SIZE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows k0..k0+BLOCK_K, columns of N-tile pid_n of W, dequantized in the scales' dtype; 0 outside W."""
    n_words = N // 8
    rows = k0 + tl.arange(0, BLOCK_K)
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_w = offs_w < n_words
    mask_n = offs_n < N
    if EVEN_K:
        mask_k = tl.full((BLOCK_K,), 1, tl.int1)  # constant: the compiler drops it from the loads
    else:
        mask_k = rows < K

    words = tl.load(
        qweight_ptr + rows[:, None] * n_words + offs_w[None, :], mask=mask_k[:, None] & mask_w[None, :], other=0
    )
    if GROUP_SIZE % BLOCK_K == 0:
        # The whole tile lies in one group: one row of zeros and scales, broadcast over BLOCK_K.
        g = k0 // GROUP_SIZE
        zwords = tl.load(qzeros_ptr + g * n_words + offs_w[None, :], mask=mask_w[None, :], other=0)
        scale = tl.load(scales_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    else:
        # Groups smaller than the tile (or not dividing it): each row looks up its own group. The
        # repeated addresses hit L1, so this costs instructions rather than DRAM traffic.
        g = rows // GROUP_SIZE
        zwords = tl.load(
            qzeros_ptr + g[:, None] * n_words + offs_w[None, :], mask=mask_k[:, None] & mask_w[None, :], other=0
        )
        scale = tl.load(
            scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )

    shifts = awq_shifts(BLOCK_N)
    q = unpack_words(words, shifts)
    z = unpack_words(zwords, shifts)
    # Round (q - z) * s in the scales' dtype, as the reference (and AutoAWQ) does; callers cast to
    # the activation dtype, so fp16 and bf16 activations see exactly the reference's weights.
    return (q - z).to(scale.dtype) * scale


_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def dot_acc(a, w, acc):
    """acc += a @ w.to(a.dtype), fp32 accumulate."""
    if _INTERPRET and a.dtype == tl.bfloat16:
        # Triton 3.9's interpreter returns garbage from a bf16 tl.dot and truncates when casting to
        # bf16. Emulate the GPU instead: round w to bf16 by hand (round-to-nearest-even on the fp32
        # bits) and multiply exactly in fp32. Compiled kernels never see this branch.
        bits = w.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        acc = tl.dot(a.to(tl.float32), bits.to(tl.float32, bitcast=True), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w.to(a.dtype), acc)
    return acc


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_ym,
    M_BUCKET,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order (Triton matmul tutorial): GROUP_M row-tiles in a row reuse the same
    # weight column tiles while they are still in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_rows
    pid_n = (pid % pids_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    # int64 rows: M * K passes 2^31 for long prefills of wide layers.
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
        w = load_dequant_tile(
            qweight_ptr, qzeros_ptr, scales_ptr, k0, pid_n, N, K, GROUP_SIZE, EVEN_K, BLOCK_K, BLOCK_N
        )
        acc = dot_acc(a, w, acc)
        x_ptrs += BLOCK_K * stride_xk

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
_gemm_fixed = _even_k(_w4a16_gemm_kernel)  # launched with an explicit config (tests, benchmarks)
_gemm_tuned = triton.autotune(
    configs=triton_configs(GEMM_CONFIGS), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_gemm_configs}
)(_gemm_fixed)


def check_operands(x, qweight, qzeros, scales, group_size, bias):
    """Validate shapes/dtypes once, in Python; returns (K, N, group)."""
    k, n = qweight.shape[0], scales.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight has K={k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"W4A16 kernels take fp16 or bf16 activations, got {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError("qweight and qzeros must be int32 (AutoAWQ GEMM layout)")
    if n % 8 or qweight.shape[1] * 8 != n or qzeros.shape[1] * 8 != n:
        raise ValueError(f"packed widths {tuple(qweight.shape)}, {tuple(qzeros.shape)} do not match N={n}")
    group = resolve_group(group_size, k, scales.shape[0])
    if qzeros.shape[0] != scales.shape[0]:
        raise ValueError("qzeros and scales must have one row per group")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},)")
    tensors = (x, qweight, qzeros, scales) + (() if bias is None else (bias,))
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all operands must be on one device")
    return k, n, group


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x (..., K) fp16/bf16 -> (..., N) in x's dtype. `config` pins BLOCK_*/GROUP_M (+num_warps,
    num_stages) instead of autotuning."""
    k, n, group = check_operands(x, qweight, qzeros, scales, group_size, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n)
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (
        x2,
        qweight,
        qzeros,
        scales,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        y.stride(0),
        m_bucket(m),
    )
    consts = dict(GROUP_SIZE=group, HAS_BIAS=bias is not None)
    if config is None:
        _gemm_tuned[grid](*args, **consts)
    else:
        _gemm_fixed[grid](*args, **consts, **config)
    return y.reshape(*lead, n)
