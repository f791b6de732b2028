"""The deployments against a REAL Prefect server, and the requantize flow's scan / skip logic.

test_served_deployments starts `prefect server start` and `python -m awqflow.flows.deploy` as
subprocesses (own PREFECT_HOME), runs `prefect deployment run awq/quantize ... --watch` exactly as a
user would, then checks the run, its artifacts and its output through the Prefect client; then runs
requantize/watch twice (quantize, then skip); then the prefect.yaml route: `prefect deploy --all`,
a process work pool and `prefect worker start --run-once`.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from prefect_server import LocalPrefect

from awqflow.flows import watch

from conftest import CALIB, EVAL, FIXTURE, ROOT

# ---------------------------------------------------------------- scan / skip logic (no Prefect)


def fake_checkpoint(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(weights)
    return path


class FakeQuantize:
    def __init__(self):
        self.calls = []

    def __call__(self, model_dir, out):
        self.calls.append((os.path.basename(model_dir), out))
        os.makedirs(out)
        Path(out, "config.json").write_text("{}")


def test_scan_quantizes_new_skips_done_requantizes_changed(tmp_path, monkeypatch):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    fake_checkpoint(ckpts / "step-100", b"a" * 1000)
    fake_checkpoint(ckpts / "step-200", b"b" * 1000)
    (ckpts / "notes").mkdir()  # no config.json: not a checkpoint
    q = FakeQuantize()

    first = watch.scan(str(ckpts), str(out), q)
    assert sorted(first["quantized"]) == ["step-100", "step-200"] and not first["skipped"]
    fp100 = watch.model_fingerprint(str(ckpts / "step-100"))
    assert first["quantized"]["step-100"] == str(out / f"step-100-{fp100[:12]}")
    ledger = json.loads((out / watch.LEDGER).read_text())
    assert ledger["done"]["step-100"] == {fp100: first["quantized"]["step-100"]}

    # Second scan: nothing hashed (the (name, size, mtime_ns) cache hits), nothing quantized.
    def no_hashing(model_dir):
        raise AssertionError(f"{model_dir} was hashed although unchanged")

    monkeypatch.setattr(watch, "model_fingerprint", no_hashing)
    q.calls.clear()
    second = watch.scan(str(ckpts), str(out), q)
    assert q.calls == [] and sorted(second["skipped"]) == ["step-100", "step-200"]
    monkeypatch.undo()

    # Touched but identical: re-hashed, same fingerprint, still skipped.
    st = os.stat(ckpts / "step-100" / "model.safetensors")
    os.utime(ckpts / "step-100" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert watch.scan(str(ckpts), str(out), q)["skipped"].keys() == {"step-100", "step-200"} and q.calls == []

    # Same size, new content: re-quantized into a new folder; the old result stays in the ledger.
    (ckpts / "step-200" / "model.safetensors").write_bytes(b"c" * 1000)
    third = watch.scan(str(ckpts), str(out), q)
    fp200 = watch.model_fingerprint(str(ckpts / "step-200"))
    assert q.calls == [("step-200", str(out / f"step-200-{fp200[:12]}"))]
    assert list(third["skipped"]) == ["step-100"]
    assert len(json.loads((out / watch.LEDGER).read_text())["done"]["step-200"]) == 2

    # A deleted output is redone; a failure is reported and the rest continues.
    shutil.rmtree(third["quantized"]["step-200"])
    fake_checkpoint(ckpts / "step-300", b"d")
    q.calls.clear()

    def flaky(model_dir, out_dir):
        if model_dir.endswith("step-300"):
            raise RuntimeError("boom")
        q(model_dir, out_dir)

    fourth = watch.scan(str(ckpts), str(out), flaky)
    assert list(fourth["quantized"]) == ["step-200"] and list(fourth["failed"]) == ["step-300"]
    assert "step-300" not in json.loads((out / watch.LEDGER).read_text())["done"]


def test_scan_waits_for_settled_files_and_skips_hub_offline(tmp_path, monkeypatch):
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    fake_checkpoint(ckpts / "fresh", b"x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logs, q = [], FakeQuantize()
    summary = watch.scan(str(ckpts), str(out), q, hub=["org/model@main"], settle_s=3600, log=logs.append)
    assert summary["unsettled"] == ["fresh"] and q.calls == []
    assert any("HF_HUB_OFFLINE" in line and "org/model@main" in line for line in logs)


def test_output_root_inside_checkpoints_is_not_scanned(tmp_path):
    ckpts = tmp_path / "ckpts"
    fake_checkpoint(ckpts / "a", b"a")
    q = FakeQuantize()
    watch.scan(str(ckpts), str(ckpts / "quantized"), q)
    assert watch.find_checkpoints(str(ckpts), exclude=str(ckpts / "quantized")).keys() == {"a"}
    assert len(q.calls) == 1 and watch.scan(str(ckpts), str(ckpts / "quantized"), q)["skipped"].keys() == {"a"}


def test_deploy_cli_builds_both_deployments():
    from awqflow.flows import deploy

    args = deploy.build_parser().parse_args(
        [
            "--checkpoints",
            "c",
            "--output-root",
            "o",
            "--cron",
            "*/5 * * * *",
            "--param",
            "n_samples=16",
            "--param",
            "settle_s=0",
        ]
    )
    quantize, watch_dep = deploy.deployments(args)
    assert (quantize.name, watch_dep.name) == ("quantize", "watch")
    assert quantize.parameters == {"options": {"n_samples": 16}} and not quantize.schedules
    assert watch_dep.parameters == {"options": {"n_samples": 16}, "settle_s": 0, "checkpoints": "c", "output_root": "o"}
    assert watch_dep.schedules[0].schedule.cron == "*/5 * * * *"
    assert quantize.entrypoint == "awqflow.flows.awq.awq"
    with pytest.raises(SystemExit):
        deploy.deployments(deploy.build_parser().parse_args(["--param", "nope=1"]))
    with pytest.raises(SystemExit):
        deploy.deployments(deploy.build_parser().parse_args(["--interval", "60"]))


# ---------------------------------------------------------------- a real server


@pytest.mark.skipif(not FIXTURE.exists(), reason="needs the fixture model (python fixture/build.py)")
def test_deployments_on_a_real_server(tmp_path, tiny_model):
    out = tmp_path / "quantized"
    ckpts, out_root = tmp_path / "checkpoints", tmp_path / "requantized"
    shutil.copytree(tiny_model, ckpts / "tiny")
    calib, eval_text = tmp_path / "calib.txt", tmp_path / "eval.txt"  # small slices: plumbing, not quality
    calib.write_text(Path(CALIB).read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    eval_text.write_text(Path(EVAL).read_text(encoding="utf-8")[:4_000], encoding="utf-8")
    t_start = time.monotonic()

    def lap(what: str):  # a time line per step (pytest -s shows them)
        print(f"{time.monotonic() - t_start:6.1f} s  {what}")

    with LocalPrefect(tmp_path) as lp:
        lp.start_server()
        lap("server healthy")
        lp.serve(
            "--checkpoints",
            str(ckpts),
            "--output-root",
            str(out_root),
            "--interval",
            "3600",
            "--param",
            f"calib={calib}",
            "--param",
            "n_samples=4",
            "--param",
            "seqlen=64",
            "--param",
            "settle_s=0",
        )
        lap("deployments served")
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            FlowRunFilter,
            FlowRunFilterParentFlowRunId,
        )

        # 1. awq/quantize, as a user types it (the calibration defaults come from `--param`).
        # A run's options replace the deployment's as a whole (Prefect merges parameters by name).
        options = {"calib": str(calib), "n_samples": 4, "seqlen": 64}
        run = lp.deployment_run(
            "awq/quantize",
            f"model={tiny_model}",
            f"out={out}",
            "options=" + json.dumps({**options, "eval_text": str(eval_text), "eval_seqlen": 64}),
        )
        lap("awq/quantize run finished")
        assert run.state.is_completed(), run.state
        assert run.parameters["options"]["n_samples"] == 4 and run.parameters["model"] == str(tiny_model)
        with lp.client() as c:
            children = c.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
            )
            assert [ch.name for ch in children] and all(ch.state.is_completed() for ch in children)
            artifacts = c.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id, *[ch.id for ch in children]])
                )
            )
        by_key = {a.key: a for a in artifacts}
        assert {"awq-report", "awq-scale-stats", "awq-blocks"} <= set(by_key), sorted(by_key)
        assert by_key["awq-blocks"].type == "progress" and float(by_key["awq-blocks"].data) == 100.0
        assert by_key["awq-scale-stats"].type == "table" and by_key["awq-report"].type == "markdown"
        assert "AWQ" in by_key["awq-report"].data
        assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"

        # 2. requantize/watch: the first run quantizes the checkpoint, the second skips it.
        first = lp.deployment_run("requantize/watch")
        assert first.state.is_completed(), first.state
        ledger = json.loads((out_root / watch.LEDGER).read_text())
        ((fp, done),) = ledger["done"]["tiny"].items()
        assert done == str(out_root / f"tiny-{fp[:12]}") and (Path(done) / "config.json").exists()
        lap("requantize/watch run 1 finished")
        second = lp.deployment_run("requantize/watch")
        lap("requantize/watch run 2 finished")
        assert second.state.is_completed(), second.state
        assert "tiny: unchanged" in lp.serve_log.read_text(errors="replace")[-20000:]
        with lp.client() as c:
            subflows = c.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first.id, second.id])
                )
            )
        assert [s.name for s in subflows] == [f"awq-tiny-{fp[:12]}"]  # only the first run quantized

        # 3. The worker route: prefect.yaml + a process work pool + a worker. Stop the serve process first:
        # it would go on executing runs of the deployments that `prefect deploy` takes over (same names).
        lp.stop_serve()
        lp.cli("work-pool", "create", "awqflow", "--type", "process")
        lp.cli("--no-prompt", "deploy", "--all", cwd=ROOT)
        lap("serve stopped, prefect.yaml deployed")
        out2 = tmp_path / "quantized-by-worker"
        lp.cli(
            "deployment",
            "run",
            "awq/quantize",
            "-p",
            f"model={tiny_model}",
            "-p",
            f"out={out2}",
            "-p",
            "options=" + json.dumps(options),
        )
        lp.cli("worker", "start", "--pool", "awqflow", "--run-once", cwd=tmp_path)
        run = lp.last_run("awq/quantize")
        assert run.state.is_completed() and run.work_pool_name == "awqflow", run.state
        assert (out2 / "config.json").exists()
        lap("worker run finished")
