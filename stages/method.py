"""What a quantization method is: how it turns one block into quantized codes, and what it needs.

A method module (stages/methods/) defines one `Method`; stages/methods/__init__.py registers it.
The pipeline treats every method alike: it calibrates and captures inputs only for methods that
need them, keys the block cache on the options the method names, and packs the codes it returns.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from awqflow.stages.quantize import QuantConfig, quantize_codes

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # quantize_codes' (codes, scales, zeros)


@dataclass(frozen=True)
class BlockInputs:
    """What a block sees on the calibration windows: its input hidden states and call kwargs."""

    hidden: torch.Tensor
    kwargs: dict
    # sequential mode, for methods with fp_targets: the FP model's own output of this block (its input
    # is the FP model's, not `hidden`), i.e. what the quantized model should produce here
    fp_target: torch.Tensor | None = None
    index: int | None = None  # which block (for progress messages)


@dataclass(frozen=True)
class Method:
    name: str
    # (block, arch, inputs or None, options) -> ({linear name: codes}, statistics). The block is a
    # private copy: a method may rewrite its weights (AWQ fuses scales into norms); every linear it
    # returns no codes for is saved as it is.
    quantize_block: Callable[..., tuple[dict[str, Codes], dict]]
    needs_inputs: bool  # calibration windows and each block's captured input
    options: tuple[str, ...] = ()  # Options fields its results depend on beyond bits / group / zero point
    # per-block statistics -> rows of the run's statistics table (Prefect UI), or None
    table: Callable[[dict], list[dict]] | None = None
    # sequential mode: also give it BlockInputs.fp_target, so it can undo the error of the blocks
    # before it (AutoRound's quantized inputs with FP targets); costs one more block forward
    fp_targets: bool = False
    mode: str = "parallel"  # the blocks' mode when the run asks for none (Options.mode)
    e2e_epochs: float = 0  # end-to-end tuning after the blocks when the run asks for none (Options.e2e_epochs)


def linears_of(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def quantized_linears(block: nn.Module, arch) -> dict[str, nn.Linear]:
    """The block's linears that get quantized (all but the architecture's full-precision ones)."""
    return {n: lin for n, lin in linears_of(block).items() if n not in arch.unquantized}


def round_linears(block: nn.Module, arch, qcfg: QuantConfig) -> dict[str, Codes]:
    """Every quantized linear's weights, as they are now, rounded to nearest."""
    return {n: quantize_codes(lin.weight.data, qcfg) for n, lin in quantized_linears(block, arch).items()}
