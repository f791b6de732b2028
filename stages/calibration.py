"""Calibration token windows (SPEC §2): documents concatenated and cut into n x seqlen, never padded."""

import os
import random

import torch

# Short names for the usual calibration sets: (dataset path, config, split, text field, data_files).
KNOWN_DATASETS = {
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "text", None),
    "wikitext": ("wikitext", "wikitext-2-raw-v1", "train", "text", None),
    "c4": ("allenai/c4", None, "train", "text", {"train": "en/c4-train.00000-of-01024.json.gz"}),
}
_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Windows held out of the tuning to judge it (learned rounding, end-to-end tuning): a quarter, at most 4.
# Each one held out is one fewer to tune on (bundled w4 g128, 128 windows, ppl / KL: 50.614 / 0.00098
# holding out 32, 50.597 / 0.00090 holding out 8; SmolLM2 w4 g64, 32 windows, bf16, 150 steps:
# 11.044 / 0.08001 holding out 8, 10.960 / 0.07666 holding out 4)
HELD_OUT = 4


def held_out(n: int) -> int:
    """How many of n calibration windows (the last ones) are held out of every fit, to judge it."""
    return min(n // 4, HELD_OUT)


def load_documents(source: str, text_field: str = "text", split: str | None = None) -> list[str]:
    """Texts from a local .txt/.jsonl/.json/.parquet file or a datasets name ("pileval", "wikitext", "c4",
    or any hub path). A .txt file is one document (its lines are not independent samples)."""
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if ext in _LOCAL_BUILDERS:
        if not os.path.exists(source):
            raise FileNotFoundError(f"calibration file {source} does not exist")
        ds = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files=source, split="train")
        if ext == ".txt":
            return ["\n".join(ds["text"])]
    else:
        path, config, default_split, field, files = KNOWN_DATASETS.get(
            source, (source, None, "train", text_field, None)
        )
        text_field = field if source in KNOWN_DATASETS else text_field
        try:
            ds = datasets.load_dataset(path, config, split=split or default_split, data_files=files)
        except Exception as e:  # offline, unknown name, or a hub error: all end the same way for the user
            raise RuntimeError(
                f"could not load calibration dataset {source!r} ({type(e).__name__}: {str(e)[:200]}). "
                f"Without network access pass a local file instead: --calib my_text.txt (or .jsonl/.parquet)"
            ) from None
    if text_field not in ds.column_names:
        raise KeyError(
            f"calibration data {source} has no field {text_field!r} (fields: {ds.column_names}): pass --text-field"
        )
    return [t for t in ds[text_field] if t and t.strip()]


def calibration_windows(
    source: str, tokenizer, n_samples: int = 128, seqlen: int = 512, text_field: str = "text", seed: int = 0
) -> torch.Tensor:
    """(n_samples, seqlen) token ids: documents shuffled with `seed`, concatenated, cut into windows."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} x {seqlen}")
    docs = load_documents(source, text_field)
    random.Random(seed).shuffle(docs)
    need = n_samples * seqlen
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(
            f"calibration data {source} has {len(ids)} tokens, fewer than the {need} needed for "
            f"{n_samples} x {seqlen}: lower --n-samples/--seqlen or add text"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_samples, seqlen)
