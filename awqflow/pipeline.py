"""The stages in order, in one place: `run`. The Prefect flow (awqflow.flows.awq) runs this sequence
with each stage as a task and the blocks in parallel; tests and benchmarks that need no Prefect run
the very same sequence with `LocalRunner`."""

import copy
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from transformers import AutoTokenizer

from awqflow.evaluate import evaluate_checkpoints
from awqflow.load import load_model
from awqflow.options import Options
from awqflow.stages.block import checkpoint_tensors, load_block_tensors, scale_block_tensors
from awqflow.stages.calibration import calibration_windows, held_out
from awqflow.stages.capture import capture_block_inputs, embed_windows
from awqflow.stages.end_to_end import tune_end_to_end, windows_kl
from awqflow.stages.method import BlockInputs, Method, linears_of, quantized_linears
from awqflow.stages.methods import method_named
from awqflow.stages.model import OpenModel, blocks_of, open_model, run_block
from awqflow.stages.save import check_output_path, save_checkpoint
from awqflow.storage.activations import ActivationStore
from awqflow.storage.cache import BlockCache
from awqflow.storage.fingerprint import code_fingerprint, key, model_fingerprint, tensor_fingerprint

log = logging.getLogger("awqflow.end_to_end")
# Options that say how a run is executed, not what it computes: left out of the checkpoint's record.
EXECUTION_OPTIONS = {"devices", "task_runner", "work_dir", "eval_text", "eval_seqlen"}


@dataclass(frozen=True)
class Plan:
    """Everything the per-block work needs to know, cheap to pass to any worker process."""

    model_dir: str
    options: Options
    n_blocks: int
    model_fp: str
    code_fp: str
    calib_fp: str | None = None  # once calibration windows exist

    @property
    def model(self) -> OpenModel:
        return open_model(self.model_dir, self.model_fp)

    @property
    def method(self) -> Method:
        return method_named(self.options.method)

    def block_key(self, index: int) -> str:
        o, method = self.options, self.method
        parts = {
            "method": method.name,
            "quant": [o.w_bit, o.group_size, o.zero_point],
            **{name: getattr(o, name) for name in method.options},
        }
        if method.needs_inputs:
            parts.update(mode=o.block_mode, calibration=self.calib_fp)
        return key("block", self.model_fp, index, parts, self.code_fp)

    def end_to_end_key(self, index: int) -> str:
        o = self.options
        parts = {"blocks": [self.block_key(i) for i in range(self.n_blocks)], "epochs": o.end_to_end_epochs}
        parts.update(lr=o.e2e_lr, seed=o.seed, dtype=o.round_dtype)
        return key("end-to-end", self.model_fp, index, parts, self.code_fp)

    def result_key(self, index: int) -> str:
        """Where block `index` of the checkpoint is cached: after end-to-end tuning when the run has one."""
        return self.end_to_end_key(index) if self.options.end_to_end_epochs else self.block_key(index)


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(config, device: str) -> torch.dtype:
    """float32 on CPU (no fast half matmuls there); the checkpoint's own dtype on a GPU."""
    if device == "cpu":
        return torch.float32
    return config.dtype if config.dtype in (torch.float16, torch.bfloat16) else torch.float16


def check_quantizable(m: OpenModel, options: Options) -> None:
    """Every quantized block linear must split into whole groups (and whole 8-column words when packed)."""
    qcfg, bad = options.quant, []
    for i in range(m.n_blocks):
        block = m.skeleton.get_submodule(f"{m.arch.blocks}.{i}")
        for name, lin in linears_of(block).items():
            if name in m.arch.unquantized:
                continue
            try:
                qcfg.group_len(lin.in_features)
                if qcfg.w_bit == 4 and lin.out_features % 8:
                    raise ValueError(f"out_features={lin.out_features} is not divisible by 8")
            except ValueError as e:
                bad.append(f"{m.arch.blocks}.{i}.{name}: {e}")
    if bad:
        raise ValueError(f"{len(bad)} layer(s) cannot be quantized with group_size={qcfg.group_size}: {bad[0]}")


