"""Evaluation shared by the anchor workers (llm-compressor, AutoRound): perplexity and KL to FP.

Imported by bench/llmcompressor_worker.py and bench/autoround_worker.py inside their own venvs,
so it needs only torch and transformers, and never imports awqflow.

On every eval window (a row of token ids, seqlen long) the predicted tokens are positions
1..seqlen-1, predicted from positions 0..seqlen-2, as in SPEC §7 and awqflow's `ppl`:

- ppl = exp(total NLL / predicted tokens) of the model under test;
- kl_mean = mean over the same predicted tokens of KL(P_fp || P_quant)
  = sum_v P_fp(v) (log P_fp(v) - log P_quant(v)), P_fp from the float32 FP model on the same
  window in the same process (nats per token);
- fp_ppl: the reference model's own perplexity on the same windows (a check that every run saw
  the same FP model and windows);
- window_nll, window_kl: mean NLL and KL per predicted token of each window, for comparisons paired
  by window (bench/compare_llmcompressor.paired_change).

Sums are accumulated in float64; logits are taken in float32, one window at a time, so memory is
one window's logits per model (512 x 49152 x 4 B = 100 MB for SmolLM2).
"""

import math
import resource
import time

import torch
import torch.nn.functional as F


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def load_fp_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_windows(path: str) -> torch.Tensor:
    w = torch.load(path)
    if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == torch.long):
        raise ValueError(
            f"{path}: expected a (n, seqlen) LongTensor of token ids, got {type(w)} "
            f"{getattr(w, 'shape', None)} {getattr(w, 'dtype', None)}"
        )
    return w


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[0, :-1].float()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None, log=None) -> dict:
    """Perplexity of `model` on `windows` and, given the FP `reference` model, mean KL(P_fp || P_model)."""
    model.eval()
    if reference is not None:
        reference.eval()
    nll = torch.zeros((), dtype=torch.float64)
    fp_nll = torch.zeros((), dtype=torch.float64)
    kl = torch.zeros((), dtype=torch.float64)
    kl_max = 0.0
    tokens = 0
    window_nll, window_kl = [], []
    t = time.perf_counter()
    for i, window in enumerate(windows):
        ids = window.view(1, -1)
        target = ids[0, 1:]
        logq = F.log_softmax(_logits(model, ids), dim=-1)
        window_nll.append(F.nll_loss(logq, target, reduction="sum").double())
        nll += window_nll[-1]
        if reference is not None:
            logp = F.log_softmax(_logits(reference, ids), dim=-1)
            fp_nll += F.nll_loss(logp, target, reduction="sum").double()
            per_token = (logp.exp() * (logp - logq)).sum(-1)
            window_kl.append(per_token.double().sum())
            kl += window_kl[-1]
            kl_max = max(kl_max, float(per_token.max()))
        tokens += target.numel()
        if log is not None and (i + 1) % 10 == 0:
            log(f"eval {i + 1}/{windows.shape[0]} windows, {time.perf_counter() - t:.0f} s")
    out = {
        "ppl": math.exp(float(nll) / tokens),
        "nll": float(nll) / tokens,
        "tokens": tokens,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "eval_seconds": round(time.perf_counter() - t, 1),
        "window_nll": [float(x) / (windows.shape[1] - 1) for x in window_nll],
    }
    if reference is not None:
        out.update(kl_mean=float(kl) / tokens, kl_max_token=kl_max, fp_ppl=math.exp(float(fp_nll) / tokens))
        out["window_kl"] = [float(x) / (windows.shape[1] - 1) for x in window_kl]
    return out
