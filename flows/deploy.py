"""Serve the two awqflow deployments from one process (needs a Prefect server: PREFECT_API_URL).

    python -m awqflow.flows.deploy                                  # awq/quantize and requantize/watch
    python -m awqflow.flows.deploy --checkpoints ckpts --output-root quantized --interval 600 \\
        --param calib=fixture/data/calib.txt --param n_samples=64

  awq/quantize       the `awq` flow, no schedule: `prefect deployment run awq/quantize -p model=... -p out=...`
  requantize/watch   the `requantize` flow; --interval SECONDS or --cron EXPR schedules it (needs
                     --checkpoints and --output-root); at most one run at a time.

--param KEY=VALUE (repeatable; VALUE parsed as JSON, else a string) sets a default: KEY an option of
awqflow.options.Options (w_bit, calib, ...: both deployments pass it to the `awq` flow) or another
parameter of a deployment's flow (model, out, settle_s, ...). Runs are executed in subprocesses of this process until it
gets Ctrl-C (SIGINT) or SIGTERM.
"""

import argparse
import inspect
import json
import sys

from prefect import serve
from prefect.deployments.runner import EntrypointType

from awqflow.flows.awq import awq
from awqflow.flows.watch import requantize
from awqflow.options import Options


def parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: use KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m awqflow.flows.deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoints", help="folder of checkpoints the watch deployment scans")
    ap.add_argument("--output-root", help="where the watch deployment writes quantized checkpoints and its ledger")
    when = ap.add_mutually_exclusive_group()
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run requantize/watch every SECONDS")
    when.add_argument("--cron", metavar="EXPR", help='run requantize/watch on a cron schedule, e.g. "*/15 * * * *"')
    ap.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="default flow parameter (repeatable)",
    )
    ap.add_argument("--limit", type=int, default=None, help="at most this many concurrent flow runs in this process")
    return ap


def deployments(args):
    defaults = dict(args.param)
    options = {k: v for k, v in defaults.items() if k in Options.model_fields}
    accepted = {f: set(inspect.signature(f.fn).parameters) - {"options"} for f in (awq, requantize)}
    unknown = set(defaults) - set(options) - set().union(*accepted.values())
    if unknown:
        raise SystemExit(f"--param: unknown parameter(s) {sorted(unknown)}")
    Options(**options)  # a bad value fails here, not in the first run
    if (args.interval or args.cron) and not (args.checkpoints and args.output_root):
        raise SystemExit("--interval / --cron need --checkpoints and --output-root")

    def params(f, **extra):
        given = {k: v for k, v in defaults.items() if k in accepted[f]}
        return {**given, **extra, **({"options": options} if options else {})}

    watch_params = params(
        requantize, **{k: v for k, v in (("checkpoints", args.checkpoints), ("output_root", args.output_root)) if v}
    )
    # Module-path entrypoints: runs import awqflow.flows.* from the installed package, whatever the cwd.
    quantize = awq.to_deployment(
        name="quantize",
        parameters=params(awq),
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Quantize one checkpoint: -p model=DIR -p out=DIR",
    )
    watch = requantize.to_deployment(
        name="watch",
        parameters=watch_params,
        interval=args.interval,
        cron=args.cron,
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Quantize new or changed checkpoints of a folder",
    )
    return [quantize, watch]


def main(argv=None):
    args = build_parser().parse_args(argv)
    serve(*deployments(args), limit=args.limit)


if __name__ == "__main__":
    sys.exit(main())
