"""What a person sees in the Prefect UI after a run: headless Chromium against a real local server.

One fixture run of the bundled model (awq/quantize, served by `python -m awqflow.flows.deploy`), then
each page is loaded by `chromium --headless --dump-dom --screenshot` (the UI is a JS app: virtual time
lets it fetch and render first) and the test asserts on the rendered DOM text, and on the screenshot's
pixels where a picture must show. Screenshots stay in test-artifacts/ui/ (gitignored) for a person.
"""

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from prefect_server import LocalPrefect

from awqflow.flows.plots import COLORS

from conftest import CALIB, EVAL, FIXTURE, ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-artifacts" / "ui"
# Root (no sandbox), no GPU, a closed network (no background connections), a fresh profile per page.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)"),
    pytest.mark.skipif(not FIXTURE.exists(), reason="needs the fixture model (python fixture/build.py)"),
]


def visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def browse(url: str, shot: Path, expect: tuple[str, ...] = (), size=(1400, 1000)) -> tuple[str, str]:
    """Load `url` in a fresh headless Chromium; screenshot to `shot`; return (DOM, visible text).
    Virtual time runs ahead while the page has no network request pending; a page whose `expect`ed
    strings are not there yet is loaded again with a longer budget."""
    dom, text, err = "", "", ""
    for budget_ms in (10_000, 30_000, 60_000):
        with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
            cmd = [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={shot}",
                "--dump-dom",
                url,
            ]
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            try:
                dom, err = proc.communicate(timeout=90 + budget_ms / 1000)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                dom, err = proc.communicate()
            finally:
                try:  # crashpad and zygote children of this Chromium, if any are left
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        text = visible_text(dom)
        if all(e in text for e in expect) and shot.exists():
            break
    print(f"screenshot: {shot}")
    missing = [e for e in expect if e not in text]
    assert not missing, f"{url}: {missing} not on the page\n---- text\n{text[:3000]}\n---- chromium\n{err[-2000:]}"
    return dom, text


def painted(shot: Path, color, alpha: float = 1.0, tol: float = 0.03) -> int:
    """Pixels of the screenshot within `tol` of `color` (hex) drawn with `alpha` over white."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    target = alpha * np.array(to_rgb(color)) + (1 - alpha)
    return int((np.abs(imread(shot)[..., :3] - target).max(-1) < tol).sum())


@pytest.fixture(scope="module")
def ui_run(tmp_path_factory):
    """The server, the served deployments and one finished awq/quantize run of the fixture model."""
    tmp = tmp_path_factory.mktemp("ui")
    calib, eval_text = tmp / "calib.txt", tmp / "eval.txt"  # small slices: what the UI shows, not quality
    calib.write_text(Path(CALIB).read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    eval_text.write_text(Path(EVAL).read_text(encoding="utf-8")[:4_000], encoding="utf-8")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    t0 = time.monotonic()
    with LocalPrefect(tmp) as lp:
        lp.start_server()
        lp.serve("--param", f"calib={calib}", "--param", "n_samples=4", "--param", "seqlen=64")
        options = {"calib": str(calib), "n_samples": 4, "seqlen": 64, "eval_text": str(eval_text), "eval_seqlen": 64}
        run = lp.deployment_run(
            "awq/quantize", f"model={FIXTURE}", f"out={tmp / 'quantized'}", "options=" + json.dumps(options)
        )
        assert run.state.is_completed(), run.state
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with lp.client() as c:
            artifacts = {
                a.key: a
                for a in c.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
                )
            }
        assert {"awq-report", "awq-scale-stats"} <= set(artifacts), sorted(artifacts)
        print(f"{time.monotonic() - t0:.1f} s: server, deployments and the fixture run; screenshots in {SHOTS}")
        yield lp, run, artifacts, tmp


def test_flow_run_page_shows_the_completed_run(ui_run):
    lp, run, artifacts, _ = ui_run
    _, text = browse(
        f"{lp.url}/v2/runs/flow-run/{run.id}",
        SHOTS / "flow-run.png",
        expect=(run.name, "Completed", "quantize", f"Beginning flow run '{run.name}' for flow 'awq'"),
    )
    header = text.replace("Finished in state Completed()", "")  # the state badge, not a log line
    assert re.search(rf"{re.escape(run.name)} Completed\b", header), header[:1500]

    _, text = browse(
        f"{lp.url}/v2/runs/flow-run/{run.id}?tab=Artifacts",
        SHOTS / "flow-run-artifacts.png",
        expect=("awq-report", "awq-scale-stats", "AWQ run report", "per-layer AWQ scale statistics"),
    )
    assert re.search(r"markdown\s+awq-report", text, re.I) and re.search(r"table\s+awq-scale-stats", text, re.I)


def test_report_artifact_shows_perplexity_and_plots(ui_run):
    lp, run, artifacts, tmp = ui_run
    report = artifacts["awq-report"]
    ppl = dict(re.findall(r"^\| (FP|RTN|AWQ) \| ([0-9.]+) \|", report.data, re.M))
    assert set(ppl) == {"FP", "RTN", "AWQ"}, report.data[:2000]
    for label, shot, url in [
        ("v2", SHOTS / "report.png", f"{lp.url}/v2/artifacts/artifact/{report.id}"),
        ("v1", SHOTS / "report-v1.png", f"{lp.url}/artifacts/artifact/{report.id}"),
    ]:
        dom, text = browse(
            url,
            shot,
            size=(1400, 2400),
            expect=("Perplexity", "Plots", "Time per stage", *[f"{k} {v}" for k, v in ppl.items()]),
        )
        assert len(re.findall(r"<img[^>]*src=\"data:image/png;base64,", dom)) >= 2, f"{label}: no plots in the DOM"
        # The pictures are painted, not just in the DOM: the AWQ bars and the box faces are on the screen.
        assert painted(shot, "#4C72B0") > 2000, f"{label}: the block-error bars are not on {shot}"
        for t in ("q/k/v", "gate/up", "down"):
            assert painted(shot, COLORS[t], alpha=0.55) > 500, f"{label}: no {t} boxes on {shot}"
    pictures = tmp / "quantized.report"
    assert (pictures / "scales.png").exists() and (pictures / "block-error.png").exists()
    assert not list((tmp / "quantized").glob("*.png"))  # beside the checkpoint, not in it


def test_scale_stats_artifact_shows_the_table(ui_run):
    lp, run, artifacts, _ = ui_run
    table = artifacts["awq-scale-stats"]
    columns = ("block", "group", "alpha", "loss_identity", "loss", "scale_mean", "max_over_mean", "share_over_5x_mean")
    first = json.loads(table.data)[0]
    browse(
        f"{lp.url}/v2/artifacts/artifact/{table.id}",
        SHOTS / "scale-stats.png",
        size=(1920, 1000),
        expect=(
            " ".join(columns),
            f"{first['group']} {first['alpha']} {first['loss_identity']} {first['loss']} "
            f"{first['scale_mean']} {first['max_over_mean']}",
            "mlp.up_proj->mlp.down_proj",
        ),
    )
