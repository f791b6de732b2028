#!/usr/bin/env bash
# Fetch, here, the wheels that the lent GPU machines lack (they have torch, triton, transformers,
# safetensors, numpy, fsspec, pyyaml; not zarr, nor pydantic, which awqflow.options needs; nothing can be
# downloaded there) for their Python 3.12, into .whl/.
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
du -sh .whl
