"""Content fingerprints for cache keys: what a result depends on, hashed."""

import hashlib
import json
import os
from pathlib import Path

import torch

_CHUNK = 16 << 20


def file_digest(path: str, h=None):
    h = h or hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h


def model_fingerprint(model_dir: str) -> str:
    """Hash of config.json and every safetensors file's bytes (names included): any weight change shows."""
    h = hashlib.blake2b(digest_size=16)
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors") or n == "config.json")
    if not names:
        raise FileNotFoundError(f"no config.json or safetensors files in {model_dir}")
    for name in names:
        h.update(name.encode())
        file_digest(os.path.join(model_dir, name), h)
    return h.hexdigest()


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()


def code_fingerprint() -> str:
    """The algorithm's source: changing any stage invalidates every cached result."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted((Path(__file__).resolve().parents[1] / "stages").glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
