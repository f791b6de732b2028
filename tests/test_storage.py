import threading

import pytest
import torch

from awqflow.storage.cache import BlockCache
from awqflow.storage.fingerprint import key, model_fingerprint


@pytest.mark.parametrize("url", ["local", "memory://awqflow-test-cache"])
def test_cache_round_trip_on_local_disk_and_fsspec_urls(url, tmp_path):
    cache = BlockCache(str(tmp_path / "c") if url == "local" else url)
    k = key("block", "model", 3)
    assert cache.get(k) is None
    t = {"w": torch.arange(12, dtype=torch.int32).view(3, 4), "s": torch.randn(4).half()}
    cache.put(k, t, {"alpha": 0.5})
    tensors, info = cache.get(k)
    assert info == {"alpha": 0.5} and all(tensors[n].equal(t[n]) for n in t)
    assert cache.nbytes() > 0


def test_corrupt_entry_is_dropped_not_used(tmp_path, caplog):
    cache = BlockCache(str(tmp_path))
    cache.put("ab" * 32, {"w": torch.ones(4)}, {})
    data = next(tmp_path.rglob("*.safetensors"))
    data.write_bytes(data.read_bytes()[:-3])  # truncated by a crash or a bad disk
    assert cache.get("ab" * 32) is None
    assert "corrupt" in caplog.text
    assert not data.exists()


def test_concurrent_writers_of_one_key_leave_one_valid_entry(tmp_path):
    cache = BlockCache(str(tmp_path))
    t = {"w": torch.randn(256, 256)}
    threads = [threading.Thread(target=cache.put, args=("cd" * 32, t, {"n": 1})) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    tensors, _ = cache.get("cd" * 32)
    assert tensors["w"].equal(t["w"])
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_model_fingerprint_follows_content(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    assert model_fingerprint(str(copy)) == model_fingerprint(str(tiny_model))
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert model_fingerprint(str(copy)) != model_fingerprint(str(tiny_model))
