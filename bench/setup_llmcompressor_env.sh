#!/usr/bin/env bash
# Isolated venv with llm-compressor, used only as a comparison baseline
# (bench/llmcompressor_worker.py runs inside it; awqflow is never installed there).
#
#   bash bench/setup_llmcompressor_env.sh            # creates .bench-envs/llmcompressor
#   LLMC_VERSION=0.14.0.1 TORCH_VERSION=2.13.0 bash bench/setup_llmcompressor_env.sh
#
# torch is pinned (and kept pinned by a constraints file) so pip never swaps in a
# multi-GB CUDA build. Idempotent: exits early if the env already imports both.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${LLMC_ENV_DIR:-$ROOT/.bench-envs/llmcompressor}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
PY="$ENV_DIR/bin/python"

check() {
  "$PY" - "$TORCH_VERSION" "$LLMC_VERSION" <<'EOF' >/dev/null 2>&1
import sys, torch, llmcompressor
from llmcompressor.modifiers.transform.awq import AWQModifier  # noqa: F401
from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert llmcompressor.__version__ == sys.argv[2], llmcompressor.__version__
EOF
}

if [ -x "$PY" ] && check; then
  echo "llm-compressor env already set up at $ENV_DIR"
  exit 0
fi

start=$(date +%s)
python3 -m venv "$ENV_DIR"
"$PY" -m pip install -q --upgrade pip
constraints="$ENV_DIR/constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q -c "$constraints" "llmcompressor==$LLMC_VERSION"
check || { echo "llm-compressor env at $ENV_DIR failed its import check" >&2; exit 1; }

echo "installed llmcompressor==$LLMC_VERSION + torch==$TORCH_VERSION in $(( $(date +%s) - start ))s;" \
     "venv size $(du -sh "$ENV_DIR" | cut -f1)"
