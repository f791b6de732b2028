"""Quality on the trained fixture: AWQ beats RTN at 4 and 3 bits, group 64 and 128, and is no worse
than llm-compressor's AWQModifier measured on the same calibration and evaluation windows
(bench/compare_llmcompressor.py records that baseline in bench/results/)."""

import json

import pytest
from transformers import AutoTokenizer

from awqflow import pipeline
from awqflow.load import load_model
from awqflow.options import Options
from awqflow.stages.calibration import calibration_windows
from awqflow.stages.perplexity import eval_windows, perplexities
from awqflow.storage.fingerprint import tensor_fingerprint

from conftest import CALIB, EVAL, FIXTURE, ROOT

BASELINE = json.loads((ROOT / "bench" / "results" / "compare_llmcompressor.json").read_text())
N_SAMPLES, SEQLEN = BASELINE["n_samples"], BASELINE["seqlen"]


@pytest.fixture(scope="module")
def windows():
    tok = AutoTokenizer.from_pretrained(FIXTURE)
    calib = calibration_windows(str(CALIB), tok, N_SAMPLES, SEQLEN)
    ev = eval_windows(tok, EVAL.read_text(encoding="utf-8"), SEQLEN)
    # the recorded baseline was measured on exactly these windows
    assert tensor_fingerprint(calib) == BASELINE["calib_fingerprint"]
    assert tensor_fingerprint(ev) == BASELINE["eval_fingerprint"]
    return ev


@pytest.mark.parametrize("w_bit,group", [(4, 128), (4, 64), (3, 128), (3, 64)])
def test_awq_beats_rtn_and_matches_llm_compressor(w_bit, group, windows, tmp_path):
    q = dict(w_bit=w_bit, group_size=group, calib=str(CALIB), n_samples=N_SAMPLES, seqlen=SEQLEN)
    q["work_dir"] = str(tmp_path / "work")
    pipeline.run(str(FIXTURE), str(tmp_path / "awq"), Options(**q))
    pipeline.run(str(FIXTURE), str(tmp_path / "rtn"), Options(method="rtn", **q))
    models = {
        "fp": load_model(str(FIXTURE)),
        "awq": load_model(str(tmp_path / "awq")),
        "rtn": load_model(str(tmp_path / "rtn")),
    }
    r = perplexities(models, windows, reference="fp")
    awq, rtn = r["awq"]["ppl"], r["rtn"]["ppl"]
    fp = BASELINE["fp_ppl"]
    baseline = next(r for r in BASELINE["rows"] if r["w_bit"] == w_bit and r["group_size"] == group)
    # at w4 g128 every method is within 0.05 % here: perplexity ties RTN's within CPU noise (2026-12-02, two
    # CPUs: 50.7536 and 50.7555 against 50.7533; KL 0.00340 against 0.00445), KL to the FP logits separates them
    assert fp < awq < rtn * (1 + 1e-4) and r["awq"]["kl"] < 0.9 * r["rtn"]["kl"], r
    assert awq <= baseline["llmc_awq"]["ppl"] * 1.0005, (awq, baseline["llmc_awq"]["ppl"])
    # the recorded awqflow number is reproduced by this run: the table in the README is current
    assert abs(awq - baseline["awqflow_awq"]["ppl"]) < 1e-3 * awq
