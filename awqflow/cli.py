"""awqflow command line: quantize a checkpoint, measure perplexity, check a checkpoint against vLLM.

`quantize` takes one flag per field of awqflow.options.Options, derived from it (plus AutoAWQ's
names as aliases), checks its input before Prefect starts, then runs the `awq` flow.
"""

import argparse
import json
import os
import sys
import types
import typing
from contextlib import contextmanager

# AutoAWQ's quant_config names, accepted beside ours
ALIASES = {
    "w_bit": ["--w_bit"],
    "group_size": ["--q-group-size", "--q_group_size"],
    "zero_point": ["--zero_point"],
    "format": ["--version"],
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage of ~20 flags would bury the problem)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser_for(annotation):
    """(argparse type, allowed values, action) for a field's type. The values only show in --help:
    the options model checks them, with the same one-line message from every entry point."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation, args = args[0], list(typing.get_args(args[0]))
    if annotation is bool:
        return None, None, argparse.BooleanOptionalAction
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0]), list(args), None
    if typing.get_origin(annotation) is list:
        return lambda text: [t for t in text.split(",") if t], None, None
    return annotation, None, None


def add_option_flags(p: argparse.ArgumentParser, options_type) -> None:
    """One flag per options field; unset flags are left out, so the model's own defaults apply."""
    for name, field in options_type.model_fields.items():
        kind, choices, action = _parser_for(field.annotation)
        extra = {"action": action} if action else {"type": kind}
        if choices:
            extra["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        p.add_argument(
            flag(name),
            *ALIASES.get(name, []),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{field.description} (default: {field.default})",
            **extra,
        )


def options_from(args: argparse.Namespace):
    from awqflow.options import Options

    return Options(**{k: v for k, v in vars(args).items() if k in Options.model_fields})


@contextmanager
def closed_bars():
    """A run that fails mid-stage leaves its progress bar open: close it, so that the error line that
    follows starts a line of its own."""
    try:
        yield
    finally:
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()


def cmd_quantize(a) -> None:
    from awqflow import preflight

    options = options_from(a)
    with preflight.prefect_session(debug=a.debug or bool(os.environ.get("AWQFLOW_DEBUG"))) as ready, closed_bars():
        # while the Prefect server starts: bad input fails here, in seconds, before any model pass
        preflight.check_run(a.model, a.out, options)
        from awqflow.flows.awq import awq

        ready()
        result = awq(model=a.model, out=a.out, options=options, progress=True)
    print(result["report"])
    print(f"output: {os.path.abspath(a.out)}")


def cmd_ppl(a) -> None:
    from awqflow.evaluate import evaluate

    r = evaluate(a.model, a.text, a.seqlen, a.device, reference=a.reference)
    kl = f", mean KL to {a.reference} {r['kl']:.5f}" if "kl" in r else ""
    print(
        json.dumps(r)
        if a.json
        else f"ppl {r['ppl']:.4f}{kl} over {r['tokens']} tokens ({r['windows']} x {r['seqlen']})"
    )


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


def build_parser() -> argparse.ArgumentParser:
    from awqflow.options import Options

    parser = Parser(prog="awqflow", description="AWQ quantization of Hugging Face causal LMs")
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors (or AWQFLOW_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    q = sub.add_parser("quantize", help="quantize a checkpoint")
    q.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    q.add_argument("--out", required=True, help="output checkpoint directory (never the model's own folder)")
    add_option_flags(q, Options)
    q.set_defaults(func=cmd_quantize)
    p = sub.add_parser("ppl", help="perplexity (and KL to a reference) of an FP or awqflow checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="plain text file")
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--reference", default=None, help="FP model directory: also report mean KL to its logits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_ppl)
    c = sub.add_parser("check", help="would vLLM's AWQ / AWQ-Marlin loaders accept this checkpoint?")
    c.add_argument("--model", required=True, help="quantized checkpoint directory")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the shards for")
    c.add_argument("--vllm-version", default=None, help="the vLLM release to check for (default: the newest read)")
    c.set_defaults(func=cmd_check)
    return parser


def main(argv=None) -> None:
    from awqflow.preflight import report_error

    # before Prefect reads its settings: no telemetry unless asked for (offline it only logs an error),
    # warnings and errors only on the terminal (the progress bars and the report say the rest)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug or os.environ.get("AWQFLOW_DEBUG"):
            raise
        print("awqflow: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if args.debug or os.environ.get("AWQFLOW_DEBUG"):
            raise
        report_error(e)


if __name__ == "__main__":
    main()
