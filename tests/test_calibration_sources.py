"""Calibration from a local parquet file (no tokenizer needed: the documents are what is checked)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from awqflow.stages.calibration import load_documents


def test_parquet_documents_come_from_the_text_field(tmp_path):
    path = tmp_path / "calib.parquet"
    pq.write_table(pa.table({"body": ["first document", "second one", "third"], "id": [1, 2, 3]}), path)
    assert sorted(load_documents(str(path), text_field="body")) == ["first document", "second one", "third"]
    with pytest.raises((KeyError, ValueError)):
        load_documents(str(path), text_field="text")
