"""Experts as one nn.Linear each. transformers 5 keeps a MoE layer's experts as 3D tensors
(gate_up_proj (E, 2I, H), down_proj (E, H, I)) but saves them, as every checkpoint and AWQ loader
has them, one linear per expert (experts.{e}.gate_proj / up_proj / down_proj)."""

import torch
from torch import nn


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """Drop-in for transformers' fused experts module: same call, (tokens, hidden) in and out."""

    @classmethod
    def like(cls, fused: nn.Module) -> "Experts":
        device, dtype = fused.down_proj.device, fused.down_proj.dtype
        return cls(
            Expert(fused.hidden_dim, fused.intermediate_dim, fused.act_fn).to(device, dtype)
            for _ in range(fused.num_experts)
        )

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():  # experts no token was routed to are not called (nothing to record)
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(blocks: nn.ModuleList, path: str) -> None:
    """Replace the fused experts at `path` (inside each block) by Experts; blocks without them are dense."""
    for block in blocks:
        parent, _, name = path.rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        fused = getattr(owner, name, None)
        if fused is not None and not isinstance(fused, Experts):
            with torch.device(fused.down_proj.device):
                setattr(owner, name, Experts.like(fused))