def plan(model_dir: str, options: Options) -> Plan:
    m = open_model(model_dir)
    check_quantizable(m, options)  # bad input fails before the checkpoint is hashed
    return Plan(model_dir, options, m.n_blocks, model_fingerprint(model_dir), code_fingerprint())


def calibrate(p: Plan) -> tuple[torch.Tensor, Plan]:
    o = p.options
    windows = calibration_windows(
        o.calib, AutoTokenizer.from_pretrained(p.model_dir), o.n_samples, o.seqlen, o.text_field, o.seed
    )
    return windows, replace(p, calib_fp=tensor_fingerprint(windows))


def capture(p: Plan, windows: torch.Tensor, store_path: str, device: str | None = None, progress=None) -> str:
    """FP pass into the Zarr store; a store made from another model or other windows is refused."""
    device = resolve_device(device)
    m = p.model
    dtype = compute_dtype(m.config, device)
    store = ActivationStore(store_path)
    expected = {"model": p.model_fp, "calibration": p.calib_fp, "dtype": str(dtype)}
    found = {k: store.meta.get(k) for k in expected}
    if any(found.values()) and found != expected:
        raise ValueError(
            f"activation store {store_path} was captured for {found}, not {expected}: "
            f"use another --work-dir or delete it"
        )
    store.set_meta(**expected)
    element = torch.tensor([], dtype=dtype).element_size()
    check_disk(store_path, p.n_blocks * windows.numel() * m.config.hidden_size * element - store.nbytes())
    capture_block_inputs(m, windows, store, device, dtype, progress=progress)
    return store_path


