import torch
from transformers import AutoModelForCausalLM

from awqflow.stages.capture import capture_block_inputs
from awqflow.stages.model import open_model
from awqflow.storage.activations import ActivationStore


def test_captured_inputs_are_the_fp_models_hidden_states(tiny_model, tmp_path):
    m = open_model(str(tiny_model))
    config = m.config
    torch.manual_seed(0)
    windows = torch.randint(0, config.vocab_size, (5, 48))
    store = ActivationStore(str(tmp_path / "acts.zarr"))
    capture_block_inputs(m, windows, store, "cpu", torch.float32, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    for i in range(config.num_hidden_layers):
        torch.testing.assert_close(store.read(i), hidden[i], rtol=1e-5, atol=1e-5)
    assert store.read(0).shape == (5, 48, config.hidden_size)


def test_capture_keeps_bf16_and_resumes_without_rewriting(tiny_model, tmp_path):
    m = open_model(str(tiny_model))
    config = m.config
    windows = torch.randint(0, config.vocab_size, (3, 32))
    path = str(tmp_path / "acts.zarr")
    capture_block_inputs(m, windows, ActivationStore(path), "cpu", torch.bfloat16)
    store = ActivationStore(path)
    first = [store.read(i) for i in range(config.num_hidden_layers)]
    assert all(t.dtype == torch.bfloat16 for t in first)
    # a crash before block 1 was marked complete: the resumed capture fills it in, identically
    store.root["blocks/1/hidden"].attrs["complete"] = False
    assert not store.has(1)
    capture_block_inputs(m, windows, ActivationStore(path), "cpu", torch.bfloat16)
    store = ActivationStore(path)
    assert all(torch.equal(store.read(i), first[i]) for i in range(config.num_hidden_layers))


def test_store_refuses_nan_activations(tmp_path):
    store = ActivationStore(str(tmp_path / "a.zarr"))
    bad = torch.ones(2, 4, 8, dtype=torch.float16)
    bad[1, 2, 3] = float("inf")
    try:
        store.write(0, bad)
    except FloatingPointError as e:
        assert "block 0" in str(e) and "NaN/inf" in str(e) and "--dtype" not in str(e)
    else:
        raise AssertionError("inf activations were stored")
    assert not store.has(0)
