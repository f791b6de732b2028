"""Whole `awqflow quantize` against whole llm-compressor AWQ / GPTQ and AutoRound processes, in one run.

Every method gets the same model, the same calibration windows and the same evaluation windows.
awqflow runs as its CLI in a subprocess (ephemeral Prefect, no evaluation); llm-compressor runs
bench/llmcompressor_worker.py in its own venv (bench/setup_llmcompressor_env.sh), which loads the
model, runs oneshot() and saves the compressed checkpoint before it evaluates; AutoRound
(`--methods ...,autoround`) runs bench/autoround_worker.py in its venv (bench/setup_autoround_env.sh),
default recipe, AutoAWQ export (w4). For each method:

- seconds: wall time from starting the process until its quantized checkpoint is on disk (ours: the
  whole CLI process; theirs: spawn until the worker's save / export returns, its evaluation left out);
- block stage (ours): the "blocks" row of the run report's time per stage;
- ratio: seconds / llm-compressor AWQ's seconds in the same run;
- peak RSS of the quantizing process (ours: ru_maxrss from wait4; theirs: ru_maxrss before it
  evaluates);
- ppl and mean KL(P_fp || P_quant) per token on the eval windows, by bench/anchor_eval.evaluate
  (the function the worker uses too), float32;
- ppl and KL vs AutoRound: the relative change, ± the standard error of the per-window paired
  differences (the same windows for both; a change within about two of them is noise).

The calibration windows our CLI builds are checked against the ones llm-compressor gets (their
fingerprint is recorded in our checkpoint's config.json). Writes
bench/results/compare-<name>.json and prints a markdown table.

    nice .venv/bin/python bench/compare_llmcompressor.py                        # bundled model
    nice .venv/bin/python bench/compare_llmcompressor.py --name smollm2-135m \\
        --model ~/.cache/awqflow/models/smollm2-135m-instruct --group-size 64 --n-samples 32 \\
        --max-eval-windows 40                                                    # bench/real_model.py
    ... --ours "--grid-stride 1" --ours "--method awq-gptq"   # extra awqflow rows with other CLI options
    ... --methods awqflow,llmc-awq,llmc-gptq,autoround          # AutoRound beside them
"""

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from awqflow.load import load_model  # noqa: E402
from awqflow.stages.calibration import calibration_windows  # noqa: E402
from awqflow.stages.perplexity import eval_windows  # noqa: E402
from awqflow.storage.fingerprint import tensor_fingerprint  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from anchor_eval import evaluate, load_fp_model  # noqa: E402
from run_anchors import ENVS  # noqa: E402
from run_anchors import METHODS as ANCHORS  # noqa: E402

AWQFLOW = os.path.join(os.path.dirname(sys.executable), "awqflow")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ours(a, tmp, label, extra, windows, reference):
    out = os.path.join(tmp, label)
    cmd = [AWQFLOW, "quantize", "--model", a.model, "--out", out, "--calib", a.calib]
    cmd += ["--n-samples", str(a.n_samples), "--seqlen", str(a.seqlen), "--w-bit", str(a.w_bit)]
    cmd += ["--group-size", str(a.group_size), *shlex.split(extra)]
    log(f"{label}: {shlex.join(cmd)}")
    start = time.perf_counter()
    # not <out>.report: that is the run's own folder of pictures (flows/plots.report_dir)
    proc = subprocess.Popen(cmd, stdout=open(f"{out}.stdout.md", "w"), stderr=open(f"{out}.log", "w"))
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"{label} failed ({status}); see {out}.log")
    with open(f"{out}.stdout.md") as f:  # the run report's "Time per stage" table
        stages = dict(re.findall(r"^\| (\w+) \| ([0-9.]+) \|$", f.read(), re.M))
    with open(os.path.join(out, "config.json")) as f:
        found = json.load(f)["awqflow"]["calibration_fingerprint"]
    return {
        "seconds": round(seconds, 1),
        "block_seconds": float(stages["blocks"]),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
        "calibration_fingerprint": found,
        **evaluate(load_model(out).float(), windows, reference=reference),
    }


def theirs(a, tmp, method, calib_pt, eval_pt):
    env, worker, _, extra = ANCHORS[method]
    out = os.path.join(tmp, method)
    cmd = [os.path.join(ENVS, env, "bin", "python"), os.path.join(BENCH, worker), "--model", a.model, *extra]
    cmd += ["--calib-windows", calib_pt, "--eval-windows", eval_pt, "--w-bit", str(a.w_bit)]
    cmd += ["--group-size", str(a.group_size), "--max-eval-windows", str(a.max_eval_windows)]
    cmd += ["--export-dir" if method == "autoround" else "--save", out, "--out", f"{out}.json"]
    log(f"{method}: {shlex.join(cmd)}")
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "w"))
    with open(f"{out}.json") as f:
        r = json.load(f)
    return {
        "seconds": round(r["saved_at"] - start, 1),
        "quant_seconds": r["quant_seconds"],
        "cpu_seconds": r["quant_cpu_seconds"],
        "peak_rss_mib": round(r["peak_rss_mib"]),
        "version": r["version"],
        **{k: r[k] for k in ("ppl", "kl_mean", "kl_max_token", "fp_ppl", "tokens", "windows")},
        **{k: r[k] for k in ("window_nll", "window_kl") if k in r},
    }


