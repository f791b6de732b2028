"""Checkpoints stay the same across refactors: the bundled model's outputs for a few option sets against
summaries recorded before the structure changed (issue 12). A change that moves results on purpose (a
better search) re-records them in the same commit, and says so:

    AWQFLOW_GOLDEN_RECORD=1 .venv/bin/python -m pytest tests/test_golden.py

Not bit hashes: the same code on another CPU (AVX-512 against AVX2 kernels, other reduction orders)
moves float results by an ulp, which flips a rounding tie here and there and so every hash. Each tensor
is summarised by its sum and absolute sum (float tensors as they are, packed integer tensors by their
4-bit nibbles): a tie flipped moves a sum by a few 1e-6 of itself, another alpha for a group by far more
than the 5e-5 allowed."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from awqflow import pipeline
from awqflow.options import Options

from conftest import CALIB, FIXTURE

TOLERANCE = 5e-5
RECORDED = os.path.join(os.path.dirname(__file__), "golden.json")
CASES = {
    "awq-w4g128-full-grid": {"grid_stride": 1},
    "awq-w4g128": {},
    "rtn-w4g128": {"method": "rtn"},
    "awq-w3g64": {"w_bit": 3, "group_size": 64},
    "awq-w4g64-ct": {"group_size": 64, "format": "compressed-tensors"},
    "awq-w4g128-sequential": {"mode": "sequential"},
    "awq-gptq-w4g128": {"method": "awq-gptq"},
}


def tensor_summary(t: torch.Tensor) -> list[float]:
    if t.is_floating_point():
        v = t.double()
    else:  # packed codes: one value per 4-bit nibble, so a flipped code moves the sum by a few units
        b = t.contiguous().view(-1).view(torch.uint8).long()
        v = torch.cat([b & 0xF, b >> 4]).double()
    return [float(v.sum()), float(v.abs().sum())]


def checkpoint_summary(out) -> dict:
    """Every tensor's (sum, absolute sum), with its dtype and shape, and the quantization_config."""
    tensors = load_file(out / "model.safetensors")
    summary = {name: [str(t.dtype), list(t.shape), *tensor_summary(t)] for name, t in sorted(tensors.items())}
    summary["quantization_config"] = json.loads((out / "config.json").read_text()).get("quantization_config")
    return summary


def assert_same(found: dict, expected: dict):
    assert found.keys() == expected.keys()
    assert found["quantization_config"] == expected["quantization_config"]
    for name in found.keys() - {"quantization_config"}:
        (dtype, shape, *sums), (want_dtype, want_shape, *want_sums) = found[name], expected[name]
        assert (dtype, shape) == (want_dtype, want_shape), name
        assert sums == pytest.approx(want_sums, rel=TOLERANCE, abs=1e-6), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_is_the_recorded_one(case, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "golden-work"  # shared: one capture for the AWQ cases
    out = tmp_path_factory.mktemp("golden") / case
    options = Options(calib=str(CALIB), n_samples=8, seqlen=128, work_dir=str(work), **CASES[case])
    pipeline.run(str(FIXTURE), str(out), options)
    found = checkpoint_summary(out)
    if os.environ.get("AWQFLOW_GOLDEN_RECORD"):
        recorded = json.load(open(RECORDED)) if os.path.exists(RECORDED) else {}
        recorded[case] = found
        with open(RECORDED, "w") as f:
            json.dump(recorded, f, indent=1, sort_keys=True)
    with open(RECORDED) as f:
        assert_same(found, json.load(f)[case])


def test_summaries_tolerate_a_flipped_tie_but_not_another_alpha():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**31 - 1, (256, 32), dtype=torch.int32, generator=g)  # a 256 x 256 4-bit linear
    flipped = codes.clone()
    flipped[3, 5] ^= 1 << 8  # one code off by one
    assert tensor_summary(flipped) != tensor_summary(codes)
    assert tensor_summary(flipped) == pytest.approx(tensor_summary(codes), rel=TOLERANCE)
    w = torch.rand(256, 256, generator=g) * 0.1
    s = torch.rand(256, generator=g) + 0.5  # the weights scaled by another alpha's s, re-rounded
    other = (torch.round(w * s / 0.01) * 0.01) / s
    assert tensor_summary(other) != pytest.approx(tensor_summary(torch.round(w / 0.01) * 0.01), rel=TOLERANCE)
