import json

import pytest
from transformers import AutoTokenizer

from awqflow.stages.calibration import calibration_windows

from conftest import CALIB, FIXTURE


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FIXTURE)


def test_txt_windows_are_concatenated_not_padded(tokenizer):
    w = calibration_windows(str(CALIB), tokenizer, n_samples=16, seqlen=128)
    assert w.shape == (16, 128)
    ids = tokenizer(CALIB.read_text(encoding="utf-8")[:200000] + "\n\n", add_special_tokens=False)["input_ids"]
    assert w.flatten()[:1000].tolist() == ids[:1000]  # one document, cut in order
    assert tokenizer.pad_token_id not in w.flatten().tolist() or tokenizer.pad_token_id is None


def test_jsonl_documents_are_shuffled_with_the_seed(tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    texts = CALIB.read_text(encoding="utf-8").split("\n\n")
    path.write_text("\n".join(json.dumps({"body": t}) for t in texts if t.strip()))
    a = calibration_windows(str(path), tokenizer, 8, 64, text_field="body", seed=0)
    b = calibration_windows(str(path), tokenizer, 8, 64, text_field="body", seed=0)
    c = calibration_windows(str(path), tokenizer, 8, 64, text_field="body", seed=1)
    assert a.equal(b) and not a.equal(c)
    with pytest.raises(KeyError, match="no field 'text'"):
        calibration_windows(str(path), tokenizer, 8, 64)


def test_offline_dataset_name_tells_the_user_to_pass_a_file(tokenizer):
    with pytest.raises(RuntimeError, match="pass a local file instead: --calib"):
        calibration_windows("pileval", tokenizer, 4, 64)


def test_too_little_text_is_a_clear_error(tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Only a few words of calibration text.")
    with pytest.raises(ValueError, match="fewer than the 512 needed"):
        calibration_windows(str(small), tokenizer, 4, 128)
