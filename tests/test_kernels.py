"""W4A16 Triton kernels vs the torch reference.

Small shapes run everywhere: on CPU through TRITON_INTERPRET=1 (tests/conftest.py sets it when no
GPU is present; ~0.1-0.5 s a call, so keep them small), on a GPU compiled and autotuned. Large
Llama-sized shapes and QuantLinear's dispatch run only on CUDA. On CPU a subprocess also compiles
both kernels for sm_90, so GPU-only codegen errors show up without a GPU.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from awqflow.kernels.quant_linear import QuantLinear
from awqflow.kernels.reference import w4a16_matmul_reference
from awqflow.stages.quantize import QuantConfig, quantize_codes
from awqflow.storage.gemm import dequantize_gemm, pack_gemm

pytest.importorskip("triton")
from awqflow.kernels.w4a16_gemm import w4a16_gemm  # noqa: E402
from awqflow.kernels.w4a16_splitk import w4a16_splitk  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="large shapes need a CUDA GPU (the interpreter is too slow)")

KERNELS = {"gemm": w4a16_gemm, "splitk": w4a16_splitk}
# Output error allowed: a couple of output ulps (the interpreter truncates its bf16 stores) plus
# accumulation-order noise.
TOL = {torch.float16: dict(rtol=4e-3, atol=4e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_layer(k, n, group, device=DEVICE, seed=0):
    """A random (n, k) linear weight quantized with the project's quantizer and packed (GEMM layout)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    # Vary the range per output row so scales and zeros differ from group to group.
    w = w * torch.rand(n, 1, generator=gen) * 2 + torch.randn(n, 1, generator=gen) * 0.01
    codes, scales, zeros = quantize_codes(w, QuantConfig(group_size=group))
    qweight, qzeros, scales = pack_gemm(codes, scales, zeros)
    return qweight.to(device), qzeros.to(device), scales.to(device)


def make_x(shape, dtype, device=DEVICE, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def expected(x, qweight, qzeros, scales, group, bias=None):
    """The reference in fp32 (exact products, one final rounding), in x's dtype."""
    ref = w4a16_matmul_reference(x.float(), qweight, qzeros, scales, group, None if bias is None else bias.float())
    return ref.to(x.dtype)


def assert_matches(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.float().abs().amax().clamp(min=1.0)
    tol = TOL[ref.dtype]
    torch.testing.assert_close(out.float() / scale, ref.float() / scale, **tol)


# ---------------------------------------------------------------- interpreter-sized shapes, any device
# (K, N, group): BLOCK_K 64 in the interpreter config, so group 32 exercises the per-row group lookup,
# 64 one group per K tile, 128 several K tiles per group; N not a power of two, only divisible by 8.
SMALL_SHAPES = [(256, 200, 32), (256, 264, 64), (384, 136, 128)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("k,n,group", SMALL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("path", ["gemm", "splitk"])
def test_kernel_matches_reference(path, m, k, n, group, dtype):
    qweight, qzeros, scales = make_layer(k, n, group)
    x = make_x((m, k), dtype)
    out = KERNELS[path](x, qweight, qzeros, scales, group)
    assert_matches(out, expected(x, qweight, qzeros, scales, group))


@pytest.mark.parametrize("path", ["gemm", "splitk"])
def test_bias_and_leading_dims(path):
    k, n, group = 128, 72, 32
    qweight, qzeros, scales = make_layer(k, n, group)
    x = make_x((2, 3, k), torch.float16)
    bias = make_x((n,), torch.float16, seed=7)
    out = KERNELS[path](x, qweight, qzeros, scales, group, bias=bias)
    assert out.shape == (2, 3, n)
    assert_matches(out, expected(x, qweight, qzeros, scales, group, bias))


@pytest.mark.parametrize("path", ["gemm", "splitk"])
def test_strided_activations(path):
    k, n, group = 128, 64, 64
    qweight, qzeros, scales = make_layer(k, n, group)
    wide = make_x((5, 2 * k), torch.bfloat16)
    for x in (wide[:, :k], wide[:, ::2]):  # row stride != K; column stride 2
        out = KERNELS[path](x, qweight, qzeros, scales, group)
        assert_matches(out, expected(x, qweight, qzeros, scales, group))


@pytest.mark.parametrize("path", ["gemm", "splitk"])
def test_whole_row_group_and_ragged_k(path):
    # group_size -1: one group of K = 200 rows, which no K tile divides: the masked K tail and the
    # per-row group lookup together.
    k, n = 200, 48
    qweight, qzeros, scales = make_layer(k, n, -1)
    x = make_x((4, k), torch.float16)
    out = KERNELS[path](x, qweight, qzeros, scales, -1)
    assert_matches(out, expected(x, qweight, qzeros, scales, -1))


# Explicit configs reach the tiling cases the single interpreter config does not.
PINNED = [
    ("gemm", 64, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)),  # 2 tiles/group
    ("gemm", 32, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)),  # 4 groups/tile
    ("splitk", 32, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2)),  # no split
    ("splitk", 64, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=16, num_warps=4, num_stages=2)),  # empty slices
]


@pytest.mark.parametrize("path,group,config", PINNED, ids=lambda v: str(v) if not isinstance(v, dict) else None)
def test_pinned_configs(path, group, config):
    k, n = 256, 96
    qweight, qzeros, scales = make_layer(k, n, group)
    x = make_x((18, k), torch.float16)
    bias = make_x((n,), torch.float16, seed=3)
    out = KERNELS[path](x, qweight, qzeros, scales, group, bias=bias, config=config)
    assert_matches(out, expected(x, qweight, qzeros, scales, group, bias))


