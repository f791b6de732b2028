"""End-to-end AWQ of a Llama-2-7B-shaped model on one GPU: time per stage and peak GPU memory.

Random weights (LlamaConfig of 7B size), so only the timing means anything. AutoAWQ takes
10-15 min on one GPU, llm-compressor about 7 (shared/SPEC.md §8); the goal here is <= 3 min with
128 x 512 calibration tokens. Peak memory should stay near one block plus its calibration inputs.

    python bench/quantize_7b.py [--layers 32] [--work /tmp/q7b]      # on a CUDA machine
    python bench/quantize_7b.py --tiny                               # plumbing check on CPU
"""

import argparse
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from awqflow import pipeline
from awqflow.options import Options


def build_model(path: str, config: LlamaConfig, device: str) -> None:
    """Random fp16 weights made on the device, saved in 4 GB shards (about 13.5 GB at 7B)."""
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    # a calibration text and a tokenizer: random tokens are enough for timing
    with open(os.path.join(path, "calib.txt"), "w") as f:
        f.write(" ".join(f"w{i % 977}" for i in range(400_000)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 256-wide model on CPU")
    ap.add_argument("--work", default=tempfile.mkdtemp(prefix="awqflow-7b-"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    device = "cpu" if a.tiny else "cuda"
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("bench/quantize_7b.py needs a CUDA GPU (or --tiny for a CPU plumbing check)")
    if a.tiny:
        config = LlamaConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32000,
        )
        a.n_samples, a.seqlen = 8, 128
    else:
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=a.layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
    model_dir = os.path.join(a.work, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        t = time.perf_counter()
        build_model(model_dir, config, device)
        print(f"built the random {config.num_hidden_layers}-layer model in {time.perf_counter() - t:.0f} s")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(977)} | {"<unk>": 977}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model_dir)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    opts = Options(
        calib=os.path.join(model_dir, "calib.txt"),
        n_samples=a.n_samples,
        seqlen=a.seqlen,
        devices=[device],
        work_dir=os.path.join(a.work, "work"),
    )
    t0 = time.perf_counter()
    # timestamps on every line: a run cut short by a time limit still shows how far it got, how fast
    log = lambda m: print(f"[{time.perf_counter() - t0:6.1f} s] {m}", flush=True)  # noqa: E731
    result = pipeline.run(model_dir, os.path.join(a.work, "awq"), opts, pipeline.LocalRunner(log))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    h, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    block_bytes = (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size) * 2  # q, o + k, v + MLP, fp16
    acts = a.n_samples * a.seqlen * h * 2
    print(
        f"\n{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{a.n_samples} x {a.seqlen} calibration tokens"
    )
    print("| stage | seconds |\n|---|---|")
    for k, v in result["timings"].items():
        print(f"| {k} | {v:.1f} |")
    print(
        f"peak GPU memory {peak:.2f} GiB (one fp16 block ~{block_bytes / 2**30:.2f} GiB, "
        f"its calibration input ~{acts / 2**30:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
