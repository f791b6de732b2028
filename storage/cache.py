"""Content-addressed cache of per-block results: <root>/<key[:2]>/<key>.safetensors + .json.

Keys come from storage.fingerprint (model content, block, quant config, calibration, code version).
Writes go to a temporary name and are renamed into place, data before its checksum record, so a
crash leaves either nothing or a complete entry; two runs writing one key write identical bytes.
A read verifies the checksum: a corrupt entry is reported, removed and treated as missing.
"""

import hashlib
import json
import logging
import uuid

import fsspec
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

log = logging.getLogger("awqflow.cache")


class BlockCache:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def _paths(self, key: str) -> tuple[str, str]:
        base = f"{self.root}/{key[:2]}/{key}"
        return base + ".safetensors", base + ".json"

    def _atomic_write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    def put(self, key: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
        data_path, meta_path = self._paths(key)
        self.fs.makedirs(data_path.rpartition("/")[0], exist_ok=True)
        blob = save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        self._atomic_write(data_path, blob)
        meta = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "info": info}
        self._atomic_write(meta_path, json.dumps(meta).encode())

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, info) or None when missing or corrupt."""
        data_path, meta_path = self._paths(key)
        if not (self.fs.exists(meta_path) and self.fs.exists(data_path)):
            return None
        try:
            meta = json.loads(self.fs.cat_file(meta_path))
            blob = self.fs.cat_file(data_path)
            if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                raise ValueError("checksum mismatch")
            return load_bytes(blob), meta["info"]
        except Exception as e:  # any unreadable entry is recomputed, never used
            log.warning("cache entry %s is corrupt (%s): removing it and recomputing", key, e)
            for p in (data_path, meta_path):
                if self.fs.exists(p):
                    self.fs.rm(p)
            return None

    def nbytes(self) -> int:
        return sum(self.fs.du(self.root, total=False).values()) if self.fs.exists(self.root) else 0
