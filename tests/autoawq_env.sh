#!/bin/sh
# AutoAWQ 0.2.9 and the transformers 4.51.3 it needs, as an overlay for the main venv's python (which brings torch,
# safetensors, numpy): a --target folder, ~5 s and ~125 MB instead of a second venv with its own torch (~2 min, 1 GB).
# usage: tests/autoawq_env.sh PYTHON FOLDER     On failure FOLDER.failed holds pip's output (the test's skip reason).
set -u
PY=$1; DEST=$2
rm -rf "$DEST" "$DEST.failed"
if "$PY" -m pip install -q --no-deps --target "$DEST" transformers==4.51.3 tokenizers==0.21.4 \
        huggingface_hub==0.36.2 accelerate==1.15.0 autoawq==0.2.9 > "$DEST.log" 2>&1; then
    touch "$DEST/.installed"
else
    mv "$DEST.log" "$DEST.failed"
fi
rm -f "$DEST.log"