def check_disk(path: str, needed: int) -> None:
    """Refuse to start a write that cannot fit, rather than fail hours in."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):  # the folder may not exist yet: its disk is its first existing parent's
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if needed > 0 and needed > free * 0.95:
        raise OSError(
            f"not enough disk for the activation store: {needed / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free in {folder}; use --work-dir on a bigger disk or fewer --n-samples"
        )


def quantize_block(p: Plan, index: int, store_path: str | None, device: str | None = None):
    """One block from its captured input to checkpoint tensors: (tensors, the method's statistics)."""
    device = resolve_device(device)
    m = p.model
    dtype = compute_dtype(m.config, device)
    block = m.block(index, device, dtype)
    inputs = None
    if p.method.needs_inputs:
        hidden = ActivationStore(store_path, mode="r").read(index, device)
        inputs = BlockInputs(hidden, m.block_kwargs(hidden.shape[1], device, dtype)[index], index=index)
    codes, stats = p.method.quantize_block(block, m.arch, inputs, p.options)
    return {k: v.cpu() for k, v in checkpoint_tensors(block, codes, p.options.quant).items()}, stats


def cached_block(p: Plan, index: int, cache_url: str, store_path: str | None, device: str | None = None) -> dict:
    """quantize_block through the content-addressed cache; returns the block's statistics."""
    cache, k = BlockCache(cache_url), p.block_key(index)
    hit = cache.get(k)
    if hit is not None:
        return hit[1]
    tensors, stats = quantize_block(p, index, store_path, device)
    cache.put(k, tensors, stats)
    return stats


def sequential_blocks(p: Plan, windows: torch.Tensor, cache_url: str, device: str | None = None, progress=None) -> dict:
    """llm-compressor's order: block i is quantized on the output of blocks 0..i-1 already quantized."""
    device = resolve_device(device)
    m, cache = p.model, BlockCache(cache_url)
    dtype = compute_dtype(m.config, device)
    kwargs = m.block_kwargs(windows.shape[1], device, dtype)
    hidden = embed_windows(m, windows, device, dtype)
    fp_hidden = hidden if p.method.fp_targets else None  # the FP model's hidden states beside the quantized
    stats = {}
    for i in range(p.n_blocks):
        block = m.block(i, device, dtype)
        if fp_hidden is not None:
            fp_hidden = run_block(block, fp_hidden, kwargs[i])
        hit = cache.get(p.block_key(i))  # a resumed run replays finished blocks instead of searching again
        if hit is None:
            inputs = BlockInputs(hidden, kwargs[i], fp_hidden, i)
            codes, stats[i] = p.method.quantize_block(block, m.arch, inputs, p.options)
            tensors = checkpoint_tensors(block, codes, p.options.quant)
            cache.put(p.block_key(i), tensors, stats[i])
        else:
            tensors, stats[i] = hit
        load_block_tensors(block, tensors)
        hidden = run_block(block, hidden, kwargs[i])
        if progress:
            progress(i + 1, p.n_blocks)
    return stats


def stored_result(cache: BlockCache, key: str, index: int) -> tuple[dict, dict]:
    """Block `index`'s cached (tensors, statistics), which an earlier stage of the run stored."""
    hit = cache.get(key)
    if hit is None:
        raise KeyError(f"block {index} result is missing from the cache at {cache.url}: re-run to recompute it")
    return hit


def end_to_end(p: Plan, windows: torch.Tensor, cache_url: str, device: str | None = None) -> dict:
    """stages/end_to_end on the quantized blocks from the cache, the FP model as the reference; every
    block's tensors go back into the cache under end_to_end_key, tuned if the tuning lowered the KL on the
    held-out calibration windows (on the tuning windows when there are too few to hold any out), else as
    the blocks left them. Returns the statistics; a finished tuning is replayed from the cache."""
    cache = BlockCache(cache_url)
    done = [cache.get(p.end_to_end_key(i)) for i in range(p.n_blocks)]
    if all(done):
        return done[0][1]
    device = resolve_device(device)
    o, arch = p.options, p.model.arch
    tensors = [stored_result(cache, p.block_key(i), i)[0] for i in range(p.n_blocks)]
    reference = load_model(p.model_dir, device, torch.float32)
    model = copy.deepcopy(reference)
    groups = {}
    for i, block in enumerate(blocks_of(model, arch)):
        load_block_tensors(block, tensors[i])
        quantized = quantized_linears(block, arch)
        for name, t in block.named_parameters():
            owner = name.rpartition(".")[0]
            if t.dim() == 1:
                groups[f"{arch.blocks}.{i}.{name}"] = 1
            elif owner in quantized:
                groups[f"{arch.blocks}.{i}.{name}"] = o.quant.group_len(t.shape[-1])
    windows = windows.to(device)
    held = held_out(windows.shape[0])
    fit, judge = windows[: windows.shape[0] - held], windows[windows.shape[0] - held :] if held else windows
    report = lambda step, steps, loss: log.info("end-to-end tuning step %d/%d: minibatch KL %.4g", step, steps, loss)
    factors, losses, judged = tune_end_to_end(
        reference, model, groups, fit, o.end_to_end_epochs, o.e2e_lr, o.seed, report, getattr(torch, o.round_dtype),
        judge,
    )  # fmt: skip
    kl_before = judged[0]
    prefix = f"{arch.blocks}."
    tuned = []
    for i, block in enumerate(blocks_of(model, arch)):
        mine = {k.removeprefix(f"{prefix}{i}."): f for k, f in factors.items() if k.startswith(f"{prefix}{i}.")}
        tuned.append(scale_block_tensors(tensors[i], mine))
        load_block_tensors(block, tuned[-1])
    kl_after = windows_kl(reference, model, judge)
    stats = {"kl_before": kl_before, "kl_after": kl_after, "kept": kl_after < kl_before, "steps": len(losses),
             "kl_per_pass": judged, "judged_on": "held-out windows" if held else "tuning windows",
             "windows": judge.shape[0]}  # fmt: skip
    log.info(
        "end-to-end tuning: KL %.4g -> %.4g on %d %s (%d steps, %d passes judged), %s", kl_before, kl_after,
        judge.shape[0], stats["judged_on"], len(losses), len(judged) - 1, "kept" if stats["kept"] else "not kept",
    )  # fmt: skip
    for i in range(p.n_blocks):
        cache.put(p.end_to_end_key(i), tuned[i] if stats["kept"] else tensors[i], stats)
    return stats


def save(p: Plan, out_dir: str, cache_url: str) -> list[str]:
    cache, arch = BlockCache(cache_url), p.model.arch

    def blocks():
        for i in range(p.n_blocks):
            tensors = stored_result(cache, p.result_key(i), i)[0]
            yield i, {arch.checkpoint_name(k): v for k, v in tensors.items()}  # cached under module names

    meta = p.options.model_dump(exclude=EXECUTION_OPTIONS)
    meta.update(model_fingerprint=p.model_fp, calibration_fingerprint=p.calib_fp)
    return save_checkpoint(
        p.model_dir,
        out_dir,
        blocks(),
        arch.blocks,
        p.options.quant,
        p.options.method,
        arch.not_converted,
        extra_meta=meta,
        unquantized=tuple(arch.checkpoint_name(m) for m in arch.unquantized),
        fmt=p.options.format,
    )


def checkpoint_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir) if n.endswith(".safetensors"))


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def default_work_dir(out_dir: str) -> str:
    return out_dir.rstrip("/") + ".work"


