"""A real local Prefect server, and `python -m awqflow.flows.deploy` serving against it, for the tests.

    with LocalPrefect(tmp_path) as lp:
        lp.start_server()
        lp.serve("--param", "n_samples=4")
        lp.cli("deployment", "run", "awq/quantize", "--watch", "-p", "model=...")
        run = lp.last_run("awq/quantize")

Each process runs in its own session (its children, uvicorn and flow-run subprocesses, form one group)
with a private PREFECT_HOME and TMPDIR under tmp_path; leaving the `with` stops them all.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env, log: Path, cwd=None) -> subprocess.Popen:
    # Own session: the process and its children (uvicorn, flow-run subprocesses) form one group to stop.
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT, SIGINT again, then SIGKILL: to the process group this test started."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGINT, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
    try:  # children left behind in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until(check, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[:3]} exited with {p.returncode} while waiting for {what}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


class LocalPrefect:
    """`prefect server start` on a free loopback port, the deploy module serving, the CLI and a client."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = Path(tmp_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(
            PREFECT_HOME=str(self.tmp_path / "prefect-home"),
            PREFECT_API_URL=self.api,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            # a served Runner leaves an empty $TMPDIR/runner_storage/<uuid>
            TMPDIR=str(self.tmp_path / "tmp"),
        )
        (self.tmp_path / "tmp").mkdir(exist_ok=True)
        self.prefect = str(BIN / "prefect")
        self.server_log, self.serve_log = self.tmp_path / "server.log", self.tmp_path / "serve.log"
        self.procs: list[subprocess.Popen] = []
        self.serve_proc: subprocess.Popen | None = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            print(self.logs())
        self.close()

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        self.procs.clear()

    def logs(self) -> str:
        return "---- server log\n" + tail(self.server_log) + "\n---- serve log\n" + tail(self.serve_log, 8000)

    def start_server(self, timeout: float = 120) -> None:
        self.procs.append(
            start(
                [self.prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                self.env,
                self.server_log,
            )
        )
        wait_until(
            lambda: urllib.request.urlopen(f"{self.api}/health", timeout=2).status == 200,
            timeout,
            "/api/health",
            self.procs,
        )

    def serve(self, *args: str, names=("quantize", "watch"), timeout: float = 90) -> subprocess.Popen:
        """`python -m awqflow.flows.deploy ARGS` (cwd tmp_path); returns once its deployments are registered."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        self.serve_proc = start(
            [sys.executable, "-m", "awqflow.flows.deploy", *args], self.env, self.serve_log, cwd=self.tmp_path
        )
        self.procs.append(self.serve_proc)

        def served():
            with self.client() as c:
                deps = c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
                return len(deps) == len(names)

        wait_until(served, timeout, "the served deployments", self.procs)
        return self.serve_proc

    def stop_serve(self) -> None:
        if self.serve_proc is not None:
            stop(self.serve_proc)
            self.procs.remove(self.serve_proc)
            self.serve_proc = None

    def client(self):
        """A sync client of this server (prefect read its settings at import: point it here explicitly)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api}):
            return get_client(sync_client=True)

    def cli(self, *args: str, cwd=None, timeout: float = 240) -> str:
        r = subprocess.run(
            [self.prefect, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        assert r.returncode == 0, f"prefect {args}:\n" + r.stdout[-3000:] + r.stderr[-3000:] + tail(self.serve_log)
        return r.stdout

    def last_run(self, name: str):
        """The newest run of deployment `name` that is not a future scheduled one."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

        with self.client() as c:
            dep = c.read_deployment_by_name(name)
            runs = c.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]))
            )
        manual = [r for r in runs if r.state_name != "Scheduled"]  # an interval schedule adds future runs
        return max(manual, key=lambda r: r.created)

    def deployment_run(self, name: str, *params: str):
        """`prefect deployment run NAME --watch -p ...`, as a user types it; returns the run."""
        self.cli("deployment", "run", name, "--watch", *[a for p in params for a in ("-p", p)])
        return self.last_run(name)
