"""What the CLI does around a run: check the input before any heavy work, own the Prefect session,
and turn an error into one line."""

import os
import sys
from contextlib import contextmanager

import torch

from awqflow.options import Options


def check_run(model: str, out: str, options: Options) -> None:
    """Every check that needs no model pass: paths, config, architecture, shapes, calibration and
    evaluation files, disk space for the activations."""
    from awqflow.pipeline import check_disk, check_quantizable, compute_dtype, default_work_dir, resolve_device
    from awqflow.stages.methods import method_named
    from awqflow.stages.model import open_model
    from awqflow.stages.save import check_output_path

    check_output_path(model, out)
    m = open_model(model)
    check_quantizable(m, options)
    if method_named(options.method).needs_inputs:
        if os.path.splitext(options.calib)[1]:
            check_text_file(options.calib, "calibration", "--calib")
        device = resolve_device((options.devices or [None])[0])
        element = torch.tensor([], dtype=compute_dtype(m.config, device)).element_size()
        store = m.n_blocks * options.n_samples * options.seqlen * m.config.hidden_size * element
        check_disk(os.path.join(options.work_dir or default_work_dir(out), "activations"), store)
    if options.eval_text:
        check_text_file(options.eval_text, "evaluation text", "--eval-text")


def check_text_file(path: str, what: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist: pass an existing file to {flag}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} file {path} is empty: pass a file with text to {flag}")


def quiet_prefect_errors() -> None:
    """Prefect prints a failed task's traceback on the terminal before the CLI's one-line message: keep
    Prefect's errors off the console handlers (its API handler still sends them to a server's UI)."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect") and record.levelno >= logging.ERROR)

    loggers = [logging.getLogger()] + [
        logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("prefect")
    ]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler):
                handler.addFilter(keep)


def _die_with_parent(parent: int) -> None:
    """In the server's child process, before exec: Linux kills it when the CLI process ends, however it
    ends (SIGKILL and OOM kills included, which run no cleanup). SIGKILL, not SIGTERM: on a loaded machine
    its graceful shutdown took seconds (4 s seen here, longer than a test's 15 s once on CI), and SQLite
    keeps its database whole through a kill."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the CLI died between fork and prctl: no signal will come
        os._exit(1)


def _spawn_server(server) -> None:
    """Start Prefect's temporary server process from this (the main) thread: the parent-death signal
    follows the thread that forks, so a helper thread's exit would stop the server."""
    import prefect.server.api.server as server_module

    real_popen = server_module.subprocess.Popen
    parent = os.getpid()

    def popen(*args, **kwargs):
        return real_popen(*args, preexec_fn=lambda: _die_with_parent(parent), **kwargs)

    server.port = server.find_available_port()
    server_module.subprocess.Popen = popen
    try:
        server.server_process = server._run_uvicorn_command()
    finally:
        server_module.subprocess.Popen = real_popen
    server.running = True


def _wait_for_server(server, timeout: float) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            code = server.server_process.poll()
            if code == 3:  # uvicorn could not bind the port: another process took it meanwhile
                _spawn_server(server)
            elif code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {code}: rerun with --debug")
            try:
                if client.get(f"{server.api_url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(
        f"the temporary Prefect server did not answer within {timeout:.0f} s: "
        "set PREFECT_API_URL to a running server, or retry on a less loaded machine"
    )


@contextmanager
def prefect_session(startup_timeout: int = 180, debug: bool = False):
    """The Prefect API for one CLI run. With PREFECT_API_URL set, the user's server. Otherwise a
    temporary server owned by this process: it cannot outlive it, it gets a startup timeout that a
    loaded machine meets, and concurrent runs start theirs one at a time (the first start creates the
    shared database; two at once race on it).

    The server starts in the background: the body does its own start-up work meanwhile (input checks,
    imports; an error there stops the server unused) and calls the yielded `ready()` before the API."""
    import fcntl
    from contextlib import ExitStack

    import prefect.server.api.server as server_module
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    # Prefect sets its log handlers up when the flows are imported, which the body does: quiet them then
    quiet = (lambda: None) if debug else quiet_prefect_errors
    if PREFECT_API_URL.value():
        yield quiet
        return
    home = PREFECT_HOME.value()
    home.mkdir(parents=True, exist_ok=True)
    server = server_module.SubprocessASGIServer()
    with ExitStack() as stack:
        lock = stack.enter_context(open(home / "awqflow-server.lock", "w"))
        fcntl.flock(lock, fcntl.LOCK_EX)
        stack.callback(server.stop)
        _spawn_server(server)

        def ready() -> None:
            quiet()
            _wait_for_server(server, startup_timeout)
            fcntl.flock(lock, fcntl.LOCK_UN)
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
            # the run's last log lines reach the server before it stops
            stack.callback(APILogWorker.drain_all, timeout=5)

        yield ready


def report_error(e: BaseException) -> None:
    """At most three lines on stderr naming the problem (and its fix), then exit 1."""
    from pydantic import ValidationError

    from awqflow.options import describe_error

    if isinstance(e, ValidationError):
        text = describe_error(e)
    elif isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, (ValueError, OSError, RuntimeError, FloatingPointError)):
        text = str(e) or type(e).__name__
    else:  # not a known bad input: say what it was and where to look
        text = f"{type(e).__name__}: {e}\nrerun with --debug for the traceback"
    lines = [line for line in text.splitlines() if line.strip()][:3] or [type(e).__name__]
    lines[0] = f"awqflow: error: {lines[0]}"
    print("\n".join(lines), file=sys.stderr)
    sys.exit(1)