@pytest.mark.parametrize("path", ["gemm", "splitk"])
def test_empty_batch_and_bad_operands(path):
    qweight, qzeros, scales = make_layer(64, 32, 32)
    fn = KERNELS[path]
    assert fn(make_x((0, 64), torch.float16), qweight, qzeros, scales, 32).shape == (0, 32)
    with pytest.raises(TypeError):
        fn(make_x((2, 64), torch.float32), qweight, qzeros, scales, 32)
    with pytest.raises(ValueError):
        fn(make_x((2, 64), torch.float16), qweight, qzeros, scales, 64)  # 2 scale rows, not 1
    with pytest.raises(ValueError):
        fn(make_x((2, 48), torch.float16), qweight, qzeros, scales, 32)


# ---------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("has_bias", [False, True])
def test_quant_linear_cpu_equals_dense(dtype, has_bias):
    k, n, group = 128, 40, 32
    qweight, qzeros, scales = make_layer(k, n, group, device="cpu")
    bias = make_x((n,), torch.float16, device="cpu", seed=5) if has_bias else None
    layer = QuantLinear.from_packed(qweight, qzeros, scales, bias)
    x = make_x((2, 3, k), dtype, device="cpu")
    w = dequantize_gemm(qweight, qzeros, scales).to(dtype)
    dense = x @ w if bias is None else x @ w + bias.to(dtype)
    assert torch.equal(layer(x), dense)


def test_quant_linear_import_does_not_load_triton():
    code = "import sys, awqflow.kernels.quant_linear; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- GPU codegen without a GPU
_COMPILE_SCRIPT = textwrap.dedent("""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from awqflow.kernels.w4a16_gemm import _w4a16_gemm_kernel as gemm
    from awqflow.kernels.w4a16_splitk import _w4a16_splitk_kernel as splitk

    common = {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "bias_ptr": "*fp16",
              "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "constexpr", "M_BUCKET": "i32"}
    for xdt, group, block_k, even in (("fp16", 128, 64, True), ("bf16", 32, 128, False)):
        consts = {"stride_xk": 1, "GROUP_SIZE": group, "HAS_BIAS": True, "EVEN_K": even, "BLOCK_K": block_k}
        jobs = [
            (gemm, {"x_ptr": f"*{xdt}", "y_ptr": f"*{xdt}", "stride_ym": "i32"},
             dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8), dict(num_warps=8, num_stages=3)),
            (splitk, {"x_ptr": f"*{xdt}", "acc_ptr": "*fp32"},
             dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=4), dict(num_warps=4, num_stages=4)),
        ]
        for fn, sig, meta, opts in jobs:
            c = {**consts, **meta}
            full = {a: (sig.get(a) or common.get(a) or "constexpr") for a in fn.arg_names}
            kernel = compile(ASTSource(fn=fn, signature=full, constexprs=c), target=GPUTarget("cuda", 90, 32),
                             options=opts)
            assert "cubin" in kernel.asm, fn
    print("compiled")
""")


@pytest.mark.skipif(CUDA, reason="on a GPU the CUDA tests compile and run the kernels for real")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------- CUDA: Llama-sized layers
CUDA_SHAPES = [(4096, 4096, 128), (4096, 11008, 64), (11008, 4096, 32)]
CUDA_CASES = (
    [("gemm", m, s, torch.float16) for s in CUDA_SHAPES for m in (17, 300)]
    + [("splitk", m, s, torch.float16) for s in CUDA_SHAPES for m in (1, 16)]
    + [("gemm", 64, CUDA_SHAPES[0], torch.bfloat16), ("splitk", 4, CUDA_SHAPES[0], torch.bfloat16)]
)


@cuda_only
@pytest.mark.parametrize("path,m,shape,dtype", CUDA_CASES, ids=lambda v: str(v))
def test_cuda_large_shapes(path, m, shape, dtype):
    k, n, group = shape
    qweight, qzeros, scales = make_layer(k, n, group)
    x = make_x((m, k), dtype)
    bias = make_x((n,), dtype, seed=9)
    out = KERNELS[path](x, qweight, qzeros, scales, group, bias=bias)
    assert_matches(out, expected(x, qweight, qzeros, scales, group, bias))


@cuda_only
@pytest.mark.parametrize("m,path", [(1, "splitk"), (16, "splitk"), (17, "gemm"), (128, "gemm")])
def test_cuda_quant_linear_dispatch(monkeypatch, m, path):
    from awqflow.kernels import quant_linear

    k, n, group = 1024, 512, 128
    qweight, qzeros, scales = make_layer(k, n, group)
    bias = make_x((n,), torch.float16, seed=2)
    layer = QuantLinear.from_packed(qweight, qzeros, scales, bias)
    calls = []
    gemm, splitk = quant_linear.triton_kernels()
    spies = {"gemm": gemm, "splitk": splitk}
    for name, fn in list(spies.items()):
        spies[name] = (lambda fn, name: lambda *a, **kw: calls.append(name) or fn(*a, **kw))(fn, name)
    monkeypatch.setattr(quant_linear, "_KERNELS", (spies["gemm"], spies["splitk"]))
    x = make_x((1, m, k), torch.float16)
    out = layer(x)
    assert calls == [path]
    assert_matches(out, expected(x, qweight, qzeros, scales, group, bias))
