"""The stages wired in order, without Prefect: what the CLI, the benchmarks and the tests call.
The Prefect flow (awqflow.flows.awq) calls the same functions, one task per block, in parallel."""

import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

import torch
from transformers import AutoTokenizer

from awqflow.stages.architectures import Architecture, architecture_for
from awqflow.stages.block import linears_of, quantized_tensors, search_block
from awqflow.stages.calibration import calibration_windows
from awqflow.stages.capture import capture_block_inputs, embed_windows
from awqflow.stages.model import CheckpointReader, block_kwargs, blocks_of, load_block, load_config, run_block, skeleton
from awqflow.stages.quantize import QuantConfig
from awqflow.stages.save import FORMATS, save_checkpoint
from awqflow.stages.scales import SearchConfig
from awqflow.storage.activations import ActivationStore
from awqflow.storage.cache import BlockCache
from awqflow.storage.fingerprint import code_fingerprint, key, model_fingerprint, tensor_fingerprint


@dataclass
class Options:
    method: str = "awq"  # or "rtn"
    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True
    calib: str = "pileval"
    text_field: str = "text"
    n_samples: int = 128
    seqlen: int = 512
    clip: bool = True
    duo_scaling: bool = True
    n_grid: int = 20
    seed: int = 0
    # "parallel": every block searched on FP-captured inputs (AutoAWQ, the default);
    # "sequential": each block sees the previous blocks already quantized (llm-compressor)
    mode: str = "parallel"
    format: str = "awq-gemm"  # or "compressed-tensors" (stages/export_ct.py)

    def __post_init__(self):
        if self.method not in ("awq", "rtn"):
            raise ValueError(f"method={self.method!r}: use 'awq' or 'rtn'")
        if self.mode not in ("parallel", "sequential"):
            raise ValueError(f"mode={self.mode!r}: use 'parallel' or 'sequential'")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: use one of {', '.join(FORMATS)}")
        QuantConfig(self.w_bit, self.group_size, self.zero_point)  # fails early on bad bits / group size

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.w_bit, self.group_size, self.zero_point)

    @property
    def search(self) -> SearchConfig:
        return SearchConfig(n_grid=self.n_grid, duo_scaling=self.duo_scaling)


@dataclass
class Plan:
    """Everything the per-block work needs to know, cheap to pass to any worker."""
    model_dir: str
    opts: Options
    n_blocks: int
    model_fp: str
    code_fp: str
    calib_fp: str | None = None  # set once calibration windows exist

    @cached_property
    def config(self):
        return load_config(self.model_dir)

    @property
    def arch(self) -> Architecture:
        return architecture_for(self.config.model_type)

    def block_key(self, index: int) -> str:
        o = asdict(self.opts)
        for unused in ("calib", "text_field", "n_samples", "seed", "format"):  # in calib_fp, or only for save
            o.pop(unused)
        if o["method"] == "rtn":
            o = {k: o[k] for k in ("method", "w_bit", "group_size", "zero_point")}
        return key("block", self.model_fp, index, o, self.calib_fp if o["method"] == "awq" else None, self.code_fp)


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(config, device: str) -> torch.dtype:
    """float32 on CPU (no fast half matmuls there); the checkpoint's own dtype on a GPU."""
    if device == "cpu":
        return torch.float32
    return config.dtype if config.dtype in (torch.float16, torch.bfloat16) else torch.float16


def check_quantizable(model, arch: Architecture, qcfg: QuantConfig) -> None:
    """Every block linear must split into whole groups (and whole 8-column words when packed)."""
    bad = []
    for i, block in enumerate(blocks_of(model, arch)):
        for name, lin in linears_of(block).items():
            if name in arch.unquantized:
                continue
            try:
                qcfg.group_len(lin.in_features)
                if qcfg.w_bit == 4 and lin.out_features % 8:
                    raise ValueError(f"out_features={lin.out_features} is not divisible by 8")
            except ValueError as e:
                bad.append(f"{arch.blocks}.{i}.{name}: {e}")
    if bad:
        raise ValueError(f"{len(bad)} layer(s) cannot be quantized with group_size={qcfg.group_size}: {bad[0]}")


def plan(model_dir: str, opts: Options) -> Plan:
    config = load_config(model_dir)
    model, arch = skeleton(config), architecture_for(config.model_type)
    check_quantizable(model, arch, opts.quant)  # bad input fails before the checkpoint is hashed
    return Plan(model_dir, opts, len(blocks_of(model, arch)), model_fingerprint(model_dir), code_fingerprint())


# Every block of a run needs the same skeleton and block kwargs: build them once per
# process (and per model version, so a new checkpoint in the same folder is never served stale ones).
# Callers only read them: blocks are deep-copied out of the skeleton.
@lru_cache(maxsize=4)
def shared_skeleton(model_dir: str, model_fp: str):
    return skeleton(load_config(model_dir))