class LocalRunner:
    """Runs every stage in this process, in order, blocks one after another: `run` without Prefect."""

    def __init__(self, log=None):
        self.log = log or (lambda message: None)

    def stage(self, name: str, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def progress(self, desc: str, total: int):
        return None

    def blocks(self, p: Plan, cache_url: str, store_path: str | None, devices: tuple[str, ...]) -> dict:
        stats = {}
        for i in range(p.n_blocks):
            stats[i] = cached_block(p, i, cache_url, store_path, devices[0])
            self.log(f"block {i + 1}/{p.n_blocks} done")
        return stats


@contextmanager
def timed(timings: dict, name: str):
    t = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def run(model: str, out: str, options: Options, runner=None) -> dict:
    """Quantize `model` into `out`: plan -> [calibrate -> capture] -> blocks -> [end-to-end] -> save -> [evaluate].
    Block results are cached by content in the work dir, so a rerun (or a run after a crash) redoes
    nothing that finished. With options.eval_text, FP, RTN and the method's checkpoint are evaluated on
    the same windows (perplexity, and KL to the FP model's logits)."""
    runner = runner or LocalRunner()
    check_output_path(model, out)  # before anything is written
    o = options
    devices = tuple(o.devices or [resolve_device(None)])
    work = o.work_dir or default_work_dir(out)
    cache_url = os.path.join(work, "cache")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with timed(timings, "plan"):
        p = runner.stage("plan", plan, model, o)
    windows, store_path = None, None
    if p.method.needs_inputs:
        with timed(timings, "calibration"):
            windows, p = runner.stage("calibrate", calibrate, p)
    if p.method.needs_inputs and o.block_mode == "sequential":
        with timed(timings, "blocks"):
            stats = runner.stage(
                "sequential-blocks",
                sequential_blocks,
                p,
                windows,
                cache_url,
                devices[0],
                progress=runner.progress("blocks", p.n_blocks),
            )
    else:
        if p.method.needs_inputs:
            with timed(timings, "capture"):
                store_path = runner.stage(
                    "capture",
                    capture,
                    p,
                    windows,
                    os.path.join(work, f"activations-{p.calib_fp}.zarr"),
                    devices[0],
                    progress=runner.progress("capture", p.n_blocks),
                )
        with timed(timings, "blocks"):
            stats = runner.blocks(p, cache_url, store_path, devices)
    tuning = None
    if o.end_to_end_epochs:
        with timed(timings, "end_to_end"):
            tuning = runner.stage("end-to-end", end_to_end, p, windows, cache_url, devices[0])
    with timed(timings, "save"):
        files = runner.stage("save", save, p, out, cache_url)

    table = {}
    if o.eval_text:
        with timed(timings, "evaluation"):
            checkpoints = {"FP": model}
            if o.method != "rtn":
                baseline = o.model_copy(update={"method": "rtn", "eval_text": None})
                checkpoints["RTN"] = run(model, out.rstrip("/") + ".rtn", baseline, runner)["out"]
            checkpoints[o.method.upper()] = out
            table = runner.stage(
                "evaluate", evaluate_checkpoints, checkpoints, o.eval_text, o.eval_seqlen, devices[0], reference="FP"
            )
    timings["total"] = time.perf_counter() - t0
    return {
        "out": out,
        "files": files,
        "bytes": sum(os.path.getsize(f) for f in files),
        "timings": timings,
        "stats": stats,
        "end_to_end": tuning,
        "perplexity": table,
        "plan": p,
    }
