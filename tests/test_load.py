"""The loader is safe beside a from_pretrained in another thread (issue 13's OverflowError): transformers
replaces PreTrainedModel.tie_weights and torch's init functions with no-ops for the whole process while
it loads, and a tied lm_head left to tie_weights kept uninitialised memory."""

import threading

import torch
from transformers.initialization import no_init_weights, no_tie_weights

from awqflow import pipeline
from awqflow.load import load_model
from awqflow.options import Options
from awqflow.stages.model import BUILD_LOCK


def test_a_tied_lm_head_is_tied_even_while_another_thread_loads(tiny_model, tmp_path):
    out = tmp_path / "rtn"
    pipeline.run(str(tiny_model), str(out), Options(method="rtn", group_size=64, work_dir=str(tmp_path / "w")))
    ids = torch.randint(0, 100, (1, 16))
    reference = load_model(str(out))(input_ids=ids).logits
    with no_tie_weights(), no_init_weights():  # what from_pretrained does to every thread while it runs
        model = load_model(str(out))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model(input_ids=ids).logits, reference)


def test_loads_wait_for_a_build_in_another_thread(tiny_model, tmp_path):
    out = tmp_path / "rtn"
    pipeline.run(str(tiny_model), str(out), Options(method="rtn", group_size=64, work_dir=str(tmp_path / "w")))
    done = threading.Event()
    with BUILD_LOCK:  # another thread inside from_pretrained holds the lock
        t = threading.Thread(target=lambda: (load_model(str(out)), done.set()))
        t.start()
        assert not done.wait(2.0)
    t.join(60)
    assert done.is_set()
