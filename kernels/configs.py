"""Every tuning knob of the W4A16 kernels in one place: autotune configs, pruning, dispatch threshold.

Configs are plain dicts (meta-parameters plus num_warps/num_stages), the same format the kernel
wrappers take as `config=`, so this module imports without triton (QuantLinear reads the
threshold on CPU-only installs). Under TRITON_INTERPRET=1 each kernel gets a single small config:
the autotuner then skips benchmarking (it would time every config in pure Python), and blocks stay
small enough for the interpreter's numpy emulation to finish in tens of milliseconds.
"""

import os

# triton reads the same variable when it is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Largest M that takes the split-K (decode) path; above it the tiled GEMM has enough M-tiles to fill
# the GPU on its own and split-K's fp32 atomics only add traffic.
SPLITK_MAX_M = 16


def m_bucket(m: int) -> int:
    """Autotune key for M (next power of two): each prefill length would otherwise retune."""
    return 1 << max(int(m) - 1, 0).bit_length()


def _cfg(num_warps, num_stages, **meta):
    return dict(meta, num_warps=num_warps, num_stages=num_stages)


# ---- prefill GEMM: BLOCK_M x BLOCK_N output tiles, dequantizing a BLOCK_K x BLOCK_N weight tile per step.
# Wide N tiles amortise the per-tile dequantization over more MACs; BLOCK_M 32/64 configs exist for
# M just above the split-K threshold, where 128-row tiles would be mostly padding.
_GEMM_GPU = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    _cfg(4, 5, BLOCK_M=32, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
]
_GEMM_INTERPRET = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)]

# ---- decode split-K: M <= 16 fits one 16-row tile (tl.dot's minimum), so parallelism has to come
# from N tiles x K slices: enough programs to cover 132 SMs several times over on 4096-wide layers.
_SPLITK_GPU = [
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=8),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=16),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, SPLIT_K=2),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=4),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=8),
    _cfg(8, 3, BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, SPLIT_K=4),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=16),
]
_SPLITK_INTERPRET = [_cfg(4, 1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2)]

GEMM_CONFIGS = _GEMM_INTERPRET if INTERPRET else _GEMM_GPU
SPLITK_CONFIGS = _SPLITK_INTERPRET if INTERPRET else _SPLITK_GPU

# One key for both kernels: the bucketed M, the layer shape and the group (a constexpr in the kernel).
# (The autotuner also keys on every tensor's dtype, so fp16 and bf16 tune separately.)
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE"]


def triton_configs(configs):
    """Plain dicts -> triton.Config (imports triton: call from the kernel modules only)."""
    import triton

    def one(c):
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"])

    return [one(c) for c in configs]


def _keep_some(configs, keep):
    kept = [c for c in configs if keep(c.kwargs)]
    return kept or list(configs)


def prune_gemm_configs(configs, named_args, **kwargs):
    """Skip tiles far taller than M: they compute padding rows and waste tuning time."""
    m = named_args["M_BUCKET"]
    return _keep_some(configs, lambda c: c["BLOCK_M"] <= max(32, 2 * m))


def prune_splitk_configs(configs, named_args, **kwargs):
    """Skip splits that leave K slices with no tile at all (they would only add zeros)."""
    k = named_args["K"]
    return _keep_some(configs, lambda c: c["BLOCK_K"] * c["SPLIT_K"] <= k)
