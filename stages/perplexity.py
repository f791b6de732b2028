"""Perplexity (SPEC §7): the text tokenized once, non-overlapping windows, exp(mean NLL) over every
predicted token. The same windows go to the FP, RTN and AWQ models."""

import math

import torch
import torch.nn.functional as F


def eval_windows(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> dict:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += batch[:, 1:].numel()
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": int(windows.shape[0])}
