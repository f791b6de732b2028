"""Dependencies run one way: storage (and the checkpoint formats) at the bottom, stages and kernels
above it, never importing each other, orchestration (pipeline, flows, CLI) on top."""

import re
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
