"""AWQ scale search (SPEC §3): one exponent alpha per scale group, chosen on the module's output.

s = x_mean^alpha / w_mean^(1-alpha) ("duo") or x_mean^alpha ("plain"), normalised so that
max(s) * min(s) = 1. The candidates of a pass ride along the batch dimension, each linear of the group
multiplying its slice of the batch by that candidate's weights, so a pass costs one batched forward
rather than a Python loop of small kernels.

Coarse to fine: the identity (s = 1, i.e. RTN) and every grid_stride-th alpha first, then the bracket
around the best alpha so far bisected (stride 4: the alphas 2 away, then 1 away; 10 of 21 candidates).
The loss is smooth and unimodal enough in alpha for this to find the full grid's alpha in nearly every
group (the whole bracket at stride 4 found it in 35 of 36 groups of the bundled model and SmolLM2-135M;
the one miss cost 0.8 % of that group's loss). The grid's loss is measured on at most grid_tokens
tokens (evenly spaced whole windows; the scales' statistics use all): 8192 tokens gave the bundled
model the perplexity and KL of its 65536 (50.703 / 0.00349 against 50.706 / 0.00349) at 2.5x less
time per block.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from awqflow.stages.architectures import Architecture, ScaleGroup
from awqflow.stages.model import set_module
from awqflow.stages.quantize import QuantConfig, fake_quantize

QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)


@dataclass(frozen=True)
class SearchConfig:
    n_grid: int = 20
    duo_scaling: bool = True
    grid_stride: int = 4  # 1: every alpha of the grid
    grid_tokens: int = 8192  # the grid's loss is measured on at most this many tokens; 0: all
    # bytes one step of the grid may hold (weights + activations). Small on purpose: glibc serves
    # allocations over 32 MiB with fresh mmaps, and on a CPU the page faults of GiB-sized steps cost
    # more system time than the larger matmuls save (block 0 of the bundled model: 29.6 s at 2 GiB,
    # 21.5 s at 60 MB, same result)
    memory_budget: int = 64 << 20


def group_applies(block: nn.Module, group: ScaleGroup) -> bool:
    """A linear can absorb 1/s only if (its part of) its output width matches the next input (not under
    GQA v->o)."""
    prev = block.get_submodule(group.prev)
    first = block.get_submodule(group.linears[0])
    return not isinstance(prev, nn.Linear) or prev.out_features == group.prev_chunks * first.in_features


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\*", r"([^.]+)"))


def block_groups(block: nn.Module, arch: Architecture) -> list[ScaleGroup]:
    """The architecture's groups as they exist in this block: wildcards expanded, absent or
    inapplicable groups left out."""
    names = [n for n, _ in block.named_modules()]
    out = []
    for group in arch.groups:
        if "*" in group.prev:  # one group per match, every * standing for the same component
            rx = _pattern(group.prev)
            keys = [m.group(1) for n in names if (m := rx.fullmatch(n))]
            found = [
                replace(
                    group,
                    prev=group.prev.replace("*", k),
                    inspect=group.inspect.replace("*", k),
                    linears=tuple(n.replace("*", k) for n in group.linears),
                )
                for k in keys
            ]
        else:  # every match of the linears' patterns in one group
            linears = tuple(n for p in group.linears for n in names if _pattern(p).fullmatch(n))
            found = [replace(group, linears=linears)] if linears else []
        out += [
            g
            for g in found
            if all(n in names for n in (g.prev, g.inspect, *g.linears, *g.also_scaled)) and group_applies(block, g)
        ]
    return out


def candidate_scales(x: torch.Tensor, weights: list[torch.Tensor], qcfg: QuantConfig, scfg: SearchConfig):
    """(alphas, scales): alpha None is the identity; scales (n_candidates, in_features) float32."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    w = torch.cat(weights).float()
    g = qcfg.group_len(w.shape[1])
    wg = w.abs().view(w.shape[0], -1, g)
    w_mean = (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).view_as(w).mean(0)
    alphas = torch.arange(scfg.n_grid, dtype=torch.float32, device=x.device)[:, None] / scfg.n_grid
    if scfg.duo_scaling:
        s = x_mean.pow(alphas) / (w_mean.pow(1 - alphas) + 1e-4)
    else:
        s = x_mean.pow(alphas)
    s = s.clamp(min=1e-4)
    s = s / (s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True)).sqrt()
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    s = torch.cat([torch.ones_like(s[:1]), s])
    return [None] + [i / scfg.n_grid for i in range(scfg.n_grid)], s


