"""Checkpoints stay bit-identical across refactors: the bundled model's outputs for a few option sets
against hashes recorded before the structure changed (issue 12). A change that moves results on
purpose (a better search) updates these hashes in the same commit, and says so: the coarse-to-fine
scale search (issue 15) moved awq-w3g64, -sequential and -w4g64-ct; with grid_stride=1 (the whole
grid) the checkpoint is still the one recorded before it."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from awqflow import pipeline
from awqflow.options import Options

from conftest import CALIB, FIXTURE

GOLDEN = {
    "awq-w4g128-full-grid": (
        {"grid_stride": 1},
        "6c086376d08cf932b1bc63236f80b1e82c8d4003f897bcc8f0a5139783e810e3",
    ),
    "awq-w4g128": ({}, "6c086376d08cf932b1bc63236f80b1e82c8d4003f897bcc8f0a5139783e810e3"),
    "rtn-w4g128": ({"method": "rtn"}, "24eb7ae14dc69da8b0892f19c143238fe2068921333a247fda9d2aa7f25317aa"),
    "awq-w3g64": ({"w_bit": 3, "group_size": 64}, "b666bbc53ed0f2e956047c6ba345df44f893956bd14dbb376e9140bf8e956159"),
    "awq-w4g64-ct": (
        {"group_size": 64, "format": "compressed-tensors"},
        "b241771a17629bbea37acbaba3826a1d9711cea249765910572eb6a47b6b7821",
    ),
    "awq-w4g128-sequential": (
        {"mode": "sequential"},
        "37ff39571aebc552fae3152c85bb77ffcdcaa13d7f069eb421cda0855dd0044b",
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
