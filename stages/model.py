"""Checkpoint access one block at a time: config, a weightless skeleton, tensors by name."""

import copy
import threading
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from awqflow.stages.architectures import Architecture, architecture_for
from awqflow.stages.moe import unfuse_experts
from awqflow.storage.checkpoint import CheckpointReader, read_config_json

# transformers changes process-wide state while it builds or loads a model and restores it afterwards:
# torch's default dtype, and (from_pretrained) PreTrainedModel.tie_weights and torch's init functions,
# replaced by no-ops. Every model build and load holds this lock, so no thread sees another's patches.
BUILD_LOCK = threading.RLock()


def load_config(model_dir: str):
    """The model's config; an unsupported model_type fails here with the list of supported ones,
    before transformers is asked to parse a config it may not know."""
    architecture_for(read_config_json(model_dir).get("model_type"))
    with BUILD_LOCK:
        return AutoConfig.from_pretrained(model_dir)


@dataclass(frozen=True)
class OpenModel:
    """A source checkpoint opened once per process: config, architecture, tensor reader and the
    weightless skeleton that blocks are copied out of. Read-only once built."""

    path: str
    config: object
    arch: Architecture
    reader: CheckpointReader
    skeleton: nn.Module
    _kwargs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_blocks(self) -> int:
        return len(blocks_of(self.skeleton, self.arch))

    def fresh_skeleton(self) -> nn.Module:
        """A private copy to modify (record block calls, materialize parts)."""
        return copy.deepcopy(self.skeleton)

    def block(self, index: int, device, dtype) -> nn.Module:
        return load_block(self.skeleton, self.arch, index, self.reader, device, dtype)

    def block_kwargs(self, seqlen: int, device, dtype) -> list[dict]:
        """Every block's keyword arguments for windows of seqlen tokens, built once per shape."""
        key = (seqlen, str(device), dtype)
        if key not in self._kwargs:
            self._kwargs[key] = block_kwargs(self, seqlen, device, dtype)
        return self._kwargs[key]


@lru_cache(maxsize=4)
def open_model(model_dir: str, fingerprint: str | None = None) -> OpenModel:
    """The fingerprint keys the cache, so a new checkpoint written into the same folder is opened anew."""
    config = load_config(model_dir)
    reader = CheckpointReader(model_dir)
    return OpenModel(model_dir, config, architecture_for(config.model_type), reader, skeleton(config))


def skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model with every weight on the meta device: structure only, no memory. MoE experts come
    one linear per expert, as checkpoints store them."""
    arch = architecture_for(config.model_type)
    with BUILD_LOCK, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype)  # sdpa where supported
    if arch.fused_experts:
        unfuse_experts(blocks_of(model, arch), arch.fused_experts)
    return model.eval()  # from_config leaves training mode on: dropout (OPT, GPT-NeoX) would be active


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def blocks_of(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)


def materialize(
    module: nn.Module, prefix: str, reader: CheckpointReader, device, dtype, init=None, rename=None
) -> nn.Module:
    """Give a meta-device submodule its real weights from the checkpoint (prefix = its name there;
    rename maps the submodule's own tensor names to the checkpoint's). init (the model's
    _init_weights) sets the non-persistent buffers no checkpoint holds (Gemma's embedding scale)
    before the weights are loaded."""
    module.to_empty(device=device).to(dtype)
    if init is not None:
        with BUILD_LOCK:  # the model's init uses torch's init functions, which a from_pretrained elsewhere patches
            init_buffers(module, init)
    names = {k: prefix + (rename(k) if rename else k) for k in module.state_dict()}
    missing = [n for n in names.values() if n not in reader.file_of]
    if missing:
        raise KeyError(f"checkpoint {reader.model_dir} lacks {missing[:3]}: does it match its config.json?")
    tensors = reader.load(names.values(), device)
    broken = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise FloatingPointError(
            f"checkpoint tensor {broken[0]} holds NaN/inf: the checkpoint is broken; re-download or re-save it"
        )
    module.load_state_dict({k: tensors[n].to(dtype) for k, n in names.items()})
    return module


def init_buffers(module: nn.Module, init) -> None:
    """Set the non-persistent buffers left empty by to_empty with the model's own init (weights the
    modules also hold are loaded afterwards)."""
    for m in module.modules():
        if m._non_persistent_buffers_set:
            init(m)


def load_block(model: nn.Module, arch: Architecture, index: int, reader: CheckpointReader, device, dtype) -> nn.Module:
    """A private copy of block `index` with real weights; the skeleton stays on meta."""
    block = copy.deepcopy(blocks_of(model, arch)[index])
    return materialize(block, f"{arch.blocks}.{index}.", reader, device, dtype, rename=arch.checkpoint_name)


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder block: records the hidden states and keyword arguments the model passes to it."""

    def __init__(self, block: nn.Module, record: list, last: bool):
        super().__init__()
        self.record, self.last = record, last
        # some models choose a block's mask by its attention type (sliding vs full)
        if hasattr(block, "attention_type"):
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.record.append((hidden_states, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def rebuild_rotary(model: nn.Module, config, device) -> None:
    """Rotary embeddings keep computed, non-persistent buffers that no checkpoint holds: rebuild them."""
    for name, module in list(model.named_modules()):
        if "Rotary" in type(module).__name__:
            set_module(model, name, type(module)(config=config).to(device))


def record_block_calls(model: nn.Module, arch: Architecture, n_blocks: int, **inputs) -> list[tuple]:
    """Run the model body (everything that owns the block list) with recorders in place of its first
    n_blocks blocks: (hidden_states, kwargs) of each call, exactly as the model builds them."""
    path = arch.blocks.rpartition(".")[0]
    blocks = blocks_of(model, arch)
    record: list[tuple] = []
    for i in range(n_blocks):
        blocks[i] = _Recorder(blocks[i], record, last=i == n_blocks - 1)
    try:
        with torch.no_grad():
            model.get_submodule(path)(**inputs, use_cache=False)
    except _StopForward:
        pass
    return record


def block_kwargs(m: OpenModel, seqlen: int, device, dtype) -> list[dict]:
    """Per-block keyword arguments (mask, rotary embeddings, positions) as the model itself builds
    them for a batch of unpadded windows. Recomputed on demand, never stored."""
    config, arch, model = m.config, m.arch, m.fresh_skeleton()
    body = model.get_submodule(arch.blocks.rpartition(".")[0])
    skipped = (blocks_of(model, arch), model.get_input_embeddings())
    for child in body.children():
        if all(child is not m for m in skipped):
            # modules in front of the blocks (OPT's position embedding) must run, but their values
            # never reach the recorded kwargs: memory is enough, no weights
            child.to_empty(device=device)
    rebuild_rotary(body, config, device)
    embeds = torch.zeros(1, seqlen, config.hidden_size, device=device, dtype=dtype)
    calls = record_block_calls(model, arch, len(blocks_of(model, arch)), inputs_embeds=embeds)
    return [kwargs for _, kwargs in calls]


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int = 8) -> torch.Tensor:
    """Block forward over the sample dim in batches (the kwargs broadcast over batch)."""
    outs = []
    with torch.no_grad():
        for chunk in hidden.split(batch_size):
            out = block(chunk, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)
