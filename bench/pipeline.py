"""Wall time of the pipeline on the bundled model, side by side in one process:

  direct   awqflow.pipeline.run (no Prefect), cold cache
  flow-1   the Prefect flow `awq`, threads, 1 worker, cold cache
  flow-2   the same with 2 workers (devices cpu,cpu), cold cache
  cached   flow-2 again on its finished work dir (everything found in the cache)

and prints per-stage seconds and the ratios: Prefect overhead (flow-1 / direct), parallel
speed-up (flow-1 / flow-2 on the block stage), cached rerun (cached / flow-2).

    .venv/bin/python bench/pipeline.py [--n-samples 128 --seqlen 512]
"""

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="awqflow-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from awqflow import pipeline  # noqa: E402
from awqflow.flows.awq import awq  # noqa: E402
from awqflow.options import Options  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "fixture", "model"))
    ap.add_argument("--calib", default=os.path.join(ROOT, "fixture", "data", "calib.txt"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="awqflow-bench-")
    common = dict(calib=a.calib, n_samples=a.n_samples, seqlen=a.seqlen)

    # warm-up: imports, the ephemeral Prefect server, the tokenizer (not what we compare)
    awq(model=a.model, out=f"{tmp}/warm", options=Options(method="rtn", **common))

    runs = {}
    t = time.perf_counter()
    runs["direct"] = pipeline.run(a.model, f"{tmp}/direct", Options(**common))["timings"]
    runs["direct"]["wall"] = time.perf_counter() - t
    for name, devices, work in (
        ("flow-1", ["cpu"], "w1"),
        ("flow-2", ["cpu", "cpu"], "w2"),
        ("cached", ["cpu", "cpu"], "w2"),
    ):
        t = time.perf_counter()
        options = Options(devices=devices, work_dir=f"{tmp}/{work}", **common)
        runs[name] = awq(model=a.model, out=f"{tmp}/{name}", options=options)["timings"]
        runs[name]["wall"] = time.perf_counter() - t

    stages = ["calibration", "capture", "blocks", "save", "wall"]
    print(f"\nfixture model, {a.n_samples} x {a.seqlen} calibration tokens, {os.cpu_count()} CPU cores")
    print("| run | " + " | ".join(stages) + " |\n|---|" + "---|" * len(stages))
    for name, t in runs.items():
        print(f"| {name} | " + " | ".join(f"{t.get(s, 0):.1f}" for s in stages) + " |")
    print(f"\nPrefect overhead, flow-1 / direct (wall): {runs['flow-1']['wall'] / runs['direct']['wall']:.2f}x")
    print(f"2 workers vs 1, block stage speed-up: {runs['flow-1']['blocks'] / runs['flow-2']['blocks']:.2f}x")
    print(
        f"cached rerun / cold (wall): {runs['cached']['wall'] / runs['flow-2']['wall']:.3f} "
        f"({runs['cached']['wall']:.1f} s)"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
