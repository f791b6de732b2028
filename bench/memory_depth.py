"""Memory flat in depth: peak RSS of a whole `awqflow quantize` for two random-weight Llama models of
the same width, one 4x deeper than the other (8 and 32 blocks by default).

Blocks are loaded, searched and written one at a time, so the deeper model may take longer but must
not need more memory: the target is a ratio <= 1.2. The width is chosen so that the weights matter
(32 fp32 blocks of hidden 512 are 0.4 GB, against 0.1 GB for 8), not drowned by the activations of
one block (8 x 128 calibration tokens: 2 MB). Random weights are fine here: only shapes and memory are measured. The
models are written under a temporary folder with the bundled tokenizer, quantized by the CLI in a
subprocess (ru_maxrss from wait4), and deleted.

    nice .venv/bin/python bench/memory_depth.py [--hidden 512] [--depths 8,32] [--n-samples 8] [--seqlen 128]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
FIXTURE = os.path.join(ROOT, "fixture")
AWQFLOW = os.path.join(os.path.dirname(sys.executable), "awqflow")


def random_llama(folder: str, hidden: int, depth: int) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=depth,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        head_dim=64,
        vocab_size=4096,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    for name in os.listdir(os.path.join(FIXTURE, "model")):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(FIXTURE, "model", name), folder)
    return folder


def quantize(model: str, out: str, n_samples: int, seqlen: int) -> dict:
    cmd = [AWQFLOW, "quantize", "--model", model, "--out", out, "--calib", os.path.join(FIXTURE, "data", "calib.txt")]
    cmd += ["--n-samples", str(n_samples), "--seqlen", str(seqlen)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()[-2000:]
    if status:
        raise SystemExit(f"{model}: awqflow quantize failed:\n{err}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--depths", default="8,32")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="awqflow-depth-")
    rows = {}
    try:
        for depth in map(int, a.depths.split(",")):
            model = random_llama(os.path.join(tmp, f"llama-{depth}"), a.hidden, depth)
            weights = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if ".safetensors" in f)
            rows[depth] = {
                "checkpoint_mib": round(weights / 2**20),
                **quantize(model, f"{model}-awq", a.n_samples, a.seqlen),
            }
            print(json.dumps({"blocks": depth, **rows[depth]}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shallow, deep = (rows[d] for d in sorted(rows))
    print(f"\nrandom Llama, hidden {a.hidden}, calibration {a.n_samples} x {a.seqlen}, {time.strftime('%Y-%m-%d')}")
    print("| blocks | fp16 checkpoint MiB | seconds | peak RSS MiB |\n|---|---|---|---|")
    for depth, r in sorted(rows.items()):
        print(f"| {depth} | {r['checkpoint_mib']} | {r['seconds']:.0f} | {r['peak_rss_mib']} |")
    ratio = deep["peak_rss_mib"] / shallow["peak_rss_mib"]
    print(f"peak RSS ratio deep / shallow: {ratio:.2f} (target <= 1.2)")
    with open(os.path.join(BENCH, "results", "memory_depth.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(a), "rows": rows, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
