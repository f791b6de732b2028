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


def _log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """log P(next token) at every position but the last, float32 (batch * (seqlen - 1), vocab)."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    return F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, reference=None) -> dict:
    """{ppl, nll, tokens, windows}, plus kl: the mean KL(P_reference || P_model) over the same
    predicted tokens when a reference model (the FP one) is given."""
    device = next(model.parameters()).device
    nll, kl, count = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            log_p = _log_probs(model, batch)
            nll += float(F.nll_loss(log_p, batch[:, 1:].reshape(-1), reduction="sum"))
            if reference is not None:
                log_ref = _log_probs(reference, batch)
                kl += float(F.kl_div(log_p, log_ref, log_target=True, reduction="sum"))
            count += batch[:, 1:].numel()
    mean = nll / count
    result = {
        "ppl": math.exp(mean) if mean < MAX_NLL else math.inf,
        "nll": mean,
        "tokens": count,
        "windows": int(windows.shape[0]),
    }
    if reference is not None:
        result["kl"] = kl / count
    return result
