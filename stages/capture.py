"""One full-precision pass that records every block's input (SPEC §1).

Block i+1's input is block i's FP output, so after this pass every block can be searched on its
own: any order, any device, any machine. Only one block's weights are in memory at a time.
"""

import torch

from awqflow.stages.model import OpenModel, blocks_of, materialize, rebuild_rotary, record_block_calls, run_block
from awqflow.storage.activations import ActivationStore


def embed_windows(m: OpenModel, windows: torch.Tensor, device, dtype) -> torch.Tensor:
    """Block 0's input as the model itself computes it: everything in front of the blocks (token and
    position embeddings, Gemma's embedding scale, OPT's project_in) runs with its real weights."""
    model = m.fresh_skeleton()
    path = m.arch.blocks.rpartition(".")[0]
    blocks = blocks_of(model, m.arch)
    for name, child in model.get_submodule(path).named_children():
        if child is not blocks:
            materialize(child, f"{path}.{name}.", m.reader, device, dtype, init=model._init_weights)
    rebuild_rotary(model.get_submodule(path), m.config, device)
    ((hidden, _),) = record_block_calls(model, m.arch, 1, input_ids=windows.to(device))
    return hidden


def capture_block_inputs(
    m: OpenModel,
    windows: torch.Tensor,
    store: ActivationStore,
    device="cpu",
    dtype=torch.float32,
    batch_size: int = 8,
    progress=None,
) -> None:
    """Write the FP input of every block of the model to `store`; skip blocks already complete
    there (a resumed capture recomputes the FP chain but rewrites nothing)."""
    kwargs = m.block_kwargs(windows.shape[1], device, dtype)
    hidden = embed_windows(m, windows, device, dtype)
    for i in range(m.n_blocks):
        if not store.has(i):
            store.write(i, hidden)
        if i + 1 < m.n_blocks and not store.has(i + 1):
            block = m.block(i, device, dtype)
            hidden = run_block(block, hidden, kwargs[i], batch_size)
            del block
        elif i + 1 < m.n_blocks:
            hidden = store.read(i + 1, device)
        if progress:
            progress(i + 1, m.n_blocks)
