"""awqflow command line: quantize a checkpoint, measure perplexity."""

import argparse
import json
import os
import sys

from awqflow.pipeline import Options


def _format(value: str) -> str:
    """AutoAWQ calls its layout a version ("GEMM"); ours is named by format."""
    return "awq-gemm" if value.lower() in ("gemm", "awq-gemm") else value


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--method", default="awq", help="awq (default) or rtn")
    # AutoAWQ's quant_config names (w_bit, q_group_size, zero_point, version) are accepted as aliases
    p.add_argument("--w-bit", "--w_bit", dest="w_bit", type=int, default=4,
                   help="4 (AutoAWQ GEMM checkpoint) or 3 (fake-quant checkpoint)")
    p.add_argument("--group-size", "--q-group-size", "--q_group_size", dest="group_size", type=int, default=128,
                   help="32, 64, 128 or -1 (whole row)")
    p.add_argument("--zero-point", "--zero_point", dest="zero_point", action=argparse.BooleanOptionalAction,
                   default=True, help="asymmetric quantization with zero points (default) or symmetric")
    p.add_argument("--calib", default="pileval", help="local .txt/.jsonl/.parquet file or datasets name")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/datasets calibration data")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--no-clip", dest="clip", action="store_false", help="skip the clip search")
    p.add_argument("--no-duo-scaling", dest="duo_scaling", action="store_false",
                   help="s = x_mean^alpha instead of x_mean^alpha / w_mean^(1-alpha)")
    p.add_argument("--devices", default=None,
                   help="comma-separated pool, one block per device at a time: cuda:0,cuda:1 (default: cuda or cpu)")
    p.add_argument("--task-runner", default="threads", choices=["threads", "dask", "ray"],
                   help="where block tasks run: threads on this machine, or a Dask / Ray cluster")
    p.add_argument("--eval-text", default=None,
                   help="after quantizing, print FP / RTN / AWQ perplexity on this text file")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: model max, <= 2048)")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential"],
                   help="parallel: blocks searched on FP inputs (AutoAWQ); sequential: on quantized outputs")
    p.add_argument("--format", "--version", dest="format", default="awq-gemm", type=_format,
                   help="checkpoint layout: awq-gemm (AutoAWQ version GEMM, default) or compressed-tensors")
    p.add_argument("--work-dir", default=None,
                   help="activations and the block-result cache (default: OUT.work); reruns reuse it")


def cmd_quantize(a) -> None:
    """Runs the Prefect flow `awq`; with no server configured Prefect runs it in ephemeral mode."""
    Options(method=a.method, w_bit=a.w_bit, group_size=a.group_size, zero_point=a.zero_point,
            mode=a.mode, format=a.format)  # argument errors before Prefect starts
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from awqflow.flows.awq import awq

    devices = a.devices.split(",") if a.devices else None
    result = awq(model=a.model, out=a.out, method=a.method, w_bit=a.w_bit, group_size=a.group_size,
                 zero_point=a.zero_point, calib=a.calib, text_field=a.text_field, n_samples=a.n_samples,
                 seqlen=a.seqlen, clip=a.clip, duo_scaling=a.duo_scaling, mode=a.mode, devices=devices,
                 task_runner_name=a.task_runner, work_dir=a.work_dir, eval_text=a.eval_text,
                 eval_seqlen=a.eval_seqlen, format=a.format, progress=True)
    print(result["report"])
    print(f"output: {os.path.abspath(a.out)}")


def cmd_ppl(a) -> None:
    from awqflow.pipeline import evaluate

    r = evaluate(a.model, a.text, a.seqlen, a.device)
    print(json.dumps(r) if a.json else f"ppl {r['ppl']:.4f} over {r['tokens']} tokens ({r['windows']} x {r['seqlen']})")


def cmd_check(a) -> None:
    from awqflow.stages.check import check_checkpoint, linear_shapes

    errors, warnings = check_checkpoint(a.model, a.tp, a.vllm_version)
    print(f"{a.model}: {len(linear_shapes(a.model))} quantized linears, tp={a.tp}, vLLM {a.vllm_version or 'current'}")
    for w in warnings:
        print(f"warning: {w}")
    for e in errors:
        print(f"error: {e}")
    print("vLLM AWQ: " + ("rejects this checkpoint" if errors else "accepts this checkpoint"))
    sys.exit(1 if errors else 0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="awqflow", description="AWQ quantization of Hugging Face causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a checkpoint (AWQ or RTN)")
    _quantize_args(q)
    q.set_defaults(func=cmd_quantize)
    p = sub.add_parser("ppl", help="perplexity of an FP or awqflow checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="plain text file")
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_ppl)
    c = sub.add_parser("check", help="would vLLM's AWQ / AWQ-Marlin loaders accept this checkpoint?")
    c.add_argument("--model", required=True, help="quantized checkpoint directory")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the shards for")
    c.add_argument("--vllm-version", default=None, help="the vLLM release to check for (default: the newest read)")
    c.set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, FloatingPointError, OSError) as e:
        if os.environ.get("AWQFLOW_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"awqflow: error: {msg}".splitlines()[0], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
