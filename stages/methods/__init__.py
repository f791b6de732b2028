"""The registry of quantization methods: one line per method."""

from awqflow.stages.method import Method
from awqflow.stages.methods import awq, gptq, learned_rounding, rtn

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        awq.METHOD,
        rtn.METHOD,
        gptq.GPTQ,
        gptq.AWQ_GPTQ,
        learned_rounding.AWQ_ROUND,
        learned_rounding.ROUND,
    )
}


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]
