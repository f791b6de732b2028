"""A Hugging Face checkpoint folder on disk: its config.json and its safetensors tensors by name."""

import json
import os
import struct
from contextlib import ExitStack

import torch
from safetensors import safe_open


def read_config_json(model_dir: str) -> dict:
    """config.json as a dict; a missing folder or file is named with what to pass instead."""
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"model folder {model_dir} does not exist: pass a Hugging Face model directory")
    if not os.path.isdir(model_dir):
        raise NotADirectoryError(f"model {model_dir} is a file, not a folder: pass a Hugging Face model directory")
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {model_dir}: pass a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}): restore the model's config.json") from None


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, after checking that the file holds every byte it
    declares: a truncated or corrupt file is reported here, before any tensor is read."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not a valid safetensors file ({e}): re-download or re-save the checkpoint"
        ) from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated ({size} of {8 + n + end} bytes): re-download or re-save the checkpoint")
    return header


class CheckpointReader:
    """Reads tensors by name from a safetensors checkpoint (one file or an indexed set of shards)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                self.file_of = json.load(f)["weight_map"]
            for name in sorted(set(self.file_of.values())):
                if not os.path.exists(os.path.join(model_dir, name)):
                    raise FileNotFoundError(f"checkpoint shard {name} listed in the index is missing from {model_dir}")
                safetensors_header(os.path.join(model_dir, name))
        elif os.path.exists(single):
            self.file_of = {k: "model.safetensors" for k in safetensors_header(single) if k != "__metadata__"}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {model_dir}: "
                f"awqflow reads safetensors checkpoints (re-save with save_pretrained(safe_serialization=True))"
            )

    def names(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.file_of if k.startswith(prefix))

    def load(self, names, device="cpu") -> dict[str, torch.Tensor]:
        out = {}
        with ExitStack() as stack:
            handles = {}
            for name in names:
                file = self.file_of[name]
                if file not in handles:
                    path = os.path.join(self.model_dir, file)
                    handles[file] = stack.enter_context(safe_open(path, "pt", device=str(device)))
                out[name] = handles[file].get_tensor(name)
        return out
