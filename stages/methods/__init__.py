"""The registry of quantization methods: one line per method module."""

from awqflow.stages.method import Method
from awqflow.stages.methods import awq, gptq, rtn

METHODS: dict[str, Method] = {m.name: m for m in (awq.METHOD, rtn.METHOD, gptq.GPTQ, gptq.AWQ_GPTQ)}


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]
