"""Checkpoints stay bit-identical across refactors: the bundled model's outputs for a few option sets
against hashes recorded before the structure changed (issue 12). A change that moves results on
purpose (a better search) updates these hashes in the same commit, and says so."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from awqflow import pipeline
from awqflow.options import Options

from conftest import CALIB, FIXTURE

GOLDEN = {
    "awq-w4g128": ({}, "6c086376d08cf932b1bc63236f80b1e82c8d4003f897bcc8f0a5139783e810e3"),
    "rtn-w4g128": ({"method": "rtn"}, "24eb7ae14dc69da8b0892f19c143238fe2068921333a247fda9d2aa7f25317aa"),
    "awq-w3g64": ({"w_bit": 3, "group_size": 64}, "fcb2ce6ca5cac4890eaaa6d68522293a532fee6a9d01fa2d0955e281f10b3d5f"),
    "awq-w4g64-ct": (
        {"group_size": 64, "format": "compressed-tensors"},
        "51f2c77948e3bd29a294424fc38bd50437b095902adf343746a3a805fade4a11",
    ),
    "awq-w4g128-sequential": (
        {"mode": "sequential"},
        "9d3359b97ff3e62bb89e66f82e1a2fe4444cb44afcf2b0621cffc59660f949e8",
    ),
}


def checkpoint_hash(out) -> str:
    """Every tensor (name, dtype, shape, bytes) and the quantization_config: what a loader reads."""
    h = hashlib.sha256()
    tensors = load_file(out / "model.safetensors")
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    quant = json.loads((out / "config.json").read_text()).get("quantization_config")
    h.update(json.dumps(quant, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_checkpoint_is_bit_identical_to_the_recorded_one(case, tmp_path_factory):
    changes, expected = GOLDEN[case]
    work = tmp_path_factory.getbasetemp() / "golden-work"  # shared: one capture for the AWQ cases
    out = tmp_path_factory.mktemp("golden") / case
    pipeline.run(
        str(FIXTURE), str(out), Options(calib=str(CALIB), n_samples=8, seqlen=128, work_dir=str(work), **changes)
    )
    assert checkpoint_hash(out) == expected
