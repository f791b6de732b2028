"""llm-compressor baseline: quantize one model with AWQ or GPTQ, report perplexity and KL to FP.

Runs INSIDE the isolated env made by bench/setup_llmcompressor_env.sh and never
imports awqflow, so the two projects' dependency pins cannot interfere:

  .bench-envs/llmcompressor/bin/python bench/llmcompressor_worker.py \
      --model DIR --calib-windows calib.pt --eval-windows eval.pt \
      --method awq|gptq|none --w-bit 4|3 --group-size 128 --out result.json

calib.pt / eval.pt: torch.save'd LongTensors (n, seqlen) of token ids (see
bench/_make_windows.py). Scheme: int weights, asymmetric (zero point), group-wise,
lm_head left unquantized. Perplexity is computed on the in-memory fake-quantized model
(SPEC §7: exp(total NLL / predicted tokens), tokens 1..seqlen-1 of each window), and so is the
mean KL(P_fp || P_quant) over the same tokens, P_fp from the float32 FP model reloaded from
--model in this process after quantization (bench/anchor_eval.py, shared with the AutoRound
worker). peak_rss_mib is ru_maxrss of this process when quantization ends (model load +
quantization [+ --save], before the FP reference is loaded for evaluation); peak_rss_mib_total at
exit. saved_at: time.time() once the model is quantized (and saved), before evaluation.
quant_seconds: wall time of oneshot(); quant_cpu_seconds: this process's CPU time (all threads)
over the same call, which a shared or paused machine does not inflate.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anchor_eval import evaluate, load_fp_model, load_windows, peak_rss_mib  # noqa: E402


def quant_recipe(method: str, w_bit: int, group_size: int):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # Explicit scheme: the "W4A16"/"W3A16" presets are symmetric in this version.
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": w_bit,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": group_size,
            },
        }
    }
    if method == "gptq":
        return [GPTQModifier(config_groups=scheme, ignore=["lm_head"])]
    # AWQ is a pure transform (scale search) in llm-compressor >= 0.13; the actual
    # quantization comes from the QuantizationModifier after it. Default Llama
    # mappings, duo_scaling=True, n_grid=20.
    return [
        AWQModifier(duo_scaling=True),
        QuantizationModifier(config_groups=scheme, ignore=["lm_head"]),
    ]


@torch.no_grad()
def check_fake_quantized(model, w_bit: int, group_size: int) -> list[str]:
    """Names of the quantized Linears, after checking that each one's forward really
    uses group-wise asymmetric w_bit weights: module(x) must equal x @ w_hat^T with
    w_hat = (round(clamp(w / s + z)) - z) * s from its own scale / zero point.
    Guards against silently evaluating an FP model. (compressed-tensors rounds
    w / s + z, not round(w / s) + z as in SPEC §5: the two differ only on exact .5
    ties, which do occur with fp16 weights.)"""
    qmin, qmax = -(2 ** (w_bit - 1)), 2 ** (w_bit - 1) - 1  # compressed-tensors codes
    names = []
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale")):
            continue
        w = module.weight.float()
        s = module.weight_scale.float().repeat_interleave(group_size, dim=1)
        z = module.weight_zero_point.float().repeat_interleave(group_size, dim=1)
        assert s.shape == w.shape, (name, tuple(module.weight_scale.shape), tuple(w.shape))
        assert module.weight_zero_point.any(), f"{name}: all-zero zero points (symmetric?)"
        w_hat = (torch.round(torch.clamp(w / s + z, qmin, qmax)) - z) * s
        x = torch.randn(3, w.shape[1])
        y = module(x)
        assert torch.allclose(y, F.linear(x, w_hat, module.bias), rtol=1e-4, atol=1e-5), name
        names.append(name)
    return names


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calib-windows", required=True)
    p.add_argument("--eval-windows", required=True)
    p.add_argument("--method", choices=["awq", "gptq", "none"], required=True)
    p.add_argument("--w-bit", type=int, choices=[3, 4], default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--max-eval-windows", type=int, default=0, help="evaluate only the first N windows (0: all)")
    p.add_argument("--save", help="save the compressed checkpoint here before evaluating")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot

    if not torch.accelerator.is_available():
        # llm-compressor 0.14.0.1 AWQ pins its cached block inputs unconditionally
        # (AWQModifier._apply_smoothing -> IntermediatesCache.pin_memory), which raises
        # "Cannot access accelerator device" on a CPU-only host. Pinning only speeds
        # up host->device copies, so skipping it changes no numbers.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    quant_seconds, quant_cpu_seconds, n_quantized = 0.0, 0.0, 0
    if args.method != "none":
        calib = load_windows(args.calib_windows)
        n, seqlen = calib.shape
        dataset = Dataset.from_dict({"input_ids": calib.tolist()})
        start, cpu_start = time.perf_counter(), time.process_time()
        oneshot(
            model=model,
            dataset=dataset,
            recipe=quant_recipe(args.method, args.w_bit, args.group_size),
            num_calibration_samples=n,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False,
            batch_size=1,
        )
        quant_seconds = time.perf_counter() - start
        quant_cpu_seconds = time.process_time() - cpu_start
        quantized = check_fake_quantized(model, args.w_bit, args.group_size)
        assert quantized and not any("lm_head" in name for name in quantized), quantized
        n_quantized = len(quantized)

    if args.save:
        model.save_pretrained(args.save, save_compressed=True)
    saved_at = time.time()
    rss_quant = peak_rss_mib()
    windows = load_windows(args.eval_windows)
    if args.max_eval_windows:
        windows = windows[: args.max_eval_windows]
    reference = load_fp_model(args.model)
    ev = evaluate(model, windows, reference=reference, log=lambda m: print(m, file=sys.stderr, flush=True))
    result = {
        "method": args.method,
        "w_bit": args.w_bit if args.method != "none" else None,
        "group_size": args.group_size if args.method != "none" else None,
        **ev,
        "quant_seconds": round(quant_seconds, 3),
        "quant_cpu_seconds": round(quant_cpu_seconds, 3),
        "peak_rss_mib": rss_quant,
        "saved_at": saved_at,
        "peak_rss_mib_total": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "version": llmcompressor.__version__,
        "llmcompressor_version": llmcompressor.__version__,
        "torch_version": torch.__version__,
        "quantized_linears": n_quantized,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
