"""Prefect flow `requantize`: quantize every new or changed checkpoint in a folder, skip the rest.

Each immediate subfolder of `checkpoints` holding a config.json is a checkpoint. It is fingerprinted by
content (config.json + safetensors) and quantized by the `awq` flow into
`<output_root>/<name>-<fingerprint[:12]>`. A JSON ledger in the output root remembers what is done
(name -> fingerprint -> output dir) and each checkpoint's file stats (name, size, mtime_ns) with their
fingerprint, so an unchanged checkpoint is skipped after a few stat() calls: no hashing, no model load.

`scan()` is plain Python (the tests call it with a fake quantize function); the flow is a thin wrapper.
"""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from prefect import flow, get_run_logger

from awqflow.flows.awq import awq
from awqflow.options import Options
from awqflow.pipeline import default_work_dir
from awqflow.storage.fingerprint import model_fingerprint

LEDGER = "awqflow-ledger.json"


def find_checkpoints(checkpoints_dir: str, exclude: str | None = None) -> dict[str, str]:
    """{name: path} of the immediate subfolders with a config.json (the output root itself excluded)."""
    exclude = os.path.realpath(exclude) if exclude else None
    found = {}
    for entry in sorted(os.scandir(checkpoints_dir), key=lambda e: e.name):
        if (
            entry.is_dir()
            and os.path.isfile(os.path.join(entry.path, "config.json"))
            and os.path.realpath(entry.path) != exclude
        ):
            found[entry.name] = entry.path
    return found


def file_stats(model_dir: str) -> list[list]:
    """[name, size, mtime_ns] of exactly the files model_fingerprint hashes."""
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors") or n == "config.json")
    return [[n, (st := os.stat(os.path.join(model_dir, n))).st_size, st.st_mtime_ns] for n in names]


def load_ledger(output_root: str) -> dict:
    path = os.path.join(output_root, LEDGER)
    if not os.path.exists(path):
        return {"done": {}, "stats": {}}
    with open(path, encoding="utf-8") as f:
        ledger = json.load(f)
    ledger.setdefault("done", {})
    ledger.setdefault("stats", {})
    return ledger


def save_ledger(output_root: str, ledger: dict) -> None:
    """Atomic: a crash leaves the old ledger or the new one, never half of one."""
    os.makedirs(output_root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ledger-", suffix=".tmp", dir=output_root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(ledger, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(output_root, LEDGER))
    except BaseException:
        os.unlink(tmp)
        raise


def cached_fingerprint(model_dir: str, ledger: dict) -> tuple[str, bool]:
    """(fingerprint, cache hit): re-hash only when a file's name, size or mtime_ns changed."""
    key = os.path.realpath(model_dir)
    stats = file_stats(model_dir)
    hit = ledger["stats"].get(key)
    if hit and hit["files"] == stats:
        return hit["fingerprint"], True
    fp = model_fingerprint(model_dir)
    ledger["stats"][key] = {"files": stats, "fingerprint": fp}
    return fp, False


def is_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def hub_checkpoints(hub: list[str], log: Callable[[str], None]) -> dict[str, str]:
    """ "org/model[@revision]" entries -> {name: local snapshot}; all skipped, with a warning, when offline."""
    if not hub:
        return {}
    if is_offline():
        log(f"WARNING: HF_HUB_OFFLINE is set: skipping hub checkpoints {', '.join(hub)}")
        return {}
    from huggingface_hub import snapshot_download

    found = {}
    for entry in hub:
        model_id, _, revision = entry.partition("@")
        name = model_id.replace("/", "--") + (f"@{revision}" if revision else "")
        found[name] = snapshot_download(
            model_id, revision=revision or None, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
        )
    return found


def scan(
    checkpoints_dir: str,
    output_root: str,
    quantize: Callable[[str, str], object],
    hub: list[str] | None = None,
    settle_s: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Quantize new or changed checkpoints with quantize(model_dir, out_dir); returns
    {"quantized": {name: out}, "skipped": {name: out}, "unsettled": [names], "failed": {name: error}}."""
    ledger = load_ledger(output_root)
    checkpoints = find_checkpoints(checkpoints_dir, exclude=output_root)
    checkpoints.update(hub_checkpoints(hub or [], log))
    summary = {"quantized": {}, "skipped": {}, "unsettled": [], "failed": {}}
    for name, path in checkpoints.items():
        stats = file_stats(path)
        if settle_s and any(time.time_ns() - mtime < settle_s * 1e9 for _, _, mtime in stats):
            log(f"{name}: modified less than {settle_s:g} s ago, maybe still being written; next scan")
            summary["unsettled"].append(name)
            continue
        fp, hit = cached_fingerprint(path, ledger)
        out = ledger["done"].get(name, {}).get(fp)
        if out and os.path.isfile(os.path.join(out, "config.json")):
            log(f"{name}: unchanged ({fp[:12]}{', fingerprint cached' if hit else ''}), already in {out}")
            summary["skipped"][name] = out
            continue
        out = os.path.join(output_root, f"{name}-{fp[:12]}")
        log(f"{name}: {'changed' if name in ledger['done'] else 'new'} ({fp[:12]}), quantizing into {out}")
        try:
            quantize(path, out)
        except Exception as exc:  # the other checkpoints still get their turn
            log(f"{name}: quantization failed: {exc!r}")
            summary["failed"][name] = repr(exc)
            continue
        ledger["done"].setdefault(name, {})[fp] = out
        save_ledger(output_root, ledger)  # after every success: a crash loses at most the running one
        summary["quantized"][name] = out
    save_ledger(output_root, ledger)  # the fingerprint cache, even when nothing was quantized
    return summary


@flow(name="requantize", log_prints=True)
def requantize(
    checkpoints: str,
    output_root: str,
    options: Options = Options(),
    hub: list[str] | None = None,
    settle_s: float = 30.0,
) -> dict:
    """Run the `awq` flow with `options` on each new or changed checkpoint under `checkpoints` (and `hub`
    entries "org/model[@revision]" when online). Files modified less than `settle_s` seconds ago are
    left for the next scan."""
    logger = get_run_logger()

    def quantize(model_dir: str, out: str):
        name = os.path.basename(out)
        result = awq.with_options(flow_run_name=f"awq-{name}")(model=model_dir, out=out, options=options)
        if options.work_dir is None:  # a finished checkpoint needs its activations and block cache no more
            shutil.rmtree(default_work_dir(out), ignore_errors=True)
        return result

    summary = scan(checkpoints, output_root, quantize, hub=hub, settle_s=settle_s, log=logger.info)
    logger.info(
        "quantized %d, skipped %d, unsettled %d, failed %d",
        len(summary["quantized"]),
        len(summary["skipped"]),
        len(summary["unsettled"]),
        len(summary["failed"]),
    )
    if summary["failed"]:
        raise RuntimeError(f"quantization failed for {sorted(summary['failed'])}: {summary['failed']}")
    return summary
