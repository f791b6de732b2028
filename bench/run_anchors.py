"""The comparison bench's anchor side: llm-compressor AWQ / GPTQ and AutoRound on the same windows.

Builds the calibration windows with awqflow.stages.calibration.calibration_windows (seed 0) and
the eval windows with awqflow.stages.perplexity.eval_windows, saves both as .pt, runs the anchor
workers (each in its own venv, never importing awqflow) for every method x config, and writes
bench/results/anchors-<name>.json: the windows' fingerprints
(awqflow.storage.fingerprint.tensor_fingerprint), the FP perplexity, and per method / config /
calibration size: ppl, mean KL(P_fp || P_quant) over the eval tokens, quant_seconds, peak RSS,
the tool's version (and the worker's whole record). The JSON is rewritten after every run, and
runs already in it (same method, bits, group, calibration windows and eval windows) are skipped
unless --force, so several invocations (e.g. another calibration size) add to the same file.

    # from the worktree root, with the project's venv (no PYTHONPATH needed); heavy: nice it
    nice -n 19 /work/main/.venv/bin/python bench/run_anchors.py                      # bundled model, 128 x 512
    nice -n 19 /work/main/.venv/bin/python bench/run_anchors.py \\
        --model ~/.cache/awqflow/models/smollm2-135m-instruct --name smollm2-135m \\
        --n-samples 32 --configs 4:64,3:64 --max-eval-windows 40
    ... --methods autoround --configs 3:64 --n-samples 4                               # add a run

Methods: llmc-awq, llmc-gptq (bench/llmcompressor_worker.py, .bench-envs/llmcompressor) and
autoround (bench/autoround_worker.py, .bench-envs/autoround); the venvs are set up on first use
by bench/setup_llmcompressor_env.sh and bench/setup_autoround_env.sh.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from awqflow.stages.calibration import calibration_windows  # noqa: E402
from awqflow.stages.perplexity import eval_windows  # noqa: E402
from awqflow.storage.fingerprint import tensor_fingerprint  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from anchor_eval import evaluate, load_fp_model  # noqa: E402

ENVS = os.path.join(ROOT, ".bench-envs")
METHODS = {
    # name: (venv, worker, setup script, extra worker args)
    "llmc-awq": ("llmcompressor", "llmcompressor_worker.py", "setup_llmcompressor_env.sh", ["--method", "awq"]),
    "llmc-gptq": ("llmcompressor", "llmcompressor_worker.py", "setup_llmcompressor_env.sh", ["--method", "gptq"]),
    "autoround": ("autoround", "autoround_worker.py", "setup_autoround_env.sh", []),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def save(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run_worker(method, model, calib_pt, eval_pt, w_bit, group, work, max_eval, timeout_s):
    env_name, worker, _, extra = METHODS[method]
    tag = f"{method}-w{w_bit}-g{group}-{os.path.basename(calib_pt)[:-3]}"
    out = os.path.join(work, f"{tag}.json")
    logf = os.path.join(work, f"{tag}.log")
    cmd = [
        os.path.join(ENVS, env_name, "bin", "python"),
        os.path.join(BENCH, worker),
        "--model",
        model,
        "--calib-windows",
        calib_pt,
        "--eval-windows",
        eval_pt,
        "--w-bit",
        str(w_bit),
        "--group-size",
        str(group),
        "--out",
        out,
        *extra,
    ]
    if max_eval:
        cmd += ["--max-eval-windows", str(max_eval)]
    if method == "autoround":
        cmd += ["--export-dir", os.path.join(work, f"{tag}-ckpt")]
    if os.path.exists(out):
        os.remove(out)
    log(f"{tag}: running (log {logf})")
    t = time.perf_counter()
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log(f"{tag}: stopped after {timeout_s} s")
            return {"status": "timeout", "wall_seconds": round(time.perf_counter() - t, 1), "log": logf}
    wall = round(time.perf_counter() - t, 1)
    if rc != 0 or not os.path.exists(out):
        with open(logf) as lf:
            tail = lf.read()[-2000:]
        log(f"{tag}: failed (rc {rc}):\n{tail}")
        return {"status": f"failed rc={rc}", "wall_seconds": wall, "log": logf, "log_tail": tail[-600:]}
    with open(out) as f:
        r = json.load(f)
    log(
        f"{tag}: ppl {r['ppl']:.4f} kl {r.get('kl_mean', float('nan')):.5f} "
        f"quant {r['quant_seconds']:.0f} s ({r.get('quant_cpu_seconds', float('nan')):.0f} CPU s), "
        f"peak RSS {r['peak_rss_mib']:.0f} MiB, wall {wall:.0f} s"
    )
    return {"status": "ok", "wall_seconds": wall, "log": logf, **r}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "fixture", "model"))
    ap.add_argument(
        "--name", default=None, help="results name (default: 'fixture' for fixture/model, else the folder name)"
    )
    ap.add_argument("--calib", default=os.path.join(ROOT, "fixture", "data", "calib.txt"))
    ap.add_argument("--eval", default=os.path.join(ROOT, "fixture", "data", "eval.txt"))
    ap.add_argument("--configs", default="4:128,4:64,3:128,3:64", help="w_bit:group_size,...")
    ap.add_argument("--methods", default="llmc-awq,llmc-gptq,autoround")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-eval-windows", type=int, default=0, help="evaluate only the first N eval windows (0: all)")
    ap.add_argument("--timeout-min", type=float, default=45, help="stop a worker after this many minutes")
    ap.add_argument(
        "--work-dir", default=None, help="windows, worker logs and checkpoints (default /tmp/awqflow-anchors-<name>)"
    )
    ap.add_argument("--out", default=None, help="default bench/results/anchors-<name>.json")
    ap.add_argument("--force", action="store_true", help="rerun runs already in the results file")
    a = ap.parse_args()

    model = os.path.abspath(os.path.expanduser(a.model))
    name = a.name or ("fixture" if model == os.path.join(ROOT, "fixture", "model") else os.path.basename(model))
    work = a.work_dir or f"/tmp/awqflow-anchors-{name}"
    os.makedirs(work, exist_ok=True)
    out_path = a.out or os.path.join(BENCH, "results", f"anchors-{name}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    methods = a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m}; known: {', '.join(METHODS)}")
    for script in sorted({METHODS[m][2] for m in methods}):
        subprocess.run(["bash", os.path.join(BENCH, script)], check=True)

    tok = AutoTokenizer.from_pretrained(model)
    calib = calibration_windows(a.calib, tok, a.n_samples, a.seqlen, seed=0)
    calib_key = f"{a.n_samples}x{a.seqlen}"
    calib_pt = os.path.join(work, f"calib-{calib_key}.pt")
    torch.save(calib, calib_pt)
    with open(a.eval, encoding="utf-8") as f:
        ev_all = eval_windows(tok, f.read(), a.eval_seqlen)
    ev = ev_all[: a.max_eval_windows].clone() if a.max_eval_windows else ev_all
    eval_pt = os.path.join(work, f"eval-{ev.shape[0]}x{a.eval_seqlen}.pt")
    torch.save(ev, eval_pt)
    eval_fp = tensor_fingerprint(ev)

    data = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            data = json.load(f)
        if data.get("eval", {}).get("fingerprint") != eval_fp:
            log(f"{out_path} was made with other eval windows: starting it afresh")
            data = {}
    if not data:
        log(f"FP perplexity on {ev.shape[0]} x {a.eval_seqlen} eval windows ...")
        fp = evaluate(load_fp_model(model), ev)
        data = {
            "model": model,
            "name": name,
            "date": time.strftime("%Y-%m-%d"),
            "machine": {
                "cpu_cores": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(),
                "note": "shared 2-core machine, runs under nice -n 19; other jobs may have run at the same time",
            },
            "eval": {
                "text": os.path.relpath(a.eval, ROOT),
                "seqlen": a.eval_seqlen,
                "windows": int(ev.shape[0]),
                "windows_available": int(ev_all.shape[0]),
                "tokens_predicted": fp["tokens"],
                "fingerprint": eval_fp,
                "fingerprint_all_windows": tensor_fingerprint(ev_all),
            },
            "fp_ppl": fp["ppl"],
            "calibration": {},
            "runs": [],
        }
    data.setdefault("calibration", {})[calib_key] = {
        "text": os.path.relpath(a.calib, ROOT),
        "n_samples": a.n_samples,
        "seqlen": a.seqlen,
        "seed": 0,
        "fingerprint": tensor_fingerprint(calib),
    }
    save(out_path, data)
    log(
        f"{name}: FP ppl {data['fp_ppl']:.4f}; eval {ev.shape[0]} x {a.eval_seqlen} ({eval_fp}); "
        f"calibration {calib_key} ({data['calibration'][calib_key]['fingerprint']}); work dir {work}"
    )

    for cfg in a.configs.split(","):
        w_bit, group = map(int, cfg.split(":"))
        for method in methods:
            key = {"method": method, "w_bit": w_bit, "group_size": group, "calib": calib_key}
            done = [r for r in data["runs"] if all(r.get(k) == v for k, v in key.items()) and r.get("status") == "ok"]
            if done and not a.force:
                log(f"{method} w{w_bit} g{group} {calib_key}: already in {out_path}, skipped")
                continue
            r = run_worker(
                method, model, calib_pt, eval_pt, w_bit, group, work, a.max_eval_windows, int(a.timeout_min * 60)
            )
            r.pop("method", None)
            if r.get("status") == "ok" and abs(r["fp_ppl"] - data["fp_ppl"]) > 1e-3 * data["fp_ppl"]:
                log(f"warning: the worker's FP reference ppl {r['fp_ppl']} differs from {data['fp_ppl']}")
            data["runs"] = [x for x in data["runs"] if not all(x.get(k) == v for k, v in key.items())]
            data["runs"].append({**key, **r, "date": time.strftime("%Y-%m-%d %H:%M")})
            save(out_path, data)

    print(f"\n{name}: FP ppl {data['fp_ppl']:.4f}, {data['eval']['windows']} eval windows x {data['eval']['seqlen']}")
    print(
        "| method | w | g | calib | ppl | KL to FP | quant s (wall) | quant s (CPU) | peak RSS MiB |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for r in sorted(data["runs"], key=lambda r: (-r["w_bit"], -r["group_size"], r["calib"], r["method"])):
        if r.get("status") == "ok":
            print(
                f"| {r['method']} | {r['w_bit']} | {r['group_size']} | {r['calib']} | {r['ppl']:.4f} | "
                f"{r['kl_mean']:.5f} | {r['quant_seconds']:.0f} | {r.get('quant_cpu_seconds', float('nan')):.0f} | "
                f"{r['peak_rss_mib']:.0f} |"
            )
        else:
            print(f"| {r['method']} | {r['w_bit']} | {r['group_size']} | {r['calib']} | {r.get('status')} | | | | |")


if __name__ == "__main__":
    main()
