"""Perplexity of any checkpoint awqflow reads or writes (and KL to a reference model), on SPEC §7
windows of a text file."""

import os

import torch
from transformers import AutoTokenizer

from awqflow.load import load_model
from awqflow.stages.perplexity import eval_windows, perplexities
from awqflow.storage.checkpoint import read_config_json


def evaluate_checkpoints(
    checkpoints: dict[str, str],
    text_file: str,
    seqlen: int | None = None,
    device: str | None = None,
    reference: str | None = None,
) -> dict[str, dict]:
    """{label: {ppl, nll, tokens, windows, seqlen}} for every checkpoint folder, on the same windows of
    text_file (tokenized by the first checkpoint's tokenizer), each with kl (mean over the predicted
    tokens) to the checkpoint labelled `reference` when given. All are loaded at once, so the
    reference's logits are computed once per batch for all of them."""
    first = next(iter(checkpoints.values()))
    config = read_config_json(first)
    if not os.path.exists(text_file):
        raise FileNotFoundError(f"evaluation text {text_file} does not exist")
    seqlen = seqlen or min(2048, config.get("max_position_embeddings", 2048))
    with open(text_file, encoding="utf-8") as f:
        windows = eval_windows(AutoTokenizer.from_pretrained(first), f.read(), seqlen)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = {label: load_model(path, device) for label, path in checkpoints.items()}
    return {label: {**r, "seqlen": seqlen} for label, r in perplexities(models, windows, reference).items()}


def evaluate(
    model_dir: str, text_file: str, seqlen: int | None = None, device: str | None = None, reference: str | None = None
) -> dict:
    """evaluate_checkpoints of one checkpoint, with kl to the model in the `reference` folder when given."""
    checkpoints = {"model": model_dir} if reference is None else {"model": model_dir, "reference": reference}
    return evaluate_checkpoints(checkpoints, text_file, seqlen, device, reference and "reference")["model"]
