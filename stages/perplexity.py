"""Perplexity (SPEC §7) and KL to a reference model: the text tokenized once, non-overlapping windows,
exp(mean NLL) over every predicted token. The same windows go to the FP, RTN and quantized models."""

import math

import torch
import torch.nn.functional as F

# exp() of a mean NLL above this overflows a float: such a perplexity is reported as inf
MAX_NLL = math.log(torch.finfo(torch.float64).max)


def eval_windows(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """log P(next token) at every position but the last, float32 (batch * (seqlen - 1), vocab)."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)


def perplexities(models: dict, windows: torch.Tensor, reference: str | None = None, batch_size: int = 4) -> dict:
    """{label: {ppl, nll, tokens, windows}} for every model, on the same windows; with `reference` (the
    label of the FP model among them), every other model also gets kl: the mean KL(P_reference ||
    P_model) over the predicted tokens. The reference runs once per batch, however many models."""
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    count = 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            target = batch[:, 1:].reshape(-1)
            log_ref = None
            for label in sorted(models, key=lambda k: k != reference):  # the reference first
                model = models[label]
                log_p = log_probs(model, batch.to(next(model.parameters()).device))
                nll[label] += float(F.nll_loss(log_p, target.to(log_p.device), reduction="sum"))
                if label == reference:
                    log_ref = log_p
                elif log_ref is not None:
                    kl[label] += float(F.kl_div(log_p, log_ref.to(log_p.device), log_target=True, reduction="sum"))
            count += target.numel()
    results = {}
    for label in models:
        mean = nll[label] / count
        results[label] = {
            "ppl": math.exp(mean) if mean < MAX_NLL else math.inf,
            "nll": mean,
            "tokens": count,
            "windows": int(windows.shape[0]),
        }
        if reference is not None and label != reference:
            results[label]["kl"] = kl[label] / count
    return results


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, reference=None) -> dict:
    """perplexities of one model, with kl to the `reference` model when given."""
    models = {"model": model} if reference is None else {"model": model, "reference": reference}
    return perplexities(models, windows, "reference" if reference is not None else None, batch_size)["model"]
