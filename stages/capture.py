"""One full-precision pass that records every block's input (SPEC §1).

Block i+1's input is block i's FP output, so after this pass every block can be searched on its
own: any order, any device, any machine. Only one block's weights are in memory at a time.
"""

import torch

from awqflow.stages.architectures import architecture_for
from awqflow.stages.model import (CheckpointReader, block_kwargs, blocks_of, load_block, materialize, run_block,
                                  skeleton)
from awqflow.storage.activations import ActivationStore


def embed_windows(model_dir: str, config, windows: torch.Tensor, device, dtype) -> torch.Tensor:
    reader = CheckpointReader(model_dir)
    model = skeleton(config)
    embed = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embed)
    materialize(embed, name + ".", reader, device, dtype)
    with torch.no_grad():
        hidden = embed(windows.to(device))
    # some families (Gemma) scale embeddings inside the model's forward, not in the embedding module
    if hasattr(config, "embed_scale"):
        hidden = hidden * config.embed_scale
    return hidden


def capture_block_inputs(model_dir: str, config, windows: torch.Tensor, store: ActivationStore,
                         device="cpu", dtype=torch.float32, batch_size: int = 8, progress=None) -> None:
    """Write the FP input of every block of the model to `store`; skip blocks already complete
    there (a resumed capture recomputes the FP chain but rewrites nothing)."""
    arch = architecture_for(config.model_type)
    reader = CheckpointReader(model_dir)
    model = skeleton(config)
    n_blocks = len(blocks_of(model, arch))
    kwargs = block_kwargs(config, windows.shape[1], device, dtype)
    hidden = embed_windows(model_dir, config, windows, device, dtype)
    for i in range(n_blocks):
        if not store.has(i):
            store.write(i, hidden)
        if i + 1 < n_blocks and not store.has(i + 1):
            block = load_block(model, arch, i, reader, device, dtype)
            hidden = run_block(block, hidden, kwargs[i], batch_size)
            del block
        elif i + 1 < n_blocks:
            hidden = store.read(i + 1, device)
        if progress:
            progress(i + 1, n_blocks)

