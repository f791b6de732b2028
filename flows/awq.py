"""Prefect flow `awq`: calibration -> capture -> one task per block (in parallel) -> save -> validate.

Flows only wire, cache and parallelise the plain functions of awqflow.pipeline; no math here.
Block results live in the content-addressed cache (storage/cache.py), so a repeated or resumed
run skips every finished block whichever task runner ran it.
"""

import os
import queue
import threading
import time
from contextlib import contextmanager

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from awqflow import pipeline
from awqflow.flows import plots
from awqflow.flows.report import markdown_report, scale_table
from awqflow.storage.cache import BlockCache

_pools: dict[tuple, queue.Queue] = {}
_pools_lock = threading.Lock()


@contextmanager
def device_from(devices: tuple[str, ...]):
    """Lend one device of the pool to the calling task: at most one block per GPU at a time."""
    with _pools_lock:
        pool = _pools.get(devices)
        if pool is None:
            pool = _pools[devices] = queue.Queue()
            for d in devices:
                pool.put(d)
    device = pool.get()
    try:
        yield device
    finally:
        pool.put(device)


def task_runner(name: str, workers: int):
    """threads (one machine), dask (local cluster or DASK_SCHEDULER_ADDRESS), ray (RAY_ADDRESS or local)."""
    if name == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "dask":
        from prefect_dask import DaskTaskRunner

        address = os.environ.get("DASK_SCHEDULER_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    if name == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=os.environ.get("RAY_ADDRESS"))
    raise ValueError(f"task_runner={name!r}: use threads, dask or ray")


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_task(p: pipeline.Plan):
    windows = pipeline.calibrate(p)
    return windows, p.calib_fp


@task(name="capture", cache_policy=NO_CACHE)
def capture_task(p: pipeline.Plan, windows, store_path: str, device: str, progress: bool = False):
    with terminal_bar(progress, p.n_blocks, "capture") as bar:
        store = pipeline.capture(p, windows, store_path, device, progress=lambda done, total: bar.update(1))
    get_run_logger().info("captured %d block inputs: %.1f MiB in %s", p.n_blocks, store.nbytes() / 2**20, store_path)
    return store_path


@task(name="block", task_run_name="block-{index}", cache_policy=NO_CACHE)
def block_task(p: pipeline.Plan, index: int, cache_url: str, store_path: str | None, devices: tuple[str, ...]) -> dict:
    with device_from(devices) as device:
        return pipeline.cached_block(p, index, BlockCache(cache_url), store_path, device)


@task(name="sequential-blocks", cache_policy=NO_CACHE)
def sequential_task(p: pipeline.Plan, windows, cache_url: str, device: str) -> dict:
    return pipeline.sequential_blocks(p, windows, BlockCache(cache_url), device)


@task(name="save", cache_policy=NO_CACHE)
def save_task(p: pipeline.Plan, out: str, cache_url: str) -> list[str]:
    return pipeline.save(p, out, BlockCache(cache_url))


@task(name="perplexity", task_run_name="perplexity-{label}", cache_policy=NO_CACHE)
def perplexity_task(label: str, model_dir: str, text: str, seqlen: int | None, device: str) -> dict:
    return pipeline.evaluate(model_dir, text, seqlen, device)


@contextmanager
def terminal_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar with ETA on stderr for the CLI; a no-op bar for deployments and tests."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"{desc:>10}", unit="block", disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


@flow(name="awq-blocks")
def blocks_flow(p: pipeline.Plan, cache_url: str, store_path: str | None, devices: tuple[str, ...],
                progress: bool = False) -> dict:
    artifact = create_progress_artifact(progress=0.0, key="awq-blocks", description=f"blocks of {p.model_dir}")
    futures = {block_task.submit(p, i, cache_url, store_path, devices): i for i in range(p.n_blocks)}
    stats = {}
    with terminal_bar(progress, p.n_blocks, "blocks") as bar:
        for future in as_completed(list(futures)):
            stats[futures[future]] = future.result()
            bar.update(1)
            update_progress_artifact(artifact, progress=100.0 * len(stats) / p.n_blocks)
    return dict(sorted(stats.items()))


@flow(name="awq", log_prints=True)
def awq(model: str, out: str, method: str = "awq", w_bit: int = 4, group_size: int = 128, zero_point: bool = True,
        calib: str = "pileval", text_field: str = "text", n_samples: int = 128, seqlen: int = 512,
        clip: bool = True, duo_scaling: bool = True, mode: str = "parallel", devices: list[str] | None = None,
        task_runner_name: str = "threads", work_dir: str | None = None, eval_text: str | None = None,
        eval_seqlen: int | None = None, format: str = "awq-gemm", progress: bool = False) -> dict:
    """Quantize `model` into `out`; with eval_text, also report FP / RTN / AWQ perplexity.
    progress: terminal progress bars (the CLI turns them on)."""
    logger = get_run_logger()
    opts = pipeline.Options(method=method, w_bit=w_bit, group_size=group_size, zero_point=zero_point, calib=calib,
                            text_field=text_field, n_samples=n_samples, seqlen=seqlen, clip=clip,
                            duo_scaling=duo_scaling, mode=mode, format=format)
    devices = tuple(devices or [pipeline.resolve_device(None)])
    work = work_dir or pipeline.default_work_dir(out)
    cache_url = os.path.join(work, "cache")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    p = pipeline.plan(model, opts)
    store_path, windows = None, None
    if method == "awq":
        t = time.perf_counter()
        windows, p.calib_fp = calibrate_task(p)
        timings["calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    if method == "awq" and mode == "sequential":
        stats = sequential_task(p, windows, cache_url, devices[0])
    else:
        if method == "awq":
            store_path = capture_task(p, windows, os.path.join(work, f"activations-{p.calib_fp}.zarr"), devices[0],
                                      progress)
            timings["capture"] = time.perf_counter() - t
            t = time.perf_counter()
        runner = task_runner(task_runner_name, len(devices))
        stats = blocks_flow.with_options(task_runner=runner)(p, cache_url, store_path, devices, progress)
    timings["blocks"] = time.perf_counter() - t

    t = time.perf_counter()
    files = save_task(p, out, cache_url)
    timings["save"] = time.perf_counter() - t
    size = sum(os.path.getsize(f) for f in files)
    logger.info("wrote %s (%.1f MiB)", out, size / 2**20)

    table = {}
    if eval_text:
        t = time.perf_counter()
        checkpoints = {"FP": model}
        if method != "rtn":
            rtn_out = out.rstrip("/") + ".rtn"
            rtn = pipeline.quantize_model(model, rtn_out, pipeline.Options(method="rtn", w_bit=w_bit,
                                          group_size=group_size, zero_point=zero_point), work_dir=work,
                                          device=devices[0], log=logger.info)
            checkpoints["RTN"] = rtn["out"]
        checkpoints[method.upper()] = out
        futures = {label: perplexity_task.submit(label, d, eval_text, eval_seqlen, devices[0])
                   for label, d in checkpoints.items()}
        table = {label: f.result() for label, f in futures.items()}
        timings["perplexity"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    if method == "awq":  # RTN searches nothing: no scale statistics
        create_table_artifact(key="awq-scale-stats", table=scale_table(stats),
                              description="per-layer AWQ scale statistics")
    pictures = write_plots(stats, plots.report_dir(out))
    report_args = (model, out, opts, pipeline.checkpoint_bytes(model), size, timings, table)
    work_used = (work, pipeline.folder_bytes(work))
    report = markdown_report(*report_args, pictures=pictures, work=work_used)
    # The UI shows images embedded as data: URLs (it cannot read files on this machine); the returned
    # report (printed by the CLI) points at the files instead.
    create_markdown_artifact(key="awq-report", description="AWQ run report", markdown=markdown_report(
        *report_args, pictures={title: plots.data_uri(path) for title, path in pictures.items()}, work=work_used))
    return {"out": out, "files": files, "bytes": size, "timings": timings, "perplexity": table, "stats": stats,
            "report": report, "plots": pictures}


def write_plots(stats: dict, folder: str) -> dict[str, str]:
    """The report's PNGs, {title: path}; a plotting failure is logged, never fails the quantization."""
    try:
        return plots.write_plots(stats, folder) if stats else {}
    except Exception as e:
        get_run_logger().warning("plots not written: %r", e)
        return {}
