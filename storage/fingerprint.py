"""Content fingerprints for cache keys: what a result depends on, hashed."""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import torch

# 64 MiB pieces hashed on several threads (sha256 and file reads release the GIL): a 7B checkpoint
# (13.5 GB) is read once at the disk's speed instead of one core's hashing speed.
_PIECE = 64 << 20


def _piece_digest(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(_PIECE)).digest()


def model_fingerprint(model_dir: str) -> str:
    """Hash of config.json and every safetensors file's bytes (names included): any weight change shows.
    A hash of the files' piece hashes, so that the pieces can be hashed in parallel."""
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors") or n == "config.json")
    if not names:
        raise FileNotFoundError(f"no config.json or safetensors files in {model_dir}")
    pieces = [
        (name, offset)
        for name in names
        for offset in range(0, max(os.path.getsize(os.path.join(model_dir, name)), 1), _PIECE)
    ]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda p: _piece_digest(os.path.join(model_dir, p[0]), p[1]), pieces)
        h = hashlib.sha256()
        for (name, offset), digest in zip(pieces, digests):
            h.update(f"{name}:{offset}:".encode() + digest)
    return h.hexdigest()[:32]


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()


# Everything that computes a block result: the stages (methods included), the GEMM packing, the
# pipeline that runs a block, and the libraries whose kernels and model code they call.
_CODE_PACKAGES = ("awqflow.stages",)
_CODE_MODULES = ("awqflow.storage.gemm", "awqflow.pipeline")


def code_fingerprint() -> str:
    """Changing any of it (or upgrading torch or transformers) invalidates every cached result.
    Files are found through the import system, so an editable and a regular install hash the same."""
    import transformers

    files = {Path(find_spec(m).origin) for m in _CODE_MODULES}
    for package in _CODE_PACKAGES:
        files |= set(Path(find_spec(package).origin).parent.rglob("*.py"))
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(files, key=lambda p: (p.parent.name, p.name)):
        h.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes())
    h.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return h.hexdigest()


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
