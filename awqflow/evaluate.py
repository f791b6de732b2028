"""Perplexity of any checkpoint awqflow reads or writes (and KL to a reference model), on SPEC §7
windows of a text file."""

import os

import torch
from transformers import AutoTokenizer

from awqflow.load import load_model
from awqflow.stages.perplexity import eval_windows, perplexity
from awqflow.storage.checkpoint import read_config_json


def evaluate(
    model_dir: str, text_file: str, seqlen: int | None = None, device: str | None = None, reference: str | None = None
) -> dict:
    """{ppl, nll, tokens, windows, seqlen}, and kl (mean over the predicted tokens) to the model in the
    `reference` folder when given."""
    config = read_config_json(model_dir)
    if not os.path.exists(text_file):
        raise FileNotFoundError(f"evaluation text {text_file} does not exist")
    seqlen = seqlen or min(2048, config.get("max_position_embeddings", 2048))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(text_file, encoding="utf-8") as f:
        windows = eval_windows(tokenizer, f.read(), seqlen)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = load_model(reference, device) if reference else None
    return {**perplexity(load_model(model_dir, device), windows, reference=ref), "seqlen": seqlen}
