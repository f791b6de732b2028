"""Every option of a quantization run, declared once.

The CLI derives its arguments from these fields, the `awq` flow takes an `Options` as its parameter
(Prefect validates it and draws it as a form in the UI's "run deployment" dialog), the watch flow
and prefect.yaml pass it through. Model and output paths are not options: they name the run.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from awqflow.stages.methods import METHODS, method_named
from awqflow.stages.quantize import QuantConfig


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(
        "awq", description=f"quantization method: {', '.join(METHODS)}", json_schema_extra={"enum": list(METHODS)}
    )
    w_bit: Literal[4, 3] = Field(4, description="4 (AutoAWQ GEMM checkpoint) or 3 (fake-quant checkpoint)")
    group_size: Literal[128, 64, 32, -1] = Field(
        128, description="input channels per quantization group; -1: whole row"
    )
    zero_point: bool = Field(True, description="asymmetric quantization with zero points, or symmetric")
    calib: str = Field("pileval", description="calibration text: local .txt/.jsonl/.parquet file or datasets name")
    text_field: str = Field("text", description="text field of .jsonl/.parquet/datasets calibration data")
    n_samples: int = Field(128, ge=1, description="calibration windows")
    seqlen: int = Field(512, ge=2, description="tokens per calibration window")
    seed: int = Field(0, description="shuffles the calibration documents")
    clip: bool = Field(
        True,
        description="awq: AWQ clip search after the scale search; "
        "awq-round: in the AWQ codes its learned ones must beat",
    )
    duo_scaling: bool = Field(True, description="s = x_mean^a / w_mean^(1-a); off: s = x_mean^a")
    n_grid: int = Field(20, ge=1, description="alpha grid points of the scale search")
    grid_stride: int = Field(
        4,
        ge=1,
        description="scale search: every k-th alpha first, then the bracket around the best one bisected "
        "(1: the whole grid)",
    )
    grid_tokens: int = Field(
        8192,
        ge=0,
        description="scale search: measure each candidate's loss on at most this many calibration tokens "
        "(evenly spaced windows; 0: all)",
    )
    gptq_damp: float = Field(
        0.01, gt=0, le=1, description="gptq, awq-gptq: damping added to the Hessian's diagonal, times its mean"
    )
    gptq_block_size: int = Field(128, ge=1, description="gptq, awq-gptq: columns per lazy error update")
    gptq_actorder: bool = Field(
        True,
        description="gptq, awq-gptq: columns by descending input energy, groups fixed beforehand "
        "(static order: the checkpoint layout is unchanged)",
    )
    round_steps: int = Field(200, ge=0, description="awq-round, round: signed-gradient steps per block")
    round_lr: float | None = Field(None, gt=0, description="awq-round, round: learning rate (default 1 / steps)")
    # bf16 is AutoRound's own pick on bf16-capable hardware. SmolLM2 w3 g64, 4 windows a step: 13.164 / 0.28883 in
    # 0.76x AutoRound's time; 8 (and 8 held out): 13.295 / 0.29588 in 1.30x (bench/results/*-dec05*). Bundled w3 g128
    # (2026-12-07): 2 windows a step, blocks 98.5 -> 71.8 s, ppl / KL 50.750 / 0.00361 -> 50.737 / 0.00362; SmolLM2
    # w3 g64 with it (and 3 end-to-end passes of 2 a step): 12.679 / 0.26139 -> 12.752 / 0.26344, blocks 38 % faster
    round_batch_size: int = Field(2, ge=1, description="awq-round, round: calibration windows per step")
    round_dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="awq-round, round: precision of the tuning pass (float32 where the device lacks fast bf16)",
    )
    round_start: Literal["nearest", "gptq"] = Field(
        "nearest",
        description="awq-round: where the rounding offsets start: plain rounding, or GPTQ's codes of the scaled "
        "weights (better ppl on the bundled model, worse on SmolLM2 at w3)",
    )
    round_patience: int = Field(
        0, ge=0, description="awq-round, round: stop once the best loss has not improved for this many steps (0: never)"
    )
    e2e_epochs: float | None = Field(
        None,
        ge=0,
        description="after the blocks: passes over the calibration windows of end-to-end tuning (group scales "
        "and norm weights against the FP model's logits, codes fixed; holds the FP and quantized models in "
        "float32 at once, and the FP logits of the calibration windows); 0: none; default: the method's (3 for "
        "awq-round, 0 for the others)",
    )
    e2e_lr: float = Field(3e-3, gt=0, description="end-to-end tuning: Adam learning rate of the factors (start at 1)")
    mode: Literal["parallel", "sequential"] | None = Field(
        None,
        description="parallel: every block searched on FP inputs (AutoAWQ); "
        "sequential: on the quantized previous blocks' outputs (llm-compressor); "
        "default: the method's (sequential for awq-round and round, parallel for the others)",
    )
    format: Literal["awq-gemm", "compressed-tensors"] = Field(
        "awq-gemm", description="checkpoint layout: AutoAWQ GEMM or compressed-tensors pack-quantized"
    )
    devices: list[str] | None = Field(
        None, description="device pool, one block per device at a time (default: cuda if present, else cpu)"
    )
    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="where block tasks run: threads here, or a Dask / Ray cluster"
    )
    work_dir: str | None = Field(None, description="activations and block-result cache (default: OUT.work)")
    eval_text: str | None = Field(
        None, description="text file: after quantizing, report FP / RTN / quantized perplexity and KL on it"
    )
    eval_seqlen: int | None = Field(None, ge=2, description="evaluation window (default: model max, <= 2048)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        method_named(value)
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _autoawq_format_name(cls, value):
        """AutoAWQ calls its layout a version ("GEMM")."""
        return "awq-gemm" if isinstance(value, str) and value.lower() == "gemm" else value

    @property
    def block_mode(self) -> str:
        """The mode the blocks run in: the one asked for, else the method's."""
        return self.mode or method_named(self.method).mode

    @field_validator("e2e_epochs")
    @classmethod
    def _end_to_end_needs_calibration(cls, value, info: ValidationInfo):
        method = info.data.get("method")
        if value and method in METHODS and not METHODS[method].needs_inputs:
            raise ValueError(f"end-to-end tuning needs calibration windows; method {method} takes none: use another")
        return value

    @property
    def end_to_end_epochs(self) -> float:
        """Passes of end-to-end tuning: the ones asked for, else the method's."""
        return method_named(self.method).e2e_epochs if self.e2e_epochs is None else self.e2e_epochs

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.w_bit, self.group_size, self.zero_point)


def describe_error(error) -> str:
    """A pydantic ValidationError as one line per field: `w_bit=8: Input should be 4 or 3`."""
    lines = []
    for e in error.errors():
        name = ".".join(str(p) for p in e["loc"]) or "options"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{name}={e['input']!r}: {msg}" if e["type"] != "extra_forbidden" else f"unknown option {name}")
    return "; ".join(lines)