@lru_cache(maxsize=8)
def shared_block_kwargs(model_dir: str, model_fp: str, seqlen: int, device: str, dtype: torch.dtype) -> list[dict]:
    return block_kwargs(load_config(model_dir), seqlen, device, dtype)


def calibrate(p: Plan) -> torch.Tensor:
    o = p.opts
    windows = calibration_windows(o.calib, AutoTokenizer.from_pretrained(p.model_dir), o.n_samples, o.seqlen,
                                  o.text_field, o.seed)
    p.calib_fp = tensor_fingerprint(windows)
    return windows


def capture(p: Plan, windows: torch.Tensor, store_path: str, device: str | None = None,
            progress=None) -> ActivationStore:
    """FP pass into the Zarr store; a store made from another model or other windows is refused."""
    device = resolve_device(device)
    config = p.config
    store = ActivationStore(store_path)
    expected = {"model": p.model_fp, "calibration": p.calib_fp, "dtype": str(compute_dtype(config, device))}
    found = {k: store.meta.get(k) for k in expected}
    if any(found.values()) and found != expected:
        raise ValueError(f"activation store {store_path} was captured for {found}, not {expected}: "
                         f"use another --work-dir or delete it")
    store.set_meta(**expected)
    check_disk(store_path, capture_bytes(p, windows, compute_dtype(config, device)) - store.nbytes())
    capture_block_inputs(p.model_dir, config, windows, store, device, compute_dtype(config, device), progress=progress)
    return store


def capture_bytes(p: Plan, windows: torch.Tensor, dtype: torch.dtype) -> int:
    """Size of the activation store: samples x seqlen x hidden x element size, per block."""
    return p.n_blocks * windows.numel() * p.config.hidden_size * torch.tensor([], dtype=dtype).element_size()


def check_disk(path: str, needed: int) -> None:
    """Refuse to start a write that cannot fit, rather than fail hours in."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > 0 and needed > free * 0.95:
        raise OSError(f"not enough disk for the activation store: {needed / 2**30:.2f} GiB needed, "
                      f"{free / 2**30:.2f} GiB free in {folder}; use --work-dir on a bigger disk or fewer --n-samples")


def quantize_block(p: Plan, index: int, store_path: str | None, device: str | None = None):
    """One block from its captured input to checkpoint tensors: (tensors, search stats)."""
    device = resolve_device(device)
    config, arch = p.config, p.arch
    dtype = compute_dtype(config, device)
    block = load_block(shared_skeleton(p.model_dir, p.model_fp), arch, index, CheckpointReader(p.model_dir), device, dtype)
    stats = {}
    if p.opts.method == "awq":
        hidden = ActivationStore(store_path, mode="r").read(index, device)
        kwargs = shared_block_kwargs(p.model_dir, p.model_fp, hidden.shape[1], device, dtype)[index]
        stats = search_block(block, arch, hidden, kwargs, p.opts.quant, p.opts.search, p.opts.clip)
    return {k: v.cpu() for k, v in quantized_tensors(block, p.opts.quant, arch.unquantized).items()}, stats


def cached_block(p: Plan, index: int, cache: BlockCache, store_path: str | None, device: str | None = None) -> dict:
    """quantize_block through the content-addressed cache; returns the block's search stats."""
    k = p.block_key(index)
    hit = cache.get(k)
    if hit is not None:
        return hit[1]
    tensors, stats = quantize_block(p, index, store_path, device)
    cache.put(k, tensors, stats)
    return stats


def sequential_blocks(p: Plan, windows: torch.Tensor, cache: BlockCache, device: str | None = None) -> dict:
    """llm-compressor's order: block i is searched on the output of blocks 0..i-1 already quantized."""
    device = resolve_device(device)
    config, arch = p.config, p.arch
    dtype = compute_dtype(config, device)
    model, reader = shared_skeleton(p.model_dir, p.model_fp), CheckpointReader(p.model_dir)
    kwargs = shared_block_kwargs(p.model_dir, p.model_fp, windows.shape[1], device, dtype)
    hidden = embed_windows(p.model_dir, config, windows, device, dtype)
    stats = {}
    for i in range(p.n_blocks):
        block = load_block(model, arch, i, reader, device, dtype)
        hit = cache.get(p.block_key(i))  # a resumed run replays finished blocks instead of searching again
        if hit is None:
            stats[i] = search_block(block, arch, hidden, kwargs[i], p.opts.quant, p.opts.search, p.opts.clip)
            tensors = quantized_tensors(block, p.opts.quant, arch.unquantized)
            cache.put(p.block_key(i), tensors, stats[i])
        else:
            tensors, stats[i] = hit
            block.load_state_dict({k: v for k, v in tensors.items() if k in block.state_dict()}, strict=False)
        load_fake_quant(block, tensors)
        hidden = run_block(block, hidden, kwargs[i])
    return stats


