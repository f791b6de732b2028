import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from awqflow.cli import main
from conftest import CALIB, save_tiny, tiny_llama_config


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err[-1] if err else ""


def quantize_args(model, out, *extra):
    return ["quantize", "--model", str(model), "--out", str(out), "--calib", str(CALIB),
            "--n-samples", "4", "--seqlen", "64", *extra]


def test_unknown_architecture(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    code, msg = run_cli(capsys, *quantize_args(tmp_path / "m", tmp_path / "o"))
    assert code == 1 and "unsupported architecture model_type='gpt2'" in msg and "llama" in msg


def test_group_size_that_does_not_divide(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", tiny_llama_config(hidden_size=96, intermediate_size=192))
    code, msg = run_cli(capsys, *quantize_args(model, tmp_path / "o", "--group-size", "64"))
    assert code == 1 and "not divisible by group_size=64" in msg and "cannot be quantized" in msg
    assert not (tmp_path / "o").exists()


def test_bits_other_than_3_or_4(tmp_path, capsys, tiny_model):
    code, msg = run_cli(capsys, *quantize_args(tiny_model, tmp_path / "o", "--w-bit", "8"))
    assert code == 1 and "w_bit=8 is not supported" in msg


def test_missing_weights(tmp_path, capsys, tiny_model):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model, broken)
    os.remove(broken / "model.safetensors")
    code, msg = run_cli(capsys, *quantize_args(broken, tmp_path / "o"))
    assert code == 1 and "no model.safetensors" in msg


def test_nan_activations(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", tiny_llama_config())
    from safetensors.torch import load_file, save_file
    state = load_file(model / "model.safetensors")
    state["model.embed_tokens.weight"][:, 5] = float("nan")
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    code, msg = run_cli(capsys, *quantize_args(model, tmp_path / "o"))
    assert code == 1 and "NaN/inf" in msg and "block 0" in msg


def test_entry_point_prints_one_line_and_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "awqflow", "ppl", "--model", str(tmp_path), "--text", "x.txt"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"awqflow: error: no config.json in {tmp_path}: pass a Hugging Face model directory"]


def test_quantize_then_ppl_json(tmp_path, capsys, tiny_model):
    out = tmp_path / "q"
    main(quantize_args(tiny_model, out))
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    text = tmp_path / "eval.txt"
    text.write_text(CALIB.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    main(["ppl", "--model", str(out), "--text", str(text), "--seqlen", "128", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] > 1000 and torch.isfinite(torch.tensor(result["ppl"]))