def paired_change(row: dict, base: dict, key: str) -> tuple[float, float] | None:
    """Relative change of `row`'s mean over `base`'s of a per-window figure (window_nll: of the perplexity;
    window_kl: of the mean KL), with its standard error from the per-window differences: the windows are
    the same, so the noise of which text they hold cancels, and tokens of one window are not counted as
    independent."""
    if key not in row or key not in base:
        return None
    d = torch.tensor(row[key], dtype=torch.float64) - torch.tensor(base[key], dtype=torch.float64)
    se = float(d.std() / len(d) ** 0.5)
    if key == "window_nll":  # ppl = exp(mean nll): the ratio of two is exp of the mean difference
        return math.expm1(float(d.mean())), se
    scale = sum(base[key]) / len(base[key])
    return float(d.mean()) / scale, se / scale


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "fixture", "model"))
    ap.add_argument("--name", default="fixture")
    ap.add_argument("--calib", default=os.path.join(ROOT, "fixture", "data", "calib.txt"))
    ap.add_argument("--eval", default=os.path.join(ROOT, "fixture", "data", "eval.txt"))
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-eval-windows", type=int, default=0, help="0: every window of the eval text")
    ap.add_argument("--ours", action="append", default=[], help="CLI options of an extra awqflow row")
    ap.add_argument("--methods", default="awqflow,llmc-awq,llmc-gptq")
    ap.add_argument("--no-default-row", action="store_true", help="awqflow: only the --ours rows, not plain awq")
    a = ap.parse_args()
    a.model = os.path.abspath(os.path.expanduser(a.model))
    methods = a.methods.split(",")
    for setup in sorted({ANCHORS[m][2] for m in methods if m in ANCHORS}):
        subprocess.run(["bash", os.path.join(BENCH, setup)], check=True, stdout=subprocess.DEVNULL)

    tmp = tempfile.mkdtemp(prefix=f"awqflow-compare-{a.name}-")
    tok = AutoTokenizer.from_pretrained(a.model)
    calib = calibration_windows(a.calib, tok, a.n_samples, a.seqlen)
    with open(a.eval, encoding="utf-8") as f:
        windows = eval_windows(tok, f.read(), a.seqlen)
    if a.max_eval_windows:
        windows = windows[: a.max_eval_windows]
    calib_pt, eval_pt = os.path.join(tmp, "calib.pt"), os.path.join(tmp, "eval.pt")
    torch.save(calib, calib_pt)
    torch.save(windows, eval_pt)
    reference = load_fp_model(a.model)

    rows = {}
    result = os.path.join(BENCH, "results", f"compare-{a.name}.json")
    os.makedirs(os.path.dirname(result), exist_ok=True)
    for method in methods:
        if method == "awqflow":
            for extra in ([] if a.no_default_row else [""]) + a.ours:
                label = f"awqflow {extra}" if extra else "awqflow awq"
                rows[label] = ours(a, tmp, label.replace(" ", "_").replace("-", ""), extra, windows, reference)
                if rows[label]["calibration_fingerprint"] != tensor_fingerprint(calib):
                    raise SystemExit(f"{label} calibrated on other windows than llm-compressor gets")
        else:
            rows[method] = theirs(a, tmp, method, calib_pt, eval_pt)
        log(f"{list(rows)[-1]}: {json.dumps(rows[list(rows)[-1]])}")
        # after every row, so a run cut short keeps what it measured
        with open(result, "w") as f:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "args": vars(a),
                    "calib_fingerprint": tensor_fingerprint(calib),
                    "eval_fingerprint": tensor_fingerprint(windows),
                    "rows": rows,
                },
                f,
                indent=2,
            )

    base = rows.get("llmc-awq", {}).get("seconds")
    autoround = rows.get("autoround", {}).get("seconds")
    print(
        f"\n{a.name}: w{a.w_bit} g{a.group_size}, calibration {a.n_samples} x {a.seqlen}, "
        f"{windows.shape[0]} eval windows x {a.seqlen}; FP ppl {next(iter(rows.values()))['fp_ppl']:.3f}; "
        f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| method | seconds | vs llm-compressor AWQ | vs AutoRound | block stage s | peak RSS MiB | ppl | mean KL "
        "| ppl vs AutoRound | KL vs AutoRound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        vs_autoround = f"{r['seconds'] / autoround:.2f}x" if autoround else "-"
        blocks = f"{r['block_seconds']:.0f}" if "block_seconds" in r else "-"
        versus = rows["autoround"] if autoround and label != "autoround" else {}
        changes = [
            "-" if c is None else f"{100 * c[0]:+.{digits}f} % ± {100 * c[1]:.{digits}f}"
            for c, digits in ((paired_change(r, versus, "window_nll"), 3), (paired_change(r, versus, "window_kl"), 1))
        ]
        print(
            f"| {label} | {r['seconds']:.0f} | {ratio} | {vs_autoround} | {blocks} | {r['peak_rss_mib']} "
            f"| {r['ppl']:.3f} | {r['kl_mean']:.5f} | {changes[0]} | {changes[1]} |"
        )


if __name__ == "__main__":
    main()