class CandidateLinear(nn.Module):
    """Stands in for a linear during the grid: the input's batch is candidate-major, (c * b, ..., in),
    and each candidate's slice is multiplied by that candidate's weights (c, out, in)."""

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weights, self.bias = weights, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.weights.shape[0]
        y = torch.bmm(x.reshape(c, -1, x.shape[-1]), self.weights.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weights.shape[1])


@contextmanager
def swapped_modules(root: nn.Module, replacements: dict[str, nn.Module]):
    """root's submodules named in replacements replaced for the duration of the block, then put back."""
    originals = {name: root.get_submodule(name) for name in replacements}
    for name, module in replacements.items():
        set_module(root, name, module)
    try:
        yield
    finally:
        for name, module in originals.items():
            set_module(root, name, module)


def _call(module: nn.Module, x: torch.Tensor, kwargs: dict | None):
    out = module(x, **kwargs) if kwargs is not None else module(x)
    return out[0] if isinstance(out, tuple) else out


def grid_losses(
    root: nn.Module,
    inspect: str,
    linears: list[str],
    scales: torch.Tensor,
    x: torch.Tensor,
    qcfg: QuantConfig,
    scfg: SearchConfig,
    kwargs: dict | None = None,
    batched: bool = True,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of root's submodule `inspect`'s output, per candidate, with W -> Q(W * s) / s in
    every named linear. ref, when the caller has it already: that module's FP output on x (float32), or
    where the module is the one linear, the Gram matrix of x (gram_matrix).

    Candidates go in chunks whose quantized weights and activations fit the memory budget; each
    chunk's weights are quantized once and reused for every batch of samples. batched=False takes
    one candidate at a time: needed where a module routes tokens (MoE experts see a subset of the
    batch, so candidates cannot ride along the batch dimension)."""
    lins = [root.get_submodule(n) for n in linears]
    if linears == [inspect] and batched:
        return gram_losses(lins[0].weight, scales, x, qcfg, scfg, gram=ref)
    n_cand = scales.shape[0]
    weight_bytes = sum(lin.weight.numel() for lin in lins) * x.element_size() * 2
    widest = max([x.shape[-1]] + [lin.out_features for lin in lins])
    sample_bytes = x[0].numel() // x.shape[-1] * widest * x.element_size() * 4
    cand_chunk = int(max(1, min(n_cand if batched else 1, scfg.memory_budget // 2 // weight_bytes)))
    batch = int(max(1, scfg.memory_budget // 2 // (sample_bytes * cand_chunk)))
    with torch.no_grad():
        if ref is None:
            ref = inspect_output(root, inspect, x, kwargs)
        refs = ref.split(batch)
        sq_err = torch.zeros(n_cand, dtype=torch.float64, device=x.device)
        for start in range(0, n_cand, cand_chunk):
            s = scales[start : start + cand_chunk].to(x.dtype)
            trial = {
                n: CandidateLinear(fake_quantize_stack(lin.weight, s, qcfg), lin.bias) for n, lin in zip(linears, lins)
            }
            with swapped_modules(root, trial):
                module = root.get_submodule(inspect)
                for xb, ref in zip(x.split(batch), refs):
                    out = _call(module, xb.repeat(len(s), *[1] * (xb.dim() - 1)), kwargs).float()
                    sq_err[start : start + len(s)] += (
                        (out.view(len(s), -1) - ref.view(1, -1)).pow(2).sum(dim=1).double()
                    )
    return sq_err / sum(r.numel() for r in refs)


@torch.no_grad()
def inspect_output(root: nn.Module, inspect: str, x: torch.Tensor, kwargs: dict | None) -> torch.Tensor:
    """root's submodule `inspect` run on x (windows or token rows), in float32, about 4096 tokens at a
    time: the target every candidate is measured against."""
    batch = max(1, 4096 // (x.shape[1] if x.dim() == 3 else 1))
    return torch.cat([_call(root.get_submodule(inspect), xb, kwargs).float() for xb in x.split(batch)])


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """x^T x / tokens of x (..., in), float32."""
    xt = x.reshape(-1, x.shape[-1]).float()
    return xt.T @ xt / xt.shape[0]


def gram_losses(
    w: torch.Tensor,
    scales: torch.Tensor,
    x: torch.Tensor,
    qcfg: QuantConfig,
    scfg: SearchConfig,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """grid_losses where the inspected module is the one linear: its output error is x @ D^T with
    D = Q(W * s) / s - W (the bias cancels), so the mean squared error is tr(D G D^T) / out with
    G = x^T x / tokens, computed once. The grid then costs out * in^2 per candidate, not tokens * in * out."""
    gram = gram_matrix(x) if gram is None else gram
    w = w.float()
    per_cand = w.numel() * 4 * 3  # the candidate's Q(W), D and D @ G, float32
    chunk = int(max(1, min(len(scales), scfg.memory_budget // per_cand)))
    losses = []
    for s in scales.float().split(chunk):
        d = fake_quantize_stack(w, s, qcfg) - w
        losses.append(((d @ gram) * d).sum(dim=(1, 2)).double())
    return torch.cat(losses) / w.shape[0]


def grid_sample(x: torch.Tensor, max_tokens: int, per_token: bool = False) -> torch.Tensor:
    """Every k-th window of x (n, seqlen, in), or row of x (tokens, in), k the smallest step that keeps
    at most max_tokens tokens; all of x when max_tokens is 0. per_token: x's tokens as rows (tokens, in)
    first, for a module that acts on each token alone, so the sample spans every window."""
    if per_token:
        x = x.reshape(-1, x.shape[-1])
    per_row = x.shape[1] if x.dim() == 3 else 1
    if not max_tokens or x.shape[0] * per_row <= max_tokens:
        return x
    return x[:: -(-x.shape[0] * per_row // max_tokens)]


def fake_quantize_stack(w: torch.Tensor, s: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """For each candidate row of s (c, in): Q(w * s) / s, stacked (c, out, in)."""
    scaled = w[None] * s[:, None, :]
    q = fake_quantize(scaled.reshape(-1, w.shape[1]), qcfg).view_as(scaled)
    return q / s[:, None, :]


@torch.no_grad()
def search_scales(
    block: nn.Module,
    group: ScaleGroup,
    x: torch.Tensor,
    qcfg: QuantConfig,
    scfg: SearchConfig = SearchConfig(),
    kwargs: dict | None = None,
):
    """Best per-input-channel scales for one group, and what the search saw."""
    weights = [block.get_submodule(n).weight for n in group.linears]
    alphas, cands = candidate_scales(x, weights, qcfg, scfg)
    losses = torch.full((len(cands),), torch.inf, dtype=torch.float64, device=cands.device)
    kw = kwargs if group.inspect_takes_kwargs else None
    # a module that acts on each token alone (not attention, not a router) is measured on tokens spread
    # over every window: half the tokens of whole windows, as varied a sample (a window's tokens correlate)
    per_token = not group.inspect_takes_kwargs and not group.routes_tokens
    xs = grid_sample(x, scfg.grid_tokens // 2 if per_token else scfg.grid_tokens, per_token)
    single_linear = list(group.linears) == [group.inspect] and not group.routes_tokens
    ref = gram_matrix(xs) if single_linear else inspect_output(block, group.inspect, xs, kw)

    def evaluate(indices: list[int]) -> None:
        todo = [i for i in indices if 0 <= i < len(cands) and losses[i] == torch.inf]
        if todo:
            losses[todo] = grid_losses(
                block,
                group.inspect,
                list(group.linears),
                cands[todo],
                xs,
                qcfg,
                scfg,
                kw,
                batched=not group.routes_tokens,
                ref=ref,
            ).to(losses)

    evaluate([0, *range(1, len(cands), scfg.grid_stride)])
    step = scfg.grid_stride
    while step > 1:  # bisect the bracket around the best alpha so far: stride 4 -> steps 2, 1
        step = (step + 1) // 2
        best = int(torch.argmin(losses[1:])) + 1
        evaluate([best - step, best + step])
    best = int(torch.argmin(losses))
    s = cands[best]
    info = {
        "alpha": alphas[best],
        "loss": float(losses[best]),
        "loss_identity": float(losses[0]),
        "scale_mean": float(s.mean()),
        "scale_max_over_mean": float(s.max() / s.mean()),
        "share_over_5x_mean": float((s > 5 * s.mean()).float().mean()),
        # enough of the distribution for a box plot per layer
        "scale_quantiles": [
            float(q) for q in torch.quantile(s.float(), torch.tensor(QUANTILES, dtype=torch.float32, device=s.device))
        ],
    }
    return s, info


def apply_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fuse 1/s into the previous op and s into the linears' input columns: same function, new weights."""
    prev = block.get_submodule(group.prev)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight[-len(s) :].div_(s.view(-1, 1).to(prev.weight.dtype))  # the last part of a fused prev
        else:
            w = prev.weight
            w.copy_(((w.double() + group.prev_offset) / s.double() - group.prev_offset).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias[-len(s) :].div_(s.to(prev.bias.dtype))
        for name in group.linears + group.also_scaled:
            lin = block.get_submodule(name)
            lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))
