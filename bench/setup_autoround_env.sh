#!/usr/bin/env bash
# Isolated venv with auto-round (Intel's SignRound), used only as a comparison baseline
# (bench/autoround_worker.py runs inside it; awqflow is never installed there).
#
#   bash bench/setup_autoround_env.sh            # creates .bench-envs/autoround
#   AUTOROUND_VERSION=0.16.1 TORCH_VERSION=2.13.0 bash bench/setup_autoround_env.sh
#
# torch is pinned (and kept pinned by a constraints file) so pip never swaps in a
# multi-GB CUDA build. Idempotent: exits early if the env already imports both.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${AUTOROUND_ENV_DIR:-$ROOT/.bench-envs/autoround}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
AUTOROUND_VERSION="${AUTOROUND_VERSION:-0.16.1}"
PY="$ENV_DIR/bin/python"

check() {
  "$PY" - "$TORCH_VERSION" "$AUTOROUND_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys, torch, auto_round
from auto_round import AutoRound  # noqa: F401
import safetensors, transformers  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert auto_round.__version__.split("+")[0] == sys.argv[2], auto_round.__version__
PYEOF
}

if [ -x "$PY" ] && check; then
  echo "auto-round env already set up at $ENV_DIR"
  exit 0
fi

start=$(date +%s)
python3 -m venv "$ENV_DIR"
"$PY" -m pip install -q --upgrade pip
constraints="$ENV_DIR/constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q -c "$constraints" "auto-round==$AUTOROUND_VERSION"
check || { echo "auto-round env at $ENV_DIR failed its import check" >&2; exit 1; }

echo "installed auto-round==$AUTOROUND_VERSION + torch==$TORCH_VERSION in $(( $(date +%s) - start ))s;" \
     "venv size $(du -sh "$ENV_DIR" | cut -f1)"
