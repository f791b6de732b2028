#!/usr/bin/env bash
# The GPU half of issue #5 in as few device calls as possible: run on a CUDA machine, from the repo root.
#
#   bash bench/gpu_session.sh kernel    # bench/kernel.py, plain and with CUDA graphs (~2.5 min on an H200)
#   bash bench/gpu_session.sh 7b        # bench/quantize_7b.py: 7B-shaped model, 128 x 512 tokens
#   bash bench/gpu_session.sh tests     # CUDA kernel tests + Triton-vs-reference perplexity (over 9 min on
#                                       # an H200, 2026-12-04: every autotune config compiles; run it last)
#   bash bench/gpu_session.sh all
#
# Logs go to $OUT (the device tool's result folder) or ./gpu-results. The lent GPU machines have torch,
# triton and transformers but not zarr, and cannot download: bench/gpu_wheels.sh fetches the missing
# wheels into .whl/ here, to be carried along (carry: [".whl"]).
set -euo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the repo root must not go on sys.path: its awqflow/ folder would stand in for the installed package,
# which alone has awqflow.kernels, awqflow.stages ... (they are the root's other folders)
export PYTHONSAFEPATH=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

site=/tmp/awqflow-site
if [ ! -d "$site/awqflow" ]; then
    if ! $PY -c "import zarr, pydantic" 2>/dev/null; then
        ls .whl/*.whl >/dev/null 2>&1 || { echo "zarr or pydantic is missing and no .whl/ was carried: run bench/gpu_wheels.sh first"; exit 1; }
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    fi
    # a plain (non-editable) install: the package-dir mapping of stages/, kernels/ ... into awqflow.*
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/versions.txt"

# a failing step is reported and the next one still runs: one device call should bring back all it can
step=${1:-all}
if [[ $step == kernel || $step == all ]]; then
    $PY bench/kernel.py 2>&1 | tee "$OUT/kernel.log" || echo "!! bench/kernel.py failed"
    $PY bench/kernel.py --cuda-graph --models 7b,70b --ms 1,4,16 2>&1 | tee "$OUT/kernel_graph.log" || echo "!! bench/kernel.py --cuda-graph failed"
fi
if [[ $step == 7b || $step == all ]]; then
    $PY bench/quantize_7b.py --work /tmp/awqflow-7b 2>&1 | tee "$OUT/quantize_7b.log" || echo "!! bench/quantize_7b.py failed"
fi
if [[ $step == tests || $step == all ]]; then
    $PY -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_kernel_end_to_end.py 2>&1 | tee "$OUT/tests.log" || echo "!! kernel tests failed: see $OUT/tests.log"
fi
