"""Dependencies run one way: storage (and the checkpoint formats) at the bottom, stages and kernels
above it, never importing each other, orchestration (pipeline, flows, CLI) on top."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FORBIDDEN = {
    "storage": ("awqflow.stages", "awqflow.kernels", "awqflow.flows", "awqflow.pipeline", "awqflow.options"),
    "stages": ("awqflow.kernels", "awqflow.flows", "awqflow.pipeline", "awqflow.options", "awqflow.cli"),
    "kernels": ("awqflow.stages", "awqflow.flows", "awqflow.pipeline", "awqflow.options"),
}
IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.M)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_goes_up_or_sideways(layer):
    bad = []
    for path in sorted((Path(ROOT) / layer).rglob("*.py")):
        for match in IMPORT.finditer(path.read_text()):
            name = match.group(1) or match.group(2)
            if name.startswith(FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_the_kernels_folder_does_not_stand_in_for_the_top_level_kernels_package():
    """Python run from the repo root (python -m, a Prefect worker's flow run) has the root on sys.path, where
    kernels/ would be found as the top-level package `kernels`: Hugging Face's, which transformers imports at
    start-up (5.25: "cannot import name 'CUDAProperties' from 'kernels'")."""
    code = (
        "import os, transformers.activations, awqflow.kernels.reference\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError:\n    pass\n"
        "else:\n    f = getattr(kernels, '__file__', None)  # None: not installed, our folder posing as a bare one\n"
        "    assert f is None or os.path.dirname(f) != os.path.abspath('kernels'), f\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
