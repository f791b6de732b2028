"""The fixture's packed checkpoint through the Triton kernels gives the reference path's perplexity
within fp16 rounding (on CPU: the kernels run in Triton's interpreter)."""

import torch
from transformers import AutoTokenizer

from awqflow import pipeline
from awqflow.load import load_model
from awqflow.options import Options
from awqflow.stages.perplexity import eval_windows, perplexity

from conftest import EVAL, FIXTURE


def test_triton_path_perplexity_equals_reference(tmp_path, monkeypatch):
    out = tmp_path / "rtn"
    pipeline.run(str(FIXTURE), str(out), Options(method="rtn", group_size=64, work_dir=str(tmp_path / "w")))
    tok = AutoTokenizer.from_pretrained(FIXTURE)
    windows = eval_windows(tok, EVAL.read_text(encoding="utf-8")[:20000], 64)[:2]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(str(out), device, torch.float16)
    monkeypatch.setenv("AWQFLOW_DISABLE_TRITON", "1")
    reference = perplexity(model, windows)
    monkeypatch.setenv("AWQFLOW_DISABLE_TRITON", "0")
    monkeypatch.setenv("AWQFLOW_FORCE_TRITON", "1")
    calls = []
    from awqflow.kernels import quant_linear

    original = quant_linear.use_triton
    monkeypatch.setattr(quant_linear, "use_triton", lambda x: calls.append(1) or original(x))
    triton = perplexity(model, windows)
    assert calls and original(torch.zeros(1, dtype=torch.float16, device=device))  # the kernels ran
    assert abs(triton["ppl"] - reference["ppl"]) < 2e-3 * reference["ppl"], (triton, reference)
