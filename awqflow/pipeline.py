"""The stages wired in order, without Prefect: what the CLI, the benchmarks and the tests call.
The Prefect flow (awqflow.flows) runs the same stage functions, with caching and parallel blocks."""

import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from awqflow.stages.architectures import architecture_for
from awqflow.stages.block import linears_of, quantized_tensors, search_block
from awqflow.stages.calibration import calibration_windows
from awqflow.stages.capture import capture_block_inputs
from awqflow.stages.model import CheckpointReader, block_kwargs, blocks_of, load_block, load_config, skeleton
from awqflow.stages.quantize import QuantConfig
from awqflow.stages.save import save_checkpoint
from awqflow.stages.scales import SearchConfig
from awqflow.storage.activations import ActivationStore


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
    device: str | None = None  # default: cuda if available, else cpu

    def __post_init__(self):
        if self.method not in ("awq", "rtn"):
            raise ValueError(f"method={self.method!r}: use 'awq' or 'rtn'")
        QuantConfig(self.w_bit, self.group_size, self.zero_point)  # fails early on bad bits / group size

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.w_bit, self.group_size, self.zero_point)

    @property
    def search(self) -> SearchConfig:
        return SearchConfig(n_grid=self.n_grid, duo_scaling=self.duo_scaling)


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(config, device: str) -> torch.dtype:
    """float32 on CPU (no fast half matmuls there); the checkpoint's own dtype on a GPU."""
    if device == "cpu":
        return torch.float32
    return config.dtype if config.dtype in (torch.float16, torch.bfloat16) else torch.float16


def check_quantizable(config, qcfg: QuantConfig) -> None:
    """Every block linear must split into whole groups (and whole 8-column words when packed)."""
    arch = architecture_for(config.model_type)
    bad = []
    for i, block in enumerate(blocks_of(skeleton(config), arch)):
        for name, lin in linears_of(block).items():
            try:
                qcfg.group_len(lin.in_features)
                if qcfg.w_bit == 4 and lin.out_features % 8:
                    raise ValueError(f"out_features={lin.out_features} is not divisible by 8")
            except ValueError as e:
                bad.append(f"{arch.blocks}.{i}.{name}: {e}")
    if bad:
        raise ValueError(f"{len(bad)} layer(s) cannot be quantized with group_size={qcfg.group_size}: {bad[0]}")


def quantize_model(model_dir: str, out_dir: str, opts: Options, work_dir: str | None = None,
                   log=print, keep_work: bool = False) -> dict:
    """Quantize model_dir into out_dir; returns per-stage timings and per-group search statistics."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    config = load_config(model_dir)
    arch = architecture_for(config.model_type)
    qcfg = opts.quant
    check_quantizable(config, qcfg)
    device = resolve_device(opts.device)
    dtype = compute_dtype(config, device)
    work = work_dir or out_dir.rstrip("/") + ".work"
    os.makedirs(os.path.join(work, "blocks"), exist_ok=True)
    reader = CheckpointReader(model_dir)
    model = skeleton(config)
    n_blocks = len(blocks_of(model, arch))

    store = None
    if opts.method == "awq":
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        windows = calibration_windows(opts.calib, tokenizer, opts.n_samples, opts.seqlen, opts.text_field, opts.seed)
        timings["calibration"] = time.perf_counter() - t0
        t = time.perf_counter()
        store = ActivationStore(os.path.join(work, "activations.zarr"))
        capture_block_inputs(model_dir, config, windows, store, device, dtype)
        timings["capture"] = time.perf_counter() - t
        log(f"captured {n_blocks} block inputs ({store.nbytes() / 2**20:.1f} MiB)")

    t = time.perf_counter()
    kwargs = block_kwargs(config, opts.seqlen, device, dtype) if store else None
    stats = {}
    block_files = []
    for i in range(n_blocks):
        block = load_block(model, arch, i, reader, device, dtype)
        if store is not None:
            stats[i] = search_block(block, arch, store.read(i, device), kwargs[i], qcfg, opts.search, opts.clip)
        path = os.path.join(work, "blocks", f"{i:05d}.safetensors")
        save_file({k: v.cpu() for k, v in quantized_tensors(block, qcfg).items()}, path)
        block_files.append(path)
        log(f"block {i + 1}/{n_blocks} quantized")
    timings["blocks"] = time.perf_counter() - t

    t = time.perf_counter()
    files = save_checkpoint(
        model_dir, out_dir, ((i, load_file(p)) for i, p in enumerate(block_files)), arch.blocks, qcfg,
        opts.method, arch.not_converted,
        extra_meta={k: v for k, v in asdict(opts).items() if k != "device"},
    )
    timings["save"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return {"out": out_dir, "files": files, "timings": timings, "stats": stats,
            "bytes": sum(os.path.getsize(f) for f in files)}


def evaluate(model_dir: str, text_file: str, seqlen: int | None = None, device: str | None = None) -> dict:
    """Perplexity of any checkpoint awqflow reads or writes, on SPEC §7 windows of text_file."""
    from awqflow.stages.load import load_model, read_config
    from awqflow.stages.perplexity import eval_windows, perplexity

    if not os.path.exists(text_file):
        raise FileNotFoundError(f"evaluation text {text_file} does not exist")
    seqlen = seqlen or min(2048, read_config(model_dir).get("max_position_embeddings", 2048))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(text_file, encoding="utf-8") as f:
        windows = eval_windows(tokenizer, f.read(), seqlen)
    model = load_model(model_dir, resolve_device(device))
    return {**perplexity(model, windows), "seqlen": seqlen}


def perplexity_table(checkpoints: dict[str, str], text_file: str, seqlen: int | None = None,
                     device: str | None = None) -> dict[str, dict]:
    """{label: checkpoint dir} -> {label: perplexity result}, all on the same windows."""
    return {label: evaluate(path, text_file, seqlen, device) for label, path in checkpoints.items()}
