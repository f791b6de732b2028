"""The CLI owns what it starts (issue 13): however it is stopped, no Prefect server outlives it, and a
rerun finishes bit-identical to an uninterrupted run; concurrent runs on a fresh Prefect home work."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from awqflow import pipeline
from awqflow.options import Options

from conftest import CALIB

SMALL = dict(calib=str(CALIB), n_samples=6, seqlen=64)
# KILLS=20 for the full check of the issue; the suite runs a few to stay within CI's time
KILLS = int(os.environ.get("AWQFLOW_KILLS", "3"))


def cli(model, out, work, home) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    args = [
        "quantize",
        "--model",
        model,
        "--out",
        out,
        "--work-dir",
        work,
        "--calib",
        SMALL["calib"],
        "--n-samples",
        SMALL["n_samples"],
        "--seqlen",
        SMALL["seqlen"],
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "awqflow", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def processes_of(home) -> list[int]:
    """Live processes started with this Prefect home (the CLI and its server carry it in their environment)."""
    marker = f"PREFECT_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().split()[2] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_gone(home, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def same_checkpoint(a, b) -> bool:
    ta, tb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def test_killed_at_random_points_leaves_nothing_and_resumes_bit_identical(tiny_model, tmp_path):
    reference = tmp_path / "reference"
    pipeline.run(str(tiny_model), str(reference), Options(work_dir=str(tmp_path / "ref-work"), **SMALL))
    out, work, home = tmp_path / "out", tmp_path / "work", tmp_path / "prefect-home"
    rng = random.Random(13)
    for i in range(KILLS):
        proc = cli(tiny_model, out, work, home)
        time.sleep(rng.uniform(1.0, 20.0))
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert wait_gone(home) == [], f"kill {i} ({sig.name}) left processes behind"
        if out.exists():  # the run got to its end before the signal: start the next kill from scratch
            assert same_checkpoint(out, reference)
    proc = cli(tiny_model, out, work, home)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    assert wait_gone(home) == []
    assert same_checkpoint(out, reference)


def test_two_cli_runs_on_a_fresh_prefect_home(tiny_model, tmp_path):
    home = tmp_path / "fresh-home"
    procs = [cli(tiny_model, tmp_path / f"o{i}", tmp_path / f"w{i}", home) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
        err = p.stderr.read()
        assert "Traceback" not in err and "IntegrityError" not in err, err[-3000:]
    assert same_checkpoint(tmp_path / "o0", tmp_path / "o1")
    assert wait_gone(home) == []


def test_cache_keys_change_with_torch_and_transformers(monkeypatch):
    import torch
    import transformers

    from awqflow.storage.fingerprint import code_fingerprint

    before = code_fingerprint()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert code_fingerprint() != before
    monkeypatch.undo()
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert code_fingerprint() != before


@pytest.mark.parametrize("work_dir", [None, "keep"])
def test_watcher_removes_the_work_dir_of_a_finished_checkpoint(tmp_path, monkeypatch, work_dir):
    import logging

    from awqflow.flows import watch

    def fake_awq(model, out, options):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        Path(options.work_dir or pipeline.default_work_dir(out)).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(watch, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(watch.awq, "with_options", lambda **kw: fake_awq)
    (tmp_path / "ck" / "a").mkdir(parents=True)
    (tmp_path / "ck" / "a" / "config.json").write_text("{}")
    options = Options(work_dir=str(tmp_path / work_dir) if work_dir else None)
    summary = watch.requantize.fn(str(tmp_path / "ck"), str(tmp_path / "out"), options=options, settle_s=0)
    (out,) = summary["quantized"].values()
    assert not Path(pipeline.default_work_dir(out)).exists()
    assert (tmp_path / "keep").exists() == (work_dir == "keep")  # a work dir the user named is theirs
