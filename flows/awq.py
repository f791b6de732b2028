"""Prefect flow `awq`: awqflow.pipeline.run with every stage a task and the blocks in parallel.

Flows only run the pipeline's one sequence, choose devices and task runners, and report; no math
here. Block results live in the content-addressed cache (storage/cache.py), so a repeated or resumed
run skips every finished block whichever task runner ran it.
"""

import os
import queue
import threading
from contextlib import contextmanager

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from awqflow import pipeline
from awqflow.flows import plots
from awqflow.flows.report import markdown_report
from awqflow.options import Options

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


@task(name="block", task_run_name="block-{index}", cache_policy=NO_CACHE)
def block_task(p: pipeline.Plan, index: int, cache_url: str, store_path: str | None, devices: tuple[str, ...]) -> dict:
    with device_from(devices) as device:
        return pipeline.cached_block(p, index, cache_url, store_path, device)


def terminal_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar with ETA on stderr for the CLI; a disabled bar for deployments and tests."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{desc:>10}", unit="block", disable=not enabled, dynamic_ncols=True)


@flow(name="awq-blocks")
def blocks_flow(
    p: pipeline.Plan, cache_url: str, store_path: str | None, devices: tuple[str, ...], progress: bool = False
) -> dict:
    artifact = create_progress_artifact(progress=0.0, key="awq-blocks", description=f"blocks of {p.model_dir}")
    futures = {block_task.submit(p, i, cache_url, store_path, devices): i for i in range(p.n_blocks)}
    stats = {}
    with terminal_bar(progress, p.n_blocks, "blocks") as bar:
        for future in as_completed(list(futures)):
            stats[futures[future]] = future.result()
            bar.update(1)
            update_progress_artifact(artifact, progress=100.0 * len(stats) / p.n_blocks)
    return dict(sorted(stats.items()))


class PrefectRunner:
    """pipeline.run's stages as Prefect tasks (named as the stage), the blocks as a subflow of parallel tasks."""

    def __init__(self, show_progress: bool = False):
        self.show_progress = show_progress

    def stage(self, name: str, fn, *args, **kwargs):
        return task(fn, name=name, cache_policy=NO_CACHE)(*args, **kwargs)

    def progress(self, desc: str, total: int):
        if not self.show_progress:
            return None
        bar = terminal_bar(True, total, desc)

        def update(done: int, total: int):
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return update

    def blocks(self, p: pipeline.Plan, cache_url: str, store_path: str | None, devices: tuple[str, ...]) -> dict:
        runner = task_runner(p.options.task_runner, len(devices))
        return blocks_flow.with_options(task_runner=runner)(p, cache_url, store_path, devices, self.show_progress)


@flow(name="awq", log_prints=True)
def awq(model: str, out: str, options: Options = Options(), progress: bool = False) -> dict:
    """Quantize `model` into `out` as `options` say; with options.eval_text, also report FP / RTN /
    quantized perplexity and KL. progress: terminal progress bars (the CLI turns them on)."""
    result = pipeline.run(model, out, options, PrefectRunner(progress))
    get_run_logger().info("wrote %s (%.1f MiB)", out, result["bytes"] / 2**20)
    method, stats = result["plan"].method, result["stats"]
    if method.table is not None:
        create_table_artifact(
            key=f"{method.name}-scale-stats",
            table=method.table(stats),
            description=f"per-layer {method.name.upper()} scale statistics",
        )
    pictures = write_plots(stats, plots.report_dir(out))
    work = options.work_dir or pipeline.default_work_dir(out)
    report_args = (
        model,
        out,
        options,
        pipeline.checkpoint_bytes(model),
        result["bytes"],
        result["timings"],
        result["perplexity"],
    )
    work_used = (work, pipeline.folder_bytes(work))
    report = markdown_report(*report_args, pictures=pictures, work=work_used)
    # The UI shows images embedded as data: URLs (it cannot read files on this machine); the returned
    # report (printed by the CLI) points at the files instead.
    create_markdown_artifact(
        key="awq-report",
        description="AWQ run report",
        markdown=markdown_report(
            *report_args, pictures={title: plots.data_uri(path) for title, path in pictures.items()}, work=work_used
        ),
    )
    return {**{k: v for k, v in result.items() if k != "plan"}, "report": report, "plots": pictures}


def write_plots(stats: dict, folder: str) -> dict[str, str]:
    """The report's PNGs, {title: path}; a plotting failure is logged, never fails the quantization."""
    try:
        return plots.write_plots(stats, folder) if stats else {}
    except Exception as e:
        get_run_logger().warning("plots not written: %r", e)
        return {}
