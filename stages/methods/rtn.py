"""Round to nearest: every linear quantized as it is. Needs no calibration."""

from awqflow.stages.method import Method, round_linears


def round_block(block, arch, inputs, opts):
    return round_linears(block, arch, opts.quant), {}


METHOD = Method("rtn", round_block, needs_inputs=False)
