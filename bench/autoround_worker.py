"""AutoRound baseline: quantize one model with auto-round's default recipe, report perplexity and KL to FP.

Runs INSIDE the isolated env made by bench/setup_autoround_env.sh and never imports awqflow:

  .bench-envs/autoround/bin/python bench/autoround_worker.py \\
      --model DIR --calib-windows calib.pt --eval-windows eval.pt \\
      --w-bit 4|3 --group-size 128 --out result.json [--export-dir DIR] [--max-eval-windows N] [--seed N]

calib.pt / eval.pt: torch.save'd LongTensors (n, seqlen) of token ids, as for
bench/llmcompressor_worker.py. AutoRound gets exactly the calibration windows, as a list of
[1, seqlen] tensors (nsamples = n, seqlen = seqlen), and otherwise its default recipe
(SignRound: 200 iterations per block, lr 1/iters, batch size 8, min/max tuning, quantized
inputs from the previous blocks, seed 42; amp and torch.compile left to auto-round's own
defaults, which on a bf16-capable CPU turn both on: the result reports what it chose).
Scheme: int weights, asymmetric (sym=False), group-wise, lm_head kept in full precision.

Export: `save_quantized(dir, format="auto_awq")`, an AutoAWQ GEMM checkpoint (int32 qweight /
qzeros, fp16 scales). auto-round's AutoAWQ packer supports only 4-7 bits (SUPPORTED_AWQ_BITS),
so for w3 the worker exports auto-round's own format ("auto_round") instead and says so.

What is evaluated: the quantized linears as the checkpoint stores them, decoded in float32 as
w = (q - z) * s with the fp16 scales, inside a float32 copy of the FP model (every other tensor:
embeddings, norms, lm_head, from the FP model). For w4 the (q, z, s) are read back from the
exported AutoAWQ tensors (unpacked here with the AutoAWQ nibble order, no awqflow); for w3 they
are taken from the in-memory quantized layers the same way auto-round's packer takes them
(q = clamp(round(W / s + z)), s rounded to fp16). For w4 both readings are computed and must
agree exactly (`decode_check`). Perplexity and KL(P_fp || P_quant) on the eval windows come
from bench/anchor_eval.py, shared with the llm-compressor worker.

Reported: ppl, kl_mean, quant_seconds (wall time of the `quantize()` call only), quant_cpu_seconds
(CPU time of this process, all threads, over the same call), export_seconds,
peak_rss_mib (ru_maxrss when quantization ends, before export and evaluation),
peak_rss_mib_total (at exit), amp / amp_dtype / torch_compile as auto-round chose them.
"""

import argparse
import json
import os
import sys
import time

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anchor_eval import evaluate, load_fp_model, load_windows, peak_rss_mib  # noqa: E402

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an int32 holds column 8j + AWQ_ORDER[i]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 (rows, cols / 8) in the AutoAWQ GEMM order -> int codes (rows, cols)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (rows, cols/8, 8): nibble i
    out = torch.empty_like(nibbles)
    out[..., AWQ_ORDER] = nibbles  # column 8j + AWQ_ORDER[i] <- nibble i
    return out.reshape(packed.shape[0], -1)


def read_awq_checkpoint(folder: str) -> dict[str, dict]:
    """{linear name: {"q": (out, in) codes, "z": (out, in/G) zeros, "s": (out, in/G) fp16 scales}}."""
    tensors = {}
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fname), "pt") as f:
                for key in f.keys():
                    if key.endswith((".qweight", ".qzeros", ".scales")):
                        tensors[key] = f.get_tensor(key)
    layers = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            layers[name] = {
                "q": unpack_awq(tensors[key]).t().contiguous(),  # (in, out) -> (out, in)
                "z": unpack_awq(tensors[name + ".qzeros"]).t().contiguous(),  # (in/G, out) -> (out, in/G)
                "s": tensors[name + ".scales"].t().contiguous(),  # fp16 (out, in/G)
            }
    return layers


def codes_from_memory(model, w_bit: int, group_size: int) -> dict[str, dict]:
    """(q, z, s) of every quantized linear of auto-round's in-memory model, as its packer computes them."""
    maxq = 2**w_bit - 1
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or getattr(m, "scale", None) is None or getattr(m, "bits", 16) > 8:
            continue
        w = m.weight.detach().float()
        out_f, in_f = w.shape
        s = m.scale.detach().float().reshape(out_f, -1)
        z = (
            m.zp.detach().float().reshape(out_f, -1)
            if isinstance(m.zp, torch.Tensor)
            else torch.full_like(s, float(m.zp))
        )
        g = in_f // s.shape[1]
        assert g == group_size or group_size == -1, (name, g, group_size)
        q = torch.round(w / s.repeat_interleave(g, 1) + z.repeat_interleave(g, 1)).clamp_(0, maxq)
        layers[name] = {"q": q.to(torch.int32), "z": torch.round(z).to(torch.int32), "s": s.half()}
    return layers


def decode(layer: dict) -> torch.Tensor:
    s, z, q = layer["s"].float(), layer["z"].float(), layer["q"].float()
    g = q.shape[1] // s.shape[1]
    return (q - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)


