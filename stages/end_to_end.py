"""End-to-end tuning, after every block is quantized: the codes and zero points stay as the blocks left
them; each quantized linear's group scales and each block's 1-D parameters (norm weights, biases) are
multiplied by a learned factor, trained with Adam on the mean KL(P_fp || P_quantized) of the next-token
distributions over the calibration windows (EfficientQAT's end-to-end step, its scales only).

The per-block objectives see a block's own output; this one sees what the blocks after it and the head
make of it. Bundled model, w3 g128 awq-round, 124 windows tuned on, 4 passes, lr 3e-3: eval KL 0.00405
-> 0.00360, ppl 50.782 -> 50.737 (AutoRound on the same windows: 0.00377, 50.733).

    W_hat = (q - z) * (s * f_group)        norm weight, bias: t * f,   every f starting at 1
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from awqflow.stages.perplexity import log_probs

# Windows a step. Bundled w3 g128 awq-round, 124 windows: 4 a step for 4 passes, 58 s, ppl / KL 50.750 / 0.00361;
# 2 a step for 2 passes (the same 124 steps), 33 s, 50.752 / 0.00366. With 2 a step in the blocks as well, 2 a step
# for 2 / 3 / 4 passes: 32 / 46 / 57 s, 50.738 / 0.00368, 50.737 / 0.00364, 50.738 / 0.00360 (awq-round takes 3)
BATCH = 2
PROGRESS_EVERY = 10  # steps between progress calls


class GroupFactor(nn.Module):
    """t times a learned factor per group of `group` consecutive elements along the last dimension."""

    def __init__(self, shape: tuple[int, ...], group: int, device):
        super().__init__()
        self.group = group
        self.factor = nn.Parameter(torch.ones(*shape[:-1], shape[-1] // group, device=device))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.factor.repeat_interleave(self.group, dim=-1)


def kl_to(log_p: torch.Tensor, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the predicted positions of KL(P || P_model), log P given as log_probs lays it out."""
    return F.kl_div(log_probs(model, ids), log_p, log_target=True, reduction="batchmean")


def mean_kl(reference: nn.Module, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the predicted positions of KL(P_reference || P_model)."""
    with torch.no_grad():
        log_p = log_probs(reference, ids)
    return kl_to(log_p, model, ids)


@torch.no_grad()
def reference_logits(reference: nn.Module, windows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference's logits at every predicted position of every window, autocast to `dtype` as a
    tuning step would compute them, kept on the CPU: (n, seqlen - 1, vocab). Computed once, they spare
    every step its reference forward pass (bundled model, w3 g128: the stage 69.7 -> 58.2 s, the same
    factors); they take n * (seqlen - 1) * vocab * 2 bytes in bf16 (SmolLM2, 28 x 512 windows: 1.4 GB)."""
    with torch.autocast(windows.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return torch.cat([reference(input_ids=w, use_cache=False).logits[:, :-1].cpu() for w in windows.split(BATCH)])


@torch.no_grad()
def windows_kl(reference: nn.Module, model: nn.Module, windows: torch.Tensor) -> float:
    return sum(float(mean_kl(reference, model, w)) * w.shape[0] for w in windows.split(BATCH)) / windows.shape[0]


def tune_end_to_end(
    reference: nn.Module,
    model: nn.Module,
    groups: dict[str, int],
    windows: torch.Tensor,
    epochs: float,
    lr: float,
    seed: int = 0,
    progress=None,
    dtype: torch.dtype = torch.float32,
    judge: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """Learn a factor for every parameter of `model` named in `groups` ({name: group length along its last
    dimension; 1 for one factor per element}), `epochs` passes over `windows` in batches of BATCH, Adam
    with a cosine-decaying lr, both models' forward passes autocast to `dtype`.

    With `judge` windows, their KL (float32) is measured before the first step and after every pass: the
    tuning stops at the first pass that does not lower it, and the factors of its lowest measurement are
    returned (all ones if no pass beat the start). SmolLM2 w4 g64: the 4 passes raised it, 0.04987 ->
    0.05384, and took 342 s of a 2136 s run that kept none of them.

    Returns ({name: factor}, the minibatch losses, the judge's KLs); `model` is left as it was."""
    device = windows.device
    for t in model.parameters():
        t.requires_grad_(False)
    factors = {}
    for name, group in groups.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        parametrize.register_parametrization(module, attr, GroupFactor(getattr(module, attr).shape, group, device))
        factors[name] = module.parametrizations[attr][0].factor
    steps = math.ceil(epochs * windows.shape[0] / BATCH)
    opt = torch.optim.Adam(factors.values(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    order = torch.Generator().manual_seed(seed)
    targets = reference_logits(reference, windows, dtype)
    per_pass = math.ceil(windows.shape[0] / BATCH)
    losses, judged = [], []
    best = {name: f.detach().clone() for name, f in factors.items()}
    try:
        if judge is not None:
            judged.append(windows_kl(reference, model, judge))
        for step in range(steps):
            pick = torch.randint(0, windows.shape[0], (min(BATCH, windows.shape[0]),), generator=order)
            log_p = F.log_softmax(targets[pick].to(device).float().flatten(0, 1), dim=-1)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = kl_to(log_p, model, windows[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
            losses.append(float(loss.detach()))
            stop = False
            if judge is not None and ((step + 1) % per_pass == 0 or step + 1 == steps):
                judged.append(windows_kl(reference, model, judge))
                stop = judged[-1] >= min(judged[:-1])
                if not stop:
                    best = {name: f.detach().clone() for name, f in factors.items()}
            if progress is not None and (stop or (step + 1) % PROGRESS_EVERY == 0 or step + 1 == steps):
                progress(step + 1, steps, losses[-1])
            if stop:
                break
    finally:
        for name in groups:
            owner, _, attr = name.rpartition(".")
            parametrize.remove_parametrizations(model.get_submodule(owner), attr, leave_parametrized=False)
    if judge is None:
        best = {name: f.detach() for name, f in factors.items()}
    return best, losses, judged
