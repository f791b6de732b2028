"""Assemble the output checkpoint (SPEC §6): safetensors shards + index, config.json with its
quantization_config, tokenizer and generation files copied unchanged. Streams block by block."""

import glob
import json
import os
import shutil
import stat

import torch
from safetensors.torch import save_file

from awqflow import __version__
from awqflow.stages import export_ct
from awqflow.stages.quantize import QuantConfig
from awqflow.stages.skip_names import modules_to_not_convert
from awqflow.storage.checkpoint import CheckpointReader, read_config_json

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
FORMATS = ("awq-gemm", "compressed-tensors")


def quantization_config(qcfg: QuantConfig, not_converted) -> dict:
    return {
        "quant_method": "awq",
        "bits": qcfg.w_bit,
        "group_size": qcfg.group_size,
        "zero_point": True,  # symmetric weights are stored with a fixed zero of 8 in the same layout
        "version": "gemm",
        "modules_to_not_convert": list(not_converted) or None,
    }


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous() if t.is_floating_point() and t.dtype != dtype else t.contiguous()


class _ShardWriter:
    """Fills safetensors shards up to a size; names them as transformers does once the count is known."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[str, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        if self.current and self.size + t.nbytes > self.max_bytes:
            self._flush()
        self.current[name] = t
        self.size += t.nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self.written):05d}.safetensors"
        save_file(self.current, os.path.join(self.folder, name), metadata={"format": "pt"})
        self.written.append((name, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> list[str]:
        if self.current or not self.written:
            self._flush()
        n = len(self.written)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (old, _), new in zip(self.written, final):
            os.rename(os.path.join(self.folder, old), os.path.join(self.folder, new))
        if n > 1:
            weight_map = {k: new for (_, keys), new in zip(self.written, final) for k in keys}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        return final


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path.rstrip("/") or "/"))


def check_output_path(model_dir: str, out_dir: str) -> None:
    """The output may not be the model folder, lie inside it or contain it (after links and trailing
    slashes): saving would replace or delete the model being read."""
    m, o = _real(model_dir), _real(out_dir)
    if o == m or o.startswith(m + os.sep) or m.startswith(o + os.sep):
        raise ValueError(
            f"output {out_dir} would overwrite the model {model_dir} (the same folder, inside it or around it): "
            f"pick an output folder outside the model's"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output {out_dir} exists and is not a folder: remove it or pick another output path")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_folders(out_dir: str) -> None:
    """Remove the .tmp-<pid> / .old-<pid> folders that a save killed mid-way left next to out_dir."""
    base = out_dir.rstrip("/")
    for path in glob.glob(glob.escape(base) + ".tmp-*") + glob.glob(glob.escape(base) + ".old-*"):
        pid = path.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _make_readable(folder: str) -> None:
    """Give every file config.json's mode, i.e. what a plain open() gives under the umask (0644 under 022):
    safetensors writes through a private temporary file (0600) and copy2 keeps the source's mode, but a server
    running as another user on a shared volume must be able to read the checkpoint."""
    mode = stat.S_IMODE(os.stat(os.path.join(folder, "config.json")).st_mode)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), mode)


def save_checkpoint(
    model_dir: str,
    out_dir: str,
    block_tensors,
    blocks_prefix: str,
    qcfg: QuantConfig,
    method: str,
    not_converted=("lm_head",),
    extra_meta: dict | None = None,
    max_shard_bytes: int = 4 << 30,
    unquantized=(),
    fmt: str = "awq-gemm",
) -> list[str]:
    """block_tensors: iterable of (index, {name in block: tensor}) in order, in the GEMM layout.
    unquantized: block modules left in full precision; listed in modules_to_not_convert as every loader
    matches them (stages/skip_names.py) and in ignore by full name.
    fmt: "awq-gemm" or "compressed-tensors" (4-bit only).
    Writes into a temporary folder renamed over out_dir at the end, so a crash never leaves a
    half-written checkpoint."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "compressed-tensors" and qcfg.w_bit != 4:
        raise ValueError("the compressed-tensors export holds packed 4-bit weights: use --w-bit 4")
    check_output_path(model_dir, out_dir)
    reader = CheckpointReader(model_dir)
    config = read_config_json(model_dir)
    packed = qcfg.w_bit == 4
    src_dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float16")
    dtype = torch.float16 if packed else src_dtype  # the GEMM format is fp16 throughout
    remove_stale_folders(out_dir)
    tmp = out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    writer = _ShardWriter(tmp, max_shard_bytes)
    outside = [n for n in reader.names() if not n.startswith(blocks_prefix + ".")]
    for name, t in reader.load(outside).items():
        writer.add(name, _cast(t, dtype))
    kept, kept_relative, linears_relative = [], set(), set()
    for index, tensors in block_tensors:
        kept_here = [m for m in unquantized if f"{m}.weight" in tensors]
        kept += [f"{blocks_prefix}.{index}.{m}" for m in kept_here]
        kept_relative.update(kept_here)
        linears_relative.update(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
        linears_relative.update(kept_here)
        if fmt == "compressed-tensors":
            tensors = export_ct.from_gemm(tensors, qcfg.zero_point)
        for name, t in tensors.items():
            writer.add(f"{blocks_prefix}.{index}.{name}", t if t.dtype == torch.int32 else _cast(t, dtype))
    final = writer.close()

    meta = {
        "version": __version__,
        "method": method,
        "w_bit": qcfg.w_bit,
        "group_size": qcfg.group_size,
        "zero_point": qcfg.zero_point,
        **(extra_meta or {}),
    }
    config.pop("quantization_config", None)
    if packed:
        skipped = modules_to_not_convert(not_converted, kept, sorted(kept_relative), linears_relative)
        # compressed-tensors' ignore matches whole names (or "re:" regexes): full names only
        config["quantization_config"] = (
            quantization_config(qcfg, skipped)
            if fmt == "awq-gemm"
            else export_ct.quantization_config(qcfg, [*not_converted, *kept])
        )
        config["dtype"] = "float16"
        config.pop("torch_dtype", None)
        meta["format"] = fmt
    else:
        # the GEMM layout holds 4-bit codes only: store the dequantized weights, clearly labelled
        meta["format"] = "fake-quant"
    config["awqflow"] = meta
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(model_dir):
        src = os.path.join(model_dir, name)
        if (
            os.path.isfile(src)
            and name != "config.json"
            and not name.endswith(_WEIGHT_FILES)
            and name != "model.safetensors.index.json"
        ):
            shutil.copy2(src, os.path.join(tmp, name))

    _make_readable(tmp)
    if os.path.exists(out_dir):
        old = out_dir.rstrip("/") + f".old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.rename(tmp, out_dir)
    return [os.path.join(out_dir, f) for f in final]