@torch.no_grad()
def model_with_weights(model_dir: str, layers: dict[str, dict]):
    model = load_fp_model(model_dir)
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        lin = modules[name]
        w = decode(layer)
        assert w.shape == lin.weight.shape, (name, tuple(w.shape), tuple(lin.weight.shape))
        lin.weight.data.copy_(w)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calib-windows", required=True)
    p.add_argument("--eval-windows", required=True)
    p.add_argument("--w-bit", type=int, choices=[3, 4], default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--export-dir", default=None, help="where save_quantized writes (default: next to --out)")
    p.add_argument("--max-eval-windows", type=int, default=0, help="evaluate only the first N windows (0: all)")
    p.add_argument("--iters", type=int, default=None, help="SignRound steps per block (default: auto-round's, 200)")
    p.add_argument("--seed", type=int, default=None, help="auto-round's seed (default: its own, 42)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import auto_round
    import transformers
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_windows(args.calib_windows)
    n, seqlen = calib.shape
    dataset = [row.view(1, -1).clone() for row in calib]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    kwargs = dict(bits=args.w_bit, group_size=args.group_size, sym=False)
    for key in ("iters", "seed"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    ar = AutoRound(model, tokenizer, dataset=dataset, nsamples=n, seqlen=seqlen, device_map="cpu", **kwargs)
    start, cpu_start = time.perf_counter(), time.process_time()
    qmodel, layer_config = ar.quantize()
    quant_seconds = time.perf_counter() - start
    quant_cpu_seconds = time.process_time() - cpu_start
    rss_quant = peak_rss_mib()

    mc = getattr(ar, "model_context", None)
    chosen = {
        "amp": getattr(mc, "amp", getattr(ar, "amp", None)),
        "amp_dtype": str(getattr(mc, "amp_dtype", getattr(ar, "amp_dtype", None))),
        "torch_compile": getattr(ar, "enable_torch_compile", None),
        "torch_compile_off_reason": getattr(ar, "_torch_compile_off_reason", None),
        "model_dtype_after": str(next(qmodel.parameters()).dtype),
    }
    qc = getattr(ar, "quantize_config", None)
    for key in (
        "iters",
        "lr",
        "minmax_lr",
        "enable_minmax_tuning",
        "enable_quanted_input",
        "nsamples",
        "batch_size",
        "gradient_accumulate_steps",
        "seqlen",
        "sym",
        "bits",
        "group_size",
    ):
        for src in (qc, ar):
            if src is not None and hasattr(src, key):
                v = getattr(src, key)
                chosen[key] = v if isinstance(v, (int, float, bool, str, type(None))) else str(v)
                break
    log(f"auto-round chose: {json.dumps(chosen)}")

    memory_layers = codes_from_memory(qmodel, args.w_bit, args.group_size)
    assert memory_layers and not any("lm_head" in k for k in memory_layers), sorted(memory_layers)

    export_dir = args.export_dir or os.path.splitext(args.out)[0] + "-ckpt"
    fmt = "auto_awq" if args.w_bit == 4 else "auto_round"
    t = time.perf_counter()
    export_error = None
    try:
        ar.save_quantized(export_dir, format=fmt)
    except Exception as e:  # noqa: BLE001 - the in-memory codes are still evaluated; say why there is no export
        if fmt == "auto_awq":
            raise
        export_error = f"{type(e).__name__}: {e}"
        log(f"export to {fmt} failed: {export_error}")
    export_seconds = time.perf_counter() - t
    saved_at = time.time()
    del ar, qmodel, model

    decode_check = None
    if fmt == "auto_awq":
        ckpt_layers = read_awq_checkpoint(export_dir)
        assert set(ckpt_layers) == set(memory_layers), (sorted(ckpt_layers), sorted(memory_layers))
        mismatched = [k for k in ckpt_layers if not torch.equal(decode(ckpt_layers[k]), decode(memory_layers[k]))]
        decode_check = "exact" if not mismatched else f"{len(mismatched)} layers differ: {mismatched[:5]}"
        log(f"checkpoint vs in-memory codes: {decode_check}")
        layers, evaluated = ckpt_layers, "exported AutoAWQ checkpoint, dequantized to float32 in this worker"
    else:
        layers, evaluated = (
            memory_layers,
            (
                "in-memory quantized codes (q, z, fp16 s) as auto-round packs them, "
                "dequantized to float32 (auto_awq export does not support 3 bits)"
            ),
        )

    windows = load_windows(args.eval_windows)
    if args.max_eval_windows:
        windows = windows[: args.max_eval_windows]
    quant = model_with_weights(args.model, layers)
    reference = load_fp_model(args.model)
    ev = evaluate(quant, windows, reference=reference, log=log)
    result = {
        "method": "autoround",
        "w_bit": args.w_bit,
        "group_size": args.group_size,
        **ev,
        "quant_seconds": round(quant_seconds, 3),
        "quant_cpu_seconds": round(quant_cpu_seconds, 3),
        "export_seconds": round(export_seconds, 3),
        "saved_at": saved_at,
        "peak_rss_mib": rss_quant,
        "peak_rss_mib_total": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
        "calib_windows": [n, seqlen],
        "chosen": chosen,
        "export_format": fmt,
        "export_dir": export_dir,
        "export_error": export_error,
        "evaluated": evaluated,
        "decode_check": decode_check,
        "quantized_linears": len(layers),
        "version": auto_round.__version__,
        "autoround_version": auto_round.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
