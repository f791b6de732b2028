"""Perplexity and KL to the FP model, several models on the same windows in one pass."""

import math

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from awqflow.stages.perplexity import perplexities


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50
    )
    return LlamaForCausalLM(config).eval()


def direct(model, reference, windows):
    """ppl and mean KL(P_ref || P_model) over tokens 1..seqlen-1 of each window, written out."""
    with torch.no_grad():
        logq = F.log_softmax(model(windows).logits[:, :-1].double(), -1)
        logp = F.log_softmax(reference(windows).logits[:, :-1].double(), -1)
    nll = -logq.gather(-1, windows[:, 1:, None]).mean()
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return math.exp(float(nll)), float(kl)


def test_each_model_gets_its_own_perplexity_and_kl_to_the_reference():
    fp, a, b = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    windows = torch.randint(0, 50, (6, 12))
    r = perplexities({"FP": fp, "A": a, "B": b}, windows, reference="FP", batch_size=4)  # 2 batches
    assert "kl" not in r["FP"] and r["FP"]["tokens"] == 6 * 11
    assert math.isclose(r["FP"]["ppl"], direct(fp, fp, windows)[0], rel_tol=1e-5)
    for label, model in (("A", a), ("B", b)):
        ppl, kl = direct(model, fp, windows)
        assert math.isclose(r[label]["ppl"], ppl, rel_tol=1e-5)
        assert math.isclose(r[label]["kl"], kl, rel_tol=1e-4) and kl > 0
    assert r["A"]["kl"] != r["B"]["kl"]
