"""Benchmark the W4A16 Triton kernels against fp16 cuBLAS on Llama-2 7B / 70B linear shapes.

    python bench/kernel.py                      # all shapes, M in {1, 4, 16, 64, 256}, group 128
    python bench/kernel.py --models 7b --ms 1,16 --group 64 --cuda-graph

For each (K, N, M) it times, in one process and on the same inputs: torch fp16 `x @ W` (W dense
(K, N)), the split-K kernel, the tiled GEMM kernel, and reports what QuantLinear would dispatch to
(split-K for M <= SPLITK_MAX_M). L2 is flushed before every timed call by overwriting a 256 MB
buffer (H100 L2 is 50 MB: a 4096x11008 fp16 weight would otherwise partly stay cached), and each
call is bracketed by its own CUDA events; the median is reported. "GB/s" is packed weight bytes
(qweight + qzeros + scales) per second for the int4 kernel and 2*K*N bytes for fp16: at M <= 16
both should approach HBM bandwidth (~3 TB/s on H100), which is where the int4 speedup comes from.
Autotuning happens in the warm-up, outside the timed region.
"""

import argparse
import os
import statistics
import sys

import torch

SHAPES = {  # (K, N) of the linear layers: qkvo, gate/up, down
    "7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "70b": [(8192, 8192), (8192, 28672), (28672, 8192)],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="7b,70b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--ms", default="1,4,16,64,256", help="comma list of M (tokens)")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each call from a CUDA graph (removes Python launch overhead, as in serving)",
    )
    p.add_argument("--show-configs", action="store_true", help="print the autotuner's pick per shape")
    return p.parse_args()


class Timer:
    """Median of per-call CUDA-event timings, L2 flushed before each call."""

    def __init__(self, iters):
        self.iters = iters
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, cuda_graph=False):
        for _ in range(3):  # warm-up: compiles and autotunes
            fn()
        torch.cuda.synchronize()
        if cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for s, e in zip(starts, ends):
            # The ~90 us memset also lets the CPU enqueue fn before the GPU reaches it, so small
            # kernels are timed on the GPU, not on Python's launch latency.
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # us


def random_layer(k, n, group, dtype):
    """Random packed int4 weight (timing only: any bits are valid codes) and a dense fp16 twin."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device="cuda", generator=gen)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(k // group, n, device="cuda", generator=gen) * 0.01 + 1e-3).half()
    dense = torch.randn(k, n, device="cuda", dtype=dtype, generator=gen) * 0.02
    return qweight, qzeros, scales, dense


def check(fn, x, qweight, qzeros, scales, group):
    from awqflow.kernels.reference import w4a16_matmul_reference

    ref = w4a16_matmul_reference(x.float(), qweight, qzeros, scales, group)
    out = fn(x, qweight, qzeros, scales, group).float()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    if err > 2e-2:
        raise SystemExit(f"{fn.__name__} disagrees with the reference: max relative error {err:.3g}")
    return err


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench/kernel.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "on CPU run the correctness tests instead: pytest tests/test_kernels.py"
        )
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: it would time the Triton interpreter, not compiled kernels")

    import triton

    from awqflow.kernels import w4a16_gemm as gemm_mod
    from awqflow.kernels import w4a16_splitk as splitk_mod
    from awqflow.kernels.configs import SPLITK_MAX_M

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    ms = [int(m) for m in args.ms.split(",")]
    timer = Timer(args.iters)
    kernels = {"splitk": splitk_mod.w4a16_splitk, "gemm": gemm_mod.w4a16_gemm}
    tuned = {"splitk": splitk_mod._splitk_tuned, "gemm": gemm_mod._gemm_tuned}

    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"x {args.dtype} | group {args.group} | L2 flushed | median of {args.iters}"
        + (" | CUDA graphs" if args.cuda_graph else "")
    )
    header = (
        f"{'model':>5} {'K':>6} {'N':>6} {'M':>5} | {'fp16 us':>9} {'GB/s':>6} | "
        f"{'splitK us':>9} {'x fp16':>6} | {'GEMM us':>9} {'x fp16':>6} | "
        f"{'path':>6} {'x fp16':>6} {'GB/s':>6} {'TFLOP/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for model in args.models.split(","):
        for k, n in SHAPES[model]:
            qweight, qzeros, scales, dense = random_layer(k, n, args.group, dtype)
            int4_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
            errs = {
                name: check(fn, torch.randn(16, k, device="cuda", dtype=dtype), qweight, qzeros, scales, args.group)
                for name, fn in kernels.items()
            }
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                t_fp16 = timer(lambda: x @ dense, args.cuda_graph)
                t = {
                    name: timer(lambda fn=fn: fn(x, qweight, qzeros, scales, args.group), args.cuda_graph)
                    for name, fn in kernels.items()
                }
                if args.show_configs:
                    picks = {name: tuned[name].best_config for name in kernels}
                path = "splitk" if m <= SPLITK_MAX_M else "gemm"
                print(
                    f"{model:>5} {k:>6} {n:>6} {m:>5} | {t_fp16:9.1f} {2 * k * n / t_fp16 / 1e3:6.0f} | "
                    f"{t['splitk']:9.1f} {t_fp16 / t['splitk']:6.2f} | {t['gemm']:9.1f} {t_fp16 / t['gemm']:6.2f} | "
                    f"{path:>6} {t_fp16 / t[path]:6.2f} {int4_bytes / t[path] / 1e3:6.0f} "
                    f"{2 * m * k * n / t[path] / 1e6:7.2f}"
                )
                if args.show_configs:
                    print(f"{'':>26}configs: " + "; ".join(f"{name} {cfg}" for name, cfg in picks.items()))
            print(
                f"{'':>26}max rel. error vs reference (M=16): "
                + ", ".join(f"{name} {e:.1e}" for name, e in errs.items())
            )
            del qweight, qzeros, scales, dense
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
