"""The Prefect flow in ephemeral mode: same result as the plain pipeline, whatever runs the blocks;
cached, resumable, safe to share."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from awqflow import pipeline
from awqflow.flows.awq import awq
from awqflow.options import Options

from conftest import CALIB

SMALL = dict(calib=str(CALIB), n_samples=6, seqlen=64)


def opts(**changes) -> Options:
    return Options(**SMALL, **changes)


def tensors(out) -> dict:
    return load_file(Path(out) / "model.safetensors")


def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].equal(tb[k]), k


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The plain, Prefect-free pipeline's checkpoint."""
    out = tmp_path_factory.mktemp("ref") / "awq"
    pipeline.run(str(tiny_model), str(out), opts())
    return out


def test_thread_runner_with_two_workers_matches_the_plain_pipeline(tiny_model, reference, tmp_path):
    out = tmp_path / "awq"
    result = awq(model=str(tiny_model), out=str(out), options=opts(devices=["cpu", "cpu"]))
    assert_same_checkpoint(out, reference)
    assert set(result["stats"]) == {0, 1}
    assert result["timings"]["blocks"] > 0


@pytest.mark.parametrize("runner,address_variable", [("dask", "DASK_SCHEDULER_ADDRESS"), ("ray", "RAY_ADDRESS")])
def test_local_cluster_matches_the_plain_pipeline(
    runner, address_variable, tiny_model, reference, tmp_path, monkeypatch
):
    monkeypatch.delenv(address_variable, raising=False)  # a local cluster, started and stopped by the runner
    out = tmp_path / "awq"
    awq(model=str(tiny_model), out=str(out), options=opts(devices=["cpu", "cpu"], task_runner=runner))
    assert_same_checkpoint(out, reference)


def test_rerun_recomputes_nothing_and_corrupt_entries_are_recomputed(tiny_model, reference, tmp_path, monkeypatch):
    out, work = tmp_path / "awq", tmp_path / "work"
    awq(model=str(tiny_model), out=str(out), options=opts(work_dir=str(work)))
    calls = []
    original = pipeline.quantize_block
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    awq(model=str(tiny_model), out=str(out), options=opts(work_dir=str(work)))
    assert calls == []
    # flip one byte of one cached block: detected by its checksum, recomputed, never used
    entry = sorted((work / "cache").rglob("*.safetensors"))[0]
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF
    entry.write_bytes(bytes(data))
    awq(model=str(tiny_model), out=str(out), options=opts(work_dir=str(work)))
    assert len(calls) == 1
    assert_same_checkpoint(out, reference)


def cli(model, out, work):
    return [
        sys.executable,
        "-m",
        "awqflow",
        "quantize",
        "--model",
        str(model),
        "--out",
        str(out),
        "--work-dir",
        str(work),
        "--calib",
        SMALL["calib"],
        "--n-samples",
        str(SMALL["n_samples"]),
        "--seqlen",
        str(SMALL["seqlen"]),
    ]


def test_kill_9_during_block_search_then_resume_is_bit_identical(tiny_model, reference, tmp_path):
    out, work = tmp_path / "awq", tmp_path / "work"
    proc = subprocess.Popen(cli(tiny_model, out, work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((work / "cache").rglob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # first block cached, second one in flight or not started
    proc.wait()
    assert not (out / "model.safetensors").exists()
    subprocess.run(cli(tiny_model, out, work), check=True, capture_output=True)
    assert_same_checkpoint(out, reference)


def test_two_runs_sharing_one_cache_at_once(tiny_model, reference, tmp_path):
    work = tmp_path / "work"
    procs = [
        subprocess.Popen(cli(tiny_model, tmp_path / f"out{i}", work), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert_same_checkpoint(tmp_path / "out0", reference)
    assert_same_checkpoint(tmp_path / "out1", reference)


def test_capture_refuses_to_start_without_disk_space(tiny_model, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="not enough disk for the activation store"):
        pipeline.run(str(tiny_model), str(tmp_path / "o"), opts())


def test_sequential_mode_runs_and_differs_from_parallel(tiny_model, reference, tmp_path):
    out = tmp_path / "seq"
    awq(model=str(tiny_model), out=str(out), options=opts(mode="sequential"))
    a, b = tensors(out), tensors(reference)
    assert a.keys() == b.keys()
    # block 0 sees the same input in both modes; later blocks see quantized outputs
    assert all(a[k].equal(b[k]) for k in a if k.startswith("model.layers.0."))
    assert not all(a[k].equal(b[k]) for k in a if k.startswith("model.layers.1."))


def test_a_save_killed_midway_leaves_nothing_that_a_rerun_trips_on(tiny_model, reference, tmp_path):
    out, work = tmp_path / "awq", tmp_path / "work"
    awq(model=str(tiny_model), out=str(out), options=opts(work_dir=str(work)))
    # what kill -9 inside save leaves: a half-written temporary folder, the old output moved aside
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (tmp_path / f"awq.tmp-{dead}").mkdir()
    (tmp_path / f"awq.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    out.rename(tmp_path / f"awq.old-{dead}")
    awq(model=str(tiny_model), out=str(out), options=opts(work_dir=str(work)))
    assert_same_checkpoint(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq", "awq.report", "work"]
