"""awqflow vs llm-compressor on the bundled model: same calibration windows, same eval windows.

For w4/w3 x g64/g128 (asymmetric, lm_head kept): awqflow AWQ (with and without its clip search,
which llm-compressor's AWQ does not have), awqflow RTN, llm-compressor AWQModifier and
GPTQModifier. llm-compressor runs in its own venv (bench/setup_llmcompressor_env.sh) through
bench/llmcompressor_worker.py; awqflow runs here. Prints perplexities and wall times side by side
and writes them to bench/results/compare_llmcompressor.json.

    .venv/bin/python bench/compare_llmcompressor.py [--configs 4:128,3:64] [--n-samples 128]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from awqflow import pipeline  # noqa: E402
from awqflow.load import load_model  # noqa: E402
from awqflow.options import Options  # noqa: E402
from awqflow.stages.calibration import calibration_windows  # noqa: E402
from awqflow.stages.perplexity import eval_windows, perplexity  # noqa: E402
from awqflow.storage.fingerprint import tensor_fingerprint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLMC_PY = os.path.join(ROOT, ".bench-envs", "llmcompressor", "bin", "python")


def ours(model, tmp, windows_eval, label, **opts):
    out = f"{tmp}/{label}"
    t = time.perf_counter()
    pipeline.run(model, out, Options(work_dir=f"{tmp}/work", **opts))
    seconds = time.perf_counter() - t
    return {"ppl": perplexity(load_model(out), windows_eval)["ppl"], "seconds": seconds}


def theirs(model, tmp, method, w_bit, group):
    out = f"{tmp}/llmc-{method}-{w_bit}-{group}.json"
    subprocess.run(
        [
            LLMC_PY,
            os.path.join(ROOT, "bench", "llmcompressor_worker.py"),
            "--model",
            model,
            "--calib-windows",
            f"{tmp}/calib.pt",
            "--eval-windows",
            f"{tmp}/eval.pt",
            "--method",
            method,
            "--w-bit",
            str(w_bit),
            "--group-size",
            str(group),
            "--out",
            out,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(out) as f:
        r = json.load(f)
    return {"ppl": r["ppl"], "seconds": r["quant_seconds"], "version": r.get("llmcompressor_version")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "fixture", "model"))
    ap.add_argument("--calib", default=os.path.join(ROOT, "fixture", "data", "calib.txt"))
    ap.add_argument("--eval", default=os.path.join(ROOT, "fixture", "data", "eval.txt"))
    ap.add_argument("--configs", default="4:128,4:64,3:128,3:64", help="w_bit:group_size,...")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "compare_llmcompressor.json"))
    a = ap.parse_args()
    subprocess.run(["bash", os.path.join(ROOT, "bench", "setup_llmcompressor_env.sh")], check=True)

    tmp = tempfile.mkdtemp(prefix="awqflow-compare-")
    tok = AutoTokenizer.from_pretrained(a.model)
    calib = calibration_windows(a.calib, tok, a.n_samples, a.seqlen)
    torch.save(calib, f"{tmp}/calib.pt")
    with open(a.eval, encoding="utf-8") as f:
        ev = eval_windows(tok, f.read(), a.seqlen)
    torch.save(ev, f"{tmp}/eval.pt")
    fp = perplexity(load_model(a.model), ev)["ppl"]
    common = dict(calib=a.calib, n_samples=a.n_samples, seqlen=a.seqlen)

    rows = []
    for cfg in a.configs.split(","):
        w_bit, group = map(int, cfg.split(":"))
        q = dict(w_bit=w_bit, group_size=group)
        row = {
            "w_bit": w_bit,
            "group_size": group,
            "fp": fp,
            "rtn": ours(a.model, tmp, ev, f"rtn-{cfg}", method="rtn", **q, **common),
            "awqflow_awq": ours(a.model, tmp, ev, f"awq-{cfg}", **q, **common),
            "awqflow_awq_noclip": ours(a.model, tmp, ev, f"awqnc-{cfg}", clip=False, **q, **common),
            "llmc_awq": theirs(a.model, tmp, "awq", w_bit, group),
            "llmc_gptq": theirs(a.model, tmp, "gptq", w_bit, group),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    cols = ["rtn", "awqflow_awq", "awqflow_awq_noclip", "llmc_awq", "llmc_gptq"]
    print(
        f"\nbundled model, FP ppl {fp:.3f}; {ev.shape[0]} eval windows x {a.seqlen}; "
        f"calibration {a.n_samples} x {a.seqlen}; ppl (quantization seconds)"
    )
    print("| w | g | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for r in rows:
        print(
            f"| {r['w_bit']} | {r['group_size']} | "
            + " | ".join(f"{r[c]['ppl']:.3f} ({r[c]['seconds']:.0f} s)" for c in cols)
            + " |"
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(
            {
                "date": time.strftime("%Y-%m-%d"),
                "cpu_cores": os.cpu_count(),
                "n_samples": a.n_samples,
                "seqlen": a.seqlen,
                "calib_fingerprint": tensor_fingerprint(calib),
                "eval_fingerprint": tensor_fingerprint(ev),
                "fp_ppl": fp,
                "rows": rows,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