def load_fake_quant(block, tensors: dict) -> None:
    """Put a block's quantized weights back into it as dense weights (to run it as quantized)."""
    from awqflow.stages.pack import dequantize_gemm

    with torch.no_grad():
        for name, lin in linears_of(block).items():
            if f"{name}.qweight" in tensors:
                w = dequantize_gemm(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]).t()
            else:  # 3-bit fake-quant weights, or a linear kept in full precision (MoE router)
                w = tensors[f"{name}.weight"]
            lin.weight.copy_(w.to(lin.weight.dtype))


def save(p: Plan, out_dir: str, cache: BlockCache) -> list[str]:
    def blocks():
        for i in range(p.n_blocks):
            hit = cache.get(p.block_key(i))
            if hit is None:
                raise KeyError(f"block {i} result is missing from the cache at {cache.url}: re-run to recompute it")
            yield i, {p.arch.checkpoint_name(k): v for k, v in hit[0].items()}  # cached under module names

    meta = asdict(p.opts)
    meta.update(model_fingerprint=p.model_fp, calibration_fingerprint=p.calib_fp)
    return save_checkpoint(p.model_dir, out_dir, blocks(), p.arch.blocks, p.opts.quant, p.opts.method,
                           p.arch.not_converted, extra_meta=meta,
                           unquantized=tuple(p.arch.checkpoint_name(m) for m in p.arch.unquantized),
                           fmt=p.opts.format)


def checkpoint_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir) if n.endswith(".safetensors"))


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def default_work_dir(out_dir: str) -> str:
    return out_dir.rstrip("/") + ".work"


def run_blocks(model_dir: str, opts: Options, work: str, device: str | None = None, log=print,
               timings: dict | None = None) -> tuple[Plan, dict]:
    """Calibration, capture and every block, results into work/cache: (plan, per-block stats)."""
    timings = {} if timings is None else timings
    t = time.perf_counter()
    p = plan(model_dir, opts)
    cache = BlockCache(os.path.join(work, "cache"))
    if opts.method == "awq":
        windows = calibrate(p)
        timings["calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    if opts.method == "awq" and opts.mode == "sequential":
        stats = sequential_blocks(p, windows, cache, device)
    else:
        store_path = None
        if opts.method == "awq":
            store_path = os.path.join(work, f"activations-{p.calib_fp}.zarr")
            store = capture(p, windows, store_path, device)
            timings["capture"] = time.perf_counter() - t
            log(f"captured {p.n_blocks} block inputs ({store.nbytes() / 2**20:.1f} MiB)")
            t = time.perf_counter()
        stats = {}
        for i in range(p.n_blocks):
            stats[i] = cached_block(p, i, cache, store_path, device)
            log(f"block {i + 1}/{p.n_blocks} done")
    timings["blocks"] = time.perf_counter() - t
    return p, stats


def quantize_model(model_dir: str, out_dir: str, opts: Options, work_dir: str | None = None, device: str | None = None,
                   log=print) -> dict:
    """Quantize model_dir into out_dir, one block after another. Block results are cached by content in
    work_dir/cache, so a second run (or a run after a crash) redoes nothing that finished."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    work = work_dir or default_work_dir(out_dir)
    p, stats = run_blocks(model_dir, opts, work, device, log, timings)
    t = time.perf_counter()
    files = save(p, out_dir, BlockCache(os.path.join(work, "cache")))
    timings["save"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return {"out": out_dir, "files": files, "timings": timings, "stats": stats,
            "bytes": sum(os.path.getsize(f) for f in files)}


def evaluate(model_dir: str, text_file: str, seqlen: int | None = None, device: str | None = None) -> dict:
    """Perplexity of any checkpoint awqflow reads or writes, on SPEC §7 windows of text_file."""
    from awqflow.stages.load import load_model, read_config
    from awqflow.stages.perplexity import eval_windows, perplexity

    config = read_config(model_dir)
    if not os.path.exists(text_file):
        raise FileNotFoundError(f"evaluation text {text_file} does not exist")
    seqlen = seqlen or min(2048, config.get("max_position_embeddings", 2048))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(text_file, encoding="utf-8") as f:
        windows = eval_windows(tokenizer, f.read(), seqlen)
    model = load_model(model_dir, resolve_device(device))
    return {**perplexity(model, windows), "seqlen": seqlen}


def perplexity_table(checkpoints: dict[str, str], text_file: str, seqlen: int | None = None,
                     device: str | None = None) -> dict[str, dict]:
    """{label: checkpoint dir} -> {label: perplexity result}, all on the same windows."""
    return {label: evaluate(path, text_file, seqlen, device) for label, path in checkpoints.items()}
